"""Probe kernels for the tensor-core building blocks of kernels_cuda/paged_attention.cu (mma.sync
m16n8k16, ldmatrix.x4 plain and .trans, cp.async), and what the PTX ISA says each lane must get.

The same probes run on the host emulation (tests/test_cuda_intrinsics.py, where
kernels_cuda/host_emulation.h models these instructions) and on a device (tests/gpu/test_ops_gpu.py,
the real instructions): both are held to the expectations below, written here from the PTX ISA's
fragment figures, not from the emulator's code. So a model that agrees with a kernel written to the
same misreading still fails on the device, and the emulator is checked against the hardware.

Each probe is appended to the f16 program of paged_attention.cu, so it calls the very helpers the
kernels call (mma_16816, ldmatrix_x4, ldmatrix_x4_trans, cp_async_16 / commit / wait).
"""
from __future__ import annotations

import numpy as np

from rawpaged.backend.cuda import kernels

PROBES = r"""
// ---- probes (tests/intrinsic_probes.py) ----
// ldmatrix.x4: a [32][16] u16 tile in shared memory; lane L names row (5 L) % 32, columns 8 (L % 2) ..
// +7 (every lane a different 16-byte row). out[0:128] = the plain load's r[0..3] per lane, out[128:256] the .trans.
extern "C" __global__ void __launch_bounds__(32) rp_probe_ldmatrix(unsigned* out, const unsigned short* src) {
    __shared__ uint4 tile_u4[32 * 2];
    unsigned short* tile = reinterpret_cast<unsigned short*>(tile_u4);
    const int lane = threadIdx.x;
    for (int i = lane; i < 32 * 16; i += 32) tile[i] = src[i];
    __syncwarp();
    const unsigned short* row = tile + ((lane * 5) & 31) * 16 + 8 * (lane & 1);
    unsigned r[4];
    ldmatrix_x4(r, row);
    for (int i = 0; i < 4; ++i) out[lane * 4 + i] = r[i];
    ldmatrix_x4_trans(r, row);
    for (int i = 0; i < 4; ++i) out[128 + lane * 4 + i] = r[i];
}

// mma.sync m16n8k16: A [16][16] row-major, B [16 k][8 n] row-major, C = acc + A B [16][8] fp32; the
// fragments are gathered by hand from the PTX ISA's figures (g = lane / 4, c = lane % 4).
template <typename T>
__device__ __forceinline__ void rp_probe_mma_impl(float* c_out, const float* acc, const T* a, const T* b) {
    const int lane = threadIdx.x, g = lane >> 2, c = 2 * (lane & 3);
    auto two = [](const T& lo, const T& hi) { return (unsigned)lo.bits | ((unsigned)hi.bits << 16); };
    unsigned fa[4], fb[2];
    fa[0] = two(a[g * 16 + c], a[g * 16 + c + 1]);
    fa[1] = two(a[(g + 8) * 16 + c], a[(g + 8) * 16 + c + 1]);
    fa[2] = two(a[g * 16 + c + 8], a[g * 16 + c + 9]);
    fa[3] = two(a[(g + 8) * 16 + c + 8], a[(g + 8) * 16 + c + 9]);
    fb[0] = two(b[c * 8 + g], b[(c + 1) * 8 + g]);
    fb[1] = two(b[(c + 8) * 8 + g], b[(c + 9) * 8 + g]);
    float d[4] = {acc[g * 8 + c], acc[g * 8 + c + 1], acc[(g + 8) * 8 + c], acc[(g + 8) * 8 + c + 1]};
    mma_16816<T>(d, fa, fb);
    c_out[g * 8 + c] = d[0];
    c_out[g * 8 + c + 1] = d[1];
    c_out[(g + 8) * 8 + c] = d[2];
    c_out[(g + 8) * 8 + c + 1] = d[3];
}
extern "C" __global__ void __launch_bounds__(32) rp_probe_mma_f16(float* c_out, const float* acc, const f16* a,
                                                                  const f16* b) {
    rp_probe_mma_impl<f16>(c_out, acc, a, b);
}
extern "C" __global__ void __launch_bounds__(32) rp_probe_mma_bf16(float* c_out, const float* acc, const bf16* a,
                                                                   const bf16* b) {
    rp_probe_mma_impl<bf16>(c_out, acc, a, b);
}

// cp.async, one warp: lane L copies src[L] (16 bytes) into buf[L], lane 5 with source size 0 (zero
// fill), over a sentinel of 7s; then reads buf[(L + 1) % 32].
//   mode 0: wait_group 0, __syncwarp, read (correct);  mode 1: read its own buf[L] before the wait;
//   mode 2: wait_group 0 but no barrier before reading the neighbour's (modes 1, 2: races on a device).
extern "C" __global__ void __launch_bounds__(32) rp_probe_cp_async(unsigned* out, const uint4* src, int mode) {
    __shared__ uint4 buf[32];
    const int lane = threadIdx.x;
    buf[lane] = make_uint4(7u, 7u, 7u, 7u);
    __syncwarp();
    cp_async_16(&buf[lane], &src[lane], lane != 5);
    cp_async_commit();
    uint4 v;
    if (mode == 1) {
        v = buf[lane];
        cp_async_wait<0>();
    } else {
        cp_async_wait<0>();
        if (mode == 0) __syncwarp();
        v = buf[(lane + 1) & 31];
    }
    out[lane * 4 + 0] = v.x;
    out[lane * 4 + 1] = v.y;
    out[lane * 4 + 2] = v.z;
    out[lane * 4 + 3] = v.w;
}

// A stage refilled while another warp reads it: warp 0 fills stage with src[0:32], barrier, warp 1
// reads it, then (after a second barrier only if `barrier`) warp 0 refills it with src[32:64].
// out[L] = the .x warp 1's lane L read (src[L].x when right).
extern "C" __global__ void __launch_bounds__(64) rp_probe_cp_refill(unsigned* out, const uint4* src, int barrier) {
    __shared__ uint4 stage[32];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    if (warp == 0) cp_async_16(&stage[lane], &src[lane], true);
    cp_async_commit();
    cp_async_wait<0>();
    __syncthreads();
    uint4 v = make_uint4(0u, 0u, 0u, 0u);
    if (warp == 1) v = stage[lane];
    if (barrier) __syncthreads();
    if (warp == 0) cp_async_16(&stage[lane], &src[32 + lane], true);
    cp_async_commit();
    cp_async_wait<0>();
    if (warp == 1) out[lane] = v.x;
}
"""


