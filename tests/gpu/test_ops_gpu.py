"""Every CUDA op against its CPU twin on random inputs, on a real device.

Inputs are random (never zeros), outputs are poisoned with NaN before the launch, KV slots past a
context and unused block-table entries point at NaN. The fp32 CPU twin runs on the very values the
GPU sees (rounded to the storage dtype first); tolerance by dtype (conftest.TOL).
"""
from __future__ import annotations

import numpy as np
import pytest

cp = pytest.importorskip("cupy")

from rawpaged.backend import cpu, cuda  # noqa: E402
from gpu_helpers import TOL, make_batch, np_dtype  # noqa: E402

DTYPES = ["float16", "bfloat16", "float32"]
HEAD_DIMS = [8, 64, 72, 80, 96, 128, 256]


def f32(a):
    return np.ascontiguousarray(np.asarray(a).astype(np.float32))


def host(a):
    return f32(cuda.to_host(a))


def nan_like(shape, dtype):
    return cp.full(shape, np.nan, dtype=dtype) if np.dtype(dtype).kind == "f" or np.dtype(dtype).name == "bfloat16" \
        else cp.empty(shape, dtype=dtype)


def run_attention(q, kv, layer, tables, ctx, qsl, scale, sliding_window=None):
    qd, kvd = cuda.to_device(q), cuda.to_device(kv)
    out = nan_like(q.shape, qd.dtype)
    cuda.paged_attention(qd, kvd, layer, cp.asarray(tables), cp.asarray(ctx), cp.asarray(qsl), scale, out=out,
                         max_query_len=int(np.diff(qsl).max()), max_seq_len=int(ctx.max()),
                         sliding_window=sliding_window)
    return host(out)


def reference(q, kv, layer, tables, ctx, qsl, scale, sliding_window=None):
    return cpu.paged_attention(f32(q), f32(kv), layer, tables, ctx, qsl, np.float32(scale),
                               sliding_window=sliding_window)


# --------------------------------------------------------------------------------------------
# The tensor-core building blocks on the hardware: the probes of tests/intrinsic_probes.py, held to
# the PTX ISA's layouts, as the host emulation's models are in tests/test_cuda_intrinsics.py (so the
# emulator's ldmatrix / mma / cp.async are checked against the real instructions here). Only the
# race-free uses run here: the emulator's deliberate races are undefined on a device.
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def probes():
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))     # tests/, for intrinsic_probes
    import intrinsic_probes
    return intrinsic_probes, intrinsic_probes.probe_module(cp)


def test_ldmatrix_follows_the_ptx_layout(probes):
    p, mod = probes
    tile = p.ldmatrix_source(np.random.default_rng(1))
    np.testing.assert_array_equal(p.run_ldmatrix(cp, mod, tile), p.ldmatrix_expected(tile))


@pytest.mark.parametrize("tag", ["f16", "bf16"])
def test_mma_m16n8k16_fragments(probes, tag):
    p, mod = probes
    a, b, acc = p.mma_operands(np.random.default_rng(2))
    np.testing.assert_array_equal(p.run_mma(cp, mod, tag, a, b, acc), acc + a @ b)


def test_cp_async_wait_barrier_and_zero_fill(probes):
    p, mod = probes
    src = p.cp_async_source(np.random.default_rng(3))
    np.testing.assert_array_equal(p.run_cp_async(cp, mod, src, 0), p.cp_async_expected(src))
    np.testing.assert_array_equal(p.run_cp_refill(cp, mod, src, 1), src[:32, 0])


