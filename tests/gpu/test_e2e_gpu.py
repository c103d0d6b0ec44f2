"""End to end on the GPU, through the public API (LLM / SamplingParams).

- the four golden fixtures (tests/fixtures/*) in fp16 on the GPU agree with the same engine in fp32
  on the CPU: prompt logprobs and decode logprobs within 1e-2 (absolute + relative);
- stories260K (a real pretrained model) greedy on the GPU equals its golden 64 ids;
- preemption by swap (tiny KV budget, many sequences) gives the same greedy outputs as no preemption.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("cupy")

from rawpaged import LLM, SamplingParams  # noqa: E402

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
NAMES = ["llama-gqa", "llama-mqa-tied", "opt-preln", "opt-postln-proj"]
TOL = 1e-2


def _prompts(name: str) -> list[list[int]]:
    path = FIXTURES / name / "reference.npz"
    if not path.is_file():
        pytest.skip(f"fixture {path} not found")
    ref = np.load(path)
    flat, offs = ref["prompt_ids_flat"], ref["prompt_offsets"]
    return [flat[offs[i]: offs[i + 1]].tolist() for i in range(len(offs) - 1)]


def _close(a: float, b: float) -> bool:
    return abs(a - b) <= TOL + TOL * abs(b)


def _compare_dicts(got: dict, want: dict, where: str) -> None:
    common = set(got) & set(want)
    assert common, f"{where}: no token in common between GPU {sorted(got)} and CPU {sorted(want)}"
    for tok in common:
        assert _close(got[tok], want[tok]), f"{where} token {tok}: GPU {got[tok]} vs CPU {want[tok]}"


@pytest.mark.parametrize("name", NAMES)
def test_fixture_fp16_gpu_matches_fp32_cpu(name):
    prompts = _prompts(name)
    params = SamplingParams(temperature=0.0, max_tokens=8, logprobs=5, prompt_logprobs=5, ignore_eos=True)
    model = str(FIXTURES / name)
    gpu = LLM(model=model, device="cuda", dtype="float16").generate(prompt_token_ids=prompts, sampling_params=params)
    cpu = LLM(model=model, device="cpu").generate(prompt_token_ids=prompts, sampling_params=params)
    for p, (g, c) in enumerate(zip(gpu, cpu)):
        for i, (gd, cd) in enumerate(zip(g.prompt_logprobs or [], c.prompt_logprobs or [])):
            if gd is None or cd is None:
                continue
            _compare_dicts(gd, cd, f"{name} prompt {p} position {i}")
        go, co = g.outputs[0], c.outputs[0]
        for step, (gt, ct) in enumerate(zip(go.token_ids, co.token_ids)):
            _compare_dicts(go.logprobs[step], co.logprobs[step], f"{name} prompt {p} decode step {step}")
            if gt != ct:
                # fp16 may break a near-tie the other way: then both choices must be (almost) tied on the CPU
                lp = co.logprobs[step]
                assert gt in lp and abs(lp[gt] - lp[ct]) <= 2 * TOL, f"{name} prompt {p} step {step}: GPU chose {gt}, CPU {ct} ({lp})"
                break


def _stories_reference(data_dir: Path) -> list[int]:
    path = data_dir / "models" / "stories260K" / "greedy_reference.json"
    if not path.is_file():
        pytest.skip(f"{path} not found")
    return json.loads(path.read_text())["greedy_next_token_ids_64"]


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_stories260k_greedy_equals_golden(stories260k_dir, data_dir, dtype):
    want = _stories_reference(data_dir)
    llm = LLM(model=str(stories260k_dir), device="cuda", dtype=dtype)
    out = llm.generate(prompt_token_ids=[[1]], sampling_params=SamplingParams(temperature=0.0, max_tokens=64, ignore_eos=True))
    assert out[0].outputs[0].token_ids == want


def test_preemption_by_swap_changes_nothing(stories260k_dir):
    prompts = [[1] + [(7 * i + 3 * j) % 500 + 3 for j in range(5 + i % 7)] for i in range(24)]
    # NOTE: greedy, as the issue asks: sampled tokens could legitimately differ where cuBLAS rounds a
    # differently sized batch differently; swapping itself must restore the KV bit for bit.
    params = SamplingParams(temperature=0.0, max_tokens=48, ignore_eos=True)
    free = LLM(model=str(stories260k_dir), device="cuda", dtype="float16")
    want = [[o.token_ids for o in r.outputs] for r in free.generate(prompt_token_ids=prompts, sampling_params=params)]
    # 48 blocks of 16 tokens for 24 sequences growing to ~60 tokens: swapping is forced
    block_bytes = 5 * 2 * 4 * 16 * 8 * 2
    tight = LLM(model=str(stories260k_dir), device="cuda", dtype="float16", kv_cache_memory=48 * block_bytes,
                preemption_mode="swap", swap_space=0.01)
    got = [[o.token_ids for o in r.outputs] for r in tight.generate(prompt_token_ids=prompts, sampling_params=params)]
    stats = tight.get_stats()
    assert stats["num_preemptions_swap"] > 0, stats
    assert got == want
