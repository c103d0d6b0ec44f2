"""The Orca baselines' KV managers: the interface, hand-worked accounting for Max / Pow2 / Oracle,
forks without sharing, and a Hypothesis state machine with a shadow KV cache (as test_block_manager)."""
from __future__ import annotations

import inspect

import pytest
from hypothesis import event
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

import test_block_manager as tbm
from rawpaged.core.contiguous import Run
from rawpaged.core.interface import AllocStatus, KVCacheManager, SlotAccounting
from rawpaged.core.orca import OrcaManager
from rawpaged.errors import RawpagedError
from rawpaged.sampling_params import SamplingParams
from rawpaged.sequence import Sequence, SequenceGroup, SequenceStatus, next_seq_id

RUNNING, WAITING = SequenceStatus.RUNNING, SequenceStatus.WAITING
admit, compute = tbm.admit, tbm.compute


def request(prompt_len: int, max_tokens: int | None, **params) -> SequenceGroup:
    seq = Sequence(next_seq_id(), list(range(100, 100 + prompt_len)))
    return SequenceGroup(f"req{seq.seq_id}", [seq], SamplingParams(max_tokens=max_tokens, **params), 0.0)


def acct(bm):
    a = bm.slot_accounting()
    assert a.total == a.real_tokens + a.wasted + a.free
    return (a.real_tokens, a.reserved_unused, a.internal_fragmentation, a.external_fragmentation, a.free)


def test_orca_implements_the_interface():
    bm = OrcaManager("max", block_size=4, num_device_blocks=8, max_model_len=16)
    assert isinstance(bm, KVCacheManager)
    members = sorted(n for n in dir(KVCacheManager) if not n.startswith("_") and n not in dir(object))
    for name in members:
        want, got = inspect.getattr_static(KVCacheManager, name), inspect.getattr_static(OrcaManager, name)
        if callable(want):
            assert list(inspect.signature(got).parameters) == list(inspect.signature(want).parameters), name
        else:
            assert isinstance(got, property), name
    assert (bm.num_cpu_blocks, bm.get_num_free_cpu_blocks(), bm.prefix_cache_queries, bm.prefix_cache_hits) == (0,) * 4


def scenario(policy, granularity=None, allocator="first-fit"):
    """A: prompt 5 + 6 outputs (final length 11), B: 3 + 2 (5), C: 9 + 10 (19), in a 64-slot pool of
    blocks of 4 (max_model_len 32). A computes its prompt and samples one token (6 tokens), B computes
    its prompt (3), C has computed nothing yet (9 prompt tokens, all covered by its range)."""
    bm = OrcaManager(policy, block_size=4, num_device_blocks=16, max_model_len=32, granularity=granularity,
                     allocator=allocator)
    a, b, c = request(5, 6), request(3, 2), request(9, 10)
    admitted = []
    for g in (a, b, c):
        if bm.can_allocate(g) == AllocStatus.OK:
            admit(bm, g)
            admitted.append(g)
    compute(bm, a.seqs[0])
    a.seqs[0].append_token(7, 0.0)
    compute(bm, b.seqs[0])
    return bm, a, b, c, admitted


def test_orca_max_accounting():
    bm, a, b, c, admitted = scenario("max")
    # A takes units 0..7 (32 slots), B 8..15: the pool is full, C waits.
    assert admitted == [a, b] and bm.can_allocate(c) == AllocStatus.LATER
    assert bm.get_block_table(a.seqs[0]) == [0, 1] and bm.get_block_table(b.seqs[0]) == [8]
    # A: 6 tokens, 11 - 6 = 5 reserved, 32 - 11 = 21 internal; B: 3, 2, 27.
    assert acct(bm) == (9, 7, 48, 0, 0)
    bm.free(b.seqs[0])
    assert acct(bm) == (6, 5, 21, 0, 32)
    assert bm.can_allocate(c) == AllocStatus.OK and bm.get_num_free_device_blocks() == 8


