"""Device memory, streams and dtypes: uploads and downloads, the swap pool and its copies, events.

Importing this needs neither CuPy nor a device (launch.require_cupy raises a one-line error when an
op runs without them).
"""
from __future__ import annotations

import gc
from dataclasses import dataclass

import numpy as np

from rawpaged.backend.cuda import launch
from rawpaged.backend.cuda.dispatch import copy_runs, float32_to_bfloat16_bits, resolve_dtype_name
from rawpaged.backend.cuda.launch import require_cupy

try:
    import ml_dtypes
    BFLOAT16 = np.dtype(ml_dtypes.bfloat16)
except Exception:  # pragma: no cover - depends on the machine
    BFLOAT16 = None


def _host_or_device_ptr(arr) -> int:
    cp = require_cupy()
    if isinstance(arr, cp.ndarray):
        return arr.data.ptr
    return arr.ctypes.data


def swap_blocks(src, dst, pairs, stream=None):
    """dst[d] = src[s] for each (s, d): device <-> pinned host, one async copy per run of consecutive
    blocks (block-major layout: a block is contiguous). On `stream` (the swap stream) the copies first
    wait for the work already queued on the current stream, so a swap-out reads finished blocks; the
    caller records an event on `stream` and the compute stream waits on it (record_event/wait_event)."""
    cp = require_cupy()
    pairs = np.asarray(pairs, dtype=np.int64).reshape(-1, 2)
    if not len(pairs):
        return
    if tuple(src.shape[1:]) != tuple(dst.shape[1:]) or src.dtype.itemsize != dst.dtype.itemsize:
        raise ValueError(f"swap_blocks: block shapes differ: {tuple(src.shape)} {src.dtype} vs {tuple(dst.shape)} {dst.dtype}")
    if not (src.flags.c_contiguous and dst.flags.c_contiguous):
        raise ValueError("swap_blocks: both caches must be C-contiguous")
    if pairs[:, 0].min() < 0 or pairs[:, 0].max() >= src.shape[0] or pairs[:, 1].min() < 0 or pairs[:, 1].max() >= dst.shape[0]:
        raise ValueError("swap_blocks: block id out of range")
    block_bytes = int(np.prod(src.shape[1:])) * src.dtype.itemsize
    src_ptr, dst_ptr = _host_or_device_ptr(src), _host_or_device_ptr(dst)
    current = cp.cuda.get_current_stream()
    stream = stream or current
    if stream.ptr != current.ptr:
        stream.wait_event(current.record())
    for s, d, n in copy_runs(pairs):
        cp.cuda.runtime.memcpyAsync(dst_ptr + d * block_bytes, src_ptr + s * block_bytes, n * block_bytes,
                                    cp.cuda.runtime.memcpyDefault, stream.ptr)


def alloc_pinned(shape, dtype):
    """A NumPy array in page-locked host memory (the CPU swap pool): async copies need it."""
    require_cupy()
    import cupyx
    return cupyx.empty_pinned(tuple(shape), dtype=np.dtype(dtype))


def swap_stream():
    """A dedicated non-blocking stream for swaps (it does not serialise with the legacy default stream)."""
    return require_cupy().cuda.Stream(non_blocking=True)


def record_event(stream):
    event = require_cupy().cuda.Event(disable_timing=True)
    event.record(stream)
    return event


def wait_event(event):
    """The current (compute) stream waits for `event` before the work queued after this call."""
    require_cupy().cuda.get_current_stream().wait_event(event)


def free_device_memory() -> int:
    """Bytes the driver reports free (CuPy's pool counts as used, also the blocks it keeps cached)."""
    return int(require_cupy().cuda.runtime.memGetInfo()[0])


def total_device_memory() -> int:
    return int(require_cupy().cuda.runtime.memGetInfo()[1])


def to_device(array, dtype=None):
    """Host (or device) array -> contiguous CuPy array, converted to `dtype` (bf16 rounded on the host)."""
    cp = require_cupy()
    want = np.dtype(dtype) if dtype is not None else None
    if isinstance(array, cp.ndarray):
        return cp.ascontiguousarray(array if want is None or array.dtype == want else array.astype(want))
    array = np.asarray(array)
    if want is not None and want.name == "bfloat16" and array.dtype.name != "bfloat16":
        bits = float32_to_bfloat16_bits(array.astype(np.float32, copy=False))
        return cp.asarray(bits).view(want)
    return cp.asarray(np.ascontiguousarray(array, dtype=want))


def to_host(array):
    cp = require_cupy()
    return cp.asnumpy(array) if isinstance(array, cp.ndarray) else np.asarray(array)


def synchronize():
    require_cupy().cuda.Device().synchronize()


def bfloat16_supported() -> bool:
    """ml_dtypes is importable and this CuPy can hold a bfloat16 array."""
    if BFLOAT16 is None or launch.cupy is None:
        return False
    try:
        launch.cupy.empty((1,), dtype=BFLOAT16)
        return True
    except Exception:
        return False


def resolve_dtype(dtype, torch_dtype=None):
    """'auto' (from the checkpoint's torch_dtype), 'float16', 'bfloat16' or 'float32' -> a NumPy dtype."""
    name_ = resolve_dtype_name(dtype, torch_dtype, bf16_ok=bfloat16_supported())
    return BFLOAT16 if name_ == "bfloat16" else np.dtype(name_)


# --------------------------------------------------------------------------------------------
# What the device holds, for the KV cache's profiling pass (executor/local.py)
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class MemorySnapshot:
    """Device memory as CuPy's default pool and the driver see it, in bytes.

    NOTE: CuPy's pool keeps the blocks of freed arrays for reuse, so the driver counts them as used
    until `free_all_blocks()`; `pool_held` only grows while nothing releases it, which makes it the
    peak of `pool_used` over a stretch of work started right after a release.
    """
    total: int          # the device's memory
    free: int           # what the driver reports free
    pool_used: int      # bytes of live CuPy arrays in this process
    pool_held: int      # bytes the pool holds: live arrays plus cached blocks of freed ones

    @property
    def outside_pool(self) -> int:
        """Used but not through the pool: the CUDA context, loaded modules, cuBLAS workspaces, other processes."""
        return max(0, self.total - self.free - self.pool_held)


def memory_snapshot(release: bool = False) -> MemorySnapshot:
    """The device's memory now. release=True first collects garbage (an engine dropped inside a
    reference cycle still holds its arrays until the collector runs) and hands the pool's cached
    blocks back to the driver, so what is counted is what live arrays hold."""
    cp = require_cupy()
    pool = cp.get_default_memory_pool()
    if release:
        gc.collect()
        synchronize()
        pool.free_all_blocks()
    free, total = cp.cuda.runtime.memGetInfo()
    return MemorySnapshot(int(total), int(free), int(pool.used_bytes()), int(pool.total_bytes()))
