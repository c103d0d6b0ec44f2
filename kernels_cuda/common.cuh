// common.cuh: scalar types, conversions, 16-byte packs and warp reductions shared by every kernel.
//
// NOTE: we do not include cuda_fp16.h / cuda_bf16.h. The kernels only need to load, convert and
// store 16-bit floats (all arithmetic is fp32), and without those headers NVRTC compiles these
// files with no include path at all: the same source builds with nvcc here and with CuPy's NVRTC
// on a machine that has only the driver and the nvrtc wheel. kernels_cuda.read_source pastes this
// file in place of the #include line, so CuPy's kernel cache (keyed by the source text) sees it.
#pragma once

#ifdef RP_HOST_EMULATION
#include "host_emulation.h"   // tests only: run these kernels as C++ threads on the CPU
#endif

// rp_same_type<A, B>::value: A and B are one type. The generated kernel wrappers (rawpaged/backend/
// cuda/kernels.py) static_assert with it that each template's parameter list is exactly the table's.
template <typename A, typename B> struct rp_same_type { static constexpr bool value = false; };
template <typename A> struct rp_same_type<A, A> { static constexpr bool value = true; };

// 16-bit storage types. The bits are IEEE half (f16) or bfloat16 (bf16); arithmetic is fp32.
struct f16 { unsigned short bits; };
struct bf16 { unsigned short bits; };

#define RP_NEG_INF __int_as_float(0xff800000)
#define RP_LOG2E 1.4426950408889634f

// ------------------------------------------------------------------------------------------
// Conversions: to_float(x) and from_float<T>(f).
// ------------------------------------------------------------------------------------------
__device__ __forceinline__ float to_float(float x) { return x; }

__device__ __forceinline__ float to_float(f16 x) {
#ifdef RP_HOST_EMULATION
    return rp_emu_half_to_float(x.bits);
#else
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(x.bits));
    return f;
#endif
}

// bf16 is the top half of an fp32: widening is a shift.
__device__ __forceinline__ float to_float(bf16 x) { return __uint_as_float(((unsigned)x.bits) << 16); }

template <typename T> __device__ __forceinline__ T from_float(float f);

template <> __device__ __forceinline__ float from_float<float>(float f) { return f; }

template <> __device__ __forceinline__ f16 from_float<f16>(float f) {
    f16 r;
#ifdef RP_HOST_EMULATION
    r.bits = rp_emu_float_to_half(f);
#else
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(r.bits) : "f"(f));   // round to nearest even
#endif
    return r;
}

// fp32 -> bf16, round to nearest even, NaN kept a (quiet) NaN. Done in integer arithmetic so it
// is exact on every architecture (cvt.rn.bf16.f32 exists only from sm_80).
template <> __device__ __forceinline__ bf16 from_float<bf16>(float f) {
    unsigned u = __float_as_uint(f);
    bf16 r;
    if ((u & 0x7fffffffu) > 0x7f800000u) { r.bits = 0x7fc0; return r; }
    u += 0x7fffu + ((u >> 16) & 1u);
    r.bits = (unsigned short)(u >> 16);
    return r;
}

// Two values packed in one 32-bit word, lower index in the low half (the layout mma.sync and
// 32-bit loads of consecutive 16-bit elements both use).
template <typename T> __device__ __forceinline__ unsigned pack2(float lo, float hi) {
    return (unsigned)from_float<T>(lo).bits | ((unsigned)from_float<T>(hi).bits << 16);
}

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800 && !defined(RP_HOST_EMULATION)
// sm_80+: one instruction converts and packs both (round to nearest even); `cvt.rn.{f16,bf16}x2.f32
// d, a, b` puts a in the upper half. Same result as the generic version, fewer registers.
template <> __device__ __forceinline__ unsigned pack2<f16>(float lo, float hi) {
    unsigned d;
    asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(d) : "f"(hi), "f"(lo));
    return d;
}
template <> __device__ __forceinline__ unsigned pack2<bf16>(float lo, float hi) {
    unsigned d;
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(d) : "f"(hi), "f"(lo));
    return d;
}
#endif

