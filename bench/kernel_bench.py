"""Kernel performance on the device, against the ceilings measured in the same run (step 5 of
tools/gpu_check.sh). Device only (or the host emulation with --smoke, to check this script).

    PYTHONPATH=. python bench/kernel_bench.py [--md FILE] [--budget SECONDS] [--smoke]
                                              [--sections ceiling,decode,prefill,memory,gemm]

Method (bench/gpu_common.py): the memory ceiling is a device-to-device cudaMemcpy of 4 GiB
(bytes read + written over its time); every timed launch follows a memset of 256 MiB (> the
H200's 60 MB L2), CUDA events around the launch alone, the median of 20 launches after 3 warm-up
ones; launches are pre-built (the table's argument builders run once, each timed call is the
RawKernel call alone) except the memory-bound ops, whose runs are long next to the Python of an op.

Sections, in the order they run (a section that would start past --budget is skipped, one that
fails is reported and the next runs):
  ceiling  cudaMemcpy GB/s, the flush's time, whether Python stays ahead of the GPU;
  decode   issue 13's shapes (32 query heads, head size 128, block 16, fp16): batch 64 at contexts
           4096 and 512 over 8 and 32 KV heads, batch 1 with 8 KV heads at 4096 and 32768: KV bytes
           read once (+ q, out) over the time, as a fraction of the memcpy bandwidth, beside the
           target; the same plan on contiguous KV; the CUDA-core kernel and split-K off for
           comparison; each pre-built launch checked once against the op's output;
  prefill  one sequence of 2K and 8K new tokens, 32 query heads over 32 or 8 KV heads, fp16 and
           bf16: causal FLOPs (2 * heads * D * T * (T + 1)) over the time, beside torch's
           scaled_dot_product_attention (is_causal, contiguous K/V) where torch imports;
  memory   reshape_and_cache, copy_blocks, rms_norm, fused_add_rms_norm, rotary, silu_and_mul,
           gelu on LLaMA-7B widths and 16384 tokens: GB/s and fraction of memcpy;
  gemm     `linear` (cuBLAS through CuPy, fp32 accumulation) beside torch.matmul on LLaMA-7B's
           projections for T in {1, 16, 64, 512, 4096} tokens, fp16 and bf16: TFLOP/s, and GB/s
           for the small T where the weights' bytes bound the time.
torch is imported inside this script only (never by rawpaged or its tests).
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_common import Deadline, KernelTimer, Markdown, copy_bandwidth, device_name, fill_random, import_cupy  # noqa: E402


@dataclass
class Sizes:
    copy_bytes: int = 4 << 30
    flush_bytes: int = 256 << 20
    reps: int = 20
    heads: int = 32
    head_dim: int = 128
    # decode: (batch, context, KV heads, target fraction of memcpy), issue 13's acceptance shapes
    decode_cases: tuple = ((64, 4096, 8, 0.85), (64, 4096, 32, 0.85), (64, 512, 8, 0.60), (64, 512, 32, 0.60),
                           (1, 4096, 8, 0.60), (1, 32768, 8, 0.60))
    prefill_tokens: tuple = (2048, 8192)
    prefill_kv_heads: tuple = (32, 8)
    tokens: int = 16384
    hidden: int = 4096
    intermediate: int = 11008
    gemm_tokens: tuple = (1, 16, 64, 512, 4096)
    gemm_shapes: dict = field(default_factory=lambda: {"qkv": (12288, 4096), "o": (4096, 4096),
                                                       "gate_up": (22016, 4096), "down": (4096, 11008),
                                                       "lm_head": (32000, 4096)})


FULL = Sizes()
# --smoke: the same code on sizes the host emulation runs in seconds (a check of this script only)
SMOKE = Sizes(copy_bytes=1 << 20, flush_bytes=1 << 16, reps=2, heads=4, head_dim=64,
              decode_cases=((2, 48, 1, 0.85), (2, 48, 4, 0.85), (1, 150, 1, 0.6)), prefill_tokens=(40,),
              prefill_kv_heads=(4, 1), tokens=8, hidden=256, intermediate=128, gemm_tokens=(1, 4),
              gemm_shapes={"qkv": (96, 64), "down": (64, 128)})


class Bench:
    def __init__(self, cp, md: Markdown, sizes: Sizes):
        from rawpaged.backend import cuda
        self.cp, self.md, self.s, self.cuda = cp, md, sizes, cuda
        self.timer = KernelTimer(cp, sizes.flush_bytes)
        self.bw = None
        self.rng = np.random.default_rng(0)
        self.torch = _import_torch()

    def frac(self, nbytes: int, ms: float) -> str:
        gbs = nbytes / (ms * 1e-3) / 1e9
        return f"{gbs:,.0f} GB/s ({gbs / self.bw:.0%})"

    def randn(self, shape, dtype, std=1.0):
        a = self.cp.empty(shape, dtype=dtype)
        fill_random(self.cp, a, std=std)
        return a

    # -- ceiling ---------------------------------------------------------------------------
    def ceiling(self):
        cp, s = self.cp, self.s
        self.bw = copy_bandwidth(cp, s.copy_bytes)
        flush_ms = self.timer.flush_ms()
        props = cp.cuda.runtime.getDeviceProperties(cp.cuda.Device().id)
        self.md(f"device: {device_name(cp)}, {props.get('multiProcessorCount')} SMs, L2 "
                f"{props.get('l2CacheSize', 0) / 2**20:.0f} MiB", "",
                f"- memory ceiling: cudaMemcpy device-to-device of {s.copy_bytes / 2**30:.2f} GiB: "
                f"**{self.bw:,.0f} GB/s** (read + write; every fraction below is of this)",
                f"- L2 flush between timed launches: memset of {s.flush_bytes / 2**20:.0f} MiB, {flush_ms:.3f} ms on the GPU", "")

    # -- decode ----------------------------------------------------------------------------
    def prebuilt_attention(self, plan, q, kv, tables, seq_lens, qsl, scale, out):
        """The plan's launches with their argument tuples built once: each call is only the RawKernel calls."""
        from rawpaged.backend.cuda import dispatch, kernels, launch
        cp = self.cp
        k = kernels.kernel(plan.kernel)
        batch = kernels.AttentionBatch(q, dispatch.token_stride(q, "q", tuple(q.shape[1:])), kv, 0, tables, seq_lens,
                                       qsl, scale)
        if k.family is kernels.PAGED_PREFILL:
            args = kernels.prefill_args(k, out, batch, plan.group_tile)
            calls = [(launch.function(k.name), plan.grid, plan.block, args, plan.shared_mem)]
        else:
            scratch = None
            if plan.use_split_k:
                rows = seq_lens.shape[0] * q.shape[1] * plan.num_partitions
                scratch = (cp.empty((rows, q.shape[2]), dtype=cp.float32), cp.empty((rows,), dtype=cp.float32),
                           cp.empty((rows,), dtype=cp.float32))
            calls = [(launch.function(k.name), plan.grid, plan.block, kernels.decode_args(k, out, batch, plan, scratch),
                      plan.shared_mem)]
            if plan.use_split_k:
                r = kernels.kernel(plan.reduce_kernel)
                calls.append((launch.function(r.name), plan.reduce_grid, (kernels.NUM_THREADS, 1, 1),
                              kernels.decode_reduce_args(r, out, batch, plan, scratch), plan.reduce_shared_mem))
        for fn, _, _, _, smem in calls:
            launch.allow_shared(fn, smem)

        def run():
            for fn, grid, block, args, smem in calls:
                fn(grid, block, args, shared_mem=smem)
        run.keep = (calls, batch)          # NOTE: the scratch arrays must outlive the launches
        return run

    def decode(self, deadline: Deadline):
        """Issue 13's acceptance shapes: each as the dispatcher runs it (kernel, partitions from the
        compiled kernel's occupancy), the same plan on contiguous KV (block table = identity: pages in
        order, no scatter), the CUDA-core kernel where `auto` takes the tensor-core one, and split-K
        off where `auto` splits. Bytes: K and V read once (+ q, out) over the time, of memcpy."""
        from rawpaged.backend.cuda import dispatch, launch
        cp, s = self.cp, self.s
        dtype, D, bs = np.dtype(np.float16), s.head_dim, 16
        most = max(b * math.ceil(c / bs) * 2 * kvh * bs * D for b, c, kvh, _ in s.decode_cases)
        pool = self.randn((most,), dtype)
        self.md(f"fp16, {s.heads} query heads, head size {D}, block {bs}; KV pool of {pool.nbytes / 2**30:.1f} GiB "
                f"(random); paged: the block table a random permutation; contiguous: the identity", "")
        header = ["batch", "context", "heads q/kv", "kernel (partitions)", "paged ms", "of memcpy", "target",
                  "contiguous ms", "paged / contiguous", "CUDA-core kernel ms (of memcpy)", "split-K off ms (of memcpy)"]
        rows = []
        for batch, ctx, kv_heads, target in s.decode_cases:
            if deadline.passed():
                rows.append([batch, ctx, f"{s.heads}/{kv_heads}", "skipped: out of time"] + [""] * 7)
                continue
            per_seq = math.ceil(ctx / bs)
            nblocks = batch * per_seq
            kv = pool[: nblocks * 2 * kv_heads * bs * D].reshape(nblocks, 1, 2, kv_heads, bs, D)
            paged = cp.asarray(self.rng.permutation(nblocks).astype(np.int32).reshape(batch, per_seq))
            contiguous = cp.arange(nblocks, dtype=cp.int32).reshape(batch, per_seq)
            seq_lens = cp.full((batch,), ctx, dtype=cp.int32)
            qsl = cp.arange(batch + 1, dtype=cp.int32)
            q = self.randn((batch, s.heads, D), dtype)
            nbytes = batch * ctx * kv_heads * D * 2 * dtype.itemsize + 2 * q.nbytes
            scale = D ** -0.5
            refs = {name: self.cuda.paged_attention(q, kv, 0, t, seq_lens, qsl, scale, max_query_len=1, max_seq_len=ctx)
                    for name, t in (("paged", paged), ("contiguous", contiguous))}

            def timed(tables, ref, **kw):
                plan = dispatch.select_decode_kernel(D, dtype, bs, batch, s.heads, kv_heads, ctx, launch.num_sms(),
                                                     blocks_per_sm=launch.occupancy, **kw)
                out = cp.empty_like(q)
                ms = self.timer.time(self.prebuilt_attention(plan, q, kv, tables, seq_lens, qsl, scale, out),
                                     reps=s.reps)
                a, b = cp.asnumpy(out).astype(np.float32), cp.asnumpy(ref).astype(np.float32)
                return plan, ms, "" if np.allclose(a, b, rtol=1e-2, atol=1e-2) else " !"

            plan, ms, bad = timed(paged, refs["paged"])
            _, ms_c, bad_c = timed(contiguous, refs["contiguous"])
            simt = "-"
            if "_mma_" in plan.kernel:
                _, ms_s, bad_s = timed(paged, refs["paged"], decode_policy="simt")
                simt = f"{ms_s:.4f}{bad_s} ({self.frac(nbytes, ms_s).split('(')[1]}"
            unsplit = "-"
            if plan.use_split_k:
                _, ms_u, bad_u = timed(paged, refs["paged"], policy="never")
                unsplit = f"{ms_u:.4f}{bad_u} ({self.frac(nbytes, ms_u).split('(')[1]}"
            parts = f" ({plan.num_partitions}, {plan.blocks_per_sm} blocks/SM)" if plan.use_split_k else \
                f" (1, {plan.blocks_per_sm} blocks/SM)"
            rows.append([batch, ctx, f"{s.heads}/{kv_heads}", plan.kernel + parts, f"{ms:.4f}{bad}",
                         self.frac(nbytes, ms), f">= {target:.0%}", f"{ms_c:.4f}{bad_c}", f"{ms / ms_c:.3f}",
                         simt, unsplit])
            del kv, q, refs
        self.md.table(header, rows)
        self.md("", "Targets (issue 13): >= 85% of memcpy at batch 64 / context 4096, >= 60% at context 512 and "
                "at batch 1 with 8 KV heads; paged within 5% of contiguous (paged / contiguous <= 1.05). A `!` "
                "after a time: that launch's output differed from the op's (not trusted).", "")
        del pool

    # -- prefill ---------------------------------------------------------------------------
    def prefill(self, deadline: Deadline):
        from rawpaged.backend.cuda import dispatch
        cp, s = self.cp, self.s
        D, bs = s.head_dim, 16
        dtypes = [np.dtype(np.float16)] + ([self.cuda.BFLOAT16] if self.cuda.bfloat16_supported() else [])
        header = ["dtype", "heads q/kv", "tokens", "kernel (heads a block)", "ms", "TFLOP/s", "torch SDPA ms", "TFLOP/s",
                  "of SDPA's TFLOP/s (target >= 50%)"]
        rows = []
        for dtype in dtypes:
            for kv_heads in s.prefill_kv_heads:
                for T in s.prefill_tokens:
                    if deadline.passed():
                        rows.append([dtype.name, f"{s.heads}/{kv_heads}", T, "skipped: out of time", "", "", "", "", ""])
                        continue
                    nblocks = math.ceil(T / bs)
                    kv = self.randn((nblocks, 1, 2, kv_heads, bs, D), dtype)
                    tables = cp.asarray(self.rng.permutation(nblocks).astype(np.int32).reshape(1, nblocks))
                    seq_lens = cp.asarray(np.array([T], np.int32))
                    qsl = cp.asarray(np.array([0, T], np.int32))
                    q = self.randn((T, s.heads, D), dtype)
                    out = cp.empty_like(q)
                    plan = dispatch.select_prefill_kernel(D, dtype, bs, 1, s.heads, kv_heads, T, T, policy="mma")
                    ms = self.timer.time(self.prebuilt_attention(plan, q, kv, tables, seq_lens, qsl, D ** -0.5, out),
                                         reps=s.reps)
                    flops = 2 * s.heads * D * T * (T + 1)
                    t_ms = self.torch_sdpa(dtype, s.heads, kv_heads, T, D)
                    torch_cols = ([f"{t_ms:.3f}", f"{flops / (t_ms * 1e-3) / 1e12:.0f}", f"{t_ms / ms:.0%}"]
                                  if t_ms else ["-", "-", "-"])
                    rows.append([dtype.name, f"{s.heads}/{kv_heads}", T, f"{plan.kernel} ({plan.group_tile})", f"{ms:.3f}",
                                 f"{flops / (ms * 1e-3) / 1e12:.0f}", *torch_cols])
                    del kv, q, out
        self.md.table(header, rows)
        self.md("")

    def torch_sdpa(self, dtype, heads, kv_heads, T, D):
        torch = self.torch
        if torch is None:
            return None
        import torch.nn.functional as F
        tdt = {"float16": torch.float16, "bfloat16": torch.bfloat16}[dtype.name]
        q = torch.randn(1, heads, T, D, device="cuda", dtype=tdt)
        k = torch.randn(1, kv_heads, T, D, device="cuda", dtype=tdt)
        v = torch.randn(1, kv_heads, T, D, device="cuda", dtype=tdt)
        gqa = heads != kv_heads
        return torch_time(torch, lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa),
                          self.s.flush_bytes, self.s.reps)

    # -- memory-bound kernels --------------------------------------------------------------
    def memory(self, deadline: Deadline):
        cp, s, cuda = self.cp, self.s, self.cuda
        f16 = np.dtype(np.float16)
        T, H, I, D = s.tokens, s.hidden, s.intermediate, s.head_dim
        heads = H // D
        rows = []

        def bench(name, what, nbytes, fn):
            if deadline.passed():
                rows.append([name, what, "skipped: out of time", ""])
                return
            ms = self.timer.time(fn, reps=s.reps)
            rows.append([name, what, f"{ms:.4f}", self.frac(nbytes, ms)])

        x, res, w = self.randn((T, H), f16), self.randn((T, H), f16), self.randn((H,), f16)
        bench("rms_norm", f"[{T}, {H}]", 2 * x.nbytes + w.nbytes, lambda: cuda.rms_norm(x, w, 1e-6))
        bench("fused_add_rms_norm", f"[{T}, {H}]", 4 * x.nbytes + w.nbytes, lambda: cuda.fused_add_rms_norm(x, res, w, 1e-6))
        q, k = self.randn((T, heads, D), f16), self.randn((T, heads, D), f16)
        pos = cp.asarray(self.rng.integers(0, 4096, T).astype(np.int64))
        inv = 10000.0 ** (-np.arange(0, D, 2) / D)
        ang = np.arange(4096)[:, None] * inv[None, :]
        cos_sin = cp.asarray(np.concatenate([np.cos(ang), np.sin(ang)], axis=1).astype(np.float32))
        bench("rotary (neox)", f"q, k [{T}, {heads}, {D}]", 2 * (q.nbytes + k.nbytes) + pos.nbytes + T * D * 4,
              lambda: cuda.rotary_embedding(pos, q, k, cos_sin, True))
        nblocks = math.ceil(T / 16)
        cache = self.randn((nblocks, 1, 2, heads, 16, D), f16)
        slots = cp.asarray(self.rng.permutation(nblocks * 16)[:T].astype(np.int64))
        bench("reshape_and_cache", f"k, v [{T}, {heads}, {D}]", 2 * (q.nbytes + k.nbytes) + slots.nbytes,
              lambda: cuda.reshape_and_cache(q, k, cache, 0, slots))
        layers = 32 if s is FULL else 2
        blocks = self.randn((128, layers, 2, heads, 16, D), f16)
        pairs = [(i, 64 + i) for i in range(64)]
        bench("copy_blocks", f"64 blocks of {blocks[0].nbytes / 2**20:.0f} MiB", 2 * 64 * blocks[0].nbytes,
              lambda: cuda.copy_blocks(blocks, pairs))
        gate_up = self.randn((T, 2 * I), f16)
        bench("silu_and_mul", f"[{T}, {2 * I}] -> [{T}, {I}]", gate_up.nbytes * 3 // 2, lambda: cuda.silu_and_mul(gate_up))
        act = self.randn((T, I), f16)
        bench("gelu", f"[{T}, {I}]", 2 * act.nbytes, lambda: cuda.gelu(act))
        self.md.table(["kernel", "shape (fp16)", "ms", "bandwidth (of memcpy)"], rows)
        self.md("")

    # -- GEMM ------------------------------------------------------------------------------
    def gemm(self, deadline: Deadline):
        s, cuda = self.s, self.cuda
        dtypes = [np.dtype(np.float16)] + ([cuda.BFLOAT16] if cuda.bfloat16_supported() else [])
        rows = []
        for dtype in dtypes:
            for name, (n_out, n_in) in s.gemm_shapes.items():
                w = self.randn((n_out, n_in), dtype, std=0.02)
                for T in s.gemm_tokens:
                    if deadline.passed():
                        rows.append([dtype.name, name, T, "skipped: out of time", "", "", "", ""])
                        continue
                    x = self.randn((T, n_in), dtype)
                    ms = self.timer.time(lambda: cuda.linear(x, w), reps=s.reps)
                    flops = 2 * T * n_in * n_out
                    nbytes = (n_out * n_in + T * n_in + T * n_out) * dtype.itemsize
                    t_ms = self.torch_matmul(dtype, T, n_in, n_out)
                    tflops = lambda t: f"{flops / (t * 1e-3) / 1e12:.1f}"  # noqa: E731
                    rows.append([dtype.name, f"{name} [{n_out}, {n_in}]", T, f"{ms:.4f}", tflops(ms), self.frac(nbytes, ms),
                                 f"{t_ms:.4f} ({tflops(t_ms)})" if t_ms else "-", f"{ms / t_ms:.2f}x" if t_ms else "-"])
        self.md.table(["dtype", "weight [out, in]", "tokens", "linear ms", "TFLOP/s", "bytes/time (of memcpy)",
                       "torch.matmul ms (TFLOP/s)", "linear / torch time"], rows)
        self.md("")

    def torch_matmul(self, dtype, T, n_in, n_out):
        torch = self.torch
        if torch is None:
            return None
        tdt = {"float16": torch.float16, "bfloat16": torch.bfloat16}[dtype.name]
        x = torch.randn(T, n_in, device="cuda", dtype=tdt)
        w = torch.randn(n_out, n_in, device="cuda", dtype=tdt) * 0.02
        return torch_time(torch, lambda: torch.matmul(x, w.T), self.s.flush_bytes, self.s.reps)


def _import_torch():
    """torch with a usable CUDA device, or None (never imported by rawpaged itself)."""
    try:
        import torch
        return torch if torch.cuda.is_available() else None
    except Exception:
        return None


def torch_time(torch, fn, flush_bytes: int, reps: int, warmup: int = 3) -> float:
    """KernelTimer's method on torch's stream: flush, events around fn alone, median."""
    import statistics
    buf = torch.empty(flush_bytes, dtype=torch.uint8, device="cuda")
    for _ in range(warmup):
        fn()
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
    for i, (start, end) in enumerate(events):
        buf.fill_(i & 0xFF)
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in events)


