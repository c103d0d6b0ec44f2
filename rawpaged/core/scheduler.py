"""Iteration-level FCFS scheduler (the paper's section 4.5, with chunked prefill).

Every step it decides which sequence groups run and how many tokens each computes, within a token
budget (`max_num_batched_tokens`) and a sequence budget (`max_num_seqs`):
  1. running groups keep going (decode tokens, and the next chunk of a prompt still in prefill);
     when blocks run out, the most recently arrived running groups are preempted: recomputed
     (single-sequence groups) or swapped to CPU memory (multi-sequence groups);
  2. swapped groups come back before any new group is admitted;
  3. waiting groups are admitted first-come-first-served while blocks and budgets allow.
With `batching="static"` (FasterTransformer's request-level batching, a baseline of the paper) step 3
forms a batch only when nothing runs: FCFS while memory and max_num_seqs allow (not the step's token
budget: the batch's prompts are prefilled over as many steps as they need), and admits nothing else
until every request of the batch has finished (a preempted member is the only one let back in).
A request that can never fit is refused at admission (`why_never_fits`), or returned in
`ignored` and finished with an error. The scheduler only does bookkeeping: the executor performs the
swaps and copies it returns, and the output processor frees and forks sequences through it.
"""
from __future__ import annotations

import enum
import logging
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from rawpaged.core.interface import AllocStatus, KVCacheManager, SlotAccounting
from rawpaged.sequence import ScheduledSeq, Sequence, SequenceGroup, SequenceStatus

if TYPE_CHECKING:
    from rawpaged.engine.config import EngineConfig

logger = logging.getLogger("rawpaged.scheduler")


class PreemptionMode(enum.Enum):
    RECOMPUTE = "recompute"
    SWAP = "swap"


@dataclass
class ScheduledGroup:
    group: SequenceGroup
    num_new_tokens: dict[int, int]         # seq_id -> tokens computed this step


