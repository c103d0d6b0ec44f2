"""The paper's Orca baselines: one contiguous reservation per sequence, made at admission.

Orca (Yu et al., OSDI 2022) as the PagedAttention paper (section 6.1) models it: each sequence
reserves, when its request is admitted, one contiguous range of KV slots for its prompt and every
token it may generate, placed by a buddy allocator ("We assume Orca uses the buddy allocation
algorithm to determine the memory address to store KV cache"). The policies differ in how much they
reserve for the output (the paper's three versions "based on how much it over-reserves the space for
request outputs"):
  - max:    "always reserves the space up to the maximum sequence length of the model, i.e., 2048
            tokens": max_model_len in all, whatever the request;
  - pow2:   "over-reserves the space for outputs by at most 2x. For example, if the true output
            length is 25, it reserves 32 positions for outputs": prompt + the next power of two of
            the output (at most max_model_len in all);
  - oracle: "has the knowledge of the lengths of the outputs that will be actually generated":
            prompt + exactly the output.
The real output is max_tokens, capped so that prompt + output <= max_model_len (max_tokens None:
up to max_model_len). The allocator then places the reservation: `buddy` (the default, the paper's)
rounds it up to a power of two of allocation units, `first-fit` (contiguous.py) takes exactly it.
The buddy's rounding is allocated memory no token fills: SlotAccounting counts it as internal
fragmentation (the interface's definition), and allocator_rounding() reports it on its own (the
paper's Fig. 2 draws it with external fragmentation: "external fragmentation from the memory
allocator like the buddy allocator", its section 3).
NOTE: the reproduction runs requests with ignore_eos=True and max_tokens = the workload's output
length, so that is exact there. A request that may stop earlier (EOS, a stop string) cannot be known
in advance: "oracle" then reserves its longest possible length, an upper bound, and the accounting
counts the part it never fills as reserved_unused while it runs (interface.SlotAccounting).

Nothing is shared: identical waiting sequences, parallel samples and beams each hold their own range,
and there is no prefix cache. A request reserves at admission one range for each sequence it will run
at once (best_of samples, the beam width), so it never needs memory afterwards: can_append_slots is
true after admission, the scheduler never preempts, and swapping is unsupported (can_swap_out is
false, so the scheduler would fall back to recompute; it never gets there).

fork(parent, child) is copy-on-write without sharing: the child reads the parent's range until its
first append_slots, which gives it one of the request's spare ranges and returns the copy of the
parent's computed blocks, as the paged manager returns a copy-on-write. NOTE: taking the range
lazily matters for beam search: the output processor forks a step's new beams before it drops the
beams nobody continues, and a dropped beam's range is what the next fork takes. A range someone is
copying from is released only after that step ran (mark_computed), so no step both reads and writes it.

Units: the pool is num_device_blocks * block_size slots cut into allocation units of `granularity`
tokens (the allocator hands out units). A unit that is a multiple of block_size keeps ranges aligned
to the cache's blocks, so a range is a run of consecutive blocks: the engine's kernels read it through
an ordinary block table (the rounding to whole units is internal fragmentation). Any other unit
(1 = Orca's own token granularity) gives tables whose "blocks" are units: only for an executor that
never reads the KV cache through block tables (the simulator); the factory (kv_managers.py) checks.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from rawpaged.core.buddy import BuddyAllocator
from rawpaged.core.contiguous import ContiguousAllocator, Run
from rawpaged.core.interface import AllocStatus, SlotAccounting
from rawpaged.errors import RawpagedError
from rawpaged.sequence import Sequence, SequenceGroup, SequenceStatus

POLICIES = ("max", "pow2", "oracle")
ALLOCATORS = {"buddy": BuddyAllocator, "first-fit": ContiguousAllocator}


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


@dataclass(eq=False)
class Reservation:
    """One contiguous range, and the sequences reading it."""
    run: Run                                  # in allocation units
    final_len: int                            # tokens its sequence reaches when it finishes
    readers: list[int] = field(default_factory=list)   # seq ids: its owner, forks not yet copied
    spare: bool = False                       # reserved for a fork to come (no owner yet)


@dataclass(eq=False)
class OrcaGroup:
    """A request's ranges: `live` sequences hold or wait for one; spares wait for forks."""
    units: int                                # units per range
    final_len: int
    recycles: bool                            # beam search: a dropped beam's range serves the next fork
    live: int = 0
    spares: list[Reservation] = field(default_factory=list)


