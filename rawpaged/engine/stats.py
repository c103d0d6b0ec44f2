"""Engine statistics: what the server's /metrics and the benchmarks read.

Counters only grow; gauges come from the scheduler's live snapshot (`Scheduler.stats()`). Memory
waste follows the paper's definition: token slots allocated in the KV cache minus the slots holding
real tokens. The KV manager's slot accounting (interface.SlotAccounting): `kv_*_slots` are the live
gauges; `mean_kv_*_fraction` are its parts while each step ran (SchedulerOutput.kv_slots: after that
step's admissions, before its finished sequences left) as fractions of the slots in use (allocated +
external fragmentation: everything not free), averaged over the steps where some slot was in use.
mean_kv_token_fraction is the paper's Fig. 2 "token states" share; the four add up to 1.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from rawpaged.sequence import SequenceStatus

# The parts of the slots in use (stats name -> SlotAccounting field), as the paper's Fig. 2 splits them.
KV_PARTS = {"token": "real_tokens", "reserved": "reserved_unused", "internal": "internal_fragmentation",
            "external": "external_fragmentation"}


@dataclass
class EngineStats:
    # counters
    num_steps: int = 0
    num_requests: int = 0
    num_finished: int = 0
    num_aborted: int = 0
    num_refused: int = 0
    prompt_tokens: int = 0             # prompt tokens computed (prefix-cache hits excluded)
    generation_tokens: int = 0         # tokens sampled
    # the latest step
    batched_tokens: int = 0
    memory_waste_slots: int = 0        # allocated slots - used slots
    # running means
    sum_running_seqs: int = 0
    sum_waste_fraction: float = 0.0
    num_kv_steps: int = 0              # steps that ended with some KV slot in use
    sum_kv_fractions: dict = field(default_factory=lambda: dict.fromkeys(KV_PARTS, 0.0))
    time_to_first_token: list = field(default_factory=list, repr=False)
    e2e_latency: list = field(default_factory=list, repr=False)

    def on_arrival(self, group) -> None:
        self.num_requests += 1

    def on_finish(self, group) -> None:
        if group.error is not None:
            self.num_refused += 1
        elif any(s.status == SequenceStatus.FINISHED_ABORTED for s in group.seqs):
            pass                                  # counted by LLMEngine.abort_request
        elif group.finished:
            self.num_finished += 1
            if group.first_token_time is not None and group.finished_time is not None:
                self.time_to_first_token.append(group.first_token_time - group.arrival_time)
                self.e2e_latency.append(group.finished_time - group.arrival_time)

    def on_step(self, out, snapshot) -> None:
        """After a step: `out` is the SchedulerOutput it ran, `snapshot` the scheduler's stats()."""
        self.num_steps += 1
        self.batched_tokens = out.num_batched_tokens
        for s in out.batch:
            # tokens computed now that were prompt tokens (the others are decode inputs)
            seq, n = s.seq, s.num_new_tokens
            self.prompt_tokens += max(0, min(n, seq.num_prompt_tokens - (seq.num_computed_tokens - n)))
        self.memory_waste_slots = snapshot.waste_slots
        self.sum_running_seqs += snapshot.num_running_seqs
        if snapshot.allocated_slots:
            self.sum_waste_fraction += snapshot.waste_slots / snapshot.allocated_slots
        kv = out.kv_slots or snapshot.kv_slots
        in_use = kv.allocated + kv.external_fragmentation
        if in_use:
            self.num_kv_steps += 1
            for part, attr in KV_PARTS.items():
                self.sum_kv_fractions[part] += getattr(kv, attr) / in_use

    def as_dict(self, snapshot) -> dict:
        """Counters and means, with the gauges of the scheduler's live `snapshot`."""
        q = snapshot.prefix_cache_queries
        steps = self.num_steps
        return {
            "num_running": snapshot.num_running_seqs, "num_waiting": snapshot.num_waiting,
            "num_swapped": snapshot.num_swapped, "kv_usage": snapshot.kv_usage,
            "num_free_blocks": snapshot.num_free_blocks, "num_device_blocks": snapshot.num_device_blocks,
            "num_cpu_blocks": snapshot.num_cpu_blocks,
            "num_preemptions_recompute": snapshot.num_preemptions["recompute"],
            "num_preemptions_swap": snapshot.num_preemptions["swap"],
            "prefix_cache_queries": q, "prefix_cache_hits": snapshot.prefix_cache_hits,
            "prefix_cache_hit_rate": snapshot.prefix_cache_hits / q if q else 0.0,
            "prompt_tokens": self.prompt_tokens, "generation_tokens": self.generation_tokens,
            "num_requests": self.num_requests, "num_finished": self.num_finished,
            "num_aborted": self.num_aborted, "num_refused": self.num_refused,
            "num_steps": steps, "memory_waste_slots": self.memory_waste_slots,
            "mean_running_seqs": self.sum_running_seqs / steps if steps else 0.0,
            "mean_waste_fraction": self.sum_waste_fraction / steps if steps else 0.0,
            **kv_gauges(snapshot.kv_slots),
            **{f"mean_kv_{part}_fraction": total / self.num_kv_steps if self.num_kv_steps else 0.0
               for part, total in self.sum_kv_fractions.items()},
        }


def kv_gauges(kv) -> dict:
    """The slot accounting as flat stats: kv_total_slots, kv_token_slots, ... kv_free_slots."""
    return {"kv_total_slots": kv.total, **{f"kv_{part}_slots": getattr(kv, attr) for part, attr in KV_PARTS.items()},
            "kv_free_slots": kv.free}
