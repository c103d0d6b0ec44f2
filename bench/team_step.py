"""The fused CPU decode step run by a team of every thread (one parallel region a step, team.py) against
the same step run by one thread, side by side in one process (issue 18): what the second thread buys.

    python bench/team_step.py [--batches 1 4 8 16 48] [--rounds 5] [--steps 64] [--dtype bfloat16]

The random LLaMA h512 L8 (8/4 heads, vocab 32000) behind the whole engine (LLMEngine: schedule,
inputs, the fused stack, the LM head, sampling, outputs). For each batch: `batch` prompts of 16
tokens, prefilled, then `steps` decode steps timed; the two settings alternate round by round
(decode_step.team_size: Numba's threads / 1; everything else runs as configured) and each cell is
the median over rounds. Also: the machine's read rate with every thread (as bench/vs_llamacpp.py
measures it) and the batch-1 floor it sets (decode weight bytes / read rate), so batch-1 decode
reads as a fraction of it.
Tests never time anything; this prints a Markdown table.
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
from rawpaged.sampling_params import SamplingParams  # noqa: E402


def decode_tok_s(engine: LLMEngine, batch: int, steps: int, vocab: int, seed: int) -> float:
    rng = np.random.default_rng(seed)
    sp = SamplingParams(temperature=0, max_tokens=steps + 2, ignore_eos=True)
    for _ in range(batch):
        engine.add_request(None, None, sp, prompt_token_ids=rng.integers(3, vocab, 16).tolist())
    while engine.stats.generation_tokens < batch:          # prefill
        engine.step()
    engine.step()                                           # one decode step untimed
    t0 = time.perf_counter()
    for _ in range(steps):
        engine.step()
    dt = time.perf_counter() - t0
    while engine.has_unfinished_requests():
        engine.step()
    return batch * steps / dt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 4, 8, 16, 48])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--dtype", default="bfloat16")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model = random_llama(Path(tmp))
        engine = LLMEngine(EngineConfig(model=str(model), device="cpu", dtype=args.dtype,
                                        max_num_seqs=max(args.batches), kv_cache_memory=256 << 20))
        vocab = 32000
        threads = gemm.dynamic_schedule()
        settings = {f"team of {threads}": threads, "team of 1": 1}
        for name, workers in settings.items():              # warm-up: compile, size the scratch
            decode_step.team_size = lambda w=workers: w
            decode_tok_s(engine, 2, 4, vocab, 0)
        got = {(n, b): [] for n in settings for b in args.batches}
        reads = []
        for r in range(args.rounds):
            reads.append(read_bandwidth(threads))
            for b in args.batches:
                for name, workers in (settings.items() if r % 2 == 0 else reversed(settings.items())):
                    decode_step.team_size = lambda w=workers: w
                    got[(name, b)].append(decode_tok_s(engine, b, args.steps, vocab, r))
        read = float(np.median(reads))
        itemsize = cpu.resolve_dtype(args.dtype).itemsize
        floor = read * 1e9 / decode_weight_bytes(model, itemsize)
    print(f"## Decode step by a team of {threads} threads vs one ({machine()}, commit {commit()})\n")
    print(f"random LLaMA h512 L8, {args.dtype}, {threads} threads, {args.rounds} rounds x {args.steps} decode steps; "
          f"read rate {read:.1f} GB/s (median of {min(reads):.1f}-{max(reads):.1f}), batch-1 floor {floor:.0f} tok/s\n")
    print(f"| batch | team of {threads}: tok/s | team of 1: tok/s | ratio | team of {threads}: batch-1 / floor |")
    print("| ---: | ---: | ---: | ---: | ---: |")
    for b in args.batches:
        t, f = (float(np.median(got[(n, b)])) for n in settings)
        print(f"| {b} | {t:.1f} | {f:.1f} | {t / f:.2f}x | {t / floor:.2f} |" if b == 1 else
              f"| {b} | {t:.1f} | {f:.1f} | {t / f:.2f}x | - |")


if __name__ == "__main__":
    main()
