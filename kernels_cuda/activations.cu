// activations.cu: the feed-forward nonlinearities, elementwise, fp32 math, storage type T.
//
//   silu_and_mul  x [rows, 2*I] -> out [rows, I] = silu(x[:, :I]) * x[:, I:]   (LLaMA's SwiGLU)
//   gelu_tanh_and_mul  the same with gelu_tanh for silu                      (Gemma's GeGLU)
//   gelu          out = x * Phi(x)                  (exact, erf)
//   gelu_tanh     out = 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))
//   relu          out = max(x, 0)                   (OPT)
//
// Launch: 1-D grid-stride loops, 256 threads a block; any number of elements. These kernels are
// memory-bound and tiny; what matters is that each thread's accesses are coalesced, which a flat
// index gives. Vector loads (vec.cuh): when the row width (I, or n for unary) is a multiple of 8 and
// the arrays are 16-byte aligned, each thread handles 8 consecutive outputs per step (one Pack per
// load / store); else one element.
#include "common.cuh"
#include "vec.cuh"

// out[r, j..j+7] = act(x[r, j..j+7]) * x[r, I + j..]: one Pack of outputs (8 | inner, aligned).
template <typename T, typename F>
__device__ __forceinline__ bool gated_vec(T* __restrict__ out, const T* __restrict__ x, long long rows, int inner, F act) {
    if (inner % 8 != 0 || !aligned16(out) || !aligned16(x)) return false;
    const int packs = inner / 8;
    const long long n = rows * packs;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x) {
        const long long r = i / packs;
        const int j = (int)(i - r * packs) * 8;
        float g[8], u[8];
        load8_ro(g, x + r * 2 * inner + j);
        load8_ro(u, x + r * 2 * inner + inner + j);
#pragma unroll
        for (int e = 0; e < 8; ++e) g[e] = act(g[e]) * u[e];
        store_pack<T>(out + r * inner + j, g);
    }
    return true;
}

__device__ __forceinline__ float silu(float x) { return x / (1.0f + __expf(-x)); }
__device__ __forceinline__ float gelu_erf(float x) { return 0.5f * x * (1.0f + erff(x * 0.70710678118654752f)); }
__device__ __forceinline__ float gelu_tanh_f(float x) {
    const float c = 0.7978845608028654f;   // sqrt(2/pi)
    return 0.5f * x * (1.0f + tanhf(c * (x + 0.044715f * x * x * x)));
}

// out[r, j] = silu(x[r, j]) * x[r, I + j]; one thread per output element.
template <typename T>
__device__ void silu_and_mul_impl(T* __restrict__ out, const T* __restrict__ x, long long rows, int inner) {
    if (gated_vec(out, x, rows, inner, [](float v) { return silu(v); })) return;
    const long long n = rows * inner;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x) {
        const long long r = i / inner;
        const int j = (int)(i - r * inner);
        const float gate = to_float(x[r * 2 * inner + j]);
        const float up = to_float(x[r * 2 * inner + inner + j]);
        out[i] = from_float<T>(silu(gate) * up);
    }
}

// out[r, j] = gelu_tanh(x[r, j]) * x[r, I + j]; one thread per output element.
template <typename T>
__device__ void gelu_tanh_and_mul_impl(T* __restrict__ out, const T* __restrict__ x, long long rows, int inner) {
    if (gated_vec(out, x, rows, inner, [](float v) { return gelu_tanh_f(v); })) return;
    const long long n = rows * inner;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x) {
        const long long r = i / inner;
        const int j = (int)(i - r * inner);
        const float gate = to_float(x[r * 2 * inner + j]);
        const float up = to_float(x[r * 2 * inner + inner + j]);
        out[i] = from_float<T>(gelu_tanh_f(gate) * up);
    }
}

// op: 0 = gelu (erf), 1 = gelu_tanh, 2 = relu.
__device__ __forceinline__ float unary_op(float v, int op) {
    return op == 0 ? gelu_erf(v) : op == 1 ? gelu_tanh_f(v) : fmaxf(v, 0.0f);
}

template <typename T>
__device__ void unary_impl(T* __restrict__ out, const T* __restrict__ x, long long n, int op) {
    if (n % 8 == 0 && aligned16(out) && aligned16(x)) {             // 8 elements per thread and step
        for (long long i = 8 * (blockIdx.x * (long long)blockDim.x + threadIdx.x); i < n;
             i += 8 * (long long)gridDim.x * blockDim.x) {
            float a[8];
            load8_ro(a, x + i);
#pragma unroll
            for (int e = 0; e < 8; ++e) a[e] = unary_op(a[e], op);
            store_pack<T>(out + i, a);
        }
        return;
    }
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x) {
        const float v = to_float(x[i]);
        float y;
        if (op == 0) y = gelu_erf(v);
        else if (op == 1) y = gelu_tanh_f(v);
        else y = fmaxf(v, 0.0f);
        out[i] = from_float<T>(y);
    }
}

// Entry points: the extern "C" kernels silu_and_mul_<dt>, gelu_tanh_and_mul_<dt>, unary_<dt> are generated from the
// table in rawpaged/backend/cuda/kernels.py, one wrapper per instantiation calling the templates above.
