"""A contiguous allocator: first-fit over a line of units, freed runs coalesced with their neighbours.

The Orca baselines (orca.py) reserve one contiguous range of KV slots per sequence; this allocator
hands out those ranges, so external fragmentation happens for real: free units can lie in gaps
between reservations that no new reservation fits into.

NOTE: first-fit gives a run exactly the size asked for; placement alone decides the gaps. The
paper's Orca baselines used a buddy allocator instead (buddy.py, the Orca managers' default), which
also rounds every request up to a power of two; first-fit stays selectable (orca_allocator).

Free runs are kept sorted by start in two parallel lists (bisect): allocate is O(free runs), free is
O(log runs) plus the list insert; a pool holds at most (live runs + 1) free runs.
"""
from __future__ import annotations

import bisect
from dataclasses import dataclass

from rawpaged.errors import RawpagedError


@dataclass(frozen=True)
class Run:
    """Units start .. start + length - 1."""
    start: int
    length: int

    @property
    def end(self) -> int:
        return self.start + self.length


class ContiguousAllocator:
    def __init__(self, num_units: int):
        if num_units < 1:
            raise RawpagedError(f"a contiguous pool needs at least one unit, got {num_units}")
        self.num_units = num_units
        self._starts: list[int] = [0]            # free runs, sorted by start, never adjacent
        self._lengths: list[int] = [num_units]
        self._allocated: dict[int, int] = {}     # start -> length of every allocated run
        self._num_free = num_units

    # -- counts ---------------------------------------------------------------------------------
    def num_free(self) -> int:
        """Free units, in every gap."""
        return self._num_free

    def largest_free_run(self) -> int:
        """The most units one allocation can take now."""
        return max(self._lengths, default=0)

    def free_runs(self) -> list[Run]:
        return [Run(s, n) for s, n in zip(self._starts, self._lengths)]

    def allocated_runs(self) -> list[Run]:
        return [Run(s, n) for s, n in sorted(self._allocated.items())]

    # -- allocate / free ------------------------------------------------------------------------
    def allocate(self, length: int) -> Run | None:
        """The lowest free run of `length` units, or None when no gap is that long."""
        if length < 1:
            raise ValueError(f"allocate needs a length >= 1, got {length}")
        for i, n in enumerate(self._lengths):
            if n >= length:
                start = self._starts[i]
                if n == length:
                    del self._starts[i], self._lengths[i]
                else:                                   # the run's tail stays free
                    self._starts[i], self._lengths[i] = start + length, n - length
                self._allocated[start] = length
                self._num_free -= length
                return Run(start, length)
        return None

    def free(self, run: Run) -> None:
        """Give a run back; it merges with a free neighbour on either side."""
        if self._allocated.get(run.start) != run.length:
            raise RuntimeError(f"contiguous allocator bug: freeing {run}, which is not allocated")
        del self._allocated[run.start]
        self._num_free += run.length
        i = bisect.bisect_left(self._starts, run.start)
        start, length = run.start, run.length
        if i < len(self._starts) and self._starts[i] == run.end:           # merge the right neighbour
            length += self._lengths[i]
            del self._starts[i], self._lengths[i]
        if i > 0 and self._starts[i - 1] + self._lengths[i - 1] == start:  # merge the left neighbour
            self._lengths[i - 1] += length
        else:
            self._starts.insert(i, start)
            self._lengths.insert(i, length)

    @staticmethod
    def rounded(length: int) -> int:
        """Units a request of `length` units holds: exactly `length`."""
        return length

    def fits_in_empty(self, lengths: list[int]) -> bool:
        """Whether the lengths would all fit in this pool with nothing allocated."""
        return sum(lengths) <= self.num_units

    def can_allocate_all(self, lengths: list[int]) -> bool:
        """Whether allocating every length, in order, would succeed now (the pool is left as it was).

        NOTE: freeing what was taken restores the pool exactly: coalesced free runs are the maximal
        gaps, a function of the allocated set alone.
        """
        if len(lengths) == 1:
            return lengths[0] <= self.largest_free_run()
        if sum(lengths) > self._num_free:
            return False
        return allocates_all(self, lengths)


def allocates_all(pool, lengths: list[int]) -> bool:
    """Allocate every length in order from `pool` (a ContiguousAllocator or BuddyAllocator), then free
    what was taken: whether all succeeded. The pool is left as it was, since both coalesce freed space
    into maximal runs (a function of the allocated set alone)."""
    taken = []
    try:
        for n in lengths:
            run = pool.allocate(n)
            if run is None:
                return False
            taken.append(run)
        return True
    finally:
        for run in reversed(taken):
            pool.free(run)
