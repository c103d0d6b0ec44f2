"""linear() on the CPU: y[T, O] = x[T, K] @ W[O, K]^T, W in Hugging Face's [out, in] layout.

One Numba kernel for every T (decode steps of a few rows and prefills of thousands alike).
NOTE: why not OpenBLAS's sgemm: (1) for a few rows it packs (copies) the whole weight matrix before
multiplying, which made 2-8 rows cost ~3x one row, while the kernel below reads each weight once per
call; (2) its thread pool spins after each call and fought Numba's (attention, norms) for the two
cores; (3) it has no 16-bit weights. Measured single-threaded, the kernel matches sgemm from 64 to
2048 rows at this project's shapes and beats it below (bench/profile_step.py, bench/RESULTS.md).

Weights are stored float32, bfloat16 or float16 (lowp.py); x and y are always float32 and the sums
are float32 (fp32 accumulation whatever the storage).

The kernel: each task owns a range of output features; for each group of 4 outputs (4 weight rows)
it walks a tile of up to 64 rows of x 4 at a time, keeping the 4 x 4 dot products in registers while
k runs over the hidden size (LLVM vectorises that loop: 16 vector accumulators, each weight vector
widened once and used for 4 rows of x). The x tile stays in L2 while the weight rows stream by.
"""
from __future__ import annotations

import threading

import numba
import numpy as np
from numba import njit, prange

from rawpaged.backend.cpu import lowp

_PARALLEL_MIN_BYTES = 1 << 18  # weight bytes below which one thread is faster than two
_FAST = {"reassoc", "contract", "nsz", "arcp"}
_ROW_TILE = 64                 # rows of x per pass over the weights (64 x K floats: L2-resident)


@njit(fastmath=_FAST, inline="always", error_model="numpy")
def _dot_4x4(x, t, w, o, K, kind, y):
    """y[t:t+4, o:o+4] = x[t:t+4] . widen(w[o:o+4]) over k < K (16 accumulators)."""
    a00 = a01 = a02 = a03 = np.float32(0.0)
    a10 = a11 = a12 = a13 = np.float32(0.0)
    a20 = a21 = a22 = a23 = np.float32(0.0)
    a30 = a31 = a32 = a33 = np.float32(0.0)
    for k in range(K):
        w0 = lowp.widen(w[o, k], kind)
        w1 = lowp.widen(w[o + 1, k], kind)
        w2 = lowp.widen(w[o + 2, k], kind)
        w3 = lowp.widen(w[o + 3, k], kind)
        x0, x1, x2, x3 = x[t, k], x[t + 1, k], x[t + 2, k], x[t + 3, k]
        a00 += x0 * w0
        a01 += x0 * w1
        a02 += x0 * w2
        a03 += x0 * w3
        a10 += x1 * w0
        a11 += x1 * w1
        a12 += x1 * w2
        a13 += x1 * w3
        a20 += x2 * w0
        a21 += x2 * w1
        a22 += x2 * w2
        a23 += x2 * w3
        a30 += x3 * w0
        a31 += x3 * w1
        a32 += x3 * w2
        a33 += x3 * w3
    y[t, o], y[t, o + 1], y[t, o + 2], y[t, o + 3] = a00, a01, a02, a03
    y[t + 1, o], y[t + 1, o + 1], y[t + 1, o + 2], y[t + 1, o + 3] = a10, a11, a12, a13
    y[t + 2, o], y[t + 2, o + 1], y[t + 2, o + 2], y[t + 2, o + 3] = a20, a21, a22, a23
    y[t + 3, o], y[t + 3, o + 1], y[t + 3, o + 2], y[t + 3, o + 3] = a30, a31, a32, a33


