"""Structured outputs offline: SamplingParams' checks, the mask in the sampler (NumPy and the CUDA
backend's array module under the emulator), and LLM.generate constrained by a JSON schema, a regex,
a choice and a grammar on a RANDOM model (so the constraint, not the model, makes the output valid),
with parallel samples, beam search and preemption.

The outputs are checked by tools nobody here wrote: `jsonschema` for schemas, Python's `re` for
regexes.
"""
from __future__ import annotations

import json
import re

import numpy as np
import pytest

from cuda_emulator import CXX, fake_cupy, install, uninstall_caches
from rawpaged import LLM, SamplingParams
from rawpaged.sampler import Sampler, SamplingRow, TokenMask, unpack_mask
from rawpaged.sampling_params import SamplingParamsError, StructuredOutputsParams
from rawpaged.worker.cache_engine import block_bytes

jsonschema = pytest.importorskip("jsonschema")

# A schema whose every output is bounded (so a random model always finishes it), with strings,
# bounded integers, an enum array, a nested object, a pattern, booleans and an optional field.
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "minLength": 1, "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "email": {"type": "string", "pattern": "^[a-z]{1,6}@[a-z]{1,6}\\.(com|org)$"},
        "tags": {"type": "array", "items": {"enum": ["red", "green", "blue"]}, "maxItems": 3},
        "home": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 8},
                                                  "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
                 "required": ["city", "zip"]},
        "active": {"type": "boolean"},
        "nick": {"type": "string", "maxLength": 4},
    },
    "required": ["name", "age", "email", "tags", "home", "active"],
}
SMALL = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 99},
                                          "pick": {"enum": ["x", "yy"]}, "ok": {"type": "boolean"}},
         "required": ["n", "pick", "ok"]}
REGEX = r"(yes|no), [a-z]{2,5} [0-9]{1,3}(\.[0-9])?"
GRAMMAR = 'start: "(" expr ")"\nexpr: NUM | NUM "+" NUM\nNUM: /[0-9]{1,3}/'


def _validator(schema, strict=True):
    """jsonschema's check, with OpenAI's strict reading (no extra properties) when asked."""
    from rawpaged.structured_output import no_extra_properties
    return jsonschema.Draft202012Validator(no_extra_properties(schema) if strict else schema)


# -- SamplingParams ---------------------------------------------------------------------------
@pytest.mark.parametrize("so,needle", [
    ({"json": {"type": "objectx"}}, "structured_outputs.json is not valid: Invalid type: objectx"),
    ({"json": "{not json"}, "structured_outputs.json is not valid JSON"),
    ({"json": [1, 2]}, "structured_outputs.json must be a JSON schema"),
    ({"regex": "a(b"}, "structured_outputs.regex is not valid"),
    ({"grammar": "start: foo"}, "structured_outputs.grammar is not valid"),
    ({"grammar": "root ::= (\"a\""}, "structured_outputs.grammar is not valid"),
    ({"choice": []}, "structured_outputs.choice must be a non-empty list of strings"),
    ({"choice": ["a", 1]}, "structured_outputs.choice must be a non-empty list of strings"),
    ({}, "needs exactly one of json, json_object, regex, choice, grammar, got none"),
    ({"json": {}, "regex": "a"}, "got json, regex"),
    ({"regex": "a", "bogus": 1}, "unknown field(s) 'bogus'"),
    ({"json": {"type": "object"}, "whitespace_pattern": "[ "}, "structured_outputs.json is not valid"),
    ("json", "structured_outputs must be a StructuredOutputsParams"),
])
def test_bad_constraints_are_one_line_errors_naming_the_field(so, needle):
    with pytest.raises(SamplingParamsError) as e:
        SamplingParams(structured_outputs=so)
    assert e.value.param == "structured_outputs"
    assert needle in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_constraints_compile_once_in_the_validator():
    sp = SamplingParams(structured_outputs={"choice": ["yes", "no"]})
    assert isinstance(sp.structured_outputs, StructuredOutputsParams) and sp.structured_outputs.kind == "choice"
    assert "yes" in sp.structured_outputs.compiled
    sp = SamplingParams(structured_outputs=StructuredOutputsParams(json=json.dumps(PERSON)))
    assert sp.structured_outputs.kind == "json" and sp.structured_outputs.compiled


