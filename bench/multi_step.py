"""Multi-step decoding (--num-scheduler-steps) against single steps, in one process (issue 18).

    python bench/multi_step.py [--steps 1 4 8 16] [--batches 1 8] [--rounds 6] [--dtype bfloat16]

The random LLaMA h512 L8 (bench/common.py) behind one LLM per --steps value, all in this process.
Each round, for each batch size, every engine (in an order rotated round by round) generates
--gen greedy tokens for `batch` fresh prompts of --prompt-len tokens, added at once; the decode
tok/s is the tokens generated after the prefill step over the time they took. The weight-bandwidth
floor of batch 1 (bench/vs_llamacpp.py's: weight bytes / the read rate of a 512 MB buffer) is
measured at the start of each round. Reported: medians over rounds, and each engine / single steps.
Tests never time anything.
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


def decode_rate(llm, prompts: list[list[int]], gen: int) -> float:
    """Generated tok/s after the prefill step of `prompts` (added at once, greedy, fixed lengths)."""
    from rawpaged import SamplingParams
    eng = llm.engine
    for p in prompts:
        eng.add_request(None, None, SamplingParams(temperature=0, max_tokens=gen + 1, ignore_eos=True),
                        prompt_token_ids=p)
    eng.step()                                       # every prompt and its first token
    first, t = eng.stats.generation_tokens, time.perf_counter()
    while eng.has_unfinished_requests():
        eng.step()
    return (eng.stats.generation_tokens - first) / (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, nargs="+", default=[1, 4, 8, 16], help="num_scheduler_steps values")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--gen", type=int, default=128)
    args = ap.parse_args()
    from rawpaged import LLM
    from rawpaged.backend import cpu
    from rawpaged.backend.cpu import gemm
    model = random_llama(Path(tempfile.gettempdir()) / "rawpaged-bench", max_position_embeddings=2048)
    llms = {k: LLM(str(model), device="cpu", dtype=args.dtype, kv_cache_memory=1 << 30, max_model_len=512,
                   max_num_seqs=max(args.batches), enable_prefix_caching=False, num_scheduler_steps=k)
            for k in args.steps}
    rng = np.random.default_rng(0)
    fresh = lambda n: [rng.integers(3, 32000, args.prompt_len).tolist() for _ in range(n)]      # noqa: E731
    for llm in llms.values():                                                                   # warm-up
        decode_rate(llm, fresh(1), 8)
    wbytes = decode_weight_bytes(model, np.dtype(cpu.resolve_dtype(args.dtype)).itemsize)
    rates = {(b, k): [] for b in args.batches for k in args.steps}
    floors = []
    for rnd in range(args.rounds):
        floors.append(read_bandwidth(gemm.dynamic_schedule()) * 1e9 / wbytes)
        order = args.steps[rnd % len(args.steps):] + args.steps[:rnd % len(args.steps)]
        for b in args.batches:
            for k in order:
                rates[(b, k)].append(decode_rate(llms[k], fresh(b), args.gen))
        print(f"round {rnd + 1}: floor {floors[-1]:.0f} tok/s; "
              + "; ".join(f"b{b} k{k} {rates[(b, k)][-1]:.0f}" for b in args.batches for k in args.steps),
              file=sys.stderr, flush=True)
    floor = float(np.median(floors))
    print(f"## Multi-step decoding against single steps ({machine()}, commit {commit()})\n")
    print(f"random LLaMA h512 L8, {args.dtype}, {gemm.dynamic_schedule()} threads, prompts {args.prompt_len}, "
          f"{args.gen} tokens each, medians of {args.rounds} rounds; batch-1 weight-bandwidth floor "
          f"{floor:.0f} tok/s (range {min(floors):.0f}-{max(floors):.0f})\n")
    print("| batch | num_scheduler_steps | decode tok/s | / single steps | batch-1 decode / floor |")
    print("| ---: | ---: | ---: | ---: | ---: |")
    for b in args.batches:
        base = float(np.median(rates[(b, args.steps[0])]))
        for k in args.steps:
            r = float(np.median(rates[(b, k)]))
            fl = f"{r / floor:.2f}" if b == 1 else "-"
            print(f"| {b} | {k} | {r:.1f} | {r / base:.2f} | {fl} |")


if __name__ == "__main__":
    main()
