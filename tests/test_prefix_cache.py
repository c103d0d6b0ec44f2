"""The prefix cache alone, on a bare block pool: chained lookups, collisions, LRU eviction, uncaching."""
from __future__ import annotations

import pytest

from rawpaged.core import prefix_cache as pc_mod
from rawpaged.core.block_allocator import BlockAllocator
from rawpaged.core.prefix_cache import PrefixCache, hash_block

BS = 2


def fill(cache: PrefixCache, tokens: list[int]) -> list[int]:
    """Allocate and register the full blocks of tokens, as a sequence computing them would."""
    n = len(tokens) // BS
    table = [cache.pool.allocate() for _ in range(n)]
    chunks = [tuple(tokens[i * BS:(i + 1) * BS]) for i in range(n)]
    cache.register_full_blocks(table, 0, chunks, None)
    return table


def release_all(cache: PrefixCache, table: list[int]) -> None:
    for block in reversed(table):
        cache.release(block)


def check_indexes(cache: PrefixCache) -> None:
    """The hash, children and LRU indexes agree with the records."""
    pool = cache.pool
    cached = {b.block_id: b for b in pool.blocks if b.is_cached}
    assert sorted(x for bucket in cache.buckets.values() for x in bucket) == sorted(cached)
    for h, bucket in cache.buckets.items():
        assert bucket and all(cached[x].hash == h for x in bucket)
    for block_id, b in cached.items():
        if b.parent is not None:
            assert b.parent in cached and block_id in cache.children[b.parent]
    assert all(kids and p in cached and all(cached[k].parent == p for k in kids)
               for p, kids in cache.children.items())
    idle = {b.block_id for b in cached.values() if b.ref_count == 0}
    live = {x for t, x in cache._lru if cache._is_idle(pool.blocks[x], t)}
    assert live == idle                                   # every idle block is findable by evict()


def test_match_follows_the_chain_and_stops_at_the_first_miss():
    cache = PrefixCache(BlockAllocator("device", 8), BS)
    table = fill(cache, [1, 2, 3, 4, 5, 6])
    h = hash_block(hash_block(hash_block(None, (1, 2)), (3, 4)), (5, 6))
    assert cache.match([1, 2, 3, 4, 5, 6, 7], 3) == (table, h)
    assert cache.match([1, 2, 3, 4, 5, 6], 2)[0] == table[:2]          # at most num_blocks
    assert cache.match([1, 2, 9, 9, 5, 6], 3)[0] == table[:1]          # a miss ends the chain
    assert cache.match([3, 4, 5, 6], 2) == ([], None)                 # same tokens, other position
    check_indexes(cache)


def test_a_collision_never_returns_other_tokens_or_another_parent(monkeypatch):
    monkeypatch.setattr(pc_mod, "hash_block", lambda parent_hash, token_ids: 42)
    cache = PrefixCache(BlockAllocator("device", 8), BS)
    a = fill(cache, [1, 2, 3, 4])
    b = fill(cache, [3, 4, 1, 2])                         # the same chunks, swapped
    assert len(cache.buckets[42]) == 4
    assert cache.match([1, 2, 3, 4], 2)[0] == a and cache.match([3, 4, 1, 2], 2)[0] == b
    assert cache.match([1, 2, 1, 2], 2)[0] == a[:1]       # (1, 2) cached, but not after a[0]
    assert cache.lookup(42, None, (5, 6)) is None
    check_indexes(cache)


def test_register_switches_to_a_twin_and_releases_the_copy():
    pool = BlockAllocator("device", 8)
    cache = PrefixCache(pool, BS)
    first = fill(cache, [1, 2, 3, 4])
    second = fill(cache, [1, 2, 3, 4])                    # computed in the same step: duplicates
    assert second == first
    assert [pool.blocks[b].ref_count for b in first] == [2, 2] and pool.num_in_use == 2
    check_indexes(cache)
    with pytest.raises(RuntimeError, match="disagrees with the cache"):
        cache.register_full_blocks(first, 0, [(9, 9)], None)


def test_lru_eviction_order_and_reuse():
    pool = BlockAllocator("device", 4)
    cache = PrefixCache(pool, BS)
    x, y, z = (fill(cache, [h, h])[0] for h in (1, 2, 3))
    for block in (y, x, z):
        cache.release(block)
    assert cache.evictable == [y, x, z] and pool.num_free() == 4
    pool.incref(y)                                        # a hit: y is in use, its heap entry stale
    cache.release(y)                                      # ... and now the most recently used
    assert cache.evictable == [x, z, y]
    check_indexes(cache)
    free = list(pool.free_ids)
    cache.evict()
    assert not pool.blocks[x].is_cached and list(pool.free_ids) == free + [x]
    cache.evict()
    cache.evict()
    assert cache.evictable == [] and pool.num_idle() == 0
    with pytest.raises(RuntimeError, match="no idle device block"):
        cache.evict()
    check_indexes(cache)


def test_evicting_a_parent_drops_its_descendants_in_use_or_idle():
    pool = BlockAllocator("device", 6)
    cache = PrefixCache(pool, BS)
    chain = fill(cache, [1, 2, 3, 4, 5, 6])               # 0 <- 1 <- 2
    branch = [chain[0]] + [pool.allocate()]               # a second child of the head
    pool.incref(chain[0])
    cache.register_full_blocks(branch, 1, [(7, 8)], hash_block(None, (1, 2)))
    assert cache.children[chain[0]] == {chain[1], branch[1]}
    release_all(cache, chain)                             # the branch still holds the head
    cache.uncache(chain[0])
    assert not any(b.is_cached for b in pool.blocks)
    assert pool.blocks[branch[1]].ref_count == 1 and branch[1] not in pool.free_ids
    assert set(pool.free_ids) == set(range(6)) - set(branch)
    assert cache.buckets == {} and cache.children == {}
    check_indexes(cache)


def test_many_releases_compact_the_heap_and_keep_the_order():
    pool = BlockAllocator("device", 3)
    cache = PrefixCache(pool, BS)
    a, b = fill(cache, [1, 1])[0], fill(cache, [2, 2])[0]
    cache.release(a)
    cache.release(b)
    for _ in range(500):                                  # hits and releases: stale entries pile up
        pool.incref(a)
        cache.release(a)
        assert len(cache._lru) <= 2 * pool.num_blocks + 64 + 1
    assert cache.evictable == [b, a]
    check_indexes(cache)
    cache.evict()
    assert not pool.blocks[b].is_cached and pool.blocks[a].is_cached


def test_reset_forgets_everything_but_keeps_blocks_in_use():
    pool = BlockAllocator("device", 6)
    cache = PrefixCache(pool, BS)
    held = fill(cache, [1, 2, 3, 4])
    idle = fill(cache, [5, 6])
    release_all(cache, idle)
    cache.reset()
    assert not any(b.is_cached for b in pool.blocks) and cache.evictable == []
    assert [pool.blocks[b].ref_count for b in held] == [1, 1] and pool.num_free() == 4
    assert cache.match([1, 2, 3, 4, 5], 2) == ([], None)
    check_indexes(cache)
