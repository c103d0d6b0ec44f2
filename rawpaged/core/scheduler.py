"""Iteration-level FCFS scheduler (the paper's section 4.5, with chunked prefill).

Every step it decides which sequence groups run and how many tokens each computes, within a token
budget (`max_num_batched_tokens`) and a sequence budget (`max_num_seqs`):
  1. running groups keep going (decode tokens, and the next chunk of a prompt still in prefill);
     when blocks run out, the most recently arrived running groups are preempted: recomputed
     (single-sequence groups) or swapped to CPU memory (multi-sequence groups);
  2. swapped groups come back before any new group is admitted;
  3. waiting groups are admitted first-come-first-served while blocks and budgets allow.
A request that can never fit is returned in `ignored` and the engine finishes it with an error.
The scheduler only does bookkeeping: the engine performs the swaps and copies it returns.
"""
from __future__ import annotations

import enum
from collections import deque
from dataclasses import dataclass, field

from rawpaged.core.interface import AllocStatus, KVCacheManager
from rawpaged.sequence import Sequence, SequenceGroup, SequenceStatus


class PreemptionMode(enum.Enum):
    RECOMPUTE = "recompute"
    SWAP = "swap"


@dataclass
class SchedulerConfig:
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048
    max_model_len: int = 2048
    preemption_mode: str = "auto"          # auto | recompute | swap
    enable_chunked_prefill: bool = True


@dataclass
class ScheduledGroup:
    group: SequenceGroup
    num_new_tokens: dict[int, int]         # seq_id -> tokens computed this step


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledGroup] = field(default_factory=list)
    blocks_to_swap_in: list[tuple[int, int]] = field(default_factory=list)    # (cpu, device)
    blocks_to_swap_out: list[tuple[int, int]] = field(default_factory=list)   # (device, cpu)
    blocks_to_copy: list[tuple[int, int]] = field(default_factory=list)       # (src, dst) on device
    ignored: list[tuple[SequenceGroup, str]] = field(default_factory=list)    # (group, why)
    num_batched_tokens: int = 0

    @property
    def is_empty(self) -> bool:
        return not (self.scheduled or self.blocks_to_swap_in or self.blocks_to_swap_out or self.blocks_to_copy)


@dataclass
class _Budget:
    max_tokens: int
    max_seqs: int
    tokens: int = 0
    seqs: int = 0

    def remaining_tokens(self) -> int:
        return self.max_tokens - self.tokens

    def can_add(self, tokens: int, seqs: int) -> bool:
        return self.tokens + tokens <= self.max_tokens and self.seqs + seqs <= self.max_seqs

    def add(self, tokens: int, seqs: int) -> None:
        self.tokens += tokens
        self.seqs += seqs


