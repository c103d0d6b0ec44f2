"""The real CUDA kernels and the CUDA backend's launch code, executed on the CPU and compared with the CPU twins.

No GPU here: kernels_cuda/host_emulation.h turns each .cu file into C++ where every CUDA thread is a
fiber (a coroutine on one OS thread), __syncthreads and warp shuffles are barriers and mma.sync is computed from the 32 lanes'
fragments as the PTX ISA lays them out. A NumPy-backed stand-in for CuPy (tests/cuda_emulator.py) gives rawpaged/backend/cuda/ what it
calls (arrays with .data.ptr, RawModule, streams, memcpyAsync), so every op runs through the same
argument checks, dispatch and argument marshalling as on a device. Outputs start as NaN (poisoned)
and KV slots past each context are NaN, so a kernel that skips a write or reads past a context fails.

What this cannot show: timing, real memory-model effects (no concurrency between blocks), NVRTC
specifics, and anything the emulation itself gets wrong; tests/gpu checks the same ops on a device.
"""
from __future__ import annotations

import ctypes

import numpy as np
import pytest

import cuda_emulator
from cuda_emulator import CXX, _dev, compile_source, install, uninstall_caches
from rawpaged.backend import cpu
from rawpaged.backend import cuda

pytestmark = pytest.mark.skipif(CXX is None, reason="no C++ compiler (g++) to build the host emulation")

try:
    import ml_dtypes  # noqa: F401
    HAVE_BF16 = True
except Exception:
    HAVE_BF16 = False


@pytest.fixture()
def emu(monkeypatch):
    """The CUDA backend running on the emulator (tests/cuda_emulator.py): 4 'multiprocessors', fresh module caches."""
    yield install(monkeypatch)
    uninstall_caches()


@pytest.fixture(params=["deferred", "eager"])
def emu_both(request, monkeypatch):
    """The emulator in both cp.async modes (kernels_cuda/host_emulation.h): deferred copies catch a
    stage read before its wait or barrier, eager copies with warps running ahead catch a stage
    refilled while another warp still reads it."""
    monkeypatch.setattr(cuda_emulator, "CP_ASYNC_MODE", request.param)
    yield install(monkeypatch)
    uninstall_caches()


# --------------------------------------------------------------------------------------------
# Helpers: random paged batches (never zeros), NaN in every slot no context covers
# --------------------------------------------------------------------------------------------
TOL = {"float16": dict(rtol=2e-3, atol=2e-3), "float32": dict(rtol=1e-5, atol=1e-5), "bfloat16": dict(rtol=1.6e-2, atol=1.6e-2)}


def _np_dtype(name):
    if name == "bfloat16":
        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


