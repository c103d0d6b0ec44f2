// paged_attention.cu: attention over the paged KV cache.
//
// Every kernel here computes, for each query token t of sequence s at absolute position pos,
//     out[t, h] = softmax_j( q[t, h] . K[s, j, kvh]  * scale ) @ V[s, j, kvh],   j = lo .. pos
// with lo = 0, or lo = max(0, pos - sliding_window + 1) when sliding_window > 0 (Mistral-style
// sliding-window attention: the last sliding_window positions, the query's own included),
// where kvh = h / (num_heads / num_kv_heads) (GQA/MQA: a group of query heads shares one KV head)
// and row j of sequence s lives in physical block block_tables[s, j / block_size] at offset
// j % block_size. The new tokens of sequence s are its last q_len positions:
//     pos = seq_lens[s] - q_len + i   for its i-th query token.
//
// Layouts (shared with the CPU backend, rawpaged/backend/cpu.py):
//   q            [T, num_heads, head_dim], token stride q_stride elements (a view of a fused qkv is fine)
//   kv_cache     [num_blocks, num_layers, 2, num_kv_heads, block_size, head_dim]; the K (or V) tile
//                of one (block, layer, kv head) is [block_size, head_dim] and contiguous
//   block_tables int32 [S, max_blocks_per_seq];  seq_lens int32 [S];  query_start_loc int32 [S+1]
//   out          [T, num_heads, head_dim], contiguous
//
// Kernels:
//   paged_decode_*         one query token per sequence (decode), CUDA cores. One thread block per
//                          (KV head, tile of GT query heads of its group, sequence[, partition]):
//                          the GT heads read each K/V row once, from registers. Any group size: the
//                          last tile of a group masks the heads past its end.
//   paged_decode_mma_*     the same with tensor cores (fp16/bf16, compile-time head size): one block
//                          per (KV head, tile of 16 query heads, sequence[, partition]); each warp
//                          streams 16-token K/V chunks through its own cp.async pipeline in shared
//                          memory and computes S = Q K^T and O += P V with mma.sync.
//   paged_decode_reduce_*  merges the partitions of split-K decode.
//   paged_prefill_*        varlen causal prefill with tensor cores, flash style, the query heads of a
//                          GQA group in one block: serves prefill, chunked prefill, prefix-cached
//                          prompts and mixed batches.
//   paged_varlen_*         one warp per (token, head), any head size and dtype: the fallback for
//                          shapes the fast kernels do not cover (e.g. fp32 prefill) and a second,
//                          independent implementation for the GPU tests.
//
// Softmax runs in the base-2 domain: scores are pre-multiplied by scale * log2(e) so each
// exponential is one exp2 (ex2.approx). The running maximum m and sum l are fp32.
//
// Bandwidth-latency product (decode is a stream of K/V bytes; this is the budget the decode kernels
// are sized against). The H200 copies ~4.3 TB/s device to device; a DRAM load under that load takes
// ~600-800 ns. To sustain the rate, Little's law asks for 4.3e12 B/s * 700e-9 s = 3.0 MB in flight
// over the chip, 23 KB per SM (26 KB at 800 ns; 32 KB with margin for the latency growing under
// load). What each kernel keeps in flight is stated at the kernel.
#include "common.cuh"

#define RP_FULL_MASK 0xffffffffu

constexpr int NUM_WARPS = 4;
constexpr int NUM_THREADS = NUM_WARPS * 32;
constexpr int PACK = 8;                        // elements a lane loads per row chunk (16 bytes of fp16)

// Smallest power of two >= x: a constant expression for the fast paths, two instructions otherwise.
__host__ __device__ constexpr int next_pow2_c(int x) { return x <= 1 ? 1 : 2 * next_pow2_c((x + 1) / 2); }
__device__ __forceinline__ int next_pow2(int x) { return x <= 1 ? 1 : 1 << (32 - __clz(x - 1)); }
__device__ __forceinline__ int ilog2(int x) { return 31 - __clz(x); }   // x a power of two

// ==========================================================================================
// Split-K partitions of a decode query's keys.
//
// A decode query reads keys [lo, ctx), lo = max(0, ctx - sliding_window) with a window, else 0.
// With num_partitions P > 1 each sequence cuts its own span into P equal shares rounded up to a
// multiple of `align` tokens: partitions are balanced whatever the sequence's length, none lies
// before the window, and the grid depends on P alone (so a CUDA graph can fix it, e.g. from
// max_model_len). Shares past the span are empty: their blocks return at once and the reduce
// merges only the first ceil(span / share).
// ==========================================================================================
__device__ __forceinline__ int partition_tokens(int span, int align, int parts) {
    const int share = (span + parts - 1) / parts;
    return max(align, (share + align - 1) / align * align);
}

// Keys [begin, end) of partition z (the whole span when num_partitions <= 1); false when empty.
__device__ __forceinline__ bool decode_keys(int ctx, int sliding_window, int align, int num_partitions, int z,
                                            int& begin, int& end) {
    const int lo = sliding_window > 0 ? max(0, ctx - sliding_window) : 0;
    begin = lo;
    end = ctx;
    if (num_partitions > 1) {
        const int share = partition_tokens(ctx - lo, align, num_partitions);
        begin = lo + z * share;
        end = min(ctx, begin + share);
    }
    return begin < end;
}

// ==========================================================================================
// Decode on CUDA cores.
//
// Lanes and rows. A K row (one token, one KV head) is head_dim elements = nv packs of 8. A warp
// reads rows in waves: lane -> (sub, chunk) with chunk = lane % nvp and sub = lane / nvp, where
// nvp = next_pow2(nv) lanes cover one row (lanes with chunk >= nv idle, for head sizes 80, 96...).
// One wave of 32 lanes thus reads 32/nvp consecutive tokens, a contiguous run of the K tile,
// with one 16-byte load per lane: coalesced. Each lane issues VPL waves per step (VPL loads of K
// and VPL of V in flight) before it computes.
//
// In flight: a warp holds 2 * VPL * 16 B per lane = 8 KB (VPL 8: GT 1, 2), 4 KB (GT 4) or 2 KB
// (GT 8) of K/V; registers (117-249) allow 4, 3 or 2 blocks of 4 warps per SM, i.e. 128, 48 or
// 16 KB per SM against the 23-32 KB asked above: GT 8 falls short, which is one reason groups of
// 4 and more go to the tensor-core kernel below (fp32 and odd head sizes keep this one).
//
// A lane owns the 8 dims of its chunk: it holds q[h, chunk*8 .. +8] for its GT heads in
// registers, computes partial dot products for its tokens, and the nvp lanes of a token sum
// them with xor-shuffles. The online softmax state (m, l) is per warp; the output accumulator
// acc[g][8] is per lane (its chunk, its tokens) and is summed across subs and warps at the end.
// Heads: tile blockIdx.x % tiles of KV head blockIdx.x / tiles holds query heads
// h0 .. h0 + n_heads - 1 of the group (n_heads = GT except in the group's last, partial tile).
// ==========================================================================================
// The end of both decode kernels, for one (row, d) of the block's query heads: merge the warps'
// online-softmax states (m, l: base-2, stride `rows` per warp in s_m / s_l) and partial outputs
// (s_o[(w * rows + row) * hd + d]), then write the result: the output itself, or with split-K this
// partition's normalised output and, once per head, its (max, sum) for the reduce kernel.
template <typename T>
__device__ __forceinline__ void merge_warps_and_store(const float* s_m, const float* s_l, const float* s_o, int rows,
                                                      int row, int d, int hd, long long t, long long s, int h,
                                                      int num_heads, int num_partitions, T* out, float* part_out,
                                                      float* part_max, float* part_sum) {
    float M = RP_NEG_INF;
#pragma unroll
    for (int w = 0; w < NUM_WARPS; ++w) M = fmaxf(M, s_m[w * rows + row]);
    float L = 0.0f, O = 0.0f;
#pragma unroll
    for (int w = 0; w < NUM_WARPS; ++w) {
        const float wt = exp2f(s_m[w * rows + row] - M);   // a warp that saw no token: m = -inf, wt = 0
        L += s_l[w * rows + row] * wt;
        O += s_o[(w * rows + row) * hd + d] * wt;
    }
    if (num_partitions <= 1) {
        out[(t * num_heads + h) * hd + d] = from_float<T>(O / L);
    } else {
        const long long idx = (s * num_heads + h) * num_partitions + blockIdx.z;
        part_out[idx * hd + d] = O / L;
        if (d == 0) {
            part_max[idx] = M;
            part_sum[idx] = L;
        }
    }
}

