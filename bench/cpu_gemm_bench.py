"""CPU linear() (rawpaged/backend/cpu/gemm.py) at the random LLaMA 512x8's shapes, in GFLOP/s.

    python bench/cpu_gemm_bench.py [--threads N] [--repeat 9] [--cpu-time]
    python bench/ab.py --base COMMIT --keys dtype rows shape -- bench/cpu_gemm_bench.py --cpu-time

y[T, O] = x[T, K] @ W[O, K]^T for the model's weight shapes (q+k+v 1024x512, gate+up 2752x512,
down 512x1376, the 32000x512 LM head) and T = 1, 4, 16, 48 (decode batches) and 2048 (a prefill
step), float32 and bfloat16 weights. GFLOP/s = 2 T O K / time, and for the few-row cases the weight
read rate (GB/s). Medians of --repeat calls after a warm-up; --cpu-time measures this thread's CPU
time (one thread: a busy shared machine disturbs it far less than the wall clock).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

SHAPES = {"qkv 1024x512": (1024, 512), "gate_up 2752x512": (2752, 512), "down 512x1376": (512, 1376),
          "lm_head 32000x512": (32000, 512)}
ROWS = (1, 4, 16, 48, 2048)


def median_time(fn, repeat: int, clock) -> float:
    fn()
    ts = []
    for _ in range(repeat):
        t = clock()
        fn()
        ts.append(clock() - t)
    return float(np.median(ts))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--repeat", type=int, default=9)
    ap.add_argument("--cpu-time", action="store_true", help="this thread's CPU time (use with --threads 1)")
    args = ap.parse_args()
    import numba

    from rawpaged.backend import cpu
    if args.threads:
        numba.set_num_threads(args.threads)
    clock = time.thread_time if args.cpu_time else time.perf_counter
    print(f"load average {os.getloadavg()[0]:.1f}; threads {numba.get_num_threads()}; "
          f"{'thread CPU time' if args.cpu_time else 'wall clock'}\n")
    print("| dtype | rows | shape | ms | GFLOP/s | weight GB/s |")
    print("| --- | ---: | --- | ---: | ---: | ---: |")
    rng = np.random.default_rng(0)
    for dtype in (np.float32, cpu.resolve_dtype("bfloat16")):
        for name, (O, K) in SHAPES.items():
            w = cpu.to_device(rng.standard_normal((O, K), dtype=np.float32).astype(dtype))
            for T in ROWS:
                if T == 2048 and O == 32000:
                    continue                     # the LM head runs only for sampled rows
                x = rng.standard_normal((T, K), dtype=np.float32)
                t = median_time(lambda: cpu.linear(x, w), args.repeat if T < 2048 else 3, clock)
                print(f"| {np.dtype(dtype).name} | {T} | {name} | {1e3 * t:.3f} | {2 * T * O * K / t / 1e9:.1f} | "
                      f"{w.nbytes / t / 1e9:.1f} |", flush=True)


if __name__ == "__main__":
    main()
