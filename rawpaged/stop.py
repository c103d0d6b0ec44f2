"""Stop checks, and what text of an unfinished sequence may be shown.

A stop string can span tokens, so it is searched in the text the latest delta touched. The text
returned (and streamed) never includes a stop string, unless `include_stop_str_in_output`, and
never a part of one: while a sequence runs, the longest tail of its text that could still grow
into a stop string is held back.
"""
from __future__ import annotations

from rawpaged.sampling_params import SamplingParams
from rawpaged.sequence import Sequence, SequenceStatus


class StopChecker:
    @staticmethod
    def check(seq: Sequence, sp: SamplingParams, delta_len: int, eos_ids: set[int],
              max_tokens: int) -> SequenceStatus | None:
        """The finished status the sequence reached with its last token, or None."""
        last = seq.output_token_ids[-1]
        if not sp.ignore_eos and last in eos_ids:
            seq.stop_reason = None                       # EOS: finish_reason "stop", no stop_reason
            return SequenceStatus.FINISHED_STOPPED
        if last in sp.stop_token_ids:
            seq.stop_reason = last
            return SequenceStatus.FINISHED_STOPPED
        if sp.stop and delta_len:
            stop = StopChecker._find_stop_string(seq, sp, delta_len)
            if stop is not None:
                seq.stop_reason = stop
                return SequenceStatus.FINISHED_STOPPED
        if seq.num_output_tokens >= max_tokens:
            return SequenceStatus.FINISHED_LENGTH
        return None

    @staticmethod
    def _find_stop_string(seq: Sequence, sp: SamplingParams, delta_len: int) -> str | None:
        """Find the earliest stop string ending in the new text; cut the text there."""
        text = seq.output_text
        longest = max(len(s) for s in sp.stop)
        start = max(0, len(text) - delta_len - longest + 1)
        best, best_at = None, len(text) + 1
        for s in sp.stop:
            at = text.find(s, start)
            if at != -1 and at < best_at:
                best, best_at = s, at
        if best is None:
            return None
        seq.output_text = text[:best_at + len(best)] if sp.include_stop_str_in_output else text[:best_at]
        return best

    @staticmethod
    def visible_text(seq: Sequence, sp: SamplingParams) -> str:
        text = seq.output_text
        if seq.finished or not sp.stop:
            return text
        return text[:len(text) - _partial_stop_len(text, sp.stop)]


def _partial_stop_len(text: str, stops: list[str]) -> int:
    """Length of the longest tail of `text` that is a proper prefix of some stop string."""
    best = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:n]):
                best = n
                break
    return best