template <typename T, int HD, int GT>
__device__ __forceinline__ void paged_decode_impl(
    T* __restrict__ out, float* __restrict__ part_out, float* __restrict__ part_max, float* __restrict__ part_sum,
    const T* __restrict__ q, long long q_stride, const T* __restrict__ kv_cache, const int* __restrict__ block_tables,
    const int* __restrict__ seq_lens, const int* __restrict__ query_start_loc, int layer, int num_layers,
    int num_heads, int num_kv_heads, int block_size, int max_blocks_per_seq, int head_dim, int partition_align,
    int num_partitions, int sliding_window, float scale) {
    // Packs per lane per step: fewer when GT heads' worth of q and acc registers are live.
    constexpr int WEIGHT = (sizeof(T) == 4 ? 2 : 1) * GT;            // fp32 packs take two uint4
    constexpr int VPL = WEIGHT >= 8 ? 2 : (WEIGHT >= 4 ? 4 : 8);
    const int hd = HD > 0 ? HD : head_dim;
    const int nv = hd / PACK;                                      // packs per row
    const int nvp = HD > 0 ? next_pow2_c(HD / PACK) : next_pow2(nv);  // lanes per row
    const int log_nvp = ilog2(nvp);
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int chunk = lane & (nvp - 1);                            // which 8 dims this lane owns
    const int sub = lane >> log_nvp;                               // which token of a wave it reads
    const int tok_per_load = 32 >> log_nvp;
    const int tok_per_step = tok_per_load * VPL;
    const bool lane_active = chunk < nv;

    // Which heads, which sequence, which slice of its context.
    const int group = num_heads / num_kv_heads;
    const int tiles = (group + GT - 1) / GT;
    const int kvh = blockIdx.x / tiles;
    const int tile = blockIdx.x - kvh * tiles;
    const int h0 = kvh * group + tile * GT;                        // first of this block's query heads
    const int n_heads = min(GT, group - tile * GT);                // the group's last tile may be partial
    const int s = blockIdx.y;
    const int t = query_start_loc[s];
    if (query_start_loc[s + 1] - t != 1) return;                   // decode: one query token per sequence
    int tok_begin, tok_end;
    if (!decode_keys(seq_lens[s], sliding_window, partition_align, num_partitions, blockIdx.z, tok_begin, tok_end))
        return;                                                    // an empty partition: the reduce skips it too

    // q for our heads, our chunk, pre-scaled into the log2 domain: qr[g][e] = q[t, h0+g, chunk*8+e]
    // (0 for the heads past the group: they compute harmless scores and are never stored).
    const float qscale = scale * RP_LOG2E;
    float qr[GT][PACK];
#pragma unroll
    for (int g = 0; g < GT; ++g) {
        Pack<T> p;
        if (lane_active && g < n_heads) load_pack(p, q + t * q_stride + (long long)(h0 + g) * hd + chunk * PACK);
        else zero_pack(p);
        unpack(p, qr[g]);
#pragma unroll
        for (int e = 0; e < PACK; ++e) qr[g][e] *= qscale;
    }

    // Address of K row `tok`: block_tables -> physical block, then (layer, K, kvh) tile, row, chunk.
    const int* table = block_tables + (long long)s * max_blocks_per_seq;
    const long long tile_elems = (long long)block_size * hd;                 // [bs, D] elements
    const long long block_stride = (long long)num_layers * 2 * num_kv_heads * tile_elems;
    const T* k_base = kv_cache + ((long long)layer * 2 * num_kv_heads + kvh) * tile_elems + chunk * PACK;
    const long long v_off = (long long)num_kv_heads * tile_elems;            // V tiles follow the K tiles
    const int log_bs = ilog2(block_size);

    float m[GT], l[GT], acc[GT][PACK];
#pragma unroll
    for (int g = 0; g < GT; ++g) {
        m[g] = RP_NEG_INF;
        l[g] = 0.0f;
#pragma unroll
        for (int e = 0; e < PACK; ++e) acc[g][e] = 0.0f;
    }

    // Warps take steps of tok_per_step tokens round robin over [tok_begin, tok_end).
    for (int base = tok_begin + warp * tok_per_step; base < tok_end; base += NUM_WARPS * tok_per_step) {
        // 1. Issue every load of the step: VPL K packs and VPL V packs (masked beyond the context).
        Pack<T> kp[VPL], vp[VPL];
#pragma unroll
        for (int i = 0; i < VPL; ++i) {
            const int tok = base + i * tok_per_load + sub;
            if (lane_active && tok < tok_end) {
                const long long blk = __ldg(table + (tok >> log_bs));
                const T* src = k_base + blk * block_stride + (long long)(tok & (block_size - 1)) * hd;
                load_pack(kp[i], src);
                load_pack(vp[i], src + v_off);
            } else {
                zero_pack(kp[i]);
                zero_pack(vp[i]);
            }
        }
        // 2. Scores sc[g][i] = q[h0+g] . K[tok_i]: partial over our 8 dims, then summed over the
        //    nvp lanes of the token (xor offsets nvp/2 .. 1 stay inside the token's lane group).
        float sc[GT][VPL];
#pragma unroll
        for (int i = 0; i < VPL; ++i) {
            float kf[PACK];
            unpack(kp[i], kf);
#pragma unroll
            for (int g = 0; g < GT; ++g) {
                float d = 0.0f;
#pragma unroll
                for (int e = 0; e < PACK; ++e) d = fmaf(qr[g][e], kf[e], d);
                sc[g][i] = d;
            }
        }
#pragma unroll
        for (int g = 0; g < GT; ++g)
#pragma unroll
            for (int i = 0; i < VPL; ++i) {
                for (int o = nvp >> 1; o > 0; o >>= 1) sc[g][i] += __shfl_xor_sync(RP_FULL_MASK, sc[g][i], o);
                if (base + i * tok_per_load + sub >= tok_end) sc[g][i] = RP_NEG_INF;
            }
        // 3. Online softmax per head: step max over our tokens and the other subs (xor offsets
        //    16 .. nvp cross token groups), rescale what was accumulated, turn scores into p.
        //    The step always holds token `base` (valid), so m_new is finite.
#pragma unroll
        for (int g = 0; g < GT; ++g) {
            float mx = sc[g][0];
#pragma unroll
            for (int i = 1; i < VPL; ++i) mx = fmaxf(mx, sc[g][i]);
            for (int o = 16; o >= nvp; o >>= 1) mx = fmaxf(mx, __shfl_xor_sync(RP_FULL_MASK, mx, o));
            const float m_new = fmaxf(m[g], mx);
            const float corr = exp2f(m[g] - m_new);                // 0 on the first step (m = -inf)
            float psum = 0.0f;
#pragma unroll
            for (int i = 0; i < VPL; ++i) {
                sc[g][i] = exp2f(sc[g][i] - m_new);                // masked tokens: exp2(-inf) = 0
                psum += sc[g][i];
            }
            // Every lane of a token holds the same p: sum over subs only, so each token counts once.
            for (int o = 16; o >= nvp; o >>= 1) psum += __shfl_xor_sync(RP_FULL_MASK, psum, o);
            l[g] = l[g] * corr + psum;
            m[g] = m_new;
#pragma unroll
            for (int e = 0; e < PACK; ++e) acc[g][e] *= corr;
        }
        // 4. acc[g] += p[g][i] * V[tok_i][our 8 dims].
#pragma unroll
        for (int i = 0; i < VPL; ++i) {
            float vf[PACK];
            unpack(vp[i], vf);
#pragma unroll
            for (int g = 0; g < GT; ++g)
#pragma unroll
                for (int e = 0; e < PACK; ++e) acc[g][e] = fmaf(sc[g][i], vf[e], acc[g][e]);
        }
    }

    // Merge. Within a warp the subs share m, so their accumulators add up. Across warps each
    // (m_w, l_w, acc_w) is rescaled to the common max M: O = sum_w acc_w 2^(m_w - M) / L.
#pragma unroll
    for (int g = 0; g < GT; ++g)
#pragma unroll
        for (int e = 0; e < PACK; ++e)
            for (int o = 16; o >= nvp; o >>= 1) acc[g][e] += __shfl_xor_sync(RP_FULL_MASK, acc[g][e], o);

    extern __shared__ float smem[];
    float* s_acc = smem;                              // [NUM_WARPS][GT][hd]
    float* s_m = smem + NUM_WARPS * GT * hd;          // [NUM_WARPS][GT]
    float* s_l = s_m + NUM_WARPS * GT;                // [NUM_WARPS][GT]
    if (sub == 0 && lane_active) {
#pragma unroll
        for (int g = 0; g < GT; ++g)
#pragma unroll
            for (int e = 0; e < PACK; ++e) s_acc[(warp * GT + g) * hd + chunk * PACK + e] = acc[g][e];
    }
    if (lane == 0) {
#pragma unroll
        for (int g = 0; g < GT; ++g) {
            s_m[warp * GT + g] = m[g];
            s_l[warp * GT + g] = l[g];
        }
    }
    __syncthreads();
    for (int i = threadIdx.x; i < n_heads * hd; i += NUM_THREADS) {
        const int g = i / hd, d = i - g * hd;
        merge_warps_and_store(s_m, s_l, s_acc, GT, g, d, hd, t, s, h0 + g, num_heads, num_partitions,
                              out, part_out, part_max, part_sum);
    }
}

