"""Beam search over a sequence group (the paper's section 4.4: beams share blocks by fork + CoW).

Each step every live beam proposes its 2*width best next tokens; the best `width` non-EOS
candidates become the next beams (a parent chosen twice is forked, a parent never chosen is
dropped and its blocks freed); EOS candidates ranked within the first `width` become finished
hypotheses. Scores follow Hugging Face: cumulative logprob / (output length ** length_penalty).
"""
from __future__ import annotations

from dataclasses import dataclass

from rawpaged.sampling_params import SamplingParams
from rawpaged.sequence import Sequence


def beam_score(seq: Sequence, length_penalty: float) -> float:
    return seq.cumulative_logprob / (max(seq.num_output_tokens, 1) ** length_penalty)


@dataclass
class Candidate:
    parent: Sequence
    token_id: int
    logprob: float

    @property
    def cumulative(self) -> float:
        return self.parent.cumulative_logprob + self.logprob


def select(beams: list[Sequence], topk_values, topk_ids, width: int, eos_ids: set[int]):
    """-> (next beams: list[Candidate], finished hypotheses: list[Candidate]).

    topk_values/topk_ids [len(beams), 2*width] host arrays, best first.
    """
    cands = [Candidate(beam, int(t), float(v))
             for beam, vals, ids in zip(beams, topk_values, topk_ids) for v, t in zip(vals, ids)]
    cands.sort(key=lambda c: c.cumulative, reverse=True)
    keep, finished = [], []
    for rank, c in enumerate(cands):
        if c.token_id in eos_ids:
            if rank < width:              # an EOS beyond the first `width` ranks is not a hypothesis
                finished.append(c)
            continue
        keep.append(c)
        if len(keep) == width:
            break
    return keep, finished


def is_done(finished: list[Sequence], running: list[Sequence], params: SamplingParams,
            max_output_len: int) -> bool:
    """Hugging Face's stopping rule for a beam group."""
    width = params.best_of
    if not running:
        return True
    if len(finished) < width:
        return False
    if params.early_stopping is True:
        return True
    worst = min(beam_score(s, params.length_penalty) for s in finished)
    best_running = max(s.cumulative_logprob for s in running)
    if params.early_stopping == "never" and params.length_penalty > 0:
        length = max_output_len               # the best it could still reach
    else:
        length = max(s.num_output_tokens for s in running)
    return best_running / (max(length, 1) ** params.length_penalty) <= worst