@dataclass
class SchedulerStats:
    """A snapshot of the queues and the KV pool, read live (what /metrics and get_stats show)."""
    num_running_seqs: int
    num_waiting: int
    num_swapped: int
    kv_usage: float
    num_free_blocks: int
    num_device_blocks: int
    num_cpu_blocks: int
    num_preemptions: dict
    prefix_cache_queries: int
    prefix_cache_hits: int
    waste_slots: int               # allocated device slots not holding a token
    allocated_slots: int
    kv_slots: SlotAccounting       # where every device slot is (tokens, reserved, fragmentation, free)


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledGroup] = field(default_factory=list)
    batch: list[ScheduledSeq] = field(default_factory=list)   # one per sequence computing tokens
    blocks_to_swap_in: list[tuple[int, int]] = field(default_factory=list)    # (cpu, device)
    blocks_to_swap_out: list[tuple[int, int]] = field(default_factory=list)   # (device, cpu)
    blocks_to_copy: list[tuple[int, int]] = field(default_factory=list)       # (src, dst) on device
    ignored: list[tuple[SequenceGroup, str]] = field(default_factory=list)    # (group, why)
    num_batched_tokens: int = 0
    kv_slots: SlotAccounting | None = None   # the device pool while this step runs (after admissions)
    lookahead: int = 0                 # multi-step: decode steps each sequence runs after this one

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
    def __init__(self, config: EngineConfig, block_manager: KVCacheManager):
        """`config` is the engine's, with max_model_len and max_num_batched_tokens resolved against
        the model and the cache; the scheduler reads max_num_seqs, preemption_mode and
        enable_chunked_prefill from it too (one config path: a new option is one field there)."""
        self.config = config
        self.block_manager = block_manager
        self.waiting: deque[SequenceGroup] = deque()
        self.running: deque[SequenceGroup] = deque()
        self.swapped: deque[SequenceGroup] = deque()
        self.num_preemptions = {"recompute": 0, "swap": 0}
        self.batch: list[SequenceGroup] = []      # static batching: the batch that runs now

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

    def free_seq(self, seq: Sequence) -> None:
        """A sequence finished or left its group: its blocks go back to the pool."""
        self.block_manager.free(seq)

    def fork_seq(self, parent: Sequence, child: Sequence) -> None:
        """A new sample or beam shares every block of its parent (copy-on-write later)."""
        self.block_manager.fork(parent, child)

    def free_finished(self) -> None:
        """Drop finished groups from the running queue (their blocks are freed as seqs finish)."""
        self.running = deque(g for g in self.running if not g.finished)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running or self.swapped)

    def why_never_fits(self, group: SequenceGroup) -> str | None:
        """Why this request can never run to completion here, or None (checked before admission;
        the engine finishes such a group with an error output)."""
        c = self.config
        n = group.seqs[0].num_tokens                     # the prompt, or everything after a recompute
        if n > c.max_model_len:
            return f"prompt has {n} tokens, more than the maximum model length {c.max_model_len}"
        if not c.enable_chunked_prefill and n > c.max_num_batched_tokens:
            return (f"prompt has {n} tokens, more than max_num_batched_tokens="
                    f"{c.max_num_batched_tokens} with chunked prefill disabled")
        return self.why_too_wide(group)

    def why_too_wide(self, group: SequenceGroup) -> str | None:
        """Why this request's sequences can never all run, or None (the engine refuses it at once).

        NOTE: a group wider than max_num_seqs would wait forever, and one whose sequences cannot all
        reach their maximum length in the cache at once would preempt itself forever.
        """
        c, sp = self.config, group.sampling_params
        prompt = group.seqs[0].num_prompt_tokens
        width = group.max_num_running_seqs()
        what = "beam width" if sp.use_beam_search else "best_of" if sp.best_of > sp.n else "n"
        if width > c.max_num_seqs:
            return f"{what}={width} is more than max_num_seqs={c.max_num_seqs} sequences a step can run"
        if width > c.max_num_batched_tokens:
            return (f"{what}={width} is more than max_num_batched_tokens={c.max_num_batched_tokens}: "
                    f"its sequences could never decode in one step")
        if width > 1:
            max_len = min(c.max_model_len, prompt + (sp.max_tokens or c.max_model_len))
            bs = self.block_manager.block_size
            # The prompt's full blocks stay shared; each sequence may own every block after them.
            need = prompt // bs + width * (-(-max_len // bs) - prompt // bs)
            room = self.block_manager.num_device_blocks - self.block_manager.watermark_blocks
            if need > room:
                return (f"{width} sequences of up to {max_len} tokens need up to {need} KV blocks, more than "
                        f"the cache's {room}: lower n/best_of or max_tokens")
        return None

    def on_step_done(self, out: SchedulerOutput) -> None:
        """After the model ran: the batch's tokens are in the cache (prefix caching may register them)."""
        for s in out.batch:
            s.seq.num_computed_tokens += s.num_new_tokens
            self.block_manager.mark_computed(s.seq)

    def stats(self) -> SchedulerStats:
        bm = self.block_manager
        kv = bm.slot_accounting()
        return SchedulerStats(
            num_running_seqs=sum(len(g.get_unfinished_seqs()) for g in self.running),
            waste_slots=kv.allocated - kv.real_tokens, allocated_slots=kv.allocated, kv_slots=kv,
            num_waiting=len(self.waiting), num_swapped=len(self.swapped), kv_usage=bm.usage(),
            num_free_blocks=bm.get_num_free_device_blocks(), num_device_blocks=bm.num_device_blocks,
            num_cpu_blocks=bm.num_cpu_blocks, num_preemptions=dict(self.num_preemptions),
            prefix_cache_queries=bm.prefix_cache_queries, prefix_cache_hits=bm.prefix_cache_hits)

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
        out.batch = self._flatten(out.scheduled, out.lookahead)
        if out.is_empty and not out.ignored and not self.running:
            self._refuse_stuck(out)
        out.kv_slots = self.block_manager.slot_accounting()
        return out

    def _refuse_stuck(self, out: SchedulerOutput) -> None:
        """Nothing runs and nothing could be scheduled: the head of the queues can never start.

        NOTE: admission checks make this unreachable; it is the safety net that turns a would-be
        endless loop of empty steps into an error for the one request at the head.
        """
        queue = self.swapped or self.waiting
        if not queue:
            return
        group = queue.popleft()
        logger.error("scheduler: request %s can never be scheduled; refusing it", group.request_id)
        for seq in group.get_unfinished_seqs():
            self.block_manager.free(seq)
            seq.status = SequenceStatus.FINISHED_IGNORED
        out.ignored.append((group, "the scheduler could not place this request in the KV cache"))

    def _flatten(self, scheduled: list[ScheduledGroup], lookahead: int) -> list[ScheduledSeq]:
        """One ScheduledSeq per sequence that computes tokens this step, carrying its group."""
        batch = []
        for sg in scheduled:
            group = sg.group
            for seq in group.seqs:
                n = sg.num_new_tokens.get(seq.seq_id)
                if n:
                    batch.append(ScheduledSeq(seq, n, self.block_manager.get_block_table(seq),
                                              sample=seq.num_computed_tokens + n == seq.num_tokens,
                                              prompt_logits=group.wants_prompt_logprobs(seq), group=group,
                                              lookahead=lookahead))
        return batch

    def _schedule_running(self, out: SchedulerOutput, budget: _Budget) -> bool:
        """Keep running groups going; preempt the latest arrivals when blocks run out."""
        preempted = False
        kept: deque[SequenceGroup] = deque()
        out.lookahead = lookahead = self._lookahead()
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
                if seq.seq_id in tokens:
                    out.blocks_to_copy += self.block_manager.append_slots(seq, tokens[seq.seq_id] + lookahead)
            self._add(out, budget, group, tokens)
            kept.append(group)
        # Keep arrival order in the running queue.
        self.running = deque(sorted(kept, key=lambda g: g.arrival_time))
        return preempted

    def _lookahead(self) -> int:
        """Multi-step scheduling (config.num_scheduler_steps): how many decode steps every running
        sequence runs after this one, in the same call, feeding back its own greedy tokens.

        Only when nothing waits or is swapped out (a new request is admitted at the next schedule,
        not after several steps), every running group decodes one plain-greedy sequence (its step
        samples itself: SamplingParams.is_plain_greedy), none would pass its max_tokens or the
        model's length, and the blocks for every lookahead token are free now (never a preemption
        for them). NOTE: a sequence that stops early (EOS, a stop string) drops the tokens after its
        end; their K/V went into slots it held anyway.
        """
        k = self.config.num_scheduler_steps - 1
        if k <= 0 or self.waiting or self.swapped or not self.running:
            return 0
        for group in self.running:
            sp = group.sampling_params
            if not sp.is_plain_greedy():
                return 0
            for seq in group.get_seqs(SequenceStatus.RUNNING):
                if seq.num_uncomputed_tokens != 1:               # a prompt or a recompute in progress
                    return 0
                room = self.config.max_model_len - seq.num_prompt_tokens
                if sp.max_tokens is not None:
                    room = min(room, sp.max_tokens)
                k = min(k, room - len(seq.output_token_ids) - 1)
        if k <= 0 or not self.block_manager.can_append_slots_all(self.running, k):
            return 0
        return k

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
                if seq.seq_id in tokens:
                    out.blocks_to_copy += self.block_manager.append_slots(seq, tokens[seq.seq_id])
            self._add(out, budget, group, tokens)
            self.running.append(group)

    def _schedule_waiting(self, out: SchedulerOutput, budget: _Budget) -> None:
        static = self.config.batching == "static"
        if static:
            self.batch = [g for g in self.batch if not g.finished]
        forming = static and not self.batch          # NOTE: nothing runs, nothing is swapped
        batch_width = 0
        while self.waiting:
            group = self.waiting[0]
            if static and not forming and group not in self.batch:
                break                                # the batch has not drained yet
            seqs = group.get_seqs(SequenceStatus.WAITING)
            why = self.why_never_fits(group)
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
            if forming:
                batch_width += group.max_num_running_seqs()
                if batch_width > self.config.max_num_seqs:
                    break
            elif not budget.can_add(1, group.max_num_running_seqs()) or not self._prompt_fits(seqs, budget):
                break
            # Prefix caching may mark part of the prompt computed, so size the chunk after allocating.
            self.block_manager.allocate(group)
            tokens = self._tokens_for(seqs, budget)
            self.waiting.popleft()
            for seq in seqs:
                seq.status = SequenceStatus.RUNNING
            # NOTE: None when cache hits left a chunk no seq can take, or a static batch's prompt waits
            # for a later step's budget (it is prefilled as a running group then).
            if tokens is not None:
                self._add(out, budget, group, tokens)
            self.running.append(group)
            if forming:
                self.batch.append(group)

    # -- helpers -----------------------------------------------------------------------------
    def _prompt_fits(self, seqs: list[Sequence], budget: _Budget) -> bool:
        """Whether this step can take the group's prompt (a chunk of it, with chunked prefill),
        counted before prefix-cache hits so the check needs no allocation."""
        return self._tokens_for(seqs, budget) is not None

    def _tokens_for(self, seqs: list[Sequence], budget: _Budget) -> dict[int, int] | None:
        """Tokens each sequence computes this step, or None when the budget cannot take any.

        With chunked prefill a group that does not fit computes a chunk: its sequences advance
        through their uncomputed tokens (a prompt, or everything after a recompute), but none reaches
        its last token, the one that samples, unless all of them do. NOTE: a group samples together
        (beam search ranks every beam's candidates in one step).
        """
        need = {s.seq_id: s.num_uncomputed_tokens for s in seqs}
        left = budget.remaining_tokens()
        if sum(need.values()) <= left:
            return need
        if not self.config.enable_chunked_prefill:
            return None
        chunk = {}
        for seq_id, n in need.items():
            take = min(n - 1, left)
            if take > 0:
                chunk[seq_id] = take
                left -= take
        return chunk or None

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