// ==========================================================================================
// Tensor-core building blocks (sm_80+): mma.sync.m16n8k16, ldmatrix, cp.async.
//
// mma.sync.m16n8k16 fragments (g = lane / 4, c = lane % 4):
//   A (16x16, row-major) a0 = (g, 2c..2c+1)  a1 = (g+8, 2c..)  a2 = (g, 2c+8..)  a3 = (g+8, 2c+8..)
//   B (16x8, k x n)      b0 = (k 2c..2c+1, n g)  b1 = (k 2c+8..2c+9, n g)
//   C (16x8, fp32)       c0,c1 = (g, 2c..2c+1)  c2,c3 = (g+8, 2c..2c+1)
// Two 16-bit values per 32-bit register, lower k (or column) in the low half.
//
// ldmatrix.x4 loads four 8x8 matrices of 16-bit elements from shared memory; lanes 8i..8i+7 give the
// row addresses of matrix i (16 bytes each). Lane (g, c) receives in r[i] row g, elements 2c, 2c+1
// of matrix i; with .trans, column g, elements of rows 2c, 2c+1. So for a tile stored row-major in
// shared memory as [token][dim] (both K and V are):
//   K as the B operand of S = Q K^T (k = dim, n = token) is the plain load: b0 = (dims 2c.., token g);
//   V as the B operand of O = P V  (k = token, n = dim) is the .trans load:  b0 = (tokens 2c.., dim g);
//   Q (or P) as the A operand is the plain load of [row][k].
// Shared-memory rows are padded by 8 elements (16 bytes): a row stride of D+8 elements is an odd
// number of 16-byte units for every head size here, so the 8 rows an ldmatrix phase reads fall in
// 8 distinct bank groups (no conflicts).
//
// cp.async.cg copies 16 bytes from global to shared memory without passing through registers and
// completes asynchronously (commit_group / wait_group): loads in flight cost no registers, so a
// kernel can keep several K/V tiles in flight. A source size of 0 writes 16 zero bytes (rows past
// the context: their V must be 0, not the NaN of an unwritten slot, since 0 * NaN = NaN).
// ==========================================================================================
template <typename T> __device__ __forceinline__ void mma_16816(float* c, const unsigned* a, const unsigned* b);

#ifdef RP_HOST_EMULATION
template <> inline void mma_16816<f16>(float* c, const unsigned* a, const unsigned* b) {
    rp_emu_mma(c, a, b, [](unsigned short h) { f16 x; x.bits = h; return to_float(x); });
}
template <> inline void mma_16816<bf16>(float* c, const unsigned* a, const unsigned* b) {
    rp_emu_mma(c, a, b, [](unsigned short h) { bf16 x; x.bits = h; return to_float(x); });
}
inline void ldmatrix_x4(unsigned* r, const void* row) { rp_emu_ldmatrix_x4<false>(r, row); }
inline void ldmatrix_x4_trans(unsigned* r, const void* row) { rp_emu_ldmatrix_x4<true>(r, row); }
inline void cp_async_16(void* dst, const void* src, bool valid) { rp_emu_cp_async(dst, src, valid); }
inline void cp_async_commit() { rp_emu_cp_commit(); }
template <int N> inline void cp_async_wait() { rp_emu_cp_wait(N); }
#else
template <> __device__ __forceinline__ void mma_16816<f16>(float* c, const unsigned* a, const unsigned* b) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

template <> __device__ __forceinline__ void mma_16816<bf16>(float* c, const unsigned* a, const unsigned* b) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

// The shared-window address of a generic pointer into shared memory (what ldmatrix / cp.async take).
__device__ __forceinline__ unsigned smem_addr(const void* p) {
    unsigned r;
    asm("{ .reg .u64 a; cvta.to.shared.u64 a, %1; cvt.u32.u64 %0, a; }" : "=r"(r) : "l"(p));
    return r;
}

__device__ __forceinline__ void ldmatrix_x4(unsigned* r, const void* row) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(smem_addr(row)) : "memory");
}

__device__ __forceinline__ void ldmatrix_x4_trans(unsigned* r, const void* row) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(smem_addr(row)) : "memory");
}

__device__ __forceinline__ void cp_async_16(void* dst, const void* src, bool valid) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n"
                 :: "r"(smem_addr(dst)), "l"(src), "r"(valid ? 16 : 0) : "memory");
}

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }

template <int N> __device__ __forceinline__ void cp_async_wait() {
    asm volatile("cp.async.wait_group %0;\n" :: "n"(N) : "memory");
}
#endif

template <typename T>
__device__ __forceinline__ unsigned ld_u32(const T* p) { return *reinterpret_cast<const unsigned*>(p); }
template <typename T>
__device__ __forceinline__ unsigned ldg_u32(const T* p) { return __ldg(reinterpret_cast<const unsigned*>(p)); }

