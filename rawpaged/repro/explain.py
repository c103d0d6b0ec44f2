"""One sentence per comparison: how far ours is from the paper, and the reason where we know it.

The reasons are the findings of looking at each difference (docs/repro.md has the longer story);
the numbers in each sentence come from the run, so a rerun that moves them rewrites the sentence.
"""
from __future__ import annotations

from rawpaged.repro.figure import Comparison, Figure
from rawpaged.repro.report import paper_range

ORCA_WHY = ("the paper's Orca baselines allocate through a buddy allocator, which rounds every reservation to a "
            "power of two (Oracle's too) and fragments free memory along buddy boundaries; rawpaged's Orca managers "
            "reserve exact ranges first-fit at token granularity, so they fit more requests (the power-of-two rows "
            "below match the paper's Oracle). Pow2 here rounds the whole prompt + output, the paper only the output.")

# (figure key, words the comparison's label contains) -> the reason for a difference
REASONS = [
    (("real-fig13", ""), "on the CPU a step's time grows with every batched sequence (the small model's weights sit "
     "in cache: no weight-streaming floor as on a GPU), so batching more buys little throughput and rawpaged's batch "
     "at 0.9x its own capacity stays small; memory binds the Orca managers, not rawpaged, which is what the paper's "
     "GPU ratio measures."),
    (("real-fig2", "Orca"), "as in the simulator: exact first-fit ranges where the paper's baselines used a buddy "
     "allocator; here at a quarter of the lengths."),
    (("real-fig2", "rawpaged"), "a quarter of the lengths in blocks of 16: each sequence's partial last block weighs "
     "4x more than at paper scale."),
    (("fig13", "sharegpt @ 2 req/s, rawpaged (vLLM)"), "the A100 profile's one fitted constant (0.25 ms of CPU per "
     "batched sequence) was chosen to match this number; the batch is Little's law (rate x time in the system)."),
    (("fig13", "rawpaged (vLLM)"), "rawpaged's batch at a given rate is Little's law: rate x time in the system; it "
     "follows the A100 profile's step time (its constants are assumptions, one fitted to the ShareGPT point) and, "
     "near capacity, the KV memory."),
    (("fig13", "Orca (Max)"), "Orca (Max) reserves max_model_len = 2048 slots per request: 15.7K slots hold 7, "
     "as in the paper."),
    (("fig13", "Orca (Pow2)"), ORCA_WHY),
    (("fig13", "Orca (Oracle)"), ORCA_WHY),
    (("fig2", "Orca (Oracle)"), ORCA_WHY),
    (("fig2", "Orca (Pow2)"), ORCA_WHY),
    (("fig2", "rawpaged"), "the paged manager wastes only each sequence's last partial block (internal "
     "fragmentation below one block per sequence)."),
    (("fig2", "Orca"), "Orca's share of real tokens depends on how full its reservations are while requests run: "
     "ours is the time-weighted share of the slots in use (the paper does not define its average)."),
    (("fig12", "static"), "static batching never gets under the threshold here: at 1% of rawpaged's capacity its "
     "normalized latency is already ~2.5x rawpaged's, because a request that arrives while a batch runs waits for all "
     "of it and short outputs divide that wait by few tokens; the paper's FasterTransformer ran faster kernels without "
     "vLLM 0.1's Python step cost, which this simulation charges every system alike."),
    (("fig12", "opt-175b"), "on 8 A100-80GB the 60.1K KV slots hold more requests than the simulated step time lets "
     "through, so the systems are bound by compute and the per-sequence CPU cost before memory: Oracle's exact "
     "reservations then batch as much as rawpaged (the paper's 175B curves do separate; our profile's assumed "
     "constants, fitted at 13B, do not reproduce that)."),
    (("fig12", "alpaca"), "Alpaca's requests are short, so the Orca managers' reservations are small and, with exact "
     "(not buddy) ranges, Oracle and Pow2 keep up with rawpaged until the step time binds; the paper's gap comes "
     "with its buddy-allocated baselines."),
    (("fig12", "Orca (Oracle)"), "our Orca (Oracle) reserves exact ranges where the paper's used a buddy allocator "
     "(power-of-two ranges), so ours sustains more: see Fig. 13, where our Pow2 matches the paper's Oracle."),
    (("fig12", ""), "the sustained rate is read where latency doubles; the paper reads its curves by eye, "
     "and its absolute rates rest on measured A100 step times that our profile only assumes."),
    (("fig15", "beam"), "beams share every block but the ones they diverged in; the saving depends on how "
     "often beams fork and die, which follows the logits (synthetic here)."),
    (("fig15", "parallel"), "parallel samples share only the prompt's full blocks: the saving is the prompt's "
     "share of each sample's blocks, set by Alpaca's short prompts."),
    (("fig16", ""), "the translation lengths are synthetic (WMT16 is not in the shared data); the gain comes from "
     "computing and storing the shared prefix once."),
    (("fig17", ""), "all three Orca variants reserve for 1024 output tokens on top of ~1024-token prompts, so they "
     "behave alike, as in the paper."),
    (("fig18", ""), "small blocks pay the paper's kernel a wait per block read (assumed latency and occupancy, "
     "specs.py), large ones waste the last partial block of every sequence; where the minimum falls depends on "
     "those assumed constants, which no GPU here could measure."),
    (("calibration", ""), "the machine is shared with other jobs: measured step times carry their noise."),
    (("validate", ""), "same requests, same sequences, same token counts in every step."),
]


def _reason(fig: Figure, c: Comparison) -> str:
    for exact in (True, False):            # a real-mode figure's own reasons first, then the figure's
        for (key, words), text in REASONS:
            if (key == fig.key if exact else key == fig.key.removeprefix("real-")) and words in c.label:
                return text
    return ""


def sentence(fig: Figure, c: Comparison) -> str:
    reason = _reason(fig, c)
    if c.ours is None:
        return "not measured."
    r = c.ratio
    if r is not None:
        if abs(r - 1) <= 0.05:
            head = f"agrees within {abs(r - 1) * 100:.0f}%"
        else:
            head = f"ours is {abs(r - 1) * 100:.0f}% {'above' if r > 1 else 'below'} the paper's"
        return f"{head}: {reason}" if reason else head + "."
    rng = paper_range(c.paper)
    if rng:
        lo, hi = rng
        where = "inside the paper's range" if lo <= c.ours <= hi else (
            "below the paper's range" if c.ours < lo else "above the paper's range")
        return f"{where}: {reason}" if reason else where + "."
    if c.paper is None:
        base = "the paper shows this as a curve without a number"
        return f"{base}; {reason}" if reason else base + "."
    return reason or "-"


def explain(fig: Figure) -> None:
    for c in fig.comparisons:
        if not c.why:
            c.why = sentence(fig, c)
