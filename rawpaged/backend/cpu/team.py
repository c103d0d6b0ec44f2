"""A team of threads through one compiled call: phases of claimed chunks, no fork/join between them.

The fused decode step (decode_step.py) at a few rows is ~33 GEMVs of 0.25-2.8 MB each. Memory-bound:
two threads read the weights ~1.5x as fast as one (bench/RESULTS.md, issue 18), but a parallel region
per GEMV (a prange: Numba wakes its sleeping workers and joins them) costs tens of microseconds each,
which ate the gain. Here ONE parallel region runs the whole step: every worker walks the same list of
phases (a norm, a GEMV, the attention, ...), and within a phase claims chunks of work from a shared
counter until none are left, then waits until every claimed chunk is finished:

    for each phase p (the same order in every worker):
        while (c = fetch_add(sync[2p], 1)) < n_p:     claim chunk c of n_p
            do chunk c;  fetch_add(sync[2p + 1], 1)     finished
        wait until sync[2p + 1] == n_p                  the phase's outputs are complete

NOTE: why claims and not a barrier of W threads: a barrier waits for every worker to ARRIVE, so it
deadlocks when the runtime runs two workers one after the other on one thread (Numba may, and does
with one thread), and stalls the step when a worker loses its core. Here a worker waits only for
chunks that some running worker has claimed: a worker that starts late finds the early phases all
claimed and skips them; one worker alone claims every chunk. A chunk is claimed only while its phase
is open, so its inputs are the finished outputs of the phase before (acquire/release order through
the counters, sequentially consistent atomics).

`sync` is an int64 array of 2 x phases, zero before the call.
"""
from __future__ import annotations

import platform

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic

_X86 = platform.machine().lower() in ("x86_64", "amd64", "i386", "i686", "x86")
_POSIX = platform.system() in ("Linux", "Darwin", "FreeBSD")
SPINS_BEFORE_YIELD = 1024   # pause instructions (~10-40 ns each) before a waiting worker yields its core


def _pointer(context, builder, aryty, ary, idx):
    a = context.make_array(aryty)(context, builder, ary)
    return cgutils.get_item_pointer(context, builder, aryty, a, [idx], wraparound=False)


@intrinsic
def fetch_add(typingctx, arr, i, v):
    """old = arr[i]; arr[i] += v, atomically (an int64 array; sequentially consistent) -> old."""
    def codegen(context, builder, sig, args):
        ptr = _pointer(context, builder, sig.args[0], args[0], args[1])
        val = context.cast(builder, args[2], sig.args[2], types.int64)
        return builder.atomic_rmw("add", ptr, val, "seq_cst")
    return types.int64(arr, i, v), codegen


@intrinsic
def load_acquire(typingctx, arr, i):
    """arr[i] read atomically (acquire: what was written before a matching release is seen)."""
    def codegen(context, builder, sig, args):
        ptr = _pointer(context, builder, sig.args[0], args[0], args[1])
        return builder.load_atomic(ptr, "acquire", 8)
    return types.int64(arr, i), codegen


@intrinsic
def relax(typingctx, spins):
    """One turn of a spin-wait: x86's `pause` (leaves the core's pipeline to others); every
    SPINS_BEFORE_YIELD turns, sched_yield() (POSIX) so that a worker that lost its core gets it back."""
    def codegen(context, builder, sig, args):
        if _X86:
            fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.VoidType(), []),
                                                "llvm.x86.sse2.pause")
            builder.call(fn, [])
        if _POSIX:
            n = context.cast(builder, args[0], sig.args[0], types.int64)
            due = builder.icmp_signed("==", builder.srem(n, ir.Constant(n.type, SPINS_BEFORE_YIELD)),
                                      ir.Constant(n.type, SPINS_BEFORE_YIELD - 1))
            with builder.if_then(due, likely=False):
                fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.IntType(32), []),
                                                    "sched_yield")
                builder.call(fn, [])
        return context.get_dummy_value()
    return types.void(spins), codegen


@njit(inline="always")
def claim(sync, p, n):
    """The next unclaimed chunk of phase p's n, or -1 when all are claimed."""
    c = fetch_add(sync, 2 * p, 1)
    return c if c < n else -1


@njit(inline="always")
def finish(sync, p):
    fetch_add(sync, 2 * p + 1, 1)


@njit(inline="always")
def wait(sync, p, n):
    """Until all n chunks of phase p are finished."""
    spins = 0
    while load_acquire(sync, 2 * p + 1) < n:
        relax(spins)
        spins += 1


def new_sync(phases: int) -> np.ndarray:
    return np.zeros(2 * phases, np.int64)
