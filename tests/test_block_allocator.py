"""The block allocator alone: one record per block, the free list an exact index over the records."""
from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rawpaged.core.block_allocator import BlockAllocator


def check_records(pool: BlockAllocator) -> None:
    """Every block is in exactly one state, read off its record, and the indexes agree."""
    free = list(pool.free_ids)
    assert len(set(free)) == len(free)
    assert set(free) == {b.block_id for b in pool.blocks if b.ref_count == 0 and not b.is_cached}
    in_use = [b for b in pool.blocks if b.ref_count > 0]
    idle = [b for b in pool.blocks if b.ref_count == 0 and b.is_cached]
    assert all(b.ref_count >= 0 for b in pool.blocks)
    assert pool.num_in_use == len(in_use) and pool.num_idle() == len(idle)
    assert pool.num_free() == len(free) + len(idle) == pool.num_blocks - len(in_use)
    assert [b.block_id for b in pool.blocks] == list(range(pool.num_blocks))
    for b in pool.blocks:
        if not b.is_cached:
            assert (b.token_ids, b.parent) == ((), None)


def test_states_follow_the_record():
    pool = BlockAllocator("device", 3)
    check_records(pool)
    a, b = pool.allocate(), pool.allocate()
    assert (a, b) == (0, 1) and pool.blocks[a].ref_count == 1 and pool.num_free() == 1
    pool.incref(a)
    assert pool.decref(a) == 1 and pool.num_in_use == 2
    pool.mark_cached(a, h=7, parent=None, token_ids=(1, 2))
    check_records(pool)
    assert pool.decref(a) == 0                            # cached: idle, not free
    assert a not in pool.free_ids and pool.num_idle() == 1 and pool.num_free() == 2
    check_records(pool)
    pool.incref(a)                                        # a prefix-cache hit: in use again
    assert pool.num_idle() == 0 and pool.num_in_use == 2
    pool.decref(a)
    pool.unmark_cached(a)                                 # uncached while idle: free again
    assert pool.blocks[a].hash is None and list(pool.free_ids) == [2, a]
    check_records(pool)
    pool.mark_cached(b, h=8, parent=None, token_ids=(3,))
    pool.unmark_cached(b)                                 # uncached while in use: stays in use
    assert pool.blocks[b].ref_count == 1 and b not in pool.free_ids
    assert pool.decref(b) == 0 and list(pool.free_ids)[-1] == b
    check_records(pool)


def test_misuse_raises_a_clear_bug():
    pool = BlockAllocator("cpu", 1)
    with pytest.raises(RuntimeError, match="incref of free cpu block 0"):
        pool.incref(0)
    with pytest.raises(RuntimeError, match="freed more than it was used"):
        pool.decref(0)
    with pytest.raises(RuntimeError, match="caching cpu block 0"):
        pool.mark_cached(0, 1, None, (1,))                # a free block holds nothing to cache
    block = pool.allocate()
    with pytest.raises(RuntimeError, match="no free cpu block"):
        pool.allocate()
    pool.mark_cached(block, 1, None, (1,))
    with pytest.raises(RuntimeError, match="caching cpu block 0"):
        pool.mark_cached(block, 2, None, (2,))            # cached twice
    pool.decref(block)
    with pytest.raises(RuntimeError, match="1 idle cached blocks were not evicted"):
        pool.allocate()                                   # the allocator never evicts by itself
    check_records(pool)


@settings(max_examples=200, deadline=None)
@given(num_blocks=st.integers(1, 8),
       ops=st.lists(st.tuples(st.sampled_from(["alloc", "incref", "decref", "cache", "uncache"]),
                              st.integers(0, 7)), max_size=60))
def test_random_operations_keep_the_records_consistent(num_blocks, ops):
    pool = BlockAllocator("device", num_blocks)
    refs = [0] * num_blocks                               # an independent model of ref counts
    for op, i in ops:
        b = i % num_blocks
        rec = pool.blocks[b]
        if op == "alloc" and pool.free_ids:
            b = pool.allocate()
            refs[b] = 1
        elif op == "incref" and (refs[b] > 0 or rec.is_cached):
            pool.incref(b)
            refs[b] += 1
        elif op == "decref" and refs[b] > 0:
            refs[b] -= 1
            assert pool.decref(b) == refs[b]
        elif op == "cache" and refs[b] > 0 and not rec.is_cached:
            pool.mark_cached(b, h=i, parent=None, token_ids=(i,))
        elif op == "uncache" and rec.is_cached:
            pool.unmark_cached(b)
        assert [r.ref_count for r in pool.blocks] == refs
        check_records(pool)
