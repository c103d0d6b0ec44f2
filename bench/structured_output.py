"""The throughput cost of structured output: a batch of 32 constrained by a JSON schema vs the same
batch unconstrained, at the same output lengths, decode steps interleaved one for one.

    python bench/structured_output.py [--batch 32] [--steps 64] [--rounds 3] [--model random|stories]

Two engines on the same weights each get `batch` requests (temperature 1, seeded, fixed length:
ignore_eos, and a schema no answer can complete within --steps tokens: an array of at least 1000
order objects, so the grammar never ends a sequence early). After both prefills, decode steps
alternate A, B, A, B... and each is timed alone, so a shared machine's noise hits both alike; this
is repeated --rounds times. Reported: the median of the pairwise ratios (B_i / A_i, neighbours in
time), the ratio of the summed step times, and the grammar work in a constrained step measured
directly (what is left of the batched mask fill when the model is done, the fill running on the
grammar thread meanwhile; the mask's unpack + apply in the sampler; the matchers taking the sampled
tokens) against the unconstrained step's median: on a noisy machine the last is the steadiest figure
of what structured output adds.

The unconstrained hot path's only additions are two scans of the rows for a grammar state
(`prefetch_masks`, `_token_mask`); their cost per step is reported too.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import commit, machine, random_llama, scratch_dir, stories260k  # noqa: E402

from rawpaged import sampler as sampler_module  # noqa: E402
from rawpaged.engine import EngineConfig, LLMEngine  # noqa: E402
from rawpaged.sampling_params import SamplingParams  # noqa: E402

ORDER = {"type": "object", "properties": {
    "item": {"type": "string", "maxLength": 12}, "qty": {"type": "integer", "minimum": 1, "maximum": 999},
    "size": {"enum": ["S", "M", "L", "XL"]}, "gift": {"type": "boolean"},
    "notes": {"type": "array", "items": {"type": "string", "maxLength": 8}, "maxItems": 3}},
    "required": ["item", "qty", "size", "gift", "notes"], "additionalProperties": False}
SCHEMA = {"type": "array", "items": ORDER, "minItems": 1000}


class Timer:
    """Accumulates the time spent in a wrapped function."""

    def __init__(self):
        self.total = 0.0

    def wrap(self, fn):
        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.total += time.perf_counter() - t0
        return timed


def start(engine: LLMEngine, batch: int, steps: int, structured: bool, vocab: int) -> None:
    rng = np.random.default_rng(0)
    for i in range(batch):
        sp = SamplingParams(temperature=1.0, seed=i, max_tokens=steps + 1, ignore_eos=True,
                            structured_outputs={"json": SCHEMA} if structured else None)
        engine.add_request(None, None, sp, prompt_token_ids=rng.integers(3, vocab, 32).tolist())
    while engine.stats.generation_tokens < batch:          # the prefills
        engine.step()


def step_time(engine: LLMEngine) -> float:
    t0 = time.perf_counter()
    engine.step()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--model", choices=["random", "stories"], default="random")
    a = ap.parse_args()
    root = scratch_dir()
    path = random_llama(root) if a.model == "random" else stories260k(root)
    cfg = dict(model=str(path), device="cpu", kv_cache_memory=1 << 30)
    free, constrained = LLMEngine(EngineConfig(**cfg)), LLMEngine(EngineConfig(**cfg))
    vocab = free.model_config.vocab_size
    fill, wait, apply, accept, scan = Timer(), Timer(), Timer(), Timer(), Timer()
    g = constrained.grammars
    g.fill_bitmask = fill.wrap(g.fill_bitmask)
    prefetch = g.fill_bitmask_async

    def timed_prefetch(states):
        future = prefetch(states)
        future.result = wait.wrap(future.result)          # what the engine thread waits for
        return future
    g.fill_bitmask_async = timed_prefetch
    sampler_module.apply_mask = apply.wrap(sampler_module.apply_mask)
    constrained.output_processor._advance_grammar = accept.wrap(constrained.output_processor._advance_grammar)
    free.output_processor._token_mask = scan.wrap(free.output_processor._token_mask)
    free.output_processor.prefetch_masks = scan.wrap(free.output_processor.prefetch_masks)

    for eng, s in ((free, False), (constrained, True)):     # warm-up: Numba compilation, grammar build
        start(eng, 2, 2, s, vocab)
        while eng.has_unfinished_requests():
            eng.step()

    timers = (fill, wait, apply, accept, scan)
    times_free, times_con, spent = [], [], [0.0] * len(timers)    # spent: in the timed decode steps
    for _ in range(a.rounds):
        start(free, a.batch, a.steps, False, vocab)
        start(constrained, a.batch, a.steps, True, vocab)
        before = [t.total for t in timers]
        for _ in range(a.steps - 1):
            times_free.append(step_time(free))
            times_con.append(step_time(constrained))
        spent = [s + t.total - b for s, t, b in zip(spent, timers, before)]
        texts = []
        while constrained.has_unfinished_requests():
            texts += [o.outputs[0].text for o in constrained.step() if o.finished]
        while free.has_unfinished_requests():
            free.step()
        assert len(texts) == a.batch and all(t.startswith('[{"item":"') for t in texts), texts[:1]

    n = len(times_con)
    sum_f, sum_c = sum(times_free), sum(times_con)
    med_f, med_c = statistics.median(times_free), statistics.median(times_con)
    pairwise = statistics.median(c / f for c, f in zip(times_con, times_free))
    t_fill, t_wait, t_apply, t_accept, t_scan = (x / n for x in spent)
    grammar = t_wait + t_apply + t_accept
    print(f"machine: {machine()}; commit {commit()}; model {a.model} (vocab {vocab}); batch {a.batch}; "
          f"{a.rounds} rounds of {a.steps - 1} decode steps each, interleaved\n")
    print("| run | mean step ms | median step ms | tokens/s | ratio (sums) | ratio (median of pairs) |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    print(f"| unconstrained | {1e3 * sum_f / n:.2f} | {1e3 * med_f:.2f} | {a.batch * n / sum_f:,.0f} | 1.000 | 1.000 |")
    print(f"| JSON schema | {1e3 * sum_c / n:.2f} | {1e3 * med_c:.2f} | {a.batch * n / sum_c:,.0f} | "
          f"{sum_c / sum_f:.3f} | {pairwise:.3f} |")
    print(f"\ngrammar work the engine thread waits for, per constrained step: {1e3 * grammar:.2f} ms "
          f"(the mask fill's rest after the model {1e3 * t_wait:.2f}, unpack + apply {1e3 * t_apply:.2f}, matchers "
          f"taking tokens {1e3 * t_accept:.2f}) = {100 * grammar / med_f:.1f}% of the unconstrained median step; "
          f"the mask fill itself {1e3 * t_fill:.2f} ms, on the grammar thread while the model runs")
    print(f"unconstrained step: the grammar-state scans {1e6 * t_scan:.1f} us per step "
          f"({100 * t_scan / med_f:.3f}% of the median step)")


if __name__ == "__main__":
    main()
