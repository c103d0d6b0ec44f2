"""The buddy allocator the paper's Orca baselines place their KV with: unit tests worked by hand, then
a Hypothesis state machine checked against a brute-force picture of the pool (unit owners)."""
from __future__ import annotations

import pytest
from hypothesis import event
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

import test_block_manager as tbm
from rawpaged.core.buddy import BuddyAllocator
from rawpaged.core.contiguous import Run
from rawpaged.errors import RawpagedError


def test_split_round_up_and_coalesce_by_hand():
    a = BuddyAllocator(16)
    r1 = a.allocate(3)                       # 16 -> 8 + 8 -> 4 + 4: the first 4
    assert r1 == Run(0, 4) and a.free_runs() == [Run(4, 4), Run(8, 8)]
    r2 = a.allocate(1)                       # the smallest free block that holds it: 4 -> 2 + 2 -> 1 + 1
    assert r2 == Run(4, 1) and a.free_runs() == [Run(5, 1), Run(6, 2), Run(8, 8)]
    r3 = a.allocate(5)                       # 8 units
    assert r3 == Run(8, 8) and (a.num_free(), a.largest_free_run()) == (3, 2)
    assert a.allocate(4) is None             # 3 units free, no block of 4
    assert a.can_allocate_all([2, 1]) and not a.can_allocate_all([2, 2])
    assert a.free_runs() == [Run(5, 1), Run(6, 2)]              # trials leave the pool as it was
    a.free(r1)                               # its buddy [4, 8) is split: no merge
    assert a.free_runs() == [Run(0, 4), Run(5, 1), Run(6, 2)]
    a.free(r2)                               # 4+5 -> [4, 6), + [6, 8) -> [4, 8), + [0, 4) -> [0, 8)
    assert a.free_runs() == [Run(0, 8)]
    a.free(r3)
    assert a.free_runs() == [Run(0, 16)] and a.allocated_runs() == []


def test_a_pool_that_is_no_power_of_two_is_its_binary_digits():
    a = BuddyAllocator(15_728)               # OPT-13B's slots on one A100-40GB
    assert [r.length for r in a.top_blocks()] == [8192, 4096, 2048, 1024, 256, 64, 32, 16]
    assert [r.start for r in a.top_blocks()] == [0, 8192, 12288, 14336, 15360, 15616, 15680, 15712]
    # Orca (Max): 2048-token ranges: 4 + 2 + 1 of them, as the paper's 7 batched requests.
    runs = [a.allocate(2048) for _ in range(7)]
    assert None not in runs and a.allocate(2048) is None and a.largest_free_run() == 1024
    for r in runs:
        a.free(r)
    assert a.free_runs() == a.top_blocks()   # top blocks never merge with each other
    assert a.fits_in_empty([8192, 4096]) and not a.fits_in_empty([8192, 8192])
    # 300 tokens hold a block of 512: 16 + 8 + 4 + 2 of them fit (the top blocks below 512 hold none).
    assert a.fits_in_empty([300] * 30) and not a.fits_in_empty([300] * 31)


def test_bad_frees_and_sizes_raise():
    a = BuddyAllocator(8)
    r = a.allocate(3)
    with pytest.raises(RuntimeError, match="not allocated"):
        a.free(Run(0, 3))                    # the length asked for, not the block's
    a.free(r)
    with pytest.raises(RuntimeError, match="not allocated"):
        a.free(r)                            # twice
    with pytest.raises(ValueError):
        a.allocate(0)
    with pytest.raises(RawpagedError):
        BuddyAllocator(0)


def canonical_free_blocks(owner: list, tops: list[Run]) -> list[tuple[int, int]]:
    """The maximal aligned free blocks, found unit by unit: a block is free whole, or split in halves."""
    out = []

    def walk(start: int, length: int) -> None:
        units = owner[start:start + length]
        if all(o is None for o in units):
            out.append((start, length))
        elif length > 1 and any(o is None for o in units):
            walk(start, length // 2)
            walk(start + length // 2, length // 2)

    for t in tops:
        walk(t.start, t.length)
    return sorted(out)


class BuddyMachine(RuleBasedStateMachine):
    """Random allocate / free; after each, the pool is compared with a unit-by-unit owner array."""

    @initialize(num_units=st.integers(1, 80))
    def setup(self, num_units):
        self.a = BuddyAllocator(num_units)
        self.tops = self.a.top_blocks()
        assert sum(t.length for t in self.tops) == num_units
        self.owner = [None] * num_units          # unit -> the run holding it (brute force)
        self.runs: list[Run] = []

    @rule(length=st.integers(1, 40))
    def allocate(self, length):
        size = 1
        while size < length:
            size *= 2
        free = canonical_free_blocks(self.owner, self.tops)
        fits = sorted((n, s) for s, n in free if n >= size)     # smallest block first, then lowest address
        assert self.a.can_allocate_all([length]) == bool(fits)
        run = self.a.allocate(length)
        event(f"allocate {'ok' if run else 'refused'}")
        if not fits:
            assert run is None
            return
        assert run == Run(fits[0][1], size)                    # split from that block's low end
        for u in range(run.start, run.end):
            assert self.owner[u] is None, "overlap"
            self.owner[u] = run
        self.runs.append(run)

    @rule(data=st.data())
    def free(self, data):
        if self.runs:
            run = data.draw(st.sampled_from(self.runs))
            self.runs.remove(run)
            self.a.free(run)
            for u in range(run.start, run.end):
                self.owner[u] = None

    @rule(lengths=st.lists(st.integers(1, 16), min_size=1, max_size=4))
    def trial(self, lengths):
        """can_allocate_all agrees with allocating for real, and leaves the pool as it was."""
        before = (self.a.free_runs(), self.a.allocated_runs())
        taken, ok = [], True
        for n in lengths:
            r = self.a.allocate(n)
            if r is None:
                ok = False
                break
            taken.append(r)
        for r in taken:
            self.a.free(r)
        assert (self.a.free_runs(), self.a.allocated_runs()) == before      # freeing restores the pool
        assert self.a.can_allocate_all(lengths) == ok
        assert (self.a.free_runs(), self.a.allocated_runs()) == before

    @invariant()
    def every_unit_counted_once(self):
        free = canonical_free_blocks(self.owner, self.tops)
        # Buddies coalesce: the free blocks are exactly the maximal aligned free blocks.
        assert [(r.start, r.length) for r in self.a.free_runs()] == free
        assert sorted(self.a.allocated_runs(), key=lambda r: r.start) == sorted(self.runs, key=lambda r: r.start)
        covered = sorted(u for r in self.a.free_runs() + self.a.allocated_runs() for u in range(r.start, r.end))
        assert covered == list(range(self.a.num_units))                    # every unit once
        assert self.a.num_free() == sum(n for _, n in free) == self.owner.count(None)
        assert self.a.largest_free_run() == max((n for _, n in free), default=0)
        for r in self.a.allocated_runs():
            assert r.length & (r.length - 1) == 0                           # powers of two, aligned
            top = next(t for t in self.tops if t.start <= r.start < t.end)
            assert (r.start - top.start) % r.length == 0 and r.end <= top.end

    def teardown(self):
        for run in list(self.runs):
            self.a.free(run)
        assert self.a.free_runs() == self.tops                              # all freed space coalesced
        biggest = self.tops[0]
        assert self.a.allocate(biggest.length) == biggest                  # and reusable whole


BuddyMachine.TestCase.settings = tbm._settings(150)
test_buddy_allocator_state_machine = BuddyMachine.TestCase
