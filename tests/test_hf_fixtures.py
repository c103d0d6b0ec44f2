"""rawpaged against Hugging Face transformers: logits frozen by tools/make_golden.py (torch, fp32).

For a batch of prompts of different lengths run together (no padding), every prompt position and
16 decode steps must match within 1e-4 (logits and logprobs), and greedy continuations must be
equal. One fixture per architecture and RoPE scaling (tests/fixtures/README.md).
"""
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from paged_driver import PagedDriver, load_model
from rawpaged import LLM, SamplingParams
from rawpaged.sequence import Sequence

FIXTURES = Path(__file__).parent / "fixtures"
NAMES = ["llama-gqa", "llama-mqa-tied", "opt-preln", "opt-postln-proj",
         "llama-rope-linear", "llama-rope-dynamic", "llama-rope-yarn", "llama-rope-llama3",
         "mistral-swa", "qwen2-swa", "qwen3", "gemma", "phi3", "gpt2", "gpt-neox", "gpt-neox-seq"]


def log_softmax(x):
    x = np.asarray(x, np.float64)
    m = x.max(axis=-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


def assert_logits_match(got, want, what):
    """Logits within 1e-4 (relative and absolute) and logprobs within 1e-4 (absolute)."""
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4, err_msg=what)
    gap = np.abs(log_softmax(got) - log_softmax(want)).max()
    assert gap <= 1e-4, f"{what}: logprobs differ by {gap:.2e}"


def reference(name):
    ref = np.load(FIXTURES / name / "reference.npz")
    off = ref["prompt_offsets"]
    prompts = [ref["prompt_ids_flat"][off[i]:off[i + 1]].tolist() for i in range(len(off) - 1)]
    return ref, prompts


@pytest.fixture(scope="module", params=NAMES)
def fixture(request):
    name = request.param
    return name, load_model(FIXTURES / name), *reference(name)


def test_prompt_and_decode_logits_match_transformers(fixture):
    name, model, ref, prompts = fixture
    drv = PagedDriver(model, block_size=8, shuffle_seed=3)
    seqs = [Sequence(i, p) for i, p in enumerate(prompts)]
    # Prefill all prompts in one flattened batch, logits at every position.
    _, every = drv.step(seqs, [len(p) for p in prompts], prompt_logits=True)
    assert_logits_match(np.concatenate(every), ref["prompt_logits"], f"{name} prompt logits")
    # 16 decode steps, teacher-forced with the reference's greedy tokens.
    greedy = ref["greedy_ids"]
    for step in range(16):
        for s in seqs:
            s.append_token(int(greedy[s.seq_id, step]), 0.0)
        if step == 15:
            break
        last, _ = drv.step(seqs, [1] * len(seqs))
        assert_logits_match(last, ref["decode_logits"][:, step + 1], f"{name} decode step {step + 1}")


def test_greedy_generation_equals_transformers(fixture):
    name, _, ref, prompts = fixture
    llm = LLM(FIXTURES / name, device="cpu", kv_cache_memory=4 << 20, block_size=16)
    outs = llm.generate(None, SamplingParams(temperature=0, max_tokens=16, ignore_eos=True), prompt_token_ids=prompts)
    for i, out in enumerate(outs):
        assert out.outputs[0].token_ids == ref["greedy_ids"][i].tolist(), f"{name} prompt {i}"


def test_chunked_prefill_mixed_with_decode_changes_nothing(fixture):
    """A tiny token budget splits prompts into chunks that share steps with decode tokens."""
    name, _, ref, prompts = fixture
    llm = LLM(FIXTURES / name, device="cpu", kv_cache_memory=4 << 20, block_size=8, max_num_batched_tokens=6)
    outs = llm.generate(None, SamplingParams(temperature=0, max_tokens=16, ignore_eos=True), prompt_token_ids=prompts)
    assert [o.outputs[0].token_ids for o in outs] == ref["greedy_ids"].tolist()


def test_greedy_logprobs_equal_transformers(fixture):
    """What a user sees: the engine's logprobs of its greedy tokens against transformers' log-softmax."""
    name, _, ref, prompts = fixture
    llm = LLM(FIXTURES / name, device="cpu", kv_cache_memory=4 << 20, block_size=8)
    outs = llm.generate(None, SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, logprobs=1),
                        prompt_token_ids=prompts)
    want = log_softmax(ref["decode_logits"])                          # [B, 16, V]
    for i, out in enumerate(outs):
        for step, (tok, lps) in enumerate(zip(out.outputs[0].token_ids, out.outputs[0].logprobs)):
            assert abs(lps[tok] - want[i, step, tok]) <= 1e-4, f"{name} prompt {i} step {step}"


# --------------------------------------------------------------------------------------------
# The feature each new fixture exists for is really used: switched off, the answers change.
# --------------------------------------------------------------------------------------------
CONTRASTS = {
    # fixture: (config.json changes, what they switch off)
    "mistral-swa": ({"sliding_window": None}, "the sliding window (8 < the prompts of 11 and 17)"),
    "qwen2-swa": ({"use_sliding_window": False}, "layer 1's sliding window"),
    "phi3": ({"sliding_window": None}, "the sliding window"),
    "llama-rope-linear": ({"rope_scaling": None}, "linear RoPE scaling"),
    "llama-rope-dynamic": ({"rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
                            "max_position_embeddings": 64}, "dynamic NTK scaling"),
    "llama-rope-yarn": ({"rope_parameters": {"rope_type": "default", "rope_theta": 100.0}}, "YaRN"),
    "llama-rope-llama3": ({"rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}}, "llama3 scaling"),
    "gpt-neox-seq": ({"use_parallel_residual": True}, "the sequential residual"),
}


@pytest.mark.parametrize("name", sorted(CONTRASTS))
def test_switching_the_feature_off_changes_the_greedy_tokens(name, tmp_path):
    changes, what = CONTRASTS[name]
    ref, prompts = reference(name)
    model_dir = shutil.copytree(FIXTURES / name, tmp_path / name)
    cfg = json.loads((model_dir / "config.json").read_text())
    cfg.update(changes)
    (model_dir / "config.json").write_text(json.dumps(cfg))
    llm = LLM(model_dir, device="cpu", kv_cache_memory=4 << 20, block_size=8)
    outs = llm.generate(None, SamplingParams(temperature=0, max_tokens=16, ignore_eos=True), prompt_token_ids=prompts)
    assert [o.outputs[0].token_ids for o in outs] != ref["greedy_ids"].tolist(), f"{name}: {what} changes nothing"
