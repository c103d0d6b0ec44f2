"""The block manager: unit tests, then a Hypothesis state machine with a shadow KV cache.

The shadow KV stores, in every slot written, the whole token prefix up to that token (what a real
K/V vector depends on). Copies returned by the manager are performed on it, so reading every
sequence back through its block table checks copy-on-write, swapping and prefix reuse at once.
"""
from __future__ import annotations

import pytest
from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from rawpaged.core import prefix_cache as pc_mod
from rawpaged.core.block_allocator import BlockAllocator
from rawpaged.core.block_manager import AllocStatus, BlockSpaceManager
from rawpaged.core.prefix_cache import PrefixCache
from rawpaged.errors import RawpagedError
from rawpaged.sampling_params import SamplingParams
from rawpaged.sequence import Sequence, SequenceGroup, SequenceStatus, next_seq_id

RUNNING, WAITING, SWAPPED = SequenceStatus.RUNNING, SequenceStatus.WAITING, SequenceStatus.SWAPPED


def make_group(prompt, n=1) -> SequenceGroup:
    seqs = [Sequence(next_seq_id(), list(prompt)) for _ in range(n)]
    return SequenceGroup(f"req{seqs[0].seq_id}", seqs, SamplingParams(), arrival_time=0.0)


def admit(bm: BlockSpaceManager, group: SequenceGroup) -> None:
    bm.allocate(group)
    for seq in group.get_seqs(WAITING):
        seq.status = RUNNING


def compute(bm: BlockSpaceManager, seq: Sequence, n: int | None = None) -> list:
    """One model step for seq: slots for its next n uncomputed tokens (all by default)."""
    n = seq.num_uncomputed_tokens if n is None else n
    copies = bm.append_slots(seq, n)
    seq.num_computed_tokens += n
    bm.mark_computed(seq)
    return copies


def used(bm: BlockSpaceManager) -> int:
    return bm.num_device_blocks - bm.get_num_free_device_blocks()


# -- unit tests -----------------------------------------------------------------------------------
def test_copy_on_write_after_fork():
    bm = BlockSpaceManager(block_size=4, num_device_blocks=8, num_cpu_blocks=0, enable_prefix_caching=False)
    group = make_group(range(6))
    admit(bm, group)
    parent = group.seqs[0]
    assert compute(bm, parent) == []                      # prefill writes private blocks
    child = parent.fork(next_seq_id())
    child.status = RUNNING
    group.add(child)
    bm.fork(parent, child)
    shared = bm.get_block_table(parent)
    assert bm.get_block_table(child) == shared and used(bm) == 2
    parent.append_token(100, 0.0)
    child.append_token(200, 0.0)
    copies = compute(bm, parent)                          # writes position 6 of the shared block 1
    assert len(copies) == 1 and copies[0][0] == shared[1]
    assert bm.get_block_table(parent) == [shared[0], copies[0][1]]
    assert bm.get_block_table(child) == shared
    assert bm.device.blocks[shared[0]].ref_count == 2 and bm.device.blocks[shared[1]].ref_count == 1
    assert compute(bm, child) == []                       # now the child is the only owner
    assert used(bm) == 3


def test_parallel_sampling_uses_prompt_blocks_once():
    bm = BlockSpaceManager(block_size=4, num_device_blocks=32, num_cpu_blocks=0)
    group = make_group(range(10))                         # 3 blocks, the last one partial
    admit(bm, group)
    compute(bm, group.seqs[0])
    for _ in range(3):
        child = group.seqs[0].fork(next_seq_id())
        group.add(child)
        bm.fork(group.seqs[0], child)
    assert used(bm) == 3
    assert [bm.device.blocks[b].ref_count for b in bm.get_block_table(group.seqs[0])] == [4, 4, 4]
    copies = []
    for i, seq in enumerate(group.seqs):
        seq.append_token(1000 + i, 0.0)
        copies += compute(bm, seq)
    assert len(copies) == 3                               # the last writer keeps the original
    assert used(bm) == 2 + 4                              # two full prompt blocks shared, one tail each
    # Identical waiting sequences (e.g. n=4 admitted at once) share their blocks too.
    group4 = make_group(range(50, 60), n=4)
    before = used(bm)
    admit(bm, group4)
    assert used(bm) - before == 3
    assert {tuple(bm.get_block_table(s)) for s in group4.seqs} == {tuple(bm.get_block_table(group4.seqs[0]))}


