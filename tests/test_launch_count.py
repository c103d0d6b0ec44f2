"""Device launches per decode step (issue 13), counted under the host emulator.

`cuda_emulator.LAUNCHES.launches` counts what a profiler would list: kernels, GEMMs, CuPy array
operations, uploads; a CUDA graph launch is one. A layer's count is the difference between the same
model run with 2 layers and with 1 (everything outside the layers cancels).

Per layer of an eager decode step (fp32, no split-K; bench/KERNEL_NOTES.md, "Launches and graphs"):

  LLaMA (llama-gqa)   before 13: rms/add-rms, qkv GEMM, 3 q/k/v copies, rotary, cache write,
                      attention, o GEMM, add-rms, gate_up GEMM, silu_and_mul, down GEMM
                      after 9: the copies gone (kernels take token strides), rotary fused into the
                      cache write (rotary_cache)
  OPT pre-LN          before 18: LayerNorm, qkv GEMM + bias, 3 copies, cache write, attention,
  (opt-preln)         o GEMM + bias, residual add, LayerNorm, fc1 + bias, relu, fc2 + bias,
                      residual add
                      after 13: the copies gone, each residual add fused into the LayerNorm after it
  GPT-NeoX parallel   before 19: LayerNorm, qkv GEMM + bias, 3 copies, rotary, cache write,
  (gpt-neox)          attention, o GEMM + bias, LayerNorm, fc + bias, gelu, proj + bias, 2 adds
                      after 14: the copies gone, rotary_cache, delta = attn + mlp then one fused
                      add + LayerNorm (LayerNorm 2 still reads the residual on its own)

"Before" was measured with this counting on the parent commit of issue 13 (b097f80): 13 / 18 / 19,
whole 2-layer steps 37 / 50 / 49 (now 29 / 40 / 39).

With CUDA graphs the whole decode step (every layer and the LM head) is 3: the two uploads of the
persistent buffers' staging copies and one graph launch.
"""
from __future__ import annotations

from pathlib import Path

import pytest

import cuda_emulator
from cuda_emulator import CXX, install, uninstall_caches
from rawpaged import LLM
from rawpaged.sequence import ScheduledSeq, Sequence
from rawpaged.worker.model_runner import prepare_inputs

FIXTURES = Path(__file__).parent / "fixtures"
pytestmark = pytest.mark.skipif(CXX is None, reason="no C++ compiler (g++) to build the host emulation")

BEFORE = {"llama-gqa": 13, "opt-preln": 18, "gpt-neox": 19}     # per layer, before issue 13 (see above)
AFTER = {"llama-gqa": 9, "opt-preln": 13, "gpt-neox": 14}


@pytest.fixture()
def emu(monkeypatch):
    monkeypatch.setattr(cuda_emulator.LAUNCHES, "launches", 0)
    cuda = install(monkeypatch)
    monkeypatch.setattr(cuda, "split_k_policy", "never")
    yield cuda
    uninstall_caches()


def _decode_batch(worker, n=2):
    """Prefill n short prompts, then their decode step's inputs."""
    cache, bs = worker.cache.device_cache, worker.config.block_size
    seqs = [Sequence(50 + i, [1, 4 + i, 9]) for i in range(n)]
    tables = [[1 + i] for i in range(n)]
    worker.runner.execute([ScheduledSeq(s, 3, t, sample=True) for s, t in zip(seqs, tables)], cache)
    for s in seqs:
        s.num_computed_tokens = 3
        s.output_token_ids.append(7)
    return prepare_inputs([ScheduledSeq(s, 1, t, sample=True) for s, t in zip(seqs, tables)], bs)


def _step_launches(name, layers, enforce_eager=True):
    llm = LLM(FIXTURES / name, device="cuda", dtype="float32", kv_cache_memory=1 << 20, swap_space=0.001,
              max_num_seqs=4, enforce_eager=enforce_eager)
    w = llm.engine.executor.worker
    w.model.layers = w.model.layers[:layers]
    inputs = _decode_batch(w)
    cuda_emulator.LAUNCHES.launches = 0
    w.runner.run(inputs, w.cache.device_cache)
    return cuda_emulator.LAUNCHES.launches


@pytest.mark.parametrize("name", ["llama-gqa", "opt-preln", "gpt-neox"])
def test_launches_per_layer_of_a_decode_step(emu, name):
    per_layer = _step_launches(name, 2) - _step_launches(name, 1)
    assert per_layer == AFTER[name], f"{name}: {per_layer} launches per layer (was {BEFORE[name]} before issue 13)"
    assert AFTER[name] < BEFORE[name]


def test_a_graph_replay_is_the_whole_step(emu):
    """Eagerly, a 2-layer decode step is dozens of launches; replayed, it is the uploads and one launch."""
    eager = _step_launches("llama-gqa", 2)
    assert eager >= 2 * AFTER["llama-gqa"] + 4
    llm = LLM(FIXTURES / "llama-gqa", device="cuda", dtype="float32", kv_cache_memory=1 << 20, swap_space=0.001,
              max_num_seqs=4)
    w = llm.engine.executor.worker
    inputs = _decode_batch(w)
    cuda_emulator.LAUNCHES.launches = 0
    w.runner.run(inputs, w.cache.device_cache)
    assert cuda_emulator.LAUNCHES.launches == 3