# --------------------------------------------------------------------------------------------
# Attention
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
@pytest.mark.parametrize("block_size", [8, 16, 32])
@pytest.mark.parametrize("group", [1, 4, 8])
def test_decode(dtype, head_dim, block_size, group):
    rng = np.random.default_rng(head_dim * 100 + block_size + group)
    kv_heads = 2
    ctx = [1, block_size + 3, 5 * block_size - 1, 190]       # contexts ending mid-block
    q, kv, tables, ctx_a, qsl, layer = make_batch(rng, dtype, head_dim, block_size, kv_heads * group, kv_heads, ctx, [1] * len(ctx))
    scale = head_dim ** -0.5
    got = run_attention(q, kv, layer, tables, ctx_a, qsl, scale)
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, reference(q, kv, layer, tables, ctx_a, qsl, scale), **TOL[dtype])


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("head_dim", [80, 128, 256])
@pytest.mark.parametrize("group,kv_heads", [(1, 4), (4, 2), (7, 2), (8, 1), (71, 1)])
@pytest.mark.parametrize("policy", ["simt", "mma"])
def test_decode_both_kernels_any_group(monkeypatch, dtype, head_dim, group, kv_heads, policy):
    """CUDA-core and tensor-core decode (mma.sync, ldmatrix, cp.async: the paths the emulator models),
    odd groups leaving the last head tile partial, split-K as the occupancy chooses it."""
    monkeypatch.setattr(cuda, "decode_policy", policy)
    rng = np.random.default_rng(head_dim + group)
    ctx = [1, 37, 300, 1100]
    q, kv, tables, ctx_a, qsl, layer = make_batch(rng, dtype, head_dim, 16, kv_heads * group, kv_heads, ctx,
                                                  [1] * len(ctx))
    got = run_attention(q, kv, layer, tables, ctx_a, qsl, head_dim ** -0.5)
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, reference(q, kv, layer, tables, ctx_a, qsl, head_dim ** -0.5), **TOL[dtype])


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("policy,partition", [("always", 64), ("always", 512), ("never", 512), ("auto", 512)])
def test_decode_split_k(monkeypatch, dtype, policy, partition):
    monkeypatch.setattr(cuda, "split_k_policy", policy)
    monkeypatch.setattr(cuda, "PARTITION_SIZE", partition)
    rng = np.random.default_rng(partition)
    ctx = [3000, 17, 1500]                                   # long and short in one batch
    q, kv, tables, ctx_a, qsl, layer = make_batch(rng, dtype, 128, 16, 8, 2, ctx, [1, 1, 1])
    got = run_attention(q, kv, layer, tables, ctx_a, qsl, 0.088)
    np.testing.assert_allclose(got, reference(q, kv, layer, tables, ctx_a, qsl, 0.088), **TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim", [8, 64, 72, 80, 128, 256])
@pytest.mark.parametrize("policy", ["auto", "varlen"])
def test_varlen_prefill_mixed_batch(monkeypatch, dtype, head_dim, policy):
    """Fresh prompt, chunked prefill on a cached prefix, prefix-cached prompt and decode tokens in one batch."""
    monkeypatch.setattr(cuda, "prefill_policy", policy)
    rng = np.random.default_rng(head_dim)
    ctx = [130, 97, 64, 40, 1]
    q_lens = [130, 33, 16, 1, 1]
    q, kv, tables, ctx_a, qsl, layer = make_batch(rng, dtype, head_dim, 16, 8, 2, ctx, q_lens)
    got = run_attention(q, kv, layer, tables, ctx_a, qsl, head_dim ** -0.5)
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, reference(q, kv, layer, tables, ctx_a, qsl, head_dim ** -0.5), **TOL[dtype])


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("head_dim", [64, 128, 256])
@pytest.mark.parametrize("heads,kv_heads,q_lens", [(10, 2, [200, 9, 1]), (7, 1, [150, 33, 1]), (8, 2, [12, 5, 1])])
def test_prefill_group_tiles(dtype, head_dim, heads, kv_heads, q_lens):
    """Tensor-core prefill with 1, 2 or 4 heads of a group per block (each K/V tile gathered once for
    them), groups 5 and 7 leaving masked warps, Q in registers (64, 128) or shared memory (256)."""
    rng = np.random.default_rng(heads + head_dim)
    ctx = [300, 100, 77]
    q, kv, tables, ctx_a, qsl, layer = make_batch(rng, dtype, head_dim, 16, heads, kv_heads, ctx, q_lens)
    got = run_attention(q, kv, layer, tables, ctx_a, qsl, head_dim ** -0.5)
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, reference(q, kv, layer, tables, ctx_a, qsl, head_dim ** -0.5), **TOL[dtype])


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("policy", ["auto", "varlen"])
@pytest.mark.parametrize("split_k", ["never", "always"])
def test_sliding_window(monkeypatch, dtype, policy, split_k):
    """Mistral-style window: decode (with and without split-K partitions wholly before the window),
    tensor-core and varlen prefill, chunks straddling the window's edge."""
    monkeypatch.setattr(cuda, "prefill_policy", policy)
    monkeypatch.setattr(cuda, "split_k_policy", split_k)
    monkeypatch.setattr(cuda, "PARTITION_SIZE", 64)
    rng = np.random.default_rng(11)
    ctx = [300, 130, 97, 40, 1]
    q_lens = [1, 130, 33, 1, 1]
    for window in (8, 100):
        q, kv, tables, ctx_a, qsl, layer = make_batch(rng, dtype, 128, 16, 8, 2, ctx, q_lens)
        got = run_attention(q, kv, layer, tables, ctx_a, qsl, 0.088, sliding_window=window)
        assert np.isfinite(got).all()
        np.testing.assert_allclose(got, reference(q, kv, layer, tables, ctx_a, qsl, 0.088, sliding_window=window),
                                   **TOL[dtype])


