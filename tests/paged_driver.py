"""A minimal paged driver for model-level tests: its own block allocator, no scheduler.

It runs a model over the flattened varlen batch exactly as the engine does, with block tables
drawn from a (optionally shuffled) free list, so tests can vary block size and placement.
"""
from __future__ import annotations

import numpy as np

from rawpaged.backend import cpu
from rawpaged.worker.cache_engine import CacheEngine
from rawpaged.config import ModelConfig
from rawpaged.loader import iter_tensors
from rawpaged.sequence import ScheduledSeq
from rawpaged.worker.model_runner import ModelRunner
from rawpaged.sequence import Sequence
from model_impl import get_model_class


def load_model(path):
    cfg = ModelConfig.from_dir(path)
    model = get_model_class(cfg.family)(cfg, cpu, np.float32)
    model.load_weights(iter_tensors(path), where=str(path))
    return model


class PagedDriver:
    def __init__(self, model, block_size=16, num_blocks=128, shuffle_seed=None):
        self.model = model
        self.block_size = block_size
        self.cache = CacheEngine(model.cfg, cpu, np.float32, block_size, num_blocks, 0)
        order = np.arange(num_blocks)
        if shuffle_seed is not None:
            order = np.random.default_rng(shuffle_seed).permutation(num_blocks)
        self.free = [int(b) for b in order]
        self.tables: dict[int, list[int]] = {}
        self.runner = ModelRunner(model, cpu, block_size)

    def _ensure(self, seq: Sequence, num_tokens: int) -> list[int]:
        table = self.tables.setdefault(seq.seq_id, [])
        while len(table) * self.block_size < num_tokens:
            table.append(self.free.pop(0))
        return table

    def step(self, seqs: list[Sequence], num_new: list[int], prompt_logits=False):
        """Compute num_new[i] tokens of seqs[i]; returns (last-token logits [S, V], per-seq all-token logits)."""
        batch = [ScheduledSeq(s, n, self._ensure(s, s.num_computed_tokens + n), sample=True,
                              prompt_logits=prompt_logits) for s, n in zip(seqs, num_new)]
        last, every = self.runner.execute(batch, self.cache.device_cache)
        for s, n in zip(seqs, num_new):
            s.num_computed_tokens += n
        return last, every
