"""The sampler: a batch of logits rows -> one token per row, with the logprobs asked for.

API (array-module generic: `xp` is numpy on the CPU backend, cupy on the GPU backend)
    rows = [SamplingRow(params, prompt_token_ids, output_token_ids, generator, num_logprobs), ...]
    sampler = Sampler(xp, seed=0)
    results = sampler(logits, rows, mask)      # logits[B, V] -> list[SampleResult], one per row;
                                               # mask: a TokenMask for the constrained rows, or None
    lps, tops = sampler.logprobs(logits, ids, num_top)
                                               # prompt logprobs: logits[T, V], next tokens ids[T]
                                               # -> host lps[T], per row {id: logprob}
    values, ids = sampler.topk_logprobs(logits, k, mask)   # beam search: host [B, k] each, best first
    processed = process_logits(xp, logits, rows)     # logit_bias + penalties only, on a copy
    allowed = unpack_mask(xp, bits, V)         # packed bitmask [C, W] -> device bool [C, V]
    apply_mask(xp, logits, mask)               # in place: -inf where the TokenMask forbids
    verify_for_vocab(params, vocab_size)       # the engine calls it once at add_request

What happens to a row, in vLLM's order:
  0. structured outputs: tokens the row's grammar forbids get -inf (TokenMask: a packed bitmask the
     grammar engine filled for the whole batch, unpacked and applied in one vectorised where()).
     A constrained row can never come out with a forbidden token: one whose rounding would pick
     one (a parallel scan's cumsum) gets its best allowed token instead.
  1. logit_bias is added.
  2. repetition penalty (HF / CTRL): every token seen in prompt + output has its logit divided by
     the penalty when positive, multiplied by it otherwise.
  3. frequency and presence penalties (OpenAI), over output tokens only:
     logit -= frequency_penalty * count + presence_penalty * (count > 0).
  4. temperature; below 1e-5 the row is greedy: argmax of the processed logits, lowest id on ties
     (top_k / top_p / min_p are then moot).
  5. top_k (tokens tied with the k-th logit are kept), then top_p on the top-k distribution
     renormalized (the smallest most-likely prefix whose mass reaches top_p), then min_p
     (prob >= min_p * max prob).
  6. inverse-CDF sampling with ONE uniform per row, drawn from the row's own generator (a seeded
     request) or else from the sampler's: sort descending (stable), cumsum, first index whose
     cumsum exceeds u * total. Rows with no top_k / top_p / min_p skip the sort and walk the CDF in
     token-id order: the same distribution, and the sort is most of the CPU cost.

Logprobs (SampleResult.logprob, top_logprobs, prompt logprobs, topk_logprobs) are log_softmax of
the model's RAW logits, before bias, penalties and temperature: what the model itself believes, as
vLLM v1 reports by default ("raw_logprobs"). Beam search gets the same raw scores; an engine that
wants penalised beams can pass `process_logits(...)` to topk_logprobs instead. On a constrained
row the normalizer is still the whole vocabulary's (an allowed token's logprob is the number it
has unconstrained), and forbidden tokens are -inf: they never rank among the top-N (unless fewer
tokens are allowed) nor among a beam's candidates (Hugging Face's constrained beam search: masked
log_softmax, not renormalized).

NOTE: seeded requests are batch-invariant: every step works on its own row only (per-row sort,
cumsum and reductions), the path a row takes depends on its own params only, and its uniform comes
from its own generator; a seeded row consumes one draw per sampled (non-greedy) step.

Host round trips (issue 13): greedy, temperature and top-k / top-p / min-p all run on the device;
the host waits once per step, for ONE device->host copy of the chosen ids and their logprobs
(stacked), plus the top-N where asked for. Host->device: nothing for an all-greedy batch without
bias or penalties (a batch whose rows all take one path is never gathered or scattered by row
index); otherwise the rows' sampling params and uniforms in one upload ([5, S]: temperature, top_k,
top_p, min_p, uniform), plus small index arrays for bias, penalties and mixed paths.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from rawpaged.errors import RawpagedError
from rawpaged.sampling_params import SamplingParams


@dataclass
class SamplingRow:
    """One logits row to sample from."""
    params: SamplingParams
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    generator: np.random.Generator | None = None   # the request's seeded one; None: the sampler's
    num_logprobs: int | None = None                # top-N logprobs wanted with the chosen token


@dataclass
class TokenMask:
    """The batch's structured-output constraint: which rows, and what each may sample."""
    rows: list[int]          # indices into the batch (sorted)
    bits: np.ndarray         # host int32 [len(rows), ceil(V/32)]: bit t % 32 of word t // 32 set =
                             # token t allowed (llguidance's layout); words past V are ignored


