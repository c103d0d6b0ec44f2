"""One factory for the KV-cache managers the engine can run: the paged one and the paper's baselines.

    paged        BlockSpaceManager (block_manager.py): PagedAttention, the default
    orca-max     OrcaManager (orca.py): a contiguous range of max_model_len tokens per sequence
    orca-pow2    ... of prompt + the next power of two of max_tokens
    orca-oracle  ... of exactly prompt + max_tokens
Each orca-* range is placed by a buddy allocator, as the paper's Orca (orca_allocator="buddy", the
default), or first-fit at the reservation's exact size (orca_allocator="first-fit").
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from rawpaged.core.block_manager import BlockSpaceManager
from rawpaged.core.interface import KVCacheManager
from rawpaged.core.orca import ALLOCATORS, OrcaManager
from rawpaged.errors import RawpagedError

if TYPE_CHECKING:
    from rawpaged.engine.config import EngineConfig

KV_MANAGERS = ("paged", "orca-max", "orca-pow2", "orca-oracle")
ORCA_ALLOCATORS = tuple(ALLOCATORS)


def make_kv_manager(config: EngineConfig, num_device_blocks: int, num_cpu_blocks: int, max_model_len: int,
                    reads_block_tables: bool = True) -> KVCacheManager:
    """The manager config.kv_manager names, over a device pool of num_device_blocks blocks.

    reads_block_tables: False for an executor that never reads the KV cache through block tables
    (the simulator); only such an executor may use Orca units that are not whole blocks.
    """
    if config.kv_manager == "paged":
        return BlockSpaceManager(config.block_size, num_device_blocks, num_cpu_blocks, watermark=config.watermark,
                                 enable_prefix_caching=config.enable_prefix_caching)
    if config.kv_manager not in KV_MANAGERS:
        raise RawpagedError(f"kv_manager must be one of {', '.join(KV_MANAGERS)}, got {config.kv_manager!r}")
    g = config.orca_granularity or config.block_size
    if reads_block_tables and g % config.block_size:
        raise RawpagedError(f"orca_granularity={g} is not a multiple of block_size={config.block_size}: the "
                            f"kernels read ranges as whole blocks (token granularity is for the simulator)")
    return OrcaManager(config.kv_manager.removeprefix("orca-"), config.block_size, num_device_blocks,
                       max_model_len, granularity=g, allocator=config.orca_allocator or "buddy")
