"""Serial and parallel compilations of one kernel that Numba's on-disk cache keeps apart.

Several CPU kernels are compiled twice from the same Python function: serially (small inputs: a
thread-pool launch costs tens of microseconds) and with parallel=True (prange loops on the pool).

NOTE: why not just `njit(**opts)(fn)` and `njit(parallel=True, **opts)(fn)`: Numba's cache names
its index file after the function's qualified name and first line, and keys the entries by
signature, CPU and bytecode, NOT by the compile options (numba/numba#6845, open). So the two
compilations share one cache entry, and whichever of them is compiled first is what BOTH run from
then on, in this process and in every later one with that cache: the paged attention's "parallel"
kernel ran on one thread wherever a small batch had compiled the serial one first, and the serial
one launched the thread pool where it was the other way round. The parallel twin here is a copy of
the function under another qualified name, so it gets an index file of its own.
"""
from __future__ import annotations

import types

from numba import njit


def twin(fn, suffix: str):
    """A copy of `fn` (same code, globals and closure) whose qualified name ends in `suffix`."""
    copy = types.FunctionType(fn.__code__, fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)
    copy.__qualname__ = f"{fn.__qualname__}{suffix}"
    copy.__doc__ = fn.__doc__
    return copy


def serial_and_parallel(fn, **opts):
    """(njit(**opts)(fn), njit(parallel=True, **opts) of fn's twin): two cache entries, not one."""
    return njit(**opts)(fn), njit(parallel=True, **opts)(twin(fn, "_parallel"))