# -- the mask in the sampler --------------------------------------------------------------------
def _ref_unpack(bits: np.ndarray, vocab: int) -> np.ndarray:
    """Token by token: bit t % 32 of word t // 32 (llguidance's layout)."""
    out = np.zeros((bits.shape[0], vocab), dtype=bool)
    for r in range(bits.shape[0]):
        for t in range(vocab):
            out[r, t] = (int(bits[r, t // 32]) >> (t % 32)) & 1
    return out


def _pack(allowed: np.ndarray) -> np.ndarray:
    """bool [rows, vocab] -> llguidance's packed int32 [rows, ceil(vocab/32)] (NumPy, by weights)."""
    rows, vocab = allowed.shape
    words = (vocab + 31) // 32
    padded = np.zeros((rows, words * 32), dtype=bool)
    padded[:, :vocab] = allowed
    weights = np.uint64(1) << np.arange(32, dtype=np.uint64)
    return (padded.reshape(rows, words, 32) * weights).sum(-1).astype(np.uint32).view(np.int32)


def _random_allowed(rng, rows, vocab, density=0.3):
    allowed = rng.random((rows, vocab)) < density
    allowed[np.arange(rows), rng.integers(0, vocab, rows)] = True     # never an empty row
    return allowed


@pytest.mark.parametrize("vocab", [1, 31, 32, 33, 1000])
def test_unpack_mask_numpy_and_device_paths_match_reference(vocab):
    rng = np.random.default_rng(vocab)
    allowed = _random_allowed(rng, 5, vocab)
    bits = _pack(allowed)
    assert np.array_equal(_ref_unpack(bits, vocab), allowed)
    assert np.array_equal(unpack_mask(np, bits, vocab), allowed)
    dev = unpack_mask(fake_cupy, bits, vocab)                  # the shift path CuPy runs
    assert type(dev).__name__ == "EmuArray" and np.array_equal(dev.get(), allowed)


def _rows(n, seed, **params):
    return [SamplingRow(SamplingParams(seed=seed, **params), [1, 2], [], np.random.default_rng([seed, i]), 3)
            for i in range(n)]


@pytest.mark.parametrize("params", [dict(temperature=0.0), dict(temperature=1.0),
                                    dict(temperature=0.7, top_k=50, top_p=0.9, min_p=0.01),
                                    dict(temperature=1.0, presence_penalty=1.0, logit_bias={0: 100.0})])
@pytest.mark.parametrize("xp_name", ["numpy", "emulated_cupy"])
def test_masked_rows_sample_only_allowed_tokens(params, xp_name):
    xp = np if xp_name == "numpy" else fake_cupy
    rng = np.random.default_rng(7)
    B, V = 6, 300
    logits = (rng.standard_normal((B, V)) * 3).astype(np.float32)
    logits[:, 0] = 50.0                                         # the model's favourite: forbidden below
    allowed = _random_allowed(rng, 4, V, density=0.05)
    allowed[:, 0] = False
    allowed[:, 1] = True
    mask = TokenMask([0, 2, 3, 5], _pack(allowed))
    dev = xp.asarray(logits)
    for trial in range(20):
        rows = _rows(B, seed=trial, **params)
        res = Sampler(xp, seed=trial)(dev, rows, mask)
        for k, r in enumerate(mask.rows):
            assert allowed[k, res[r].token_id], (trial, r, res[r].token_id)
            tops = res[r].top_logprobs
            assert all(allowed[k, t] for t in tops), tops           # forbidden never ranks
        free = Sampler(xp, seed=trial)(dev, _rows(B, seed=trial, **params))
        for r in (1, 4):                                              # unconstrained rows: unchanged
            assert res[r].token_id == free[r].token_id and res[r].top_logprobs == free[r].top_logprobs
    # The logprob of a token is the model's (normalized over the whole vocabulary), masked or not.
    raw = logits.astype(np.float64)
    lse = np.log(np.exp(raw - raw.max(-1, keepdims=True)).sum(-1)) + raw.max(-1)
    for k, r in enumerate(mask.rows):
        assert res[r].logprob == pytest.approx(raw[r, res[r].token_id] - lse[r], abs=1e-4)


def test_masked_sampling_follows_the_renormalized_distribution():
    """Sampling a masked row at temperature 1 draws from softmax over the allowed tokens only."""
    V = 8
    logits = np.log(np.array([[0.4, 0.1, 0.2, 0.05, 0.05, 0.1, 0.05, 0.05]], dtype=np.float32))
    allowed = np.array([[False, True, True, False, False, True, False, False]])
    mask = TokenMask([0], _pack(allowed))
    sampler = Sampler(np, seed=0)
    rows = [SamplingRow(SamplingParams(), [1], [], None, None)]
    counts = np.bincount([sampler(logits, rows, mask)[0].token_id for _ in range(4000)], minlength=V)
    assert counts[~allowed[0]].sum() == 0
    want = np.array([0.1, 0.2, 0.1]) / 0.4
    assert np.allclose(counts[allowed[0]] / 4000, want, atol=0.03), counts


def test_topk_logprobs_masked_for_beam_search():
    rng = np.random.default_rng(3)
    logits = (rng.standard_normal((3, 64)) * 2).astype(np.float32)
    allowed = np.zeros((2, 64), dtype=bool)
    allowed[0, [5, 9]] = True
    allowed[1, 10:30] = True
    vals, ids = Sampler(np).topk_logprobs(logits, 4, TokenMask([0, 2], _pack(allowed)))
    free_vals, free_ids = Sampler(np).topk_logprobs(logits, 4)
    assert set(ids[0, :2].tolist()) == {5, 9} and np.all(np.isneginf(vals[0, 2:]))
    assert all(allowed[1, t] for t in ids[2]) and np.all(np.isfinite(vals[2]))
    assert np.array_equal(ids[1], free_ids[1]) and np.array_equal(vals[1], free_vals[1])
    lse = np.log(np.exp(logits[0].astype(np.float64)).sum())
    assert vals[0, 0] == pytest.approx(max(logits[0, 5], logits[0, 9]) - lse, abs=1e-5)


# -- LLM.generate on a random model -------------------------------------------------------------
@pytest.fixture(scope="module")
def random_dir(tmp_path_factory):
    """Random weights with the demo model's real tokenizer (SentencePiece, 512 tokens, byte fallback:
    any JSON can be spelled). The server tests use the 32000-token LLaMA tokenizer."""
    from rawpaged.hub import DEMO_MODEL
    from rawpaged.testing import make_random_llama
    return make_random_llama(tmp_path_factory.mktemp("so") / "m", DEMO_MODEL / "tokenizer.json",
                             hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, vocab_size=512,
                             max_position_embeddings=1024, init_std=0.5, seed=3)


@pytest.fixture(scope="module")
def llm(random_dir):
    return LLM(random_dir, device="cpu", kv_cache_memory=block_bytes_for(random_dir, 4096))


def block_bytes_for(path, blocks, block_size=16):
    from rawpaged.config import ModelConfig
    return blocks * block_bytes(ModelConfig.from_dir(path), block_size, np.float32)


def _texts(outs):
    return [c for o in outs for c in o.outputs]


def test_json_schema_50_seeded_samples_validate(llm):
    sp = SamplingParams(n=50, temperature=1.0, seed=11, max_tokens=500,
                        structured_outputs=StructuredOutputsParams(json=PERSON, strict=True))
    (out,) = llm.generate(["Write a person as JSON:"], sp)
    validator = _validator(PERSON)
    assert len(out.outputs) == 50
    for c in out.outputs:
        assert c.finish_reason == "stop", (c.text, c.finish_reason)
        validator.validate(json.loads(c.text))
    assert len({c.text for c in out.outputs}) > 40            # samples, not one answer repeated
    # The model alone writes no JSON: the constraint made these.
    (free,) = llm.generate(["Write a person as JSON:"], SamplingParams(n=5, seed=11, max_tokens=40))
    assert not any(c.text.startswith("{") for c in free.outputs)


def test_regex_choice_grammar_and_json_object(llm):
    prompts = [f"prompt {i}" for i in range(8)]
    outs = llm.generate(prompts, SamplingParams(temperature=1.0, seed=5, max_tokens=40,
                                                structured_outputs={"regex": REGEX}))
    for c in _texts(outs):
        assert c.finish_reason == "stop" and re.fullmatch(REGEX, c.text), c.text
    choices = ["alpha", "beta gamma", "δ"]
    outs = llm.generate(prompts, SamplingParams(temperature=1.0, seed=5, max_tokens=20,
                                                structured_outputs={"choice": choices}))
    got = [c.text for c in _texts(outs)]
    assert all(t in choices for t in got) and len(set(got)) > 1, got
    outs = llm.generate(prompts, SamplingParams(temperature=1.0, seed=5, max_tokens=20,
                                                structured_outputs={"grammar": GRAMMAR}))
    for c in _texts(outs):
        assert re.fullmatch(r"\(\d{1,3}(\+\d{1,3})?\)", c.text), c.text
    outs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=12,
                                                structured_outputs={"json_object": True}))
    for c in _texts(outs):
        assert c.text.startswith("{") and "\n" not in c.text and " " not in c.text[:2]


def test_eos_only_where_the_grammar_accepts(llm):
    """With EOS pushed to the top of every row, a constrained answer still completes its grammar."""
    eos = llm.tokenizer.eos_token_id
    sp = SamplingParams(temperature=0.0, max_tokens=60, logit_bias={eos: 100.0},
                        structured_outputs={"regex": "[a-z]{3}(-[a-z]{3})*"})
    (out,) = llm.generate(["x"], sp)
    c = out.outputs[0]
    assert re.fullmatch("[a-z]{3}", c.text) and c.token_ids[-1] == eos and c.finish_reason == "stop", c
    # Free, the same bias ends it at once.
    (free,) = llm.generate(["x"], SamplingParams(temperature=0.0, max_tokens=60, logit_bias={eos: 100.0}))
    assert free.outputs[0].token_ids == [eos]


def test_complete_grammar_stops_without_eos(llm):
    sp = SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True, structured_outputs={"choice": ["done"]})
    (out,) = llm.generate(["x"], sp)
    c = out.outputs[0]
    assert c.text == "done" and c.finish_reason == "stop" and c.stop_reason is None
    assert llm.tokenizer.eos_token_id not in c.token_ids


