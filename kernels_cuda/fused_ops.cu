// fused_ops.cu: the per-layer ops fused to save launches and round trips through memory
// (issue 13, "fewer kernels per layer").
//
//   rotary_cache          rotary embedding of q (in place) and of k, written with v straight into
//                         the paged cache: rotary_embedding + reshape_and_cache in one launch, and k
//                         is never written back (only its rotated copy in the cache is ever read)
//   fused_add_layer_norm  residual += x; x = layer_norm(residual) (both in place): the residual
//                         add of OPT / GPT-2 / GPT-NeoX blocks fused with the next LayerNorm
//
// Both read q / k / v through token strides, so they take views of the fused qkv projection
// (no q/k/v copies). Math in fp32, storage T.
#include "common.cuh"
#include "vec.cuh"

// ------------------------------------------------------------------------------------------
// rotary_cache
//   positions     int64 [T]
//   q             [T, Hq, D]  token stride q_stride: rotated in place (features 0..rot-1)
//   k, v          [T, Hkv, D] token strides k_stride / v_stride: read only
//   kv_cache      [num_blocks, num_layers, 2, Hkv, block_size, D]
//   slot_mapping  int64 [T]; a negative slot (padding) stores nothing (q is still rotated: its
//                 position must index cos_sin, the model runner gives padding position 0)
//   cos_sin       [max_pos, rot]: cos in columns 0..rot/2-1, sin in the rest
// Pair (x1, x2) of a head is (x[i], x[i + rot/2]) when is_neox (rotate_half), else (x[2i], x[2i+1]):
//     x1' = x1 cos - x2 sin,   x2' = x2 cos + x1 sin        (the same arithmetic as rotary.cu)
// so the cache holds exactly what rotary_embedding followed by reshape_and_cache stores.
// Launch: one block per token; threads walk (head, pair) work items, then the copies.
// ------------------------------------------------------------------------------------------
__device__ __forceinline__ void pair_index(int pair, int half, bool is_neox, int& i1, int& i2) {
    i1 = is_neox ? pair : 2 * pair;
    i2 = is_neox ? pair + half : 2 * pair + 1;
}

template <typename T, typename C>
__device__ void rotary_cache_impl(const long long* __restrict__ positions, T* __restrict__ q, const T* __restrict__ k,
                                  const T* __restrict__ v, T* __restrict__ kv_cache,
                                  const long long* __restrict__ slot_mapping, const C* __restrict__ cos_sin,
                                  long long q_stride, long long k_stride, long long v_stride, int num_q_heads,
                                  int num_kv_heads, int head_dim, int rot, int is_neox, int layer, int num_layers,
                                  int block_size) {
    const long long t = blockIdx.x;
    const long long pos = positions[t];
    const int half = rot / 2;
    const C* cos_row = cos_sin + pos * rot;          // [rot/2] cosines
    const C* sin_row = cos_row + half;               // [rot/2] sines
    // 1. q [Hq, D] of this token: each (head, pair) work item rotates two features in place.
    T* qt = q + t * q_stride;
    for (int w = threadIdx.x; w < num_q_heads * half; w += blockDim.x) {
        const int h = w / half, pair = w - h * half;
        int i1, i2;
        pair_index(pair, half, is_neox, i1, i2);
        T* x = qt + (long long)h * head_dim;
        const float c = to_float(cos_row[pair]), s = to_float(sin_row[pair]);
        const float x1 = to_float(x[i1]), x2 = to_float(x[i2]);
        x[i1] = from_float<T>(x1 * c - x2 * s);
        x[i2] = from_float<T>(x2 * c + x1 * s);
    }
    const long long slot = slot_mapping[t];
    if (slot < 0) return;                            // padding token: nothing to store
    const long long block = slot / block_size;
    const int off = (int)(slot - block * block_size);
    const long long tile = (long long)block_size * head_dim;                  // one [bs, D] tile
    // K tile of head 0 of this layer in this block, at this token's row; V tiles follow the Hkv K tiles.
    T* k_base = kv_cache + ((block * num_layers + layer) * 2) * num_kv_heads * tile + (long long)off * head_dim;
    T* v_base = k_base + num_kv_heads * tile;
    const T* kt = k + t * k_stride;
    const T* vt = v + t * v_stride;
    // 2. k: each (KV head, pair) rotated in registers and stored in the cache row.
    for (int w = threadIdx.x; w < num_kv_heads * half; w += blockDim.x) {
        const int h = w / half, pair = w - h * half;
        int i1, i2;
        pair_index(pair, half, is_neox, i1, i2);
        const T* x = kt + (long long)h * head_dim;
        const float c = to_float(cos_row[pair]), s = to_float(sin_row[pair]);
        const float x1 = to_float(x[i1]), x2 = to_float(x[i2]);
        k_base[h * tile + i1] = from_float<T>(x1 * c - x2 * s);
        k_base[h * tile + i2] = from_float<T>(x2 * c + x1 * s);
    }
    // 3. k's features past rot (partial rotary: NeoX, Phi-3) are copied as they are.
    const int rest = head_dim - rot;
    for (int w = threadIdx.x; w < num_kv_heads * rest; w += blockDim.x) {
        const int h = w / rest, d = rot + (w - h * rest);
        k_base[h * tile + d] = kt[(long long)h * head_dim + d];
    }
    // 4. v [Hkv, D] -> its tiles: 16-byte words when every row is aligned (head_dim a multiple of a
    //    word, so a word never straddles two heads), else element by element.
    const int n = num_kv_heads * head_dim;
    constexpr int P = 16 / sizeof(T);
    const bool vec = head_dim % P == 0 && aligned16(vt) && aligned16(v_base);   // tile, off*D keep v_base's alignment
    if (vec) {
        for (int e = threadIdx.x * P; e < n; e += blockDim.x * P) {
            const int h = e / head_dim, d = e - h * head_dim;
            *reinterpret_cast<uint4*>(v_base + h * tile + d) = *reinterpret_cast<const uint4*>(vt + e);
        }
    } else {
        for (int e = threadIdx.x; e < n; e += blockDim.x) {
            const int h = e / head_dim, d = e - h * head_dim;
            v_base[h * tile + d] = vt[e];
        }
    }
}