def test_policies_reserve_as_the_paper_defines_them():
    """Section 6.1: Max reserves 2048 (max_model_len) in all; Pow2 over-reserves the OUTPUT by at most 2x
    ("if the true output length is 25, it reserves 32 positions for outputs"); Oracle the exact output."""
    def reserved(policy, prompt, output):
        return OrcaManager(policy, 4, 64, 64).reserved_len(request(prompt, output))
    assert [reserved("pow2", 7, 25), reserved("oracle", 7, 25), reserved("max", 7, 25)] == [7 + 32, 7 + 25, 64]
    assert [reserved("pow2", 5, 6), reserved("pow2", 3, 2), reserved("pow2", 9, 10)] == [13, 5, 25]
    assert reserved("pow2", 40, 20) == 64 and reserved("pow2", 9, 16) == 25     # capped; a power of two stays


def test_orca_pow2_accounting():
    bm, a, b, c, admitted = scenario("pow2")
    # Reservations 13, 5, 25 -> whole blocks: A 16 slots [0, 16), B 8 [16, 24), C 28 [24, 52); 12 left.
    assert admitted == [a, b, c]
    assert bm.get_block_table(c.seqs[0]) == [6, 7, 8]          # 9 tokens reach 3 of its 7 blocks
    # real / reserved / internal: A 6 / 5 / 5, B 3 / 2 / 3, C 9 / 10 / 9.
    assert acct(bm) == (18, 17, 17, 0, 12)
    bm.free(b.seqs[0])
    # Two gaps, of 8 and 12 slots: the larger is free, the other external fragmentation.
    assert acct(bm) == (15, 15, 14, 8, 12)
    d = request(2, 10)                                          # 2 + 16 -> 20 slots: no gap fits
    assert bm.can_allocate(d) == AllocStatus.LATER
    e = request(2, 4)                                           # 2 + 4 -> 8 slots: B's gap (first fit)
    admit(bm, e)
    assert bm.get_block_table(e.seqs[0]) == [4] and acct(bm) == (17, 19, 16, 0, 12)
    assert bm.allocator_rounding() == 0


def test_orca_oracle_accounting():
    bm, a, b, c, admitted = scenario("oracle")
    # A: 12 slots [0, 12), B: 8 [12, 20), C: 20 [20, 40); 24 free. Internal: the rounding to blocks.
    assert admitted == [a, b, c]
    assert acct(bm) == (18, 17, 5, 0, 24)
    bm.free(b.seqs[0])
    assert acct(bm) == (15, 15, 2, 8, 24)
    d = request(2, 10)                                          # final 12: B's gap of 8 is too small
    admit(bm, d)
    assert bm.get_block_table(d.seqs[0]) == [10]
    assert acct(bm) == (17, 25, 2, 8, 12)


def test_orca_oracle_buddy_accounting():
    """The paper's allocator: 16 units of 4 slots, ranges rounded up to a power of two of units."""
    bm, a, b, c, admitted = scenario("oracle", allocator="buddy")
    # A 11 -> 3 units -> a block of 4: [0, 4); B 5 -> 2 units: [4, 6) split from [4, 8); C 19 -> 5 -> 8: [8, 16).
    assert admitted == [a, b, c]
    assert [bm.get_block_table(g.seqs[0]) for g in (a, b, c)] == [[0, 1], [4], [8, 9, 10]]
    # internal: A 16 - 11 (1 slot of unit rounding, 4 of buddy rounding), B 8 - 5, C 32 - 19 (1 + 12).
    assert acct(bm) == (18, 17, 5 + 3 + 13, 0, 8)
    assert bm.allocator_rounding() == 4 + 0 + 12
    bm.free(b.seqs[0])                                          # [4, 6) merges with its buddy [6, 8)
    assert bm.alloc.free_runs() == [Run(4, 4)] and acct(bm) == (15, 15, 18, 0, 16)
    d = request(2, 10)                                          # 12 -> 3 units -> the block [4, 8)
    admit(bm, d)
    assert bm.get_block_table(d.seqs[0]) == [4] and acct(bm) == (17, 25, 22, 0, 0)
    assert bm.allocator_rounding() == 4 + 12 + 4
    bm.free(a.seqs[0])
    bm.free(c.seqs[0])
    # Free: [0, 4) and [8, 16), not buddies of each other: 16 slots stranded beside the free 32.
    assert acct(bm) == (2, 10, 4, 16, 32) and bm.allocator_rounding() == 4
    assert bm.can_allocate(request(20, 12)) == AllocStatus.OK                # 32 -> 8 units: [8, 16)
    two = request(10, 10, n=2, temperature=1.0)                 # 2 x (20 -> 5 units -> 8): 16 of 12 free
    assert bm.can_allocate(two) == AllocStatus.LATER


