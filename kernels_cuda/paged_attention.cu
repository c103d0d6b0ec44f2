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
//   paged_decode_*         one query token per sequence (decode). One thread block per
//                          (KV head, group tile of GT query heads, sequence[, partition]): the GT
//                          heads that share a KV head read each K/V row once, from registers.
//   paged_decode_reduce_*  merges the partitions of the split-K variant.
//   paged_prefill_*        varlen causal prefill with tensor cores (mma.sync m16n8k16), flash style:
//                          serves prefill, chunked prefill, prefix-cached prompts and mixed batches.
//   paged_varlen_*         one warp per (token, head), any head size and dtype: the fallback for
//                          shapes the fast kernels do not cover (e.g. fp32 prefill) and a second,
//                          independent implementation for the GPU tests.
//
// Softmax runs in the base-2 domain: scores are pre-multiplied by scale * log2(e) so each
// exponential is one exp2 (ex2.approx). The running maximum m and sum l are fp32.
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
// Decode.
//
// Lanes and rows. A K row (one token, one KV head) is head_dim elements = nv packs of 8. A warp
// reads rows in waves: lane -> (sub, chunk) with chunk = lane % nvp and sub = lane / nvp, where
// nvp = next_pow2(nv) lanes cover one row (lanes with chunk >= nv idle, for head sizes 80, 96...).
// One wave of 32 lanes thus reads 32/nvp consecutive tokens, a contiguous run of the K tile,
// with one 16-byte load per lane: coalesced. Each lane issues VPL waves per step (VPL loads of K
// and VPL of V in flight) before it computes, so several kilobytes per warp are in flight.
//
// A lane owns the 8 dims of its chunk: it holds q[h, chunk*8 .. +8] for its GT heads in
// registers, computes partial dot products for its tokens, and the nvp lanes of a token sum
// them with xor-shuffles. The online softmax state (m, l) is per warp; the output accumulator
// acc[g][8] is per lane (its chunk, its tokens) and is summed across subs and warps at the end.
// ==========================================================================================
template <typename T, int HD, int GT>
__device__ __forceinline__ void paged_decode_impl(
    T* __restrict__ out, float* __restrict__ part_out, float* __restrict__ part_max, float* __restrict__ part_sum,
    const T* __restrict__ q, long long q_stride, const T* __restrict__ kv_cache, const int* __restrict__ block_tables,
    const int* __restrict__ seq_lens, const int* __restrict__ query_start_loc, int layer, int num_layers,
    int num_heads, int num_kv_heads, int block_size, int max_blocks_per_seq, int head_dim, int partition_size,
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
    const int tiles = group / GT;
    const int kvh = blockIdx.x / tiles;
    const int h0 = kvh * group + (blockIdx.x - kvh * tiles) * GT;  // first of this block's GT query heads
    const int s = blockIdx.y;
    const int t = query_start_loc[s];
    if (query_start_loc[s + 1] - t != 1) return;                   // decode: one query token per sequence
    const int ctx = seq_lens[s];
    const int lo = sliding_window > 0 ? max(0, ctx - sliding_window) : 0;   // the query sits at ctx - 1
    int tok_begin = lo, tok_end = ctx;
    if (partition_size > 0) {
        tok_begin = max(lo, (int)blockIdx.z * partition_size);
        tok_end = min(ctx, (int)blockIdx.z * partition_size + partition_size);
        if (tok_begin >= tok_end) return;       // past the context or wholly before the window: the reduce skips it too
    }

    // q for our GT heads, our chunk, pre-scaled into the log2 domain: qr[g][e] = q[t, h0+g, chunk*8+e].
    const float qscale = scale * RP_LOG2E;
    float qr[GT][PACK];
#pragma unroll
    for (int g = 0; g < GT; ++g) {
        Pack<T> p;
        if (lane_active) load_pack(p, q + t * q_stride + (long long)(h0 + g) * hd + chunk * PACK);
        else zero_pack(p);
        unpack(p, qr[g]);
#pragma unroll
        for (int e = 0; e < PACK; ++e) qr[g][e] *= qscale;
    }

    // Address of K row `tok`: block_tables -> physical block, then (layer, K, kvh) tile, row, chunk.
    const int* table = block_tables + (long long)s * max_blocks_per_seq;
    const long long tile = (long long)block_size * hd;                       // [bs, D] elements
    const long long block_stride = (long long)num_layers * 2 * num_kv_heads * tile;
    const T* k_base = kv_cache + ((long long)layer * 2 * num_kv_heads + kvh) * tile + chunk * PACK;
    const long long v_off = (long long)num_kv_heads * tile;                  // V tiles follow the K tiles
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
    for (int i = threadIdx.x; i < GT * hd; i += NUM_THREADS) {
        const int g = i / hd, d = i - g * hd;
        float M = RP_NEG_INF;
#pragma unroll
        for (int w = 0; w < NUM_WARPS; ++w) M = fmaxf(M, s_m[w * GT + g]);
        float L = 0.0f, O = 0.0f;
#pragma unroll
        for (int w = 0; w < NUM_WARPS; ++w) {
            const float wt = exp2f(s_m[w * GT + g] - M);   // a warp that saw no token: m = -inf, wt = 0
            L += s_l[w * GT + g] * wt;
            O += s_acc[(w * GT + g) * hd + d] * wt;
        }
        const int h = h0 + g;
        if (partition_size == 0) {
            out[((long long)t * num_heads + h) * hd + d] = from_float<T>(O / L);
        } else {
            // Split-K: this partition's normalised output with its (max, sum) for the reduce.
            const long long idx = ((long long)s * num_heads + h) * num_partitions + blockIdx.z;
            part_out[idx * hd + d] = O / L;
            if (d == 0) {
                part_max[idx] = M;
                part_sum[idx] = L;
            }
        }
    }
}