// Lane row addresses of the ldmatrix.x4 loads above, for a [rows][stride] tile at (row0, col0):
//   A operand of rows row0..+15, k col0..+15 (Q):  matrices (rows 0-7, k 0-7), (8-15, 0-7), (0-7, 8-15), (8-15, 8-15)
//   K, plain:  (tokens 0-7, dims 0-7), (0-7, 8-15), (8-15, 0-7), (8-15, 8-15) -> r0,r1 = n-tile of tokens 0-7, r2,r3 = 8-15
//   V, .trans: (tokens 0-7, dims 0-7), (8-15, 0-7), (0-7, 8-15), (8-15, 8-15) -> r0,r1 = n-tile of dims 0-7,  r2,r3 = 8-15
template <typename T>
__device__ __forceinline__ const T* frag_a_row(const T* base, int stride, int lane) {
    return base + ((lane & 7) + 8 * ((lane >> 3) & 1)) * stride + 8 * (lane >> 4);
}
template <typename T>
__device__ __forceinline__ const T* frag_k_row(const T* base, int stride, int lane) {
    return base + ((lane & 7) + 8 * (lane >> 4)) * stride + 8 * ((lane >> 3) & 1);
}
template <typename T>
__device__ __forceinline__ const T* frag_v_row(const T* base, int stride, int lane) {
    return base + ((lane & 7) + 8 * ((lane >> 3) & 1)) * stride + 8 * (lane >> 4);
}

// One online-softmax step for the two rows a lane holds in an m16 x (8*NT) score tile (row g:
// elements 0, 1 of each n-tile; row g+8: elements 2, 3). A row is spread over the 4 lanes of its
// quad: the max is reduced with xor 1, 2. Scores become p = 2^(s - m) in place, the row's running
// (m, l) move on (l is this lane's share: quad-summed at the end) and corr[r] = 2^(m_old - m_new)
// rescales what the row accumulated before. A row that has seen only masked keys keeps m = -inf
// and uses 0 as its reference (p = 0, corr = 1).
template <int NT>
__device__ __forceinline__ void softmax_step(float (&sc)[NT][4], float* m, float* l, float* corr) {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        float mx = RP_NEG_INF;
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) mx = fmaxf(mx, fmaxf(sc[nt][2 * r], sc[nt][2 * r + 1]));
        mx = fmaxf(mx, __shfl_xor_sync(RP_FULL_MASK, mx, 1));
        mx = fmaxf(mx, __shfl_xor_sync(RP_FULL_MASK, mx, 2));
        const float m_new = fmaxf(m[r], mx);
        const float m_use = m_new == RP_NEG_INF ? 0.0f : m_new;
        corr[r] = exp2f(m[r] - m_use);
        float rs = 0.0f;
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) {
            sc[nt][2 * r] = exp2f(sc[nt][2 * r] - m_use);
            sc[nt][2 * r + 1] = exp2f(sc[nt][2 * r + 1] - m_use);
            rs += sc[nt][2 * r] + sc[nt][2 * r + 1];
        }
        l[r] = l[r] * corr[r] + rs;
        m[r] = m_new;
    }
}

// ==========================================================================================
// Decode with tensor cores (fp16 / bf16, head size HD a multiple of 16).
//
// Grid (num_kv_heads * ceil(group / 16), num_seqs, num_partitions), 128 threads = 4 warps. A block
// takes up to 16 query heads of one KV head's group (the M = 16 rows of the mma; rows past the
// group are zero queries, never stored) and one partition of one sequence's keys. The keys are cut
// into 16-token chunks dealt to the warps round robin (chunk i of warp w: tokens begin + 16 (w + 4i)).
// Per chunk a warp computes
//     S[16 heads x 16 tokens] = Q[16 x HD] K^T     HD/16 k-steps x 2 n-tiles (K: ldmatrix)
//     mask, online softmax on S                     (rows in quads, as prefill)
//     O[16 x HD] += P[16 x 16] V[16 x HD]          HD/8 n-tiles (V: ldmatrix.trans; P = S's registers)
// and the warps' (m, l, O) are merged through shared memory at the end, as in the CUDA-core kernel.
// Q stays in registers as A fragments (HD <= 128; at 256 its 16 x 256 tile sits in shared memory and
// is re-read with ldmatrix, to keep O's 128 accumulators and the rest within 255 registers).
//
// Loads in flight. Each warp has its own ring of STAGES chunk buffers (K rows then V rows, 16 x
// (HD+8) each) filled with cp.async: it keeps the next STAGES-1 chunks in flight while it computes
// one, and needs only __syncwarp (no block barrier) in the loop. At HD = 128 a chunk is 8 KB of
// K+V, so a warp keeps 16 KB in flight, a block 64 KB; shared memory (102 KB a block) allows 2
// blocks per SM: 128 KB in flight per SM, 4x the 32 KB the bandwidth-latency product asks, so one
// block per SM (batch 1 after split-K) is enough too. HD = 64: 3 stages, 55 KB, 4 blocks/SM; HD =
// 256: 2 stages (16 KB in flight a warp), 135 KB + 8 KB for Q, 1 block/SM, 64 KB in flight.
//
// Arithmetic per chunk and warp: 2 * HD/16 + HD/8 = 32 mma (HD = 128) for 8 KB, about 4x under
// what the SM's tensor cores can do in the time the bytes take to arrive at 4.3 TB/s / 132 SMs;
// with 16 rows for a group of 4 most of that work is on padding, which the memory bound hides.
// ==========================================================================================
constexpr int DM_ROWS = 16;          // query heads per block (the mma's M)
constexpr int DM_CHUNK = 16;         // tokens per warp step (one k-step of P V)

template <int HD>
struct DecodeMmaShape {
    static constexpr int STAGES = HD <= 128 ? 3 : 2;
    static constexpr bool Q_IN_REGS = HD <= 128;
    static constexpr int STRIDE = HD + 8;                              // padded shared row, elements
    static constexpr int STAGE_ELEMS = 2 * DM_CHUNK * STRIDE;          // K rows, then V rows
    static constexpr int PIPE_ELEMS = NUM_WARPS * STAGES * STAGE_ELEMS;
    static constexpr int Q_ELEMS = Q_IN_REGS ? 0 : DM_ROWS * STRIDE;
    static constexpr int SMEM_BYTES = (PIPE_ELEMS + Q_ELEMS) * 2;
    // The merge reuses the pipeline's memory: [NUM_WARPS][16][HD] fp32 outputs + (m, l) per row.
    static_assert(NUM_WARPS * DM_ROWS * (HD + 2) * 4 <= PIPE_ELEMS * 2, "merge scratch exceeds the pipeline");
};