def test_orca_oracle_token_granularity():
    """Granularity 1 (Orca's own, the simulator's): exact ranges, tables in 1-token units."""
    bm, a, b, c, admitted = scenario("oracle", granularity=1)
    assert bm.block_size == 1 and bm.num_device_blocks == 64
    assert admitted == [a, b, c] and bm.get_block_table(b.seqs[0]) == [11, 12, 13]
    assert acct(bm) == (18, 17, 0, 0, 29)                       # A [0, 11), B [11, 16), C [16, 35)
    bm.free(b.seqs[0])
    assert acct(bm) == (15, 15, 0, 5, 29)


def test_orca_granularity_rounds_and_refuses_what_never_fits():
    bm = OrcaManager("oracle", block_size=4, num_device_blocks=16, max_model_len=64, granularity=16,
                     allocator="first-fit")
    g = request(3, 3)                                           # final 6 -> one unit of 16 slots
    admit(bm, g)
    assert bm.get_block_table(g.seqs[0]) == [0] and acct(bm) == (3, 3, 10, 0, 48)
    assert bm.can_allocate(request(40, 8)) == AllocStatus.OK     # 48 -> 3 units: the 48 free slots
    assert bm.can_allocate(request(40, 9)) == AllocStatus.LATER  # 49 -> 4 units
    assert bm.can_allocate(request(3, 3, n=5, temperature=1.0)) == AllocStatus.NEVER   # 5 x 16 > 64
    with pytest.raises(RawpagedError, match="does not fit"):
        OrcaManager("max", block_size=4, num_device_blocks=4, max_model_len=32)
    with pytest.raises(RawpagedError, match="policy"):
        OrcaManager("best", block_size=4, num_device_blocks=4, max_model_len=8)
    with pytest.raises(RawpagedError, match="orca_allocator must be one of buddy, first-fit"):
        OrcaManager("max", block_size=4, num_device_blocks=4, max_model_len=8, allocator="slab")
    with pytest.raises(RawpagedError, match="does not fit"):           # 6 units: top blocks of 4 and 2
        OrcaManager("max", block_size=4, num_device_blocks=6, max_model_len=20)


def test_parallel_samples_reserve_at_admission_and_copy_on_first_append():
    bm = OrcaManager("oracle", block_size=4, num_device_blocks=16, max_model_len=32, allocator="first-fit")
    g = request(6, 3, n=3, temperature=1.0)                     # final 9 -> 3 blocks each, 3 samples
    assert bm.can_allocate(g) == AllocStatus.OK
    admit(bm, g)
    parent = g.seqs[0]
    # One range for the parent, two spares held for the samples to come (reserved up to 9).
    assert bm.get_block_table(parent) == [0, 1] and acct(bm) == (6, 3 + 9 + 9, 3 * 3, 0, 64 - 36)
    compute(bm, parent)
    children = []
    for _ in range(2):
        child = parent.fork(next_seq_id())
        g.add(child)
        bm.fork(parent, child)
        children.append(child)
    for i, seq in enumerate(g.seqs):
        seq.append_token(i, 0.0)
    # The forks read the parent's range (7 tokens each, counted once) until they copy it.
    assert bm.get_block_table(children[0]) == bm.get_block_table(parent)
    assert acct(bm) == (7, 2 + 9 + 9, 9, 0, 28)
    assert bm.can_append_slots(g)
    assert compute(bm, parent) == []
    # Each fork takes a spare and copies the parent's 2 computed blocks (6 tokens) before it writes.
    copies = [bm.append_slots(c, 1) for c in children]
    assert copies == [[(0, 6), (1, 7)], [(0, 3), (1, 4)]]       # the spares, last first
    for c in children:
        c.num_computed_tokens += 1
        bm.mark_computed(c)
    assert acct(bm) == (21, 6, 9, 0, 28)
    # A sample that stops early gives its range back at once; the rest go when they finish.
    bm.free(children[0])
    assert bm.alloc.num_free() == 7 + 3                         # units of 4 slots
    for seq in (parent, children[1]):
        bm.free(seq)
    assert acct(bm) == (0, 0, 0, 0, 64) and not bm.reservations


