"""CacheEngine: the paged KV cache's memory, on the device and in the CPU swap pool.

One array holds every block of every layer, block-major (DESIGN.md):
    kv_cache[num_blocks, num_layers, 2, num_kv_heads, block_size, head_dim]
so a copy-on-write or a swap of one block is one contiguous copy. The CPU swap pool has the same
block shape (pinned host memory on the GPU backend). The block manager decides which blocks move;
this class only moves them.
"""
from __future__ import annotations

import numpy as np

from rawpaged.config import ModelConfig
from rawpaged.errors import RawpagedError

BLOCK_SIZES = (8, 16, 32)


def block_shape(cfg: ModelConfig, block_size: int) -> tuple[int, ...]:
    return (cfg.num_layers, 2, cfg.num_kv_heads, block_size, cfg.head_dim)


def block_bytes(cfg: ModelConfig, block_size: int, dtype) -> int:
    return int(np.prod(block_shape(cfg, block_size))) * np.dtype(dtype).itemsize


def num_blocks_for(memory_bytes: int, cfg: ModelConfig, block_size: int, dtype) -> int:
    return int(memory_bytes // block_bytes(cfg, block_size, dtype))


class CacheEngine:
    def __init__(self, cfg: ModelConfig, backend, dtype, block_size: int,
                 num_device_blocks: int, num_cpu_blocks: int):
        if block_size not in BLOCK_SIZES:
            raise RawpagedError(f"block_size must be one of {BLOCK_SIZES}, got {block_size}")
        if num_device_blocks < 1:
            raise RawpagedError("the KV cache budget holds no block: raise kv_cache_memory / gpu_memory_utilization")
        self.backend = backend
        self.block_size = block_size
        self.num_device_blocks = num_device_blocks
        self.num_cpu_blocks = num_cpu_blocks
        shape = block_shape(cfg, block_size)
        # NOTE: empty, not zeros: a kernel that reads a slot nobody wrote is a bug, and stale
        # values (or NaN on the GPU tests' poisoned caches) make it visible.
        self.device_cache = backend.xp.empty((num_device_blocks, *shape), dtype=dtype)
        self.cpu_cache = backend.alloc_pinned((num_cpu_blocks, *shape), dtype)
        self._stream = backend.swap_stream()
        self._pending_event = None

    def swap_out(self, pairs: list[tuple[int, int]]) -> None:
        """device block -> cpu block, for each (device, cpu) pair."""
        if pairs:
            self.backend.swap_blocks(self.device_cache, self.cpu_cache, pairs, self._stream)
            self._record()

    def swap_in(self, pairs: list[tuple[int, int]]) -> None:
        """cpu block -> device block, for each (cpu, device) pair."""
        if pairs:
            self.backend.swap_blocks(self.cpu_cache, self.device_cache, pairs, self._stream)
            self._record()

    def copy(self, pairs: list[tuple[int, int]]) -> None:
        """Copy-on-write: device block src -> dst, for each (src, dst) pair."""
        if pairs:
            self.backend.copy_blocks(self.device_cache, pairs)

    def wait_for_swaps(self) -> None:
        """The compute stream waits for queued swaps before the step that reads the blocks."""
        if self._pending_event is not None:
            self.backend.wait_event(self._pending_event)
            self._pending_event = None

    def _record(self) -> None:
        self._pending_event = self.backend.record_event(self._stream)