def test_attention_q_as_view_of_fused_qkv():
    rng = np.random.default_rng(9)
    q, kv, tables, ctx, qsl, layer = make_batch(rng, "float16", 128, 16, 8, 2, [40, 33], [1, 7])
    qkv = cp.asarray(rng.standard_normal((8, (8 + 4) * 128)).astype(np.float16))
    qkv[:, : 8 * 128] = cp.asarray(q.reshape(8, -1))
    out = cuda.paged_attention(qkv[:, : 8 * 128].reshape(8, 8, 128), cuda.to_device(kv), layer, tables, ctx, qsl, 0.088)
    np.testing.assert_allclose(host(out), reference(q, kv, layer, tables, ctx, qsl, 0.088), **TOL["float16"])


# --------------------------------------------------------------------------------------------
# Cache ops and swapping
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim", [8, 12, 128])
def test_reshape_and_cache(dtype, head_dim):
    rng = np.random.default_rng(head_dim)
    dt = np_dtype(dtype)
    T, Hkv, bs = 37, 4, 16
    cache = rng.standard_normal((12, 3, 2, Hkv, bs, head_dim)).astype(np.float32).astype(dt)
    k = rng.standard_normal((T, Hkv, head_dim)).astype(np.float32).astype(dt)
    v = rng.standard_normal((T, Hkv, head_dim)).astype(np.float32).astype(dt)
    slots = rng.permutation(12 * bs)[:T].astype(np.int64)
    slots[::7] = -1
    want = f32(cache)
    cpu.reshape_and_cache(f32(k), f32(v), want, 2, slots)
    got = cuda.to_device(cache)
    cuda.reshape_and_cache(cuda.to_device(k), cuda.to_device(v), got, 2, cp.asarray(slots))
    np.testing.assert_array_equal(host(got), want)


def test_copy_blocks():
    rng = np.random.default_rng(0)
    cache = rng.standard_normal((20, 4, 2, 8, 16, 128)).astype(np.float16)
    pairs = [(3, 10), (4, 11), (0, 19), (7, 12)]
    want = cache.copy()
    cpu.copy_blocks(want, pairs)
    got = cuda.to_device(cache)
    cuda.copy_blocks(got, pairs)
    np.testing.assert_array_equal(cuda.to_host(got), want)


def test_swap_round_trip_on_swap_stream():
    """device -> pinned host on the swap stream, then back into other device blocks; the compute
    stream waits on the recorded event before reading."""
    rng = np.random.default_rng(1)
    dev = cuda.to_device(rng.standard_normal((16, 2, 2, 4, 16, 64)).astype(np.float16))
    before = cuda.to_host(dev)
    pool = cuda.alloc_pinned((8,) + dev.shape[1:], np.float16)
    pool[...] = np.nan
    stream = cuda.swap_stream()
    cuda.swap_blocks(dev, pool, [(2, 0), (3, 1), (9, 5)], stream=stream)
    cuda.wait_event(cuda.record_event(stream))
    cuda.swap_blocks(pool, dev, [(0, 12), (1, 13), (5, 14)], stream=stream)
    cuda.wait_event(cuda.record_event(stream))
    after = cuda.to_host(dev)                      # on the compute stream: ordered after the event
    for s, d in [(2, 12), (3, 13), (9, 14)]:
        np.testing.assert_array_equal(after[d], before[s])
    np.testing.assert_array_equal(after[:12], before[:12])


# --------------------------------------------------------------------------------------------
# Norms, rotary, activations, dense ops
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden", [64, 4096, 5120])
def test_norms(dtype, hidden):
    rng = np.random.default_rng(hidden)
    dt = np_dtype(dtype)
    x = (rng.standard_normal((9, hidden)) * 2 + 0.3).astype(np.float32).astype(dt)
    res = rng.standard_normal((9, hidden)).astype(np.float32).astype(dt)
    w = (rng.standard_normal(hidden) + 1).astype(np.float32).astype(dt)
    b = rng.standard_normal(hidden).astype(np.float32).astype(dt)
    tol = TOL[dtype]
    np.testing.assert_allclose(host(cuda.rms_norm(cuda.to_device(x), cuda.to_device(w), 1e-6)), cpu.rms_norm(f32(x), f32(w), 1e-6), **tol)
    np.testing.assert_allclose(host(cuda.layer_norm(cuda.to_device(x), cuda.to_device(w), cuda.to_device(b), 1e-5)),
                               cpu.layer_norm(f32(x), f32(w), f32(b), 1e-5), **tol)
    np.testing.assert_allclose(host(cuda.layer_norm(cuda.to_device(x), None, None, 1e-5)), cpu.layer_norm(f32(x), None, None, 1e-5), **tol)
    xd, rd = cuda.to_device(x), cuda.to_device(res)
    cuda.fused_add_rms_norm(xd, rd, cuda.to_device(w), 1e-6)
    rsum = (f32(res) + f32(x)).astype(dt)
    np.testing.assert_array_equal(host(rd), f32(rsum))
    np.testing.assert_allclose(host(xd), cpu.rms_norm(f32(rsum), f32(w), 1e-6), **tol)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("is_neox", [True, False])
