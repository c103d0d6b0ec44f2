"""Row-wise ops as single Numba kernels (the NumPy versions took 5-10 calls and temporaries each,
which is most of a decode step's time outside the GEMMs at a few rows). Float32 in and out,
float32 statistics; each loop over a row is vectorised by LLVM (fast-math reassociation).

  rms_norm            y[t] = x[t] / sqrt(mean(x[t]^2) + eps) * w
  add_rms_norm        r[t] += x[t]; x[t] = rms_norm(r[t])            (both in place)
  silu_and_mul        y[t, i] = silu(x[t, i]) * x[t, I + i]
  rotary              q, k [T, H, D] rotated in place by the [max_pos, rot] cos|sin table
  logsumexp_rows      lse[t] = log(sum(exp(x[t])))  (with NumPy's argmax: argmax_logsumexp, the sampler's)
  add_layer_norm      r[t] += x[t]; x[t] = layer_norm(r[t]) * w + b   (both in place; two-pass variance)
"""
from __future__ import annotations


import numpy as np
from numba import njit, prange

from rawpaged.backend.cpu import lowp
from rawpaged.backend.cpu.gemm import dynamic_schedule
from rawpaged.backend.cpu.jit import serial_and_parallel

_FAST = {"reassoc", "contract", "nsz", "arcp"}
# NOTE: no "nnan"/"ninf": exp_nonpos takes -inf (a score against an empty running max)
PARALLEL_MIN_ELEMENTS = 1 << 18      # below this one thread is faster than a thread-pool launch


@njit(fastmath=_FAST, inline="always", error_model="numpy")
def exp_nonpos(x):
    """exp(x) for x <= 0 (scores minus their running max), as plain arithmetic LLVM vectorises
    (math.exp is a scalar libm call): 2^n * e^r with r in [-ln2/2, ln2/2], a degree-7 Taylor
    polynomial for e^r (relative error < 1e-7), 2^n built in the exponent bits. Below -87 it
    returns ~1e-38 instead of 0 (exp(-inf) = 0 where it matters: masked keys are never summed)."""
    x = max(x, np.float32(-87.0))
    # n = round(x / ln2) as trunc(x / ln2 - 0.5) (x <= 0): float -> int -> float vectorises, floor does not
    ni = np.int32(x * np.float32(1.4426950408889634) - np.float32(0.5))
    n = np.float32(ni)
    r = x - n * np.float32(0.693145751953125) - n * np.float32(1.428606765330187e-06)
    p = np.float32(1.0 / 5040.0)
    p = p * r + np.float32(1.0 / 720.0)
    p = p * r + np.float32(1.0 / 120.0)
    p = p * r + np.float32(1.0 / 24.0)
    p = p * r + np.float32(1.0 / 6.0)
    p = p * r + np.float32(0.5)
    p = p * r + np.float32(1.0)
    p = p * r + np.float32(1.0)
    return p * lowp._u32_as_f32(np.uint32(ni + np.int32(127)) << np.uint32(23))


@njit(fastmath=_FAST, inline="always", error_model="numpy")
def _inv_rms(x, t, eps):
    ss = np.float32(0.0)
    for i in range(x.shape[1]):
        ss += x[t, i] * x[t, i]
    return np.float32(1.0) / np.sqrt(ss / np.float32(x.shape[1]) + eps)


# NOTE: the row bodies are @njit functions of their own so that the fused decode step
# (decode_step.py) runs the very same code inside its one compiled call.
@njit(fastmath=_FAST, inline="always", error_model="numpy")
def rms_norm_row(x, t, w, eps, out):
    """out[t] = x[t] / sqrt(mean(x[t]^2) + eps) * w."""
    inv = _inv_rms(x, t, eps)
    for i in range(x.shape[1]):
        out[t, i] = x[t, i] * inv * w[i]


@njit(fastmath=_FAST, inline="always", error_model="numpy")
def add_rms_norm_row(x, res, t, w, eps):
    """res[t] += x[t]; x[t] = rms_norm(res[t]) * w."""
    for i in range(x.shape[1]):
        res[t, i] += x[t, i]
    inv = _inv_rms(res, t, eps)
    for i in range(x.shape[1]):
        x[t, i] = res[t, i] * inv * w[i]


def _rms_norm(x, w, eps, out):
    for t in prange(x.shape[0]):
        rms_norm_row(x, t, w, eps, out)


def _add_rms_norm(x, res, w, eps):
    for t in prange(x.shape[0]):
        add_rms_norm_row(x, res, t, w, eps)


def _add_layer_norm(x, res, w, b, eps):
    """w / b: [n] arrays or empty (no gain / no bias)."""
    n = x.shape[1]
    for t in prange(x.shape[0]):
        s = np.float32(0.0)
        for i in range(n):
            res[t, i] += x[t, i]
            s += res[t, i]
        mean = s / np.float32(n)
        sq = np.float32(0.0)
        for i in range(n):
            d = res[t, i] - mean
            sq += d * d
        inv = np.float32(1.0) / np.sqrt(sq / np.float32(n) + eps)
        for i in range(n):
            y = (res[t, i] - mean) * inv
            if w.shape[0]:
                y *= w[i]
            if b.shape[0]:
                y += b[i]
            x[t, i] = y


