"""linear() on the CPU: y[T, O] = x[T, K] @ W[O, K]^T, W in Hugging Face's [out, in] layout.

One Numba kernel for every T (decode steps of a few rows and prefills of thousands alike).
NOTE: why not OpenBLAS's sgemm: (1) for a few rows it packs (copies) the whole weight matrix before
multiplying, which made 2-8 rows cost ~3x one row, while the kernel below reads each weight once per
call; (2) its thread pool spins after each call and fought Numba's (attention, norms) for the two
cores; (3) it has no 16-bit weights. Measured single-threaded, the kernel matches sgemm from 64 to
2048 rows at this project's shapes and beats it below (bench/profile_step.py, bench/RESULTS.md).

Weights are stored float32, bfloat16 or float16 (lowp.py); x and y are always float32 and the sums
are float32 (fp32 accumulation whatever the storage). bfloat16 weights on a CPU with AVX-512 BF16
(bf16dot.py) take the hardware's bf16 x bf16 -> fp32 dot product: x is rounded to bfloat16 for the
product, as llama.cpp, oneDNN and PyTorch do; its float32 activations, norms, attention and sums
are untouched. It doubles the multiply-add rate of the batched steps (prefill, 16+ sequences).
RAWPAGED_CPU_BF16_DOT=0 keeps float32 activations (the widening kernel) there too.

The kernel: each task owns a range of output features. Up to 8 rows of x (decode steps), it reads
one weight row at a time (one sequential stream, left to the hardware prefetcher) against the rows
of x; past that, for each group of 4 outputs (4 weight rows) it walks a tile of up to 64 rows of x 4 at a time, keeping the 4 x 4 dot products in registers while
k runs over the hidden size (LLVM vectorises that loop: 16 vector accumulators, each weight vector
widened once and used for 4 rows of x). The x tile stays in L2 while the weight rows stream by.
"""
from __future__ import annotations

import os
import threading

import numba
import numpy as np
from numba import njit, prange

from rawpaged.backend.cpu import bf16dot, lowp, team

_PARALLEL_MIN_BYTES = 1 << 18  # weight bytes below which one thread is faster than two
_FAST = {"reassoc", "contract", "nsz", "arcp"}
_LINE = 32                     # elements per prefetch (a 64-byte line holds 32 16-bit or 16 float32)
_FEW_ROWS = 8                  # up to this many rows of x, weights are read one row at a time
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


@njit(fastmath=_FAST, inline="always", error_model="numpy")
def _dot_4x1(x, t, w, o, K, kind, y):
    """y[t:t+4, o] = x[t:t+4] . widen(w[o]): one weight row against 4 rows of x."""
    a0 = a1 = a2 = a3 = np.float32(0.0)
    for k in range(K):
        wk = lowp.widen(w[o, k], kind)
        a0 += x[t, k] * wk
        a1 += x[t + 1, k] * wk
        a2 += x[t + 2, k] * wk
        a3 += x[t + 3, k] * wk
    y[t, o], y[t + 1, o], y[t + 2, o], y[t + 3, o] = a0, a1, a2, a3


@njit(fastmath=_FAST, inline="always", error_model="numpy")
def _rows(x, w, y, o0, o1, kind):
    """y[:, o0:o1] for outputs o0..o1-1: groups of 4 outputs, x rows 4 at a time."""
    T, K = x.shape
    if T <= _FEW_ROWS:
        # NOTE: few rows: one weight row at a time, so the weights are read as ONE sequential
        # stream (the 4-row groups below are 4 streams of K elements each, too short for the
        # hardware prefetcher, which left a decode step at a third of the memory bandwidth).
        # NOTE: no software prefetch: the hardware prefetcher follows this one stream, and a
        # prefetch 4 rows ahead (one per 64-byte line) made the float32 fused decode step 1.1-1.3x
        # slower at 1-4 rows (bfloat16: no difference measured; bench/RESULTS.md).
        for o in range(o0, o1):
            t = 0
            while t + 4 <= T:
                _dot_4x1(x, t, w, o, K, kind, y)
                t += 4
            while t < T:
                _dot_1x1(x, t, w, o, K, kind, y)
                t += 1
        return
    for t0 in range(0, T, _ROW_TILE):       # a tile of x rows stays in L2 while W streams by
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
        while o < o1:                       # the last O % 4 outputs
            for t in range(t0, t1):
                _dot_1x1(x, t, w, o, K, kind, y)
            o += 1