@dataclass
class SampleResult:
    token_id: int
    logprob: float                                 # raw log-prob of the chosen token
    top_logprobs: dict[int, float] | None          # chosen token + top-N, when asked


def verify_for_vocab(params: SamplingParams, vocab_size: int) -> None:
    """Checks what SamplingParams cannot know alone; the engine calls it once per request."""
    for tok in params.logit_bias or {}:
        if not 0 <= tok < vocab_size:
            raise RawpagedError(
                f"logit_bias token id {tok} is outside the vocabulary [0, {vocab_size})")


def _to_host(a) -> np.ndarray:
    return a.get() if hasattr(a, "get") else np.asarray(a)   # cupy arrays have .get()


def _logsumexp(xp, x):
    """x[B, V] -> [B], max-shifted so exp never overflows."""
    m = x.max(axis=-1, keepdims=True)                        # [B, 1]
    return (m + xp.log(xp.exp(x - m).sum(axis=-1, keepdims=True)))[:, 0]


def _argmax_logsumexp(xp, x):
    """x[B, V] -> (argmax [B] or None, logsumexp [B]): one Numba kernel on the host (two passes
    over each row instead of NumPy's ~8), the generic _logsumexp on a device."""
    if xp is np:
        from rawpaged.backend.cpu.elementwise import argmax_logsumexp
        return argmax_logsumexp(np.ascontiguousarray(x, dtype=np.float32))
    return None, _logsumexp(xp, x)


def _column(xp, rows, name, dtype):
    """One SamplingParams field of every row -> [S, 1] on the device (from the rows' packed upload
    when `rows` is a RowParams, else its own upload)."""
    if isinstance(rows, RowParams):
        return rows.column(name, dtype)
    return xp.asarray([getattr(r.params, name) for r in rows], dtype=dtype)[:, None]


_PACKED = ("temperature", "top_k", "top_p", "min_p", "uniform")


class RowParams(list):
    """The SamplingRows of one path, with their sampling params and uniforms uploaded in ONE copy:
    device float64 [5, S] (temperature, top_k, top_p, min_p, uniform), read by _column / _uniforms.
    NOTE: one upload instead of five: each upload from pageable memory is a host stall."""

    def __init__(self, xp, rows, uniforms):
        super().__init__(rows)
        host = np.empty((len(_PACKED), len(rows)), np.float64)
        for j, r in enumerate(rows):
            p = r.params
            host[:4, j] = (p.temperature, p.top_k, p.top_p, p.min_p)
        host[4] = uniforms
        self.packed = xp.asarray(host)

    def column(self, name, dtype):
        return self.packed[_PACKED.index(name)].astype(dtype)[:, None]


def _argsort_desc(xp, x):
    """Each row of x[B, V] ordered best first, lowest id on ties (a stable sort of -x) -> [B, V].

    NOTE: cupy's argsort is always stable, and older cupy releases accept no `kind`.
    """
    return xp.argsort(-x, axis=-1, **({"kind": "stable"} if xp is np else {}))


# -- 0: the structured-output mask --------------------------------------------------------------

def unpack_mask(xp, bits: np.ndarray, vocab: int):
    """Packed bitmask (host int32 [C, W]) -> device bool [C, vocab], token t = bit t % 32 of word t // 32.

    NOTE: on the CPU NumPy's unpackbits does it in one pass over a uint8 view (the int32 words are
    little-endian, so byte-wise little bit order is token order); on the device the shift-and-test
    is one elementwise kernel over [C, W, 32] (CuPy's unpackbits lacks bitorder in older releases).
    """
    if xp is np:
        u8 = np.ascontiguousarray(bits, dtype="<i4").view(np.uint8)            # [C, 4W]
        return np.unpackbits(u8, axis=1, bitorder="little")[:, :vocab].view(np.bool_)
    words = xp.asarray(bits)                                                    # [C, W]
    shifts = xp.arange(32, dtype=xp.int32)                                      # [32]
    on = ((words[:, :, None] >> shifts) & 1) != 0                               # [C, W, 32]
    return on.reshape(words.shape[0], -1)[:, :vocab]                            # [C, V]


