"""How the KV cache is sized (executor/worker.py), on both backends.

- The cache never gets more blocks than the engine can fill: max_num_seqs sequences of
  max_model_len tokens plus the watermark, at most MAX_KV_BLOCKS (a tiny model used to get the
  whole budget: tens of millions of block records on a 141 GB device).
- On the GPU the profiling pass measures through CuPy's pool, which keeps freed blocks: a second
  engine in one process (after the first is dropped, or while it lives) gets its cache. The
  emulator (tests/cuda_emulator.py) models the pool as CuPy keeps it, the device's total memory and
  what lies outside the pool.
"""
from __future__ import annotations

import gc
import math

import numpy as np
import pytest

from cuda_emulator import CXX, POOL, MemInfo, OutOfMemoryError, fake_cupy, install, uninstall_caches
from rawpaged import LLM, SamplingParams
from rawpaged.errors import RawpagedError
from rawpaged.executor import worker
from rawpaged.worker.cache_engine import block_bytes

MiB = 1 << 20
needs_cxx = pytest.mark.skipif(CXX is None, reason="no C++ compiler (g++) to build the host emulation")


@pytest.fixture()
def emu(monkeypatch):
    yield install(monkeypatch)
    uninstall_caches()


def usable_blocks(max_num_seqs: int, max_model_len: int, block_size: int = 16, watermark: float = 0.01) -> int:
    return math.ceil(max_num_seqs * math.ceil(max_model_len / block_size) / (1 - watermark))


def cache_bytes(llm) -> int:
    return int(llm.engine.executor.cache.device_cache.nbytes)


# --------------------------------------------------------------------------------------------
# The emulated pool behaves as CuPy's
# --------------------------------------------------------------------------------------------
def test_emulated_pool_keeps_freed_blocks_until_released(monkeypatch):
    monkeypatch.setattr(MemInfo, "total", 64 * MiB)
    monkeypatch.setattr(MemInfo, "outside", 4 * MiB)
    gc.collect()
    POOL.free_all_blocks()
    used0 = POOL.used_bytes()
    a = fake_cupy.empty((1000, 1000), dtype=np.float32)           # 4 MB, counted once
    view = a[10:20]
    assert POOL.used_bytes() - used0 == 4_000_256                 # rounded up to 512 B
    free_before = fake_cupy.cuda.runtime.memGetInfo()[0]
    del a
    assert POOL.used_bytes() - used0 == 4_000_256                 # the view keeps the memory alive
    del view
    assert POOL.used_bytes() == used0
    assert fake_cupy.cuda.runtime.memGetInfo()[0] == free_before  # the pool kept the block
    POOL.free_all_blocks()
    assert fake_cupy.cuda.runtime.memGetInfo()[0] == free_before + 4_000_256
    with pytest.raises(OutOfMemoryError):
        fake_cupy.empty((61 * MiB,), dtype=np.uint8)              # 64 - 4 outside: 60 MiB at most
    b = fake_cupy.empty((8 * MiB,), dtype=np.uint8) + 1           # results are counted; the operand is freed
    assert POOL.used_bytes() - used0 == 8 * MiB and POOL.total_bytes() - used0 >= 16 * MiB
    del b


# --------------------------------------------------------------------------------------------
# Sized by what can be used, on both backends
# --------------------------------------------------------------------------------------------
def test_cpu_cache_is_capped_by_max_num_seqs_times_max_model_len(stories260k_dir):
    llm = LLM(str(stories260k_dir), device="cpu")                 # the CPU default: 1 GiB
    eng = llm.engine
    want = usable_blocks(256, 512)                                # 256 seqs x 512 tokens, watermark 1%
    assert eng.cache_size.num_device_blocks == want < (1 << 30) // block_bytes(eng.model_config, 16, np.float32)
    assert eng.cache_size.num_cpu_blocks <= want
    assert "max_num_seqs=256 x max_model_len=512" in eng.cache_size.why, eng.cache_size.why
    assert "CPU default" in eng.cache_size.why
    # every sequence the scheduler may run still fits at its longest
    assert eng.max_model_len == 512


def test_small_budgets_are_not_capped(stories260k_dir):
    bb = 5 * 2 * 4 * 16 * 8 * 4
    llm = LLM(str(stories260k_dir), device="cpu", kv_cache_memory=100 * bb)
    assert llm.engine.cache_size.num_device_blocks == 100
    assert llm.engine.cache_size.why.startswith(f"kv_cache_memory={100 * bb} bytes: 100 blocks")


def test_max_kv_blocks_bounds_huge_configs(stories260k_dir, monkeypatch):
    monkeypatch.setattr(worker, "MAX_KV_BLOCKS", 700)
    llm = LLM(str(stories260k_dir), device="cpu", max_num_seqs=4096)
    assert llm.engine.cache_size.num_device_blocks == 700
    assert "MAX_KV_BLOCKS=700" in llm.engine.cache_size.why