def make_batch(rng, dtype, head_dim, block_size, num_heads, num_kv_heads, ctx_lens, q_lens, num_layers=2, layer=1):
    """A paged KV cache with the contexts scattered over shuffled blocks, and the query tokens."""
    dt = _np_dtype(dtype)
    blocks_per_seq = [-(-c // block_size) for c in ctx_lens]
    num_blocks = sum(blocks_per_seq) + 2                      # + a spare and a NaN 'trap' block
    kv = rng.standard_normal((num_blocks, num_layers, 2, num_kv_heads, block_size, head_dim)).astype(dt)
    trap = num_blocks - 1
    kv[trap] = np.nan
    perm = rng.permutation(num_blocks - 1)
    max_blocks = max(blocks_per_seq) + 1
    tables = np.full((len(ctx_lens), max_blocks), trap, np.int32)   # unused entries -> NaN block
    k = 0
    for s, n in enumerate(blocks_per_seq):
        tables[s, :n] = perm[k:k + n]
        k += n
        tail = ctx_lens[s] % block_size
        if tail:                                               # slots past the context: NaN
            kv[tables[s, n - 1], :, :, :, tail:, :] = np.nan
    qsl = np.concatenate([[0], np.cumsum(q_lens)]).astype(np.int32)
    q = rng.standard_normal((int(qsl[-1]), num_heads, head_dim)).astype(dt)
    return q, kv, tables, np.asarray(ctx_lens, np.int32), qsl, layer


def reference_attention(q, kv, layer, tables, ctx, qsl, scale, window=None):
    f32 = lambda a: np.ascontiguousarray(np.asarray(a).astype(np.float32))
    return cpu.paged_attention(f32(q), f32(kv), layer, tables, ctx, qsl, scale, sliding_window=window)


def run_attention(emu, q, kv, layer, tables, ctx, qsl, scale, window=None, num_partitions=None):
    """The backend's op; with num_partitions, its fixed-grid variant (paged_attention_planned)."""
    hints = dict(max_query_len=int(np.diff(qsl).max()), max_seq_len=int(ctx.max()), sliding_window=window)
    if num_partitions is None:
        out = emu.paged_attention(_dev(q), _dev(kv), layer, tables, ctx, qsl, scale, **hints)
    else:
        out = emu.paged_attention_planned(_dev(q), _dev(kv), layer, tables, ctx, qsl, scale, **hints,
                                          num_partitions=num_partitions)
    return np.asarray(out).astype(np.float32)


def check_attention(emu, dtype, head_dim, block_size, heads, kv_heads, ctx, qlens, window=None, num_partitions=None,
                    seed=0):
    """Random batch (NaN past every context and, with a window, before every window), the backend's
    op on the emulated kernels against the fp32 CPU twin."""
    rng = np.random.default_rng(seed)
    q, kv, tables, ctx_a, qsl, layer = make_batch(rng, dtype, head_dim, block_size, heads, kv_heads, ctx, qlens)
    if window:
        poison_outside_windows(kv, tables, ctx_a, qsl, block_size, window, layer)
    scale = head_dim ** -0.5
    got = run_attention(emu, q, kv, layer, tables, ctx_a, qsl, scale, window, num_partitions)
    want = reference_attention(q, kv, layer, tables, ctx_a, qsl, scale, window)
    assert np.isfinite(got).all() and np.isfinite(want).all()
    np.testing.assert_allclose(got, want, **TOL[dtype])


def poison_outside_windows(kv, tables, ctx, qsl, block_size, window, layer):
    """NaN in every K/V row of `layer` that no query's window covers: a kernel that reads one fails.
    (Each query token i of sequence s sits at ctx - q_len + i and sees its last `window` positions.)"""
    for s, c in enumerate(ctx):
        first_needed = max(0, int(c) - int(qsl[s + 1] - qsl[s]) - window + 1)
        for j in range(first_needed):
            kv[tables[s, j // block_size], layer, :, :, j % block_size, :] = np.nan


# --------------------------------------------------------------------------------------------
# Attention
# --------------------------------------------------------------------------------------------
DECODE_CASES = [
    # dtype, head_dim, block_size, heads, kv heads, contexts (ending mid-block)
    ("float16", 128, 16, 8, 2, [1, 17, 70]),       # fast path hd128, GQA 4 -> g4
    ("float16", 80, 8, 2, 2, [9, 40]),             # hd 80: 10 packs on 16 lanes, MHA -> g1
    ("float16", 64, 32, 16, 2, [33, 5]),           # GQA 8 -> g8, block 32
    ("float16", 8, 16, 8, 4, [23, 64, 3]),         # stories260K's shape: generic path
    ("float16", 72, 8, 6, 1, [19, 26]),            # odd head size, MQA group 6 -> g2 x 3 tiles
    ("float32", 64, 16, 4, 2, [15, 31]),           # fp32 generic decode
    ("float16", 12, 16, 4, 2, [13, 20]),           # head_dim % 8 != 0 -> varlen kernel
]


@pytest.mark.parametrize("dtype,head_dim,block_size,heads,kv_heads,ctx", DECODE_CASES)
def test_decode_matches_cpu(emu, dtype, head_dim, block_size, heads, kv_heads, ctx):
    rng = np.random.default_rng(head_dim * 1000 + block_size)
    q, kv, tables, ctx_a, qsl, layer = make_batch(rng, dtype, head_dim, block_size, heads, kv_heads, ctx, [1] * len(ctx))
    scale = head_dim ** -0.5
    got = run_attention(emu, q, kv, layer, tables, ctx_a, qsl, scale)
    want = reference_attention(q, kv, layer, tables, ctx_a, qsl, scale)
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, want, **TOL[dtype])


@pytest.mark.parametrize("partition,parts", [(16, 7), (48, 3), (16, 2)])
def test_decode_split_k_matches_cpu(emu, monkeypatch, partition, parts):
    """Each sequence's keys cut into `parts` equal shares rounded up to `partition` tokens: several
    per long sequence, empty trailing ones for the short (the reduce merges only the non-empty)."""
    monkeypatch.setattr(cuda, "PARTITION_SIZE", partition)
    rng = np.random.default_rng(partition + parts)
    q, kv, tables, ctx, qsl, layer = make_batch(rng, "float16", 64, 16, 4, 1, [5, 100, 47], [1, 1, 1])
    plan = cuda.select_decode_kernel(64, "float16", 16, 3, 4, 1, 100, 4, num_partitions=parts)
    assert plan.use_split_k and plan.num_partitions == parts and plan.grid[2] == parts
    got = run_attention(emu, q, kv, layer, tables, ctx, qsl, 0.125, num_partitions=parts)
    np.testing.assert_allclose(got, reference_attention(q, kv, layer, tables, ctx, qsl, 0.125), **TOL["float16"])


# Decode on both kernels (CUDA cores "simt", tensor cores "mma"), with and without split-K, over
# group sizes that fill the head tiles and odd ones that leave the last tile partial.
DECODE_PATH_CASES = [
    # dtype, head_dim, block_size, heads, kv heads, contexts
    ("float16", 128, 16, 8, 2, [1, 17, 70]),       # group 4: one mma tile of 16 rows, 12 masked
    ("float16", 64, 8, 3, 1, [33, 100]),           # group 3: simt tile of 4 (one head masked)
    ("float16", 80, 32, 14, 2, [33, 100]),         # group 7, head size 80 (10 packs, 5 k-steps)
    ("float16", 96, 16, 17, 1, [50, 9]),           # group 17: two mma tiles (16 + 1), simt 8 + 8 + 1
    ("float16", 256, 16, 8, 2, [50, 3]),           # head size 256: Q in shared memory on tensor cores
    ("bfloat16", 128, 8, 8, 1, [70, 9]),           # group 8, bf16, block 8
    ("float16", 64, 32, 5, 5, [40, 71]),           # MHA on tensor cores (mma policy), block 32
]


@pytest.mark.parametrize("policy", ["simt", "mma"])
@pytest.mark.parametrize("parts", [None, 1, 3])
@pytest.mark.parametrize("dtype,head_dim,block_size,heads,kv_heads,ctx", DECODE_PATH_CASES)
def test_decode_paths_match_cpu(emu, monkeypatch, policy, parts, dtype, head_dim, block_size, heads, kv_heads, ctx):
    if dtype == "bfloat16" and not HAVE_BF16:
        pytest.skip("ml_dtypes not installed: no bfloat16 arrays")
    monkeypatch.setattr(cuda, "decode_policy", policy)
    monkeypatch.setattr(cuda, "PARTITION_SIZE", 16)
    plan = cuda.select_decode_kernel(head_dim, dtype, block_size, len(ctx), heads, kv_heads, max(ctx), 4,
                                     num_partitions=parts)
    assert ("_mma_" in plan.kernel) == (policy == "mma")
    group = heads // kv_heads
    tile = 16 if policy == "mma" else cuda.group_tile(group)
    assert plan.grid[0] == kv_heads * -(-group // tile)
    check_attention(emu, dtype, head_dim, block_size, heads, kv_heads, ctx, [1] * len(ctx), num_partitions=parts,
                    seed=head_dim + heads)


@pytest.mark.parametrize("policy,kernel,tiles", [("auto", "paged_decode_mma_f16_hd64", 5),
                                                 ("simt", "paged_decode_f16_hd64_g8", 9)])
def test_decode_group_of_71_shares_each_kv_row(emu, monkeypatch, policy, kernel, tiles):
    """Falcon-style MQA (71 query heads on one KV head): 5 tensor-core tiles of 16, the last with 7
    heads, or 9 CUDA-core tiles of 8, the last with 7."""
    monkeypatch.setattr(cuda, "decode_policy", policy)
    plan = cuda.select_decode_kernel(64, "float16", 16, 2, 71, 1, 40, 4)
    assert plan.kernel == kernel and plan.grid[0] == tiles
    check_attention(emu, "float16", 64, 16, 71, 1, [40, 7], [1, 1], seed=71)


def test_decode_fixed_by_max_model_len_matches_cpu(emu):
    """A CUDA-graph-ready grid: the partitions planned for max_model_len, whatever this step's contexts."""
    rng = np.random.default_rng(4)
    q, kv, tables, ctx, qsl, layer = make_batch(rng, "float16", 128, 16, 4, 1, [9, 70], [1, 1])
    plans = {cuda.select_decode_kernel(128, "float16", 16, 2, 4, 1, n, 4, max_model_len=512) for n in (9, 70, 300)}
    assert len(plans) == 1 and plans.pop().num_partitions == 4      # 2 blocks fill 4 emulated SMs x 2
    out = emu.paged_attention_planned(_dev(q), _dev(kv), layer, tables, ctx, qsl, 128 ** -0.5, max_query_len=1,
                                      max_model_len=512)
    np.testing.assert_allclose(np.asarray(out).astype(np.float32),
                               reference_attention(q, kv, layer, tables, ctx, qsl, 128 ** -0.5), **TOL["float16"])


PREFILL_CASES = [
    # dtype, head_dim, block_size, heads, kv heads, contexts, new tokens (prefill, chunked prefill, decode)
    ("float16", 64, 16, 4, 2, [70, 65, 33], [70, 20, 1]),     # group 2: 2 heads x 32 tokens a block
    ("float16", 128, 8, 2, 1, [40, 3], [17, 3]),
    ("float16", 80, 32, 2, 2, [66], [66]),                      # MHA: 64 tokens of one head a block
    ("float16", 96, 16, 8, 2, [90, 50], [90, 6]),               # group 4: 4 heads x 16 tokens
    ("float16", 128, 16, 10, 2, [70, 12], [9, 12]),             # group 5, short chunks: 4 + 1 heads (3 masked warps)
    ("float16", 256, 16, 8, 2, [70, 40], [70, 5]),              # head size 256: Q in shared memory
    ("bfloat16", 128, 16, 7, 1, [80, 30], [80, 2]),             # bf16, group 7: 4 + 3 heads (1 masked warp)
    ("bfloat16", 64, 8, 6, 2, [100], [37]),                     # bf16, group 3, block 8
]


@pytest.mark.parametrize("policy", ["mma", "varlen"])
@pytest.mark.parametrize("dtype,head_dim,block_size,heads,kv_heads,ctx,qlens", PREFILL_CASES)
def test_prefill_matches_cpu(emu, monkeypatch, policy, dtype, head_dim, block_size, heads, kv_heads, ctx, qlens):
    if dtype == "bfloat16" and not HAVE_BF16:
        pytest.skip("ml_dtypes not installed: no bfloat16 arrays")
    monkeypatch.setattr(cuda, "prefill_policy", policy)
    check_attention(emu, dtype, head_dim, block_size, heads, kv_heads, ctx, qlens, seed=sum(ctx) + head_dim)


# The pipelined kernels in both emulated cp.async modes (a missing wait or barrier, or a stage
# refilled too early, fails one of them): several K/V tiles per prefill block, several chunks per warp.
@pytest.mark.parametrize("kind,dtype,head_dim,block_size,heads,kv_heads,ctx,qlens,parts", [
    ("prefill", "float16", 64, 16, 4, 2, [150, 65], [150, 20], None),
    ("prefill", "float16", 256, 8, 4, 4, [100], [70], None),
    ("prefill", "float16", 128, 16, 8, 2, [120, 40], [8, 40], None),
    ("decode", "float16", 128, 16, 8, 2, [300, 17], [1, 1], 1),
    ("decode", "float16", 256, 32, 4, 1, [200, 33], [1, 1], 2),
])
def test_pipelines_in_both_copy_modes(emu_both, monkeypatch, kind, dtype, head_dim, block_size, heads, kv_heads, ctx,
                                      qlens, parts):
    monkeypatch.setattr(cuda, "prefill_policy", "mma")
    monkeypatch.setattr(cuda, "decode_policy", "mma")
    check_attention(emu_both, dtype, head_dim, block_size, heads, kv_heads, ctx, qlens, num_partitions=parts,
                    seed=head_dim + len(ctx))


def test_prefill_fp32_uses_varlen_and_matches_cpu(emu):
    rng = np.random.default_rng(7)
    q, kv, tables, ctx, qsl, layer = make_batch(rng, "float32", 16, 8, 2, 1, [12, 9], [12, 4])
    assert cuda.select_prefill_kernel(16, "float32", 8, 2, 2, 1, 16, 12).kernel == "paged_varlen_f32"
    got = run_attention(emu, q, kv, layer, tables, ctx, qsl, 0.25)
    np.testing.assert_allclose(got, reference_attention(q, kv, layer, tables, ctx, qsl, 0.25), **TOL["float32"])


def test_attention_reads_q_through_a_strided_view(emu):
    """q as a slice of a fused qkv projection [T, (H + 2 Hkv) * D]: the token stride is honoured."""
    rng = np.random.default_rng(3)
    q, kv, tables, ctx, qsl, layer = make_batch(rng, "float16", 64, 16, 4, 2, [30, 18], [1, 1])
    qkv = rng.standard_normal((2, (4 + 2 * 2) * 64)).astype(np.float16)
    qkv[:, : 4 * 64] = q.reshape(2, -1)
    q_view = _dev(qkv)[:, : 4 * 64].reshape(2, 4, 64)
    out = emu.paged_attention(q_view, _dev(kv), layer, tables, ctx, qsl, 0.125, max_query_len=1, max_seq_len=30)
    np.testing.assert_allclose(np.asarray(out).astype(np.float32), reference_attention(q, kv, layer, tables, ctx, qsl, 0.125), **TOL["float16"])


@pytest.mark.skipif(not HAVE_BF16, reason="ml_dtypes not installed: no bfloat16 arrays")
@pytest.mark.parametrize("ctx,qlens", [([40, 9], [1, 1]), ([40, 9], [40, 2])])
def test_bf16_attention_matches_cpu(emu, ctx, qlens):
    rng = np.random.default_rng(11)
    q, kv, tables, ctx_a, qsl, layer = make_batch(rng, "bfloat16", 64, 16, 4, 2, ctx, qlens)
    got = run_attention(emu, q, kv, layer, tables, ctx_a, qsl, 0.125)
    np.testing.assert_allclose(got, reference_attention(q, kv, layer, tables, ctx_a, qsl, 0.125), **TOL["bfloat16"])


# --------------------------------------------------------------------------------------------
# Sliding-window attention: every path (decode, split-K, tensor-core and varlen prefill, fp32), keys
# outside every window poisoned with NaN, so a kernel that reads one (or a partition the reduce
# should skip) fails, and a kernel that ignores the window fails on the values.
# --------------------------------------------------------------------------------------------
WINDOW_CASES = [
    # dtype, head_dim, block_size, heads, kv heads, contexts, new tokens, window, path
    ("float16", 128, 16, 8, 2, [1, 17, 70], [1, 1, 1], 8, "decode"),      # hd128 g4; window inside a block
    ("float16", 64, 8, 4, 4, [40, 9, 33], [1, 1, 1], 16, "decode"),       # window = 2 blocks; ctx < window
    ("float32", 16, 8, 4, 2, [30, 5], [1, 1], 7, "decode"),               # fp32 generic decode
    ("float16", 64, 16, 4, 2, [70, 65, 33], [70, 20, 1], 24, "mma"),      # prefill + chunk + decode, 64-row tiles
    ("float16", 64, 16, 4, 1, [130], [130], 40, "mma"),                   # tiles wholly before a warp's window
    ("float16", 64, 16, 4, 2, [70, 65, 33], [70, 20, 1], 24, "varlen"),
    ("float32", 16, 8, 2, 1, [12, 29], [12, 4], 5, "varlen"),
    ("float16", 96, 8, 12, 2, [90, 20, 40], [1, 1, 1], 21, "decode"),     # group 6 on tensor cores
    ("float16", 64, 16, 6, 2, [70, 9], [1, 1], 16, "simt"),               # group 3 on CUDA cores
    ("float16", 128, 16, 8, 2, [100, 30], [10, 30], 33, "mma"),           # 4 heads x 16 tokens a block
]


@pytest.mark.parametrize("dtype,head_dim,block_size,heads,kv_heads,ctx,qlens,window,path", WINDOW_CASES)
def test_sliding_window_matches_cpu(emu, monkeypatch, dtype, head_dim, block_size, heads, kv_heads, ctx, qlens,
                                    window, path):
    if path == "simt":
        monkeypatch.setattr(cuda, "decode_policy", path)
    elif path != "decode":
        monkeypatch.setattr(cuda, "prefill_policy", path)
    rng = np.random.default_rng(window * 100 + head_dim)
    q, kv, tables, ctx_a, qsl, layer = make_batch(rng, dtype, head_dim, block_size, heads, kv_heads, ctx, qlens)
    poison_outside_windows(kv, tables, ctx_a, qsl, block_size, window, layer)
    scale = head_dim ** -0.5
    got = run_attention(emu, q, kv, layer, tables, ctx_a, qsl, scale, window)
    want = reference_attention(q, kv, layer, tables, ctx_a, qsl, scale, window)
    assert np.isfinite(got).all() and np.isfinite(want).all()
    np.testing.assert_allclose(got, want, **TOL[dtype])


@pytest.mark.parametrize("policy", ["simt", "mma"])
@pytest.mark.parametrize("partition,window,parts", [(16, 20, 4), (16, 16, 2), (48, 30, 3), (16, 90, 5)])
def test_sliding_window_split_k_partitions_the_window(emu, monkeypatch, policy, partition, window, parts):
    """With a window each sequence splits only its window's keys (no partition lies before it, the
    scratch of empty partitions stays NaN from cupy.empty in the emulator and must not be merged)."""
    monkeypatch.setattr(cuda, "PARTITION_SIZE", partition)
    monkeypatch.setattr(cuda, "decode_policy", policy)
    check_attention(emu, "float16", 64, 16, 4, 1, [5, 100, 47], [1, 1, 1], window=window, num_partitions=parts,
                    seed=partition + window)


def test_a_kernel_ignoring_the_window_fails_here(emu):
    """The windowed reference differs from full attention on these batches by far more than the
    tolerance, so a kernel that dropped the window could not pass the tests above."""
    rng = np.random.default_rng(1)
    q, kv, tables, ctx, qsl, layer = make_batch(rng, "float32", 16, 8, 2, 1, [12, 29], [12, 4])
    windowed = reference_attention(q, kv, layer, tables, ctx, qsl, 0.25, 5)
    full = reference_attention(q, kv, layer, tables, ctx, qsl, 0.25)
    assert np.abs(windowed - full).max() > 0.1
    with pytest.raises(ValueError, match="sliding_window"):
        emu.paged_attention(_dev(q), _dev(kv), layer, tables, ctx, qsl, 0.25, sliding_window=0)


# --------------------------------------------------------------------------------------------
# Cache ops
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", ["float16", "float32"])
@pytest.mark.parametrize("head_dim", [64, 8, 12])      # 16-byte path (8 or 4 elements a word) and element path
def test_reshape_and_cache_matches_cpu(emu, head_dim, dtype):
    rng = np.random.default_rng(head_dim)
    T, Hkv, bs = 9, 2, 8
    cache = rng.standard_normal((6, 3, 2, Hkv, bs, head_dim)).astype(dtype)
    # k and v as views of a fused qkv projection (token stride > Hkv * D)
    qkv = rng.standard_normal((T, (4 + 2 * Hkv) * head_dim)).astype(dtype)
    k = qkv[:, 4 * head_dim: (4 + Hkv) * head_dim].reshape(T, Hkv, head_dim)
    v = qkv[:, (4 + Hkv) * head_dim:].reshape(T, Hkv, head_dim)
    slots = rng.permutation(6 * bs)[:T].astype(np.int64)
    slots[3] = -1                                             # padding token: skipped
    want = cache.astype(np.float32)
    cpu.reshape_and_cache(k.astype(np.float32), v.astype(np.float32), want, 2, slots)
    got = _dev(cache.copy())
    emu.reshape_and_cache(_dev(qkv)[:, 4 * head_dim: (4 + Hkv) * head_dim].reshape(T, Hkv, head_dim),
                          _dev(qkv)[:, (4 + Hkv) * head_dim:].reshape(T, Hkv, head_dim), got, 2, slots)
    np.testing.assert_array_equal(np.asarray(got).astype(np.float32), want)


def test_copy_blocks_and_swap_blocks_match_cpu(emu):
    rng = np.random.default_rng(5)
    cache = rng.standard_normal((8, 2, 2, 2, 16, 8)).astype(np.float16)
    pairs = [(1, 5), (2, 6), (0, 7)]
    want = cache.copy()
    cpu.copy_blocks(want, pairs)
    got = _dev(cache.copy())
    emu.copy_blocks(got, pairs)
    np.testing.assert_array_equal(np.asarray(got), want)
    host = np.full((4, 2, 2, 2, 16, 8), np.nan, np.float16)
    swap_pairs = [(3, 0), (4, 1), (7, 3)]                     # two runs: (3..4 -> 0..1), (7 -> 3)
    assert cuda.copy_runs(swap_pairs) == [(3, 0, 2), (7, 3, 1)]
    want_host = host.copy()
    cpu.swap_blocks(np.asarray(got), want_host, swap_pairs)
    emu.swap_blocks(got, host, swap_pairs, stream=emu.swap_stream())
    np.testing.assert_array_equal(host, want_host)


# --------------------------------------------------------------------------------------------
# Norms, rotary, activations
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_norms_match_cpu(emu, dtype):
    rng = np.random.default_rng(1)
    x = (rng.standard_normal((5, 96)) * 3 + 0.5).astype(dtype)
    res = rng.standard_normal((5, 96)).astype(dtype)
    w = (rng.standard_normal(96) + 1).astype(dtype)
    b = rng.standard_normal(96).astype(dtype)
    f = lambda a: a.astype(np.float32)
    tol = TOL[dtype]
    np.testing.assert_allclose(f(np.asarray(emu.rms_norm(_dev(x), _dev(w), 1e-5))), cpu.rms_norm(f(x), f(w), 1e-5), **tol)
    for weight, bias in ((w, b), (None, None), (w, None)):
        got = emu.layer_norm(_dev(x), None if weight is None else _dev(weight), None if bias is None else _dev(bias), 1e-5)
        want = cpu.layer_norm(f(x), None if weight is None else f(weight), None if bias is None else f(bias), 1e-5)
        np.testing.assert_allclose(f(np.asarray(got)), want, **tol)
    xg, rg = _dev(x.copy()), _dev(res.copy())
    out_x, out_r = emu.fused_add_rms_norm(xg, rg, _dev(w), 1e-5)
    assert out_x is xg and out_r is rg                         # in place, both returned
    rsum = (f(res) + f(x)).astype(dtype)                        # residual is stored in the model dtype
    np.testing.assert_array_equal(np.asarray(rg), rsum)
    np.testing.assert_allclose(f(np.asarray(xg)), cpu.rms_norm(f(rsum), f(w), 1e-5), **tol)


@pytest.mark.parametrize("is_neox", [True, False])
@pytest.mark.parametrize("rot", [16, 8])                       # full and partial rotary
def test_rotary_matches_cpu(emu, is_neox, rot):
    rng = np.random.default_rng(rot + is_neox)
    T, Hq, Hk, D = 6, 4, 2, 16
    pos = rng.integers(0, 50, T).astype(np.int64)
    inv = 10000.0 ** (-np.arange(0, rot, 2) / rot)
    ang = np.arange(64)[:, None] * inv[None, :]
    cache = np.concatenate([np.cos(ang), np.sin(ang)], axis=1).astype(np.float32)
    qkv = rng.standard_normal((T, (Hq + 2 * Hk) * D)).astype(np.float16)
    want_q = qkv[:, : Hq * D].reshape(T, Hq, D).astype(np.float32).copy()
    want_k = qkv[:, Hq * D: (Hq + Hk) * D].reshape(T, Hk, D).astype(np.float32).copy()
    cpu.rotary_embedding(pos, want_q, want_k, cache, is_neox)
    g = _dev(qkv.copy())
    qv = g[:, : Hq * D].reshape(T, Hq, D)
    kv = g[:, Hq * D: (Hq + Hk) * D].reshape(T, Hk, D)
    emu.rotary_embedding(pos, qv, kv, _dev(cache), is_neox)
    np.testing.assert_allclose(np.asarray(qv).astype(np.float32), want_q, **TOL["float16"])
    np.testing.assert_allclose(np.asarray(kv).astype(np.float32), want_k, **TOL["float16"])
    np.testing.assert_array_equal(np.asarray(g)[:, (Hq + Hk) * D:], qkv[:, (Hq + Hk) * D:])   # v untouched


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_activations_match_cpu(emu, dtype):
    rng = np.random.default_rng(2)
    x = (rng.standard_normal((7, 40)) * 2).astype(dtype)
    f = lambda a: np.asarray(a).astype(np.float32)
    tol = TOL[dtype]
    np.testing.assert_allclose(f(emu.silu_and_mul(_dev(x))), cpu.silu_and_mul(f(x)), **tol)
    np.testing.assert_allclose(f(emu.gelu_tanh_and_mul(_dev(x))), cpu.gelu_tanh_and_mul(f(x)), **tol)
    np.testing.assert_allclose(f(emu.gelu(_dev(x))), cpu.gelu(f(x)), **tol)
    np.testing.assert_allclose(f(emu.gelu_tanh(_dev(x))), cpu.gelu_tanh(f(x)), **tol)
    np.testing.assert_array_equal(f(emu.relu(_dev(x))), cpu.relu(f(x)))


def test_emulated_half_conversion_is_ieee(emu):
    """The emulator's fp16 rounding agrees with NumPy's (so the fp16 checks above mean something)."""
    lib = compile_source("#include \"common.cuh\"\n", ())
    lib.rp_emu_test_half_roundtrip.restype = ctypes.c_float
    lib.rp_emu_test_half_roundtrip.argtypes = [ctypes.c_float]
    rng = np.random.default_rng(0)
    xs = np.concatenate([rng.standard_normal(300) * 10.0 ** rng.integers(-8, 5, 300),
                         [0.0, -0.0, 65504.0, 65519.0, 65520.0, 1e-8, 6e-8, np.inf, -np.inf]]).astype(np.float32)
    got = np.array([lib.rp_emu_test_half_roundtrip(float(x)) for x in xs], np.float32)
    np.testing.assert_array_equal(got, xs.astype(np.float16).astype(np.float32))
