"""A shared-memory collective for the CPU backend: the ranks of one node map one file in /dev/shm.

Layout of the file (created by rank 0, unlinked as soon as every rank has mapped it):

    header  int64[512]            [0] abort flag, [1 + r] rank r joined, [64 + r] rank r's round
    slots   uint8[2, size, SLOT]  two buffers of one SLOT-byte slot per rank

A collective is a sequence of rounds, one per SLOT-sized chunk. In round k every rank copies its
chunk into its slot of buffer k % 2, then publishes k as its round and waits until every rank has
published k; then it reads the slots it needs (all of them for an all-reduce, rank 0 for a gather).
Two buffers make one wait per round enough: a rank writes buffer k % 2 again in round k + 2 only
after every rank has published k + 1, which each does only after it finished reading round k.

An all-reduce sums the slots in rank order on every rank, so every rank gets the same bits (the
hidden state stays identical across ranks, as it must).

NOTE: each slot is written by one process and read by others after it publishes its round; x86 keeps
stores in order (TSO), and a SLOT of 1 MiB stays below the sizes where memcpy switches to
non-temporal stores (which x86 may reorder). Weakly ordered CPUs (ARM) are not supported here.
"""
from __future__ import annotations

import os
import tempfile
import time
import uuid
from typing import Callable

import numpy as np

from rawpaged.distributed import CommAborted, CommSpec
from rawpaged.errors import RawpagedError

SLOT = 1 << 20                 # bytes per rank per round
HEADER = 512                   # int64 words
MAX_RANKS = 63
JOIN_TIMEOUT_S = 600.0         # every rank maps the file within this long (they load weights first)


def _shm_dir() -> str:
    return "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else tempfile.gettempdir()


def create_spec(size: int) -> CommSpec:
    if not 1 <= size <= MAX_RANKS:
        raise RawpagedError(f"the shared-memory collective takes 1 to {MAX_RANKS} ranks, got {size}")
    path = os.path.join(_shm_dir(), f"rawpaged-tp-{os.getpid()}-{uuid.uuid4().hex[:12]}")
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.ftruncate(fd, HEADER * 8 + 2 * size * SLOT)       # sparse: pages appear when written
    finally:
        os.close(fd)
    return CommSpec("shm", size, path)


class ShmCommunicator:
    def __init__(self, spec: CommSpec, rank: int, alive: Callable[[], bool] | None = None):
        self.rank, self.size, self.path = rank, spec.size, spec.address
        self.alive = alive
        try:
            mm = np.memmap(self.path, dtype=np.uint8, mode="r+")
        except OSError as e:
            raise RawpagedError(f"rank {rank} cannot map the shared-memory collective {self.path}: "
                                f"{e.strerror or e} (are all ranks on one node?)") from None
        self._mm = mm
        self._header = mm[:HEADER * 8].view(np.int64)
        self._rounds = self._header[64:64 + self.size]
        self._slots = mm[HEADER * 8:].reshape(2, self.size, SLOT)
        self.round = 0
        self._join()

    # -- setup ------------------------------------------------------------------------------------
    def _join(self) -> None:
        """Every rank marks itself joined and waits for the others; rank 0 then unlinks the file
        (the mappings stay), so nothing is left in /dev/shm whatever happens later."""
        self._header[1 + self.rank] = 1
        deadline = time.monotonic() + JOIN_TIMEOUT_S
        while self._header[1:1 + self.size].min() < 1:
            self._check(deadline, "joining")
            time.sleep(0.001)
        if self.rank == 0:
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass

    # -- collectives ------------------------------------------------------------------------------
    def all_reduce(self, x: np.ndarray) -> np.ndarray:
        """Sum of x over the ranks (float32 arrays of one shape on every rank)."""
        flat = np.ascontiguousarray(x).reshape(-1)
        out = np.empty_like(flat)
        for s, e, buf in self._rounds_of(flat):
            dst = out[s:e]
            np.copyto(dst, self._view(buf, 0, flat.dtype, e - s))
            for r in range(1, self.size):
                dst += self._view(buf, r, flat.dtype, e - s)
        return out.reshape(x.shape)

    def gather(self, x: np.ndarray) -> np.ndarray | None:
        """Rank 0: [size, *x.shape], every rank's x; the others: None."""
        flat = np.ascontiguousarray(x).reshape(-1)
        out = np.empty((self.size, flat.size), dtype=flat.dtype) if self.rank == 0 else None
        for s, e, buf in self._rounds_of(flat):
            if out is not None:
                for r in range(self.size):
                    out[r, s:e] = self._view(buf, r, flat.dtype, e - s)
        return None if out is None else out.reshape(self.size, *x.shape)

    def abort(self) -> None:
        """Make every rank waiting in a collective raise CommAborted (this one failed)."""
        self._header[0] = 1

    def close(self) -> None:
        self._mm = self._header = self._rounds = self._slots = None

    # -- rounds -----------------------------------------------------------------------------------
    def _rounds_of(self, flat: np.ndarray):
        """Per SLOT-sized chunk [s, e) of flat: publish it, wait for every rank; yields (s, e, buffer)."""
        per = SLOT // flat.itemsize
        for s in range(0, max(flat.size, 1), per):
            e = min(s + per, flat.size)
            k = self.round + 1
            buf = k % 2
            self._view(buf, self.rank, flat.dtype, e - s)[:] = flat[s:e]
            self._rounds[self.rank] = k
            self._wait(k)
            self.round = k
            yield s, e, buf

    def _view(self, buf: int, rank: int, dtype, n: int) -> np.ndarray:
        return self._slots[buf, rank, :n * np.dtype(dtype).itemsize].view(dtype)

    def _wait(self, k: int) -> None:
        rounds = self._rounds
        if rounds.min() >= k:
            return
        # NOTE: yield the core first (the peer is usually a few microseconds behind), then sleep:
        # the ranks of a CPU run share the machine's cores with each other and with the driver.
        for _ in range(200):
            os.sched_yield()
            if rounds.min() >= k:
                return
        next_check = 0.0
        while rounds.min() < k:
            now = time.monotonic()
            if now >= next_check:
                self._check(None, f"round {k}")
                next_check = now + 0.05
            time.sleep(0.0001)

    def _check(self, deadline: float | None, what: str) -> None:
        if self._header[0]:
            raise CommAborted(f"rank {self.rank}: another rank failed while this one was {what}")
        if self.alive is not None and not self.alive():
            raise CommAborted(f"rank {self.rank}: the driver is gone")
        if deadline is not None and time.monotonic() > deadline:
            missing = [r for r in range(self.size) if self._header[1 + r] < 1]
            raise CommAborted(f"rank {self.rank}: ranks {missing} did not join the shared-memory collective "
                              f"within {JOIN_TIMEOUT_S:.0f} s")
