"""The interface the scheduler and engine talk to: a KV-cache manager, and its slot accounting.

The paged `BlockSpaceManager` (block_manager.py) is one implementation. The paper's Orca
baselines (one contiguous reservation per sequence: Max, Pow2, Oracle; orca.py) are others, so
the comparison runs inside the same engine, kernels and scheduler (kv_managers.py builds them). Units: a manager hands out
memory in blocks of `block_size` token slots; a manager that reserves contiguous runs of slots
can present them as consecutive blocks (or use block_size 1). Methods marked "trivial" below have
an obvious do-nothing implementation for a manager without the feature.

Order of the copies one schedule() returns: perform every swap-out, then every swap-in, then the
copies append_slots returned. Blocks a swap-out frees may be handed out again in the same step.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from rawpaged.sequence import Sequence, SequenceGroup


class AllocStatus(enum.Enum):
    OK = enum.auto()      # fits now
    LATER = enum.auto()   # not enough free memory now; retry when some is freed
    NEVER = enum.auto()   # needs more than the device pool has (minus the watermark)


@dataclass(frozen=True)
class SlotAccounting:
    """Where the device pool's KV token slots are, at one moment (the paper's Fig. 2 and 3).

    Every slot is in exactly one of the five parts, so
    total == real_tokens + reserved_unused + internal_fragmentation + external_fragmentation + free.
    A slot shared by several sequences (a forked or prefix-cached block) is counted once.
    """

    total: int
    """Every token slot of the device pool (num_device_blocks * block_size)."""

    real_tokens: int
    """Slots holding, or handed out for, a token a sequence has now: a token's slot counts once the
    sequence's allocation covers its position (computed or not yet computed, e.g. a prompt chunk
    still to come). A token just sampled whose position no allocation covers yet holds no slot."""

    reserved_unused: int
    """Slots of a reservation made ahead of need that the sequence will fill before it finishes:
    its final length minus its current length, within the reservation. The final length is the
    length the sequence reaches when it finishes; a manager that cannot know it yet (a stop token
    may come earlier) uses the longest it can become (prompt + max_tokens, capped by the model
    length), so this part is an upper bound and internal_fragmentation a lower bound. The paged
    manager takes blocks only when tokens need them: 0."""

    internal_fragmentation: int
    """Slots inside allocated memory that hold no token and that no token of the sequence will
    fill: a reservation beyond the sequence's final length, or the empty tail slots of an
    allocation unit. The paged manager counts here the empty slots of each sequence's last block
    (a last block shared by forks counted once), the paper's "waste only in the last block", even
    though the sequence's next tokens may fill them: the block was taken whole because blocks are
    the unit, not reserved for a predicted length."""

    external_fragmentation: int
    """Unallocated slots no allocation can be handed whole: for a manager of contiguous runs, every
    free slot outside the largest free contiguous run (gaps between reservations). The paged
    manager hands any free block to any sequence: 0."""

    free: int
    """Unallocated slots the next allocation can take (the paged manager counts unreferenced
    prefix-cached blocks here: they are evicted on demand, as usage() counts them)."""

    @property
    def allocated(self) -> int:
        """Slots held by sequences: total minus free and external fragmentation."""
        return self.real_tokens + self.reserved_unused + self.internal_fragmentation

    @property
    def wasted(self) -> int:
        """Slots neither holding a token nor usable by the next allocation."""
        return self.reserved_unused + self.internal_fragmentation + self.external_fragmentation


@runtime_checkable
class KVCacheManager(Protocol):
    """What the scheduler and engine need from a KV-cache manager.

    A manager is pure bookkeeping: no arrays. It returns the block copies ((src, dst) pairs) the
    cache engine performs before the model runs. Group-level methods act on the group's sequences
    in one status: allocate on WAITING, append on RUNNING, swap_out on RUNNING, swap_in on SWAPPED.
    """

    block_size: int
    """Token slots per block (a contiguous manager may use 1, or present runs as blocks)."""

    @property
    def num_device_blocks(self) -> int: ...

    @property
    def num_cpu_blocks(self) -> int:
        """Blocks of the swap pool (trivial: 0)."""

    def get_num_free_device_blocks(self) -> int:
        """Device blocks the next allocation can take (matches SlotAccounting.free / block_size)."""

    def get_num_free_cpu_blocks(self) -> int:
        """Free blocks of the swap pool (trivial: 0)."""

    def usage(self) -> float:
        """Fraction of the device pool held by sequences: SlotAccounting.allocated / total, i.e.
        1 - (free + external_fragmentation) / total (paged: 1 - free blocks / num_device_blocks)."""

    def get_block_table(self, seq: Sequence) -> list[int]:
        """The physical blocks holding seq's KV on the device, in token order (a copy)."""

    def slot_accounting(self) -> SlotAccounting:
        """Where the device pool's token slots are now (see SlotAccounting). O(sequences)."""

    # -- admission --------------------------------------------------------------------------
    def can_allocate(self, group: SequenceGroup) -> AllocStatus:
        """Whether the group's WAITING sequences (all their tokens) fit now: NEVER when they would
        not fit in an empty pool (minus the watermark), LATER when not now."""

    def allocate(self, group: SequenceGroup) -> None:
        """Memory for the group's WAITING sequences (call after can_allocate said OK); sets each
        one's num_computed_tokens (above 0 where a prefix cache supplies its leading tokens)."""

    # -- decoding ---------------------------------------------------------------------------
    def can_append_slots(self, group: SequenceGroup) -> bool:
        """Whether every RUNNING sequence of the group can get slots for all its uncomputed tokens.
        Must be O(blocks touched), not O(pool): it runs for every group every step."""

    def append_slots(self, seq: Sequence, num_new_tokens: int) -> list[tuple[int, int]]:
        """Slots for tokens num_computed_tokens .. + num_new_tokens of seq; returns the device block
        copies (src, dst) to perform first (copy-on-write). O(blocks touched)."""

    def fork(self, parent_seq: Sequence, child_seq: Sequence) -> None:
        """child_seq gets parent_seq's KV. The paged manager shares every block; a manager without
        sharing reserves the child's memory and returns the copy from the child's next
        append_slots, as copy-on-write does."""

    def free(self, seq: Sequence) -> None:
        """Release seq's memory (device or swap pool); a no-op for a sequence it does not know."""

    def mark_computed(self, seq: Sequence) -> None:
        """After a step computed seq's tokens (the prefix cache registers full blocks; trivial)."""

    # -- swapping (a manager without a swap pool answers can_swap_out False: trivial) --------
    def can_swap_out(self, group: SequenceGroup) -> bool: ...

    def swap_out(self, group: SequenceGroup) -> list[tuple[int, int]]:
        """Move the group's RUNNING sequences to the swap pool, all or nothing; returns
        (device_block, cpu_block) pairs (a block shared in the group moves once, stays shared)."""

    def can_swap_in(self, group: SequenceGroup) -> bool:
        """Whether the group's SWAPPED sequences fit back, with the slots of their next step."""

    def swap_in(self, group: SequenceGroup) -> list[tuple[int, int]]:
        """Move the group's SWAPPED sequences back; returns (cpu_block, device_block) pairs."""

    # -- prefix cache (trivial: counters 0, reset does nothing) ------------------------------
    @property
    def prefix_cache_queries(self) -> int:
        """Blocks looked up in the prefix cache for new requests, since start."""

    @property
    def prefix_cache_hits(self) -> int:
        """Blocks found there, since start."""

    def reset_prefix_cache(self) -> None: ...
