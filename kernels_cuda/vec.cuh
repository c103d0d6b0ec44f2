// vec.cuh: 8-element vector loads and stores for the row-wise kernels (norms, activations, fused ops).
// Include after common.cuh (it uses Pack, unpack and store_pack from there).
//
// A row takes the vector path when its length is a multiple of 8 and every pointer it touches is
// 16-byte aligned (checked at run time, per row: the same for every thread of a block, so the
// branch never diverges); each thread then moves one Pack (16 bytes of fp16 / bf16, 32 of fp32)
// per load or store instead of one element.
#pragma once

// p's low 4 bits are zero (null counts as aligned: an absent weight or bias is never read)
__device__ __forceinline__ bool aligned16(const void* p) {
    return (reinterpret_cast<unsigned long long>(p) & 15ull) == 0;
}

// A Pack read with plain (coherent) loads: for rows the kernel also writes, where __ldg (the
// non-coherent path load_pack takes) is not allowed.
template <typename T> __device__ __forceinline__ void read_pack(Pack<T>& p, const T* src) {
    p.v = *reinterpret_cast<const uint4*>(src);
}
template <> __device__ __forceinline__ void read_pack<float>(Pack<float>& p, const float* src) {
    p.v0 = reinterpret_cast<const uint4*>(src)[0];
    p.v1 = reinterpret_cast<const uint4*>(src)[1];
}

// out[0..7] = src[0..7] in fp32: plain loads (load8) or read-only ones through __ldg (load8_ro)
template <typename T> __device__ __forceinline__ void load8(float* out, const T* src) {
    Pack<T> p;
    read_pack(p, src);
    unpack(p, out);
}
template <typename T> __device__ __forceinline__ void load8_ro(float* out, const T* src) {
    Pack<T> p;
    load_pack(p, src);
    unpack(p, out);
}

// f rounded to T and widened back: what a later read of the stored value sees.
template <typename T> __device__ __forceinline__ float round_to(float f) { return to_float(from_float<T>(f)); }
