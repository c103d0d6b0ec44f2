"""rawpaged against Hugging Face transformers: logits frozen by tools/make_golden.py (torch, fp32).

For a batch of prompts of different lengths run together (no padding), every prompt position and
16 decode steps must match within 1e-4, and greedy continuations must be equal.
"""
from pathlib import Path

import numpy as np
import pytest

from paged_driver import PagedDriver, load_model
from rawpaged import LLM, SamplingParams
from rawpaged.sequence import Sequence

FIXTURES = Path(__file__).parent / "fixtures"
NAMES = ["llama-gqa", "llama-mqa-tied", "opt-preln", "opt-postln-proj"]


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
    np.testing.assert_allclose(np.concatenate(every), ref["prompt_logits"], rtol=1e-4, atol=1e-4)
    # 16 decode steps, teacher-forced with the reference's greedy tokens.
    greedy = ref["greedy_ids"]
    for step in range(16):
        for s in seqs:
            s.append_token(int(greedy[s.seq_id, step]), 0.0)
        if step == 15:
            break
        last, _ = drv.step(seqs, [1] * len(seqs))
        np.testing.assert_allclose(last, ref["decode_logits"][:, step + 1], rtol=1e-4, atol=1e-4,
                                   err_msg=f"{name} decode step {step + 1}")


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