@dataclass(eq=False)
class OrcaSeq:
    seq: Sequence
    group: OrcaGroup
    res: Reservation | None                   # its own range (None: a fork before its first append)
    src: Reservation | None = None            # a fork's parent range, until the copy from it ran


class OrcaManager:
    """A KVCacheManager (interface.py) with Orca's contiguous reservations; see the module docstring."""

    def __init__(self, policy: str, block_size: int, num_device_blocks: int, max_model_len: int,
                 granularity: int | None = None, allocator: str = "buddy"):
        if policy not in POLICIES:
            raise RawpagedError(f"Orca policy must be one of {', '.join(POLICIES)}, got {policy!r}")
        if allocator not in ALLOCATORS:
            raise RawpagedError(f"orca_allocator must be one of {', '.join(ALLOCATORS)}, got {allocator!r}")
        if block_size < 1 or num_device_blocks < 1:
            raise RawpagedError(f"the KV cache holds no slot (block_size={block_size}, "
                                f"num_device_blocks={num_device_blocks})")
        g = block_size if granularity is None else granularity
        if g < 1:
            raise RawpagedError(f"orca_granularity must be >= 1 token, got {g}")
        self.policy = policy
        self.granularity = g
        # NOTE: a table's blocks are the cache's blocks when units are whole blocks, else the units.
        self.block_size = block_size if g % block_size == 0 else g
        self.blocks_per_unit = g // self.block_size
        self.max_model_len = max_model_len
        self.allocator = allocator
        num_units = num_device_blocks * block_size // g
        self.alloc = ALLOCATORS[allocator](num_units) if num_units >= 1 else None
        if self.alloc is None or not self.alloc.fits_in_empty([_cdiv(max_model_len, g)]):
            raise RawpagedError(f"one sequence of max_model_len={max_model_len} tokens does not fit in "
                                f"{num_units} units of {g} tokens ({allocator} allocator): lower "
                                f"max_model_len or orca_granularity")
        self._rounding = 0            # units the allocator added to the live ranges (buddy: to a power of two)
        self.watermark_blocks = 0     # NOTE: nothing to protect: a reservation covers the whole output
        self.seqs: dict[int, OrcaSeq] = {}
        self.reservations: dict[int, Reservation] = {}     # run start -> every live range

    # -- counts ---------------------------------------------------------------------------------
    @property
    def num_device_blocks(self) -> int:
        return self.alloc.num_units * self.blocks_per_unit

    @property
    def num_cpu_blocks(self) -> int:
        return 0

    def get_num_free_device_blocks(self) -> int:
        """Blocks of the largest free range: what the next reservation can take."""
        return self.alloc.largest_free_run() * self.blocks_per_unit

    def get_num_free_cpu_blocks(self) -> int:
        return 0

    def usage(self) -> float:
        """Fraction of the pool held by reservations (gaps between them are not held)."""
        return 1.0 - self.alloc.num_free() / self.alloc.num_units

    @property
    def prefix_cache_queries(self) -> int:
        return 0

    @property
    def prefix_cache_hits(self) -> int:
        return 0

    def reset_prefix_cache(self) -> None:
        pass

    def get_block_table(self, seq: Sequence) -> list[int]:
        """The consecutive blocks of seq's range that its tokens reach (a fork: its parent's range)."""
        s = self.seqs[seq.seq_id]
        res = s.res or s.src
        first = res.run.start * self.blocks_per_unit
        n = min(_cdiv(seq.num_tokens, self.block_size), res.run.length * self.blocks_per_unit)
        return list(range(first, first + n))

    def allocator_rounding(self) -> int:
        """Slots of the live ranges beyond what their reservations asked for (whole units): the buddy
        allocator's rounding to a power of two (first-fit: 0). SlotAccounting counts them as
        internal fragmentation; the paper's Fig. 2 draws them with external fragmentation."""
        return self._rounding * self.granularity

    def slot_accounting(self) -> SlotAccounting:
        """The pool's slots (interface.SlotAccounting). O(sequences + ranges + gaps).

        A range holds real tokens up to the longest sequence it serves (an owner and the forks still
        reading it share them), is reserved up to the final length, and is internal fragmentation
        beyond it (the policy's over-reservation, the rounding to whole units and the allocator's rounding). A spare range is
        reserved up to the final length of the fork it waits for; a range only a pending copy still
        reads is all internal. External fragmentation: the free slots outside the largest free range.
        """
        g = self.granularity
        longest: dict[int, int] = {}                      # run start -> tokens of its longest reader
        for s in self.seqs.values():
            res = s.res or s.src
            longest[res.run.start] = max(longest.get(res.run.start, 0), s.seq.num_tokens)
        real = reserved = internal = 0
        for start, res in self.reservations.items():
            slots = res.run.length * g
            if start in longest:
                r = min(longest[start], slots)
                left = max(0, min(res.final_len, slots) - r)
            else:
                r, left = 0, (min(res.final_len, slots) if res.spare else 0)
            real, reserved, internal = real + r, reserved + left, internal + slots - r - left
        free = self.alloc.largest_free_run() * g
        return SlotAccounting(total=self.alloc.num_units * g, real_tokens=real, reserved_unused=reserved,
                              internal_fragmentation=internal,
                              external_fragmentation=self.alloc.num_free() * g - free, free=free)

    # -- what a request reserves ----------------------------------------------------------------
    def final_len(self, group: SequenceGroup) -> int:
        """The length each sequence of the group reaches: prompt + max_tokens, at most max_model_len."""
        max_tokens = group.sampling_params.max_tokens
        if max_tokens is None:
            return self.max_model_len
        return min(self.max_model_len, group.seqs[0].num_prompt_tokens + max_tokens)

    def reserved_len(self, group: SequenceGroup) -> int:
        """Tokens the policy reserves for each sequence of the group (before the allocator's rounding):
        the prompt and the output, the output over-reserved as the module docstring says."""
        final = self.final_len(group)
        if self.policy == "max":
            return self.max_model_len
        if self.policy == "pow2":
            prompt = group.seqs[0].num_prompt_tokens
            output = final - prompt
            return min(self.max_model_len, prompt + (1 << (output - 1).bit_length())) if output > 0 else final
        return final

    def _width(self, group: SequenceGroup) -> int:
        return max(group.num_seqs(SequenceStatus.WAITING), group.max_num_running_seqs())

    def _units(self, group: SequenceGroup) -> int:
        return _cdiv(self.reserved_len(group), self.granularity)

    # -- admission ------------------------------------------------------------------------------
    def can_allocate(self, group: SequenceGroup) -> AllocStatus:
        """Whether one range per sequence the group will run at once fits: NEVER if not in an empty
        pool, LATER if no gaps take them now."""
        width, units = self._width(group), self._units(group)
        if not self.alloc.fits_in_empty([units] * width):
            return AllocStatus.NEVER
        return AllocStatus.OK if self.alloc.can_allocate_all([units] * width) else AllocStatus.LATER

    def allocate(self, group: SequenceGroup) -> None:
        """A range for each WAITING sequence, and spares for the forks to come (best_of, beams)."""
        waiting = group.get_seqs(SequenceStatus.WAITING)
        for seq in waiting:
            if seq.seq_id in self.seqs:
                raise RuntimeError(f"Orca manager bug: seq {seq.seq_id} allocated twice")
        width, units = self._width(group), self._units(group)
        if not self.alloc.can_allocate_all([units] * width):
            raise RuntimeError(f"Orca manager bug: allocate({group.request_id}) needs {width} ranges of "
                               f"{units} units, the largest gap has {self.alloc.largest_free_run()}")
        og = OrcaGroup(units, self.final_len(group), recycles=group.sampling_params.use_beam_search,
                       live=len(waiting))
        for i in range(width):
            res = self._reserve(og)
            if i < len(waiting):
                res.readers.append(waiting[i].seq_id)
                self.seqs[waiting[i].seq_id] = OrcaSeq(waiting[i], og, res)
                waiting[i].num_computed_tokens = 0
            else:
                res.spare = True
                og.spares.append(res)

    def _reserve(self, og: OrcaGroup) -> Reservation:
        run = self.alloc.allocate(og.units)
        if run is None:
            raise RuntimeError(f"Orca manager bug: no gap of {og.units} units for a reserved range")
        res = Reservation(run, og.final_len)
        self.reservations[run.start] = res
        self._rounding += run.length - og.units
        return res

    # -- decoding -------------------------------------------------------------------------------
    def can_append_slots(self, group: SequenceGroup) -> bool:
        """True after admission: each forked sequence takes one of its request's spare ranges.
        O(the group's sequences)."""
        pending = [self.seqs[seq.seq_id] for seq in group.get_seqs(SequenceStatus.RUNNING)
                   if self.seqs[seq.seq_id].res is None]
        if not pending:
            return True
        og = pending[0].group
        short = len(pending) - len(og.spares)
        return short <= 0 or self.alloc.can_allocate_all([og.units] * short)

    def append_slots(self, seq: Sequence, num_new_tokens: int) -> list[tuple[int, int]]:
        """Nothing to allocate (the range covers the whole output), except a fork's first append: its
        own range, and the (src, dst) block copies of the parent's computed tokens."""
        s = self.seqs[seq.seq_id]
        copies = self._take_own_range(s) if s.res is None else []
        end = seq.num_computed_tokens + num_new_tokens
        if end > s.group.units * self.granularity:
            raise RuntimeError(f"Orca manager bug: seq {seq.seq_id} writes token {end - 1} past its "
                               f"reservation of {s.group.units * self.granularity} slots")
        return copies

    def _take_own_range(self, s: OrcaSeq) -> list[tuple[int, int]]:
        og = s.group
        res = og.spares.pop() if og.spares else self._reserve(og)
        res.spare = False
        res.readers.append(s.seq.seq_id)
        s.res = res
        # NOTE: s.src stays a reader until mark_computed: the copy runs in this step.
        n = _cdiv(s.seq.num_computed_tokens, self.block_size)
        src = s.src.run.start * self.blocks_per_unit
        dst = res.run.start * self.blocks_per_unit
        return [(src + i, dst + i) for i in range(n)]

    def fork(self, parent_seq: Sequence, child_seq: Sequence) -> None:
        """The child reads the parent's range until its first append_slots copies it (see above)."""
        if child_seq.seq_id in self.seqs:
            raise RuntimeError(f"Orca manager bug: fork into existing seq {child_seq.seq_id}")
        parent = self.seqs[parent_seq.seq_id]
        if parent.res is None:
            raise RuntimeError(f"Orca manager bug: fork of seq {parent_seq.seq_id}, which has no range yet")
        parent.res.readers.append(child_seq.seq_id)
        parent.group.live += 1
        self.seqs[child_seq.seq_id] = OrcaSeq(child_seq, parent.group, None, src=parent.res)

    def mark_computed(self, seq: Sequence) -> None:
        """After a step: a fork's copy from its parent's range has run; stop reading that range."""
        s = self.seqs.get(seq.seq_id)
        if s is not None and s.res is not None and s.src is not None:
            self._unread(s.src, s)
            s.src = None

    def free(self, seq: Sequence) -> None:
        """Release seq's range; a request's spares go when its last sequence does."""
        s = self.seqs.pop(seq.seq_id, None)
        if s is None:
            return
        og = s.group
        og.live -= 1
        for res in (s.res, s.src):
            if res is not None:
                self._unread(res, s)
        if og.live == 0:
            for res in og.spares:
                self._release(res, og.units)
            og.spares.clear()

    def _unread(self, res: Reservation, s: OrcaSeq) -> None:
        res.readers.remove(s.seq.seq_id)
        if res.readers:
            return
        og = s.group
        if og.recycles and og.live > 0:          # beam search: the next fork takes it
            res.spare = True
            og.spares.append(res)
        else:
            self._release(res, og.units)

    def _release(self, res: Reservation, units: int) -> None:
        del self.reservations[res.run.start]
        self._rounding -= res.run.length - units
        self.alloc.free(res.run)

    # -- swapping: unsupported (Orca never preempts) ----------------------------------------------
    def can_swap_out(self, group: SequenceGroup) -> bool:
        return False

    def swap_out(self, group: SequenceGroup) -> list[tuple[int, int]]:
        raise RuntimeError("Orca managers do not swap (can_swap_out is False)")

    def can_swap_in(self, group: SequenceGroup) -> bool:
        return False

    def swap_in(self, group: SequenceGroup) -> list[tuple[int, int]]:
        raise RuntimeError("Orca managers do not swap (can_swap_in is False)")