SECTIONS = ("ceiling", "decode", "prefill", "memory", "gemm")
TITLES = {"ceiling": "Ceilings", "decode": "Decode attention at the issue 13 shapes (paged and contiguous KV)",
          "prefill": "Prefill attention beside torch SDPA", "memory": "Memory-bound kernels",
          "gemm": "GEMM: linear (cuBLAS via CuPy) beside torch.matmul"}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--md", help="also append the Markdown here, table by table")
    ap.add_argument("--budget", type=float, default=1e9, help="seconds: later sections are skipped past it")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes (checks this script on the host emulation)")
    ap.add_argument("--sections", default=",".join(SECTIONS))
    args = ap.parse_args(argv)
    deadline = Deadline(args.budget)
    cp = import_cupy()
    md = Markdown(args.md)
    bench = Bench(cp, md, SMOKE if args.smoke else FULL)
    if bench.torch is None:
        md("torch not importable with a GPU: no SDPA / torch.matmul columns", "")
    wanted = [s for s in args.sections.split(",") if s]
    unknown = set(wanted) - set(SECTIONS)
    if unknown:
        ap.error(f"unknown sections {sorted(unknown)}: choose from {', '.join(SECTIONS)}")
    if "ceiling" not in wanted:
        wanted.insert(0, "ceiling")           # every fraction needs it
    failed = []
    for name in SECTIONS:
        if name not in wanted:
            continue
        md(f"### {TITLES[name]}", "")
        if deadline.passed():
            md(f"skipped: the --budget of {args.budget:.0f} s was spent", "")
            continue
        t = time.perf_counter()
        try:
            getattr(bench, name)(deadline) if name != "ceiling" else bench.ceiling()
        except Exception as err:
            failed.append(name)
            md(f"**{name} FAILED**: {type(err).__name__}: {str(err).splitlines()[0][:300]}", "")
            if name == "ceiling":
                break
        md(f"({name}: {time.perf_counter() - t:.1f} s)", "")
        cp.get_default_memory_pool().free_all_blocks()
    if not bench.timer.queue_ahead_ok:
        md("**warning**: Python queued some launches slower than the flush runs: those times may include host time", "")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
