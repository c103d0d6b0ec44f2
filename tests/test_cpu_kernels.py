"""The CPU backend's Numba kernels (rawpaged/backend/cpu/) against naive NumPy references written
here: random data (never zeros), poisoned outputs, float32 / bfloat16 / float16 storage."""
import ml_dtypes
import numpy as np
import pytest
from numba import njit

from rawpaged.backend import cpu
from rawpaged.backend.cpu import elementwise, gemm, lowp, simd
from rawpaged.errors import RawpagedError

BF16 = np.dtype(ml_dtypes.bfloat16)
DTYPES = [np.dtype(np.float32), BF16, np.dtype(np.float16)]


# -- 16-bit storage ------------------------------------------------------------------------------
@njit
def _widen_all(a, kind, out):
    for i in range(a.shape[0]):
        out[i] = lowp.widen(a[i], kind)


@njit
def _narrow_all(a, kind, out):
    for i in range(a.shape[0]):
        out[i] = lowp.narrow(a[i], kind)


@pytest.mark.parametrize("dtype", [BF16, np.dtype(np.float16)])
def test_widen_and_narrow_match_ml_dtypes_and_numpy(dtype):
    rng = np.random.default_rng(0)
    x = (rng.standard_normal(50_000) * 10.0 ** rng.integers(-8, 6, 50_000)).astype(np.float32)
    x[:6] = [np.inf, -np.inf, 1e-40, -0.0, 70000.0, np.float32(1.00390625)]   # specials, a tie
    kind = lowp.kind_of(dtype)
    bits = np.zeros(len(x), np.uint16)
    with np.errstate(over="ignore"):
        want = x.astype(dtype)
    _narrow_all(x, kind, bits)
    np.testing.assert_array_equal(bits, want.view(np.uint16))                 # round to nearest even
    wide = np.full(len(x), np.nan, np.float32)
    _widen_all(bits, kind, wide)
    np.testing.assert_array_equal(wide, want.astype(np.float32))              # exact
    nan = np.zeros(1, np.uint16)
    _narrow_all(np.array([np.nan], np.float32), kind, nan)
    _widen_all(nan, kind, wide[:1])
    assert np.isnan(wide[0])


def test_exp_nonpos_is_accurate():
    @njit
    def run(x, out):
        for i in range(x.shape[0]):
            out[i] = elementwise.exp_nonpos(x[i])
    x = -np.linspace(0, 80, 200_001).astype(np.float32)
    out = np.full_like(x, np.nan)
    run(x, out)
    ref = np.exp(x.astype(np.float64))
    assert np.max(np.abs(out - ref) / ref) < 3e-7
    run(np.array([-np.inf, -200.0], np.float32), out[:2])
    assert 0 <= out[0] < 1e-37 and 0 <= out[1] < 1e-37


# -- linear ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("rows", [1, 3, 4, 5, 17, 70, 131])
@pytest.mark.parametrize("out_in", [(1, 7), (6, 64), (33, 40), (260, 96), (9, 167), (5, 288), (12, 512)])
def test_linear_matches_float64_reference(dtype, rows, out_in):
    """Rows past the 64-row tile, outputs not a multiple of 4, any K: 32-element chunks for
    vdpbf16ps 1 to 16, in whole groups of 4 chains or not (gemm._D11), with or without a tail;
    bias added."""
    O, K = out_in
    rng = np.random.default_rng(rows * 1000 + O)
    w = rng.standard_normal((O, K), dtype=np.float32).astype(dtype)
    x = rng.standard_normal((rows, K), dtype=np.float32)
    b = rng.standard_normal(O, dtype=np.float32)
    # bfloat16 weights on an AVX-512 BF16 CPU multiply bfloat16-rounded activations (gemm.py)
    xr = x.astype(BF16) if (dtype == BF16 and gemm.ROUNDS_BF16_ACTIVATIONS) else x
    ref = xr.astype(np.float64) @ w.astype(np.float64).T + b
    got = cpu.linear(x, cpu.to_device(w), cpu.to_device(b))
    assert got.dtype == np.float32 and got.shape == (rows, O)
    bound = 1e-5 * (np.abs(xr.astype(np.float64)) @ np.abs(w.astype(np.float64)).T + 1)
    assert np.all(np.abs(got - ref) <= bound)


