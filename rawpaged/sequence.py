"""Sequences and sequence groups: the CPU-side state of a request.

A request (SequenceGroup) owns one or more Sequences (parallel samples or beams). A sequence is a
prompt plus the tokens generated so far; `num_computed_tokens` says how many of them already have
their K/V in the paged cache. The block tables that map a sequence's logical blocks to physical
ones live in the KV cache manager, keyed by `seq_id`: the scheduler and the block manager never
touch arrays. Each step the scheduler hands out one `ScheduledSeq` per sequence that computes tokens
(with its group and its block table); the model runner flattens them, the output processor reads
the group from them.
"""
from __future__ import annotations

import enum
import itertools
from dataclasses import dataclass, field

import numpy as np

from rawpaged.sampling_params import SamplingParams


class SequenceStatus(enum.Enum):
    WAITING = enum.auto()
    RUNNING = enum.auto()
    SWAPPED = enum.auto()
    FINISHED_STOPPED = enum.auto()
    FINISHED_LENGTH = enum.auto()
    FINISHED_ABORTED = enum.auto()
    FINISHED_IGNORED = enum.auto()   # refused: can never fit (prompt too long, too few blocks)

    @property
    def finished(self) -> bool:
        return self.name.startswith("FINISHED")

    @property
    def finish_reason(self) -> str | None:
        return {
            SequenceStatus.FINISHED_STOPPED: "stop",
            SequenceStatus.FINISHED_LENGTH: "length",
            SequenceStatus.FINISHED_ABORTED: "abort",
            SequenceStatus.FINISHED_IGNORED: "error",
        }.get(self)


_seq_ids = itertools.count()


def next_seq_id() -> int:
    return next(_seq_ids)


@dataclass(eq=False)
class Sequence:
    seq_id: int
    prompt_token_ids: list[int]
    output_token_ids: list[int] = field(default_factory=list)
    status: SequenceStatus = SequenceStatus.WAITING
    num_computed_tokens: int = 0          # tokens whose K/V is already in the paged cache
    cumulative_logprob: float = 0.0
    output_logprobs: list = field(default_factory=list)   # per generated token: {id: logprob}
    # Incremental detokenization state (see tokenizer.IncrementalDetokenizer).
    output_text: str = ""
    detok_state: object = None
    stop_reason: int | str | None = None
    # The request's seeded generator for this sample (None: the sampler's own).
    generator: np.random.Generator | None = None
    # Structured output: where this sequence stands in its grammar (structured_output.GrammarState),
    # advanced as its tokens are accepted, copied on fork, released (None) when it finishes.
    constraint: object = None

    # -- token bookkeeping ------------------------------------------------------------------
    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    def get_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    def get_token_ids_range(self, start: int, end: int) -> list[int]:
        """Tokens [start, end) without building the whole list (a decode step needs one token)."""
        p = len(self.prompt_token_ids)
        if start >= p:
            return self.output_token_ids[start - p:end - p]
        if end <= p:
            return self.prompt_token_ids[start:end]
        return self.prompt_token_ids[start:] + self.output_token_ids[:end - p]

    def get_last_token_id(self) -> int:
        return self.output_token_ids[-1] if self.output_token_ids else self.prompt_token_ids[-1]

    @property
    def num_uncomputed_tokens(self) -> int:
        return self.num_tokens - self.num_computed_tokens

    @property
    def is_prefill(self) -> bool:
        """True while prompt tokens remain to be computed (prefill or a chunk of it)."""
        return self.num_computed_tokens < self.num_prompt_tokens

    def append_token(self, token_id: int, logprob: float, top_logprobs: dict | None = None) -> None:
        self.output_token_ids.append(token_id)
        self.cumulative_logprob += logprob
        if top_logprobs is not None:
            self.output_logprobs.append(top_logprobs)

    def reset_for_recompute(self) -> None:
        """Preempted by recomputation: the KV is dropped, every token is computed again."""
        self.num_computed_tokens = 0
        self.status = SequenceStatus.WAITING

    @property
    def finished(self) -> bool:
        return self.status.finished

    def fork(self, new_seq_id: int) -> "Sequence":
        """A copy sharing nothing mutable (the block manager shares the blocks separately)."""
        return Sequence(
            seq_id=new_seq_id,
            prompt_token_ids=self.prompt_token_ids,          # immutable by convention
            output_token_ids=list(self.output_token_ids),
            status=self.status,
            num_computed_tokens=self.num_computed_tokens,
            cumulative_logprob=self.cumulative_logprob,
            output_logprobs=list(self.output_logprobs),
            output_text=self.output_text,
            detok_state=_copy_state(self.detok_state),
            stop_reason=self.stop_reason,
            constraint=None if self.constraint is None else self.constraint.copy(),
            # NOTE: no generator: a parallel sample gets its own (seed, index) one when it starts.
        )


def _copy_state(state):
    return state.copy() if hasattr(state, "copy") else state


@dataclass(eq=False)
class SequenceGroup:
    """One request: its sequences share the prompt (and its KV blocks)."""

    request_id: str
    seqs: list[Sequence]
    sampling_params: SamplingParams
    arrival_time: float
    prompt: str | None = None
    error: str | None = None               # set when the request was refused
    prompt_logprobs: list | None = None    # per prompt token: {id: logprob} (first is None)
    first_token_time: float | None = None
    finished_time: float | None = None
    num_preemptions: int = 0

    @property
    def prompt_token_ids(self) -> list[int]:
        return self.seqs[0].prompt_token_ids

    def get_seqs(self, status: SequenceStatus | None = None) -> list[Sequence]:
        if status is None:
            return list(self.seqs)
        return [s for s in self.seqs if s.status == status]

    def get_unfinished_seqs(self) -> list[Sequence]:
        return [s for s in self.seqs if not s.finished]

    def num_seqs(self, status: SequenceStatus | None = None) -> int:
        return len(self.get_seqs(status))

    def add(self, seq: Sequence) -> None:
        self.seqs.append(seq)

    def remove(self, seq_id: int) -> None:
        self.seqs = [s for s in self.seqs if s.seq_id != seq_id]

    @property
    def finished(self) -> bool:
        return all(s.finished for s in self.seqs)

    @property
    def reuses_prefix_cache(self) -> bool:
        # NOTE: prompt logprobs need logits at every prompt position: no cached block may be skipped.
        return self.sampling_params.prompt_logprobs is None

    def wants_prompt_logprobs(self, seq: Sequence) -> bool:
        """The group's first sequence, still in its first prefill, returns prompt logprobs."""
        return (self.sampling_params.prompt_logprobs is not None and seq is self.seqs[0]
                and seq.is_prefill and seq.num_output_tokens == 0)

    def max_num_running_seqs(self) -> int:
        """Upper bound of sequences this group will run at once (for the sequence budget)."""
        sp = self.sampling_params
        if sp.use_beam_search:
            return sp.best_of
        if not any(s.output_token_ids for s in self.seqs) and len(self.seqs) == 1:
            return sp.best_of     # will fork into best_of after the prompt
        return len(self.get_unfinished_seqs())


@dataclass
class ScheduledSeq:
    """One sequence's work in one step: the scheduler's output, the model runner's input."""
    seq: Sequence
    num_new_tokens: int           # tokens computed this step, starting at seq.num_computed_tokens
    block_table: list[int]
    sample: bool                  # this step ends with the sequence's next token
    prompt_logits: bool = False   # also return logits at every computed prompt position
    group: SequenceGroup | None = None   # the request (the output processor's key)
    lookahead: int = 0            # multi-step: decode steps after this one in the same call (slots held)
