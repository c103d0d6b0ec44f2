"""stories260K (a real pretrained llama2.c model), converted by our tool, against its golden vector."""
import json

import numpy as np
import pytest

from rawpaged import LLM, SamplingParams


@pytest.fixture(scope="module")
def golden(data_dir):
    return json.loads((data_dir / "models" / "stories260K" / "greedy_reference.json").read_text())


@pytest.fixture(scope="module")
def llm(stories260k_dir):
    return LLM(stories260k_dir, device="cpu", kv_cache_memory=8 << 20)


def test_greedy_64_tokens_from_bos(llm, golden):
    out = llm.generate(None, SamplingParams(temperature=0, max_tokens=64, ignore_eos=True),
                       prompt_token_ids=[[golden["start_token"]]])[0]
    assert out.outputs[0].token_ids == golden["greedy_next_token_ids_64"]
    assert out.outputs[0].text.startswith("Once upon a time, there was a little girl named Lily")
    assert out.outputs[0].finish_reason == "length"


def test_position0_logits(llm, golden):
    from rawpaged.worker.model_runner import AttentionMetadata
    from rawpaged.sequence import ScheduledSeq
    from rawpaged.worker.model_runner import prepare_inputs
    from rawpaged.sequence import Sequence

    eng = llm.engine
    seq = Sequence(10**9, [golden["start_token"]])
    inputs = prepare_inputs([ScheduledSeq(seq, 1, [0], sample=True)], eng.config.block_size)
    hidden = eng.executor.model.forward(inputs.input_ids, inputs.positions, eng.executor.cache.device_cache, inputs.meta)
    logits = eng.executor.model.compute_logits(hidden)[0]
    np.testing.assert_allclose(logits[:8], golden["logits_pos0_first8"], rtol=1e-4, atol=1e-4)
    assert isinstance(inputs.meta, AttentionMetadata)


def test_batch_equals_alone(llm):
    """Continuous batching changes nothing: prompts of different lengths together vs one by one."""
    prompts = ["Once upon a time", "The cat sat", "Lily and Ben went to the park to play with a ball"]
    sp = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    together = llm.generate(prompts, sp)
    for p, t in zip(prompts, together):
        alone = llm.generate([p], sp)[0]
        assert alone.outputs[0].token_ids == t.outputs[0].token_ids
        assert alone.prompt_token_ids == t.prompt_token_ids


def test_seeded_sampling_reproducible(llm):
    sp = SamplingParams(temperature=0.8, seed=123, max_tokens=20, ignore_eos=True)
    a = llm.generate(["Once upon a time"], sp)[0].outputs[0].token_ids
    b = llm.generate(["Once upon a time"], sp)[0].outputs[0].token_ids
    c = llm.generate(["Once upon a time"], SamplingParams(temperature=0.8, seed=7, max_tokens=20, ignore_eos=True))[0]
    assert a == b
    assert len(a) == 20
    assert c.outputs[0].token_ids != a