@njit(fastmath=_FAST, inline="always", error_model="numpy")
def silu_and_mul_row(x, t, out):
    """out[t, i] = silu(x[t, i]) * x[t, I + i], I = out.shape[1]."""
    n = out.shape[1]
    for i in range(n):
        g = x[t, i]
        z = exp_nonpos(-abs(g))                 # sigmoid(g) from exp(-|g|): never overflows
        inv = np.float32(1.0) / (np.float32(1.0) + z)
        sig = inv if g >= 0 else z * inv
        out[t, i] = g * sig * x[t, n + i]


def _silu_and_mul(x, out):
    for t in prange(x.shape[0]):
        silu_and_mul_row(x, t, out)


def _rotary(positions, q, k, cache, is_neox):
    half = cache.shape[1] // 2
    for t in prange(q.shape[0]):
        p = positions[t]
        for x in (q, k):
            for h in range(x.shape[1]):
                for i in range(half):
                    c, s = cache[p, i], cache[p, half + i]
                    if is_neox:                     # halves: (x[i], x[i + rot/2])
                        a, b = x[t, h, i], x[t, h, half + i]
                        x[t, h, i] = a * c - b * s
                        x[t, h, half + i] = b * c + a * s
                    else:                           # interleaved pairs: (x[2i], x[2i + 1])
                        a, b = x[t, h, 2 * i], x[t, h, 2 * i + 1]
                        x[t, h, 2 * i] = a * c - b * s
                        x[t, h, 2 * i + 1] = b * c + a * s


def _logsumexp_rows(x, m, lse):
    """lse[t] = m[t] + log(sum_i exp(x[t, i] - m[t])) for logits x [B, V] and their row maxima m:
    one vectorised pass per row (NumPy's max-shifted formula took 4 passes and 2 [B, V]
    temporaries). A row of -inf only: lse = -inf, as NumPy's."""
    for t in prange(x.shape[0]):
        mt = m[t]
        if mt == -np.inf:
            lse[t] = mt
            continue
        acc = np.float32(0.0)
        for i in range(x.shape[1]):                 # vectorised: exp_nonpos is plain arithmetic
            acc += exp_nonpos(x[t, i] - mt)
        lse[t] = mt + np.log(acc)


@njit(fastmath=_FAST, inline="always", error_model="numpy")
def greedy_row(x, t):
    """Row t of logits x [B, V] -> (argmax, x[t, argmax] - logsumexp(x[t])): the greedy token and
    its logprob, as the sampler's greedy shortcut computes them (argmax_logsumexp: lowest id on
    ties; the same max-shifted sum as _logsumexp_rows), for a compiled caller (the fused decode
    step's multi-step loop, decode_step.py). NOTE: the maximum first, in 16 lanes LLVM vectorises
    (vmaxps), then the first index holding it: one scalar compare-and-branch chain per element
    (as a plain argmax loop) ran ~5x slower."""
    V = x.shape[1]
    lanes = np.full(16, -np.inf, np.float32)
    n16 = V - V % 16
    for i in range(0, n16, 16):
        for j in range(16):
            v = x[t, i + j]
            lanes[j] = v if v > lanes[j] else lanes[j]
    m = lanes.max()
    for i in range(n16, V):
        m = x[t, i] if x[t, i] > m else m
    best = 0
    while best < V - 1 and x[t, best] != m:
        best += 1
    if m == -np.inf:                                # a row of -inf only, as _logsumexp_rows
        return best, m - m
    acc = np.float32(0.0)
    for i in range(V):
        acc += exp_nonpos(x[t, i] - m)
    return best, x[t, best] - (m + np.log(acc))


def _pair(fn):
    """(serial, parallel) compilations of one kernel (jit.py: kept apart in Numba's cache)."""
    return serial_and_parallel(fn, fastmath=_FAST, cache=True, nogil=True, error_model="numpy")


_KERNELS = {f.__name__: _pair(f) for f in (_rms_norm, _add_rms_norm, _add_layer_norm, _silu_and_mul, _rotary,
                                                 _logsumexp_rows)}


def kernel(name: str, elements: int):
    """The serial or the parallel compilation of kernel `name` for `elements` elements.
    NOTE: serial whenever Numba has one thread: a parallel launch on one thread only adds the
    thread pool's cost (its first launch in a process took ~3 ms of a 16-row sampling step)."""
    serial, parallel = _KERNELS[name]
    return parallel if elements >= PARALLEL_MIN_ELEMENTS and dynamic_schedule() > 1 else serial


def argmax_logsumexp(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """x [B, V] float32 (C-contiguous) -> (argmax [B] int64, logsumexp [B] float32).
    NOTE: the argmax (and so the maximum) is NumPy's, SIMD and first-index on ties; a float max
    reduction written in Numba stays one scalar chain (NaN ordering), ~10x slower."""
    amax = x.argmax(axis=1)
    m = np.ascontiguousarray(x[np.arange(x.shape[0]), amax])
    lse = np.empty(x.shape[0], np.float32)
    kernel("_logsumexp_rows", x.size)(x, m, lse)
    return amax, lse
