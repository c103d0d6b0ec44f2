"""Paged decode attention against the bandwidth it must move (device only).

For each shape: time of rawpaged's decode kernel (CUDA events, mean of N launches after warm-up),
bytes moved (the batch's K and V read once, plus q and out), achieved GB/s and its fraction of the
device copy bandwidth measured in the same run (a device-to-device copy of a large buffer, counting
bytes read + written). Where torch is importable, the same shapes through
torch.nn.functional.scaled_dot_product_attention on contiguous K/V are timed as a yardstick (torch is
never a dependency of rawpaged). Prints a Markdown table.

    PYTHONPATH=. python bench/attention_bench.py [--quick] [--out table.md]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def time_cupy(cp, fn, iters: int, warmup: int = 3) -> float:
    """Mean milliseconds of fn() over iters launches, timed with CUDA events."""
    for _ in range(warmup):
        fn()
    start, end = cp.cuda.Event(), cp.cuda.Event()
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    end.synchronize()
    return cp.cuda.get_elapsed_time(start, end) / iters


def copy_bandwidth(cp, nbytes: int) -> float:
    """GB/s of a device-to-device copy, counting the bytes read and written."""
    src = cp.ones(nbytes // 2, dtype=cp.float16)
    dst = cp.empty_like(src)
    ms = time_cupy(cp, lambda: dst.__setitem__(Ellipsis, src), iters=20)
    return 2 * nbytes / (ms * 1e-3) / 1e9


def bench_paged(cp, cuda, batch, ctx, heads, kv_heads, head_dim, block_size, dtype, iters):
    rng = np.random.default_rng(0)
    blocks_per_seq = ctx // block_size
    num_blocks = batch * blocks_per_seq
    kv = cp.random.standard_normal((num_blocks, 1, 2, kv_heads, block_size, head_dim), dtype=cp.float32).astype(dtype)
    tables = cp.asarray(rng.permutation(num_blocks).astype(np.int32).reshape(batch, blocks_per_seq))
    q = cp.random.standard_normal((batch, heads, head_dim), dtype=cp.float32).astype(dtype)
    seq_lens = cp.full(batch, ctx, dtype=cp.int32)
    qsl = cp.arange(batch + 1, dtype=cp.int32)
    out = cp.empty_like(q)
    scale = head_dim ** -0.5
    plan = cuda.select_decode_kernel(head_dim, dtype, block_size, batch, heads, kv_heads, ctx, cuda.num_sms())
    ms = time_cupy(cp, lambda: cuda.paged_attention(q, kv, 0, tables, seq_lens, qsl, scale, out=out,
                                                     max_query_len=1, max_seq_len=ctx), iters)
    itemsize = np.dtype(dtype).itemsize
    nbytes = batch * ctx * kv_heads * head_dim * 2 * itemsize + 2 * q.nbytes
    del kv
    return ms, nbytes, plan


def bench_torch(batch, ctx, heads, kv_heads, head_dim, iters):
    try:
        import torch
        import torch.nn.functional as F
    except Exception:
        return None
    if not torch.cuda.is_available():
        return None
    q = torch.randn(batch, heads, 1, head_dim, device="cuda", dtype=torch.float16)
    k = torch.randn(batch, kv_heads, ctx, head_dim, device="cuda", dtype=torch.float16)
    v = torch.randn_like(k)

    def run():
        return F.scaled_dot_product_attention(q, k, v, enable_gqa=heads != kv_heads)

    for _ in range(3):
        run()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        run()
    end.record()
    torch.cuda.synchronize()
    ms = start.elapsed_time(end) / iters
    del q, k, v
    torch.cuda.empty_cache()
    return ms


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer shapes and iterations")
    ap.add_argument("--dtype", default="float16", choices=["float16", "bfloat16"])
    ap.add_argument("--out", help="also write the Markdown table here")
    args = ap.parse_args(argv)
    import cupy as cp
    from rawpaged.backend import cuda

    dtype = cuda.resolve_dtype(args.dtype)
    iters = 10 if args.quick else 50
    dev = cp.cuda.Device()
    name = cp.cuda.runtime.getDeviceProperties(dev.id)["name"].decode()
    copy_bw = copy_bandwidth(cp, (1 << 30) if args.quick else (4 << 30))
    shapes = []
    for heads, kv_heads in ((32, 32), (32, 8)):
        for ctx in (256, 1024, 4096):
            shapes.append((64, ctx, heads, kv_heads, 16))
        if not args.quick or kv_heads == 8:
            shapes += [(64, 4096, heads, kv_heads, bs) for bs in (8, 32)]
    shapes += [(1, 4096, 32, 8, 16), (4, 16384, 32, 8, 16)]          # few long sequences: split-K
    lines = [f"device: {name}; dtype {args.dtype}; head size 128; measured device copy bandwidth "
             f"{copy_bw:.0f} GB/s (read + write)", "",
             "| batch | context | heads q/kv | block | kernel | split-K | ms | GB moved | GB/s | of copy bw | torch SDPA ms | paged / SDPA |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for batch, ctx, heads, kv_heads, bs in shapes:
        ms, nbytes, plan = bench_paged(cp, cuda, batch, ctx, heads, kv_heads, 128, dtype, iters)
        gbs = nbytes / (ms * 1e-3) / 1e9
        t_ms = bench_torch(batch, ctx, heads, kv_heads, 128, iters) if args.dtype == "float16" else None
        torch_cols = f"{t_ms:.3f} | {ms / t_ms:.2f}" if t_ms else "- | -"
        split = f"{plan.num_partitions} parts" if plan.use_split_k else "no"
        lines.append(f"| {batch} | {ctx} | {heads}/{kv_heads} | {bs} | {plan.kernel} | {split} | {ms:.3f} | "
                     f"{nbytes / 1e9:.3f} | {gbs:.0f} | {gbs / copy_bw:.0%} | {torch_cols} |")
        cp.get_default_memory_pool().free_all_blocks()
    text = "\n".join(lines)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
