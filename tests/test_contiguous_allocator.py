"""The contiguous (first-fit, coalescing) allocator the Orca baselines reserve their ranges from:
unit tests, then a Hypothesis state machine checked against a brute-force picture of the pool."""
from __future__ import annotations

import pytest
from hypothesis import event
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

import test_block_manager as tbm
from rawpaged.core.contiguous import ContiguousAllocator, Run
from rawpaged.errors import RawpagedError


def test_first_fit_coalescing_and_fragmentation():
    a = ContiguousAllocator(10)
    r1, r2, r3 = a.allocate(3), a.allocate(2), a.allocate(4)
    assert (r1, r2, r3) == (Run(0, 3), Run(3, 2), Run(5, 4))
    assert a.free_runs() == [Run(9, 1)] and a.num_free() == 1
    a.free(r1)
    a.free(r3)
    # Free: units 0..2 and 5..9 (8 units) around r2, but the largest gap has 5: 3 units stranded.
    assert a.free_runs() == [Run(0, 3), Run(5, 5)]
    assert (a.num_free(), a.largest_free_run()) == (8, 5)
    assert a.allocate(6) is None and not a.can_allocate_all([6])
    assert a.can_allocate_all([3, 5]) and not a.can_allocate_all([4, 4])
    assert a.free_runs() == [Run(0, 3), Run(5, 5)]            # trials leave the pool as it was
    assert a.allocate(2) == Run(0, 2)                           # first fit: the lowest gap that fits
    a.free(Run(0, 2))
    a.free(r2)                                                  # merges both neighbours
    assert a.free_runs() == [Run(0, 10)] and a.allocated_runs() == []


def test_bad_frees_and_sizes_raise():
    a = ContiguousAllocator(4)
    r = a.allocate(2)
    with pytest.raises(RuntimeError, match="not allocated"):
        a.free(Run(0, 1))                                       # part of a run
    a.free(r)
    with pytest.raises(RuntimeError, match="not allocated"):
        a.free(r)                                               # twice
    with pytest.raises(ValueError):
        a.allocate(0)
    with pytest.raises(RawpagedError):
        ContiguousAllocator(0)


class ContiguousMachine(RuleBasedStateMachine):
    """Random allocate / free; the pool is compared with a unit-by-unit owner array after each step."""

    @initialize(num_units=st.integers(1, 64))
    def setup(self, num_units):
        self.a = ContiguousAllocator(num_units)
        self.owner = [None] * num_units           # unit -> the run holding it (brute force)
        self.runs: list[Run] = []

    def gaps(self) -> list[tuple[int, int]]:
        """Maximal runs of unowned units (start, length), found unit by unit."""
        out, start = [], None
        for u, o in enumerate(self.owner + ["end"]):
            if o is None and start is None:
                start = u
            elif o is not None and start is not None:
                out.append((start, u - start))
                start = None
        return out

    @rule(length=st.integers(1, 24))
    def allocate(self, length):
        fits = [s for s, n in self.gaps() if n >= length]
        assert self.a.can_allocate_all([length]) == bool(fits)
        run = self.a.allocate(length)
        event(f"allocate {'ok' if run else 'refused'}")
        if not fits:
            assert run is None
            return
        assert run == Run(fits[0], length)                      # first fit
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
        """can_allocate_all agrees with allocating for real on a copy of the owner array."""
        owner = list(self.owner)
        ok = True
        for n in lengths:
            start = next((u for u in range(len(owner) - n + 1) if all(o is None for o in owner[u:u + n])), None)
            if start is None:
                ok = False
                break
            owner[start:start + n] = ["trial"] * n
        before = self.a.free_runs()
        assert self.a.can_allocate_all(lengths) == ok
        assert self.a.free_runs() == before

    @invariant()
    def every_unit_counted_once(self):
        gaps = self.gaps()
        assert [(r.start, r.length) for r in self.a.free_runs()] == gaps    # coalesced, sorted
        assert sorted(self.a.allocated_runs(), key=lambda r: r.start) == sorted(self.runs, key=lambda r: r.start)
        free = sum(n for _, n in gaps)
        assert self.a.num_free() == free == self.owner.count(None)
        assert free + sum(r.length for r in self.runs) == self.a.num_units
        largest = max((n for _, n in gaps), default=0)
        assert self.a.largest_free_run() == largest
        # External fragmentation: the free units outside the largest gap, counted unit by unit.
        biggest = next(((s, n) for s, n in gaps if n == largest), None)
        outside = sum(1 for u, o in enumerate(self.owner)
                      if o is None and not (biggest and biggest[0] <= u < biggest[0] + biggest[1]))
        assert self.a.num_free() - self.a.largest_free_run() == outside

    def teardown(self):
        for run in list(self.runs):
            self.a.free(run)
        assert self.a.free_runs() == [Run(0, self.a.num_units)]       # all freed space is one run again
        assert self.a.allocate(self.a.num_units) == Run(0, self.a.num_units)


ContiguousMachine.TestCase.settings = tbm._settings(150)
test_contiguous_allocator_state_machine = ContiguousMachine.TestCase
