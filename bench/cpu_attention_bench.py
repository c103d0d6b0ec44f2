"""CPU paged attention against the memory bandwidth it must move (rawpaged/backend/cpu/attention.py).

    python bench/cpu_attention_bench.py [--threads N]

Decode: `batch` sequences of `ctx` tokens, one query each, the random LLaMA's heads (8 query / 4 KV
heads of 64); bytes = the K and V of every context read once. Its GB/s is compared with a copy of
a 256 MB buffer measured in the same run (bytes read + written / time), the machine's copy rate.
Prefill: one sequence of `ctx` new tokens (causal), query tokens per second.
Medians of --repeat calls; the load average is printed (shared machines: compare within a run).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def median_time(fn, repeat: int) -> float:
    fn()
    ts = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return float(np.median(ts))


def copy_rate(repeat: int) -> float:
    """GB/s of a 256 MB copy (read + write bytes)."""
    a = np.ones(64 << 20, np.float32)
    b = np.empty_like(a)
    return 2 * a.nbytes / median_time(lambda: np.copyto(b, a), repeat) / 1e9


def case(cpu, dtype, batch: int, ctx: int, q_len: int, block_size: int = 16, H: int = 8, Hkv: int = 4, D: int = 64):
    rng = np.random.default_rng(0)
    nb = -(-ctx // block_size)
    kv = rng.standard_normal((batch * nb, 1, 2, Hkv, block_size, D), dtype=np.float32).astype(dtype)
    tables = rng.permutation(batch * nb).astype(np.int32).reshape(batch, nb)
    q = rng.standard_normal((batch * q_len, H, D), dtype=np.float32)
    seq_lens = np.full(batch, ctx, np.int32)
    qsl = (np.arange(batch + 1) * q_len).astype(np.int32)
    out = np.empty_like(q)
    fn = lambda: cpu.paged_attention(q, kv, 0, tables, seq_lens, qsl, D ** -0.5, out=out,  # noqa: E731
                                     max_query_len=q_len, max_seq_len=ctx)
    kv_bytes = batch * ctx * 2 * Hkv * D * np.dtype(dtype).itemsize
    return fn, kv_bytes


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--repeat", type=int, default=20)
    args = ap.parse_args()
    import numba

    from rawpaged.backend import cpu
    if args.threads:
        numba.set_num_threads(args.threads)
    copy = copy_rate(5)
    print(f"load average {os.getloadavg()[0]:.1f}; copy rate {copy:.1f} GB/s; threads {numba.get_num_threads()}\n")
    print("| kind | dtype | batch | ctx | ms | KV GB/s | / copy rate | tokens/s |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for dtype in (np.float32, cpu.resolve_dtype("bfloat16")):
        for batch, ctx in ((1, 512), (16, 256), (48, 256), (48, 1024)):
            fn, nbytes = case(cpu, dtype, batch, ctx, 1)
            t = median_time(fn, args.repeat)
            print(f"| decode | {np.dtype(dtype).name} | {batch} | {ctx} | {1e3 * t:.3f} | {nbytes / t / 1e9:.1f} | "
                  f"{nbytes / t / 1e9 / copy:.2f} | {batch / t:,.0f} |", flush=True)
        for ctx in (128, 512, 2048):
            fn, _ = case(cpu, dtype, 1, ctx, ctx)
            t = median_time(fn, max(3, args.repeat // 4))
            print(f"| prefill | {np.dtype(dtype).name} | 1 | {ctx} | {1e3 * t:.3f} | - | - | {ctx / t:,.0f} |", flush=True)


if __name__ == "__main__":
    main()
