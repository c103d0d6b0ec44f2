"""What the tensor-parallel executors share: the rank host (in each worker process or Ray actor)
and the driver side (sizes, the cache, one step).

    driver (LLMEngine: scheduler, block tables, sampling)
      | StepInputs: swap/copy lists + the flattened batch, the same to every rank
      v
    rank 0 .. N-1: RankHost -> Worker (its shard, its heads' KV cache) -- all-reduce / gather --
      | rank 0: the logits (host arrays); the others: None
      v
    driver: ModelOutput -> OutputProcessor

Start-up: rank 0 creates the communicator's spec (the NCCL unique id, or the shared-memory file),
every rank joins it and loads its shard; then the driver asks each rank how many KV blocks fit and
takes the smallest answer, so every rank's cache has the same blocks for the same block tables.

A rank that fails makes the others leave their collective (`Communicator.abort`), the driver stops
every worker and raises one RawpagedError naming the rank and the cause; the executor refuses
every later call (the ranks are no longer in step).
"""
from __future__ import annotations

import dataclasses
import logging
import os

import numpy as np

from model_impl.parallel import TensorParallel, check_tensor_parallel
from rawpaged.backend import resolve_device
from rawpaged.distributed import comm_kind, connect, create_comm_spec
from rawpaged.errors import RawpagedError
from rawpaged.executor import CacheSize, ModelOutput
from rawpaged.executor.worker import StepInputs, Worker

logger = logging.getLogger("rawpaged")


class RankHost:
    """One rank's side of the executor, in its own process (`mp`) or Ray actor (`ray`)."""

    def __init__(self, rank: int, size: int, parent_pid: int | None = None):
        self.rank, self.size, self.parent_pid = rank, size, parent_pid
        self.comm = None
        self.worker: Worker | None = None

    def alive(self) -> bool:
        """False once the driver that started this process is gone (`mp`; Ray kills its own actors)."""
        return self.parent_pid is None or os.getppid() == self.parent_pid

    def create_comm(self, kind: str) -> object:
        """Rank 0: the spec every rank joins (it owns what the spec names)."""
        return create_comm_spec(kind, self.size)

    def init(self, spec, config, model_config, device_index: int | None = None) -> dict:
        if config.device == "cuda" and device_index is not None:
            import cupy
            cupy.cuda.Device(device_index).use()
        self.comm = connect(spec, self.rank, self.alive)
        self.worker = Worker(config, model_config, TensorParallel(self.rank, self.size, self.comm))
        return self.worker.info()

    def determine_cache_size(self, max_batched_tokens: int, max_model_len: int) -> CacheSize:
        return self.worker.determine_cache_size(max_batched_tokens, max_model_len)

    def init_cache(self, num_device_blocks: int, num_cpu_blocks: int) -> None:
        self.worker.init_cache(num_device_blocks, num_cpu_blocks)

    def execute_step(self, step: StepInputs) -> ModelOutput | None:
        return self.worker.execute_step(step)

    def abort(self) -> None:
        """This rank failed: release the peers waiting for it in a collective."""
        if self.comm is not None:
            self.comm.abort()

    def pid(self) -> int:
        return os.getpid()


def worker_config(config):
    """The config a rank builds its worker from: the device resolved once, by the driver."""
    return dataclasses.replace(config, device=resolve_device(config.device))


class DistributedExecutor:
    """The driver side; subclasses start the ranks and carry calls to them (`_start`, `_call_all`,
    `_stop`)."""
    # NOTE: rank 0 sends its logits back as host arrays; the driver samples on the CPU.
    xp = np
    kind = "distributed"

    def __init__(self, config, model_config):
        self.config = config
        self.model_config = model_config
        self.size = config.tensor_parallel_size
        check_tensor_parallel(model_config, self.size)
        self.failure: str | None = None
        self.infos: list[dict] = []
        self._start()
        info = self.infos[0]
        self.device, self.dtype = info["device"], info["dtype"]
        logger.info("%s executor: %d rank(s) on %s, %s per rank of weights (read %s of the checkpoint each)",
                    self.kind, self.size, self.device, _mb(max(i["weight_bytes"] for i in self.infos)),
                    _mb(max(i["bytes_read"] for i in self.infos)))

    def _start_ranks(self, kind: str, config, model_config) -> None:
        """Rank 0 makes the communicator's spec; every rank joins it and loads its shard."""
        spec = self._call_one(0, "create_comm", kind)
        self.infos = self._call_all_per_rank("init", lambda r: (spec, config, model_config, self._device_index(r)))

    def _device_index(self, rank: int) -> int | None:
        return None

    @property
    def weight_bytes(self) -> list[int]:
        return [i["weight_bytes"] for i in self.infos]

    @property
    def bytes_read(self) -> list[int]:
        return [i["bytes_read"] for i in self.infos]

    def comm_kind(self, device: str) -> str:
        return comm_kind(device)

    # -- the engine's calls ------------------------------------------------------------------------
    def determine_cache_size(self, max_batched_tokens: int, max_model_len: int) -> CacheSize:
        sizes = self._call_all("determine_cache_size", max_batched_tokens, max_model_len)
        dev = min(s.num_device_blocks for s in sizes)
        cpu = min(s.num_cpu_blocks for s in sizes)
        why = sizes[0].why
        if any(s.num_device_blocks != dev for s in sizes):
            why += f"; the smallest of {self.size} ranks: {dev} blocks"
        return CacheSize(dev, cpu, f"per rank of {self.size}: {why}" if self.size > 1 else why)

    def init_cache(self, num_device_blocks: int, num_cpu_blocks: int) -> None:
        self._call_all("init_cache", num_device_blocks, num_cpu_blocks)

    def execute_model(self, out) -> ModelOutput | None:
        step = StepInputs.of(out, self.config.block_size)
        return self._call_all("execute_step", step)[0]

    def shutdown(self) -> None:
        self._stop()

    # -- failures ------------------------------------------------------------------------------
    def _check_usable(self) -> None:
        if self.failure is not None:
            raise RawpagedError(f"the tensor-parallel workers were stopped after a failure: {self.failure}")

    def _fail(self, message: str):
        """Stop every rank and raise: the ranks are no longer in step."""
        self.failure = message
        logger.error("%s; stopping the %d tensor-parallel workers", message, self.size)
        try:
            self._stop()
        finally:
            raise RawpagedError(message)

    # -- what subclasses implement ---------------------------------------------------------------
    def _start(self) -> None:
        raise NotImplementedError

    def _call_all(self, method: str, *args) -> list:
        return self._call_all_per_rank(method, lambda r: args)

    def _call_all_per_rank(self, method: str, args_of) -> list:
        raise NotImplementedError

    def _call_one(self, rank: int, method: str, *args):
        raise NotImplementedError

    def _stop(self) -> None:
        raise NotImplementedError


def _mb(nbytes: int) -> str:
    return f"{nbytes / (1 << 20):.1f} MiB"
