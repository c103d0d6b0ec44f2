"""The paged KV-cache manager: block tables, copy-on-write, fork, swapping, admission.

Pure bookkeeping (the paper, sections 4.2-4.5): no arrays live here. The scheduler asks what fits
(`can_*`), the manager updates block tables and returns the block copies (copy-on-write, swaps)
that the cache engine performs before the model runs, in the order interface.py gives.

Physical blocks live in two pools, `device` (the GPU, or the CPU backend's KV pool) and `cpu` (the
swap pool), each a BlockAllocator (block_allocator.py: one record per block, the free list); block
ids are 0..N-1 in each. Token i of a sequence lives in slot i % block_size of physical block
table[i // block_size]. Each sequence has one SeqBlocks record here: its table, the pool it is in,
and how much of it the prefix cache has seen.

Prefix caching (device pool only) is prefix_cache.py: a new request reuses every cached leading
full block of its tokens and computes only the rest; mark_computed registers full blocks as they
are computed; unreferenced cached blocks stay reusable until an allocation evicts them.
"""
from __future__ import annotations

from dataclasses import dataclass

from rawpaged.core.block_allocator import BlockAllocator
from rawpaged.core.interface import AllocStatus, SlotAccounting
from rawpaged.core.prefix_cache import PrefixCache
from rawpaged.errors import RawpagedError
from rawpaged.sequence import Sequence, SequenceGroup, SequenceStatus

__all__ = ["AllocStatus", "BlockSpaceManager", "SeqBlocks"]


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


@dataclass(eq=False)
class SeqBlocks:
    """One sequence's state in the manager."""
    seq: Sequence
    table: list[int]                # physical blocks, in token order
    pool: BlockAllocator            # where they are: the device pool, or the cpu pool while swapped out
    num_hashed: int = 0             # leading full blocks already offered to the prefix cache
    chain_hash: int | None = None   # the prefix cache's chain hash after them


