"""The fused per-layer ops (issue 13): kernels_cuda/fused_ops.cu under the host emulator against their
CPU twins, and each twin against the unfused pair of ops it replaces.

  rotary_and_cache      == rotary_embedding(q, k) then reshape_and_cache(k, v)   (k itself untouched)
  fused_add_layer_norm  == residual += x; x = layer_norm(residual)

Random data (never zeros), q/k/v as strided views of a fused qkv projection (the model's layout, no
copies), padding tokens (slot -1), and a poisoned (NaN) cache: a slot the kernel should not touch
stays NaN, one it should write and does not stays NaN too.
"""
from __future__ import annotations

import numpy as np
import pytest

from cuda_emulator import CXX, _dev, install, uninstall_caches
from rawpaged.backend import cpu

try:
    import ml_dtypes
    BF16 = np.dtype(ml_dtypes.bfloat16)
except Exception:  # pragma: no cover
    BF16 = None

TOL = {"float16": dict(rtol=2e-3, atol=2e-3), "float32": dict(rtol=1e-5, atol=1e-5),
       "bfloat16": dict(rtol=1.6e-2, atol=1.6e-2)}
needs_cxx = pytest.mark.skipif(CXX is None, reason="no C++ compiler (g++) to build the host emulation")


@pytest.fixture()
def emu(monkeypatch):
    yield install(monkeypatch)
    uninstall_caches()


def _dt(name):
    if name == "bfloat16":
        if BF16 is None:
            pytest.skip("ml_dtypes not installed: no bfloat16 arrays")
        return BF16
    return np.dtype(name)


def _table(rot, max_pos=64):
    inv = 10000.0 ** (-np.arange(0, rot, 2) / rot)
    ang = np.arange(max_pos)[:, None] * inv[None, :]
    return np.concatenate([np.cos(ang), np.sin(ang)], axis=1).astype(np.float32)


def _rope_case(rng, dtype, head_dim, block_size, rot, T=7, Hq=4, Hkv=2, num_blocks=5, layers=2):
    qkv = rng.standard_normal((T, (Hq + 2 * Hkv) * head_dim)).astype(dtype)
    pos = rng.integers(0, 60, T).astype(np.int64)
    slots = rng.permutation(num_blocks * block_size)[:T].astype(np.int64)
    slots[2] = -1                                                  # padding token: stores nothing
    cache = np.full((num_blocks, layers, 2, Hkv, block_size, head_dim), np.nan, dtype)
    return qkv, pos, slots, cache, _table(rot), (Hq, Hkv)


def _views(qkv, Hq, Hkv, D):
    T = qkv.shape[0]
    return (qkv[:, :Hq * D].reshape(T, Hq, D), qkv[:, Hq * D:(Hq + Hkv) * D].reshape(T, Hkv, D),
            qkv[:, (Hq + Hkv) * D:].reshape(T, Hkv, D))


