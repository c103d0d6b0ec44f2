"""NCCL through `cupy.cuda.nccl`: one communicator per rank, one rank per GPU.

The unique id comes from rank 0 (`ncclGetUniqueId` opens the bootstrap socket in the process that
calls it, so that process must live while the others join: rank 0 does). Collectives run on the
current CuPy stream, the one the model's kernels are queued on, so no synchronisation is needed
around them; NCCL's all-reduce gives every rank the same bits.
"""
from __future__ import annotations

import numpy as np

from rawpaged.distributed import CommSpec
from rawpaged.errors import RawpagedError


def _nccl():
    try:
        from cupy.cuda import nccl
    except Exception as e:  # CuPy without its NCCL binding (or no CuPy)
        raise RawpagedError(f"tensor parallelism on GPUs needs NCCL through cupy.cuda.nccl: {type(e).__name__}: {e} "
                            f"(pip install nvidia-nccl-cu13, or a CuPy wheel that ships NCCL)") from None
    if not getattr(nccl, "available", True):
        raise RawpagedError("cupy.cuda.nccl is present but NCCL is not available to this CuPy")
    return nccl


def create_spec(size: int) -> CommSpec:
    return CommSpec("nccl", size, tuple(_nccl().get_unique_id()))


def nccl_dtype(nccl, dtype) -> int:
    name = np.dtype(dtype).name
    table = {"float32": nccl.NCCL_FLOAT32, "float16": nccl.NCCL_FLOAT16,
             # NOTE: ncclBfloat16 is 9 in nccl.h (NCCL >= 2.10); older CuPy builds do not name it.
             "bfloat16": getattr(nccl, "NCCL_BFLOAT16", 9)}
    if name not in table:
        raise RawpagedError(f"NCCL collectives: unsupported dtype {name}")
    return table[name]


class NcclCommunicator:
    def __init__(self, spec: CommSpec, rank: int):
        import cupy
        self.cupy = cupy
        self.nccl = _nccl()
        self.rank, self.size = rank, spec.size
        self.comm = self.nccl.NcclCommunicator(spec.size, tuple(spec.address), rank)

    def _stream(self) -> int:
        return self.cupy.cuda.get_current_stream().ptr

    def all_reduce(self, x):
        """Sum over ranks, in place in a contiguous x (a fresh GEMM output)."""
        x = self.cupy.ascontiguousarray(x)
        self.comm.allReduce(x.data.ptr, x.data.ptr, x.size, nccl_dtype(self.nccl, x.dtype), self.nccl.NCCL_SUM,
                            self._stream())
        return x

    def gather(self, x):
        """Rank 0: [size, *x.shape]; others: None (an all-gather: NCCL has no gather collective)."""
        x = self.cupy.ascontiguousarray(x)
        out = self.cupy.empty((self.size, *x.shape), dtype=x.dtype)
        self.comm.allGather(x.data.ptr, out.data.ptr, x.size, nccl_dtype(self.nccl, x.dtype), self._stream())
        return out if self.rank == 0 else None

    def abort(self) -> None:
        if self.comm is not None:
            try:
                self.comm.abort()
            except Exception:       # noqa: BLE001 - best effort on the way out
                pass
            self.comm = None

    def close(self) -> None:
        if self.comm is not None:
            self.comm.destroy()
            self.comm = None