@njit(fastmath=_FAST, inline="always", error_model="numpy")
def _dot_1x4(x, t, w, o, K, kind, y):
    """y[t, o:o+4] = x[t] . widen(w[o:o+4]) (one row of x: the decode step of one sequence)."""
    a0 = a1 = a2 = a3 = np.float32(0.0)
    for k in range(K):
        xk = x[t, k]
        a0 += xk * lowp.widen(w[o, k], kind)
        a1 += xk * lowp.widen(w[o + 1, k], kind)
        a2 += xk * lowp.widen(w[o + 2, k], kind)
        a3 += xk * lowp.widen(w[o + 3, k], kind)
    y[t, o], y[t, o + 1], y[t, o + 2], y[t, o + 3] = a0, a1, a2, a3


@njit(fastmath=_FAST, inline="always", error_model="numpy")
def _dot_1x1(x, t, w, o, K, kind, y):
    a = np.float32(0.0)
    for k in range(K):
        a += x[t, k] * lowp.widen(w[o, k], kind)
    y[t, o] = a


@njit(fastmath=_FAST)
def _rows(x, w, y, kind, o0, o1):
    """y[:, o0:o1] for outputs o0..o1-1: groups of 4 outputs, x rows 4 at a time."""
    T, K = x.shape
    for t0 in range(0, T, _ROW_TILE):           # a tile of x rows stays in L2 while W streams by
        t1 = min(T, t0 + _ROW_TILE)
        o = o0
        while o + 4 <= o1:
            t = t0
            while t + 4 <= t1:
                _dot_4x4(x, t, w, o, K, kind, y)
                t += 4
            while t < t1:
                _dot_1x4(x, t, w, o, K, kind, y)
                t += 1
            o += 4
        while o < o1:                           # the last O % 4 outputs
            for t in range(t0, t1):
                _dot_1x1(x, t, w, o, K, kind, y)
            o += 1


@njit(fastmath=_FAST, parallel=True, cache=True, nogil=True, error_model="numpy")
def _linear_parallel(x, w, y, kind, num_tasks):
    O = w.shape[0]
    groups = (O + 3) // 4
    for task in prange(num_tasks):              # contiguous ranges of outputs, multiples of 4
        o0 = min(O, task * groups // num_tasks * 4)
        o1 = min(O, (task + 1) * groups // num_tasks * 4)
        _rows(x, w, y, kind, o0, o1)


@njit(fastmath=_FAST, cache=True, nogil=True, error_model="numpy")
def _linear_serial(x, w, y, kind):
    _rows(x, w, y, kind, 0, w.shape[0])


_local = threading.local()


def dynamic_schedule() -> int:
    """Numba's thread count, after making this thread's parallel loops hand out iterations one at
    a time (Numba's default splits them into one static chunk per thread).
    NOTE: with several small tasks per thread, a thread that loses its core (a busy machine) leaves
    the tasks it has not started to the others instead of stalling the call. The count is read once
    per thread: numba.get_num_threads() costs ~10 us, more than a small kernel."""
    threads = getattr(_local, "threads", None)
    if threads is None:
        numba.set_parallel_chunksize(1)
        threads = _local.threads = numba.get_num_threads()
    return threads


def linear_2d(x: np.ndarray, weight: np.ndarray) -> np.ndarray:
    """x [T, K] float32 @ weight [O, K]^T with the Numba kernel -> [T, O] float32."""
    kind = lowp.kind_of(weight.dtype)
    w = weight if kind == lowp.F32 else weight.view(np.uint16)
    x = np.ascontiguousarray(x, dtype=np.float32)
    y = np.empty((x.shape[0], w.shape[0]), np.float32)
    threads = dynamic_schedule()
    if weight.nbytes >= _PARALLEL_MIN_BYTES and threads > 1:
        _linear_parallel(x, w, y, kind, 4 * threads)
    else:
        _linear_serial(x, w, y, kind)
    return y


def linear(x: np.ndarray, weight: np.ndarray) -> np.ndarray:
    """x [..., K] float32 @ weight [O, K]^T -> [..., O] float32."""
    lead = x.shape[:-1]
    y = linear_2d(x.reshape(-1, x.shape[-1]), weight)
    return y.reshape(*lead, weight.shape[0])
