"""Device plumbing: CuPy, compiled modules, kernel lookup and launches.

  - `module(source, tag)` compiles kernels.program(source, tag) (the .cu text and its generated entry
    points) with NVRTC through `cupy.RawModule`, for the current GPU's architecture. CuPy caches the
    cubin on disk (~/.cupy/kernel_cache, or $CUPY_CACHE_DIR) keyed by the source text, the options,
    the architecture and the NVRTC version; the text holds the pasted header and every generated
    wrapper, so that key covers every line of kernel code: no cache of our own is needed.
  - `launch(kernel, grid, block, args, shared_mem)` checks the tuple against the kernel's parameter
    count and the block against its __launch_bounds__, opts in to more than 48 KiB of dynamic
    shared memory where needed, and launches on the current stream. With RAWPAGED_CUDA_SYNC=1 each
    launch is followed by a synchronize, so an asynchronous fault names its kernel.

NOTE: `cupy` and `num_sms` are read through this module at call time (tests/cuda_emulator.py swaps
them for its stand-ins, through the package: `rawpaged.backend.cuda.cupy = ...`).
"""
from __future__ import annotations

import functools
import os

import numpy as np

from rawpaged.backend.cuda import dispatch, kernels
from rawpaged.errors import RawpagedError

try:  # NOTE: guarded so the package can be imported and its dispatch tested on machines without CuPy.
    import cupy
except Exception:  # pragma: no cover - depends on the machine
    cupy = None

SYNC = os.environ.get("RAWPAGED_CUDA_SYNC", "") not in ("", "0")
MAX_DEFAULT_SHARED = 48 * 1024          # dynamic shared memory a kernel gets without opting in


def require_cupy():
    if cupy is None:
        raise RawpagedError("the CUDA backend needs CuPy (pip install 'rawpaged[cuda]') and a CUDA device")
    return cupy


@functools.lru_cache(maxsize=None)
def module(source: str, tag: str = ""):
    """The compiled module of one source file ('' tag: every dtype; paged_attention.cu: one dtype)."""
    return require_cupy().RawModule(code=kernels.program(source, tag), options=("--std=c++17",))


@functools.lru_cache(maxsize=None)
def function(name: str):
    """The CuPy kernel object of one table entry."""
    k = kernels.kernel(name)
    return module(k.source, k.tag).get_function(k.name)


def clear_caches() -> None:
    module.cache_clear()
    function.cache_clear()
    occupancy.cache_clear()
    device_limits.cache_clear()


def allow_shared(fn, nbytes: int) -> None:
    """Opt a kernel in to more than 48 KiB of dynamic shared memory (prefill at head size 256)."""
    if nbytes <= MAX_DEFAULT_SHARED:
        return
    from cupy.cuda import driver
    handle = getattr(fn, "function", None) or getattr(fn, "kernel")
    driver.funcSetAttribute(handle.ptr, driver.CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, int(nbytes))


def launch(k: kernels.Kernel, grid, block, args: tuple, shared_mem: int = 0) -> None:
    """Run kernel `k` over `grid` blocks of `block` threads with `args` (from its builder in kernels.py)."""
    if len(args) != len(k.params):
        raise TypeError(f"{k.name} takes {len(k.params)} arguments, got {len(args)}")
    if not 1 <= block[0] * block[1] * block[2] <= k.max_threads:
        raise ValueError(f"{k.name}: a block of {tuple(block)} threads exceeds its launch bounds ({k.max_threads})")
    fn = function(k.name)
    allow_shared(fn, shared_mem)
    fn(tuple(int(g) for g in grid), tuple(int(b) for b in block), args, shared_mem=int(shared_mem))
    if SYNC:
        try:
            cupy.cuda.get_current_stream().synchronize()
        except Exception as err:
            raise RuntimeError(f"CUDA kernel {k.name} failed: {err}") from err


@functools.lru_cache(maxsize=None)
def num_sms() -> int:
    return int(require_cupy().cuda.Device().attributes["MultiProcessorCount"])


@functools.lru_cache(maxsize=None)
def device_limits() -> dispatch.DeviceLimits:
    """The current device's per-SM limits (cudaDeviceGetAttribute through CuPy); H100 values where
    an attribute is missing."""
    attrs = require_cupy().cuda.Device().attributes
    d = dispatch.DeviceLimits()
    return dispatch.DeviceLimits(
        shared_per_sm=int(attrs.get("MaxSharedMemoryPerMultiprocessor", d.shared_per_sm)),
        registers_per_sm=int(attrs.get("MaxRegistersPerMultiprocessor", d.registers_per_sm)),
        threads_per_sm=int(attrs.get("MaxThreadsPerMultiProcessor", d.threads_per_sm)),
        blocks_per_sm=int(attrs.get("MaxBlocksPerMultiprocessor", d.blocks_per_sm)),
        reserved_shared_per_block=int(attrs.get("ReservedSharedMemoryPerBlock", d.reserved_shared_per_block)))


@functools.lru_cache(maxsize=None)
def occupancy(name: str, dynamic_shared: int, threads: int = kernels.NUM_THREADS) -> int:
    """Resident blocks per SM of kernel `name` launched with `threads` threads and `dynamic_shared`
    bytes: its registers and static shared memory read from the compiled kernel (compiling its module
    on first use), the limits from the device (dispatch.resident_blocks)."""
    attrs = function(name).attributes
    return dispatch.resident_blocks(int(attrs.get("num_regs", 0)), int(attrs.get("shared_size_bytes", 0)),
                                    int(dynamic_shared), int(threads), device_limits())


def on_device(arr, dtype=None):
    """Index arrays may come from the host: upload (and convert) them; device arrays pass through."""
    cp = require_cupy()
    if isinstance(arr, cp.ndarray):
        return arr if dtype is None or arr.dtype == dtype else arr.astype(dtype)
    return cp.asarray(np.ascontiguousarray(arr, dtype=dtype))


def packable(x) -> bool:
    """Rows of x can be read with 16-byte loads: aligned base, token stride a multiple of 16 bytes."""
    return x.data.ptr % 16 == 0 and (x.shape[0] <= 1 or x.strides[0] % 16 == 0) and (x.shape[-1] * x.dtype.itemsize) % 16 == 0