class BlockSpaceManager:
    """The paged KVCacheManager (interface.py); see the module docstring."""

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
        self.prefix_cache = PrefixCache(self.device, block_size)
        self.watermark_blocks = int(watermark * num_device_blocks)
        self.enable_prefix_caching = enable_prefix_caching
        self.seqs: dict[int, SeqBlocks] = {}

    # -- counts ---------------------------------------------------------------------------------
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
        """Fraction of device blocks in use (idle cached blocks count as free)."""
        return 1.0 - self.device.num_free() / self.device.num_blocks

    @property
    def prefix_cache_queries(self) -> int:
        return self.prefix_cache.num_queries

    @property
    def prefix_cache_hits(self) -> int:
        return self.prefix_cache.num_hits

    def get_block_table(self, seq: Sequence) -> list[int]:
        return list(self.seqs[seq.seq_id].table)

    def slot_accounting(self) -> SlotAccounting:
        """The device pool's slots (interface.SlotAccounting). O(sequences).

        A table covers its sequence's tokens, so only a sequence's last block can be partly
        filled; a last block shared by forks is counted once (its fullest sharer decides).
        """
        bs, dev = self.block_size, self.device
        empty: dict[int, int] = {}                     # last block -> its empty slots
        for s in self.seqs.values():
            if s.pool is dev and s.table:
                # NOTE: a token just sampled past the table's end has no slot yet: clamp at 0.
                tail = max(0, len(s.table) * bs - s.seq.num_tokens)
                empty[s.table[-1]] = min(empty.get(s.table[-1], bs), tail)
        internal = sum(empty.values())
        return SlotAccounting(total=dev.num_blocks * bs, real_tokens=dev.num_in_use * bs - internal,
                              reserved_unused=0, internal_fragmentation=internal,
                              external_fragmentation=0, free=dev.num_free() * bs)

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
                if seq.seq_id in self.seqs:
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
                self.prefix_cache.count(self._num_cacheable(len(tokens)), len(hits))
            for block in hits:
                self.device.incref(block)
            num_new = _cdiv(len(tokens), self.block_size) - len(hits)
            table = hits + [self._new_block(self.device) for _ in range(num_new)]
            for i, seq in enumerate(seqs):
                if i > 0:                                  # identical tokens: share every block
                    for block in table:
                        self.device.incref(block)
                self.seqs[seq.seq_id] = SeqBlocks(seq, list(table), self.device, len(hits), h)
                seq.num_computed_tokens = len(hits) * self.block_size

    def _distinct_waiting(self, group: SequenceGroup) -> list[list[Sequence]]:
        by_tokens: dict[tuple[int, ...], list[Sequence]] = {}
        for seq in group.get_seqs(SequenceStatus.WAITING):
            by_tokens.setdefault(tuple(seq.get_token_ids()), []).append(seq)
        return list(by_tokens.values())

    def _blocks_needed(self, distinct: list[list[Sequence]], use_cache: bool = True) -> tuple[int, int]:
        """(blocks without any cache hit, blocks taken from the free + idle count)."""
        total, new, hit_blocks = 0, 0, set()
        for seqs in distinct:
            n = _cdiv(seqs[0].num_tokens, self.block_size)
            hits, _ = self._cached_prefix(seqs[0].get_token_ids(), use_cache)
            total += n
            new += n - len(hits)
            hit_blocks.update(hits)
        # NOTE: an idle hit is in use again, so it costs a free block too.
        return total, new + sum(1 for b in hit_blocks if self.device.blocks[b].ref_count == 0)

    def _num_cacheable(self, num_tokens: int) -> int:
        # Full blocks that do not hold the last token (which is always recomputed).
        return max(0, (num_tokens - 1) // self.block_size)

    def _cached_prefix(self, token_ids: list[int], use_cache: bool = True) -> tuple[list[int], int | None]:
        """The cached device blocks holding the leading full blocks of token_ids, and the chain hash."""
        if not (self.enable_prefix_caching and use_cache):
            return [], None
        return self.prefix_cache.match(token_ids, self._num_cacheable(len(token_ids)))

    # -- prefix cache ---------------------------------------------------------------------------
    def mark_computed(self, seq: Sequence) -> None:
        """After a step: offer the seq's new full, computed blocks to the prefix cache.

        NOTE: the table may switch a block to a cached twin (see PrefixCache.register_full_blocks).
        """
        s = self.seqs.get(seq.seq_id)
        if not self.enable_prefix_caching or s is None or s.pool is not self.device:
            return
        bs = self.block_size
        num_full = min(seq.num_computed_tokens // bs, len(s.table))
        if num_full <= s.num_hashed:
            return
        chunks = [tuple(seq.get_token_ids_range(i * bs, (i + 1) * bs)) for i in range(s.num_hashed, num_full)]
        s.chain_hash = self.prefix_cache.register_full_blocks(s.table, s.num_hashed, chunks, s.chain_hash)
        s.num_hashed = num_full

    def reset_prefix_cache(self) -> None:
        """Forget every cached block (blocks in use stay with their sequences)."""
        self.prefix_cache.reset()
        for s in self.seqs.values():
            s.num_hashed, s.chain_hash = 0, None

    # -- decoding -------------------------------------------------------------------------------
    def can_append_slots(self, group: SequenceGroup) -> bool:
        """Whether every RUNNING seq of the group can get slots for all its uncomputed tokens."""
        return self._append_need(group.get_seqs(SequenceStatus.RUNNING), self.device) <= self.device.num_free()

    def can_append_slots_all(self, groups, lookahead: int) -> bool:
        """Whether every RUNNING seq of these groups can get slots for all its uncomputed tokens and
        `lookahead` more (multi-step decoding: the tokens one call feeds back), all at once (blocks
        they share counted once). The paged manager's own: the scheduler's _lookahead."""
        seqs = [s for g in groups for s in g.get_seqs(SequenceStatus.RUNNING)]
        return self._append_need(seqs, self.device, lookahead) <= self.device.num_free()

    def append_slots(self, seq: Sequence, num_new_tokens: int) -> list[tuple[int, int]]:
        """Slots for tokens num_computed_tokens.. +num_new_tokens; returns copy-on-write (src, dst) pairs.

        A shared block written this step is first copied to a private one. NOTE: a prefix-cached block
        this seq owns alone (only when the engine recomputes registered tokens) leaves the cache and is
        rewritten in place: no copy, and no other seq can pick it up before the write.
        """
        s, dev = self._on_device(seq), self.device
        written, new = self._written_and_new(seq, s.table, num_new_tokens)
        shared = [i for i, b in written.items() if dev.blocks[b].ref_count > 1]
        if len(shared) + new > dev.num_free():
            raise RuntimeError(f"block manager bug: append_slots(seq {seq.seq_id}) needs "
                               f"{len(shared) + new} device blocks, {dev.num_free()} free")
        copies = []
        for i, block in written.items():
            if dev.blocks[block].ref_count > 1:
                s.table[i] = self._new_block(dev)
                self._release(dev, block)
                copies.append((block, s.table[i]))
            elif dev.blocks[block].is_cached:
                self.prefix_cache.uncache(block)
        if written and min(written) < s.num_hashed:
            s.num_hashed, s.chain_hash = 0, None     # registered positions are rewritten: rehash from the start
        s.table.extend(self._new_block(dev) for _ in range(new))
        return copies

    def _append_need(self, seqs: list[Sequence], pool: BlockAllocator, lookahead: int = 0) -> int:
        """Device blocks that append_slots needs to give every seq all its uncomputed tokens (and
        `lookahead` more each)."""
        need, remaining = 0, {}
        for seq in seqs:
            table = self.seqs[seq.seq_id].table
            written, new = self._written_and_new(seq, table, seq.num_tokens - seq.num_computed_tokens + lookahead)
            for block in written.values():
                r = remaining.get(block, pool.blocks[block].ref_count)
                if r > 1:                   # copy-on-write, unless the other holders copied first
                    need += 1
                    remaining[block] = r - 1
            need += new
        return need

    def _written_and_new(self, seq: Sequence, table: list[int], num_new_tokens: int) -> tuple[dict[int, int], int]:
        """({table index: block} of existing blocks written, number of blocks to add)."""
        if num_new_tokens <= 0:
            return {}, 0
        start = seq.num_computed_tokens
        last = _cdiv(start + num_new_tokens, self.block_size)
        written = {i: table[i] for i in range(start // self.block_size, min(last, len(table)))}
        return written, max(0, last - len(table))

    def fork(self, parent_seq: Sequence, child_seq: Sequence) -> None:
        """The child shares every block of the parent (ref_count + 1 each)."""
        if child_seq.seq_id in self.seqs:
            raise RuntimeError(f"block manager bug: fork into existing seq {child_seq.seq_id}")
        parent = self.seqs[parent_seq.seq_id]
        for block in parent.table:
            parent.pool.incref(block)
        self.seqs[child_seq.seq_id] = SeqBlocks(child_seq, list(parent.table), parent.pool,
                                                parent.num_hashed, parent.chain_hash)

    def free(self, seq: Sequence) -> None:
        """Release the seq's blocks (device or cpu) and its table; no-op for an unknown seq."""
        s = self.seqs.pop(seq.seq_id, None)
        if s is None:
            return
        # NOTE: tail blocks first, so the LRU evicts a prefix's tail before its head.
        for block in reversed(s.table):
            self._release(s.pool, block)

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
            s = self.seqs[seq.seq_id]
            new = []
            for block in s.table:
                if block in mapping:
                    dst.incref(mapping[block])
                else:
                    mapping[block] = self._new_block(dst)
                new.append(mapping[block])
            for block in reversed(s.table):
                self._release(src, block)        # NOTE: a prefix-cached device block stays idle
            s.table, s.pool, s.num_hashed, s.chain_hash = new, dst, 0, None
        return list(mapping.items())

    def _group_blocks(self, group: SequenceGroup, status: SequenceStatus) -> set[int]:
        want = self.cpu if status == SequenceStatus.SWAPPED else self.device
        blocks = set()
        for seq in group.get_seqs(status):
            s = self.seqs.get(seq.seq_id)
            if s is None:
                raise RuntimeError(f"block manager bug: {status.name} seq {seq.seq_id} has no block table")
            if s.pool is not want:
                raise RuntimeError(f"block manager bug: {status.name} seq {seq.seq_id} "
                                   f"has its blocks on {s.pool.name}")
            blocks.update(s.table)
        return blocks

    # -- helpers --------------------------------------------------------------------------------
    def _on_device(self, seq: Sequence) -> SeqBlocks:
        s = self.seqs[seq.seq_id]
        if s.pool is not self.device:
            raise RuntimeError(f"block manager bug: seq {seq.seq_id} is swapped out")
        return s

    def _new_block(self, pool: BlockAllocator) -> int:
        """A block with ref_count 1; evicts the least recently used idle cached block if needed."""
        if pool is self.device and not pool.free_ids and pool.num_idle():
            self.prefix_cache.evict()
        return pool.allocate()

    def _release(self, pool: BlockAllocator, block: int) -> None:
        if pool is self.device:
            self.prefix_cache.release(block)     # NOTE: a cached block turns idle, not free
        else:
            pool.decref(block)