def apply_mask(xp, logits, mask: "TokenMask") -> None:
    """In place: the mask's rows of logits (float32 [B, V]) get -inf where their token is forbidden.

    NOTE: on the CPU this is the only pass over [C, V] floats: the packed words are inverted (cheap,
    [C, W]), unpacked to a forbidden-mask and written with copyto(where=), in place when every row
    is constrained (a gather and a scatter otherwise). On the device one where() does it.
    """
    V = logits.shape[1]
    if xp is np:
        forbidden = unpack_mask(np, ~mask.bits, V)                             # [C, V]
        if len(mask.rows) == logits.shape[0]:                                  # rows are 0..B-1
            np.copyto(logits, -np.inf, where=forbidden)
        else:
            sub = logits[mask.rows]
            np.copyto(sub, -np.inf, where=forbidden)
            logits[mask.rows] = sub
        return
    sel = xp.asarray(mask.rows)
    logits[sel] = xp.where(unpack_mask(xp, mask.bits, V), logits[sel], -xp.inf)


def _allowed(xp, bits, token_ids):
    """Is token_ids[i] allowed by row i of the packed mask? bits host [C, W], token_ids device [C]."""
    words = xp.take_along_axis(xp.asarray(bits), (token_ids // 32)[:, None], axis=-1)[:, 0]   # [C]
    return ((words >> (token_ids % 32).astype(xp.int32)) & 1) != 0


# -- 1-3: logit_bias and penalties --------------------------------------------------------------

def process_logits(xp, logits, rows: list[SamplingRow]):
    """logits[B, V] -> a float32 copy with logit_bias, then repetition, frequency and presence
    penalties added (steps 1-3 of the module docstring)."""
    out = logits.astype(xp.float32, copy=True)
    _add_logit_bias(xp, out, rows)
    _apply_penalties(xp, out, rows)
    return out


def _add_logit_bias(xp, logits, rows):
    r, t, b = [], [], []
    for i, row in enumerate(rows):
        for tok, bias in (row.params.logit_bias or {}).items():
            r.append(i), t.append(tok), b.append(bias)
    if r:
        # NOTE: (row, token) pairs are unique (dict keys per row), so fancy-index += adds each once.
        logits[xp.asarray(r), xp.asarray(t)] += xp.asarray(b, dtype=xp.float32)


def _has_penalty(p: SamplingParams) -> bool:
    return p.repetition_penalty != 1.0 or p.frequency_penalty != 0.0 or p.presence_penalty != 0.0


def _token_counts(xp, token_lists: list[list[int]], vocab_size: int):
    """Per-row token histograms [P, V]: one bincount over ids shifted by row * V."""
    flat = np.concatenate([np.asarray(toks, dtype=np.int64) + i * vocab_size
                           for i, toks in enumerate(token_lists)])            # [sum of lengths]
    counts = xp.bincount(xp.asarray(flat), minlength=len(token_lists) * vocab_size)
    return counts.reshape(len(token_lists), vocab_size).astype(xp.float32)


def _apply_penalties(xp, logits, rows):
    idx = [i for i, row in enumerate(rows) if _has_penalty(row.params)]
    if not idx:
        return
    V = logits.shape[1]
    sel = [rows[i] for i in idx]
    sub = logits[xp.asarray(idx)]                                               # [P, V]
    out_counts = _token_counts(xp, [r.output_token_ids for r in sel], V)        # [P, V]
    # NOTE: prompt tokens matter only to the repetition penalty; other rows send none.
    prompt_counts = _token_counts(
        xp, [r.prompt_token_ids if r.params.repetition_penalty != 1.0 else [] for r in sel], V)
    rep = _column(xp, sel, "repetition_penalty", xp.float32)                    # [P, 1]
    seen = (prompt_counts + out_counts) > 0
    sub = xp.where(seen, xp.where(sub > 0, sub / rep, sub * rep), sub)
    sub -= (_column(xp, sel, "frequency_penalty", xp.float32) * out_counts
            + _column(xp, sel, "presence_penalty", xp.float32) * (out_counts > 0))
    logits[xp.asarray(idx)] = sub


# -- 4-6: temperature, filtering, sampling -------------------------------------------------------

def _changes_logits(p: SamplingParams) -> bool:
    """Whether process_logits changes this row (logit_bias or a penalty)."""
    return bool(p.logit_bias) or _has_penalty(p)


def _is_filtered(p: SamplingParams) -> bool:
    return p.top_k > 0 or p.top_p < 1.0 or p.min_p > 0.0


def _pick(xp, cdf, total, u):
    """Inverse CDF: cdf[S, V] (non-decreasing), total[S, 1] (mass to sample), u[S] -> index [S].

    The index is the first position whose cdf exceeds u * total, i.e. how many positions do not.
    NOTE: u < 1 in float64 times a float32 total stays below total, so with a sequential cumsum the
    index lands inside the mass on a token of positive probability; callers still clamp it, since
    a parallel scan (cupy) may round neighbouring prefix sums differently.
    """
    return (cdf <= u[:, None] * total).sum(axis=-1)


def _kept_prefix_len(xp, s, p, rows):
    """How many of the sorted tokens survive top_k, top_p and min_p -> [S] (always >= 1).

    s[S, V]: temperature-scaled logits sorted descending; p[S, V] = exp(s - s[:, :1]) (max is 1).
    Each filter keeps a prefix of the sorted order, so the survivors are the shortest of the three.
    """
    S, V = s.shape
    pos = xp.arange(V)[None, :]                                                 # [1, V]
    tk = _column(xp, rows, "top_k", xp.int64)[:, 0]                            # [S] (<= 0: off)
    k = xp.where(tk > 0, xp.minimum(tk, V), V)                                  # [S]
    kth = xp.take_along_axis(s, (k - 1)[:, None], axis=-1)                      # [S, 1] k-th logit
    k_len = (s >= kth).sum(axis=-1)                                             # ties kept
    pk = xp.where(pos < k_len[:, None], p, 0)                                   # [S, V] top-k mass
    cdf = xp.cumsum(pk, axis=-1)                                                # [S, V]
    before = xp.concatenate([xp.zeros_like(cdf[:, :1]), cdf[:, :-1]], axis=1)  # mass of better ones
    top_p = _column(xp, rows, "top_p", xp.float32)                              # [S, 1]
    p_len = (before < top_p * cdf[:, -1:]).sum(axis=-1)   # keep while the better ones lack top_p
    m_len = (p >= _column(xp, rows, "min_p", xp.float32)).sum(axis=-1)   # p is prob / max prob
    return xp.maximum(xp.minimum(xp.minimum(k_len, p_len), m_len), 1)


class Sampler:
    def __init__(self, xp, seed: int = 0):
        self.xp = xp
        self.rng = np.random.default_rng(seed)   # for rows without their own generator

    def __call__(self, logits, rows: list[SamplingRow], mask: TokenMask | None = None) -> list[SampleResult]:
        xp = self.xp
        if not rows:
            return []
        raw = logits.astype(xp.float32, copy=False)                             # [B, V]
        # NOTE: rows without bias, penalties or a mask sample from the raw logits themselves (never
        # written): no [B, V] copy, and a greedy row's token is the argmax found with the lse.
        plain = mask is None and not any(_changes_logits(r.params) for r in rows)
        processed = raw if plain else process_logits(xp, raw, rows)             # [B, V]
        amax, lse = _argmax_logsumexp(xp, raw)              # [B] NOTE: the whole vocabulary's
        if not plain:
            amax = None
        if amax is not None and all(r.params.is_greedy() and r.num_logprobs is None for r in rows):
            # NOTE: the common case on the host (plain greedy rows, no top-N): the argmax found with
            # the lse is the token, and nothing else runs. Right after a decode step the caches hold
            # its weights, not this code's data, and every NumPy call skipped saves microseconds.
            lp = raw[np.arange(len(rows)), amax] - lse
            return [SampleResult(i, p, None) for i, p in zip(amax.tolist(), lp.tolist())]
        if mask is not None:
            apply_mask(xp, processed, mask)
            if any(rows[i].num_logprobs is not None for i in mask.rows):       # top-N: allowed only
                raw = raw.copy()                            # NOTE: never write the caller's logits
                apply_mask(xp, raw, mask)
        # NOTE: a row's path depends on its own params only, so batch-mates never change its token.
        paths = ((self._greedy, [i for i, r in enumerate(rows) if r.params.is_greedy()]),
                 (self._sample_plain, [i for i, r in enumerate(rows)
                                       if not r.params.is_greedy() and not _is_filtered(r.params)]),
                 (self._sample_sorted, [i for i, r in enumerate(rows)
                                        if not r.params.is_greedy() and _is_filtered(r.params)]))
        token_ids = None
        for pick, idx in paths:
            if len(idx) == len(rows):                   # every row takes this path: no gather / scatter
                if pick == self._greedy and amax is not None:
                    token_ids = amax.astype(xp.int64, copy=False)    # argmax of the raw (= processed) rows
                else:
                    token_ids = pick(processed, self._row_params(pick, rows)).astype(xp.int64, copy=False)
                break
            if idx:
                if token_ids is None:
                    token_ids = xp.zeros(len(rows), dtype=xp.int64)              # [B]
                at = xp.asarray(idx)
                if pick == self._greedy and amax is not None:
                    token_ids[at] = amax[at]                # argmax of the raw (= processed) rows
                else:
                    token_ids[at] = pick(processed[at], self._row_params(pick, [rows[i] for i in idx]))
        if mask is not None:
            self._only_allowed(token_ids, processed, mask)
        chosen_lp = xp.take_along_axis(raw, token_ids[:, None], axis=-1)[:, 0] - lse
        # NOTE: ONE device->host copy (the step's only wait for the device): ids (exact in float64)
        # and their logprobs stacked.
        both = _to_host(xp.stack([token_ids.astype(xp.float64), chosen_lp.astype(xp.float64)]))
        ids_h, lp_h = both[0].astype(np.int64), both[1]
        tops = self._top_logprobs(raw, lse, rows, ids_h, lp_h)
        return [SampleResult(int(ids_h[i]), float(lp_h[i]), tops[i]) for i in range(len(rows))]

    def _row_params(self, pick, rows):
        """The rows as the path reads them: sampling paths get their params and uniforms in one upload
        (drawing each row's uniform here, in row order, as before); greedy reads none."""
        if pick == self._greedy:
            return rows
        return RowParams(self.xp, rows, np.array([self._generator(r).random() for r in rows]))

    def _only_allowed(self, token_ids, processed, mask: TokenMask) -> None:
        """Constrained rows whose token is forbidden get their best allowed token instead (in place).

        NOTE: inverse-CDF sampling cannot pick a zero-probability token with a sequential cumsum, but
        a parallel scan (CuPy) may round a prefix sum up past a neighbour; the grammar must never see
        a forbidden token, whatever the rounding. On the device the where() runs either way (no host
        sync); on the host only when a token is forbidden.
        """
        xp = self.xp
        sel = xp.asarray(mask.rows)
        ok = _allowed(xp, mask.bits, token_ids[sel])                            # [C]
        if xp is np and ok.all():
            return
        token_ids[sel] = xp.where(ok, token_ids[sel], xp.argmax(processed[sel], axis=-1))

    def _greedy(self, logits, rows):
        return self.xp.argmax(logits, axis=-1)                                  # ties: lowest id

    def _uniforms(self, rows):
        """One uniform in [0, 1) per row from its own generator or the sampler's -> [S] float64
        (drawn when the rows were packed, for a RowParams)."""
        if isinstance(rows, RowParams):
            return rows.packed[_PACKED.index("uniform")]
        return self.xp.asarray(np.array([self._generator(r).random() for r in rows]))

    def _sample_plain(self, logits, rows):
        """No top_k / top_p / min_p: inverse CDF over softmax(logits / T) in token-id order.

        NOTE: no sort is needed when nothing is filtered; the sort only turns the filters' kept sets
        into prefixes. On the CPU the sort of a 32000-wide row costs more than the rest together.
        """
        xp = self.xp
        z = logits / _column(xp, rows, "temperature", xp.float32)              # [S, V]
        cdf = xp.cumsum(xp.exp(z - z.max(axis=-1, keepdims=True)), axis=-1)    # [S, V]
        return xp.minimum(_pick(xp, cdf, cdf[:, -1:], self._uniforms(rows)), logits.shape[1] - 1)

    def _sample_sorted(self, logits, rows):
        """top_k / top_p / min_p rows: sort descending (stable), keep a prefix, inverse CDF."""
        xp = self.xp
        V = logits.shape[1]
        order = _argsort_desc(xp, logits)                                      # [S, V] best first
        s = xp.take_along_axis(logits, order, axis=-1)                          # [S, V] descending
        s = s / _column(xp, rows, "temperature", xp.float32)
        p = xp.exp(s - s[:, :1])                                           # [S, V] unnormalized
        keep = _kept_prefix_len(xp, s, p, rows)                                 # [S]
        cdf = xp.cumsum(xp.where(xp.arange(V)[None, :] < keep[:, None], p, 0), axis=-1)  # [S, V]
        total = xp.take_along_axis(cdf, (keep - 1)[:, None], axis=-1)           # [S, 1] kept mass
        j = _pick(xp, cdf, total, self._uniforms(rows))                    # [S] sorted position
        j = xp.minimum(j, keep - 1)               # NOTE: never a filtered token, whatever rounding
        return xp.take_along_axis(order, j[:, None], axis=-1)[:, 0]

    def _generator(self, row: SamplingRow) -> np.random.Generator:
        return row.generator if row.generator is not None else self.rng

    def _top_logprobs(self, raw, lse, rows, ids_h, lp_h):
        """Per row: None, or {chosen: logprob} plus the row's num_logprobs best raw logprobs."""
        tops: list[dict[int, float] | None] = [None] * len(rows)
        want = [i for i, r in enumerate(rows) if r.num_logprobs is not None]
        for i in want:
            tops[i] = {int(ids_h[i]): float(lp_h[i])}
        n_max = min(max((rows[i].num_logprobs for i in want), default=0), raw.shape[1])
        if n_max > 0:
            sel = self.xp.asarray(want)
            vals, ids = self._topk(raw[sel], lse[sel], n_max)                   # host [W, n_max]
            for w, i in enumerate(want):
                n = rows[i].num_logprobs
                tops[i].update(zip(ids[w, :n].tolist(), vals[w, :n].tolist()))
        return tops

    def _topk(self, raw, lse, k: int):
        """raw[B, V], lse[B] -> host (logprobs[B, k], ids[B, k]), best first."""
        xp = self.xp
        ids = _argsort_desc(xp, raw)[:, :k]                                     # [B, k]
        vals = xp.take_along_axis(raw, ids, axis=-1) - lse[:, None]             # [B, k]
        return _to_host(vals), _to_host(ids)

    def logprobs(self, logits, token_ids, num_top: int):
        """Prompt logprobs: logits[T, V] and the token that follows each row, ids[T] ->
        (host logprob of each given token [T], per row {given token: lp} plus the num_top best)."""
        xp = self.xp
        raw = logits.astype(xp.float32, copy=False)
        lse = _logsumexp(xp, raw)                                               # [T]
        ids_h = np.asarray(token_ids, dtype=np.int64)                           # [T] on the host
        ids = xp.asarray(ids_h)[:, None]                                        # [T, 1]
        lp_h = _to_host(xp.take_along_axis(raw, ids, axis=-1)[:, 0] - lse)      # [T]
        tops = [{int(t): float(v)} for t, v in zip(ids_h, lp_h)]
        k = min(num_top, raw.shape[1])
        if k > 0:
            vals, top_ids = self._topk(raw, lse, k)
            for d, i_row, v_row in zip(tops, top_ids.tolist(), vals.tolist()):
                d.update(zip(i_row, v_row))
        return lp_h, tops

    def topk_logprobs(self, logits, k: int, mask: TokenMask | None = None):
        """Beam search: the k best raw logprobs per row -> host (values[B, k], ids[B, k]),
        best first, lowest id on ties. With a mask, forbidden tokens are -inf (they rank last)."""
        xp = self.xp
        raw = logits.astype(xp.float32, copy=False)
        lse = _logsumexp(xp, raw)
        if mask is not None:
            raw = raw.copy()
            apply_mask(xp, raw, mask)
        return self._topk(raw, lse, min(k, raw.shape[1]))
