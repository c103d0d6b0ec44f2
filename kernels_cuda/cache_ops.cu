// cache_ops.cu: writing new tokens into the paged KV cache, and copy-on-write of whole blocks.
//
// KV cache layout (block-major, shared with the CPU backend):
//     kv_cache[num_blocks, num_layers, 2, num_kv_heads, block_size, head_dim]
// so physical block b holds, for every layer, the K tile and the V tile of every KV head, each
// tile [block_size, head_dim] contiguous. A token's slot is block * block_size + offset.
#include "common.cuh"

// reshape_and_cache: kv_cache[slot / bs, layer, 0|1, h, slot % bs, :] = k|v[t, h, :]
//   k, v          [T, Hkv, D], token strides k_stride / v_stride (a view of a fused qkv is fine)
//   slot_mapping  int64 [T]; a negative slot (padding) is skipped
// Launch: grid = T (one block per token), 128 threads over the token's Hkv*D features. When every
// row is 16-byte aligned (vec = 1, checked by the backend) a thread moves one 16-byte word per
// load/store (8 fp16/bf16 or 4 fp32 elements), else one element at a time.
template <typename T>
__device__ void reshape_and_cache_impl(const T* __restrict__ k, const T* __restrict__ v, T* __restrict__ kv_cache,
                                       const long long* __restrict__ slot_mapping, long long k_stride, long long v_stride,
                                       int layer, int num_layers, int num_kv_heads, int block_size, int head_dim, int vec) {
    const long long t = blockIdx.x;
    const long long slot = slot_mapping[t];
    if (slot < 0) return;
    const long long block = slot / block_size;
    const int off = (int)(slot - block * block_size);
    const long long tile = (long long)block_size * head_dim;                  // one [bs, D] tile
    // K tile of head 0 of this layer in this block; V tiles follow the Hkv K tiles.
    T* k_base = kv_cache + ((block * num_layers + layer) * 2) * num_kv_heads * tile + (long long)off * head_dim;
    T* v_base = k_base + num_kv_heads * tile;
    const T* kt = k + t * k_stride;
    const T* vt = v + t * v_stride;
    const int n = num_kv_heads * head_dim;
    if (vec) {
        // One 16-byte word per step: 8 fp16/bf16 or 4 fp32 elements. head_dim % 8 == 0, so a
        // word never straddles two heads.
        constexpr int P = 16 / sizeof(T);
        for (int e = threadIdx.x * P; e < n; e += blockDim.x * P) {
            const int h = e / head_dim, d = e - h * head_dim;
            *reinterpret_cast<uint4*>(k_base + h * tile + d) = *reinterpret_cast<const uint4*>(kt + e);
            *reinterpret_cast<uint4*>(v_base + h * tile + d) = *reinterpret_cast<const uint4*>(vt + e);
        }
    } else {
        for (int e = threadIdx.x; e < n; e += blockDim.x) {
            const int h = e / head_dim, d = e - h * head_dim;
            k_base[h * tile + d] = kt[e];
            v_base[h * tile + d] = vt[e];
        }
    }
}

// copy_blocks: kv_cache[dst] = kv_cache[src] for every (src, dst) row of pairs, all layers at once.
//   pairs int64 [N, 2]; block_words = bytes of one block / 16 (a block is always a multiple of
//   16 bytes: block_size >= 8 and 16-bit or wider elements)
// Launch: grid (N, chunks); block (pair, chunk) copies a grid-stride share of the block's 16-byte
// words. One launch for every pair of a step.
__device__ void copy_blocks_impl(uint4* __restrict__ cache, const long long* __restrict__ pairs, long long block_words) {
    const long long src = pairs[2 * blockIdx.x], dst = pairs[2 * blockIdx.x + 1];
    const uint4* s = cache + src * block_words;
    uint4* d = cache + dst * block_words;
    for (long long i = blockIdx.y * (long long)blockDim.x + threadIdx.x; i < block_words; i += (long long)gridDim.y * blockDim.x)
        d[i] = s[i];
}

// Entry points: the extern "C" kernels reshape_and_cache_<dt>, copy_blocks_kernel are generated from the
// table in rawpaged/backend/cuda/kernels.py, one wrapper per instantiation calling the functions above.
