"""Automatic prefix caching over one block pool (the device pool).

A FULL block whose tokens are all computed is registered under hash_block(parent hash, its token
ids): a hash chained over every block before it. A new request looks its leading full blocks up
and reuses every hit. A hit needs more than the hash: the same token ids and the same parent
block. Since a cached block's parent is always cached (uncaching a block uncaches its
descendants), matching the parent chains that check over the whole prefix, so a hash collision
never reuses a block computed under other tokens.

A cached block no table holds is "idle": still reusable, counted free, and evicted least recently
used first when an allocation finds the free list empty. The cache state of a block lives in its
record (hash, token_ids, parent, last_use; see block_allocator.py); this module keeps three
indexes over the records: hash -> blocks, block -> cached children, and a heap of idle blocks by
last use.
"""
from __future__ import annotations

import heapq

from rawpaged.core.block_allocator import Block, BlockAllocator


def hash_block(parent_hash: int | None, token_ids: tuple[int, ...]) -> int:
    """Prefix-cache key of a full block: a hash chained over the blocks before it."""
    return hash((parent_hash, token_ids))


class PrefixCache:
    def __init__(self, pool: BlockAllocator, block_size: int):
        self.pool = pool
        self.block_size = block_size
        self.buckets: dict[int, list[int]] = {}        # hash -> cached blocks (several on a collision)
        self.children: dict[int, set[int]] = {}        # block -> cached blocks whose parent it is
        # (last_use, block) of idle blocks, oldest first. NOTE: entries are not removed when a block
        # is reused or uncached; evict() skips an entry whose record no longer matches it.
        self._lru: list[tuple[int, int]] = []
        self._clock = 0
        self.num_queries = 0                           # blocks looked up for new requests
        self.num_hits = 0                              # ... and found

    # -- lookups --------------------------------------------------------------------------------
    def lookup(self, h: int, parent: int | None, token_ids: tuple[int, ...]) -> int | None:
        """The cached block for (parent block, token ids) under hash h, or None."""
        for block_id in self.buckets.get(h, ()):
            block = self.pool.blocks[block_id]
            if block.parent == parent and block.token_ids == token_ids:
                return block_id
        return None

    def match(self, token_ids: list[int], num_blocks: int) -> tuple[list[int], int | None]:
        """The cached blocks holding the first full blocks of token_ids (at most num_blocks, up to
        the first miss), and the chain hash after them."""
        blocks: list[int] = []
        h = None
        bs = self.block_size
        for i in range(num_blocks):
            chunk = tuple(token_ids[i * bs:(i + 1) * bs])
            next_h = hash_block(h, chunk)
            block = self.lookup(next_h, blocks[-1] if blocks else None, chunk)
            if block is None:
                break
            blocks.append(block)
            h = next_h
        return blocks, h

    def count(self, queries: int, hits: int) -> None:
        self.num_queries += queries
        self.num_hits += hits

    # -- registering ----------------------------------------------------------------------------
    def register(self, block_id: int, h: int, parent: int | None, token_ids: tuple[int, ...]) -> None:
        self.pool.mark_cached(block_id, h, parent, token_ids)
        self.buckets.setdefault(h, []).append(block_id)
        if parent is not None:
            self.children.setdefault(parent, set()).add(block_id)

    def register_full_blocks(self, table: list[int], start: int, chunks: list[tuple[int, ...]],
                             h: int | None) -> int | None:
        """Offer table[start:start + len(chunks)] (full, computed; chunks are their tokens) to the
        cache; h is the chain hash before them. Returns the chain hash after them.

        NOTE: if the same content is already cached in another block (two requests computed the
        same prefix in one step), the table switches to the cached block and releases its own copy.
        """
        blocks = self.pool.blocks
        for i, chunk in enumerate(chunks, start):
            h = hash_block(h, chunk)
            block_id, parent = table[i], (table[i - 1] if i else None)
            block = blocks[block_id]
            if block.hash is not None:
                if block.parent != parent or block.token_ids != chunk:
                    raise RuntimeError(f"block manager bug: block {i} of a table disagrees with the cache")
                continue
            if parent is not None and blocks[parent].hash is None:
                continue                     # NOTE: a cached block's parent must be cached
            twin = self.lookup(h, parent, chunk)
            if twin is None:
                self.register(block_id, h, parent, chunk)
            else:
                self.pool.incref(twin)
                table[i] = twin
                self.release(block_id)
        return h

    # -- releasing and evicting -----------------------------------------------------------------
    def release(self, block_id: int) -> None:
        """Drop one reference to a pool block; a cached block left unreferenced turns idle, the
        most recently used."""
        pool = self.pool
        if pool.decref(block_id) == 0 and pool.blocks[block_id].hash is not None:
            self._clock += 1
            pool.blocks[block_id].last_use = self._clock
            heapq.heappush(self._lru, (self._clock, block_id))
            if len(self._lru) > 2 * pool.num_blocks + 64:
                self._compact()

    def evict(self) -> None:
        """Uncache the least recently used idle block (and its descendants): at least one block
        turns free."""
        blocks = self.pool.blocks
        while self._lru:
            last_use, block_id = heapq.heappop(self._lru)
            if self._is_idle(blocks[block_id], last_use):
                self.uncache(block_id)
                return
        raise RuntimeError(f"block manager bug: no idle {self.pool.name} block to evict")

    def uncache(self, block_id: int) -> None:
        """Drop a block and its cached descendants from the cache (idle ones become free)."""
        blocks, stack = self.pool.blocks, [block_id]
        while stack:
            b = stack.pop()
            block = blocks[b]
            bucket = self.buckets[block.hash]
            bucket.remove(b)
            if not bucket:
                del self.buckets[block.hash]
            siblings = self.children.get(block.parent) if block.parent is not None else None
            if siblings is not None:
                siblings.discard(b)
                if not siblings:
                    del self.children[block.parent]
            stack.extend(self.children.pop(b, ()))
            self.pool.unmark_cached(b)

    def reset(self) -> None:
        """Forget every cached block (blocks in use stay with their tables)."""
        for block in self.pool.blocks:
            if block.is_cached:
                self.uncache(block.block_id)
        self._lru.clear()

    # -- introspection (O(pool): tests and debugging) ------------------------------------------
    @property
    def evictable(self) -> list[int]:
        """Idle blocks, least recently used first."""
        idle = [(b.last_use, b.block_id) for b in self.pool.blocks if b.ref_count == 0 and b.is_cached]
        return [block_id for _, block_id in sorted(idle)]

    def cached_blocks(self) -> dict[int, Block]:
        return {b.block_id: b for b in self.pool.blocks if b.is_cached}

    # -- helpers --------------------------------------------------------------------------------
    @staticmethod
    def _is_idle(block: Block, last_use: int) -> bool:
        """Whether a heap entry still describes the block: idle since that release."""
        return block.ref_count == 0 and block.hash is not None and block.last_use == last_use

    def _compact(self) -> None:
        # NOTE: runs after more than num_blocks releases since the last compaction: O(1) amortized.
        self._lru = [(b.last_use, b.block_id) for b in self.pool.blocks if self._is_idle(b, b.last_use)]
        heapq.heapify(self._lru)
