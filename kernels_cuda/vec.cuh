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

// out[0..7] = src[0..7]: read-only loads when RO (src is not written by this kernel), plain ones
// otherwise (fused_add_layer_norm reads back the residual it has just written).
template <bool RO, typename T> __device__ __forceinline__ void load8_if_ro(float* out, const T* src) {
    if (RO) load8_ro(out, src);
    else load8(out, src);
}

// LayerNorm's last two passes over one row, once its sum is known (both LayerNorm kernels share them):
//   pass 2: the variance from the squared deviations (two-pass, stable for rows with a large mean);
//   pass 3: dst[i] = (src[i] - mean) * inv_std * weight[i] + bias[i] (weight / bias may be null).
// `vec`, `first` and `step` are the caller's choice of path: 8 elements per thread per load when the
// row allows it (see the top of this file), else one; every thread of the block calls this.
template <bool RO, typename T>
__device__ __forceinline__ void layer_norm_finish(T* dst, const T* src, const T* weight, const T* bias, float sum,
                                                  float eps, int hidden, bool vec, int first, int step,
                                                  float* scratch) {
    const float mean = sum / hidden;
    float sq = 0.0f;
    for (int i = first; i < hidden; i += step) {
        if (vec) {
            float a[8];
            load8_if_ro<RO>(a, src + i);
#pragma unroll
            for (int e = 0; e < 8; ++e) { const float d = a[e] - mean; sq += d * d; }
        } else {
            const float d = to_float(src[i]) - mean;
            sq += d * d;
        }
    }
    const float inv_std = rsqrtf(block_sum(sq, scratch) / hidden + eps);
    for (int i = first; i < hidden; i += step) {
        if (vec) {
            float a[8], w[8], b[8];
            load8_if_ro<RO>(a, src + i);
            if (weight != nullptr) load8_ro(w, weight + i);
            if (bias != nullptr) load8_ro(b, bias + i);
#pragma unroll
            for (int e = 0; e < 8; ++e) {
                float y = (a[e] - mean) * inv_std;
                if (weight != nullptr) y *= w[e];
                if (bias != nullptr) y += b[e];
                a[e] = y;
            }
            store_pack<T>(dst + i, a);
        } else {
            float y = (to_float(src[i]) - mean) * inv_std;
            if (weight != nullptr) y *= to_float(weight[i]);
            if (bias != nullptr) y += to_float(bias[i]);
            dst[i] = from_float<T>(y);
        }
    }
}
