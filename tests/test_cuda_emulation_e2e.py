"""The whole engine on the CUDA backend, with the real kernels_cuda/*.cu run on the CPU.

tests/cuda_emulator.py stands in for CuPy (device arrays are NumPy arrays that refuse to mix with
host arrays, kernels are the .cu sources built with g++ where each CUDA thread is a fiber). With it
installed, `LLM(model, device="cuda")` goes through everything a GPU run does except the device
itself: backend selection, resolve_dtype, the gpu_memory_utilization profiling pass, the KV cache
and the pinned swap pool (CacheEngine), the model runner, both model families, the sampler on the
device array module, swap streams and events. Golden references come from outside rawpaged
(llama2.c's greedy stories260K ids, Hugging Face transformers' greedy ids for the tiny fixtures).

16-bit runs (fp16 and bf16, the fixtures and a head-size-128 model that takes the fast kernels)
are compared with the fp32 CPU engine within a measured bound (tests/e2e_helpers.py).

What a device adds (tests/gpu): cuBLAS and NVRTC, real concurrency, speed.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from cuda_emulator import CXX, install, uninstall_caches
from e2e_helpers import (assert_follows_fp32, head128_prompts, logprob_gaps, make_head128_llama, np_dtype,
                         rounded_weights_copy)
from rawpaged import LLM, SamplingParams
from rawpaged.worker.cache_engine import block_bytes

pytestmark = pytest.mark.skipif(CXX is None, reason="no C++ compiler (g++) to build the host emulation")

FIXTURES = Path(__file__).parent / "fixtures"
GREEDY = dict(temperature=0.0, ignore_eos=True)


@pytest.fixture()
def emu(monkeypatch):
    yield install(monkeypatch)
    uninstall_caches()


def _stories_golden(data_dir: Path) -> list[int]:
    path = data_dir / "models" / "stories260K" / "greedy_reference.json"
    if not path.is_file():
        pytest.skip(f"{path} not found")
    return json.loads(path.read_text())["greedy_next_token_ids_64"]


def _fixture(name: str):
    path = FIXTURES / name / "reference.npz"
    if not path.is_file():
        pytest.skip(f"fixture {path} not found")
    ref = np.load(path)
    off = ref["prompt_offsets"]
    prompts = [ref["prompt_ids_flat"][off[i]:off[i + 1]].tolist() for i in range(len(off) - 1)]
    return prompts, ref["greedy_ids"]


def _ids(outs) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in outs]


# --------------------------------------------------------------------------------------------
# stories260K (a real pretrained model) against llama2.c's greedy ids
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("enforce_eager", [False, True])       # decode steps replayed from CUDA graphs, or not
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_stories260k_greedy_equals_golden(emu, stories260k_dir, data_dir, dtype, enforce_eager):
    want = _stories_golden(data_dir)
    llm = LLM(str(stories260k_dir), device="cuda", dtype=dtype, kv_cache_memory=1 << 20, swap_space=0.001,
              max_num_seqs=8, enforce_eager=enforce_eager)
    assert (llm.engine.executor.worker.graphs is None) == enforce_eager
    assert llm.engine.device == "cuda" and llm.engine.dtype == np.dtype(dtype)
    assert type(llm.engine.executor.cache.device_cache).__name__ == "EmuArray"
    out = llm.generate(prompt_token_ids=[[1]], sampling_params=SamplingParams(max_tokens=64, **GREEDY))
    assert out[0].outputs[0].token_ids == want


# --------------------------------------------------------------------------------------------
# Tiny Hugging Face fixtures against transformers' greedy ids (fp32), and fp16 against the CPU
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("enforce_eager", [False, True])       # decode steps replayed from CUDA graphs, or not
@pytest.mark.parametrize("name", ["llama-gqa", "opt-postln-proj"])
def test_fixture_greedy_fp32_equals_transformers(emu, name, enforce_eager):
    prompts, greedy = _fixture(name)
    llm = LLM(FIXTURES / name, device="cuda", dtype="float32", kv_cache_memory=1 << 20, swap_space=0.001,
              enforce_eager=enforce_eager)
    outs = llm.generate(prompt_token_ids=prompts, sampling_params=SamplingParams(max_tokens=16, **GREEDY))
    assert _ids(outs) == greedy.tolist()
    graphs = llm.engine.executor.worker.graphs
    assert (graphs is None) == enforce_eager
    if graphs is not None:                                      # the decode steps were replays
        assert sum(g.launches for g in graphs.graphs.values()) > 0


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("name", ["llama-gqa", "opt-postln-proj"])
def test_fixture_16bit_follows_cpu_fp32(emu, name, dtype, tmp_path):
    """fp16 and bf16 stay as close to the fp32 CPU engine as the dtype allows (e2e_helpers: the
    bound is 3x what rounding only the weights moves the logprobs; on these fixtures, whose logits
    reach ~10, that alone is 0.017-0.028 in fp16)."""
    prompts, _ = _fixture(name)
    params = SamplingParams(max_tokens=16, logprobs=3, **GREEDY)
    run_cpu = lambda path: LLM(path, device="cpu", kv_cache_memory=1 << 20).generate(  # noqa: E731
        prompt_token_ids=prompts, sampling_params=params)
    cpu = run_cpu(FIXTURES / name)
    weight_gap, _ = logprob_gaps(run_cpu(rounded_weights_copy(FIXTURES / name, tmp_path / name, np_dtype(dtype))), cpu)
    got = LLM(FIXTURES / name, device="cuda", dtype=dtype, kv_cache_memory=1 << 20, swap_space=0.001).generate(
        prompt_token_ids=prompts, sampling_params=params)
    assert_follows_fp32(f"{name} {dtype}", got, cpu, weight_gap)


# --------------------------------------------------------------------------------------------
# Head size 128: the fast kernels end to end (the fixtures above only reach the generic ones)
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def head128(tmp_path_factory):
    return make_head128_llama(tmp_path_factory.mktemp("head128") / "model")


def _record_launches(monkeypatch, cuda) -> list[str]:
    names: list[str] = []
    real = cuda.launch.launch

    def recording(k, *args, **kwargs):
        names.append(k.name)
        return real(k, *args, **kwargs)
    monkeypatch.setattr(cuda.launch, "launch", recording)
    return names


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_head128_follows_cpu_fp32_through_the_fast_kernels(emu, monkeypatch, head128, dtype, tmp_path):
    """Measured here: fp16 0.0075 vs 0.0043 for the weights alone (1.7x), bf16 0.082 vs 0.037
    (2.2x); with the decode scale off by 1.25x the bf16 gap is 1.1, with decode missing the newest
    key the top-5 tokens share nothing."""
    launched = _record_launches(monkeypatch, emu)
    monkeypatch.setattr(emu, "split_k_policy", "always")       # short contexts, so force the reduce path
    monkeypatch.setattr(emu, "PARTITION_SIZE", 32)
    prompts = head128_prompts()
    params = SamplingParams(max_tokens=8, logprobs=5, prompt_logprobs=5, **GREEDY)
    cpu = LLM(head128, device="cpu").generate(prompt_token_ids=prompts, sampling_params=params)
    rounded = LLM(rounded_weights_copy(head128, tmp_path / "rounded", np_dtype(dtype)), device="cpu")
    weight_gap, _ = logprob_gaps(rounded.generate(prompt_token_ids=prompts, sampling_params=params), cpu)
    got = LLM(head128, device="cuda", dtype=dtype, kv_cache_memory=1 << 22, swap_space=0.001).generate(
        prompt_token_ids=prompts, sampling_params=params)
    assert_follows_fp32(f"head128 {dtype}", got, cpu, weight_gap)
    tag = {"float16": "f16", "bfloat16": "bf16"}[dtype]
    for kernel in (f"paged_decode_mma_{tag}_hd128", f"paged_decode_reduce_{tag}", f"paged_prefill_{tag}_hd128",
                   f"rotary_cache_{tag}_f32"):            # rotary + cache write: one fused kernel (issue 13)
        assert kernel in launched, f"{kernel} never ran: {sorted(set(launched))}"


# --------------------------------------------------------------------------------------------
# Every architecture and RoPE scaling (issue 14's fixtures), fp32 on the emulated kernels: greedy
# tokens equal transformers', and their logprobs within 1e-4 of transformers' log-softmax. The
# sliding-window fixtures (mistral-swa W=8, qwen2-swa W=6 on layer 1, phi3 W=12) run prompts and
# decodes longer than their windows through the decode and varlen kernels.
# --------------------------------------------------------------------------------------------
NEW_FIXTURES = ["llama-rope-linear", "llama-rope-dynamic", "llama-rope-yarn", "llama-rope-llama3", "mistral-swa",
                "qwen2-swa", "qwen3", "gemma", "phi3", "gpt2", "gpt-neox", "gpt-neox-seq"]


@pytest.mark.parametrize("name", NEW_FIXTURES)
def test_new_architectures_fp32_equal_transformers(emu, name):
    prompts, greedy = _fixture(name)
    ref = np.load(FIXTURES / name / "reference.npz")["decode_logits"].astype(np.float64)
    want = ref - ref.max(-1, keepdims=True)
    want -= np.log(np.exp(want).sum(-1, keepdims=True))                         # log-softmax [B, 16, V]
    llm = LLM(FIXTURES / name, device="cuda", dtype="float32", kv_cache_memory=1 << 20, swap_space=0.001,
              block_size=8)
    outs = llm.generate(prompt_token_ids=prompts, sampling_params=SamplingParams(max_tokens=16, logprobs=1, **GREEDY))
    assert _ids(outs) == greedy.tolist()
    for i, out in enumerate(outs):
        for step, (tok, lps) in enumerate(zip(out.outputs[0].token_ids, out.outputs[0].logprobs)):
            assert abs(lps[tok] - want[i, step, tok]) <= 1e-4, f"{name} prompt {i} step {step}"


# --------------------------------------------------------------------------------------------
# Preemption by swap through the pinned pool, the swap stream and its events
# --------------------------------------------------------------------------------------------
def test_preemption_by_swap_changes_nothing(emu, stories260k_dir):
    prompts = [[1] + [(7 * i + 3 * j) % 500 + 3 for j in range(5 + i % 5)] for i in range(8)]
    params = SamplingParams(max_tokens=24, **GREEDY)
    model = str(stories260k_dir)
    free = LLM(model, device="cuda", dtype="float32", kv_cache_memory=1 << 20, swap_space=0.001)
    want = _ids(free.generate(prompt_token_ids=prompts, sampling_params=params))
    assert free.get_stats()["num_preemptions_swap"] == 0
    # 8 sequences growing to ~34 tokens need ~24 blocks of 8; 12 force swapping.
    bb = block_bytes(free.engine.model_config, 8, np.float32)
    tight = LLM(model, device="cuda", dtype="float32", block_size=8, kv_cache_memory=12 * bb,
                preemption_mode="swap", swap_space=64 * bb / (1 << 30), enable_prefix_caching=False)
    got = _ids(tight.generate(prompt_token_ids=prompts, sampling_params=params))
    stats = tight.get_stats()
    assert stats["num_preemptions_swap"] > 0, stats
    assert type(tight.engine.executor.cache.cpu_cache) is np.ndarray          # the pinned pool is host memory
    assert tight.engine.executor.cache._stream.waited > 0                     # compute waited on the swap stream
    assert got == want
