"""Engine statistics: what the server's /metrics and the benchmarks read.

Counters only grow; gauges describe the latest step. Memory waste follows the paper's definition:
token slots allocated in the KV cache minus the slots holding real tokens.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from rawpaged.sequence import SequenceStatus


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
    # gauges (latest step)
    num_running: int = 0
    num_waiting: int = 0
    num_swapped: int = 0
    kv_usage: float = 0.0              # fraction of device blocks in use
    num_free_blocks: int = 0
    memory_waste_slots: int = 0        # allocated slots - used slots, this step
    batched_tokens: int = 0
    # running means
    sum_running_seqs: int = 0
    sum_waste_fraction: float = 0.0
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

    def on_step(self, engine, out) -> None:
        sched, bm = engine.scheduler, engine.block_manager
        self.num_steps += 1
        self.batched_tokens = out.num_batched_tokens
        for sg in out.scheduled:
            for seq in sg.group.seqs:
                n = sg.num_new_tokens.get(seq.seq_id, 0)
                # tokens computed now that were prompt tokens (the others are decode inputs)
                self.prompt_tokens += max(0, min(n, seq.num_prompt_tokens - (seq.num_computed_tokens - n)))
        running = [s for g in sched.running for s in g.get_unfinished_seqs()]
        self.num_running = len(running)
        self.num_waiting = len(sched.waiting)
        self.num_swapped = len(sched.swapped)
        self.kv_usage = bm.usage()
        self.num_free_blocks = bm.get_num_free_device_blocks()
        self.memory_waste_slots, allocated = self._waste(bm, running)
        self.sum_running_seqs += self.num_running
        self.sum_waste_fraction += self.memory_waste_slots / allocated if allocated else 0.0

    @staticmethod
    def _waste(bm, running) -> tuple[int, int]:
        """(allocated - used slots, allocated slots) of the device pool.

        A table covers exactly its sequence's tokens, so only a sequence's last block can be partly
        filled; a last block shared by forks is counted once. O(sequences), not O(blocks).
        """
        bs = bm.block_size
        allocated = (bm.num_device_blocks - bm.get_num_free_device_blocks()) * bs
        empty: dict[int, int] = {}                       # last physical block -> empty slots
        for seq in running:
            table = bm.get_block_table(seq)
            if table:
                empty[table[-1]] = min(empty.get(table[-1], bs), len(table) * bs - seq.num_tokens)
        return sum(empty.values()), allocated

    def as_dict(self, engine) -> dict:
        bm, sched = engine.block_manager, engine.scheduler
        q = bm.prefix_cache_queries
        # NOTE: gauges are read live, not from the last step: after aborts with nothing left to run
        # no step follows, and /metrics must not keep showing the aborted requests.
        return {
            "num_running": sum(len(g.get_unfinished_seqs()) for g in sched.running),
            "num_waiting": len(sched.waiting), "num_swapped": len(sched.swapped),
            "kv_usage": bm.usage(), "num_free_blocks": bm.get_num_free_device_blocks(),
            "num_device_blocks": bm.num_device_blocks, "num_cpu_blocks": bm.num_cpu_blocks,
            "num_preemptions_recompute": sched.num_preemptions["recompute"],
            "num_preemptions_swap": sched.num_preemptions["swap"],
            "prefix_cache_queries": q, "prefix_cache_hits": bm.prefix_cache_hits,
            "prefix_cache_hit_rate": bm.prefix_cache_hits / q if q else 0.0,
            "prompt_tokens": self.prompt_tokens, "generation_tokens": self.generation_tokens,
            "num_requests": self.num_requests, "num_finished": self.num_finished,
            "num_aborted": self.num_aborted, "num_refused": self.num_refused,
            "num_steps": self.num_steps, "memory_waste_slots": self.memory_waste_slots,
            "mean_running_seqs": self.sum_running_seqs / self.num_steps if self.num_steps else 0.0,
            "mean_waste_fraction": self.sum_waste_fraction / self.num_steps if self.num_steps else 0.0,
        }