class Scheduler:
    def __init__(self, config: SchedulerConfig, block_manager: KVCacheManager):
        self.config = config
        self.block_manager = block_manager
        self.waiting: deque[SequenceGroup] = deque()
        self.running: deque[SequenceGroup] = deque()
        self.swapped: deque[SequenceGroup] = deque()
        self.num_preemptions = {"recompute": 0, "swap": 0}

    # -- queues ------------------------------------------------------------------------------
    def add_group(self, group: SequenceGroup) -> None:
        self.waiting.append(group)

    def abort_group(self, request_id: str) -> SequenceGroup | None:
        for queue in (self.waiting, self.running, self.swapped):
            for group in queue:
                if group.request_id == request_id:
                    queue.remove(group)
                    for seq in group.get_unfinished_seqs():
                        seq.status = SequenceStatus.FINISHED_ABORTED
                    self.free_group(group)
                    return group
        return None

    def free_group(self, group: SequenceGroup) -> None:
        for seq in group.seqs:
            self.block_manager.free(seq)

    def free_finished(self) -> None:
        """Drop finished groups from the running queue (their blocks are freed as seqs finish)."""
        self.running = deque(g for g in self.running if not g.finished)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running or self.swapped)

    # -- one step ----------------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = _Budget(self.config.max_num_batched_tokens, self.config.max_num_seqs)
        preempted = self._schedule_running(out, budget)
        if not preempted:
            self._schedule_swapped(out, budget)
        if not preempted and not self.swapped:
            self._schedule_waiting(out, budget)
        out.num_batched_tokens = budget.tokens
        return out

    def _schedule_running(self, out: SchedulerOutput, budget: _Budget) -> bool:
        """Keep running groups going; preempt the latest arrivals when blocks run out."""
        preempted = False
        kept: deque[SequenceGroup] = deque()
        # Decoding groups first so a long prefill chunk never starves the decodes of budget.
        queue = deque(sorted(self.running, key=lambda g: self._in_prefill(g)))
        while queue:
            group = queue.popleft()
            seqs = group.get_seqs(SequenceStatus.RUNNING)
            tokens = self._tokens_for(seqs, budget)
            if tokens is None:                                   # no token budget left this step
                kept.append(group)
                continue
            while not self.block_manager.can_append_slots(group):
                preempted = True
                if queue:
                    victim = queue.pop()                         # the most recent arrival
                    self._preempt(victim, out)
                else:
                    self._preempt(group, out)
                    group = None
                    break
            if group is None:
                break
            for seq in seqs:
                out.blocks_to_copy += self.block_manager.append_slots(seq, tokens[seq.seq_id])
            self._add(out, budget, group, tokens)
            kept.append(group)
        # Keep arrival order in the running queue.
        self.running = deque(sorted(kept, key=lambda g: g.arrival_time))
        return preempted

    def _schedule_swapped(self, out: SchedulerOutput, budget: _Budget) -> None:
        while self.swapped:
            group = self.swapped[0]
            if not self.block_manager.can_swap_in(group):
                break
            seqs = group.get_seqs(SequenceStatus.SWAPPED)
            tokens = self._tokens_for(seqs, budget)
            if tokens is None or not budget.can_add(0, len(seqs)):
                break
            self.swapped.popleft()
            out.blocks_to_swap_in += self.block_manager.swap_in(group)
            for seq in seqs:
                seq.status = SequenceStatus.RUNNING
                out.blocks_to_copy += self.block_manager.append_slots(seq, tokens[seq.seq_id])
            self._add(out, budget, group, tokens)
            self.running.append(group)

    def _schedule_waiting(self, out: SchedulerOutput, budget: _Budget) -> None:
        while self.waiting:
            group = self.waiting[0]
            seqs = group.get_seqs(SequenceStatus.WAITING)
            why = self._never_fits(group)
            if why is None:
                status = self.block_manager.can_allocate(group)
                if status == AllocStatus.NEVER:
                    why = (f"request needs more KV blocks than the cache has "
                           f"({self.block_manager.num_device_blocks} blocks of {self.block_manager.block_size} tokens)")
                elif status == AllocStatus.LATER:
                    break
            if why is not None:
                self.waiting.popleft()
                for seq in seqs:
                    seq.status = SequenceStatus.FINISHED_IGNORED
                out.ignored.append((group, why))
                continue
            if not budget.can_add(1, group.max_num_running_seqs()) or not self._prompt_fits(seqs, budget):
                break
            # Prefix caching may mark part of the prompt computed, so size the chunk after allocating.
            self.block_manager.allocate(group)
            tokens = self._tokens_for(seqs, budget)
            assert tokens is not None, "a prompt that fit before allocation must fit after it"
            self.waiting.popleft()
            for seq in seqs:
                seq.status = SequenceStatus.RUNNING
            self._add(out, budget, group, tokens)
            self.running.append(group)

    # -- helpers -----------------------------------------------------------------------------
    def _never_fits(self, group: SequenceGroup) -> str | None:
        n = group.seqs[0].num_tokens
        if n > self.config.max_model_len:
            return f"prompt has {n} tokens, more than the maximum model length {self.config.max_model_len}"
        if not self.config.enable_chunked_prefill and n > self.config.max_num_batched_tokens:
            return (f"prompt has {n} tokens, more than max_num_batched_tokens="
                    f"{self.config.max_num_batched_tokens} with chunked prefill disabled")
        return None

    def _prompt_fits(self, seqs: list[Sequence], budget: _Budget) -> bool:
        """Whether this step can take the group's prompt (a chunk of it, with chunked prefill),
        counted before prefix-cache hits so the check needs no allocation."""
        left = budget.remaining_tokens()
        if left <= 0:
            return False
        if self.config.enable_chunked_prefill and len(seqs) == 1:
            return True
        return sum(s.num_uncomputed_tokens for s in seqs) <= left

    def _tokens_for(self, seqs: list[Sequence], budget: _Budget) -> dict[int, int] | None:
        """Tokens each sequence computes this step, or None when the budget cannot take them."""
        need = {s.seq_id: s.num_uncomputed_tokens for s in seqs}
        total = sum(need.values())
        left = budget.remaining_tokens()
        if total <= left:
            return need
        if not self.config.enable_chunked_prefill or len(seqs) != 1 or left <= 0:
            return None
        (seq,) = seqs
        return {seq.seq_id: left}                                # a prefill chunk

    def _add(self, out: SchedulerOutput, budget: _Budget, group: SequenceGroup, tokens: dict[int, int]) -> None:
        budget.add(sum(tokens.values()), len(tokens))
        out.scheduled.append(ScheduledGroup(group, tokens))

    @staticmethod
    def _in_prefill(group: SequenceGroup) -> bool:
        return any(s.is_prefill for s in group.get_seqs(SequenceStatus.RUNNING))

    def _preempt(self, group: SequenceGroup, out: SchedulerOutput) -> None:
        mode = self._preemption_mode(group)
        if mode == PreemptionMode.SWAP and not self.block_manager.can_swap_out(group):
            mode = PreemptionMode.RECOMPUTE                      # swap pool full: recompute instead
        group.num_preemptions += 1
        if mode == PreemptionMode.SWAP:
            out.blocks_to_swap_out += self.block_manager.swap_out(group)
            for seq in group.get_seqs(SequenceStatus.RUNNING):
                seq.status = SequenceStatus.SWAPPED
            self.swapped.append(group)
            self.num_preemptions["swap"] += 1
        else:
            for seq in group.get_seqs(SequenceStatus.RUNNING):
                self.block_manager.free(seq)
                seq.reset_for_recompute()
            self.waiting.appendleft(group)
            self.num_preemptions["recompute"] += 1

    def _preemption_mode(self, group: SequenceGroup) -> PreemptionMode:
        mode = self.config.preemption_mode
        if mode == "recompute":
            return PreemptionMode.RECOMPUTE
        if mode == "swap":
            return PreemptionMode.SWAP
        return PreemptionMode.RECOMPUTE if group.max_num_running_seqs() == 1 else PreemptionMode.SWAP