@pytest.mark.parametrize("threads", [1, 2])
def test_linear_writes_every_output(threads, monkeypatch):
    """Poisoned output: the serial and the parallel kernels write every element once."""
    rng = np.random.default_rng(3)
    w = rng.standard_normal((1030, 200), dtype=np.float32).astype(BF16)       # over the parallel threshold
    x = rng.standard_normal((9, 200), dtype=np.float32)
    monkeypatch.setattr(gemm, "_PARALLEL_MIN_BYTES", 0 if threads == 2 else 1 << 60)
    y = np.full((9, 1030), np.nan, np.float32)
    serial, parallel = gemm._KERNELS[lowp.BF16]
    kernel = parallel if threads == 2 else serial
    args = (x, w.view(np.uint16), y) + ((7,) if threads == 2 else ())
    kernel(*args)
    xr = x.astype(BF16).astype(np.float32) if gemm.ROUNDS_BF16_ACTIVATIONS else x
    np.testing.assert_allclose(y, xr @ w.astype(np.float32).T, rtol=1e-5, atol=1e-4)


# -- paged attention with 16-bit KV ----------------------------------------------------------------
def naive_attention(q, k_ctx, v_ctx, scale, q_pos, window=0):
    n, H, D = q.shape
    group = H // k_ctx.shape[1]
    out = np.zeros_like(q, dtype=np.float64)
    for i in range(n):
        lo = max(0, q_pos[i] - window + 1) if window else 0
        for h in range(H):
            s = (k_ctx[lo: q_pos[i] + 1, h // group] @ q[i, h].astype(np.float64)) * scale
            p = np.exp(s - s.max())
            out[i, h] = (p / p.sum()) @ v_ctx[lo: q_pos[i] + 1, h // group]
    return out


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("window", [0, 7, 20])
@pytest.mark.parametrize("block_size", [8, 16, 32])
@pytest.mark.parametrize("heads_dim", [(8, 4, 64), (6, 1, 16), (4, 4, 40)])
def test_paged_attention_tiles_match_naive(dtype, window, block_size, heads_dim):
    """Prompts longer than a query tile (Q_TILE = 16), a chunk after a cached prefix, decodes; the
    cache stored in `dtype` (the reference reads the same stored values, widened)."""
    H, Hkv, D = heads_dim
    rng = np.random.default_rng(H * 100 + block_size + window)
    ctx_lens, q_lens = [40, 75, 1, 33, 100], [40, 35, 1, 1, 17]
    num_blocks = sum(-(-c // block_size) for c in ctx_lens) + 2
    kv = rng.standard_normal((num_blocks, 2, 2, Hkv, block_size, D), dtype=np.float32).astype(dtype)
    wide = kv.astype(np.float32)
    perm = rng.permutation(num_blocks)
    tables, nxt = np.zeros((len(ctx_lens), -(-max(ctx_lens) // block_size)), np.int32), 0
    for i, c in enumerate(ctx_lens):
        nb = -(-c // block_size)
        tables[i, :nb] = perm[nxt:nxt + nb]
        nxt += nb
    q = rng.standard_normal((sum(q_lens), H, D), dtype=np.float32)
    qsl = np.concatenate([[0], np.cumsum(q_lens)]).astype(np.int32)
    out = np.full_like(q, np.nan)
    cpu.paged_attention(q, kv, 1, tables, np.array(ctx_lens, np.int32), qsl, D ** -0.5, out=out,
                        sliding_window=window or None)
    for s, (c, n) in enumerate(zip(ctx_lens, q_lens)):
        k = np.stack([wide[tables[s, j // block_size], 1, 0, :, j % block_size] for j in range(c)])
        v = np.stack([wide[tables[s, j // block_size], 1, 1, :, j % block_size] for j in range(c)])
        ref = naive_attention(q[qsl[s]:qsl[s + 1]], k, v, D ** -0.5, np.arange(c - n, c), window)
        np.testing.assert_allclose(out[qsl[s]:qsl[s + 1]], ref, rtol=2e-5, atol=2e-5)


@njit
def _call_scores16(q, keys, out, kind):
    """Every (g, r, o) the kernels use: out[r, o:o+16] = q[g] . keys[j] for g < G (r = g, o = 16 g)."""
    for g in range(q.shape[0]):
        if kind == lowp.BF16:
            simd.SCORES16_BF16(q, g, keys, out, g, 16 * g + 3)
        elif kind == lowp.F16:
            simd.SCORES16_F16(q, g, keys, out, g, 16 * g + 3)
        else:
            simd.SCORES16_F32(q, g, keys, out, g, 16 * g + 3)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("head_dim", [16, 64, 128])
def test_scores16_matches_numpy_and_writes_only_its_16(dtype, head_dim):
    """simd.py's 16 dot products per block against float64 NumPy on the widened keys; the output
    is poisoned (NaN) and every element outside the 16 written ones must stay so."""
    rng = np.random.default_rng(head_dim)
    G = 3
    q = rng.standard_normal((G, head_dim), dtype=np.float32)
    keys = rng.standard_normal((2, 16, head_dim), dtype=np.float32).astype(dtype)[1]   # a strided-free view
    out = np.full((G + 1, 16 * G + 3 + 20), np.nan, np.float32)
    _call_scores16(q, lowp.bits(keys), out, lowp.kind_of(dtype))
    ref = q.astype(np.float64) @ keys.astype(np.float64).T                  # [G, 16]
    for g in range(G):
        np.testing.assert_allclose(out[g, 16 * g + 3:16 * g + 19], ref[g], rtol=1e-5, atol=1e-5)
        written = np.zeros(out.shape[1], bool)
        written[16 * g + 3:16 * g + 19] = True
        assert np.isnan(out[g, ~written]).all()
    assert np.isnan(out[G]).all()


@njit
def _call_values16(p, vals, acc, kind):
    for g in range(p.shape[0]):
        if kind == lowp.BF16:
            simd.VALUES16_BF16(p, g, 5, vals, acc)
        elif kind == lowp.F16:
            simd.VALUES16_F16(p, g, 5, vals, acc)
        else:
            simd.VALUES16_F32(p, g, 5, vals, acc)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("head_dim", [16, 64, 128])
def test_values16_matches_numpy(dtype, head_dim):
    """acc[g] += p[g, 5:21] @ widen(values) against float64 NumPy, accumulating onto random acc;
    a poisoned row past the G rows stays untouched."""
    rng = np.random.default_rng(head_dim + 1)
    G = 3
    p = rng.random((G, 30), dtype=np.float32)
    vals = rng.standard_normal((16, head_dim), dtype=np.float32).astype(dtype)
    acc = np.concatenate([rng.standard_normal((G, head_dim), dtype=np.float32),
                          np.full((1, head_dim), np.nan, np.float32)])
    ref = acc[:G].astype(np.float64) + p[:, 5:21].astype(np.float64) @ vals.astype(np.float64)
    _call_values16(p, lowp.bits(vals), acc, lowp.kind_of(dtype))
    np.testing.assert_allclose(acc[:G], ref, rtol=1e-5, atol=1e-5)
    assert np.isnan(acc[G]).all()


def test_paged_attention_parallel_equals_serial(monkeypatch):
    rng = np.random.default_rng(5)
    kv = rng.standard_normal((20, 1, 2, 2, 16, 32), dtype=np.float32).astype(BF16)
    tables = rng.permutation(20).astype(np.int32).reshape(4, 5)
    q = rng.standard_normal((4 + 30, 4, 32), dtype=np.float32)
    seq_lens = np.array([70, 3, 44, 30], np.int32)
    qsl = np.array([0, 1, 2, 4, 34], np.int32)
    outs = []
    for work in (0, 1 << 62):                       # parallel, then serial
        monkeypatch.setattr(cpu._attn, "PARALLEL_MIN_WORK", work)
        outs.append(cpu.paged_attention(q, kv, 0, tables, seq_lens, qsl, 0.2, out=np.full_like(q, np.nan)))
    assert not np.isnan(outs[0]).any()
    # NOTE: not bit for bit: both compile the same code, and are equal when compiled in one process,
    # but a parallel twin compiled by another process (an engine run) and loaded from Numba's cache
    # gave results 1-2 ulp apart in its decode rows (seen on numba 0.68; cause not found)
    np.testing.assert_allclose(outs[0], outs[1], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("dtype", [BF16, np.dtype(np.float16)], ids=lambda d: np.dtype(d).name)
def test_reshape_and_cache_rounds_into_16_bit_slots(dtype):
    rng = np.random.default_rng(0)
    kv = rng.standard_normal((6, 3, 2, 2, 8, 16), dtype=np.float32).astype(dtype)
    before = kv.copy()
    k = rng.standard_normal((4, 2, 16), dtype=np.float32)
    v = rng.standard_normal((4, 2, 16), dtype=np.float32)
    slots = np.array([5, 8 * 3 + 7, -1, 8 * 5], np.int64)
    cpu.reshape_and_cache(k, v, kv, 2, slots)
    expect = before.copy()
    for t, s in enumerate(slots):
        if s >= 0:
            expect[s // 8, 2, 0, :, s % 8] = k[t].astype(dtype)
            expect[s // 8, 2, 1, :, s % 8] = v[t].astype(dtype)
    np.testing.assert_array_equal(kv.view(np.uint16), expect.view(np.uint16))


# -- row-wise kernels --------------------------------------------------------------------------------
@pytest.mark.parametrize("rows", [1, 3, 700])           # 700 x 512: the parallel compilation
def test_rowwise_kernels_match_numpy(rows):
    rng = np.random.default_rng(rows)
    x = rng.standard_normal((rows, 512), dtype=np.float32) * 3
    res = rng.standard_normal((rows, 512), dtype=np.float32)
    w = rng.standard_normal(512, dtype=np.float32)
    x64, r64 = x.astype(np.float64), res.astype(np.float64)
    rms = lambda a: a / np.sqrt(np.mean(a * a, axis=-1, keepdims=True) + 1e-5) * w  # noqa: E731
    np.testing.assert_allclose(cpu.rms_norm(x, w, 1e-5), rms(x64), rtol=1e-5, atol=1e-5)
    xi, ri = x.copy(), res.copy()
    cpu.fused_add_rms_norm(xi, ri, w, 1e-5)
    np.testing.assert_allclose(ri, r64 + x64, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(xi, rms(r64 + x64), rtol=1e-5, atol=1e-5)
    gu = rng.standard_normal((rows, 2 * 300), dtype=np.float32) * 6
    g, u = gu[:, :300].astype(np.float64), gu[:, 300:].astype(np.float64)
    np.testing.assert_allclose(cpu.silu_and_mul(gu), g / (1 + np.exp(-g)) * u, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("rows", [1, 5, 48])             # 48 x 32000: the parallel compilation
def test_argmax_logsumexp_matches_numpy(rows):
    """The sampler's greedy token and log-normaliser against float64 NumPy: wide logits, ties at
    the maximum (the first index wins), masked (-inf) entries, a row masked entirely."""
    rng = np.random.default_rng(rows)
    x = rng.standard_normal((rows, 32000), dtype=np.float32) * 8
    x[0, 100] = x[0, 31000] = x[0].max() + 1                  # a tie: argmax is 100
    x[:, rng.integers(0, 32000, 500)] = -np.inf
    if rows > 1:
        x[1] = -np.inf
    amax, lse = elementwise.argmax_logsumexp(x)
    np.testing.assert_array_equal(amax, np.argmax(x, axis=1))
    assert amax[0] == 100
    x64 = x.astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        m = x64.max(axis=1, keepdims=True)
        ref = (m + np.log(np.exp(x64 - np.where(np.isinf(m), 0, m)).sum(axis=1, keepdims=True)))[:, 0]
    np.testing.assert_allclose(lse, ref, rtol=1e-6, atol=1e-5)
    if rows > 1:
        assert lse[1] == -np.inf


@pytest.mark.parametrize("is_neox", [True, False])
@pytest.mark.parametrize("rows", [2, 700])
def test_rotary_kernel_matches_the_numpy_path(is_neox, rows):
    """Partial rotation (rot_dim 48 of 64), the kernel against the NumPy formulation it replaced."""
    rng = np.random.default_rng(rows)
    q = rng.standard_normal((rows, 8, 64), dtype=np.float32)
    k = rng.standard_normal((rows, 2, 64), dtype=np.float32)
    table = rng.standard_normal((1024, 48), dtype=np.float32)
    pos = rng.integers(0, 1024, rows)
    wq, wk = q.copy(), k.copy()
    cpu._rotary_numpy(pos, wq, wk, table, is_neox)
    cpu.rotary_embedding(pos, q, k, table, is_neox)
    np.testing.assert_allclose(q, wq, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(k, wk, rtol=1e-6, atol=1e-6)


# -- dtypes ------------------------------------------------------------------------------------------
def test_resolve_dtype_and_storage():
    assert cpu.resolve_dtype("auto", "bfloat16") == np.float32
    assert cpu.resolve_dtype("bf16") == BF16 and cpu.resolve_dtype("half") == np.float16
    with pytest.raises(RawpagedError, match="float64"):
        cpu.resolve_dtype("float64")
    assert cpu.to_device(np.ones((3, 4), np.float32), BF16).dtype == BF16      # matrices: 16-bit
    assert cpu.to_device(np.ones(4, np.float32), BF16).dtype == np.float32     # vectors: float32
    assert cpu.to_device(np.arange(4), None).dtype == np.arange(4).dtype       # index arrays as they are
    table = cpu.to_device(np.arange(12, dtype=np.float32).reshape(4, 3), np.float16)
    emb = cpu.embedding(np.array([3, 1]), table)
    assert emb.dtype == np.float32 and emb.tolist() == [[9, 10, 11], [3, 4, 5]]