// Split-K reduce: out[t, h] = sum_p O_p * L_p 2^(M_p - M) / sum_p L_p 2^(M_p - M) over the
// partitions p that hold part of the context. Grid (num_heads, num_seqs), 128 threads;
// dynamic shared memory: num_partitions floats (the weights).
template <typename T>
__device__ __forceinline__ void paged_decode_reduce_impl(
    T* __restrict__ out, const float* __restrict__ part_out, const float* __restrict__ part_max,
    const float* __restrict__ part_sum, const int* __restrict__ seq_lens, const int* __restrict__ query_start_loc,
    int num_heads, int head_dim, int partition_size, int num_partitions, int sliding_window) {
    extern __shared__ float weights[];
    const int h = blockIdx.x, s = blockIdx.y;
    const int t = query_start_loc[s];
    if (query_start_loc[s + 1] - t != 1) return;
    const int ctx = seq_lens[s];
    const int n_parts = (ctx + partition_size - 1) / partition_size;
    // Partitions wholly before the window wrote nothing: start at the one holding its first token.
    const int p0 = sliding_window > 0 ? max(0, ctx - sliding_window) / partition_size : 0;
    const long long base = ((long long)s * num_heads + h) * num_partitions;
    float M = RP_NEG_INF;
    for (int p = p0; p < n_parts; ++p) M = fmaxf(M, part_max[base + p]);
    float L = 0.0f;
    for (int p = p0; p < n_parts; ++p) L += part_sum[base + p] * exp2f(part_max[base + p] - M);
    for (int p = p0 + threadIdx.x; p < n_parts; p += blockDim.x)
        weights[p] = part_sum[base + p] * exp2f(part_max[base + p] - M) / L;
    __syncthreads();
    for (int d = threadIdx.x; d < head_dim; d += blockDim.x) {
        float o = 0.0f;
        for (int p = p0; p < n_parts; ++p) o = fmaf(weights[p], part_out[(base + p) * head_dim + d], o);
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
// Grid (ceil(max_query_len / 64), num_heads, num_seqs), 128 threads = 4 warps. A block takes 64
// query rows of one head of one sequence; warp w owns rows 16w .. 16w+15. The block walks the
// keys 0 .. (last row's position) in tiles of 32: it gathers the K and V rows of the tile through
// the block table into shared memory, then each warp computes
//     S[16 x 32] = Q[16 x D] K^T          (mma m16n8k16: A = Q rows, B = K rows "col-major")
//     causal mask, online softmax on S     (rows live in quads of 4 lanes)
//     O[16 x D] += P[16 x 32] V[32 x D]   (P reuses S's accumulator registers as the A operand)
// and at the end divides by the row sums and stores O.
//
// mma.sync.m16n8k16 fragments (g = lane / 4, c = lane % 4):
//   A (16x16, row-major) a0 = (g, 2c..2c+1)  a1 = (g+8, 2c..)  a2 = (g, 2c+8..)  a3 = (g+8, 2c+8..)
//   B (16x8, k x n)      b0 = (k 2c..2c+1, n g)  b1 = (k 2c+8..2c+9, n g)
//   C (16x8, fp32)       c0,c1 = (g, 2c..2c+1)  c2,c3 = (g+8, 2c..2c+1)
// Two 16-bit values per 32-bit register, lower k (or column) in the low half.
// Shared memory rows are padded by 8 elements (16 bytes): with a row stride of D+8 the 32-bit
// fragment loads of the 8 rows g = 0..7 fall in distinct banks.
// ==========================================================================================
template <typename T> __device__ __forceinline__ void mma_16816(float* c, const unsigned* a, const unsigned* b);

#ifdef RP_HOST_EMULATION
template <> inline void mma_16816<f16>(float* c, const unsigned* a, const unsigned* b) {
    rp_emu_mma(c, a, b, [](unsigned short h) { f16 x; x.bits = h; return to_float(x); });
}
template <> inline void mma_16816<bf16>(float* c, const unsigned* a, const unsigned* b) {
    rp_emu_mma(c, a, b, [](unsigned short h) { bf16 x; x.bits = h; return to_float(x); });
}
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
#endif

constexpr int PF_BM = 64;     // query rows per block
constexpr int PF_BN = 32;     // keys per tile

template <typename T>
__device__ __forceinline__ unsigned ld_u32(const T* p) { return *reinterpret_cast<const unsigned*>(p); }

template <typename T, int HD>
__device__ __forceinline__ void paged_prefill_impl(
    T* __restrict__ out, const T* __restrict__ q, long long q_stride, const T* __restrict__ kv_cache,
    const int* __restrict__ block_tables, const int* __restrict__ seq_lens, const int* __restrict__ query_start_loc,
    int layer, int num_layers, int num_heads, int num_kv_heads, int block_size, int max_blocks_per_seq,
    int sliding_window, float scale) {
    constexpr int STRIDE = HD + 8;            // padded shared-memory row, elements
    constexpr int NP = HD / PACK;             // 16-byte packs per row
    const int s = blockIdx.z, h = blockIdx.y;
    const int q0 = query_start_loc[s];
    const int q_len = query_start_loc[s + 1] - q0;
    const int row0 = blockIdx.x * PF_BM;
    if (row0 >= q_len) return;
    const int rows_here = min(PF_BM, q_len - row0);
    const int first_pos = seq_lens[s] - q_len + row0;             // position of this block's row 0
    const int kv_end = first_pos + rows_here;                      // keys kv_begin .. kv_end-1 are needed
    // Sliding window: row 0 sees keys from first_pos - W + 1 on; tiles wholly before that are never read.
    const int kv_begin = sliding_window > 0 ? max(0, first_pos - sliding_window + 1) : 0;
    const int kvh = h / (num_heads / num_kv_heads);

    extern __shared__ uint4 smem_u4[];                             // 16-byte aligned
    T* sQ = reinterpret_cast<T*>(smem_u4);                         // [PF_BM][STRIDE]
    T* sK = sQ + PF_BM * STRIDE;                                   // [PF_BN][STRIDE]
    T* sV = sK + PF_BN * STRIDE;                                   // [PF_BN][STRIDE]

    // Q tile -> shared memory (rows past the prompt are zero).
    for (int p = threadIdx.x; p < PF_BM * NP; p += NUM_THREADS) {
        const int r = p / NP, c = p - (p / NP) * NP;
        uint4 v = make_uint4(0, 0, 0, 0);
        if (r < rows_here) v = __ldg(reinterpret_cast<const uint4*>(q + (long long)(q0 + row0 + r) * q_stride + (long long)h * HD + c * PACK));
        *reinterpret_cast<uint4*>(sQ + r * STRIDE + c * PACK) = v;
    }

    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int g = lane >> 2, c2 = 2 * (lane & 3);                  // fragment row / column pair
    const int ra = warp * 16 + g;                                  // this lane's two rows: ra, ra + 8
    const int pos_a = first_pos + ra, pos_b = pos_a + 8;
    const int warp_last_pos = first_pos + warp * 16 + 15;
    const int warp_first_key = sliding_window > 0 ? first_pos + warp * 16 - sliding_window + 1 : 0;

    const int* table = block_tables + (long long)s * max_blocks_per_seq;
    const long long tile = (long long)block_size * HD;
    const long long block_stride = (long long)num_layers * 2 * num_kv_heads * tile;
    const T* k_base = kv_cache + ((long long)layer * 2 * num_kv_heads + kvh) * tile;
    const long long v_off = (long long)num_kv_heads * tile;
    const int log_bs = ilog2(block_size);
    const float qscale = scale * RP_LOG2E;

    float o[HD / 8][4];
#pragma unroll
    for (int dt = 0; dt < HD / 8; ++dt) o[dt][0] = o[dt][1] = o[dt][2] = o[dt][3] = 0.0f;
    float m[2] = {RP_NEG_INF, RP_NEG_INF}, l[2] = {0.0f, 0.0f};

    for (int kv0 = kv_begin; kv0 < kv_end; kv0 += PF_BN) {
        __syncthreads();                                           // the previous tile is consumed
        // Gather keys kv0 .. kv0+31 through the block table (zero past kv_end).
        for (int p = threadIdx.x; p < PF_BN * NP; p += NUM_THREADS) {
            const int r = p / NP, c = p - (p / NP) * NP;
            const int j = kv0 + r;
            uint4 kv = make_uint4(0, 0, 0, 0), vv = make_uint4(0, 0, 0, 0);
            if (j < kv_end) {
                const long long blk = __ldg(table + (j >> log_bs));
                const T* src = k_base + blk * block_stride + (long long)(j & (block_size - 1)) * HD + c * PACK;
                kv = __ldg(reinterpret_cast<const uint4*>(src));
                vv = __ldg(reinterpret_cast<const uint4*>(src + v_off));
            }
            *reinterpret_cast<uint4*>(sK + r * STRIDE + c * PACK) = kv;
            *reinterpret_cast<uint4*>(sV + r * STRIDE + c * PACK) = vv;
        }
        __syncthreads();
        if (kv0 > warp_last_pos) continue;                         // causal: the whole tile is in our future
        if (kv0 + PF_BN <= warp_first_key) continue;               // window: the whole tile is before our rows' windows

        // S = Q K^T for our 16 rows and the tile's 32 keys: 4 n-tiles of 8 keys.
        float sc[PF_BN / 8][4];
#pragma unroll
        for (int nt = 0; nt < PF_BN / 8; ++nt) sc[nt][0] = sc[nt][1] = sc[nt][2] = sc[nt][3] = 0.0f;
#pragma unroll
        for (int kk = 0; kk < HD / 16; ++kk) {
            unsigned a[4];
            a[0] = ld_u32(sQ + ra * STRIDE + kk * 16 + c2);
            a[1] = ld_u32(sQ + (ra + 8) * STRIDE + kk * 16 + c2);
            a[2] = ld_u32(sQ + ra * STRIDE + kk * 16 + c2 + 8);
            a[3] = ld_u32(sQ + (ra + 8) * STRIDE + kk * 16 + c2 + 8);
#pragma unroll
            for (int nt = 0; nt < PF_BN / 8; ++nt) {
                unsigned b[2];
                b[0] = ld_u32(sK + (nt * 8 + g) * STRIDE + kk * 16 + c2);
                b[1] = ld_u32(sK + (nt * 8 + g) * STRIDE + kk * 16 + c2 + 8);
                mma_16816<T>(sc[nt], a, b);
            }
        }
        // Scale into the log2 domain and mask: key j is visible to the row at position p iff
        // j <= p (causal) and, with a window W, j > p - W.
#pragma unroll
        for (int nt = 0; nt < PF_BN / 8; ++nt)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int j = kv0 + nt * 8 + c2 + (e & 1);
                const int p = e < 2 ? pos_a : pos_b;
                const bool seen = j <= p && j < kv_end && (sliding_window <= 0 || j > p - sliding_window);
                sc[nt][e] = seen ? sc[nt][e] * qscale : RP_NEG_INF;
            }
        // Online softmax, row ra (elements 0,1 of each n-tile) and row ra+8 (elements 2,3). A row's
        // 32 scores are spread over the 4 lanes of its quad: reduce the max with xor 1, 2.
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            float mx = RP_NEG_INF;
#pragma unroll
            for (int nt = 0; nt < PF_BN / 8; ++nt) mx = fmaxf(mx, fmaxf(sc[nt][2 * r], sc[nt][2 * r + 1]));
            mx = fmaxf(mx, __shfl_xor_sync(RP_FULL_MASK, mx, 1));
            mx = fmaxf(mx, __shfl_xor_sync(RP_FULL_MASK, mx, 2));
            const float m_new = fmaxf(m[r], mx);
            const float m_use = m_new == RP_NEG_INF ? 0.0f : m_new;   // row with nothing visible yet
            const float corr = exp2f(m[r] - m_use);
            float rs = 0.0f;
#pragma unroll
            for (int nt = 0; nt < PF_BN / 8; ++nt) {
                sc[nt][2 * r] = exp2f(sc[nt][2 * r] - m_use);
                sc[nt][2 * r + 1] = exp2f(sc[nt][2 * r + 1] - m_use);
                rs += sc[nt][2 * r] + sc[nt][2 * r + 1];
            }
            l[r] = l[r] * corr + rs;                               // this lane's share; quad-summed at the end
            m[r] = m_new;
#pragma unroll
            for (int dt = 0; dt < HD / 8; ++dt) {
                o[dt][2 * r] *= corr;
                o[dt][2 * r + 1] *= corr;
            }
        }
        // O += P V. k-step ks covers keys 16ks .. 16ks+15 = n-tiles 2ks and 2ks+1 of S, whose C
        // fragments are exactly the A fragment of P (rounded to T).
#pragma unroll
        for (int ks = 0; ks < PF_BN / 16; ++ks) {
            unsigned a[4];
            a[0] = pack2<T>(sc[2 * ks][0], sc[2 * ks][1]);
            a[1] = pack2<T>(sc[2 * ks][2], sc[2 * ks][3]);
            a[2] = pack2<T>(sc[2 * ks + 1][0], sc[2 * ks + 1][1]);
            a[3] = pack2<T>(sc[2 * ks + 1][2], sc[2 * ks + 1][3]);
            const T* v0 = sV + (ks * 16 + c2) * STRIDE;               // key rows 16ks + c2, +1
            const T* v1 = v0 + 8 * STRIDE;                              // key rows 16ks + 8 + c2, +1
#pragma unroll
            for (int dt = 0; dt < HD / 8; ++dt) {
                const int d = dt * 8 + g;
                unsigned b[2];
                b[0] = (unsigned)v0[d].bits | ((unsigned)v0[STRIDE + d].bits << 16);
                b[1] = (unsigned)v1[d].bits | ((unsigned)v1[STRIDE + d].bits << 16);
                mma_16816<T>(o[dt], a, b);
            }
        }
    }

    // Row sums: add the quad's shares, then store O / l for the rows that exist.
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        l[r] += __shfl_xor_sync(RP_FULL_MASK, l[r], 1);
        l[r] += __shfl_xor_sync(RP_FULL_MASK, l[r], 2);
    }
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
