"""One pool of physical KV blocks: a record per block and the free list.

Every block has one `Block` record, the only place its state lives. A block is in one of three
states, read off its record:
  in use   ref_count > 0                      held by one or more block tables
  free     ref_count == 0 and hash is None    on `free_ids`, handed out by `allocate`
  idle     ref_count == 0 and hash set        kept for the prefix cache, which evicts it on demand
`free_ids` is an index over the records (exactly the free blocks), as the prefix cache's hash and
LRU indexes are. The allocator knows no hashing: whether a block is cached is whether its record
holds a hash; the prefix cache (prefix_cache.py) sets and clears it through mark_cached/unmark_cached.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass


@dataclass(eq=False, slots=True)
class Block:
    block_id: int
    ref_count: int = 0                # block tables holding this block
    # Prefix cache (device pool only); hash None: not cached, the fields below are unset.
    hash: int | None = None           # chained hash of the block's tokens and every block before it
    token_ids: tuple[int, ...] = ()   # the tokens the hash was computed from (checked on a lookup)
    parent: int | None = None         # block holding the previous full block (None: first block)
    last_use: int = 0                 # when the ref_count last dropped to 0 (LRU order of idle blocks)

    @property
    def is_cached(self) -> bool:
        return self.hash is not None


class BlockAllocator:
    """The records of one pool (device or cpu) and its free list; block ids are 0..num_blocks-1."""

    def __init__(self, name: str, num_blocks: int):
        self.name = name
        self.num_blocks = num_blocks
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free_ids: deque[int] = deque(range(num_blocks))
        self.num_in_use = 0

    def num_free(self) -> int:
        """Blocks an allocation can take: free plus idle (cached, unreferenced: evicted on demand)."""
        return self.num_blocks - self.num_in_use

    def num_idle(self) -> int:
        """Cached blocks no table holds (the prefix cache's evictable blocks)."""
        return self.num_blocks - self.num_in_use - len(self.free_ids)

    def allocate(self) -> int:
        """A free block with ref_count 1. NOTE: never evicts; the caller evicts an idle block first."""
        if not self.free_ids:
            raise RuntimeError(f"block manager bug: no free {self.name} block to allocate "
                               f"({self.num_idle()} idle cached blocks were not evicted first)")
        block = self.free_ids.popleft()
        self.blocks[block].ref_count = 1
        self.num_in_use += 1
        return block

    def incref(self, block_id: int) -> None:
        """One more table holds the block; an idle cached block is in use again."""
        block = self.blocks[block_id]
        if block.ref_count == 0:
            if block.hash is None:
                raise RuntimeError(f"block manager bug: incref of free {self.name} block {block_id}")
            self.num_in_use += 1
        block.ref_count += 1

    def decref(self, block_id: int) -> int:
        """One table fewer holds the block; returns its new ref_count.

        At 0 an uncached block goes back to the free list; a cached one stays idle, reusable by
        a prefix-cache hit until the cache evicts it.
        """
        block = self.blocks[block_id]
        if block.ref_count <= 0:
            raise RuntimeError(f"block manager bug: {self.name} block {block_id} freed more than it was used")
        block.ref_count -= 1
        if block.ref_count == 0:
            self.num_in_use -= 1
            if block.hash is None:
                self.free_ids.append(block_id)
        return block.ref_count

    def mark_cached(self, block_id: int, h: int, parent: int | None, token_ids: tuple[int, ...]) -> None:
        block = self.blocks[block_id]
        if block.ref_count == 0 or block.hash is not None:
            raise RuntimeError(f"block manager bug: caching {self.name} block {block_id} "
                               f"(ref_count {block.ref_count}, cached {block.hash is not None})")
        block.hash, block.parent, block.token_ids = h, parent, token_ids

    def unmark_cached(self, block_id: int) -> None:
        """The block leaves the prefix cache; an idle one becomes free."""
        block = self.blocks[block_id]
        block.hash, block.parent, block.token_ids = None, None, ()
        if block.ref_count == 0:
            self.free_ids.append(block_id)