def test_prefix_cache_reuse_across_groups():
    bm = BlockSpaceManager(block_size=4, num_device_blocks=16, num_cpu_blocks=0)
    a = make_group(range(10))
    admit(bm, a)
    assert a.seqs[0].num_computed_tokens == 0
    compute(bm, a.seqs[0])                                # registers blocks 0 and 1 (block 2 is partial)
    b = make_group(list(range(8)) + [90, 91, 92, 93])
    assert bm.can_allocate(b) == AllocStatus.OK
    admit(bm, b)
    ta, tb = bm.get_block_table(a.seqs[0]), bm.get_block_table(b.seqs[0])
    assert tb[:2] == ta[:2] and tb[2] not in ta
    assert b.seqs[0].num_computed_tokens == 8
    assert (bm.prefix_cache_queries, bm.prefix_cache_hits) == (0 + 2 + 2, 2)   # a: 2 queries, b: 2
    # A prompt entirely cached still computes its last token: its last block is not reused.
    c = make_group(range(8))
    admit(bm, c)
    tc = bm.get_block_table(c.seqs[0])
    assert tc[0] == ta[0] and tc[1] != ta[1] and c.seqs[0].num_computed_tokens == 4
    assert compute(bm, c.seqs[0]) == []                   # writes only its private block
    # Blocks of a freed sequence stay reusable; with caching off nothing is reused.
    bm.free(a.seqs[0])
    d = make_group(range(9))
    admit(bm, d)
    assert bm.get_block_table(d.seqs[0])[:2] == ta[:2] and d.seqs[0].num_computed_tokens == 8
    off = BlockSpaceManager(block_size=4, num_device_blocks=16, num_cpu_blocks=0, enable_prefix_caching=False)
    e, f = make_group(range(10)), make_group(range(10))
    admit(off, e)
    compute(off, e.seqs[0])
    admit(off, f)
    assert f.seqs[0].num_computed_tokens == 0 and used(off) == 6


def test_same_prefix_computed_twice_is_deduplicated():
    bm = BlockSpaceManager(block_size=2, num_device_blocks=16, num_cpu_blocks=0)
    a, b = make_group([1, 2, 3, 4, 5]), make_group([1, 2, 3, 4, 6])
    admit(bm, a)
    admit(bm, b)                                          # same step: nothing cached yet
    assert used(bm) == 6
    compute(bm, a.seqs[0])
    compute(bm, b.seqs[0])                                # b switches to a's cached blocks
    assert bm.get_block_table(b.seqs[0])[:2] == bm.get_block_table(a.seqs[0])[:2]
    assert used(bm) == 4


def test_rewriting_registered_tokens_never_touches_a_shared_block():
    bm = BlockSpaceManager(block_size=2, num_device_blocks=8, num_cpu_blocks=0)
    a, b = make_group([1, 2, 3, 4, 5]), make_group([1, 2, 3, 4, 6])
    admit(bm, a)
    compute(bm, a.seqs[0])
    admit(bm, b)
    ta = bm.get_block_table(a.seqs[0])
    assert bm.get_block_table(b.seqs[0])[:2] == ta[:2]
    b.seqs[0].num_computed_tokens = 2                     # the engine recomputes registered tokens
    copies = bm.append_slots(b.seqs[0], 3)
    assert copies == [(ta[1], bm.get_block_table(b.seqs[0])[1])] and bm.device.blocks[ta[1]].is_cached
    a.seqs[0].num_computed_tokens = 2                     # a alone owns ta[1] now: rewritten in place
    assert bm.append_slots(a.seqs[0], 3) == []
    assert not bm.device.blocks[ta[1]].is_cached and bm.device.blocks[ta[0]].is_cached
    probe = make_group([1, 2, 3, 4, 9])
    assert bm._cached_prefix(probe.seqs[0].get_token_ids())[0] == [ta[0]]


