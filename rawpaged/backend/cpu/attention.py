"""Paged attention and the cache write on the CPU (Numba), the twins of kernels_cuda/paged_attention.cu
and kernels_cuda/cache_ops.cu: the same arguments and the same block-major layout (base.py):

  kv_cache [num_blocks, num_layers, 2, num_kv_heads, block_size, head_dim]  float32, or bfloat16 /
           float16 held as uint16 bits (lowp.py): keys and values are widened to float32 as read
  q, out   [T, num_heads, head_dim] float32

One task = (sequence s, KV head, a tile of up to Q_TILE of s's query tokens). The task keeps, for
each of its rows (query token x the `group` query heads that share the KV head), flash-attention's
running max m, running sum l and the output accumulator acc, and walks the blocks of s's context
that any of its rows can see, one block (block_size keys) at a time:

    S[r, j]  = scale * q_r . k_j              (K and V widened to float32 as read; the block stays in
                                              L1 while the task's rows use it)            masked to -inf where key j is not visible to row r
                                              (causal: j > pos_r; sliding window: j <= pos_r - W)
    m_new    = max(m_r, max_j S[r, j]);  c = exp(m_r - m_new)
    p[r, j]  = exp(S[r, j] - m_new);  l_r = l_r * c + sum_j p[r, j]
    acc_r    = acc_r * c + sum_j p[r, j] * v_j

A decode token (a tile of one token) takes _attend_one instead: two passes over its context (all
scores, one softmax, all values), its `group` heads sharing every K/V read. Whole blocks of 16
keys go through simd.py's intrinsics (16 dot products at once; 16 values into the accumulator at
once); partial blocks (the newest, a window's first) through the plain loops. A prefill tile of
Q_TILE tokens reads each block once for all of its Q_TILE * group rows, instead of once per token
(the per-token loop this replaces read the whole context again for every token of the prompt).
"""
from __future__ import annotations


import numpy as np
from numba import njit, prange

from rawpaged.backend.cpu import lowp
from rawpaged.backend.cpu.jit import serial_and_parallel
from rawpaged.backend.cpu.simd import (SCORES16_BF16, SCORES16_F16, SCORES16_F32, VALUES16_BF16, VALUES16_F16,
                                       VALUES16_F32)
from rawpaged.backend.cpu.elementwise import exp_nonpos as _exp

Q_TILE = 16                      # query tokens per task (prefill); decode tasks have one
_FAST = {"reassoc", "contract", "nsz", "arcp"}
# NOTE: fast-math without 'nnan'/'ninf': masked scores are -inf and exp(-inf) must stay 0.


@njit(cache=True, nogil=True, error_model="numpy")
def _tasks(seq_lens, query_start_loc, q_tile):
    """(sequence, first query row, rows) of every query tile, in batch order."""
    num_seqs = seq_lens.shape[0]
    n = 0
    for s in range(num_seqs):
        n += (query_start_loc[s + 1] - query_start_loc[s] + q_tile - 1) // q_tile
    seq = np.empty(n, np.int64)
    row0 = np.empty(n, np.int64)
    rows = np.empty(n, np.int64)
    i = 0
    for s in range(num_seqs):
        q0, q1 = query_start_loc[s], query_start_loc[s + 1]
        for t in range(q0, q1, q_tile):
            seq[i], row0[i], rows[i] = s, t, min(q_tile, q1 - t)
            i += 1
    return seq, row0, rows


@njit(inline="always", error_model="numpy")
def _prefetch_block(kv, kind, phys, layer, kvh):
    """Ask for the K and V rows of one block (2 x block_size x head_dim elements, each contiguous)
    ahead of their use. NOTE: a sequence's blocks are scattered over the pool, and a block of one
    head is 2 KB (bfloat16, head_dim 64): too short a run for the hardware prefetcher, which left
    the decode attention waiting on memory at a fifth of the copy rate.
    NOTE: into L2 (prefetcht1), not L1: the block's 64 lines at once into L1 held up the loads of the
    block being computed once the KV came from memory (48 sequences x 1,024 keys: 0.8x in a
    throwaway harness, against 1.04-1.28x into L2; bench/RESULTS.md)."""
    step = 16 if kind == lowp.F32 else 32          # elements per 64-byte line
    for c in range(2):
        rows = kv[phys, layer, c, kvh]             # [block_size, head_dim]
        for j in range(rows.shape[0]):             # NOTE: no e // D, e % D: two divisions per line
            for d in range(0, rows.shape[1], step):
                lowp.prefetch_l2(rows, j, d)


