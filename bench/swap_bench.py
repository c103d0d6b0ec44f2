"""Swap bandwidth: rawpaged's swap_blocks (device <-> pinned host, on the swap stream) against one
plain pinned-host copy of the same bytes (device only). Blocks have LLaMA-7B's shape
(32 layers, K and V, 32 KV heads, 16 tokens, head size 128, fp16: 8 MiB a block).

Two block orders: scattered (every block its own copy) and consecutive (runs merged into one copy).

    PYTHONPATH=. python bench/swap_bench.py [--quick] [--out table.md]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def timed(cp, stream, fn, iters: int) -> float:
    """Mean milliseconds of fn() (work queued on `stream`), CUDA events on that stream."""
    fn()
    stream.synchronize()
    start, end = cp.cuda.Event(), cp.cuda.Event()
    start.record(stream)
    for _ in range(iters):
        fn()
    end.record(stream)
    end.synchronize()
    return cp.cuda.get_elapsed_time(start, end) / iters


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--blocks", type=int, default=None, help="blocks moved per swap (default 64, quick 16)")
    ap.add_argument("--out")
    args = ap.parse_args(argv)
    import cupy as cp
    from rawpaged.backend import cuda

    n = args.blocks or (16 if args.quick else 64)
    iters = 3 if args.quick else 10
    block_shape = (32, 2, 32, 16, 128)
    dev = cp.empty((2 * n,) + block_shape, dtype=cp.float16)
    dev[...] = 1
    host = cuda.alloc_pinned((2 * n,) + block_shape, np.float16)
    stream = cuda.swap_stream()
    block_bytes = dev[0].nbytes
    total = n * block_bytes
    rng = np.random.default_rng(0)
    scattered = list(zip(rng.permutation(2 * n)[:n].tolist(), rng.permutation(2 * n)[:n].tolist()))
    consecutive = [(i, i) for i in range(n)]
    rows = []
    for label, pairs in (("scattered", scattered), ("consecutive", consecutive)):
        for direction, (src, dst) in (("out (device->host)", (dev, host)), ("in (host->device)", (host, dev))):
            ms = timed(cp, stream, lambda: cuda.swap_blocks(src, dst, pairs, stream=stream), iters)
            rows.append((f"swap_blocks {label}, {direction}", ms))
    for direction, (d_ptr, s_ptr) in (("out (device->host)", (host.ctypes.data, dev.data.ptr)),
                                      ("in (host->device)", (dev.data.ptr, host.ctypes.data))):
        ms = timed(cp, stream, lambda: cp.cuda.runtime.memcpyAsync(d_ptr, s_ptr, total, cp.cuda.runtime.memcpyDefault,
                                                                  stream.ptr), iters)
        rows.append((f"one plain pinned copy, {direction}", ms))
    name = cp.cuda.runtime.getDeviceProperties(cp.cuda.Device().id)["name"].decode()
    lines = [f"device: {name}; {n} blocks of {block_bytes / 2**20:.0f} MiB ({total / 2**30:.2f} GiB) per swap", "",
             "| what | ms | blocks/s | GB/s |", "| --- | --- | --- | --- |"]
    for what, ms in rows:
        lines.append(f"| {what} | {ms:.2f} | {n / (ms * 1e-3):.0f} | {total / (ms * 1e-3) / 1e9:.1f} |")
    text = "\n".join(lines)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