def test_parallel_samples_and_beams_are_constrained(llm):
    sp = SamplingParams(n=3, best_of=5, temperature=1.0, seed=2, max_tokens=500,
                        structured_outputs={"json": PERSON, "strict": True})
    (out,) = llm.generate(["p"], sp)
    assert len(out.outputs) == 3
    for c in out.outputs:
        _validator(PERSON).validate(json.loads(c.text))
    sp = SamplingParams(n=3, use_beam_search=True, temperature=0.0, max_tokens=40,
                        structured_outputs={"regex": REGEX})
    (out,) = llm.generate(["p"], sp)
    assert len(out.outputs) == 3
    for c in out.outputs:
        assert re.fullmatch(REGEX, c.text) and c.finish_reason == "stop", c.text
    scores = [c.cumulative_logprob for c in out.outputs]
    assert all(np.isfinite(scores))


def test_grammar_state_forked_and_released(llm):
    """Forked samples advance their own matchers; finished ones release theirs."""
    engine = llm.engine
    sp = SamplingParams(n=4, temperature=1.0, seed=9, max_tokens=500, structured_outputs={"json": PERSON, "strict": True})
    engine.add_request("fork", "p", sp)
    engine.step()                                             # prefill + fork
    seqs = engine.groups["fork"].seqs
    assert len(seqs) == 4 and len({id(s.constraint) for s in seqs}) == 4
    assert len({id(s.constraint.matcher) for s in seqs}) == 4
    while engine.has_unfinished_requests():
        outs = engine.step()
    (out,) = outs
    assert all(s.constraint is None for s in seqs)
    assert all(o.finish_reason == "stop" for o in out.outputs)