@pytest.mark.parametrize("rot", [128, 64])
def test_rotary(dtype, is_neox, rot):
    rng = np.random.default_rng(rot)
    dt = np_dtype(dtype)
    T, Hq, Hk, D = 50, 8, 2, 128
    pos = rng.integers(0, 4000, T).astype(np.int64)
    inv = 10000.0 ** (-np.arange(0, rot, 2) / rot)
    ang = np.arange(4096)[:, None] * inv[None, :]
    cache = np.concatenate([np.cos(ang), np.sin(ang)], axis=1).astype(np.float32)
    q = rng.standard_normal((T, Hq, D)).astype(np.float32).astype(dt)
    k = rng.standard_normal((T, Hk, D)).astype(np.float32).astype(dt)
    wq, wk = f32(q), f32(k)
    cpu.rotary_embedding(pos, wq, wk, cache, is_neox)
    qd, kd = cuda.to_device(q), cuda.to_device(k)
    cuda.rotary_embedding(cp.asarray(pos), qd, kd, cp.asarray(cache), is_neox)
    np.testing.assert_allclose(host(qd), wq, **TOL[dtype])
    np.testing.assert_allclose(host(kd), wk, **TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
def test_activations(dtype):
    rng = np.random.default_rng(4)
    x = (rng.standard_normal((33, 2 * 688)) * 3).astype(np.float32).astype(np_dtype(dtype))
    xd = cuda.to_device(x)
    tol = TOL[dtype]
    np.testing.assert_allclose(host(cuda.silu_and_mul(xd)), cpu.silu_and_mul(f32(x)), **tol)
    np.testing.assert_allclose(host(cuda.gelu(xd)), cpu.gelu(f32(x)), **tol)
    np.testing.assert_allclose(host(cuda.gelu_tanh(xd)), cpu.gelu_tanh(f32(x)), **tol)
    np.testing.assert_allclose(host(cuda.gelu_tanh_and_mul(xd)), cpu.gelu_tanh_and_mul(f32(x)), **tol)
    np.testing.assert_array_equal(host(cuda.relu(xd)), cpu.relu(f32(x)))


@pytest.mark.parametrize("dtype", DTYPES)
def test_linear_accumulates_in_fp32(dtype):
    rng = np.random.default_rng(5)
    dt = np_dtype(dtype)
    x = rng.standard_normal((3, 7, 4096)).astype(np.float32).astype(dt)
    w = (rng.standard_normal((257, 4096)) * 0.02).astype(np.float32).astype(dt)
    b = rng.standard_normal(257).astype(np.float32).astype(dt)
    got = host(cuda.linear(cuda.to_device(x), cuda.to_device(w), cuda.to_device(b)))
    want = f32(x) @ f32(w).T + f32(b)
    assert got.shape == (3, 7, 257)
    # fp16 accumulation over 4096 terms would be off by ~1e-2; fp32 accumulation leaves output rounding
    np.testing.assert_allclose(got, want, rtol=TOL[dtype]["rtol"] * 2, atol=TOL[dtype]["atol"] * 4)


def test_embedding_and_dtype_round_trips():
    rng = np.random.default_rng(6)
    table = rng.standard_normal((100, 16)).astype(np.float32)
    ids = np.array([3, 99, 0, 3])
    for name in ("float16", "float32") + (("bfloat16",) if cuda.bfloat16_supported() else ()):
        dev = cuda.to_device(table, dtype=cuda.resolve_dtype(name))
        got = host(cuda.embedding(cp.asarray(ids), dev))
        np.testing.assert_allclose(got, table[ids], **TOL[name])
    assert cuda.resolve_dtype("auto", "float32") == np.float16


def test_memory_queries():
    free, total = cuda.free_device_memory(), cuda.total_device_memory()
    assert 0 < free <= total
