"""LocalExecutor: one device in this process: the backend, the model, the KV cache, the model runner."""
from __future__ import annotations

import logging
import threading

import numpy as np

from model_impl import get_model_class
from rawpaged.backend import get_backend
from rawpaged.config import ModelConfig
from rawpaged.errors import RawpagedError
from rawpaged.executor import CacheSize, ModelOutput
from rawpaged.loader import iter_tensors
from rawpaged.sequence import ScheduledSeq, Sequence
from rawpaged.worker.cache_engine import CacheEngine, block_bytes, num_blocks_for
from rawpaged.worker.model_runner import ModelRunner

logger = logging.getLogger("rawpaged")

GiB = 1 << 30
CPU_DEFAULT_KV_MEMORY = 1 * GiB


class LocalExecutor:
    def __init__(self, config, model_config: ModelConfig):
        self.config = config
        self.model_config = model_config
        self.backend = get_backend(config.device)
        self.device = self.backend.name
        self.xp = self.backend.xp
        self.dtype = self.backend.resolve_dtype(config.dtype, torch_dtype=model_config.torch_dtype)
        # NOTE: the CPU backend honours float32, bfloat16 and float16 as the storage of the weights
        # and the KV cache (activations and sums stay float32: rawpaged/backend/cpu/__init__.py).
        if self.device == "cpu" and np.dtype(self.dtype) != np.float32:
            logger.info("CPU: weights and KV cache stored in %s, computed in float32", np.dtype(self.dtype).name)
        self.model = get_model_class(model_config.family)(model_config, self.backend, self.dtype)
        self.model.load_weights(iter_tensors(model_config.path, progress=True), where=str(model_config.path))
        self.runner = ModelRunner(self.model, self.backend, config.block_size)
        self.cache: CacheEngine | None = None

    # -- the KV cache ----------------------------------------------------------------------------
    def determine_cache_size(self, max_batched_tokens: int, max_model_len: int) -> CacheSize:
        c = self.config
        bb = block_bytes(self.model_config, c.block_size, self.dtype)
        if c.kv_cache_memory is not None:
            memory, why = c.kv_cache_memory, "kv_cache_memory"
        elif self.device == "cuda":
            memory = self._profile_kv_memory(min(max_batched_tokens, max_model_len))
            why = f"gpu_memory_utilization={c.gpu_memory_utilization}"
        else:
            memory, why = CPU_DEFAULT_KV_MEMORY, "the CPU default"
        num_device = num_blocks_for(memory, self.model_config, c.block_size, self.dtype)
        if num_device < 1:
            raise RawpagedError(f"kv_cache_memory={memory} bytes holds no KV block (one block is {bb} bytes)")
        return CacheSize(num_device, int(c.swap_space * GiB // bb), why)

    def init_cache(self, num_device_blocks: int, num_cpu_blocks: int) -> None:
        self.cache = CacheEngine(self.model_config, self.backend, self.dtype, self.config.block_size,
                                 num_device_blocks, num_cpu_blocks)
        self._warm_up()

    def _warm_up(self) -> None:
        """Compile (or load from the on-disk caches) the kernels of a prefill and a decode step now,
        not in the first request; say so while it takes long (the first run on a machine)."""
        notice = threading.Timer(1.0, lambda: logger.info(
            "compiling the %s kernels for this machine (first run only: they are cached afterwards)...",
            self.device))
        notice.daemon = True
        notice.start()
        try:
            # NOTE: block 0 is scratch here: the cache holds nothing yet, and every slot a sequence
            # reads is written by that sequence first.
            seq = Sequence(-1, [0, 0])
            self.runner.execute([ScheduledSeq(seq, 2, [0], sample=True)], self.cache.device_cache)
            seq.num_computed_tokens = 2
            seq.output_token_ids.append(0)
            self.runner.execute([ScheduledSeq(seq, 1, [0], sample=True)], self.cache.device_cache)
            self.backend.synchronize()
        finally:
            notice.cancel()

    def _profile_kv_memory(self, num_tokens: int) -> int:
        """GPU: run the largest step once, then give the KV cache what the peak leaves of
        gpu_memory_utilization * total memory (vLLM's profiling pass)."""
        b, c = self.backend, self.config
        blocks = -(-num_tokens // c.block_size)
        scratch = CacheEngine(self.model_config, b, self.dtype, c.block_size, blocks, 0)
        seq = Sequence(-1, [0] * num_tokens)
        self.runner.execute([ScheduledSeq(seq, num_tokens, list(range(blocks)), sample=True)], scratch.device_cache)
        b.synchronize()
        del scratch
        peak = b.total_device_memory() - b.free_device_memory()
        # NOTE: the sampler holds fp32 logits for up to max_num_seqs rows at once.
        logits = 4 * self.model_config.vocab_size * c.max_num_seqs * 4
        budget = int(b.total_device_memory() * c.gpu_memory_utilization) - peak - logits
        if budget <= 0:
            raise RawpagedError(f"no GPU memory left for the KV cache at gpu_memory_utilization="
                                f"{c.gpu_memory_utilization} (weights and activations use {peak / GiB:.2f} GiB)")
        return budget

    # -- one step --------------------------------------------------------------------------------
    def execute_model(self, out) -> ModelOutput | None:
        cache = self.cache
        cache.swap_out(out.blocks_to_swap_out)
        cache.swap_in(out.blocks_to_swap_in)
        # NOTE: the compute stream waits for the swaps before the copies too: a block swapped in
        # this step may be the source of a copy-on-write.
        cache.wait_for_swaps()
        cache.copy(out.blocks_to_copy)
        if not out.batch:
            return None
        return ModelOutput(*self.runner.execute(out.batch, cache.device_cache))