template <typename T, int HD>
__device__ __forceinline__ void paged_decode_mma_impl(
    T* __restrict__ out, float* __restrict__ part_out, float* __restrict__ part_max, float* __restrict__ part_sum,
    const T* __restrict__ q, long long q_stride, const T* __restrict__ kv_cache, const int* __restrict__ block_tables,
    const int* __restrict__ seq_lens, const int* __restrict__ query_start_loc, int layer, int num_layers,
    int num_heads, int num_kv_heads, int block_size, int max_blocks_per_seq, int head_dim, int partition_align,
    int num_partitions, int sliding_window, float scale) {
    using Shape = DecodeMmaShape<HD>;
    constexpr int STAGES = Shape::STAGES, STRIDE = Shape::STRIDE, NP = HD / PACK;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int g = lane >> 2, c2 = 2 * (lane & 3);                  // fragment row / column pair

    // Which heads, which sequence, which keys.
    const int group = num_heads / num_kv_heads;
    const int tiles = (group + DM_ROWS - 1) / DM_ROWS;
    const int kvh = blockIdx.x / tiles;
    const int tile = blockIdx.x - kvh * tiles;
    const int h0 = kvh * group + tile * DM_ROWS;                   // head of row 0
    const int n_heads = min(DM_ROWS, group - tile * DM_ROWS);      // rows that are real heads
    const int s = blockIdx.y;
    const int t = query_start_loc[s];
    if (query_start_loc[s + 1] - t != 1) return;                   // decode: one query token per sequence
    int tok_begin, tok_end;
    if (!decode_keys(seq_lens[s], sliding_window, partition_align, num_partitions, blockIdx.z, tok_begin, tok_end))
        return;

    extern __shared__ uint4 smem_u4[];                             // 16-byte aligned
    T* pipe = reinterpret_cast<T*>(smem_u4);                       // [NUM_WARPS][STAGES][K 16 | V 16][STRIDE]
    T* stages = pipe + warp * STAGES * Shape::STAGE_ELEMS;         // this warp's ring
    T* sQ = pipe + Shape::PIPE_ELEMS;                              // [16][STRIDE] when Q is not in registers

    // Q of rows g and g+8 as A fragments, straight from global memory (4-byte loads; once per block).
    const T* q_tok = q + t * q_stride + (long long)h0 * HD;
    unsigned qa[Shape::Q_IN_REGS ? HD / 16 : 1][4];
    if constexpr (Shape::Q_IN_REGS) {
#pragma unroll
        for (int kk = 0; kk < HD / 16; ++kk) {
            const int col = kk * 16 + c2;
            qa[kk][0] = g < n_heads ? ldg_u32(q_tok + g * HD + col) : 0u;
            qa[kk][1] = g + 8 < n_heads ? ldg_u32(q_tok + (g + 8) * HD + col) : 0u;
            qa[kk][2] = g < n_heads ? ldg_u32(q_tok + g * HD + col + 8) : 0u;
            qa[kk][3] = g + 8 < n_heads ? ldg_u32(q_tok + (g + 8) * HD + col + 8) : 0u;
        }
    } else {
        for (int p = threadIdx.x; p < DM_ROWS * NP; p += NUM_THREADS) {
            const int r = p / NP, col = p - r * NP;
            const uint4 v = r < n_heads ? __ldg(reinterpret_cast<const uint4*>(q_tok + r * HD + col * PACK))
                                        : make_uint4(0, 0, 0, 0);
            *reinterpret_cast<uint4*>(sQ + r * STRIDE + col * PACK) = v;
        }
        __syncthreads();
    }

    // Row addresses: block_tables -> physical block, then the (layer, K, kvh) tile and the row.
    const int* table = block_tables + (long long)s * max_blocks_per_seq;
    const long long tile_elems = (long long)block_size * HD;
    const long long block_stride = (long long)num_layers * 2 * num_kv_heads * tile_elems;
    const T* k_base = kv_cache + ((long long)layer * 2 * num_kv_heads + kvh) * tile_elems;
    const long long v_off = (long long)num_kv_heads * tile_elems;
    const int log_bs = ilog2(block_size);

    // This warp's chunks: i = 0 .. my_chunks-1 -> tokens chunk_start(i) .. +15.
    const int n_chunks = (tok_end - tok_begin + DM_CHUNK - 1) / DM_CHUNK;
    const int my_chunks = n_chunks > warp ? (n_chunks - warp + NUM_WARPS - 1) / NUM_WARPS : 0;
    auto chunk_start = [&](int i) { return tok_begin + DM_CHUNK * (warp + NUM_WARPS * i); };

    // Chunk i -> stage i % STAGES: 16 rows x NP packs of K and of V, HD/16 packs of each per lane
    // (pack p = lane + 32 j: row p / NP, pack p % NP; a row's packs are read by consecutive lanes).
    auto issue = [&](int i) {
        T* sk = stages + (i % STAGES) * Shape::STAGE_ELEMS;
        T* sv = sk + DM_CHUNK * STRIDE;
        const int c0 = chunk_start(i);
#pragma unroll
        for (int j = 0; j < HD / 16; ++j) {
            const int p = lane + 32 * j;
            const int r = p / NP, col = p - r * NP;
            const int tok = c0 + r;
            const bool valid = tok < tok_end;
            const T* src = kv_cache;                               // any valid address: nothing is read
            if (valid) {
                const long long blk = __ldg(table + (tok >> log_bs));
                src = k_base + blk * block_stride + (long long)(tok & (block_size - 1)) * HD + col * PACK;
            }
            cp_async_16(sk + r * STRIDE + col * PACK, src, valid);
            cp_async_16(sv + r * STRIDE + col * PACK, valid ? src + v_off : src, valid);
        }
    };

    const float qscale = scale * RP_LOG2E;
    float o[HD / 8][4];
#pragma unroll
    for (int dt = 0; dt < HD / 8; ++dt) o[dt][0] = o[dt][1] = o[dt][2] = o[dt][3] = 0.0f;
    float m[2] = {RP_NEG_INF, RP_NEG_INF}, l[2] = {0.0f, 0.0f};

    // Pipeline: chunks 0 .. STAGES-2 in flight before the loop; iteration i issues chunk i+STAGES-1
    // into the stage chunk i-1 used (freed by the trailing __syncwarp), then waits for chunk i
    // (wait_group STAGES-1: all but the newest STAGES-1 groups of this thread have landed; the
    // __syncwarp after it publishes the other lanes' copies). Every iteration commits a group, empty
    // or not, so the count stays exact.
#pragma unroll
    for (int i = 0; i < STAGES - 1; ++i) {
        if (i < my_chunks) issue(i);
        cp_async_commit();
    }
    for (int i = 0; i < my_chunks; ++i) {
        if (i + STAGES - 1 < my_chunks) issue(i + STAGES - 1);
        cp_async_commit();
        cp_async_wait<STAGES - 1>();
        __syncwarp();
        const T* sk = stages + (i % STAGES) * Shape::STAGE_ELEMS;
        const T* sv = sk + DM_CHUNK * STRIDE;
        const int c0 = chunk_start(i);

        // S = Q K^T: 16 heads x 16 tokens (n-tiles of tokens 0-7 and 8-15).
        float sc[2][4];
#pragma unroll
        for (int nt = 0; nt < 2; ++nt) sc[nt][0] = sc[nt][1] = sc[nt][2] = sc[nt][3] = 0.0f;
#pragma unroll
        for (int kk = 0; kk < HD / 16; ++kk) {
            unsigned a[4], b[4];
            if constexpr (Shape::Q_IN_REGS) {
                a[0] = qa[kk][0]; a[1] = qa[kk][1]; a[2] = qa[kk][2]; a[3] = qa[kk][3];
            } else {
                ldmatrix_x4(a, frag_a_row(sQ + kk * 16, STRIDE, lane));
            }
            ldmatrix_x4(b, frag_k_row(sk + kk * 16, STRIDE, lane));
            mma_16816<T>(sc[0], a, b);
            mma_16816<T>(sc[1], a, b + 2);
        }
        // Scale into the log2 domain; tokens past the partition (the chunk's tail) are masked.
#pragma unroll
        for (int nt = 0; nt < 2; ++nt)
#pragma unroll
            for (int e = 0; e < 4; ++e)
                sc[nt][e] = c0 + nt * 8 + c2 + (e & 1) < tok_end ? sc[nt][e] * qscale : RP_NEG_INF;
        float corr[2];
        softmax_step<2>(sc, m, l, corr);
#pragma unroll
        for (int dt = 0; dt < HD / 8; ++dt) {
            o[dt][0] *= corr[0]; o[dt][1] *= corr[0];
            o[dt][2] *= corr[1]; o[dt][3] *= corr[1];
        }
        // O += P V: P's A fragment is S's C fragments (rounded to T); V pairs of n-tiles by .trans.
        unsigned pa[4];
        pa[0] = pack2<T>(sc[0][0], sc[0][1]);
        pa[1] = pack2<T>(sc[0][2], sc[0][3]);
        pa[2] = pack2<T>(sc[1][0], sc[1][1]);
        pa[3] = pack2<T>(sc[1][2], sc[1][3]);
#pragma unroll
        for (int dp = 0; dp < HD / 16; ++dp) {
            unsigned b[4];
            ldmatrix_x4_trans(b, frag_v_row(sv + dp * 16, STRIDE, lane));
            mma_16816<T>(o[2 * dp], pa, b);
            mma_16816<T>(o[2 * dp + 1], pa, b + 2);
        }
        __syncwarp();                                              // the stage is read: chunk i+STAGES may land there
    }
    cp_async_wait<0>();

    // Merge the warps: (m_w, l_w, O_w) per row -> O = sum_w O_w 2^(m_w - M) / sum_w l_w 2^(m_w - M).
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        l[r] += __shfl_xor_sync(RP_FULL_MASK, l[r], 1);
        l[r] += __shfl_xor_sync(RP_FULL_MASK, l[r], 2);
    }
    __syncthreads();                                               // every warp is done with the pipeline
    float* s_o = reinterpret_cast<float*>(smem_u4);                // [NUM_WARPS][16][HD]
    float* s_m = s_o + NUM_WARPS * DM_ROWS * HD;                   // [NUM_WARPS][16]
    float* s_l = s_m + NUM_WARPS * DM_ROWS;                        // [NUM_WARPS][16]
