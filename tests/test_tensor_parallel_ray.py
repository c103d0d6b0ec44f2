"""Tensor parallelism under the `ray` executor (one Ray actor per rank in a STRICT_PACK placement
group, the shared-memory collective between them): the same greedy tokens as transformers for the
LLaMA GQA and OPT fixtures, under preemption too; half the weights per rank; a dead actor is an
error naming its rank.

Ray starts once for this module (a local instance, 2 CPUs; slow to start on a busy machine: the
timeouts are generous and nothing here is timed).
"""
from __future__ import annotations

import os
import signal

import numpy as np
import pytest

ray = pytest.importorskip("ray")

from rawpaged import LLM  # noqa: E402
from rawpaged.config import ModelConfig  # noqa: E402
from rawpaged.errors import RawpagedError  # noqa: E402
from rawpaged.worker.cache_engine import block_bytes  # noqa: E402
from test_tensor_parallel import FIXTURES, greedy_ids, reference, within  # noqa: E402


@pytest.fixture(scope="module", autouse=True)
def ray_cluster():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield
    ray.shutdown()


@pytest.mark.parametrize("name,mode", [("llama-gqa", "swap"), ("opt-preln", "recompute")])
def test_ray_tp2_greedy_equals_transformers_also_under_preemption(name, mode):
    prompts, want = reference(name)
    cfg = ModelConfig.from_dir(FIXTURES / name)
    per_rank_block = block_bytes(cfg, 8, np.float32) // 2
    roomy = LLM(FIXTURES / name, device="cpu", block_size=8, kv_cache_memory=4 << 20, tensor_parallel_size=2,
                distributed_executor_backend="ray")
    try:
        assert type(roomy.engine.executor).__name__ == "RayExecutor"
        assert within(300, lambda: greedy_ids(roomy, prompts)) == want
        single = LLM(FIXTURES / name, device="cpu", kv_cache_memory=4 << 20, block_size=8).engine.executor.worker
        for held in roomy.engine.executor.weight_bytes:
            assert 0.5 * single.weight_bytes <= held <= 0.56 * single.weight_bytes
    finally:
        roomy.engine.shutdown()
    tight = LLM(FIXTURES / name, device="cpu", block_size=8, tensor_parallel_size=2, distributed_executor_backend="ray",
                kv_cache_memory=8 * per_rank_block, swap_space=64 * per_rank_block / (1 << 30), preemption_mode=mode)
    try:
        assert within(300, lambda: greedy_ids(tight, prompts)) == want
        assert tight.get_stats()[f"num_preemptions_{mode}"] > 0
    finally:
        tight.engine.shutdown()


def test_ray_a_dead_actor_is_an_error_naming_its_rank():
    prompts, _ = reference("llama-gqa")
    llm = LLM(FIXTURES / "llama-gqa", device="cpu", kv_cache_memory=4 << 20, tensor_parallel_size=2,
              distributed_executor_backend="ray")
    pids = llm.engine.executor.pids()
    os.kill(pids[1], signal.SIGKILL)
    with pytest.raises(RawpagedError, match=r"worker rank 1 \(Ray actor\) died"):
        within(300, lambda: greedy_ids(llm, prompts))
    with pytest.raises(RawpagedError, match="workers were stopped after a failure"):
        greedy_ids(llm, prompts)
    assert llm.engine.executor.pg is None                      # the placement group was removed
