"""LocalExecutor: one worker (the whole model, one device) in this process; today's default."""
from __future__ import annotations

from rawpaged.config import ModelConfig
from rawpaged.executor import CacheSize, ModelOutput
from rawpaged.executor.worker import CPU_DEFAULT_KV_MEMORY, GiB, MAX_KV_BLOCKS, Worker  # noqa: F401


class LocalExecutor:
    def __init__(self, config, model_config: ModelConfig):
        self.config = config
        self.model_config = model_config
        self.worker = Worker(config, model_config)
        self.backend, self.device, self.xp, self.dtype = (self.worker.backend, self.worker.device, self.worker.xp,
                                                          self.worker.dtype)

    # what tests and benchmarks look at
    @property
    def model(self):
        return self.worker.model

    @property
    def runner(self):
        return self.worker.runner

    @property
    def cache(self):
        return self.worker.cache

    def determine_cache_size(self, max_batched_tokens: int, max_model_len: int) -> CacheSize:
        return self.worker.determine_cache_size(max_batched_tokens, max_model_len)

    def init_cache(self, num_device_blocks: int, num_cpu_blocks: int) -> None:
        self.worker.init_cache(num_device_blocks, num_cpu_blocks)

    def execute_model(self, out) -> ModelOutput | None:
        return self.worker.execute_model(out)

    def runs_steps(self) -> bool:
        return self.worker.runs_steps()

    def interrupt_bursts(self, on: bool = True) -> None:
        self.worker.interrupt_bursts(on)

    def shutdown(self) -> None:
        pass