#pragma unroll
    for (int dt = 0; dt < HD / 8; ++dt)
#pragma unroll
        for (int e = 0; e < 4; ++e)
            s_o[(warp * DM_ROWS + g + 8 * (e >> 1)) * HD + dt * 8 + c2 + (e & 1)] = o[dt][e];
    if ((lane & 3) == 0) {
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            s_m[warp * DM_ROWS + g + 8 * r] = m[r];
            s_l[warp * DM_ROWS + g + 8 * r] = l[r];
        }
    }
    __syncthreads();
    for (int i = threadIdx.x; i < n_heads * HD; i += NUM_THREADS) {
        const int row = i / HD, d = i - row * HD;
        merge_warps_and_store(s_m, s_l, s_o, DM_ROWS, row, d, HD, t, s, h0 + row, num_heads, num_partitions,
                              out, part_out, part_max, part_sum);
    }
}

// Split-K reduce: out[t, h] = sum_p O_p * L_p 2^(M_p - M) / sum_p L_p 2^(M_p - M) over the
// partitions p that hold part of the sequence's keys (decode_keys). Grid (num_heads, num_seqs),
// 128 threads; dynamic shared memory: num_partitions floats (the weights).
template <typename T>
__device__ __forceinline__ void paged_decode_reduce_impl(
    T* __restrict__ out, const float* __restrict__ part_out, const float* __restrict__ part_max,
    const float* __restrict__ part_sum, const int* __restrict__ seq_lens, const int* __restrict__ query_start_loc,
    int num_heads, int head_dim, int partition_align, int num_partitions, int sliding_window) {
    extern __shared__ float weights[];
    const int h = blockIdx.x, s = blockIdx.y;
    const int t = query_start_loc[s];
    if (query_start_loc[s + 1] - t != 1) return;
    const int ctx = seq_lens[s];
    const int span = ctx - (sliding_window > 0 ? max(0, ctx - sliding_window) : 0);
    const int n_parts = (span + partition_tokens(span, partition_align, num_partitions) - 1)
                        / partition_tokens(span, partition_align, num_partitions);
    const long long base = ((long long)s * num_heads + h) * num_partitions;
    float M = RP_NEG_INF;
    for (int p = 0; p < n_parts; ++p) M = fmaxf(M, part_max[base + p]);
    float L = 0.0f;
    for (int p = 0; p < n_parts; ++p) L += part_sum[base + p] * exp2f(part_max[base + p] - M);
    for (int p = threadIdx.x; p < n_parts; p += blockDim.x)
        weights[p] = part_sum[base + p] * exp2f(part_max[base + p] - M) / L;
    __syncthreads();
    for (int d = threadIdx.x; d < head_dim; d += blockDim.x) {
        float o = 0.0f;
        for (int p = 0; p < n_parts; ++p) o = fmaf(weights[p], part_out[(base + p) * head_dim + d], o);
        out[((long long)t * num_heads + h) * head_dim + d] = from_float<T>(o);
    }
}

// ==========================================================================================
// Varlen fallback: one warp per (query token, head). Lanes split the head's dims (d = lane + 32j,
// up to 8 per lane, so head_dim <= 256), walk positions 0..pos one by one: score = warp sum of
// q.k, online softmax, acc += p v. Simple and general; slow for long prompts.
// Grid (T, ceil(num_heads / 4)), 128 threads.
// ==========================================================================================
template <typename T>
__device__ __forceinline__ void paged_varlen_impl(
    T* __restrict__ out, const T* __restrict__ q, long long q_stride, const T* __restrict__ kv_cache,
    const int* __restrict__ block_tables, const int* __restrict__ seq_lens, const int* __restrict__ query_start_loc,
    int num_seqs, int layer, int num_layers, int num_heads, int num_kv_heads, int block_size,
    int max_blocks_per_seq, int head_dim, int sliding_window, float scale) {
    const int lane = threadIdx.x & 31;
    const int h = blockIdx.y * NUM_WARPS + (threadIdx.x >> 5);
    if (h >= num_heads) return;
    const int t = blockIdx.x;
    // The sequence holding token t: the last s with query_start_loc[s] <= t (binary search).
    int lo = 0, hi = num_seqs - 1;
    while (lo < hi) {
        const int mid = (lo + hi + 1) >> 1;
        if (query_start_loc[mid] <= t) lo = mid; else hi = mid - 1;
    }
    const int s = lo;
    const int q_len = query_start_loc[s + 1] - query_start_loc[s];
    const int pos = seq_lens[s] - q_len + (t - query_start_loc[s]);   // attend to first_key..pos
    const int first_key = sliding_window > 0 ? max(0, pos - sliding_window + 1) : 0;
    const int kvh = h / (num_heads / num_kv_heads);

    const float qscale = scale * RP_LOG2E;
    float qr[8], acc[8];
#pragma unroll
    for (int j = 0; j < 8; ++j) {
        const int d = lane + 32 * j;
        qr[j] = d < head_dim ? to_float(q[t * q_stride + (long long)h * head_dim + d]) * qscale : 0.0f;
        acc[j] = 0.0f;
    }
    const int* table = block_tables + (long long)s * max_blocks_per_seq;
    const long long tile = (long long)block_size * head_dim;
    const long long block_stride = (long long)num_layers * 2 * num_kv_heads * tile;
    const T* k_base = kv_cache + ((long long)layer * 2 * num_kv_heads + kvh) * tile;
    const long long v_off = (long long)num_kv_heads * tile;
    float m = RP_NEG_INF, l = 0.0f;
    for (int j = first_key; j <= pos; ++j) {
        const long long blk = table[j / block_size];
        const T* kr = k_base + blk * block_stride + (long long)(j % block_size) * head_dim;
        float part = 0.0f;
#pragma unroll
        for (int jj = 0; jj < 8; ++jj) {
            const int d = lane + 32 * jj;
            if (d < head_dim) part = fmaf(qr[jj], to_float(kr[d]), part);
        }
        const float score = warp_sum(part);
        const float m_new = fmaxf(m, score);
        const float corr = exp2f(m - m_new);
        const float p = exp2f(score - m_new);
        l = l * corr + p;
#pragma unroll
        for (int jj = 0; jj < 8; ++jj) {
            const int d = lane + 32 * jj;
            const float v = d < head_dim ? to_float(kr[v_off + d]) : 0.0f;
            acc[jj] = fmaf(p, v, acc[jj] * corr);
        }
        m = m_new;
    }
    T* o = out + ((long long)t * num_heads + h) * head_dim;
#pragma unroll
    for (int j = 0; j < 8; ++j) {
        const int d = lane + 32 * j;
        if (d < head_dim) o[d] = from_float<T>(acc[j] / l);
    }
}