def test_masks_prefetched_while_the_model_runs(random_dir):
    """Every mask comes from the fill started before the model ran (forks use their parent's row,
    beams are scheduled rows), and the answers equal those computed with no prefetch."""
    sp = [SamplingParams(n=3, temperature=1.0, seed=1, max_tokens=200, structured_outputs={"json": SMALL}),
          SamplingParams(n=2, use_beam_search=True, temperature=0.0, max_tokens=30, structured_outputs={"regex": REGEX}),
          SamplingParams(temperature=1.0, seed=2, max_tokens=20)]
    prompts = ["a", "b", "c"]

    def run(prefetch: bool):
        llm = LLM(random_dir, device="cpu", kv_cache_memory=block_bytes_for(random_dir, 256))
        g, op = llm.engine.grammars, llm.engine.output_processor
        calls = {"now": 0, "prefetched": 0}
        fill, fill_async = g.fill_bitmask, g.fill_bitmask_async

        def counted(name, fn):
            def wrapped(*a):
                calls[name] += 1
                return fn(*a)
            return wrapped
        g.fill_bitmask_async = counted("prefetched", fill_async)
        op._token_mask = _direct_calls(op._token_mask, g, calls, fill)
        if not prefetch:
            op.prefetch_masks = lambda out: None
        outs = llm.generate(prompts, sp)
        return [[c.token_ids for c in o.outputs] for o in outs], calls

    with_prefetch, calls = run(True)
    assert calls["prefetched"] > 10 and calls["now"] == 0, calls
    without, calls = run(False)
    assert calls["prefetched"] == 0 and calls["now"] > 10
    assert with_prefetch == without