def test_a_parent_that_finishes_first_keeps_its_range_until_the_fork_copied_it():
    bm = OrcaManager("max", block_size=2, num_device_blocks=8, max_model_len=8)     # room for 2 ranges
    g = request(3, 4, n=2, temperature=1.0)
    admit(bm, g)
    parent = g.seqs[0]
    compute(bm, parent)
    child = parent.fork(next_seq_id())
    g.add(child)
    bm.fork(parent, child)
    parent_table = bm.get_block_table(parent)
    bm.free(parent)                                             # e.g. it sampled EOS
    assert bm.alloc.num_free() == 0                             # its range still feeds the fork
    child.append_token(5, 0.0)
    copies = bm.append_slots(child, 1)
    assert [s for s, _ in copies] == parent_table
    assert bm.alloc.num_free() == 0                             # not before the copy ran
    child.num_computed_tokens += 1
    bm.mark_computed(child)
    assert bm.alloc.num_free() == 4 and acct(bm) == (4, 3, 1, 0, 8)


def test_orca_never_swaps():
    bm = OrcaManager("pow2", block_size=4, num_device_blocks=8, max_model_len=16)
    g = request(4, 4)
    admit(bm, g)
    assert not bm.can_swap_out(g) and not bm.can_swap_in(g)
    with pytest.raises(RuntimeError, match="do not swap"):
        bm.swap_out(g)
    with pytest.raises(RuntimeError, match="past its reservation"):
        bm.append_slots(g.seqs[0], 9)