@njit(inline="always", error_model="numpy")
def _scores16(qs, g, keys, sc, r, o, kind):
    """sc[r, o:o+16] = qs[g] . widen(keys[j]) for the 16 keys of a block (simd.py; unchecked
    indices: the callers below stay inside sc)."""
    if kind == lowp.BF16:
        SCORES16_BF16(qs, g, keys, sc, r, o)
    elif kind == lowp.F16:
        SCORES16_F16(qs, g, keys, sc, r, o)
    else:
        SCORES16_F32(qs, g, keys, sc, r, o)


@njit(inline="always", error_model="numpy")
def _values16(p, g, o, vals, acc, kind):
    """acc[g] += sum_j p[g, o + j] * widen(vals[j]) over the 16 values of a block (simd.py)."""
    if kind == lowp.BF16:
        VALUES16_BF16(p, g, o, vals, acc)
    elif kind == lowp.F16:
        VALUES16_F16(p, g, o, vals, acc)
    else:
        VALUES16_F32(p, g, o, vals, acc)


@njit(fastmath=_FAST, inline="always", error_model="numpy")
def _attend_tile(q, kv, kind, layer, block_tables, s, kvh, row0, n_tok, first_pos, scale, window, out):
    """The attention of query tokens row0..row0+n_tok-1 of sequence s (positions first_pos..) for the
    query heads of KV head kvh. Writes out[row0:row0+n_tok, those heads]."""
    num_heads, head_dim = q.shape[1], q.shape[2]
    num_kv_heads, block_size = kv.shape[3], kv.shape[4]
    group = num_heads // num_kv_heads
    R = n_tok * group                              # rows: token-major, then the group's heads
    qs = np.empty((R, head_dim), np.float32)       # scaled queries
    for i in range(n_tok):
        for g in range(group):
            for d in range(head_dim):
                qs[i * group + g, d] = q[row0 + i, kvh * group + g, d] * scale
    m = np.full(R, -np.inf, np.float32)
    l = np.zeros(R, np.float32)
    acc = np.zeros((R, head_dim), np.float32)
    P = np.empty((R, block_size), np.float32)      # row r's scores in the block, then exp(score - m_r)
    kf = np.empty((block_size, head_dim), np.float32)    # the block's keys and values, widened ONCE
    vf = np.empty((block_size, head_dim), np.float32)    # for all R rows (not once per row)
    whole_blocks = block_size == 16 and head_dim % 16 == 0

    last_pos = first_pos + n_tok - 1
    lo = max(0, first_pos - window + 1) if window > 0 else 0   # the first key any row sees
    for blk in range(lo // block_size, last_pos // block_size + 1):
        phys = block_tables[s, blk]                # logical block -> physical block
        if blk < last_pos // block_size:
            _prefetch_block(kv, kind, block_tables[s, blk + 1], layer, kvh)
        j0 = blk * block_size                      # position of the block's first key
        nk = min(block_size, last_pos + 1 - j0)    # keys of this block that exist yet
        for j in range(nk):
            for d in range(head_dim):
                kf[j, d] = lowp.widen(kv[phys, layer, 0, kvh, j, d], kind)
                vf[j, d] = lowp.widen(kv[phys, layer, 1, kvh, j, d], kind)
        for r in range(R):
            pos = first_pos + r // group
            j_hi = min(nk, pos - j0 + 1)           # causal: keys j0 .. pos
            j_lo = max(0, pos - window + 1 - j0) if window > 0 else 0
            if j_hi <= j_lo:
                continue                           # nothing of this block is visible to row r
            whole = whole_blocks and j_lo == 0 and j_hi == 16
            m_blk = np.float32(-np.inf)
            if whole:                              # the whole block: simd.py's 16 dots
                _scores16(qs, r, kf, P, r, 0, lowp.F32)
                for j in range(16):
                    m_blk = max(m_blk, P[r, j])
            else:
                for j in range(j_lo, j_hi):        # P[r, j] = q_r . k_j
                    a = np.float32(0.0)
                    for d in range(head_dim):
                        a += qs[r, d] * kf[j, d]
                    P[r, j] = a
                    m_blk = max(m_blk, a)
            m_new = max(m[r], m_blk)
            c = _exp(m[r] - m_new)
            l_r = np.float32(0.0)
            for j in range(j_lo, j_hi):
                p = _exp(P[r, j] - m_new)
                P[r, j] = p
                l_r += p
            l[r] = l[r] * c + l_r
            m[r] = m_new
            for d in range(head_dim):
                acc[r, d] *= c
            if whole:                              # acc_r += sum_j p_j * v_j, 16 values at once
                _values16(P, r, 0, vf, acc, lowp.F32)
            else:
                for j in range(j_lo, j_hi):        # acc_r += p_j * v_j, vectorised over head_dim
                    p = P[r, j]
                    for d in range(head_dim):
                        acc[r, d] += p * vf[j, d]
    for r in range(R):
        inv = np.float32(1.0) / l[r]
        i, g = r // group, r % group
        for d in range(head_dim):
            out[row0 + i, kvh * group + g, d] = acc[r, d] * inv


@njit(fastmath=_FAST, inline="always", error_model="numpy")
def _attend_one(q, kv, kind, layer, block_tables, s, kvh, row, pos, scale, window, out):
    """The decode case of _attend_tile (one query token, at position pos): two passes over the
    context instead of the online softmax, so that nothing is rescaled per block and the exp runs
    over the whole row of scores at once.

        sc[g, j] = scale * q_g . k_j          pass 1: each key row is read once (from memory) for
                                              the `group` heads that share it (then from L1)
        p[g, j]  = exp(sc[g, j] - max_j sc[g]) , l_g = sum_j p[g, j]
        out_g    = sum_j p[g, j] v_j / l_g    pass 2: each value row likewise
    """
    num_heads, D = q.shape[1], q.shape[2]
    num_kv_heads, block_size = kv.shape[3], kv.shape[4]
    G = num_heads // num_kv_heads
    h0 = kvh * G                                   # the group's first query head
    lo = max(0, pos - window + 1) if window > 0 else 0   # first visible key
    n = pos + 1 - lo
    qs = np.empty((G, D), np.float32)              # [G, D] scaled queries
    for g in range(G):
        for d in range(D):
            qs[g, d] = q[row, h0 + g, d] * scale
    sc = np.empty((G, n), np.float32)              # [G, n] scores, then exp(score - max)
    last = pos // block_size
    whole_blocks = block_size == 16 and D % 16 == 0
    for blk in range(lo // block_size, last + 1):                  # pass 1: scores
        phys = block_tables[s, blk]
        if blk < last:                             # the next block's K and V (V: for pass 2)
            _prefetch_block(kv, kind, block_tables[s, blk + 1], layer, kvh)
        j0 = blk * block_size
        ja, jb = max(lo, j0) - j0, min(block_size, pos + 1 - j0)     # the block's visible keys
        if whole_blocks and ja == 0 and jb == 16:  # all 16 keys: simd.py's 16 dots at once
            keys = kv[phys, layer, 0, kvh]         # [16, D]
            for g in range(G):
                _scores16(qs, g, keys, sc, g, j0 - lo, kind)
            continue
        for j in range(ja, jb):
            for g in range(G):
                a = np.float32(0.0)
                for d in range(D):                 # vectorised; the row stays in L1 after g = 0
                    a += qs[g, d] * lowp.widen(kv[phys, layer, 0, kvh, j, d], kind)
                sc[g, j0 + j - lo] = a
    l = np.empty(G, np.float32)
    for g in range(G):                             # softmax numerators, vectorised over the row
        m = np.float32(-np.inf)
        for i in range(n):
            m = max(m, sc[g, i])
        t = np.float32(0.0)
        for i in range(n):
            e = _exp(sc[g, i] - m)
            sc[g, i] = e
            t += e
        l[g] = t
    acc = np.zeros((G, D), np.float32)             # [G, D] sum_j p[g, j] v_j
    for blk in range(lo // block_size, last + 1):                  # pass 2: values
        phys = block_tables[s, blk]
        j0 = blk * block_size
        ja, jb = max(lo, j0) - j0, min(block_size, pos + 1 - j0)
        if whole_blocks and ja == 0 and jb == 16:
            vals = kv[phys, layer, 1, kvh]         # [16, D]
            for g in range(G):
                _values16(sc, g, j0 - lo, vals, acc, kind)
            continue
        for j in range(ja, jb):
            for g in range(G):
                p = sc[g, j0 + j - lo]
                for d in range(D):
                    acc[g, d] += p * lowp.widen(kv[phys, layer, 1, kvh, j, d], kind)
    for g in range(G):
        inv = np.float32(1.0) / l[g]
        for d in range(D):
            out[row, h0 + g, d] = acc[g, d] * inv


# _attend_one for one KV storage kind each, compiled once (not inlined): the fused decode step's
# attention task (decode_step.py). NOTE: inlined there twice (serial and parallel loops) per kind,
# it made that compilation take minutes.
@njit(fastmath=_FAST, cache=True, nogil=True, error_model="numpy")
def attend_one_f32(q, kv, layer, block_tables, s, kvh, row, pos, scale, window, out):
    _attend_one(q, kv, lowp.F32, layer, block_tables, s, kvh, row, pos, scale, window, out)


@njit(fastmath=_FAST, cache=True, nogil=True, error_model="numpy")
def attend_one_bf16(q, kv, layer, block_tables, s, kvh, row, pos, scale, window, out):
    _attend_one(q, kv, lowp.BF16, layer, block_tables, s, kvh, row, pos, scale, window, out)


@njit(fastmath=_FAST, cache=True, nogil=True, error_model="numpy")
def attend_one_f16(q, kv, layer, block_tables, s, kvh, row, pos, scale, window, out):
    _attend_one(q, kv, lowp.F16, layer, block_tables, s, kvh, row, pos, scale, window, out)


@njit(inline="always", error_model="numpy")
def attend_one(q, kv, kind, layer, block_tables, s, kvh, row, pos, scale, window, out):
    """_attend_one through the compiled function of `kind` (a constant)."""
    if kind == lowp.BF16:
        attend_one_bf16(q, kv, layer, block_tables, s, kvh, row, pos, scale, window, out)
    elif kind == lowp.F16:
        attend_one_f16(q, kv, layer, block_tables, s, kvh, row, pos, scale, window, out)
    else:
        attend_one_f32(q, kv, layer, block_tables, s, kvh, row, pos, scale, window, out)


@njit(fastmath=_FAST, inline="always", error_model="numpy")
def rotary_cache_rows(positions, q, k, v, kv, kind, layer, slot_mapping, table, is_neox):
    """The twin of fused_ops.cu's rotary_cache: q [T, Hq, D] rotated in place; rotate(k) and v
    [T, Hkv, D] narrowed into kv[slot // bs, layer, 0/1, :, slot % bs, :] (slot < 0: padding,
    nothing stored). k is left as it was. q, k, v may be strided views of a fused qkv.
    A function of its own: the fused decode step (decode_step.py) runs it too."""
    block_size, head_dim = kv.shape[4], kv.shape[5]
    half = table.shape[1] // 2
    for t in range(q.shape[0]):
        p = positions[t]
        for h in range(q.shape[1]):                # q: pairs rotated in place
            for i in range(half):
                c, s = table[p, i], table[p, half + i]
                i1 = i if is_neox else 2 * i
                i2 = i + half if is_neox else 2 * i + 1
                a, b = q[t, h, i1], q[t, h, i2]
                q[t, h, i1] = a * c - b * s
                q[t, h, i2] = b * c + a * s
        slot = slot_mapping[t]
        if slot < 0:
            continue
        block = slot // block_size
        off = slot % block_size
        for h in range(k.shape[1]):
            for i in range(half):                  # k: rotated pairs straight into the cache
                c, s = table[p, i], table[p, half + i]
                i1 = i if is_neox else 2 * i
                i2 = i + half if is_neox else 2 * i + 1
                a, b = k[t, h, i1], k[t, h, i2]
                kv[block, layer, 0, h, off, i1] = lowp.narrow(a * c - b * s, kind)
                kv[block, layer, 0, h, off, i2] = lowp.narrow(b * c + a * s, kind)
            for d in range(2 * half, head_dim):   # partial rotary: the rest as it is
                kv[block, layer, 0, h, off, d] = lowp.narrow(k[t, h, d], kind)
            for d in range(head_dim):
                kv[block, layer, 1, h, off, d] = lowp.narrow(v[t, h, d], kind)


def _build(kind: int):
    """(serial, parallel) attention and the cache write for one KV storage kind.
    NOTE: the kind is a closure constant (as in gemm.py): each compilation holds one widening, and
    the loops over head_dim vectorise without a branch on the kind inside them."""

    def attend(q, kv, layer, block_tables, seq_lens, query_start_loc, scale, window, out):
        num_kv_heads = kv.shape[3]
        seq, row0, rows = _tasks(seq_lens, query_start_loc, Q_TILE)
        for task in prange(seq.shape[0] * num_kv_heads):
            tile, kvh = task // num_kv_heads, task % num_kv_heads
            s = seq[tile]
            q_len = query_start_loc[s + 1] - query_start_loc[s]
            # the new tokens are the last q_len of the context: row qsl[s] + i is at seq_lens[s] - q_len + i
            first_pos = seq_lens[s] - q_len + (row0[tile] - query_start_loc[s])
            if rows[tile] == 1:                    # a decode token (or a 1-token chunk)
                _attend_one(q, kv, kind, layer, block_tables, s, kvh, row0[tile], first_pos, scale,
                            window, out)
                continue
            _attend_tile(q, kv, kind, layer, block_tables, s, kvh, row0[tile], rows[tile], first_pos,
                         scale, window, out)

    def cache_write(k, v, kv, layer, slot_mapping):
        """kv[slot // bs, layer, 0/1, :, slot % bs, :] = k[t], v[t], narrowed to the storage kind.
        NOTE: serial: a few kilobytes per token, never worth a thread pool launch."""
        block_size = kv.shape[4]
        for t in range(k.shape[0]):
            slot = slot_mapping[t]
            if slot < 0:                           # padding token: nothing to store
                continue
            block = slot // block_size
            off = slot % block_size
            for h in range(k.shape[1]):
                for d in range(k.shape[2]):
                    kv[block, layer, 0, h, off, d] = lowp.narrow(k[t, h, d], kind)
                    kv[block, layer, 1, h, off, d] = lowp.narrow(v[t, h, d], kind)

    def rotary_cache(positions, q, k, v, kv, layer, slot_mapping, table, is_neox):
        rotary_cache_rows(positions, q, k, v, kv, kind, layer, slot_mapping, table, is_neox)

    # NOTE: two compilations of the attention (kept apart in Numba's cache: jit.py). Numba's thread
    # pool costs tens of microseconds per launch (far more when the cores are busy), which dominates
    # small decode batches; the serial one serves those.
    opts = dict(cache=True, fastmath=_FAST, nogil=True, error_model="numpy")
    return (*serial_and_parallel(attend, **opts), njit(**opts)(cache_write), njit(**opts)(rotary_cache))


_KERNELS = {kind: _build(kind) for kind in (lowp.F32, lowp.BF16, lowp.F16)}
PARALLEL_MIN_WORK = 1 << 15      # query-head x key pairs below which one thread is faster


def kernels(kind: int):
    """(serial attention, parallel attention, cache write, rotary + cache write) for a KV cache of
    storage `kind`."""
    return _KERNELS[kind]
