"""A buddy allocator: power-of-two blocks of units, split to serve a request and coalesced with their
buddy when freed. The paper's Orca baselines place each request's KV this way (its section 6.1: "We
assume Orca uses the buddy allocation algorithm to determine the memory address to store KV cache").

    a = BuddyAllocator(15_728)          # OPT-13B's KV slots on one A100-40GB (units of one token)
    run = a.allocate(300)               # Run(start, 512): the request rounded up to a power of two
    a.free(run)                         # merges with its buddy, and that block with its buddy, ...

Layout: a pool of N units is the binary digits of N, largest first: top blocks of 2^k units at
offsets that are multiples of 2^k (15,728 = 8192 + 4096 + 2048 + 1024 + 256 + 64 + 32 + 16). Inside a
top block of order K, a block of order k < K starting at s has its buddy at s XOR 2^k; the two make
the block of order k + 1 at min(s, buddy). Top blocks have no buddy.

allocate(n): the smallest free block of order >= ceil(log2 n) (the lowest address among those), split
in halves down to that order; each split's upper half stays free. The returned Run is the whole
block: its length is the power of two, and the units beyond n are the allocator's rounding (the
Orca manager counts them). free(run): the block merges with its buddy while the buddy is free and
whole, so free blocks are always maximal: the free blocks are a function of the allocated set
alone, and allocating then freeing restores the pool exactly (can_allocate_all relies on it).

Free blocks are kept per order in sorted lists (bisect): allocate and free are O(orders x log blocks).
The interface is ContiguousAllocator's (contiguous.py), so OrcaManager takes either.
"""
from __future__ import annotations

import bisect
import functools

from rawpaged.core.contiguous import Run, allocates_all
from rawpaged.errors import RawpagedError


def block_order(length: int) -> int:
    """The order of the smallest power-of-two block holding `length` units."""
    return (length - 1).bit_length()


class BuddyAllocator:
    def __init__(self, num_units: int):
        if num_units < 1:
            raise RawpagedError(f"a buddy pool needs at least one unit, got {num_units}")
        self.num_units = num_units
        self.max_order = num_units.bit_length() - 1
        self._free: list[list[int]] = [[] for _ in range(self.max_order + 1)]   # order -> sorted starts
        self._top_starts: list[int] = []
        self._top_orders: list[int] = []
        start = 0
        for k in range(self.max_order, -1, -1):        # the binary digits of num_units, largest first
            if num_units >> k & 1:
                self._top_starts.append(start)
                self._top_orders.append(k)
                self._free[k].append(start)
                start += 1 << k
        self._allocated: dict[int, int] = {}           # start -> order of every allocated block
        self._num_free = num_units

    # -- counts ---------------------------------------------------------------------------------
    def num_free(self) -> int:
        """Free units, in every free block."""
        return self._num_free

    def largest_free_run(self) -> int:
        """The most units one allocation can take now (the largest free block)."""
        for k in range(self.max_order, -1, -1):
            if self._free[k]:
                return 1 << k
        return 0

    def free_runs(self) -> list[Run]:
        """Every free block, sorted by start (adjacent blocks that are not buddies stay apart)."""
        return [Run(s, 1 << k) for s, k in sorted((s, k) for k, starts in enumerate(self._free) for s in starts)]

    def allocated_runs(self) -> list[Run]:
        return [Run(s, 1 << k) for s, k in sorted(self._allocated.items())]

    def top_blocks(self) -> list[Run]:
        """The blocks of an empty pool (the binary digits of num_units)."""
        return [Run(s, 1 << k) for s, k in zip(self._top_starts, self._top_orders)]

    @staticmethod
    def rounded(length: int) -> int:
        """Units a request of `length` units holds: the next power of two."""
        return 1 << block_order(length)

    # -- allocate / free ------------------------------------------------------------------------
    def allocate(self, length: int) -> Run | None:
        """The block of 2^ceil(log2 length) units split from the smallest free block that holds it
        (lowest address first), or None when no free block is that large."""
        if length < 1:
            raise ValueError(f"allocate needs a length >= 1, got {length}")
        k = block_order(length)
        j = next((j for j in range(k, self.max_order + 1) if self._free[j]), None)
        if j is None:
            return None
        start = self._free[j].pop(0)
        while j > k:                                   # split: the upper half stays free
            j -= 1
            bisect.insort(self._free[j], start + (1 << j))
        self._allocated[start] = k
        self._num_free -= 1 << k
        return Run(start, 1 << k)

    def free(self, run: Run) -> None:
        """Give a block back; it merges with its buddy while the buddy is free and whole."""
        k = self._allocated.get(run.start)
        if k is None or run.length != 1 << k:
            raise RuntimeError(f"buddy allocator bug: freeing {run}, which is not allocated")
        del self._allocated[run.start]
        self._num_free += run.length
        start = run.start
        top = self._top_orders[bisect.bisect_right(self._top_starts, start) - 1]
        while k < top:
            buddy = start ^ (1 << k)
            starts = self._free[k]
            i = bisect.bisect_left(starts, buddy)
            if i == len(starts) or starts[i] != buddy:
                break
            del starts[i]                              # merge: the pair is one block of order k + 1
            start = min(start, buddy)
            k += 1
        bisect.insort(self._free[k], start)

    def can_allocate_all(self, lengths: list[int]) -> bool:
        """Whether allocating every length, in order, would succeed now (the pool is left as it was:
        free blocks are maximal, a function of the allocated set, see the module docstring)."""
        if len(lengths) == 1:
            return self.rounded(lengths[0]) <= self.largest_free_run()
        if sum(self.rounded(n) for n in lengths) > self._num_free:
            return False
        return allocates_all(self, lengths)

    def fits_in_empty(self, lengths: list[int]) -> bool:
        """Whether the lengths would all fit in this pool with nothing allocated."""
        return _fits_in_empty(self.num_units, tuple(lengths))


@functools.lru_cache(maxsize=1024)
def _fits_in_empty(num_units: int, lengths: tuple[int, ...]) -> bool:
    return BuddyAllocator(num_units).can_allocate_all(list(lengths))