@pytest.mark.parametrize("kv_dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("is_neox,rot", [(True, 16), (False, 16), (True, 8)])
def test_cpu_rotary_and_cache_equals_rotary_then_cache_write(kv_dtype, is_neox, rot):
    """The CPU twin against the two ops it fuses, with float32 activations (the CPU's) and every KV storage."""
    rng = np.random.default_rng(rot + is_neox)
    D, bs = 16, 8
    qkv, pos, slots, cache, table, (Hq, Hkv) = _rope_case(rng, np.float32, D, bs, rot)
    cache = cache.astype(_dt(kv_dtype))
    q_want, k_want, v = (a.copy() for a in _views(qkv, Hq, Hkv, D))
    want = cache.copy()
    cpu.rotary_embedding(pos, q_want, k_want, table, is_neox)
    cpu.reshape_and_cache(k_want, v, want, 1, slots)
    got, fused = cache.copy(), qkv.copy()
    q, k, v = _views(fused, Hq, Hkv, D)
    assert cpu.rotary_and_cache(pos, q, k, v, got, 1, slots, table, is_neox) is q
    np.testing.assert_allclose(q, q_want, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(fused[:, Hq * D:], qkv[:, Hq * D:])         # k and v left as they were
    np.testing.assert_allclose(got.astype(np.float32), want.astype(np.float32), rtol=1e-6, atol=1e-6, equal_nan=True)
    assert np.isnan(got.astype(np.float32)).sum() == (cache.size - 2 * (len(slots) - 1) * Hkv * D)


@needs_cxx
@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
@pytest.mark.parametrize("head_dim,block_size,rot", [(64, 16, 64), (16, 8, 8), (12, 32, 12), (128, 16, 32)])
@pytest.mark.parametrize("is_neox", [True, False])
def test_cuda_rotary_and_cache_matches_cpu(emu, dtype, head_dim, block_size, rot, is_neox):
    """16-byte v path (head_dim 16/64/128) and element path (12); full and partial rotary; padding."""
    dt = _dt(dtype)
    rng = np.random.default_rng(head_dim + block_size + is_neox)
    qkv, pos, slots, cache, table, (Hq, Hkv) = _rope_case(rng, dt, head_dim, block_size, rot)
    f32 = lambda a: np.asarray(a).astype(np.float32)  # noqa: E731
    q_want, k, v = (f32(a).copy() for a in _views(qkv, Hq, Hkv, head_dim))
    want = f32(cache)
    cpu.rotary_and_cache(pos, q_want, k, v, want, 1, slots, table, is_neox)
    g, got = _dev(qkv.copy()), _dev(cache.copy())
    q, kd, vd = _views(g, Hq, Hkv, head_dim)
    emu.rotary_and_cache(_dev(pos), q, kd, vd, got, 1, _dev(slots), _dev(table), is_neox)
    tol = TOL[dtype]
    np.testing.assert_allclose(f32(q), q_want, **tol)
    # the cache: every written slot as the twin's (rounded to the storage dtype), every other still NaN
    np.testing.assert_allclose(f32(got), want.astype(dt).astype(np.float32), equal_nan=True, **tol)
    np.testing.assert_array_equal(np.asarray(g)[:, Hq * head_dim:], qkv[:, Hq * head_dim:])   # k, v untouched


@needs_cxx
def test_cuda_rotary_and_cache_with_the_model_dtype_table(emu):
    """The cos/sin table may be stored in the model dtype (rotary_cache_f16_f16)."""
    rng = np.random.default_rng(3)
    qkv, pos, slots, cache, table, (Hq, Hkv) = _rope_case(rng, np.float16, 32, 16, 32)
    want_q, k, v = (a.astype(np.float32) for a in _views(qkv, Hq, Hkv, 32))
    want = cache.astype(np.float32)
    cpu.rotary_and_cache(pos, want_q, k, v, want, 1, slots, table.astype(np.float16).astype(np.float32), True)
    g, got = _dev(qkv.copy()), _dev(cache.copy())
    q, kd, vd = _views(g, Hq, Hkv, 32)
    emu.rotary_and_cache(pos, q, kd, vd, got, 1, slots, _dev(table.astype(np.float16)), True)
    np.testing.assert_allclose(np.asarray(q).astype(np.float32), want_q, **TOL["float16"])
    np.testing.assert_allclose(np.asarray(got).astype(np.float32), want, equal_nan=True, **TOL["float16"])


def _ln(x, w, b, eps):
    return cpu.layer_norm(x.astype(np.float32), None if w is None else w.astype(np.float32),
                          None if b is None else b.astype(np.float32), eps)


@pytest.mark.parametrize("affine", ["both", "none", "weight"])
def test_cpu_fused_add_layer_norm_equals_add_then_layer_norm(affine):
    rng = np.random.default_rng(7)
    x = (rng.standard_normal((5, 96)) * 3 + 0.5).astype(np.float32)
    res = rng.standard_normal((5, 96)).astype(np.float32)
    w = None if affine == "none" else (rng.standard_normal(96) + 1).astype(np.float32)
    b = rng.standard_normal(96).astype(np.float32) if affine == "both" else None
    xs, rs = x.copy(), res.copy()
    out_x, out_r = cpu.fused_add_layer_norm(xs, rs, w, b, 1e-5)
    assert out_x is xs and out_r is rs
    np.testing.assert_allclose(rs, res + x, rtol=1e-6)
    np.testing.assert_allclose(xs, _ln(res + x, w, b, 1e-5), rtol=2e-5, atol=2e-5)


@needs_cxx
@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
@pytest.mark.parametrize("hidden", [96, 100, 1024])          # vector path (96, 1024), element path (100)
@pytest.mark.parametrize("affine", ["both", "none", "weight"])
def test_cuda_fused_add_layer_norm_matches_cpu(emu, dtype, hidden, affine):
    dt = _dt(dtype)
    rng = np.random.default_rng(hidden)
    x = (rng.standard_normal((6, hidden)) * 3 + 0.5).astype(dt)
    res = rng.standard_normal((6, hidden)).astype(dt)
    w = None if affine == "none" else (rng.standard_normal(hidden) + 1).astype(dt)
    b = rng.standard_normal(hidden).astype(dt) if affine == "both" else None
    f = lambda a: np.asarray(a).astype(np.float32)  # noqa: E731
    xg, rg = _dev(x.copy()), _dev(res.copy())
    out_x, out_r = emu.fused_add_layer_norm(xg, rg, None if w is None else _dev(w), None if b is None else _dev(b), 1e-5)
    assert out_x is xg and out_r is rg
    rsum = (f(res) + f(x)).astype(dt)                          # the residual is stored in the model dtype
    np.testing.assert_array_equal(np.asarray(rg), rsum)
    want_x, want_r = f(x), f(res)
    cpu.fused_add_layer_norm(want_x, want_r, None if w is None else f(w), None if b is None else f(b), 1e-5)
    # the twin sums in fp32; the kernel's statistics read the rounded residual, as the unfused ops would
    np.testing.assert_allclose(f(xg), _ln(f(rsum), w, b, 1e-5), **TOL[dtype])
    np.testing.assert_allclose(f(xg), want_x, **{k: 3 * v for k, v in TOL[dtype].items()})


@needs_cxx
def test_cuda_fused_ops_refuse_bad_arguments(emu):
    x = _dev(np.ones((2, 8), np.float16))
    with pytest.raises(ValueError, match="fused_add_layer_norm: x .* and residual"):
        emu.fused_add_layer_norm(x, _dev(np.ones((2, 8), np.float32)), None, None, 1e-5)
    cache = _dev(np.zeros((2, 1, 2, 1, 8, 8), np.float16))
    q = _dev(np.ones((3, 2, 8), np.float16))
    kv = _dev(np.ones((3, 1, 8), np.float16))
    with pytest.raises(ValueError, match="slot_mapping must be"):
        emu.rotary_and_cache(np.zeros(3, np.int64), q, kv, kv, cache, 0, np.zeros(2, np.int64), _dev(_table(8)), True)


# --------------------------------------------------------------------------------------------
# Vector loads in the norms and activations (vec.cuh): both paths against the CPU twins
# --------------------------------------------------------------------------------------------
def _rows_view(rng, dt, rows, width, misalign):
    """[rows, width] random data, C-contiguous; misaligned by one element when asked (the element path)."""
    a = (rng.standard_normal((rows * width + 1)) * 2 + 0.3).astype(dt)
    return _dev(a)[1:].reshape(rows, width) if misalign else _dev(a[:-1].copy()).reshape(rows, width)


@needs_cxx
@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
@pytest.mark.parametrize("width,misalign", [(96, False), (1024, False), (100, False), (96, True)])
def test_norms_vector_and_element_paths_match_cpu(emu, dtype, width, misalign):
    dt = _dt(dtype)
    rng = np.random.default_rng(width + misalign)
    f = lambda a: np.asarray(a).astype(np.float32)  # noqa: E731
    x = _rows_view(rng, dt, 5, width, misalign)
    w, b = _dev((rng.standard_normal(width) + 1).astype(dt)), _dev(rng.standard_normal(width).astype(dt))
    tol = TOL[dtype]
    np.testing.assert_allclose(f(emu.rms_norm(x, w, 1e-5)), cpu.rms_norm(f(x), f(w), 1e-5), **tol)
    np.testing.assert_allclose(f(emu.layer_norm(x, w, b, 1e-5)), cpu.layer_norm(f(x), f(w), f(b), 1e-5), **tol)
    res = _rows_view(rng, dt, 5, width, misalign)
    rsum = (f(res) + f(x)).astype(dt)
    xg = x.copy() if not misalign else x                       # in place: keep the (mis)alignment
    emu.fused_add_rms_norm(xg, res, w, 1e-5)
    np.testing.assert_array_equal(np.asarray(res), rsum)
    np.testing.assert_allclose(f(xg), cpu.rms_norm(f(rsum), f(w), 1e-5), **tol)


@needs_cxx
@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
@pytest.mark.parametrize("inner,misalign", [(48, False), (44, False), (48, True)])
def test_activations_vector_and_element_paths_match_cpu(emu, dtype, inner, misalign):
    dt = _dt(dtype)
    rng = np.random.default_rng(inner + misalign)
    f = lambda a: np.asarray(a).astype(np.float32)  # noqa: E731
    x = _rows_view(rng, dt, 7, 2 * inner, misalign)
    tol = {k: 2 * v for k, v in TOL[dtype].items()}
    np.testing.assert_allclose(f(emu.silu_and_mul(x)), cpu.silu_and_mul(f(x)), **tol)
    np.testing.assert_allclose(f(emu.gelu_tanh_and_mul(x)), cpu.gelu_tanh_and_mul(f(x)), **tol)
    for op in ("gelu", "gelu_tanh", "relu"):
        np.testing.assert_allclose(f(getattr(emu, op)(x)), getattr(cpu, op)(f(x)), **tol)
