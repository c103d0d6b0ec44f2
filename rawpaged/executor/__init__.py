"""Executors: the engine hands each scheduled step to one and gets logits back.

    ModelOutput = executor.execute_model(scheduler_output)

The executor owns everything device-side: the backend, the model weights, the paged KV cache (and its
swap pool), and the model runner that flattens the batch. The engine, the scheduler and the block
manager never see arrays, so the same scheduling runs against any executor:
  - `LocalExecutor` (executor/local.py): this process, one device (today's default);
  - a simulated executor that advances a clock by a cost model (the paper reproduction);
  - tensor-parallel ranks (executor/distributed.py): `MultiprocExecutor` (multiproc.py, one process
    per rank on this node) and `RayExecutor` (ray_executor.py, one Ray actor per GPU in a placement
    group, across nodes). Each rank is a `Worker` (worker.py): its shard, its heads' KV cache.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol


@dataclass
class ModelOutput:
    """Float32 logits of one step, on the backend's device."""
    sample_logits: Any              # [N, V]: one row per batch entry with sample=True, in batch order
    prompt_logits: list             # per batch entry: [rows, V] for prompt logprobs, or None
    sampled: Any = None             # multi-step: (tokens [steps, N], logprobs [steps, N]) host arrays


@dataclass
class CacheSize:
    num_device_blocks: int
    num_cpu_blocks: int
    why: str                        # how the device pool was sized (for the startup line)


class Executor(Protocol):
    xp: Any                         # the array module the logits live in (numpy or cupy)
    device: str                     # "cpu" | "cuda" | ...
    dtype: Any                      # the dtype weights and the KV cache use

    def determine_cache_size(self, max_batched_tokens: int, max_model_len: int) -> CacheSize:
        """How many KV blocks the device pool and the swap pool can hold."""

    def init_cache(self, num_device_blocks: int, num_cpu_blocks: int) -> None:
        """Allocate the paged KV cache."""

    def execute_model(self, out) -> ModelOutput | None:
        """Swap out, swap in, copy-on-write, then run the batch of a SchedulerOutput (None: no batch)."""


def select_executor(config):
    """The executor class a config asks for: this process (tensor_parallel_size 1, no backend named),
    else one process per rank (`mp`, the default) or one Ray actor per rank (`ray`)."""
    backend = config.distributed_executor_backend
    if config.tensor_parallel_size == 1 and backend is None:
        from rawpaged.executor.local import LocalExecutor
        return LocalExecutor
    if backend == "ray":
        from rawpaged.executor.ray_executor import RayExecutor
        return RayExecutor
    from rawpaged.executor.multiproc import MultiprocExecutor
    return MultiprocExecutor


__all__ = ["CacheSize", "Executor", "ModelOutput", "select_executor"]
