"""The CPU's fused decode step alone (decode_step.run_stack: every layer and the LM head in one call),
replayed on one captured batch: the kernel's time without the engine around it (issue 18).

    python bench/fused_step.py [--batches 1 4 16 48] [--reps 300] [--context 128] [--dtype bfloat16]

The random LLaMA h512 L8 (8/4 heads, vocab 32000) behind the whole engine; for each batch, `batch`
prompts of --context tokens are generated to completion and the engine's fullest decode call is
captured (its inputs copied), then replayed --reps times back to back (the hidden rows restored
before each). Reported: median and 10th percentile ms, the weights' read rate (weight bytes / median)
and the machine's read rate measured just before (bench/vs_llamacpp.py's), so `stack / floor` is
the stack's time at the weight-bandwidth floor over its median. Compare with bench/team_step.py's
whole engine step: the difference is the engine's own work (schedule, inputs, sampling, outputs).
NOTE: replayed back to back, the step runs with the caches as the previous replay left them; in the
engine, Python's work between steps meets caches flushed by the weights (bench/RESULTS.md).
Also: the greedy sampler (rawpaged/sampler.py) on the step's logits, called once right after a
replay ("cold": as the engine calls it) and once more at once ("hot"): what the caches flushed by a
step's weights cost the host work that follows it.
Run it under bench/ab.py to compare commits; tests never time anything.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import commit, machine, random_llama  # noqa: E402
from vs_llamacpp import decode_weight_bytes, read_bandwidth  # noqa: E402

from rawpaged.backend import cpu  # noqa: E402
from rawpaged.backend.cpu import decode_step, gemm  # noqa: E402
from rawpaged.engine import EngineConfig, LLMEngine  # noqa: E402
from rawpaged.sampler import Sampler, SamplingRow  # noqa: E402
from rawpaged.sampling_params import SamplingParams  # noqa: E402


class Capture:
    """Wraps decode_step.run_stack; keeps (a copy of) the call with the most rows."""

    def __init__(self):
        self.run = decode_step.run_stack
        self.args, self.kwargs, self.rows = None, None, 0

    def __call__(self, *args, **kwargs):
        rows = args[1].shape[0]
        if rows >= self.rows:       # NOTE: copies of the per-step arrays; weights and KV cache shared
            self.args = tuple(a.copy() if isinstance(a, np.ndarray) and a.nbytes < 1 << 22 else a for a in args)
            self.kwargs, self.rows = kwargs, rows
        return self.run(*args, **kwargs)

    def replay(self, reps: int) -> tuple[list[float], list[float], list[float]]:
        """(step, cold sampler, hot sampler) seconds per replay."""
        h0 = self.args[1].copy()
        sampler = Sampler(np)
        greedy = [SamplingRow(SamplingParams(temperature=0), [1], [])] * self.rows
        step, cold, hot = [], [], []
        for _ in range(reps + 5):
            self.args[1][:] = h0
            t0 = time.perf_counter()
            _, logits = self.run(*self.args, **self.kwargs)
            t1 = time.perf_counter()
            sampler(logits, greedy)
            t2 = time.perf_counter()
            sampler(logits, greedy)
            t3 = time.perf_counter()
            step.append(t1 - t0)
            cold.append(t2 - t1)
            hot.append(t3 - t2)
        return step[5:], cold[5:], hot[5:]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 4, 16, 48])
    ap.add_argument("--reps", type=int, default=300)
    ap.add_argument("--context", type=int, default=128)
    ap.add_argument("--dtype", default="bfloat16")
    args = ap.parse_args()
    cap = Capture()
    decode_step.run_stack = cap
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        model = random_llama(Path(tmp))
        engine = LLMEngine(EngineConfig(model=str(model), device="cpu", dtype=args.dtype,
                                        max_num_seqs=max(args.batches), kv_cache_memory=256 << 20))
        weight_bytes = decode_weight_bytes(model, cpu.resolve_dtype(args.dtype).itemsize)
        rng = np.random.default_rng(0)
        for b in args.batches:
            cap.rows = 0
            sp = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
            for _ in range(b):
                engine.add_request(None, None, sp, prompt_token_ids=rng.integers(3, 32000, args.context).tolist())
            while engine.has_unfinished_requests():
                engine.step()
            read = read_bandwidth(gemm.dynamic_schedule())
            t, cold, hot = cap.replay(args.reps)
            med = float(np.median(t))
            rows.append((b, cap.rows, med * 1e3, float(np.percentile(t, 10)) * 1e3, weight_bytes / med / 1e9, read,
                         weight_bytes / (read * 1e9) / med, float(np.median(cold)) * 1e6, float(np.median(hot)) * 1e6))
    print(f"## The fused decode step replayed ({machine()}, commit {commit()})\n")
    print(f"random LLaMA h512 L8, {args.dtype}, {gemm.dynamic_schedule()} threads, context {args.context}, "
          f"{args.reps} replays; weights {weight_bytes / 1e6:.1f} MB a step\n")
    print("| batch | rows | stack ms | p10 ms | weights GB/s | read GB/s | stack / floor | sampler cold us | "
          "sampler hot us |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for b, n, med, p10, wgbs, read, frac, cold, hot in rows:
        print(f"| {b} | {n} | {med:.3f} | {p10:.3f} | {wgbs:.1f} | {read:.1f} | {frac:.2f} | {cold:.0f} | {hot:.0f} |")


if __name__ == "__main__":
    main()
