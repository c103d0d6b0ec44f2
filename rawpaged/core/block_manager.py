"""The paged block manager: block tables, reference counts, copy-on-write, swapping, prefix caching.

Pure bookkeeping (the paper, sections 4.2-4.5): no arrays live here. The scheduler asks what fits
(`can_*`), the manager updates block tables and returns the block copies (copy-on-write, swaps) that
the cache engine performs before the model runs.

Physical blocks live in two pools, `device` (the GPU, or the CPU backend's KV pool) and `cpu` (the
swap pool); block ids are 0..N-1 in each. Token i of a sequence lives in slot i % block_size of
physical block table[i // block_size].

Prefix caching (device pool only): a FULL block whose tokens are all computed is registered under
hash_block(parent hash, its token ids), chained over the blocks before it. A new request reuses
every cached leading full block of its tokens and computes only the rest. Unreferenced cached
blocks stay reusable ("evictable") until an allocation finds the free list empty and evicts the
least recently used one.

Order of the copies one schedule() returns: perform every swap-out, then every swap-in, then the
copy-on-write copies. Blocks a swap-out frees may be handed out again in the same step.
"""
from __future__ import annotations

import enum
from collections import OrderedDict, deque
from dataclasses import dataclass

from rawpaged.errors import RawpagedError
from rawpaged.sequence import Sequence, SequenceGroup, SequenceStatus


class AllocStatus(enum.Enum):
    OK = enum.auto()      # fits now
    LATER = enum.auto()   # not enough free blocks now; retry when some are freed
    NEVER = enum.auto()   # needs more blocks than the device pool has (minus the watermark)


def hash_block(parent_hash: int | None, token_ids: tuple[int, ...]) -> int:
    """Prefix-cache key of a full block: a hash chained over the blocks before it."""
    return hash((parent_hash, token_ids))


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


@dataclass(frozen=True)
class _CacheEntry:
    hash: int
    parent: int | None          # physical block holding the previous full block (None: first block)
    token_ids: tuple[int, ...]


class BlockAllocator:
    """One pool of physical blocks: reference counts, a free list and (device pool) the prefix cache.

    Every block is in exactly one of three states: in use (refcount > 0), free (on `free_list`), or
    evictable (refcount 0 but cached: on `evictable`, still reusable, least recently used first).
    """

    def __init__(self, name: str, num_blocks: int):
        self.name = name
        self.num_blocks = num_blocks
        self.refcounts = [0] * num_blocks
        self.free_list: deque[int] = deque(range(num_blocks))
        self.evictable: OrderedDict[int, None] = OrderedDict()
        self.cached: dict[int, _CacheEntry] = {}       # block -> its cache entry
        self.buckets: dict[int, list[int]] = {}        # hash -> blocks (several on a hash collision)
        self.children: dict[int, set[int]] = {}        # block -> cached blocks whose parent it is

    def num_free(self) -> int:
        """Blocks an allocation can take: free plus evictable."""
        return len(self.free_list) + len(self.evictable)

    def allocate(self) -> int:
        """A fresh block with refcount 1; evicts the least recently used cached block if needed."""
        if not self.free_list:
            if not self.evictable:
                raise RuntimeError(f"block manager bug: no free {self.name} block to allocate")
            self.uncache(next(iter(self.evictable)))
        block = self.free_list.popleft()
        self.refcounts[block] = 1
        return block

    def incref(self, block: int) -> None:
        if self.refcounts[block] == 0:
            if block not in self.evictable:
                raise RuntimeError(f"block manager bug: incref of free {self.name} block {block}")
            del self.evictable[block]          # NOTE: reused again, no longer evictable
        self.refcounts[block] += 1

    def decref(self, block: int) -> None:
        if self.refcounts[block] <= 0:
            raise RuntimeError(f"block manager bug: {self.name} block {block} freed more than it was used")
        self.refcounts[block] -= 1
        if self.refcounts[block] == 0:
            if block in self.cached:
                self.evictable[block] = None   # most recently used end
            else:
                self.free_list.append(block)

    # -- prefix cache ---------------------------------------------------------------------------
    def lookup(self, h: int, parent: int | None, token_ids: tuple[int, ...]) -> int | None:
        """The cached block for (parent block, token ids) under hash h, or None.

        NOTE: the hash only finds candidates; a hit needs the same parent block and the same token
        ids. Since a cached block's parent is always cached (uncache drops descendants), matching
        the parent block chains the check over the whole prefix, so a hash collision never reuses
        a block computed under other tokens.
        """
        for block in self.buckets.get(h, ()):
            entry = self.cached[block]
            if entry.parent == parent and entry.token_ids == token_ids:
                return block
        return None

    def register(self, block: int, h: int, parent: int | None, token_ids: tuple[int, ...]) -> None:
        self.cached[block] = _CacheEntry(h, parent, token_ids)
        self.buckets.setdefault(h, []).append(block)
        if parent is not None:
            self.children.setdefault(parent, set()).add(block)

    def uncache(self, block: int) -> None:
        """Drop a block and its cached descendants from the cache (evictable ones become free)."""
        stack = [block]
        while stack:
            b = stack.pop()
            entry = self.cached.pop(b)
            bucket = self.buckets[entry.hash]
            bucket.remove(b)
            if not bucket:
                del self.buckets[entry.hash]
            if entry.parent is not None and entry.parent in self.children:
                self.children[entry.parent].discard(b)
            stack.extend(self.children.pop(b, ()))
            if b in self.evictable:
                del self.evictable[b]
                self.free_list.append(b)

    def reset_cache(self) -> None:
        for block in list(self.cached):
            if block in self.cached:
                self.uncache(block)


