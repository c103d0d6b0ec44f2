"""Collectives between the ranks of a tensor-parallel model (model_impl/parallel.py calls them).

    spec = create_comm_spec("nccl" | "shm", size)     # on rank 0 (it owns what the spec names)
    comm = connect(spec, rank)                          # on every rank, rank 0 included
    y = comm.all_reduce(x)                              # sum over ranks, same bits on every rank
    parts = comm.gather(x)                              # rank 0: [size, *x.shape]; others: None

Two implementations of one small interface:
  nccl.py   GPUs: `cupy.cuda.nccl` (NCCL's ring/tree all-reduce over NVLink, PCIe or the network),
            one rank per GPU, across nodes when the ranks are Ray actors;
  shm.py    the CPU backend: a shared-memory collective between the processes of one node. It is
            what CI tests the sharding with. Why not Ray's collectives: `ray.util.collective`'s CPU
            backend (gloo) needs pygloo or torch, neither of which rawpaged depends on; a file in
            /dev/shm that every rank maps needs nothing, and runs under both the `mp` and the `ray`
            executors as long as the ranks share a node (the Ray executor places CPU ranks with
            STRICT_PACK).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Protocol

from rawpaged.errors import RawpagedError

COMM_KINDS = ("shm", "nccl")


class CommAborted(RawpagedError):
    """Another rank failed (or the driver went away) while this one waited in a collective."""


@dataclass(frozen=True)
class CommSpec:
    """What every rank needs to join a communicator (picklable: it travels to workers)."""
    kind: str              # "shm" | "nccl"
    size: int
    address: Any           # shm: the mapped file's path; nccl: the unique id (128 ints)


class Communicator(Protocol):
    rank: int
    size: int

    def all_reduce(self, x): ...

    def gather(self, x): ...

    def abort(self) -> None: ...

    def close(self) -> None: ...


def comm_kind(device: str) -> str:
    return "nccl" if device == "cuda" else "shm"


def create_comm_spec(kind: str, size: int) -> CommSpec:
    if kind == "nccl":
        from rawpaged.distributed.nccl import create_spec
    elif kind == "shm":
        from rawpaged.distributed.shm import create_spec
    else:
        raise RawpagedError(f"unknown communicator {kind!r}: choose one of {', '.join(COMM_KINDS)}")
    return create_spec(size)


def connect(spec: CommSpec, rank: int, alive: Callable[[], bool] | None = None) -> Communicator:
    """Join the communicator `spec` names as `rank`. `alive()` (shm): False once the driver is gone,
    so a rank waiting for its peers gives up instead of spinning forever."""
    if spec.kind == "nccl":
        from rawpaged.distributed.nccl import NcclCommunicator
        return NcclCommunicator(spec, rank)
    from rawpaged.distributed.shm import ShmCommunicator
    return ShmCommunicator(spec, rank, alive)


__all__ = ["COMM_KINDS", "CommAborted", "CommSpec", "Communicator", "comm_kind", "connect", "create_comm_spec"]