// ------------------------------------------------------------------------------------------
// fused_add_layer_norm: residual += x (stored in T); x = (residual - mean) / sqrt(var + eps) * weight + bias
//   x, residual [rows, hidden] C-contiguous, both updated in place; weight, bias [hidden] or null.
// The statistics use the residual as stored (rounded to T), so the result equals the unfused pair
// `residual = residual + x; x = layer_norm(residual)` to the rounding of T (bit for bit in fp32).
// Two-pass variance (mean first, then mean of squared deviations), as layer_norm in norms.cu.
// Launch: one block per row. When hidden % 8 == 0 and every row is 16-byte aligned each thread
// moves 8 elements per load / store (one 16-byte word of fp16 / bf16, two of fp32); else one.
// Each thread re-reads only the elements it wrote itself (plain loads): no barrier between passes.
// ------------------------------------------------------------------------------------------
template <typename T>
__device__ void fused_add_layer_norm_impl(T* __restrict__ x, T* __restrict__ residual, const T* __restrict__ weight,
                                          const T* __restrict__ bias, float eps, int hidden) {
    __shared__ float scratch[32];
    const long long row = blockIdx.x;
    T* xr = x + row * hidden;
    T* rr = residual + row * hidden;
    const bool vec = hidden % 8 == 0 && aligned16(xr) && aligned16(rr) && (weight == nullptr || aligned16(weight))
                     && (bias == nullptr || aligned16(bias));
    const int step = vec ? 8 * blockDim.x : blockDim.x;
    const int first = vec ? 8 * threadIdx.x : threadIdx.x;
    // pass 1: r = residual + x, stored; s = sum of the stored values
    float s = 0.0f;
    for (int i = first; i < hidden; i += step) {
        if (vec) {
            float a[8], b[8];
            load8(a, rr + i);
            load8(b, xr + i);
#pragma unroll
            for (int e = 0; e < 8; ++e) { a[e] = round_to<T>(a[e] + b[e]); s += a[e]; }
            store_pack<T>(rr + i, a);
        } else {
            const float r = round_to<T>(to_float(rr[i]) + to_float(xr[i]));
            rr[i] = from_float<T>(r);
            s += r;
        }
    }
    // passes 2 and 3 read the residual just written: plain loads, not the read-only path
    layer_norm_finish<false>(xr, rr, weight, bias, block_sum(s, scratch), eps, hidden, vec, first, step, scratch);
}

// Entry points: the extern "C" kernels rotary_cache_<dt>_<cos_sin dt> and fused_add_layer_norm_<dt> are
// generated from the table in rawpaged/backend/cuda/kernels.py, one wrapper per instantiation.