class BlockSpaceManager:
    """Maps every sequence's logical blocks to physical ones (see the module docstring)."""

    def __init__(self, block_size: int, num_device_blocks: int, num_cpu_blocks: int,
                 watermark: float = 0.01, enable_prefix_caching: bool = True):
        if block_size < 1:
            raise RawpagedError(f"block_size must be >= 1, got {block_size}")
        if num_device_blocks < 1:
            raise RawpagedError(f"the KV cache holds no block (num_device_blocks={num_device_blocks}): "
                                "raise kv_cache_memory or lower block_size")
        if num_cpu_blocks < 0:
            raise RawpagedError(f"num_cpu_blocks must be >= 0, got {num_cpu_blocks}")
        if not 0.0 <= watermark < 1.0:
            raise RawpagedError(f"watermark must be in [0, 1), got {watermark}")
        self.block_size = block_size
        self.device = BlockAllocator("device", num_device_blocks)
        self.cpu = BlockAllocator("cpu", num_cpu_blocks)
        self.watermark_blocks = int(watermark * num_device_blocks)
        self.enable_prefix_caching = enable_prefix_caching
        self.tables: dict[int, list[int]] = {}        # seq_id -> physical blocks
        self.swapped: set[int] = set()                # seq_ids whose table is in the cpu pool
        # seq_id -> (leading full blocks already offered to the cache, chain hash after them)
        self._hashed: dict[int, tuple[int, int | None]] = {}
        self.prefix_cache_queries = 0                 # in blocks
        self.prefix_cache_hits = 0

    @property
    def num_device_blocks(self) -> int:
        return self.device.num_blocks

    @property
    def num_cpu_blocks(self) -> int:
        return self.cpu.num_blocks

    def get_num_free_device_blocks(self) -> int:
        return self.device.num_free()

    def get_num_free_cpu_blocks(self) -> int:
        return self.cpu.num_free()

    def usage(self) -> float:
        """Fraction of device blocks in use (evictable cached blocks count as free)."""
        return 1.0 - self.device.num_free() / self.device.num_blocks

    def get_block_table(self, seq: Sequence) -> list[int]:
        return list(self.tables[seq.seq_id])

    # -- admission ------------------------------------------------------------------------------
    def can_allocate(self, group: SequenceGroup) -> AllocStatus:
        """Whether the group's WAITING sequences (prompt, or all tokens after recompute) fit now.

        NOTE: NEVER counts blocks without the prefix cache, so whether a request is refused does not
        depend on what happens to be cached; LATER counts the blocks a cache hit saves.
        """
        total, from_free = self._blocks_needed(self._distinct_waiting(group), group.reuses_prefix_cache)
        if total > self.device.num_blocks - self.watermark_blocks:
            return AllocStatus.NEVER
        if self.device.num_free() - from_free < self.watermark_blocks:
            return AllocStatus.LATER
        return AllocStatus.OK

    def allocate(self, group: SequenceGroup) -> None:
        """Block tables for the group's WAITING sequences; sets their num_computed_tokens.

        Sequences with identical tokens share one set of blocks; with prefix caching each distinct
        sequence reuses its cached leading full blocks (never the one holding its last token: that
        token is always computed, so a cached block is never written).
        """
        distinct = self._distinct_waiting(group)
        for seqs in distinct:
            for seq in seqs:
                if seq.seq_id in self.tables:
                    raise RuntimeError(f"block manager bug: seq {seq.seq_id} allocated twice")
        use_cache = group.reuses_prefix_cache
        _, from_free = self._blocks_needed(distinct, use_cache)
        if from_free > self.device.num_free():
            raise RuntimeError(f"block manager bug: allocate({group.request_id}) needs {from_free} "
                               f"device blocks, {self.device.num_free()} free")
        for seqs in distinct:
            tokens = seqs[0].get_token_ids()
            hits, h = self._cached_prefix(tokens, use_cache)
            if self.enable_prefix_caching and use_cache:
                self.prefix_cache_queries += self._num_cacheable(len(tokens))
                self.prefix_cache_hits += len(hits)
            for block in hits:
                self.device.incref(block)
            table = hits + [self.device.allocate() for _ in range(_cdiv(len(tokens), self.block_size) - len(hits))]
            for i, seq in enumerate(seqs):
                if i > 0:                                  # identical tokens: share every block
                    for block in table:
                        self.device.incref(block)
                self.tables[seq.seq_id] = list(table)
                self._hashed[seq.seq_id] = (len(hits), h)
                seq.num_computed_tokens = len(hits) * self.block_size

    def _distinct_waiting(self, group: SequenceGroup) -> list[list[Sequence]]:
        by_tokens: dict[tuple[int, ...], list[Sequence]] = {}
        for seq in group.get_seqs(SequenceStatus.WAITING):
            by_tokens.setdefault(tuple(seq.get_token_ids()), []).append(seq)
        return list(by_tokens.values())

    def _blocks_needed(self, distinct: list[list[Sequence]], use_cache: bool = True) -> tuple[int, int]:
        """(blocks without any cache hit, blocks taken from the free + evictable count)."""
        total, new, hit_blocks = 0, 0, set()
        for seqs in distinct:
            n = _cdiv(seqs[0].num_tokens, self.block_size)
            hits, _ = self._cached_prefix(seqs[0].get_token_ids(), use_cache)
            total += n
            new += n - len(hits)
            hit_blocks.update(hits)
        # NOTE: an evictable hit leaves the evictable list, so it costs a free block too.
        return total, new + sum(1 for b in hit_blocks if self.device.refcounts[b] == 0)

    def _num_cacheable(self, num_tokens: int) -> int:
        # Full blocks that do not hold the last token (which is always recomputed).
        return max(0, (num_tokens - 1) // self.block_size)

    def _cached_prefix(self, token_ids: list[int], use_cache: bool = True) -> tuple[list[int], int | None]:
        """The cached device blocks holding the leading full blocks of token_ids, and the chain hash."""
        blocks: list[int] = []
        h = None
        if not (self.enable_prefix_caching and use_cache):
            return blocks, h
        bs = self.block_size
        for i in range(self._num_cacheable(len(token_ids))):
            chunk = tuple(token_ids[i * bs:(i + 1) * bs])
            next_h = hash_block(h, chunk)
            block = self.device.lookup(next_h, blocks[-1] if blocks else None, chunk)
            if block is None:
                break
            blocks.append(block)
            h = next_h
        return blocks, h

    def mark_computed(self, seq: Sequence) -> None:
        """After a step: register the seq's full, computed blocks in the prefix cache.

        NOTE: if the same content is already cached in another block (two requests computed the
        same prefix in one step), the seq switches to the cached block and releases its own copy.
        """
        if not self.enable_prefix_caching or seq.seq_id not in self.tables or seq.seq_id in self.swapped:
            return
        table, bs, dev = self.tables[seq.seq_id], self.block_size, self.device
        done, h = self._hashed.get(seq.seq_id, (0, None))
        num_full = min(seq.num_computed_tokens // bs, len(table))
        if num_full <= done:
            return
        tokens = seq.get_token_ids()
        for i in range(done, num_full):
            chunk = tuple(tokens[i * bs:(i + 1) * bs])
            h = hash_block(h, chunk)
            block, parent = table[i], (table[i - 1] if i else None)
            if block in dev.cached:
                entry = dev.cached[block]
                if entry.parent != parent or entry.token_ids != chunk:
                    raise RuntimeError(f"block manager bug: seq {seq.seq_id} block {i} disagrees with the cache")
                continue
            if parent is not None and parent not in dev.cached:
                continue                     # NOTE: a cached block's parent must be cached
            twin = dev.lookup(h, parent, chunk)
            if twin is None:
                dev.register(block, h, parent, chunk)
            else:
                dev.incref(twin)
                table[i] = twin
                dev.decref(block)
        self._hashed[seq.seq_id] = (num_full, h)

    def reset_prefix_cache(self) -> None:
        """Forget every cached block (blocks in use stay with their sequences)."""
        self.device.reset_cache()
        self._hashed.clear()

    # -- decoding -------------------------------------------------------------------------------
    def can_append_slots(self, group: SequenceGroup) -> bool:
        """Whether every RUNNING seq of the group can get slots for all its uncomputed tokens."""
        return self._append_need(group.get_seqs(SequenceStatus.RUNNING), self.device) <= self.device.num_free()

    def append_slots(self, seq: Sequence, num_new_tokens: int) -> list[tuple[int, int]]:
        """Slots for tokens num_computed_tokens.. +num_new_tokens; returns copy-on-write (src, dst) pairs.

        A shared block written this step is first copied to a private one. NOTE: a prefix-cached block
        this seq owns alone (only when the engine recomputes registered tokens) leaves the cache and is
        rewritten in place: no copy, and no other seq can pick it up before the write.
        """
        table, dev = self._device_table(seq), self.device
        written, new = self._written_and_new(seq, num_new_tokens)
        shared = [i for i, b in written.items() if dev.refcounts[b] > 1]
        if len(shared) + new > dev.num_free():
            raise RuntimeError(f"block manager bug: append_slots(seq {seq.seq_id}) needs "
                               f"{len(shared) + new} device blocks, {dev.num_free()} free")
        copies = []
        for i, block in written.items():
            if dev.refcounts[block] > 1:
                table[i] = dev.allocate()
                dev.decref(block)
                copies.append((block, table[i]))
            elif block in dev.cached:
                dev.uncache(block)
        if written and min(written) < self._hashed.get(seq.seq_id, (0, None))[0]:
            self._hashed.pop(seq.seq_id)    # registered positions are rewritten: rehash from the start
        table.extend(dev.allocate() for _ in range(new))
        return copies

    def _append_need(self, seqs: list[Sequence], pool: BlockAllocator) -> int:
        """Device blocks that append_slots needs to give every seq all its uncomputed tokens."""
        need, remaining = 0, {}
        for seq in seqs:
            written, new = self._written_and_new(seq, seq.num_tokens - seq.num_computed_tokens)
            for block in written.values():
                r = remaining.get(block, pool.refcounts[block])
                if r > 1:                   # copy-on-write, unless the other holders copied first
                    need += 1
                    remaining[block] = r - 1
            need += new
        return need

    def _written_and_new(self, seq: Sequence, num_new_tokens: int) -> tuple[dict[int, int], int]:
        """({table index: block} of existing blocks written, number of blocks to add)."""
        table = self.tables[seq.seq_id]
        if num_new_tokens <= 0:
            return {}, 0
        start, end = seq.num_computed_tokens, seq.num_computed_tokens + num_new_tokens
        last = _cdiv(end, self.block_size)
        written = {i: table[i] for i in range(start // self.block_size, min(last, len(table)))}
        return written, max(0, last - len(table))

    def fork(self, parent_seq: Sequence, child_seq: Sequence) -> None:
        """The child shares every block of the parent (refcount + 1 each)."""
        if child_seq.seq_id in self.tables:
            raise RuntimeError(f"block manager bug: fork into existing seq {child_seq.seq_id}")
        table = self.tables[parent_seq.seq_id]
        pool = self._pool(parent_seq.seq_id)
        for block in table:
            pool.incref(block)
        self.tables[child_seq.seq_id] = list(table)
        if parent_seq.seq_id in self.swapped:
            self.swapped.add(child_seq.seq_id)
        if parent_seq.seq_id in self._hashed:
            self._hashed[child_seq.seq_id] = self._hashed[parent_seq.seq_id]

    def free(self, seq: Sequence) -> None:
        """Release the seq's blocks (device or cpu) and its table; no-op for an unknown seq."""
        table = self.tables.pop(seq.seq_id, None)
        if table is None:
            return
        pool = self._pool(seq.seq_id)
        self.swapped.discard(seq.seq_id)
        self._hashed.pop(seq.seq_id, None)
        # NOTE: tail blocks first, so the LRU evicts a prefix's tail before its head.
        for block in reversed(table):
            pool.decref(block)

    # -- swapping -------------------------------------------------------------------------------
    def can_swap_out(self, group: SequenceGroup) -> bool:
        return len(self._group_blocks(group, SequenceStatus.RUNNING)) <= self.cpu.num_free()

    def can_swap_in(self, group: SequenceGroup) -> bool:
        """Whether the group's blocks, and the slots of its next step, fit above the watermark.

        NOTE: counting the next step's blocks (as can_append_slots would) lets the scheduler call
        append_slots right after swap_in without preempting what it just resumed.
        """
        seqs = group.get_seqs(SequenceStatus.SWAPPED)
        need = len(self._group_blocks(group, SequenceStatus.SWAPPED)) + self._append_need(seqs, self.cpu)
        return self.device.num_free() - need >= self.watermark_blocks

    def swap_out(self, group: SequenceGroup) -> list[tuple[int, int]]:
        """Move the group's RUNNING seqs to the cpu pool; returns (device_block, cpu_block) pairs."""
        return self._move(group, SequenceStatus.RUNNING, self.device, self.cpu)

    def swap_in(self, group: SequenceGroup) -> list[tuple[int, int]]:
        """Move the group's SWAPPED seqs to the device pool; returns (cpu_block, device_block) pairs."""
        return self._move(group, SequenceStatus.SWAPPED, self.cpu, self.device)

    def _move(self, group: SequenceGroup, status: SequenceStatus,
              src: BlockAllocator, dst: BlockAllocator) -> list[tuple[int, int]]:
        # NOTE: all or nothing: check first; a block shared inside the group moves once (mapping).
        blocks = self._group_blocks(group, status)
        if len(blocks) > dst.num_free():
            raise RuntimeError(f"block manager bug: moving {group.request_id} needs {len(blocks)} "
                               f"{dst.name} blocks, {dst.num_free()} free")
        mapping: dict[int, int] = {}
        for seq in group.get_seqs(status):
            old = self.tables[seq.seq_id]
            new = []
            for block in old:
                if block in mapping:
                    dst.incref(mapping[block])
                else:
                    mapping[block] = dst.allocate()
                new.append(mapping[block])
            for block in reversed(old):
                src.decref(block)        # NOTE: a prefix-cached device block stays evictable
            self.tables[seq.seq_id] = new
            if dst is self.cpu:
                self.swapped.add(seq.seq_id)
            else:
                self.swapped.discard(seq.seq_id)
            self._hashed.pop(seq.seq_id, None)
        return list(mapping.items())

    def _group_blocks(self, group: SequenceGroup, status: SequenceStatus) -> set[int]:
        in_cpu = status == SequenceStatus.SWAPPED
        blocks = set()
        for seq in group.get_seqs(status):
            if seq.seq_id not in self.tables:
                raise RuntimeError(f"block manager bug: {status.name} seq {seq.seq_id} has no block table")
            if (seq.seq_id in self.swapped) != in_cpu:
                where = "cpu" if seq.seq_id in self.swapped else "device"
                raise RuntimeError(f"block manager bug: {status.name} seq {seq.seq_id} has its blocks on {where}")
            blocks.update(self.tables[seq.seq_id])
        return blocks

    def _device_table(self, seq: Sequence) -> list[int]:
        if seq.seq_id in self.swapped:
            raise RuntimeError(f"block manager bug: seq {seq.seq_id} is swapped out")
        return self.tables[seq.seq_id]

    def _pool(self, seq_id: int) -> BlockAllocator:
        return self.cpu if seq_id in self.swapped else self.device