template <typename T> __device__ __forceinline__ float lo_half(unsigned w) { T x; x.bits = (unsigned short)(w & 0xffffu); return to_float(x); }
template <typename T> __device__ __forceinline__ float hi_half(unsigned w) { T x; x.bits = (unsigned short)(w >> 16); return to_float(x); }

// ------------------------------------------------------------------------------------------
// Packs: 8 consecutive elements of a row, the unit a lane loads. 16 bytes (one uint4) for the
// 16-bit types, 32 bytes (two uint4) for fp32. Rows are 16-byte aligned whenever the head size is a
// multiple of 8, which the attention dispatch checks.
// ------------------------------------------------------------------------------------------
template <typename T> struct Pack { uint4 v; };
template <> struct Pack<float> { uint4 v0, v1; };

template <typename T> __device__ __forceinline__ void load_pack(Pack<T>& p, const T* src) {
    p.v = __ldg(reinterpret_cast<const uint4*>(src));
}
template <> __device__ __forceinline__ void load_pack<float>(Pack<float>& p, const float* src) {
    p.v0 = __ldg(reinterpret_cast<const uint4*>(src));
    p.v1 = __ldg(reinterpret_cast<const uint4*>(src) + 1);
}

template <typename T> __device__ __forceinline__ void zero_pack(Pack<T>& p) { p.v = make_uint4(0, 0, 0, 0); }
template <> __device__ __forceinline__ void zero_pack<float>(Pack<float>& p) {
    p.v0 = make_uint4(0, 0, 0, 0);
    p.v1 = make_uint4(0, 0, 0, 0);
}

// out[0..7] = the pack's 8 elements in fp32.
template <typename T> __device__ __forceinline__ void unpack(const Pack<T>& p, float* out) {
    const unsigned w[4] = {p.v.x, p.v.y, p.v.z, p.v.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        out[2 * i] = lo_half<T>(w[i]);
        out[2 * i + 1] = hi_half<T>(w[i]);
    }
}
template <> __device__ __forceinline__ void unpack<float>(const Pack<float>& p, float* out) {
    out[0] = __uint_as_float(p.v0.x); out[1] = __uint_as_float(p.v0.y);
    out[2] = __uint_as_float(p.v0.z); out[3] = __uint_as_float(p.v0.w);
    out[4] = __uint_as_float(p.v1.x); out[5] = __uint_as_float(p.v1.y);
    out[6] = __uint_as_float(p.v1.z); out[7] = __uint_as_float(p.v1.w);
}

// dst[0..7] = in[0..7] converted to T (one or two 16-byte stores).
template <typename T> __device__ __forceinline__ void store_pack(T* dst, const float* in) {
    uint4 v;
    v.x = pack2<T>(in[0], in[1]); v.y = pack2<T>(in[2], in[3]);
    v.z = pack2<T>(in[4], in[5]); v.w = pack2<T>(in[6], in[7]);
    *reinterpret_cast<uint4*>(dst) = v;
}
template <> __device__ __forceinline__ void store_pack<float>(float* dst, const float* in) {
    reinterpret_cast<float4*>(dst)[0] = make_float4(in[0], in[1], in[2], in[3]);
    reinterpret_cast<float4*>(dst)[1] = make_float4(in[4], in[5], in[6], in[7]);
}

// ------------------------------------------------------------------------------------------
// Reductions.
// ------------------------------------------------------------------------------------------
__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// Sum over the whole thread block (blockDim.x a multiple of 32, at most 1024). `scratch` holds 32
// floats of shared memory; every thread gets the total.
__device__ __forceinline__ float block_sum(float v, float* scratch) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    v = warp_sum(v);
    __syncthreads();                       // scratch may still be read by a previous call
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    const int num_warps = blockDim.x >> 5;
    v = lane < num_warps ? scratch[lane] : 0.0f;
    return warp_sum(v);
}
