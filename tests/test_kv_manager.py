"""The KV-manager interface: the paged manager implements it, its slot accounting, its hot path."""
from __future__ import annotations

import inspect

import pytest
import test_block_manager as tbm
from hypothesis.stateful import invariant

from rawpaged.core.block_manager import BlockSpaceManager
from rawpaged.core.interface import KVCacheManager, SlotAccounting
from rawpaged.sequence import SequenceStatus, next_seq_id

RUNNING = SequenceStatus.RUNNING
admit, compute, make_group = tbm.admit, tbm.compute, tbm.make_group


def protocol_members() -> list[str]:
    return sorted(n for n in dir(KVCacheManager) if not n.startswith("_")
                  and n not in dir(object)) + sorted(KVCacheManager.__annotations__)


def test_the_paged_manager_implements_the_interface():
    bm = BlockSpaceManager(block_size=4, num_device_blocks=8, num_cpu_blocks=2)
    assert isinstance(bm, KVCacheManager)
    assert {"can_allocate", "append_slots", "swap_in", "slot_accounting", "block_size"} <= set(protocol_members())
    for name in protocol_members():
        want = inspect.getattr_static(KVCacheManager, name, None)
        got = inspect.getattr_static(BlockSpaceManager, name, None)
        if callable(want):                                # same parameters, same names
            assert list(inspect.signature(got).parameters) == list(inspect.signature(want).parameters), name
        elif isinstance(want, property):
            assert isinstance(got, property), name
        else:
            assert hasattr(bm, name), name


def fork(bm, group, parent):
    child = parent.fork(next_seq_id())
    group.add(child)
    bm.fork(parent, child)
    return child


def test_accounting_of_a_hand_worked_example():
    """block_size 4, 16 device blocks (64 slots), prefix caching on; the numbers worked by hand."""
    bm = BlockSpaceManager(block_size=4, num_device_blocks=16, num_cpu_blocks=0)
    a = make_group(range(10))
    admit(bm, a)
    compute(bm, a.seqs[0])
    seq_a = a.seqs[0]
    seq_b = fork(bm, a, seq_a)
    seq_a.append_token(100, 0.0)
    seq_b.append_token(200, 0.0)
    # 3 blocks in use = 12 slots: the two full blocks (8 tokens), the shared last one holds tokens
    # 8, 9 and slot 10 handed to both samples' token 10: 1 empty slot, counted once.
    acct = bm.slot_accounting()
    assert acct == SlotAccounting(total=64, real_tokens=11, reserved_unused=0, internal_fragmentation=1,
                                  external_fragmentation=0, free=13 * 4)
    assert (acct.internal_fragmentation, acct.allocated) == (1, 12)
    # Both compute token 10: A copies the shared last block on write, B keeps the original.
    compute(bm, seq_a)
    compute(bm, seq_b)
    # C: prompt 0..7 hits the cached block of tokens 0..3 and computes 4..7 in a new block.
    c = make_group(range(8))
    admit(bm, c)
    assert c.seqs[0].num_computed_tokens == 4
    # D: prompt 50..54 computed (block 50..53 cached) then freed: one idle cached block + one free.
    d = make_group(range(50, 55))
    admit(bm, d)
    compute(bm, d.seqs[0])
    bm.free(d.seqs[0])
    # In use: 2 shared full blocks (A, B, C), A's and B's tails (11 tokens in 12 slots: 1 empty
    # each), C's second block (full): 5 blocks, 20 slots, 2 empty. Free: 11 blocks (D's idle one too).
    acct = bm.slot_accounting()
    assert acct == SlotAccounting(total=64, real_tokens=18, reserved_unused=0, internal_fragmentation=2,
                                  external_fragmentation=0, free=44)
    assert (acct.allocated, acct.wasted) == (20, 2)
    assert acct.free == bm.get_num_free_device_blocks() * 4 and bm.usage() == acct.allocated / acct.total


def test_a_token_without_a_slot_is_not_counted_as_one():
    """A token sampled when its sequence's blocks are full gets a slot at the next append_slots."""
    bm = BlockSpaceManager(block_size=4, num_device_blocks=4, num_cpu_blocks=0)
    g = make_group(range(8))
    admit(bm, g)
    compute(bm, g.seqs[0])
    g.seqs[0].append_token(8, 0.0)                        # 9 tokens, 8 slots
    acct = bm.slot_accounting()
    assert (acct.real_tokens, acct.internal_fragmentation, acct.free) == (8, 0, 8)
    compute(bm, g.seqs[0])                                # the 9th token's block: 3 empty slots
    acct = bm.slot_accounting()
    assert (acct.real_tokens, acct.internal_fragmentation, acct.free) == (9, 3, 4)


def test_swapped_sequences_hold_no_device_slots():
    bm = BlockSpaceManager(block_size=4, num_device_blocks=8, num_cpu_blocks=8, enable_prefix_caching=False)
    g = make_group(range(6))
    admit(bm, g)
    compute(bm, g.seqs[0])
    assert bm.slot_accounting().internal_fragmentation == 2
    bm.swap_out(g)
    g.seqs[0].status = SequenceStatus.SWAPPED
    assert bm.slot_accounting() == SlotAccounting(32, 0, 0, 0, 0, 32)


class CountingList(list):
    """A list that counts element reads (to show an operation does not walk the pool)."""

    def __init__(self, items):
        super().__init__(items)
        self.reads = 0

    def __getitem__(self, i):
        self.reads += 1
        return super().__getitem__(i)

    def __iter__(self):
        self.reads += len(self)
        return super().__iter__()


def test_the_decode_path_touches_blocks_not_the_pool():
    bm = BlockSpaceManager(block_size=4, num_device_blocks=50_000, num_cpu_blocks=0)
    bm.device.blocks = bm.prefix_cache.pool.blocks = CountingList(bm.device.blocks)
    groups = [make_group(range(i, i + 30)) for i in range(0, 300, 30)]
    for g in groups:
        admit(bm, g)
        compute(bm, g.seqs[0])
    fork(bm, groups[0], groups[0].seqs[0])
    for step in range(12):                                # 12 decode steps of 11 sequences
        bm.device.blocks.reads = 0
        for g in groups:
            assert bm.can_append_slots(g)
            for seq in g.seqs:
                seq.append_token(step, 0.0)
                compute(bm, seq)
        bm.slot_accounting()
        bm.usage()
        bm.get_num_free_device_blocks()
        assert bm.device.blocks.reads < 20 * 11, step     # a few records per sequence, not 50,000


class AccountingMachine(tbm.BlockManagerMachine):
    """The block manager's state machine, checking the slot accounting after every step."""

    @invariant()
    def slots_add_up(self):
        bm, bs = self.bm, self.bs
        acct = bm.slot_accounting()
        running = [s for _, s in self.seqs(RUNNING)]
        slots = set()                                     # (block, slot) handed to some token
        for seq in running:
            table = bm.get_block_table(seq)
            for p in range(min(seq.num_tokens, len(table) * bs)):
                slots.add((table[p // bs], p % bs))
        assert acct.total == bm.num_device_blocks * bs
        assert acct.real_tokens == len(slots)
        assert acct.free == bm.get_num_free_device_blocks() * bs
        assert acct.reserved_unused == acct.external_fragmentation == 0
        assert acct.internal_fragmentation >= 0
        assert acct.total == acct.real_tokens + acct.wasted + acct.free


AccountingMachine.TestCase.settings = tbm._settings(60)
test_slot_accounting_state_machine = AccountingMachine.TestCase