def probe_module(cp):
    """The probes compiled with the f16 program of paged_attention.cu (cupy.RawModule, real or emulated)."""
    return cp.RawModule(code=kernels.program("paged_attention.cu", "f16") + PROBES, options=("--std=c++17",))


# --------------------------------------------------------------------------------------------
# What the PTX ISA says (Warp-level matrix load ldmatrix; mma.m16n8k16 fragment figures)
# --------------------------------------------------------------------------------------------
def ldmatrix_source(rng) -> np.ndarray:
    """A [32][16] u16 tile of distinct values (so a wrong element cannot match by chance)."""
    return rng.permutation(1 << 16)[:32 * 16].astype(np.uint16).reshape(32, 16)


def ldmatrix_expected(tile: np.ndarray) -> np.ndarray:
    """r[i] of lane L = (g, c) = (L // 4, L % 4): matrix i's rows are at the addresses lanes 8i..8i+7
    give. Plain: row g, elements 2c (low half) and 2c+1. .trans: column g, rows 2c (low) and 2c+1."""
    def row(lane):
        r, col = (lane * 5) % 32, 8 * (lane % 2)
        return tile[r, col:col + 8].astype(np.uint32)
    plain = np.zeros((32, 4), np.uint32)
    trans = np.zeros((32, 4), np.uint32)
    for lane in range(32):
        g, c = lane // 4, lane % 4
        for i in range(4):
            plain[lane, i] = row(8 * i + g)[2 * c] | (row(8 * i + g)[2 * c + 1] << 16)
            trans[lane, i] = row(8 * i + 2 * c)[g] | (row(8 * i + 2 * c + 1)[g] << 16)
    return np.concatenate([plain.ravel(), trans.ravel()])


def mma_operands(rng):
    """Small integers (exact in fp16 / bf16 and in fp32 sums, so the product is exact): A, B, acc."""
    a = rng.integers(-8, 9, (16, 16)).astype(np.float32)
    b = rng.integers(-8, 9, (16, 8)).astype(np.float32)
    acc = rng.integers(-100, 101, (16, 8)).astype(np.float32)
    return a, b, acc


def cp_async_source(rng) -> np.ndarray:
    """64 rows of 16 bytes (4 u32 each), none 0 or 7 (the zero fill and the sentinel)."""
    return rng.integers(8, 1 << 30, (64, 4)).astype(np.uint32)


def cp_async_expected(src: np.ndarray) -> np.ndarray:
    """Mode 0: lane L reads what lane L+1 copied; lane 4 reads lane 5's zero fill."""
    want = src[(np.arange(32) + 1) % 32].copy()
    want[4] = 0
    return want.ravel()


def half_bits(x: np.ndarray, tag: str) -> np.ndarray:
    """fp32 values exact in the 16-bit type -> its bit patterns (u16), for the probes' f16 / bf16 pointers."""
    if tag == "f16":
        return x.astype(np.float16).view(np.uint16)
    return (np.ascontiguousarray(x, np.float32).view(np.uint32) >> 16).astype(np.uint16)   # exact: truncation


# --------------------------------------------------------------------------------------------
# Runners (cp: CuPy or the emulated cupy of tests/cuda_emulator.py)
# --------------------------------------------------------------------------------------------
def run_ldmatrix(cp, mod, tile):
    out = cp.zeros(256, dtype=cp.uint32)
    mod.get_function("rp_probe_ldmatrix")((1, 1, 1), (32, 1, 1), (out, cp.asarray(tile)))
    return cp.asnumpy(out)


def run_mma(cp, mod, tag, a, b, acc):
    out = cp.full((16, 8), np.nan, dtype=cp.float32)
    mod.get_function(f"rp_probe_mma_{tag}")((1, 1, 1), (32, 1, 1), (out, cp.asarray(acc), cp.asarray(half_bits(a, tag)),
                                                                     cp.asarray(half_bits(b, tag))))
    return cp.asnumpy(out)


def run_cp_async(cp, mod, src, mode):
    out = cp.zeros(128, dtype=cp.uint32)
    mod.get_function("rp_probe_cp_async")((1, 1, 1), (32, 1, 1), (out, cp.asarray(src), np.int32(mode)))
    return cp.asnumpy(out)


def run_cp_refill(cp, mod, src, barrier):
    out = cp.zeros(32, dtype=cp.uint32)
    mod.get_function("rp_probe_cp_refill")((1, 1, 1), (64, 1, 1), (out, cp.asarray(src), np.int32(barrier)))
    return cp.asnumpy(out)