// ==========================================================================================
// Prefill with tensor cores (fp16 / bf16, head_dim a multiple of 16).
//
// Grid (ceil(max_query_len / rows), num_kv_heads * ceil(group / GH), num_seqs), 128 threads = 4
// warps, GH = group_tile query heads of one KV head's group per block (1, 2 or 4; chosen by the
// dispatcher) and rows = 16 * 4 / GH query tokens: warp w takes head w % GH of the tile and tokens
// 16 (w / GH) .. +15 of the block's rows. The block walks the keys its rows need in tiles of BN,
// gathering each K and V tile once through the block table into shared memory, for all its heads
// (GQA: a KV head's tile feeds GH query heads), then each warp computes
//     S[16 x BN] = Q[16 x D] K^T          (mma m16n8k16: Q from registers, K by ldmatrix)
//     causal mask, online softmax on S     (rows live in quads of 4 lanes)
//     O[16 x D] += P[16 x BN] V[BN x D]   (P reuses S's accumulator registers as the A operand,
//                                          V by ldmatrix.trans)
// and at the end divides by the row sums and stores O. Q is loaded once, straight into A fragments
// held across all key tiles (D <= 128; at D = 256 the warp's 16 x 256 Q tile stays in shared
// memory and is re-read by ldmatrix, keeping O's 128 accumulators within the register file).
//
// The gather is double-buffered with cp.async: tile i+1 is in flight while tile i is computed (two
// shared stages of K and V, BN x (D+8) each: 34.8 KB at D = 128, BN = 32; BN = 64 at D = 64, where
// the registers allow it). The last row of a warp
// and its window bound which tiles it computes; the block loads the union of its warps' needs.
// ==========================================================================================
template <int HD>
struct PrefillShape {
    static constexpr int BN = HD <= 64 ? 64 : 32;                    // keys per tile
    static constexpr bool Q_IN_REGS = HD <= 128;
    static constexpr int STRIDE = HD + 8;
    static constexpr int STAGE_ELEMS = 2 * BN * STRIDE;               // K rows, then V rows
    static constexpr int Q_ELEMS = Q_IN_REGS ? 0 : NUM_WARPS * 16 * STRIDE;
    static constexpr int SMEM_BYTES = (2 * STAGE_ELEMS + Q_ELEMS) * 2;
};
constexpr int PF_BM = NUM_WARPS * 16;     // query rows (token x head pairs) per block