def test_lru_eviction_order():
    bm = BlockSpaceManager(block_size=2, num_device_blocks=6, num_cpu_blocks=0)
    cached = {}
    for head in (1, 3, 5):                                # three prompts [h, h+1, x]: one full block each
        g = make_group([head, head + 1, 0])
        admit(bm, g)
        compute(bm, g.seqs[0])
        cached[head] = bm.get_block_table(g.seqs[0])[0]
        bm.free(g.seqs[0])
    assert bm.prefix_cache.evictable == [cached[1], cached[3], cached[5]]
    assert bm.get_num_free_device_blocks() == 6 and bm.usage() == 0.0
    g = make_group([1, 2, 7])                             # touch block of head 1
    admit(bm, g)
    assert g.seqs[0].num_computed_tokens == 2
    bm.free(g.seqs[0])
    assert bm.prefix_cache.evictable == [cached[3], cached[5], cached[1]]
    big = make_group(range(100, 108))                     # 4 blocks: 3 free + 1 eviction
    admit(bm, big)
    assert cached[3] in bm.get_block_table(big.seqs[0])
    assert bm.prefix_cache.evictable == [cached[5], cached[1]]
    for head, hit in ((3, 0), (5, 2), (1, 2)):
        probe = make_group([head, head + 1, 9])
        assert bm._cached_prefix(probe.seqs[0].get_token_ids())[0] == ([cached[head]] if hit else [])
    # A freed sequence's blocks turn evictable tail first: its prefix's head is evicted last.
    bm.free(big.seqs[0])
    chain = make_group([1, 2, 11, 12, 13])
    admit(bm, chain)
    compute(bm, chain.seqs[0])
    head, tail = bm.get_block_table(chain.seqs[0])[:2]
    bm.free(chain.seqs[0])
    assert bm.prefix_cache.evictable[-2:] == [tail, head]