def _direct_calls(token_mask, grammars, calls, fill):
    """Count the fills _token_mask makes itself (no prefetched mask to use)."""
    def wrapped(seqs):
        def now(states):
            calls["now"] += 1
            return fill(states)
        grammars.fill_bitmask = now
        try:
            return token_mask(seqs)
        finally:
            grammars.fill_bitmask = fill
    return wrapped


@pytest.mark.parametrize("mode", ["recompute", "swap"])
def test_preemption_keeps_grammar_state(random_dir, mode):
    """A tiny KV cache and many constrained requests: preempted (recomputed or swapped) sequences keep
    their accepted tokens and their matchers; the outputs are valid and equal an unpreempted run."""
    prompts = [f"request number {i} asks for a person" for i in range(16)]
    sp = [SamplingParams(n=1 if i % 3 else 2, temperature=1.0, seed=100 + i, max_tokens=64,
                         structured_outputs={"json": SMALL, "strict": True}) for i in range(16)]
    free = LLM(random_dir, device="cpu", kv_cache_memory=block_bytes_for(random_dir, 1024))
    want = [[c.token_ids for c in o.outputs] for o in free.generate(prompts, sp)]
    assert free.get_stats()["num_preemptions_recompute"] + free.get_stats()["num_preemptions_swap"] == 0
    tight = LLM(random_dir, device="cpu", kv_cache_memory=block_bytes_for(random_dir, 16),
                preemption_mode=mode, swap_space=0.01)
    outs = tight.generate(prompts, sp)
    stats = tight.get_stats()
    assert stats[f"num_preemptions_{mode}"] >= 5, stats
    validator = _validator(SMALL)
    for o in outs:
        for c in o.outputs:
            validator.validate(json.loads(c.text))
    assert [[c.token_ids for c in o.outputs] for o in outs] == want


def test_bad_grammar_refused_before_anything_runs(llm):
    with pytest.raises(SamplingParamsError):
        llm.generate(["a", "b"], [SamplingParams(), SamplingParams(structured_outputs={"regex": "("})])
    assert not llm.engine.has_unfinished_requests()


# -- the CUDA backend (host emulation) ----------------------------------------------------------
@pytest.mark.skipif(CXX is None, reason="no C++ compiler (g++) to build the host emulation")
def test_cuda_backend_constrained_generation(monkeypatch, stories260k_dir):
    """The whole engine on the CUDA backend's array module: the mask is unpacked and applied on the
    device arrays, and the outputs equal the CPU backend's."""
    sp = [SamplingParams(n=2, temperature=1.0, seed=4, max_tokens=120, structured_outputs={"json": SMALL, "strict": True}),
          SamplingParams(temperature=0.0, max_tokens=40, structured_outputs={"regex": REGEX}),
          SamplingParams(n=2, use_beam_search=True, temperature=0.0, max_tokens=30,
                         structured_outputs={"choice": ["once", "upon", "a time"]})]
    prompts = ["Once upon a time", "The cat", "Lily"]
    cpu = LLM(str(stories260k_dir), device="cpu", kv_cache_memory=1 << 20).generate(prompts, sp)
    install(monkeypatch)
    try:
        llm = LLM(str(stories260k_dir), device="cuda", dtype="float32", kv_cache_memory=1 << 20, swap_space=0.001)
        assert llm.engine.output_processor.sampler.xp is fake_cupy
        gpu = llm.generate(prompts, sp)
    finally:
        uninstall_caches()
    for c in gpu[0].outputs:
        _validator(SMALL).validate(json.loads(c.text))
    assert re.fullmatch(REGEX, gpu[1].outputs[0].text)
    assert {c.text for c in gpu[2].outputs} <= {"once", "upon", "a time"}
    assert [[c.token_ids for c in o.outputs] for o in gpu] == [[c.token_ids for c in o.outputs] for o in cpu]
