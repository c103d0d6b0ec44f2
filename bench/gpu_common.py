"""What the device-side benchmarks and tools/gpu_*.py share: CuPy (or its emulation), Markdown
written as it is measured, kernel timing with a cold L2, the copy-bandwidth ceiling.

Timing (METHOD.md's rules): every timed launch is preceded by a memset of a buffer larger than the
L2 cache (256 MiB against the H200's 60 MB), so its reads come from HBM; CUDA events are recorded
around the launch alone; the result is the median of many launches after a warm-up. The memset
keeps the GPU busy (~80 us at H200 bandwidth) while Python queues the event and the pre-built
launch, so no Python time falls between the two events (`KernelTimer.queue_ahead_ok` checks this:
the host must queue an iteration faster than the GPU runs the flush).
"""
from __future__ import annotations

import os
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
FLUSH_BYTES = 256 << 20


def import_cupy():
    """CuPy, or with RAWPAGED_EMULATE_CUDA=1 (the dry run on a machine without a GPU) the host
    emulation of tests/cuda_emulator.py installed in its place."""
    if os.environ.get("RAWPAGED_EMULATE_CUDA") == "1":
        sys.path.insert(0, str(REPO / "tests"))
        import cuda_emulator
        cuda_emulator.install_globally()
    import cupy
    return cupy


def emulated() -> bool:
    return os.environ.get("RAWPAGED_EMULATE_CUDA") == "1"


class Markdown:
    """Lines printed and appended to a file as they come (a step cut short keeps what it measured)."""

    def __init__(self, path: str | None):
        self.path = Path(path) if path else None

    def __call__(self, *lines: str) -> None:
        for line in lines:
            print(line, flush=True)
        if self.path is not None:
            with self.path.open("a") as f:
                f.write("".join(line + "\n" for line in lines))

    def table(self, header: list[str], rows: list[list]) -> None:
        self("| " + " | ".join(header) + " |", "|" + "---|" * len(header),
             *("| " + " | ".join(str(c) for c in row) + " |" for row in rows))


class Deadline:
    """The seconds a script may still spend: sections that would start after it are skipped."""

    def __init__(self, seconds: float):
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        return self.end - time.monotonic()

    def passed(self) -> bool:
        return self.left() <= 0


class KernelTimer:
    """Median milliseconds of `launch()` over `reps` launches, each after an L2 flush, timed by CUDA
    events recorded around the launch alone (on the current stream). `launch` should be pre-built:
    its arguments made once, so each call is one kernel launch (or two for split-K)."""

    def __init__(self, cp, flush_bytes: int = FLUSH_BYTES):
        self.cp = cp
        self.flush_buf = cp.empty((flush_bytes,), dtype=cp.uint8)
        self.flush_bytes = flush_bytes
        self.queue_ahead_ok = True

    def flush(self, value: int = 0) -> None:
        cp = self.cp
        cp.cuda.runtime.memsetAsync(self.flush_buf.data.ptr, value & 0xFF, self.flush_bytes,
                                    cp.cuda.get_current_stream().ptr)

    def time(self, launch, reps: int = 20, warmup: int = 3, flush: bool = True) -> float:
        cp = self.cp
        for _ in range(warmup):
            launch()
        stream = cp.cuda.get_current_stream()
        events = [(cp.cuda.Event(), cp.cuda.Event()) for _ in range(reps)]
        host = []
        for i, (start, end) in enumerate(events):
            t = time.perf_counter()
            if flush:
                self.flush(i)
            start.record(stream)
            launch()
            end.record(stream)
            host.append(time.perf_counter() - t)
        events[-1][1].synchronize()
        ms = [cp.cuda.get_elapsed_time(s, e) for s, e in events]
        if flush and statistics.median(host) * 1e3 > self.flush_ms():
            self.queue_ahead_ok = False
        return statistics.median(ms)

    def flush_ms(self) -> float:
        """What one flush takes on the GPU (measured once)."""
        if not hasattr(self, "_flush_ms"):
            self._flush_ms = self.time(self.flush, reps=10, warmup=2, flush=False)
        return self._flush_ms


def copy_bandwidth(cp, nbytes: int, reps: int = 10) -> float:
    """GB/s of a device-to-device cudaMemcpy of nbytes, counting the bytes read and written
    (METHOD.md's ceiling for memory-bound kernels)."""
    src = cp.empty((nbytes,), dtype=cp.uint8)
    dst = cp.empty_like(src)
    cp.cuda.runtime.memsetAsync(src.data.ptr, 7, nbytes, cp.cuda.get_current_stream().ptr)
    rt = cp.cuda.runtime
    copy = lambda: rt.memcpyAsync(dst.data.ptr, src.data.ptr, nbytes, rt.memcpyDeviceToDevice,  # noqa: E731
                                  cp.cuda.get_current_stream().ptr)
    ms = KernelTimer(cp, flush_bytes=1 << 20).time(copy, reps=reps, warmup=2, flush=False)
    return 2 * nbytes / (ms * 1e-3) / 1e9


def device_name(cp) -> str:
    name = cp.cuda.runtime.getDeviceProperties(cp.cuda.Device().id)["name"]
    return name.decode() if isinstance(name, bytes) else str(name)


def fill_random(cp, arr, chunk_elems: int = 1 << 28, std: float = 1.0) -> None:
    """arr[...] = normal(0, std) in arr's dtype, generated on the device a chunk at a time (never
    zeros: METHOD.md saw a product run 13% faster on zeros)."""
    flat = arr.reshape(-1)
    for i in range(0, flat.size, chunk_elems):
        n = min(chunk_elems, flat.size - i)
        flat[i:i + n] = (cp.random.standard_normal((n,), dtype=cp.float32) * std).astype(arr.dtype)