def _build(kind: int):
    """The (serial, parallel) kernels for one storage kind.
    NOTE: `kind` is a closure constant, not an argument: Numba freezes it, and _rows is inlined,
    so each compilation holds one widening and LLVM vectorises a loop without a branch on the kind
    in it. The closures capture only that int (no Numba function): Numba's on-disk cache keys a
    closure by its captured values, and a captured dispatcher pickles differently in every process
    (the kernels were recompiled, ~3 s, at every start)."""

    @njit(fastmath=_FAST, cache=True, nogil=True, error_model="numpy")
    def serial(x, w, y):
        _rows(x, w, y, 0, w.shape[0], kind)

    @njit(fastmath=_FAST, parallel=True, cache=True, nogil=True, error_model="numpy")
    def parallel(x, w, y, num_tasks):
        O = w.shape[0]
        groups = (O + 3) // 4
        for task in prange(num_tasks):          # contiguous ranges of outputs, multiples of 4
            o0 = min(O, task * groups // num_tasks * 4)
            o1 = min(O, (task + 1) * groups // num_tasks * 4)
            _rows(x, w, y, o0, o1, kind)

    return serial, parallel


# (serial, parallel) kernels for bfloat16 weights on a CPU with AVX-512 BF16: x is rounded to
# bfloat16 (xb) and each tile of dot products is bf16dot's vdpbf16ps loop (float32 sums); the last
# K % 32 columns are added one by one. NOTE: module-level functions, not closures, so that
# Numba's on-disk cache finds them again in the next process (see _build).
_D44, _D41, _D11 = bf16dot.dot_tile(4, 4), bf16dot.dot_tile(4, 1), bf16dot.dot_tile(1, 1, chains=4)
_D44Y = bf16dot.dot_tile(4, 4, into=True)      # the 4 x 4 tile written straight into y (no K % 32 tail)


@njit(fastmath=_FAST, error_model="numpy")
def _bf16_tail(xb, t, nt, w, o, no, k0, acc):
    """acc[r * no + c] += the columns k0.. of x[t + r] . w[o + c] (K % 32 of them)."""
    if k0 == xb.shape[1]:       # NOTE: K % 32 == 0: no tail (its empty loops cost a 4x4 tile ~5%)
        return
    for r in range(nt):
        for c in range(no):
            a = np.float32(0.0)
            for k in range(k0, xb.shape[1]):
                a += lowp.widen(xb[t + r, k], lowp.BF16) * lowp.widen(w[o + c, k], lowp.BF16)
            acc[r * no + c] += a


@njit(fastmath=_FAST, error_model="numpy")
def _bf16_rows(xb, w, y, o0, o1):
    T, K = xb.shape
    n32 = K // 32
    k0 = n32 * 32
    acc = np.empty(16, np.float32)
    if T <= _FEW_ROWS:                      # one weight row at a time: one sequential stream
        for o in range(o0, o1):
            t = 0
            while t + 4 <= T:
                _D41(xb, t, w, o, n32, acc)
                if k0 != K:
                    _bf16_tail(xb, t, 4, w, o, 1, k0, acc)
                for r in range(4):
                    y[t + r, o] = acc[r]
                t += 4
            while t < T:
                _D11(xb, t, w, o, n32, acc)
                if k0 != K:                     # NOTE: a call per weight row otherwise, even when empty
                    _bf16_tail(xb, t, 1, w, o, 1, k0, acc)
                y[t, o] = acc[0]
                t += 1
        return
    for t0 in range(0, T, _ROW_TILE):
        t1 = min(T, t0 + _ROW_TILE)
        o = o0
        while o + 4 <= o1:
            if o + 8 <= o1:                     # the next group of 4 rows, while this one computes
                for r in range(4, 8):
                    for k in range(0, K, _LINE):
                        lowp.prefetch(w, o + r, k)
            t = t0
            while t + 4 <= t1:
                if k0 == K:
                    _D44Y(xb, t, w, o, n32, y)
                else:
                    _D44(xb, t, w, o, n32, acc)
                    _bf16_tail(xb, t, 4, w, o, 4, k0, acc)
                    for r in range(4):
                        for c in range(4):
                            y[t + r, o + c] = acc[r * 4 + c]
                t += 4
            while t < t1:
                for c in range(4):
                    _D11(xb, t, w, o + c, n32, acc[c:])
                _bf16_tail(xb, t, 1, w, o, 4, k0, acc)
                for c in range(4):
                    y[t, o + c] = acc[c]
                t += 1
            o += 4
        while o < o1:
            for t in range(t0, t1):
                _D11(xb, t, w, o, n32, acc)
                _bf16_tail(xb, t, 1, w, o, 1, k0, acc)
                y[t, o] = acc[0]
            o += 1


@njit(cache=True, nogil=True, error_model="numpy")
def _round_x(x, xb):
    for t in range(x.shape[0]):
        for k in range(x.shape[1]):
            xb[t, k] = lowp.to_bf16_bits(x[t, k])


@njit(fastmath=_FAST, cache=True, nogil=True, error_model="numpy")
def _bf16_serial(x, w, y):
    xb = np.empty(x.shape, np.uint16)
    _round_x(x, xb)
    _bf16_rows(xb, w, y, 0, w.shape[0])


@njit(fastmath=_FAST, parallel=True, cache=True, nogil=True, error_model="numpy")
def _bf16_parallel(x, w, y, num_tasks):
    xb = np.empty(x.shape, np.uint16)
    _round_x(x, xb)
    O = w.shape[0]
    groups = (O + 3) // 4
    for task in prange(num_tasks):
        o0 = min(O, task * groups // num_tasks * 4)
        o1 = min(O, (task + 1) * groups // num_tasks * 4)
        _bf16_rows(xb, w, y, o0, o1)


# _rows for one storage kind each, compiled once (not inlined): what linear_team calls per chunk.
@njit(fastmath=_FAST, cache=True, nogil=True, error_model="numpy")
def rows_f32(x, w, y, o0, o1):
    _rows(x, w, y, o0, o1, lowp.F32)


@njit(fastmath=_FAST, cache=True, nogil=True, error_model="numpy")
def rows_bf16(x, w, y, o0, o1):
    _rows(x, w, y, o0, o1, lowp.BF16)


@njit(fastmath=_FAST, cache=True, nogil=True, error_model="numpy")
def rows_f16(x, w, y, o0, o1):
    _rows(x, w, y, o0, o1, lowp.F16)


@njit(inline="always", error_model="numpy")
def _rows_of(x, xb, w, y, o0, o1, kind, bf16):
    if bf16:
        _bf16_rows(xb, w, y, o0, o1)
    elif kind == lowp.BF16:
        rows_bf16(x, w, y, o0, o1)
    elif kind == lowp.F16:
        rows_f16(x, w, y, o0, o1)
    else:
        rows_f32(x, w, y, o0, o1)


@njit(inline="always", error_model="numpy")
def linear_team(x, w, y, xb, sync, p, n, kind, bf16):
    """y[T, O] = x[T, K] @ widen(w[O, K])^T inside a compiled caller (the fused decode step,
    decode_step.py), as phase p of its team of threads (team.py): n chunks of contiguous outputs
    (multiples of 4), each claimed by whichever worker is free; returns when all n are finished.
    bf16 (a constant): bfloat16 weights through vdpbf16ps, x rounded into xb [T, K], THIS worker's
    own copy, once it has claimed its first chunk (a worker that claims none never reads x: by then
    the next phases may have overwritten it).
    NOTE: the row kernels are calls, not inlined: inlined into every GEMM of the caller they made
    its compilation take minutes."""
    O = w.shape[0]
    groups = (O + 3) // 4
    rounded = False
    while True:
        c = team.claim(sync, p, n)
        if c < 0:
            break
        if bf16 and not rounded:
            _round_x(x, xb)
            rounded = True
        _rows_of(x, xb, w, y, min(O, c * groups // n * 4), min(O, (c + 1) * groups // n * 4), kind, bf16)
        team.finish(sync, p)
    team.wait(sync, p, n)


def tasks_for(weight_bytes: int, threads: int) -> int:
    """Tasks of one GEMM: one below _PARALLEL_MIN_BYTES of weights (or on one thread), else 4 per thread."""
    return 4 * threads if weight_bytes >= _PARALLEL_MIN_BYTES and threads > 1 else 1


_KERNELS = {kind: _build(kind) for kind in (lowp.F32, lowp.BF16, lowp.F16)}
# NOTE: bfloat16 weights on a CPU with AVX-512 BF16 multiply bfloat16 activations (rounded to
# nearest even) in hardware; elsewhere they are widened and multiply float32 activations.
ROUNDS_BF16_ACTIVATIONS = bf16dot.HAS_BF16_DOT and os.environ.get("RAWPAGED_CPU_BF16_DOT", "1") != "0"
if ROUNDS_BF16_ACTIVATIONS:
    _KERNELS[lowp.BF16] = (_bf16_serial, _bf16_parallel)


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
    serial, parallel = _KERNELS[kind]
    tasks = tasks_for(weight.nbytes, dynamic_schedule())
    if tasks > 1:
        parallel(x, w, y, tasks)
    else:
        serial(x, w, y)
    return y


def linear(x: np.ndarray, weight: np.ndarray) -> np.ndarray:
    """x [..., K] float32 @ weight [O, K]^T -> [..., O] float32."""
    lead = x.shape[:-1]
    y = linear_2d(x.reshape(-1, x.shape[-1]), weight)
    return y.reshape(*lead, weight.shape[0])
