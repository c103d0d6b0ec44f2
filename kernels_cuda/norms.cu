// norms.cu: RMSNorm, fused residual-add + RMSNorm, LayerNorm over the last axis.
//
// Shapes: x, residual, out [rows, hidden] (C-contiguous); weight, bias [hidden]; all type T.
// Launch: one thread block per row (grid = rows), blockDim a multiple of 32 (the backend uses 128, 256
// or 1024 by width). Statistics are accumulated in fp32 and reduced across the block
// (block_sum); each thread walks the row with stride blockDim.x, so a warp's loads are coalesced.
// The row is read twice (statistics, then normalise); the second read hits L1/L2.
// Vector loads (vec.cuh): when hidden % 8 == 0 and the row, weight (and bias) are 16-byte aligned,
// each thread moves 8 elements per load / store (stride 8 * blockDim.x); else one at a time.
#include "common.cuh"
#include "vec.cuh"

// out = x / sqrt(mean(x^2) + eps) * weight
template <typename T>
__device__ void rms_norm_impl(T* __restrict__ out, const T* __restrict__ x, const T* __restrict__ weight,
                              float eps, int hidden) {
    __shared__ float scratch[32];
    const long long row = blockIdx.x;
    const T* xr = x + row * hidden;
    T* outr = out + row * hidden;
    const bool vec = hidden % 8 == 0 && aligned16(xr) && aligned16(outr) && aligned16(weight);
    float ss = 0.0f;                                  // this thread's sum of squares
    if (vec) {
        for (int i = 8 * threadIdx.x; i < hidden; i += 8 * blockDim.x) {
            float a[8];
            load8_ro(a, xr + i);
#pragma unroll
            for (int e = 0; e < 8; ++e) ss += a[e] * a[e];
        }
    } else {
        for (int i = threadIdx.x; i < hidden; i += blockDim.x) {
            const float v = to_float(xr[i]);
            ss += v * v;
        }
    }
    const float inv_rms = rsqrtf(block_sum(ss, scratch) / hidden + eps);
    if (vec) {
        for (int i = 8 * threadIdx.x; i < hidden; i += 8 * blockDim.x) {
            float a[8], w[8];
            load8_ro(a, xr + i);
            load8_ro(w, weight + i);
#pragma unroll
            for (int e = 0; e < 8; ++e) a[e] = a[e] * inv_rms * w[e];
            store_pack<T>(outr + i, a);
        }
    } else {
        for (int i = threadIdx.x; i < hidden; i += blockDim.x)
            outr[i] = from_float<T>(to_float(xr[i]) * inv_rms * to_float(weight[i]));
    }
}

// residual += x (stored in T); x = rms_norm(residual) * weight. Both arrays updated in place.
// NOTE: the statistics use the residual as stored (rounded to T), so the fused op equals the
// unfused pair `residual += x; x = rms_norm(residual)` bit for bit in fp32 and to rounding in fp16.
template <typename T>
__device__ void fused_add_rms_norm_impl(T* __restrict__ x, T* __restrict__ residual, const T* __restrict__ weight,
                                        float eps, int hidden) {
    __shared__ float scratch[32];
    const long long row = blockIdx.x;
    T* xr = x + row * hidden;
    T* rr = residual + row * hidden;
    const bool vec = hidden % 8 == 0 && aligned16(xr) && aligned16(rr) && aligned16(weight);
    float ss = 0.0f;
    if (vec) {
        for (int i = 8 * threadIdx.x; i < hidden; i += 8 * blockDim.x) {
            float a[8], b[8];
            load8(a, rr + i);
            load8(b, xr + i);
#pragma unroll
            for (int e = 0; e < 8; ++e) { a[e] = round_to<T>(a[e] + b[e]); ss += a[e] * a[e]; }
            store_pack<T>(rr + i, a);
        }
    } else {
        for (int i = threadIdx.x; i < hidden; i += blockDim.x) {
            const T sum = from_float<T>(to_float(rr[i]) + to_float(xr[i]));
            rr[i] = sum;
            const float v = to_float(sum);
            ss += v * v;
        }
    }
    const float inv_rms = rsqrtf(block_sum(ss, scratch) / hidden + eps);
    // Each thread re-reads only the elements it wrote itself (plain loads): no barrier needed.
    if (vec) {
        for (int i = 8 * threadIdx.x; i < hidden; i += 8 * blockDim.x) {
            float a[8], w[8];
            load8(a, rr + i);
            load8_ro(w, weight + i);
#pragma unroll
            for (int e = 0; e < 8; ++e) a[e] = a[e] * inv_rms * w[e];
            store_pack<T>(xr + i, a);
        }
    } else {
        for (int i = threadIdx.x; i < hidden; i += blockDim.x)
            xr[i] = from_float<T>(to_float(rr[i]) * inv_rms * to_float(weight[i]));
    }
}

// out = (x - mean) / sqrt(var + eps) * weight + bias; weight and bias may be null.
// Two-pass variance (mean first, then mean of squared deviations): no cancellation.
template <typename T>
__device__ void layer_norm_impl(T* __restrict__ out, const T* __restrict__ x, const T* __restrict__ weight,
                                const T* __restrict__ bias, float eps, int hidden) {
    __shared__ float scratch[32];
    const long long row = blockIdx.x;
    const T* xr = x + row * hidden;
    T* outr = out + row * hidden;
    const bool vec = hidden % 8 == 0 && aligned16(xr) && aligned16(outr) && aligned16(weight) && aligned16(bias);
    const int first = vec ? 8 * threadIdx.x : threadIdx.x;
    const int step = vec ? 8 * blockDim.x : blockDim.x;
    float s = 0.0f;
    for (int i = first; i < hidden; i += step) {
        if (vec) {
            float a[8];
            load8_ro(a, xr + i);
#pragma unroll
            for (int e = 0; e < 8; ++e) s += a[e];
        } else {
            s += to_float(xr[i]);
        }
    }
    layer_norm_finish<true>(outr, xr, weight, bias, block_sum(s, scratch), eps, hidden, vec, first, step, scratch);
}

// Entry points: the extern "C" kernels rms_norm_<dt>, fused_add_rms_norm_<dt>, layer_norm_<dt> are generated from the
// table in rawpaged/backend/cuda/kernels.py, one wrapper per instantiation calling the templates above.
