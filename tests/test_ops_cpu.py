"""CPU kernels against naive NumPy references written here (random data, never zeros)."""
import numpy as np
import pytest

from rawpaged.backend import cpu


def naive_attention(q, k_ctx, v_ctx, scale, q_pos, window=0):
    """q [n, H, D], k_ctx/v_ctx [L, Hkv, D] (the whole context); causal by absolute position,
    and with a sliding window W only positions q_pos - W + 1 .. q_pos (transformers' mask)."""
    n, H, D = q.shape
    group = H // k_ctx.shape[1]
    out = np.zeros_like(q, dtype=np.float64)
    for i in range(n):
        lo = max(0, q_pos[i] - window + 1) if window else 0
        for h in range(H):
            kv = h // group
            s = (k_ctx[lo: q_pos[i] + 1, kv] @ q[i, h].astype(np.float64)) * scale
            p = np.exp(s - s.max())
            out[i, h] = (p / p.sum()) @ v_ctx[lo: q_pos[i] + 1, kv]
    return out


@pytest.mark.parametrize("window", [0, 1, 5, 16])
@pytest.mark.parametrize("head_dim", [8, 64, 72])
@pytest.mark.parametrize("block_size", [8, 16, 32])
@pytest.mark.parametrize("heads", [(4, 4), (8, 2), (4, 1)])
def test_paged_attention_matches_naive(head_dim, block_size, heads, window):
    """window 0: full causal; 1, 5, 16: sliding windows shorter than most contexts here."""
    rng = np.random.default_rng(head_dim * 100 + block_size)
    H, Hkv = heads
    layers, layer = 2, 1
    # A batch mixing a fresh prefill, a chunk after a cached prefix, and two decodes; lengths end mid-block.
    ctx_lens = [13, 40, 1, 37]
    q_lens = [13, 9, 1, 1]
    num_blocks = sum(-(-c // block_size) for c in ctx_lens) + 3
    kv_cache = rng.standard_normal((num_blocks, layers, 2, Hkv, block_size, head_dim), dtype=np.float32)
    perm = rng.permutation(num_blocks)       # physical blocks in a shuffled order
    tables, ks, vs, nxt = [], [], [], 0
    for c in ctx_lens:
        nb = -(-c // block_size)
        table = perm[nxt:nxt + nb]
        nxt += nb
        tables.append(table)
        k = np.stack([kv_cache[table[j // block_size], layer, 0, :, j % block_size] for j in range(c)])
        v = np.stack([kv_cache[table[j // block_size], layer, 1, :, j % block_size] for j in range(c)])
        ks.append(k)
        vs.append(v)
    bt = np.zeros((len(ctx_lens), max(len(t) for t in tables)), np.int32)
    for i, t in enumerate(tables):
        bt[i, : len(t)] = t
    q = rng.standard_normal((sum(q_lens), H, head_dim), dtype=np.float32)
    qsl = np.concatenate([[0], np.cumsum(q_lens)]).astype(np.int32)
    scale = head_dim ** -0.5
    out = np.full_like(q, np.nan)            # poisoned: every element must be written
    cpu.paged_attention(q, kv_cache, layer, bt, np.array(ctx_lens, np.int32), qsl, scale, out=out,
                        sliding_window=window or None)
    for s, (c, n) in enumerate(zip(ctx_lens, q_lens)):
        ref = naive_attention(q[qsl[s]:qsl[s + 1]], ks[s], vs[s], scale, np.arange(c - n, c), window)
        np.testing.assert_allclose(out[qsl[s]:qsl[s + 1]], ref, rtol=1e-5, atol=1e-5)


def test_reshape_and_cache_writes_only_its_slots():
    rng = np.random.default_rng(0)
    kv = rng.standard_normal((6, 3, 2, 2, 8, 16), dtype=np.float32)
    before = kv.copy()
    k = rng.standard_normal((4, 2, 16), dtype=np.float32)
    v = rng.standard_normal((4, 2, 16), dtype=np.float32)
    slots = np.array([5, 8 * 3 + 7, -1, 8 * 5], np.int64)
    cpu.reshape_and_cache(k, v, kv, 2, slots)
    expect = before.copy()
    for t, s in enumerate(slots):
        if s >= 0:
            expect[s // 8, 2, 0, :, s % 8] = k[t]
            expect[s // 8, 2, 1, :, s % 8] = v[t]
    np.testing.assert_array_equal(kv, expect)


def test_copy_and_swap_blocks():
    rng = np.random.default_rng(1)
    kv = rng.standard_normal((5, 2, 2, 1, 8, 4), dtype=np.float32)
    before = kv.copy()
    cpu.copy_blocks(kv, [(0, 3), (2, 4)])
    np.testing.assert_array_equal(kv[3], before[0])
    np.testing.assert_array_equal(kv[4], before[2])
    np.testing.assert_array_equal(kv[:3], before[:3])
    host = np.full((3, 2, 2, 1, 8, 4), np.nan, np.float32)
    cpu.swap_blocks(kv, host, [(1, 0), (4, 2)])
    np.testing.assert_array_equal(host[0], kv[1])
    np.testing.assert_array_equal(host[2], kv[4])
    assert np.isnan(host[1]).all()


def test_norms_and_activations():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((5, 32), dtype=np.float32)
    w = rng.standard_normal(32, dtype=np.float32)
    b = rng.standard_normal(32, dtype=np.float32)
    x64 = x.astype(np.float64)
    np.testing.assert_allclose(cpu.rms_norm(x, w, 1e-5), x64 / np.sqrt((x64 ** 2).mean(-1, keepdims=True) + 1e-5) * w, rtol=1e-5)
    ln = (x64 - x64.mean(-1, keepdims=True)) / np.sqrt(x64.var(-1, keepdims=True) + 1e-5) * w + b
    np.testing.assert_allclose(cpu.layer_norm(x, w, b, 1e-5), ln, rtol=1e-4, atol=1e-5)
    r = rng.standard_normal((5, 32), dtype=np.float32)
    xs, rs = x.copy(), r.copy()
    cpu.fused_add_rms_norm(xs, rs, w, 1e-5)
    np.testing.assert_allclose(rs, x + r, rtol=1e-6)
    np.testing.assert_allclose(xs, cpu.rms_norm(x + r, w, 1e-5), rtol=1e-5)
    g, u = x64[:, :16], x64[:, 16:]
    np.testing.assert_allclose(cpu.silu_and_mul(x), g / (1 + np.exp(-g)) * u, rtol=1e-5, atol=1e-6)
    import math
    gelu_ref = np.vectorize(lambda t: 0.5 * t * (1 + math.erf(t / math.sqrt(2))))(x64)
    np.testing.assert_allclose(cpu.gelu(x), gelu_ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(cpu.relu(x), np.maximum(x, 0))


@pytest.mark.parametrize("is_neox", [True, False])
def test_rotary_embedding(is_neox):
    from model_impl.layers import rope_cos_sin_cache
    rng = np.random.default_rng(3)
    T, H, Hk, D = 6, 4, 2, 16
    cache = rope_cos_sin_cache(D, 64, 10000.0)
    pos = rng.integers(0, 64, T)
    q = rng.standard_normal((T, H, D), dtype=np.float32)
    k = rng.standard_normal((T, Hk, D), dtype=np.float32)
    q0, k0 = q.copy(), k.copy()
    cpu.rotary_embedding(pos, q, k, cache, is_neox)
    # Reference via complex multiplication: pair (a, b) -> (a + ib) * e^{i pos f}.
    f = 10000.0 ** (-np.arange(0, D, 2) / D)
    rot = np.exp(1j * pos[:, None] * f[None, :])[:, None, :]
    for x0, x in ((q0, q), (k0, k)):
        if is_neox:
            z = (x0[..., : D // 2] + 1j * x0[..., D // 2:]) * rot
            ref = np.concatenate([z.real, z.imag], -1)
        else:
            z = (x0[..., 0::2] + 1j * x0[..., 1::2]) * rot
            ref = np.stack([z.real, z.imag], -1).reshape(x0.shape)
        np.testing.assert_allclose(x, ref, rtol=1e-4, atol=1e-5)


def test_sliding_window_changes_the_output_and_bad_windows_are_refused():
    """A window shorter than the context must matter (else the test above proves nothing), and a
    window of 0, a negative or a fractional one is a one-line ValueError."""
    rng = np.random.default_rng(9)
    kv = rng.standard_normal((4, 1, 2, 2, 16, 8), dtype=np.float32)
    q = rng.standard_normal((1, 4, 8), dtype=np.float32)
    args = (q, kv, 0, np.array([[0, 1, 2]], np.int32), np.array([40], np.int32), np.array([0, 1], np.int32), 0.3)
    full, windowed = cpu.paged_attention(*args), cpu.paged_attention(*args, sliding_window=8)
    assert np.abs(full - windowed).max() > 1e-2
    np.testing.assert_array_equal(cpu.paged_attention(*args, sliding_window=40), full)
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="sliding_window must be None or a positive integer"):
            cpu.paged_attention(*args, sliding_window=bad)


def test_gelu_tanh_and_mul_is_geglu():
    rng = np.random.default_rng(4)
    x = (rng.standard_normal((5, 24)) * 2).astype(np.float32)
    g, u = x[:, :12].astype(np.float64), x[:, 12:].astype(np.float64)
    want = 0.5 * g * (1 + np.tanh(np.sqrt(2 / np.pi) * (g + 0.044715 * g ** 3))) * u
    np.testing.assert_allclose(cpu.gelu_tanh_and_mul(x), want, rtol=1e-5, atol=1e-6)
