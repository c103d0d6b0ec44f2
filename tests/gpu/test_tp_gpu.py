"""Tensor parallelism on the GPU: NCCL through cupy.cuda.nccl, and the `mp` executor.

- an NCCL communicator of size 1 (the one a single GPU allows): its all-reduce returns its input
  bit for bit, its gather stacks it, on the current stream;
- the `mp` executor with one worker (a spawned process, NCCL of size 1: the vocab-parallel lookup,
  the all-reduces and the logits' gather all run) gives the single-process engine's greedy tokens
  and logprobs on the end-to-end fixtures;
- with two or more GPUs, tensor-parallel 2 does too.

Skipped on the host emulation (tests/cuda_emulator.py): it has no NCCL, and a spawned rank would
not run on it.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

cupy = pytest.importorskip("cupy")

from rawpaged import LLM, SamplingParams  # noqa: E402

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
EMULATED = os.environ.get("RAWPAGED_EMULATE_CUDA") == "1"
pytestmark = pytest.mark.skipif(EMULATED, reason="the CUDA host emulation has no NCCL and spawned ranks do not "
                                                 "run on it")


def _nccl_or_skip():
    try:
        from cupy.cuda import nccl
    except Exception as e:                                       # noqa: BLE001
        pytest.skip(f"cupy.cuda.nccl not importable: {e}")
    if not getattr(nccl, "available", True):
        pytest.skip("this CuPy was built without NCCL")
    return nccl


def _prompts(name: str) -> list[list[int]]:
    ref = np.load(FIXTURES / name / "reference.npz")
    off = ref["prompt_offsets"]
    return [ref["prompt_ids_flat"][off[i]:off[i + 1]].tolist() for i in range(len(off) - 1)]


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_nccl_communicator_of_size_one(dtype):
    _nccl_or_skip()
    from rawpaged.distributed import connect, create_comm_spec
    comm = connect(create_comm_spec("nccl", 1), 0)
    try:
        x = cupy.asarray(np.random.default_rng(0).standard_normal((37, 64)).astype(dtype))
        want = x.copy()
        y = comm.all_reduce(x)
        assert y.shape == want.shape and bool((y == want).all())
        g = comm.gather(want)
        assert g.shape == (1, 37, 64) and bool((g[0] == want).all())
    finally:
        comm.close()


@pytest.mark.parametrize("name", ["llama-gqa", "opt-preln"])
def test_mp_executor_with_one_worker_matches_one_process(name):
    _nccl_or_skip()
    prompts = _prompts(name)
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, logprobs=3)
    single = LLM(str(FIXTURES / name), device="cuda", dtype="float16")
    want = single.generate(None, params, prompt_token_ids=prompts)
    del single
    one = LLM(str(FIXTURES / name), device="cuda", dtype="float16", distributed_executor_backend="mp",
              gpu_memory_utilization=0.3)
    try:
        assert one.engine.executor.size == 1 and one.engine.device == "cuda"
        got = one.generate(None, params, prompt_token_ids=prompts)
    finally:
        one.engine.shutdown()
    gap = 0.0
    for g, w in zip(got, want):
        assert g.outputs[0].token_ids == w.outputs[0].token_ids
        for a, b in zip(g.outputs[0].logprobs, w.outputs[0].logprobs):
            gap = max(gap, max(abs(a[k] - b[k]) for k in a.keys() & b.keys()))
    print(f"{name}: mp (NCCL of size 1) against one process: max logprob gap {gap:.2e}")
    assert gap <= 1e-3


def test_tp2_on_two_gpus_matches_one_process():
    _nccl_or_skip()
    if cupy.cuda.runtime.getDeviceCount() < 2:
        pytest.skip("one GPU: tensor-parallel 2 needs two")
    prompts = _prompts("llama-gqa")
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    want = [o.outputs[0].token_ids for o in LLM(str(FIXTURES / "llama-gqa"), device="cuda", dtype="float32")
            .generate(None, params, prompt_token_ids=prompts)]
    tp2 = LLM(str(FIXTURES / "llama-gqa"), device="cuda", dtype="float32", tensor_parallel_size=2,
              gpu_memory_utilization=0.3)
    try:
        assert [o.outputs[0].token_ids for o in tp2.generate(None, params, prompt_token_ids=prompts)] == want
    finally:
        tp2.engine.shutdown()
