// rotary.cu: rotary position embedding (RoPE), in place on q and k.
//
// Shapes:  positions int64 [T]
//          q [T, Hq, D] with a token stride of q_stride elements (q may be a view of a fused qkv)
//          k [T, Hk, D] likewise with k_stride; within a token, heads and features are contiguous
//          cos_sin [max_pos, rot]: cos(pos * inv_freq[i]) in columns 0..rot/2-1, sin in the rest
// Each (head, i < rot/2) pair of features (x1, x2) is rotated by angle pos * inv_freq[i]:
//          x1' = x1 cos - x2 sin,   x2' = x2 cos + x1 sin
// with (x1, x2) = (x[i], x[i + rot/2])  when is_neox (rotate_half, Hugging Face LLaMA), or
//      (x1, x2) = (x[2i], x[2i + 1])     otherwise (interleaved pairs, GPT-J / llama2.c).
// Features rot..D-1 (partial rotary) are left alone.
// Launch: one thread block per token, threads over (head, pair); math in fp32.
#include "common.cuh"

template <typename T, typename C>
__device__ __forceinline__ void rotate_head(T* x, const C* cos_row, const C* sin_row, int half, int pair, bool is_neox) {
    const int i1 = is_neox ? pair : 2 * pair;
    const int i2 = is_neox ? pair + half : 2 * pair + 1;
    const float c = to_float(cos_row[pair]);
    const float s = to_float(sin_row[pair]);
    const float x1 = to_float(x[i1]);
    const float x2 = to_float(x[i2]);
    x[i1] = from_float<T>(x1 * c - x2 * s);
    x[i2] = from_float<T>(x2 * c + x1 * s);
}

template <typename T, typename C>
__device__ void rotary_impl(const long long* __restrict__ positions, T* __restrict__ q, T* __restrict__ k,
                            const C* __restrict__ cos_sin, long long q_stride, long long k_stride,
                            int num_q_heads, int num_k_heads, int head_dim, int rot, int is_neox) {
    const long long t = blockIdx.x;
    const long long pos = positions[t];
    const int half = rot / 2;
    const C* cos_row = cos_sin + pos * rot;          // [rot/2] cosines
    const C* sin_row = cos_row + half;               // [rot/2] sines
    T* qt = q + t * q_stride;
    T* kt = k + t * k_stride;
    // Work items 0 .. Hq*half-1 rotate q's heads, the next Hk*half rotate k's.
    const int nq = num_q_heads * half;
    const int n = nq + num_k_heads * half;
    for (int w = threadIdx.x; w < n; w += blockDim.x) {
        if (w < nq) {
            rotate_head<T, C>(qt + (w / half) * head_dim, cos_row, sin_row, half, w % half, is_neox);
        } else {
            const int wk = w - nq;
            rotate_head<T, C>(kt + (wk / half) * head_dim, cos_row, sin_row, half, wk % half, is_neox);
        }
    }
}

// Entry points: the extern "C" kernels rotary_<q dtype>_<cos_sin dtype> (the cos/sin table may be
// fp32, recommended, or the model dtype) are generated from the table in rawpaged/backend/cuda/kernels.py,
// one wrapper per instantiation calling rotary_impl.