def test_hash_collisions_are_checked(monkeypatch):
    monkeypatch.setattr(pc_mod, "hash_block", lambda parent_hash, token_ids: 0)
    bm = BlockSpaceManager(block_size=2, num_device_blocks=32, num_cpu_blocks=0)
    a = make_group([1, 2, 3, 4, 5])
    admit(bm, a)
    compute(bm, a.seqs[0])
    ta = bm.get_block_table(a.seqs[0])
    assert len(bm.prefix_cache.buckets[0]) == 2           # both full blocks cached under one hash
    for prompt, want in (([9, 9, 3, 4, 5], 0),            # same second block, other first block
                         ([3, 4, 1, 2, 5], 0),            # a's second block's tokens, at the start
                         ([1, 2, 8, 8, 5], 2),
                         ([1, 2, 3, 4, 7], 4)):
        g = make_group(prompt)
        admit(bm, g)
        assert g.seqs[0].num_computed_tokens == want, prompt
        assert bm.get_block_table(g.seqs[0])[:want // 2] == ta[:want // 2]
        compute(bm, g.seqs[0])
    # Every distinct (parent, tokens) block lives side by side under hash 0: a's two, two each for
    # [9,9 | 3,4] and [3,4 | 1,2], and [8,8] after a's first block.
    assert len(bm.prefix_cache.buckets[0]) == 7


def test_uncaching_a_block_uncaches_its_descendants():
    pool = BlockAllocator("device", 4)
    cache = PrefixCache(pool, block_size=1)
    blocks = [pool.allocate() for _ in range(3)]
    for level, block in enumerate(blocks):                # a chain: 0 <- 1 <- 2
        cache.register(block, level, blocks[level - 1] if level else None, (level,))
    for block in reversed(blocks):
        cache.release(block)
    assert cache.evictable == [blocks[2], blocks[1], blocks[0]] and pool.num_free() == 4
    cache.uncache(blocks[1])                              # its child can no longer be trusted
    assert list(cache.cached_blocks()) == [blocks[0]] and cache.evictable == [blocks[0]]
    assert sorted(pool.free_ids) == sorted(set(range(4)) - {blocks[0]})
    assert cache.lookup(2, blocks[1], (2,)) is None and cache.lookup(0, None, (0,)) == blocks[0]


def test_can_allocate_with_watermark():
    bm = BlockSpaceManager(block_size=4, num_device_blocks=100, num_cpu_blocks=0, watermark=0.1)
    assert bm.watermark_blocks == 10
    assert bm.can_allocate(make_group(range(4 * 91))) == AllocStatus.NEVER
    assert bm.can_allocate(make_group(range(4 * 90))) == AllocStatus.OK
    admit(bm, make_group(range(1000, 1000 + 4 * 85)))
    assert bm.can_allocate(make_group(range(4 * 6))) == AllocStatus.LATER
    assert bm.can_allocate(make_group(range(4 * 5))) == AllocStatus.OK
    assert bm.can_allocate(make_group(range(4 * 90))) == AllocStatus.LATER
    # A recomputed sequence needs blocks for its generated tokens too.
    g = make_group(range(4 * 5 - 1))
    g.seqs[0].append_token(7, 0.0)
    g.seqs[0].append_token(8, 0.0)
    assert bm.can_allocate(g) == AllocStatus.LATER
    # A cache hit on an in-use block costs nothing; on an evictable block it costs a free block.
    bm = BlockSpaceManager(block_size=2, num_device_blocks=5, num_cpu_blocks=0, watermark=0.2)
    a = make_group([1, 2, 3, 4, 5])                       # 2 full blocks cached + 1 partial
    admit(bm, a)
    compute(bm, a.seqs[0])
    assert bm.get_num_free_device_blocks() == 2
    assert bm.can_allocate(make_group([1, 2, 3, 4, 6])) == AllocStatus.OK      # 1 new block, 1 left
    bm.free(a.seqs[0])
    admit(bm, make_group([9]))                            # now 2 free + 2 evictable
    assert bm.get_num_free_device_blocks() == 4
    assert bm.can_allocate(make_group([1, 2, 3, 4, 6])) == AllocStatus.OK      # takes 3, leaves 1
    assert bm.can_allocate(make_group([1, 2, 3, 4, 6, 7, 8])) == AllocStatus.LATER   # takes 4


def test_swap_is_all_or_nothing_and_keeps_sharing():
    bm = BlockSpaceManager(block_size=2, num_device_blocks=16, num_cpu_blocks=4, enable_prefix_caching=False)
    group = make_group([1, 2, 3])
    admit(bm, group)
    parent = group.seqs[0]
    compute(bm, parent)
    child = parent.fork(next_seq_id())
    group.add(child)
    bm.fork(parent, child)
    for i, seq in enumerate(group.seqs):
        seq.append_token(10 + i, 0.0)
        compute(bm, seq)
    # 3 distinct blocks: the shared first block and one private tail each.
    assert bm.can_swap_out(group)
    other = make_group(range(20, 30))                     # 5 blocks: more than the cpu pool
    admit(bm, other)
    assert not bm.can_swap_out(other)
    before = (bm.get_block_table(other.seqs[0]), bm.get_num_free_device_blocks(), bm.get_num_free_cpu_blocks())
    with pytest.raises(RuntimeError):
        bm.swap_out(other)
    assert before == (bm.get_block_table(other.seqs[0]), bm.get_num_free_device_blocks(), bm.get_num_free_cpu_blocks())
    free_dev = bm.get_num_free_device_blocks()
    pairs = bm.swap_out(group)
    for seq in group.seqs:
        seq.status = SWAPPED
    assert len(pairs) == 3 and bm.get_num_free_cpu_blocks() == 1 and bm.get_num_free_device_blocks() == free_dev + 3
    cpu_tables = [bm.get_block_table(s) for s in group.seqs]
    assert cpu_tables[0][0] == cpu_tables[1][0] and bm.cpu.blocks[cpu_tables[0][0]].ref_count == 2
    assert bm.can_swap_in(group)
    back = bm.swap_in(group)
    assert sorted(d for _, d in pairs) == sorted(c for c, _ in back)
    dev_tables = [bm.get_block_table(s) for s in group.seqs]
    assert dev_tables[0][0] == dev_tables[1][0] and bm.device.blocks[dev_tables[0][0]].ref_count == 2
    assert bm.get_num_free_cpu_blocks() == 4


def test_free_is_idempotent_and_bugs_raise():
    bm = BlockSpaceManager(block_size=2, num_device_blocks=2, num_cpu_blocks=0)
    g = make_group([1, 2, 3])
    bm.allocate(g)
    with pytest.raises(RuntimeError, match="allocated twice"):
        bm.allocate(g)
    with pytest.raises(RuntimeError, match="needs"):
        bm.allocate(make_group([4]))
    bm.free(g.seqs[0])
    bm.free(g.seqs[0])
    assert bm.get_num_free_device_blocks() == 2
    with pytest.raises(RuntimeError, match="freed more"):
        bm.device.decref(0)
    with pytest.raises(RawpagedError, match="num_device_blocks"):
        BlockSpaceManager(block_size=16, num_device_blocks=0, num_cpu_blocks=0)


# -- the state machine ----------------------------------------------------------------------------
class BlockManagerMachine(RuleBasedStateMachine):
    """Random allocate / compute / fork / free / swap / recompute / prefix reuse, checked every step.

    NOTE: rules pick among what exists and do nothing when nothing fits (no preconditions), so
    Hypothesis does not throw away runs; `step` computes several sequences, like an engine step.
    """

    @initialize(block_size=st.integers(2, 4), num_device=st.integers(6, 24), num_cpu=st.integers(0, 16),
                caching=st.sampled_from([True, True, False]), watermark=st.sampled_from([0.0, 0.1, 0.2]))
    def setup(self, block_size, num_device, num_cpu, caching, watermark):
        self.bm = BlockSpaceManager(block_size, num_device, num_cpu, watermark, caching)
        self.bs = block_size
        self.groups: list[SequenceGroup] = []        # live groups, any status
        self.prompts: list[list[int]] = []           # bases for prefix reuse
        self.kv = {"device": {}, "cpu": {}}          # pool -> block -> slot contents
        first = make_group([0, 1, 2] * block_size)   # start with 3 computed (cached) blocks
        if self.try_admit(first) == AllocStatus.OK:
            self.groups.append(first)
            self.bm.append_slots(first.seqs[0], first.seqs[0].num_tokens)
            self.write(first.seqs[0], 0, first.seqs[0].num_tokens)
            self.bm.mark_computed(first.seqs[0])
        self.prompts.append(first.prompt_token_ids)

    # -- helpers ------------------------------------------------------------------------------
    def seqs(self, status):
        return [(g, s) for g in self.groups for s in g.seqs if s.status == status]

    def groups_with(self, status):
        return [g for g in self.groups if g.get_seqs(status)]

    def pick(self, data, items, label):
        return data.draw(st.sampled_from(items), label=label) if items else None

    def copy(self, src_pool, dst_pool, pairs):
        assert len({s for s, _ in pairs}) == len(pairs) == len({d for _, d in pairs})
        for src, dst in pairs:
            self.kv[dst_pool][dst] = list(self.kv[src_pool].get(src, [None] * self.bs))

    def try_admit(self, group):
        status = self.bm.can_allocate(group)
        event(f"admit {status.name}")
        distinct = {tuple(s.get_token_ids()) for s in group.get_seqs(WAITING)}
        total = sum(-(-len(t) // self.bs) for t in distinct)
        assert (status == AllocStatus.NEVER) == (total > self.bm.num_device_blocks - self.bm.watermark_blocks)
        if status == AllocStatus.OK:
            free, evictable = self.bm.get_num_free_device_blocks(), self.bm.device.num_idle()
            admit(self.bm, group)
            assert free - self.bm.get_num_free_device_blocks() <= total
            assert self.bm.get_num_free_device_blocks() >= self.bm.watermark_blocks
            for seq in group.get_seqs(RUNNING):
                n = seq.num_computed_tokens
                assert n % self.bs == 0 and n <= max(0, seq.num_tokens - 1)
                if n:
                    event("prefix cache hit")
            if self.bm.device.num_idle() < evictable and not self.bm.device.free_ids:
                event("eviction")
        return status

    def finish(self, group, seq):
        seq.status = SequenceStatus.FINISHED_STOPPED
        self.bm.free(seq)
        if group.finished:
            self.groups.remove(group)

    def compute(self, data, group, seq):
        """One step of seq: sample a token if all are computed, then write 1..3 blocks' worth of slots."""
        if seq.num_uncomputed_tokens == 0:
            seq.append_token(data.draw(st.integers(0, 2), label="sampled"), 0.0)
        if not self.bm.can_append_slots(group):
            return
        n = data.draw(st.integers(1, min(3 * self.bs, seq.num_uncomputed_tokens)), label="n")
        copies = self.bm.append_slots(seq, n)
        if copies:
            event("copy-on-write")
        self.copy("device", "device", copies)
        self.write(seq, seq.num_computed_tokens, n)
        if data.draw(st.integers(0, 3), label="mark") > 0:
            self.bm.mark_computed(seq)
            self.prompts.append(seq.get_token_ids()[:seq.num_computed_tokens])   # cached: reuse it

    def write(self, seq, start, n):
        """The model writes K/V of tokens start..start+n-1; only into blocks this seq owns alone."""
        table, dev, tokens = self.bm.get_block_table(seq), self.bm.device, seq.get_token_ids()
        for p in range(start, start + n):
            block = table[p // self.bs]
            assert dev.blocks[block].ref_count == 1 and not dev.blocks[block].is_cached, "write into a shared block"
            self.kv["device"].setdefault(block, [None] * self.bs)[p % self.bs] = tuple(tokens[:p + 1])
        seq.num_computed_tokens = start + n

    # -- rules --------------------------------------------------------------------------------
    @rule(data=st.data())
    def add_request(self, data):
        if len(self.groups) >= 8:
            return
        tokens = st.integers(0, 2)                   # a tiny vocabulary: prefixes collide often
        if data.draw(st.booleans(), label="reuse"):
            base = data.draw(st.sampled_from(self.prompts), label="base")
            cut = data.draw(st.one_of(st.just(len(base)), st.integers(0, len(base)),
                                      st.integers(0, len(base) // self.bs).map(lambda k: k * self.bs)), label="cut")
            tail = data.draw(st.one_of(st.just([]), st.lists(tokens, max_size=2 * self.bs)), label="tail")
            prompt = base[:cut] + tail
        else:
            prompt = data.draw(st.lists(tokens, max_size=6 * self.bs))
        prompt = prompt or [0]
        group = make_group(prompt)
        if self.try_admit(group) != AllocStatus.NEVER:
            self.groups.append(group)                # LATER stays waiting

    @rule(data=st.data())
    def admit_waiting(self, data):
        group = self.pick(data, self.groups_with(WAITING), "waiting group")
        if group is not None:
            self.try_admit(group)

    @rule(data=st.data())
    def step(self, data):
        running = self.seqs(RUNNING)
        if running:
            for group, seq in data.draw(st.lists(st.sampled_from(running), min_size=1, max_size=4, unique=True)):
                if seq.status == RUNNING:
                    self.compute(data, group, seq)

    @rule(data=st.data())
    def fork(self, data):
        picked = self.pick(data, self.seqs(RUNNING), "parent")
        if picked is not None and len(picked[0].seqs) < 4:
            group, seq = picked
            child = seq.fork(next_seq_id())
            group.add(child)
            self.bm.fork(seq, child)

    @rule(data=st.data())
    def finish_seq(self, data):
        picked = self.pick(data, self.seqs(RUNNING) + self.seqs(SWAPPED), "finished")
        if picked is not None:
            self.finish(*picked)

    @rule(data=st.data())
    def swap_out(self, data):
        group = self.pick(data, self.groups_with(RUNNING), "swap out")
        if group is None:
            return
        event(f"swap out {'ok' if self.bm.can_swap_out(group) else 'refused'}")
        if self.bm.can_swap_out(group):
            self.copy("device", "cpu", self.bm.swap_out(group))
            for seq in group.get_seqs(RUNNING):
                seq.status = SWAPPED
        else:
            with pytest.raises(RuntimeError):
                self.bm.swap_out(group)

    @rule(data=st.data())
    def swap_in(self, data):
        group = self.pick(data, self.groups_with(SWAPPED), "swap in")
        if group is not None and self.bm.can_swap_in(group):
            self.copy("cpu", "device", self.bm.swap_in(group))
            for seq in group.get_seqs(SWAPPED):
                seq.status = RUNNING
            assert self.bm.can_append_slots(group)       # resumed groups can take their next step

    @rule(data=st.data())
    def preempt_by_recompute(self, data):
        group = self.pick(data, self.groups_with(RUNNING), "recompute")
        if group is not None:
            for seq in group.get_seqs(RUNNING):
                self.bm.free(seq)
                seq.reset_for_recompute()

    @rule(data=st.data())
    def reset_prefix_cache(self, data):
        if data.draw(st.integers(0, 9), label="reset") == 9:     # rare: it forgets every hit
            self.bm.reset_prefix_cache()

    # -- invariants ---------------------------------------------------------------------------
    @invariant()
    def pools_are_consistent(self):
        bm = self.bm
        for name, pool in (("device", bm.device), ("cpu", bm.cpu)):
            refs = [0] * pool.num_blocks
            for s in bm.seqs.values():
                if s.pool is pool:
                    for block in s.table:
                        refs[block] += 1
            assert refs == [b.ref_count for b in pool.blocks], name
            cached = {b.block_id for b in pool.blocks if b.is_cached}
            free = list(pool.free_ids)
            evictable = bm.prefix_cache.evictable if pool is bm.device else sorted(cached - set(free))
            assert len(set(free)) == len(free) and not set(free) & set(evictable)
            idle = set(free) | set(evictable)
            assert idle == {b for b in range(pool.num_blocks) if refs[b] == 0}
            assert set(evictable) <= cached and not set(free) & cached
            assert pool.num_free() + sum(r > 0 for r in refs) == pool.num_blocks
        assert 0.0 <= bm.usage() <= 1.0

    @invariant()
    def sequences_read_back_their_tokens(self):
        live = {s.seq_id for g in self.groups for s in g.seqs if s.status in (RUNNING, SWAPPED)}
        assert live == set(self.bm.seqs)
        for group in self.groups:
            for seq in group.seqs:
                if seq.status not in (RUNNING, SWAPPED):
                    continue
                pool = "cpu" if seq.status == SWAPPED else "device"
                assert (self.bm.seqs[seq.seq_id].pool is self.bm.cpu) == (pool == "cpu")
                table, tokens = self.bm.seqs[seq.seq_id].table, seq.get_token_ids()
                assert len(table) * self.bs >= seq.num_computed_tokens
                for p in range(seq.num_computed_tokens):
                    got = self.kv[pool][table[p // self.bs]][p % self.bs]
                    assert got == tuple(tokens[:p + 1]), (seq.seq_id, p)

    @invariant()
    def cached_blocks_hold_their_prefix(self):
        cached = self.bm.prefix_cache.cached_blocks()
        for block, entry in cached.items():
            chain = []
            b = block
            while b is not None:
                chain.append(cached[b].token_ids)          # a cached block's parent is cached
                b = cached[b].parent
            prefix = [t for toks in reversed(chain) for t in toks]
            start = len(prefix) - self.bs
            assert self.kv["device"][block] == [tuple(prefix[:start + j + 1]) for j in range(self.bs)]

    def teardown(self):
        for group in list(self.groups):
            for seq in group.seqs:
                if seq.status in (RUNNING, SWAPPED):
                    self.finish(group, seq)
        bm = self.bm
        assert not bm.seqs
        assert bm.get_num_free_device_blocks() == bm.num_device_blocks
        assert bm.get_num_free_cpu_blocks() == bm.num_cpu_blocks
        assert not any(b.ref_count for b in bm.device.blocks) and not any(b.ref_count for b in bm.cpu.blocks)


class CollidingHashMachine(BlockManagerMachine):
    """The same machine with a hash that collides all the time: lookups must check the tokens."""

    @initialize(block_size=st.integers(2, 4), num_device=st.integers(6, 24), num_cpu=st.integers(0, 16),
                watermark=st.sampled_from([0.0, 0.1]))
    def setup(self, block_size, num_device, num_cpu, watermark):
        self.real_hash = pc_mod.hash_block
        pc_mod.hash_block = lambda parent_hash, token_ids: sum(token_ids) % 3
        super().setup(block_size, num_device, num_cpu, True, watermark)

    def teardown(self):
        try:
            super().teardown()
        finally:
            pc_mod.hash_block = self.real_hash


def _settings(n):
    return settings(max_examples=n, stateful_step_count=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])


BlockManagerMachine.TestCase.settings = _settings(200)
CollidingHashMachine.TestCase.settings = _settings(100)
test_block_manager_state_machine = BlockManagerMachine.TestCase
test_block_manager_state_machine_colliding_hash = CollidingHashMachine.TestCase
