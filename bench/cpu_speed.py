"""Prefill and decode tokens/s of the engine on the CPU backend (issue: engine spine).

    python bench/cpu_speed.py [--prompt-len 128] [--decode-steps 32] [--batches 1 32] [--dtype float32]

For each model (stories260K, random LLaMA 512x8) and batch size: one prefill step of `batch`
prompts of `prompt-len` tokens (prefill tokens/s), then `decode-steps` decode steps (decode
tokens/s = batch * steps / time). Timings exclude Numba compilation (a warm-up run first).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import commit, machine, random_llama, scratch_dir, stories260k  # noqa: E402

from rawpaged.engine import EngineConfig, LLMEngine  # noqa: E402
from rawpaged.sampling_params import SamplingParams  # noqa: E402


def measure(engine: LLMEngine, batch: int, prompt_len: int, steps: int, vocab: int) -> tuple[float, float]:
    rng = np.random.default_rng(0)
    sp = SamplingParams(temperature=0, max_tokens=steps + 1, ignore_eos=True)
    for i in range(batch):
        engine.add_request(None, None, sp, prompt_token_ids=rng.integers(3, vocab, prompt_len).tolist())
    t0 = time.perf_counter()
    while engine.stats.generation_tokens < batch:          # prefill (possibly several chunks)
        engine.step()
    t1 = time.perf_counter()
    for _ in range(steps):
        engine.step()
    t2 = time.perf_counter()
    while engine.has_unfinished_requests():
        engine.step()
    engine.stats.generation_tokens = 0
    return batch * prompt_len / (t1 - t0), batch * steps / (t2 - t1)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--decode-steps", type=int, default=32)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--dtype", default="float32", help="storage of the weights and KV cache (bfloat16: issue 18's)")
    a = ap.parse_args()
    root = scratch_dir()
    models = {"stories260K": stories260k(root), "random LLaMA h512 L8 (8 q / 4 kv heads, vocab 32000)": random_llama(root)}
    print(f"machine: {machine()}; commit {commit()}; {a.dtype}; prompt {a.prompt_len} tokens, "
          f"{a.decode_steps} decode steps\n")
    # NOTE: a title line without the commit, so bench/ab.py matches the two sides' tables
    print(f"Engine tokens/s, {a.dtype}\n")
    print("| model | batch | prefill tok/s | decode tok/s |\n| --- | ---: | ---: | ---: |")
    for name, path in models.items():
        eng = LLMEngine(EngineConfig(model=str(path), device="cpu", dtype=a.dtype, kv_cache_memory=1 << 30,
                                     max_num_batched_tokens=max(a.batches) * a.prompt_len))
        measure(eng, 2, 16, 2, eng.model_config.vocab_size)            # warm-up: Numba compilation
        for b in a.batches:
            pf, dc = measure(eng, b, a.prompt_len, a.decode_steps, eng.model_config.vocab_size)
            print(f"| {name} | {b} | {pf:,.0f} | {dc:,.0f} |", flush=True)


if __name__ == "__main__":
    main()