@needs_cxx
def test_gpu_cache_is_capped_too(emu, stories260k_dir):
    llm = LLM(str(stories260k_dir), device="cuda", dtype="float32", max_num_seqs=8, max_model_len=64, swap_space=0.001)
    size = llm.engine.cache_size
    assert size.num_device_blocks == usable_blocks(8, 64)
    assert "gpu_memory_utilization=0.9" in size.why and "max_num_seqs=8" in size.why, size.why


# --------------------------------------------------------------------------------------------
# The GPU profiling pass: measured through the pool
# --------------------------------------------------------------------------------------------
def small_device(monkeypatch, total=64 * MiB, outside=4 * MiB):
    """A 64 MiB device whose CUDA context holds 4 MiB; nothing cached in the pool."""
    monkeypatch.setattr(MemInfo, "total", total)
    monkeypatch.setattr(MemInfo, "outside", outside)
    gc.collect()
    POOL.free_all_blocks()


# 512 sequences x 64 tokens would need ~42 MB of fp32 stories260K cache: memory binds, not the cap.
# NOTE: a short max_model_len keeps the emulated profiling pass (max_model_len tokens) quick.
MEMORY_BOUND = dict(device="cuda", dtype="float32", gpu_memory_utilization=0.5, swap_space=0.001,
                    max_model_len=64, max_num_seqs=512)


@needs_cxx
def test_profile_fills_the_fraction_and_no_more(emu, stories260k_dir, monkeypatch):
    small_device(monkeypatch)
    llm = LLM(str(stories260k_dir), **MEMORY_BOUND)
    eng = llm.engine
    allowed = int(64 * MiB * 0.5)
    logits = 4 * eng.model_config.vocab_size * 512 * 4
    # everything on the device (live arrays: weights, cos/sin table, the cache; the context; what the
    # sizing reserved for the CUDA graphs' own pool) fits the fraction
    # NOTE: the reserve, not the emulated graph pool: the emulator keeps every buffer a captured graph
    # recorded (no address reuse between captures), so its pool over-counts; tests/gpu checks the
    # real pool against the reserve.
    reserve = eng.executor.worker.graph_reserve
    assert reserve > 0
    in_use = POOL.used_bytes() + MemInfo.outside + reserve
    assert in_use + logits <= allowed
    # and the cache took all but the profiled activation peak (stories260K: under 1 MiB at 64 tokens)
    assert in_use + logits > allowed - MiB - block_bytes(eng.model_config, 16, np.float32)
    assert "0.5 of 64.0 MiB = 32.0 MiB, less 1.0 MiB of arrays" in eng.cache_size.why, eng.cache_size.why
    assert "4.0 MiB outside CuPy's pool" in eng.cache_size.why and "activation peak" in eng.cache_size.why


@needs_cxx
def test_second_engine_after_the_first_is_dropped_gets_the_same_cache(emu, stories260k_dir, monkeypatch):
    """The first engine's freed arrays stay in CuPy's pool: the driver alone would call them used."""
    small_device(monkeypatch)
    first = LLM(str(stories260k_dir), **MEMORY_BOUND)
    blocks = first.engine.cache_size.num_device_blocks
    assert cache_bytes(first) > 8 * MiB
    del first
    second = LLM(str(stories260k_dir), **MEMORY_BOUND)
    assert second.engine.cache_size.num_device_blocks == blocks


@needs_cxx
def test_second_engine_while_the_first_lives(emu, stories260k_dir, monkeypatch):
    """The check script and tests/gpu build an fp32 engine while an fp16 one lives."""
    small_device(monkeypatch)
    kw = dict(device="cuda", max_num_seqs=8, max_model_len=64, swap_space=0.001)
    fp16 = LLM(str(stories260k_dir), dtype="float16", **kw)
    fp32 = LLM(str(stories260k_dir), dtype="float32", **kw)
    assert fp16.engine.cache_size.num_device_blocks == fp32.engine.cache_size.num_device_blocks == usable_blocks(8, 64)
    for llm in (fp16, fp32):
        out = llm.generate(prompt_token_ids=[[1]], sampling_params=SamplingParams(temperature=0.0, max_tokens=4,
                                                                                  ignore_eos=True))
        assert len(out[0].outputs[0].token_ids) == 4


@needs_cxx
def test_a_live_engine_leaves_the_next_one_only_what_is_left(emu, stories260k_dir, monkeypatch):
    small_device(monkeypatch)
    first = LLM(str(stories260k_dir), **MEMORY_BOUND)
    with pytest.raises(RawpagedError, match="no GPU memory left for the KV cache: gpu_memory_utilization=0.5"):
        LLM(str(stories260k_dir), **MEMORY_BOUND)
    assert first.engine.cache_size.num_device_blocks > 0


@needs_cxx
def test_gpu_memory_utilization_too_low_is_a_clear_error(emu, stories260k_dir, monkeypatch):
    small_device(monkeypatch, outside=56 * MiB)                 # the context and other processes: 56 of 64 MiB
    with pytest.raises(RawpagedError, match="gpu_memory_utilization=0.5 .* 56.0 MiB outside CuPy's pool"):
        LLM(str(stories260k_dir), device="cuda", dtype="float32", gpu_memory_utilization=0.5,
            max_model_len=64, swap_space=0.001)
