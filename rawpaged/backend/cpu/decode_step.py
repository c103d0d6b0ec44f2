"""A decode step's decoder stack in ONE compiled call on the CPU (issue 18): the CPU analogue of a
captured CUDA graph (rawpaged/worker/graph_runner.py).

A decode step of a small model is ~33 GEMVs plus ~50 small ops, each called from Python: at batch 1
the Python between them (~0.3-0.5 ms for 8 layers) and one thread-pool fork/join per op cost as much
as a fifth of the step. Here one Numba call runs every layer of a LLaMA-family stack for a batch of
decode rows (each row one new token of its own sequence):

    for l in layers:
        x = rms_norm(h + res)              res += h (layer 0: res = h)      [T, H]
        qkv = x @ Wqkv[l]^T                                                 [T, (Hq + 2 Hkv) D]
        q = rope(q); cache[slot] = rope(k), v                               (rotary_cache_rows)
        a = paged_attention(q, cache)      one task per (sequence, KV head) [T, Hq, D]
        h = a @ Wo[l]^T                                                     [T, H]
        x = rms_norm(h + res)              res += h
        h = (silu(x @ Wgate[l]^T) * (x @ Wup[l]^T)) @ Wdown[l]^T            [T, H]
    h = rms_norm(h + res) * final_norm                                     [T, H]
    return logits = that @ lm_head^T                                     [T, V]

with the kernels of the per-op path called from inside (gemm.linear_team, attention.attend_one and
rotary_cache_rows, elementwise's row bodies): the same code, so the same sums. Weights come stacked
per kind ([L, out, in], `DecoderStack`), so one array argument carries every layer.

The threads: ONE parallel region for the whole step, a team of workers (team.py) that walk the ops
above as phases and split each into chunks claimed from a shared counter: a GEMM's output ranges,
the rows of a norm / rotary / activation, the attention's (sequence, KV head) tasks. No Python and
no fork/join between ops. NOTE: why: memory-bound GEMVs read ~1.5x faster on two threads than one,
but a parallel region per GEMV (Numba waking its sleeping workers, then joining them) cost about
what that saved; one region a step keeps the gain (bench/team_step.py, bench/RESULTS.md, issue 18).
One worker runs the same code alone at the serial loop's speed.

Scratch: one float32 buffer and one uint16 buffer (bfloat16 activations for vdpbf16ps) owned by the
caller and carved here, so a test can poison them.

NOTE: Numba's on-disk cache keys a kernel by ITS file only, and this one inlines code from gemm.py,
attention.py, elementwise.py, lowp.py, simd.py, bf16dot.py and team.py: the kernels are closures
that capture a hash of those files' bytes (Numba keys a closure by its captured values), so an edit
to any of them recompiles this step instead of running stale code from the cache.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from numba import njit, prange

from rawpaged.backend.cpu import lowp, team
from rawpaged.backend.cpu.attention import attend_one, rotary_cache_rows
from rawpaged.backend.cpu.elementwise import add_rms_norm_row, greedy_row, rms_norm_row, silu_and_mul_row
from rawpaged.backend.cpu.gemm import ROUNDS_BF16_ACTIVATIONS, dynamic_schedule, linear_team

_FAST = {"reassoc", "contract", "nsz", "arcp"}
_HERE = Path(__file__).resolve().parent
_DEPS = ("gemm.py", "attention.py", "elementwise.py", "lowp.py", "simd.py", "bf16dot.py", "team.py")
_DEPS_HASH = hashlib.sha256(b"".join((_HERE / f).read_bytes() for f in _DEPS)).hexdigest()


@njit(fastmath=_FAST, inline="always", error_model="numpy")
def _add_norm_rows(h, res, w, eps, sync, p):
    """Phase p of the team: h = rms_norm(res += h) * w, a row a chunk."""
    T = h.shape[0]
    while True:
        t = team.claim(sync, p, T)
        if t < 0:
            break
        add_rms_norm_row(h, res, t, w, eps)
        team.finish(sync, p)
    team.wait(sync, p, T)


def _build(wkind: int, kvkind: int, bf16: bool, deps: str):
    """The step's kernel for weights stored as `wkind` and a KV cache stored as `kvkind` (closure
    constants, as gemm.py's: each compilation holds one widening); bf16: vdpbf16ps GEMMs."""

    def team_stack(h, positions, slots, tables, seq_lens, kv, in_norm, post_norm, w_qkv, w_o, w_gate_up, w_down,
                   final_norm, lm_head, logits, tokens, logprobs, embed, block_size, interrupt, done, cos_sin, windows,
                   chunks, sync, eps, scale, fbuf, xbuf):
        """h [T, H] float32 embeddings -> [T, H] final normalised rows (h or a view of fbuf), and
        logits [T, V] = those rows @ lm_head [V, H]^T (stored as the layers' weights; V = 0: no LM
        head), by a team of chunks[5] workers. Each op is a phase whose chunks go to whichever
        worker claims them: GEMM output ranges (chunks[0:5]: qkv, o, gate_up, down, LM head), rows,
        (sequence, KV head) attention tasks. sync: team.new_sync(team_phases(L)); fbuf, xbuf:
        DecoderStack.scratch_sizes(T, workers).
        Multi-step (tokens [S, T] with S > 0; else tokens [0, T] and one step, nothing sampled): S
        steps in this one call, each ending with a greedy phase (a row a chunk: the argmax of the
        row's logits into tokens[step], its logprob into logprobs[step]) that also prepares the
        row's next step: h[t] = embed[token] (embed stored as the layers' weights), its position,
        slot (from tables and block_size) and length advanced by one, in place. The call stops after
        the step in which interrupt[0] was found set (another thread may set it: a request arrived);
        done[0]: the steps run, done [1 + steps] (the team's per-step decisions)."""
        if deps == "":
            return h
        T, H = h.shape
        L = w_qkv.shape[0]
        nkv, D = kv.shape[3], kv.shape[5]
        n_qkv, n_o, n_gu, n_i = w_qkv.shape[1], w_o.shape[2], w_gate_up.shape[1], w_down.shape[2]
        nq = n_qkv // D - 2 * nkv
        # the shared scratch, carved: res, x [T, H] | qkv [T, n_qkv] | attn [T, nq D] | gu [T, 2I] | act [T, I]
        o = 0
        res = fbuf[o:o + T * H].reshape(T, H)
        o += T * H
        x = fbuf[o:o + T * H].reshape(T, H)
        o += T * H
        qkv = fbuf[o:o + T * n_qkv].reshape(T, n_qkv)
        o += T * n_qkv
        attn = fbuf[o:o + T * n_o].reshape(T, nq, D)
        o += T * n_o
        gu = fbuf[o:o + T * n_gu].reshape(T, n_gu)
        o += T * n_gu
        act = fbuf[o:o + T * n_i].reshape(T, n_i)
        q3 = qkv.reshape(T, n_qkv // D, D)
        q, k, v = q3[:, :nq], q3[:, nq:nq + nkv], q3[:, nq + nkv:]
        attn2 = attn.reshape(T, n_o)
        sample = tokens.shape[0] > 0
        steps = max(1, tokens.shape[0])
        if sync.shape[0] < 2 * steps * (9 * L + 2 + sample):     # team_phases (written unchecked)
            raise ValueError("team_stack: sync holds fewer counters than the step's phases")
        workers = chunks[5]
        nx = T * max(H, max(n_o, n_i))             # each worker's own bfloat16 copy of a GEMM's x
        for wk in prange(workers):
            xb = xbuf[wk * nx:(wk + 1) * nx]
            xb_h, xb_o, xb_i = xb[:T * H].reshape(T, H), xb[:T * n_o].reshape(T, n_o), xb[:T * n_i].reshape(T, n_i)
            p = 0                                  # the phase: every worker counts the same phases
            for step in range(steps):
                hh, xx = h, x                              # this worker's names for the two [T, H] buffers
                while True:                                # res = h; x = rms_norm(res)      (a row a chunk)
                    t = team.claim(sync, p, T)
                    if t < 0:
                        break
                    for i in range(H):
                        res[t, i] = hh[t, i]
                    rms_norm_row(res, t, in_norm[0], eps, xx)
                    team.finish(sync, p)
                team.wait(sync, p, T)
                p += 1
                for layer in range(L):
                    if layer > 0:                          # x = rms_norm(res += h): into h, then swap names
                        _add_norm_rows(hh, res, in_norm[layer], eps, sync, p)
                        p += 1
                        xx, hh = hh, xx
                    linear_team(xx, w_qkv[layer], qkv, xb_h, sync, p, chunks[0], wkind, bf16)
                    p += 1
                    while True:                            # rotary; K, V into the cache      (a row a chunk)
                        t = team.claim(sync, p, T)
                        if t < 0:
                            break
                        rotary_cache_rows(positions[t:t + 1], q[t:t + 1], k[t:t + 1], v[t:t + 1], kv, kvkind, layer,
                                          slots[t:t + 1], cos_sin, True)
                        team.finish(sync, p)
                    team.wait(sync, p, T)
                    p += 1
                    window = windows[layer]
                    while True:                            # attention: a (sequence, KV head) a chunk
                        task = team.claim(sync, p, T * nkv)
                        if task < 0:
                            break
                        s, kvh = task // nkv, task % nkv
                        attend_one(q, kv, kvkind, layer, tables, s, kvh, s, seq_lens[s] - 1, scale, window, attn)
                        team.finish(sync, p)
                    team.wait(sync, p, T * nkv)
                    p += 1
                    linear_team(attn2, w_o[layer], hh, xb_o, sync, p, chunks[1], wkind, bf16)
                    p += 1
                    _add_norm_rows(hh, res, post_norm[layer], eps, sync, p)  # h = rms_norm(res += h)
                    p += 1
                    linear_team(hh, w_gate_up[layer], gu, xb_h, sync, p, chunks[2], wkind, bf16)
                    p += 1
                    while True:                            # act = silu(gate) * up              (a row a chunk)
                        t = team.claim(sync, p, T)
                        if t < 0:
                            break
                        silu_and_mul_row(gu, t, act)
                        team.finish(sync, p)
                    team.wait(sync, p, T)
                    p += 1
                    linear_team(act, w_down[layer], hh, xb_i, sync, p, chunks[3], wkind, bf16)
                    p += 1
                _add_norm_rows(hh, res, final_norm, eps, sync, p)
                p += 1
                linear_team(hh, lm_head, logits, xb_h, sync, p, chunks[4], wkind, bf16)
                p += 1
                if sample:                                 # greedy; the row's next input  (a row a chunk)
                    while True:
                        t = team.claim(sync, p, T)
                        if t < 0:
                            break
                        tok, lp = greedy_row(logits, t)
                        tokens[step, t], logprobs[step, t] = tok, lp
                        if t == 0:                         # the team's decision, read after the phase
                            done[0] = step + 1
                            done[1 + step] = team.load_acquire(interrupt, 0)
                        if step + 1 < steps:               # NOTE: the LM head's phase is over: h is free
                            for i in range(H):
                                h[t, i] = lowp.widen(embed[tok, i], wkind)
                            pos = positions[t] + 1
                            positions[t], seq_lens[t] = pos, pos + 1
                            slots[t] = tables[t, pos // block_size] * block_size + pos % block_size
                        team.finish(sync, p)
                    team.wait(sync, p, T)
                    p += 1
                    if done[1 + step] != 0:                # interrupted: every worker stops here
                        break
        return h if (L - 1) % 2 == 0 else x       # where the last layer's rows are (L - 1 swaps)

    return njit(fastmath=_FAST, parallel=_PRANGE_ONLY, cache=True, nogil=True, error_model="numpy")(team_stack)


# NOTE: a parallel region for the prange loop ONLY (the team's): with Numba's default parallel
# options, the np.zeros of each attention task (_attend_one's accumulator) became a parallel region
# of its own, a thread-pool launch per (sequence, KV head, layer): 1,536 per step at 48 sequences,
# which made the step 2.5x slower than the per-op path.
_PRANGE_ONLY = dict(prange=True, numpy=False, comprehension=False, reduction=False, inplace_binop=False,
                    setitem=False, stencil=False, fusion=False)
_KERNELS: dict = {}
CHUNKS_PER_WORKER = 8     # a GEMM's chunks per worker of the team (2-32 measured alike at batch 1, 2 threads)


def kernel(wkind: int, kvkind: int):
    key = (wkind, kvkind)
    fn = _KERNELS.get(key)
    if fn is None:
        bf16 = wkind == lowp.BF16 and ROUNDS_BF16_ACTIVATIONS
        fn = _KERNELS[key] = _build(wkind, kvkind, bf16, _DEPS_HASH)
    return fn


@dataclass
class DecoderStack:
    """A LLaMA-family decoder's layers stacked per kind (what the fused step takes).

    in_norm, post_norm [L, H] float32 | qkv [L, (Hq + 2 Hkv) D, H] | o [L, H, Hq D] |
    gate_up [L, 2I, H] | down [L, H, I] (stored float32, or bfloat16 / float16) | final_norm [H] |
    windows int64 [L] (0: no sliding window) | eps, scale."""
    in_norm: np.ndarray
    post_norm: np.ndarray
    qkv: np.ndarray
    o: np.ndarray
    gate_up: np.ndarray
    down: np.ndarray
    final_norm: np.ndarray
    windows: np.ndarray
    eps: float
    scale: float

    def __post_init__(self):
        # NOTE: what every call passes, made once: the kernels read 16-bit weights as uint16 bits
        self.bits = tuple(lowp.bits(w) for w in (self.qkv, self.o, self.gate_up, self.down))
        self.wkind = lowp.kind_of(self.qkv.dtype)
        self._chunks: dict[tuple, np.ndarray] = {}

    def scratch_sizes(self, rows: int, workers: int = 1) -> tuple[int, int]:
        """(float32, uint16) scratch elements for `rows` decode rows and a team of `workers`."""
        H, n_qkv, n_o, n_gu, n_i = (self.qkv.shape[2], self.qkv.shape[1], self.o.shape[2], self.gate_up.shape[1],
                                    self.down.shape[2])
        return rows * (2 * H + n_qkv + n_o + n_gu + n_i), workers * rows * max(H, n_o, n_i)

    def chunks(self, workers: int, lm_rows: int) -> np.ndarray:
        """team_stack's GEMM chunks for qkv, o, gate_up, down (CHUNKS_PER_WORKER per worker, at
        least 4 outputs each) and an LM head of lm_rows (4x as many: it is 5-30x their size), then the
        team's size."""
        t = self._chunks.get((workers, lm_rows))
        if t is None:
            n = CHUNKS_PER_WORKER * workers
            t = self._chunks[(workers, lm_rows)] = np.array(
                [min((w.shape[1] + 3) // 4, n) for w in (self.qkv, self.o, self.gate_up, self.down)]
                + [min((lm_rows + 3) // 4, 4 * n), workers], np.int64)
        return t


def stack_layers(layers: list[dict], names: tuple[str, ...]) -> list[np.ndarray]:
    """Stack each named weight of every layer into one [L, ...] array and rebind the layers' entries
    to views of it (the weights are held once, and the per-op path reads the same memory).
    NOTE: copied layer by layer, so the per-layer arrays are freed as they go (peak: one layer)."""
    out = []
    for name in names:
        first = layers[0][name]
        stacked = np.empty((len(layers),) + first.shape, first.dtype)
        for i, layer in enumerate(layers):
            stacked[i] = layer[name]
            layer[name] = stacked[i]
        out.append(stacked)
    return out


def run_stack(st: DecoderStack, h, positions, slot_mapping, block_tables, seq_lens, kv_cache, cos_sin, fbuf,
              xbuf, lm_head=None, steps: int = 0, embed=None, block_size: int = 0, interrupt=None):
    """The fused step over T decode rows (row s: sequence s's one new token; h [T, H] its embedding,
    overwritten) -> ([T, H] final rows, valid until the next call: they may be fbuf's; logits [T, V]
    = rows @ lm_head^T, or None: no lm_head given, or one stored unlike the layers). fbuf, xbuf: at
    least scratch_sizes(T, team_size()) elements.
    steps > 0 (multi-step, greedy): `steps` decode steps in the one call, each row taking its own
    argmax as its next input (embed: the embedding table, stored as the layers' weights; the block
    tables must already hold every position written) -> (tokens int64 [steps, T], logprobs float32
    [steps, T]) instead; positions, slot_mapping and seq_lens are advanced in place. interrupt: an
    int64 [1] another thread may set to stop the call after its current step (fewer rows returned)."""
    fn = kernel(st.wkind, lowp.kind_of(kv_cache.dtype))
    w_qkv, w_o, w_gate_up, w_down = st.bits
    workers = team_size()
    head = lm_head is not None and lowp.kind_of(lm_head.dtype) == st.wkind
    lm = lowp.bits(lm_head) if head else w_qkv[0, :0]       # no LM head: [0, H] (no chunks)
    T = h.shape[0]
    logits = np.empty((T, lm.shape[0]), np.float32)
    if steps > 0:
        if not head or embed is None or lowp.kind_of(embed.dtype) != st.wkind or block_size <= 0:
            raise ValueError("run_stack: multi-step needs the LM head and the embedding table stored as the "
                             "layers' weights, and the cache's block size")
        table = np.ascontiguousarray(lowp.bits(embed))
    else:
        table = w_qkv[0, :0]
    tokens, logprobs = np.empty((steps, T), np.int64), np.empty((steps, T), np.float32)
    if interrupt is None:
        interrupt = np.zeros(1, np.int64)
    done = np.zeros(1 + steps, np.int64)
    sync = team.new_sync(max(1, steps) * (team_phases(st.qkv.shape[0]) + (steps > 0)))
    rows = fn(h, positions, slot_mapping, block_tables, seq_lens, lowp.bits(kv_cache), st.in_norm, st.post_norm,
              w_qkv, w_o, w_gate_up, w_down, st.final_norm, lm, logits, tokens, logprobs, table, np.int64(block_size),
              interrupt, done, cos_sin, st.windows, st.chunks(workers, lm.shape[0]), sync, np.float32(st.eps), np.float32(st.scale),
              fbuf, xbuf)
    if steps > 0:
        return tokens[:done[0]], logprobs[:done[0]]
    return rows, (logits if head else None)


def team_size() -> int:
    """Workers of a step's team: every Numba thread (one: the serial loop)."""
    return dynamic_schedule()


def team_phases(layers: int) -> int:
    """The phases of one step: the first norm, 9 per layer (8 in the first: its input norm is the
    first norm), the final norm, the LM head (a multi-step call adds a greedy phase to each step)."""
    return 9 * layers + 2