# -- the state machine ----------------------------------------------------------------------------
class OrcaMachine(RuleBasedStateMachine):
    """Requests (single, parallel samples, beams) admitted and stepped as the engine steps them (every
    append and copy first, then the writes), sampled, forked, dropped and finished at random.

    The shadow KV holds in each written slot the token prefix up to that token; reading every
    sequence back through its table checks the ranges and the fork copies."""

    @initialize(policy=st.sampled_from(["max", "pow2", "oracle"]), block_size=st.integers(1, 4),
                units=st.sampled_from([1, 1, 2, 3]), token_units=st.booleans(),
                num_device=st.integers(12, 48), max_model_len=st.integers(4, 16),
                allocator=st.sampled_from(["buddy", "first-fit"]))
    def setup(self, policy, block_size, units, token_units, num_device, max_model_len, allocator):
        g = units if token_units else units * block_size
        num_units = num_device * block_size // g
        largest = 1 << (num_units.bit_length() - 1) if allocator == "buddy" else num_units
        max_model_len = min(max_model_len, largest * g)
        self.bm = OrcaManager(policy, block_size, num_device, max_model_len, granularity=g, allocator=allocator)
        self.groups: list[SequenceGroup] = []
        self.kv: dict[int, list] = {}                      # block -> slot contents

    def running(self):
        return [s for g in self.groups for s in g.seqs if s.status == RUNNING]

    def add_request(self, data):
        if len(self.groups) >= 6:
            return
        kind = data.draw(st.sampled_from(["single", "samples", "beams"]), label="kind")
        width = 1 if kind == "single" else data.draw(st.integers(2, 3), label="width")
        prompt = data.draw(st.integers(1, self.bm.max_model_len - 1), label="prompt")
        max_tokens = data.draw(st.one_of(st.none(), st.integers(1, 8)), label="max_tokens")
        params = ({"best_of": width, "use_beam_search": True, "temperature": 0.0} if kind == "beams"
                  else {"n": width, "temperature": 1.0})
        g = request(prompt, max_tokens, **params)
        status = self.bm.can_allocate(g)
        event(f"admit {kind} {status.name}")
        units = -(-self.bm.reserved_len(g) // self.bm.granularity)
        if self.bm.allocator == "buddy":                   # blocks of 2^k units fit in the top blocks
            block = 1 << (units - 1).bit_length()
            never = sum(t.length // block for t in self.bm.alloc.top_blocks()) < width
        else:
            never = width * units > self.bm.alloc.num_units
        assert (status == AllocStatus.NEVER) == never
        if status == AllocStatus.OK:
            admit(self.bm, g)
            self.groups.append(g)

    @rule(data=st.data())
    def step(self, data):
        """New requests arrive (NOTE: one rule, so that Hypothesis' swarm testing, which turns rules off
        per run, cannot leave a run without admissions or without steps), then one engine step."""
        for _ in range(data.draw(st.integers(0, 2), label="arrivals")):
            self.add_request(data)
        running = self.running()
        if not running:
            return
        groups = {id(s): g for g in self.groups for s in g.seqs}
        chosen = data.draw(st.lists(st.sampled_from(self.groups), min_size=1, max_size=3, unique=True), label="groups")
        batch = []
        for g in chosen:
            assert self.bm.can_append_slots(g)               # never needs memory after admission
            for seq in g.get_seqs(RUNNING):
                n = seq.num_uncomputed_tokens
                if n:
                    if seq.is_prefill and n > 1:             # a prompt may come in chunks
                        n = data.draw(st.integers(1, n), label="chunk")
                    batch.append((seq, n, self.bm.append_slots(seq, n)))
        copies = [c for _, _, cs in batch for c in cs]
        assert len({d for _, d in copies}) == len(copies) and not {s for s, _ in copies} & {d for _, d in copies}
        if copies:
            event("fork copy")
            for seq, _, cs in batch:
                src = self.bm.seqs[seq.seq_id].src
                if cs and not any(self.bm.seqs[i].res is src for i in src.readers):
                    event("copy from a range its owner left")
        snapshot = {b: list(self.kv.get(b, [])) for b, _ in copies}
        for src, dst in copies:
            self.kv[dst] = list(snapshot[src])
        written = set()
        for seq, n, _ in batch:
            table, tokens, bs = self.bm.get_block_table(seq), seq.get_token_ids(), self.bm.block_size
            for p in range(seq.num_computed_tokens, seq.num_computed_tokens + n):
                slot = (table[p // bs], p % bs)
                assert slot not in written, "two sequences write one slot"
                written.add(slot)
                self.kv.setdefault(slot[0], [None] * bs)[slot[1]] = tuple(tokens[:p + 1])
        for seq, n, _ in batch:
            seq.num_computed_tokens += n
            self.bm.mark_computed(seq)
        for g in chosen:
            self.sample(data, g, [seq for seq, _, _ in batch if groups[id(seq)] is g])

    def sample(self, data, g, computed):
        """What the output processor does after a step: fork, append, drop, finish."""
        sp, bm = g.sampling_params, self.bm
        ready = [s for s in computed if s.num_uncomputed_tokens == 0]
        event(f"sample {len(ready)}")
        if not ready:
            return
        final = bm.final_len(g)
        if sp.use_beam_search:
            if len(ready) != len(g.get_seqs(RUNNING)):
                return
            parents = data.draw(st.lists(st.sampled_from(ready), min_size=sp.best_of, max_size=sp.best_of), label="beams")
            used, new = set(), []
            for p in parents:                                # fork before dropping, as beam_step does
                if id(p) in used:
                    event("beam fork")
                    child = p.fork(next_seq_id())
                    g.add(child)
                    bm.fork(p, child)
                    new.append(child)
                else:
                    used.add(id(p))
                    new.append(p)
            for s in ready:
                if id(s) not in used:
                    s.status = SequenceStatus.FINISHED_STOPPED
                    bm.free(s)
                    g.remove(s.seq_id)
            ready = new
        elif sp.best_of > 1 and len(g.seqs) == 1 and not ready[0].output_token_ids:
            event("sample fork")
            for _ in range(sp.best_of - 1):
                child = ready[0].fork(next_seq_id())
                g.add(child)
                bm.fork(ready[0], child)
                ready.append(child)
        for s in ready:
            s.append_token(data.draw(st.integers(0, 3), label="token"), 0.0)
            early = not sp.use_beam_search and data.draw(st.integers(0, 9), label="eos") == 0
            if s.num_tokens >= final or early:
                s.status = SequenceStatus.FINISHED_LENGTH
                bm.free(s)
        if sp.use_beam_search and any(s.finished for s in g.seqs):
            for s in g.get_seqs(RUNNING):
                s.status = SequenceStatus.FINISHED_LENGTH
                bm.free(s)
        if g.finished:
            self.groups.remove(g)

    @rule(data=st.data())
    def abort(self, data):
        if self.groups and data.draw(st.integers(0, 4), label="abort") == 0:
            g = data.draw(st.sampled_from(self.groups), label="aborted")
            for s in g.get_unfinished_seqs():
                s.status = SequenceStatus.FINISHED_ABORTED
                self.bm.free(s)
            self.groups.remove(g)

    @invariant()
    def ranges_are_disjoint_and_counted(self):
        bm, g = self.bm, self.bm.granularity
        owned = {}
        for start, res in bm.reservations.items():
            assert res.run.start == start
            for u in range(res.run.start, res.run.end):
                assert u not in owned, "ranges overlap"
                owned[u] = res
        assert len(owned) + bm.alloc.num_free() == bm.alloc.num_units
        assert sorted(bm.reservations) == [r.start for r in bm.alloc.allocated_runs()]
        live = {s.seq_id for s in self.running()}
        assert live == set(bm.seqs)
        # Brute force: a range's real tokens are its longest reader's; the rest is reserved up to the
        # request's final length, then internal; spares are reserved for the fork they wait for.
        real = reserved = internal = 0
        for res in bm.reservations.values():
            slots = res.run.length * g
            readers = [bm.seqs[i] for i in res.readers if (bm.seqs[i].res or bm.seqs[i].src) is res]
            final = min(res.final_len, slots)
            tokens = max((s.seq.num_tokens for s in readers), default=0)
            assert tokens <= final
            fill = final if res.spare or readers else 0
            assert not (res.spare and res.readers)
            real += tokens
            reserved += fill - tokens
            internal += slots - fill
        largest = bm.alloc.largest_free_run() * g
        assert bm.slot_accounting() == SlotAccounting(
            bm.alloc.num_units * g, real, reserved, internal, bm.alloc.num_free() * g - largest, largest)
        assert bm.get_num_free_device_blocks() * bm.block_size == largest
        held = bm.slot_accounting().allocated
        assert bm.usage() == pytest.approx(held / (bm.alloc.num_units * g))
        # Every range is what its request's reservation asked for, in whole units, then (buddy) the next
        # power of two: the difference is the allocator's rounding.
        group_of = {s.seq_id: grp for grp in self.groups for s in grp.seqs}
        rounding = 0
        for res in bm.reservations.values():
            ids = res.readers or [i for i, o in bm.seqs.items() if any(r is res for r in o.group.spares)]
            want = -(-bm.reserved_len(group_of[ids[0]]) // g)
            rounded = 1 << (want - 1).bit_length() if bm.allocator == "buddy" else want
            assert res.run.length == rounded
            rounding += (rounded - want) * g
        assert bm.allocator_rounding() == rounding

    @invariant()
    def sequences_read_back_their_tokens(self):
        bs = self.bm.block_size
        for seq in self.running():
            table, tokens = self.bm.get_block_table(seq), seq.get_token_ids()
            assert len(table) * bs >= seq.num_tokens
            assert table == list(range(table[0], table[0] + len(table)))       # consecutive blocks
            for p in range(seq.num_computed_tokens):
                assert self.kv[table[p // bs]][p % bs] == tuple(tokens[:p + 1]), (seq.seq_id, p)

    def teardown(self):
        for g in self.groups:
            for s in g.get_unfinished_seqs():
                s.status = SequenceStatus.FINISHED_ABORTED
                self.bm.free(s)
        assert not self.bm.seqs and not self.bm.reservations and self.bm.allocator_rounding() == 0
        whole = self.bm.alloc.top_blocks() if self.bm.allocator == "buddy" else [Run(0, self.bm.alloc.num_units)]
        assert self.bm.alloc.num_free() == self.bm.alloc.num_units and self.bm.alloc.free_runs() == whole
        assert self.bm.usage() == 0.0


OrcaMachine.TestCase.settings = tbm._settings(200)
test_orca_state_machine = OrcaMachine.TestCase