template <typename T, int HD>
__device__ __forceinline__ void paged_prefill_impl(
    T* __restrict__ out, const T* __restrict__ q, long long q_stride, const T* __restrict__ kv_cache,
    const int* __restrict__ block_tables, const int* __restrict__ seq_lens, const int* __restrict__ query_start_loc,
    int layer, int num_layers, int num_heads, int num_kv_heads, int block_size, int max_blocks_per_seq,
    int group_tile, int sliding_window, float scale) {
    using Shape = PrefillShape<HD>;
    constexpr int BN = Shape::BN, STRIDE = Shape::STRIDE, NP = HD / PACK;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int g = lane >> 2, c2 = 2 * (lane & 3);                  // fragment row / column pair

    // Heads and rows: GH heads of the group, rows_per_block query tokens of sequence s.
    const int gh = group_tile;
    const int rows_per_block = 16 * (NUM_WARPS / gh);
    const int group = num_heads / num_kv_heads;
    const int head_tiles = (group + gh - 1) / gh;
    const int kvh = blockIdx.y / head_tiles;
    const int head_in_group = (blockIdx.y - kvh * head_tiles) * gh + warp % gh;
    const int h = kvh * group + head_in_group;
    const int s = blockIdx.z;
    const int q0 = query_start_loc[s];
    const int q_len = query_start_loc[s + 1] - q0;
    const int row0 = blockIdx.x * rows_per_block;
    if (row0 >= q_len) return;
    const int rows_here = min(rows_per_block, q_len - row0);
    const int first_pos = seq_lens[s] - q_len + row0;             // position of the block's first token
    const int kv_end = first_pos + rows_here;                      // keys kv_begin .. kv_end-1 are needed
    // Sliding window: the first token sees keys from first_pos - W + 1 on; earlier tiles are never read.
    const int kv_begin = sliding_window > 0 ? max(0, first_pos - sliding_window + 1) : 0;

    // This warp: tokens wrow0 .. wrow0+15 of the block (rows ra, ra + 8 per lane) of head h.
    const int wrow0 = 16 * (warp / gh);
    const bool warp_on = head_in_group < group && wrow0 < rows_here;
    const int ra = wrow0 + g;
    const int pos_a = first_pos + ra, pos_b = pos_a + 8;
    const int warp_last_pos = first_pos + min(wrow0 + 15, rows_here - 1);
    const int warp_first_key = sliding_window > 0 ? first_pos + wrow0 - sliding_window + 1 : 0;

    extern __shared__ uint4 smem_u4[];                             // 16-byte aligned
    T* sKV = reinterpret_cast<T*>(smem_u4);                        // [2 stages][K BN | V BN][STRIDE]
    T* sQ = sKV + 2 * Shape::STAGE_ELEMS + warp * 16 * STRIDE;     // this warp's [16][STRIDE] (D > 128)

    // Q rows ra, ra+8 of head h: A fragments in registers (or the warp's tile in shared memory).
    const T* q_a = q + (long long)(q0 + row0 + ra) * q_stride + (long long)h * HD;
    const T* q_b = q_a + 8 * q_stride;
    const bool a_ok = warp_on && ra < rows_here, b_ok = warp_on && ra + 8 < rows_here;
    unsigned qa[Shape::Q_IN_REGS ? HD / 16 : 1][4];
    if constexpr (Shape::Q_IN_REGS) {
#pragma unroll
        for (int kk = 0; kk < HD / 16; ++kk) {
            const int col = kk * 16 + c2;
            qa[kk][0] = a_ok ? ldg_u32(q_a + col) : 0u;
            qa[kk][1] = b_ok ? ldg_u32(q_b + col) : 0u;
            qa[kk][2] = a_ok ? ldg_u32(q_a + col + 8) : 0u;
            qa[kk][3] = b_ok ? ldg_u32(q_b + col + 8) : 0u;
        }
    } else {
        for (int p = lane; p < 16 * NP; p += 32) {
            const int r = p / NP, col = p - r * NP;
            const bool ok = warp_on && wrow0 + r < rows_here;
            const T* src = q + (long long)(q0 + row0 + wrow0 + r) * q_stride + (long long)h * HD + col * PACK;
            *reinterpret_cast<uint4*>(sQ + r * STRIDE + col * PACK) =
                ok ? __ldg(reinterpret_cast<const uint4*>(src)) : make_uint4(0, 0, 0, 0);
        }
        __syncwarp();
    }

    const int* table = block_tables + (long long)s * max_blocks_per_seq;
    const long long tile_elems = (long long)block_size * HD;
    const long long block_stride = (long long)num_layers * 2 * num_kv_heads * tile_elems;
    const T* k_base = kv_cache + ((long long)layer * 2 * num_kv_heads + kvh) * tile_elems;
    const long long v_off = (long long)num_kv_heads * tile_elems;
    const int log_bs = ilog2(block_size);
    const float qscale = scale * RP_LOG2E;

    // Keys kv0 .. kv0+BN-1 -> stage buf (zero rows past kv_end): BN * NP packs of K and of V.
    auto issue = [&](int kv0, int buf) {
        T* sk = sKV + buf * Shape::STAGE_ELEMS;
        T* sv = sk + BN * STRIDE;
#pragma unroll 1
        for (int p = threadIdx.x; p < BN * NP; p += NUM_THREADS) {
            const int r = p / NP, col = p - r * NP;
            const int j = kv0 + r;
            const bool valid = j < kv_end;
            const T* src = kv_cache;                               // any valid address: nothing is read
            if (valid) {
                const long long blk = __ldg(table + (j >> log_bs));
                src = k_base + blk * block_stride + (long long)(j & (block_size - 1)) * HD + col * PACK;
            }
            cp_async_16(sk + r * STRIDE + col * PACK, src, valid);
            cp_async_16(sv + r * STRIDE + col * PACK, valid ? src + v_off : src, valid);
        }
    };

    float o[HD / 8][4];
#pragma unroll
    for (int dt = 0; dt < HD / 8; ++dt) o[dt][0] = o[dt][1] = o[dt][2] = o[dt][3] = 0.0f;
    float m[2] = {RP_NEG_INF, RP_NEG_INF}, l[2] = {0.0f, 0.0f};

    // Double buffer: tile it+1 is issued before tile it is waited for (wait_group 1: all but the
    // newest group landed), a barrier publishes every thread's copies, and a second barrier frees
    // the stage before the next iteration refills it. A group is committed every iteration.
    const int n_tiles = (kv_end - kv_begin + BN - 1) / BN;
    issue(kv_begin, 0);
    cp_async_commit();
    for (int it = 0; it < n_tiles; ++it) {
        const int kv0 = kv_begin + it * BN;
        if (it + 1 < n_tiles) issue(kv0 + BN, (it + 1) & 1);
        cp_async_commit();
        cp_async_wait<1>();
        __syncthreads();
        // Causal: a tile wholly after the warp's last row, or wholly before its rows' windows, is skipped.
        if (warp_on && kv0 <= warp_last_pos && kv0 + BN > warp_first_key) {
            const T* sk = sKV + (it & 1) * Shape::STAGE_ELEMS;
            const T* sv = sk + BN * STRIDE;
            // S = Q K^T for our 16 rows and the tile's BN keys: BN/8 n-tiles, loaded two at a time.
            float sc[BN / 8][4];
#pragma unroll
            for (int nt = 0; nt < BN / 8; ++nt) sc[nt][0] = sc[nt][1] = sc[nt][2] = sc[nt][3] = 0.0f;
#pragma unroll (Shape::Q_IN_REGS ? HD / 16 : 1)
            for (int kk = 0; kk < HD / 16; ++kk) {
                unsigned a[4];
                if constexpr (Shape::Q_IN_REGS) {
                    a[0] = qa[kk][0]; a[1] = qa[kk][1]; a[2] = qa[kk][2]; a[3] = qa[kk][3];
                } else {
                    ldmatrix_x4(a, frag_a_row(sQ + kk * 16, STRIDE, lane));
                }
#pragma unroll
                for (int np = 0; np < BN / 16; ++np) {
                    unsigned b[4];
                    ldmatrix_x4(b, frag_k_row(sk + np * 16 * STRIDE + kk * 16, STRIDE, lane));
                    mma_16816<T>(sc[2 * np], a, b);
                    mma_16816<T>(sc[2 * np + 1], a, b + 2);
                }
            }
            // Scale into the log2 domain and mask: key j is visible to the row at position p iff
            // j <= p (causal) and, with a window W, j > p - W.
#pragma unroll
            for (int nt = 0; nt < BN / 8; ++nt)
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    const int j = kv0 + nt * 8 + c2 + (e & 1);
                    const int p = e < 2 ? pos_a : pos_b;
                    const bool seen = j <= p && j < kv_end && (sliding_window <= 0 || j > p - sliding_window);
                    sc[nt][e] = seen ? sc[nt][e] * qscale : RP_NEG_INF;
                }
            float corr[2];
            softmax_step<BN / 8>(sc, m, l, corr);
#pragma unroll
            for (int dt = 0; dt < HD / 8; ++dt) {
                o[dt][0] *= corr[0]; o[dt][1] *= corr[0];
                o[dt][2] *= corr[1]; o[dt][3] *= corr[1];
            }
            // O += P V. k-step ks covers keys 16ks .. 16ks+15 = n-tiles 2ks and 2ks+1 of S, whose C
            // fragments are exactly the A fragment of P (rounded to T).
#pragma unroll
            for (int ks = 0; ks < BN / 16; ++ks) {
                unsigned pa[4];
                pa[0] = pack2<T>(sc[2 * ks][0], sc[2 * ks][1]);
                pa[1] = pack2<T>(sc[2 * ks][2], sc[2 * ks][3]);
                pa[2] = pack2<T>(sc[2 * ks + 1][0], sc[2 * ks + 1][1]);
                pa[3] = pack2<T>(sc[2 * ks + 1][2], sc[2 * ks + 1][3]);
#pragma unroll
                for (int dp = 0; dp < HD / 16; ++dp) {
                    unsigned b[4];
                    ldmatrix_x4_trans(b, frag_v_row(sv + ks * 16 * STRIDE + dp * 16, STRIDE, lane));
                    mma_16816<T>(o[2 * dp], pa, b);
                    mma_16816<T>(o[2 * dp + 1], pa, b + 2);
                }
            }
        }
        __syncthreads();                                           // the stage is consumed
    }
    cp_async_wait<0>();

    // Row sums: add the quad's shares, then store O / l for the rows that exist.
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        l[r] += __shfl_xor_sync(RP_FULL_MASK, l[r], 1);
        l[r] += __shfl_xor_sync(RP_FULL_MASK, l[r], 2);
    }
    if (!warp_on) return;
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        const int row = ra + 8 * r;
        if (row >= rows_here) continue;
        const float inv = 1.0f / l[r];
        T* orow = out + ((long long)(q0 + row0 + row) * num_heads + h) * HD;
#pragma unroll
        for (int dt = 0; dt < HD / 8; ++dt)
            *reinterpret_cast<unsigned*>(orow + dt * 8 + c2) = pack2<T>(o[dt][2 * r] * inv, o[dt][2 * r + 1] * inv);
    }
}

// ==========================================================================================
// Entry points. The extern "C" kernels are not written here: rawpaged/backend/cuda/kernels.py
// holds the one table of names, instantiations and parameter lists, and appends to this file one
// __global__ wrapper per instantiation, e.g.
//     extern "C" __global__ void __launch_bounds__(128) paged_decode_f16_hd128_g4(<the table's parameters>) {
//         static_assert(<paged_decode_impl<f16, 128, 4> has exactly these parameter types>);
//         paged_decode_impl<f16, 128, 4>(<the parameters>);
//     }
// (`python -m rawpaged.backend.cuda paged_attention.cu` prints the whole program.)
// ==========================================================================================
