"""End to end on the GPU, through the public API (LLM / SamplingParams).

- the four golden fixtures (tests/fixtures/*) in fp16 on the GPU agree with the same engine in fp32
  on the CPU: prompt and decode logprobs within 3x what rounding the weights to fp16 alone causes;
- stories260K (a real pretrained model) greedy on the GPU equals its golden 64 ids;
- preemption by swap (tiny KV budget, many sequences) gives the same greedy outputs as no preemption.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("cupy")

from rawpaged import LLM, SamplingParams  # noqa: E402

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
NAMES = ["llama-gqa", "llama-mqa-tied", "opt-preln", "opt-postln-proj"]


def _prompts(name: str) -> list[list[int]]:
    path = FIXTURES / name / "reference.npz"
    if not path.is_file():
        pytest.skip(f"fixture {path} not found")
    ref = np.load(path)
    flat, offs = ref["prompt_ids_flat"], ref["prompt_offsets"]
    return [flat[offs[i]: offs[i + 1]].tolist() for i in range(len(offs) - 1)]


def _fp16_weights_copy(src: Path, dst: Path) -> Path:
    """The model directory with every weight rounded to fp16 (stored back as fp32)."""
    from safetensors.numpy import load_file, save_file
    shutil.copytree(src, dst)
    for f in dst.glob("*.safetensors"):
        save_file({k: v.astype(np.float16).astype(np.float32) for k, v in load_file(str(f)).items()}, str(f))
    return dst


def _gap(got: dict, want: dict) -> float:
    common = set(got) & set(want)
    assert common, f"no token in common between {sorted(got)} and {sorted(want)}"
    return max(abs(got[t] - want[t]) for t in common)


def _logprob_gaps(got, want):
    """Largest |logprob difference| over prompt positions and over decode steps up to the first
    step where the greedy tokens part; and the partings (prompt, step, got token, want token, want lps)."""
    worst, partings = 0.0, []
    for p, (g, c) in enumerate(zip(got, want)):
        for gd, cd in zip(g.prompt_logprobs or [], c.prompt_logprobs or []):
            if gd is not None and cd is not None:
                worst = max(worst, _gap(gd, cd))
        go, co = g.outputs[0], c.outputs[0]
        for step, (gt, ct) in enumerate(zip(go.token_ids, co.token_ids)):
            worst = max(worst, _gap(go.logprobs[step], co.logprobs[step]))
            if gt != ct:
                partings.append((p, step, gt, ct, co.logprobs[step]))
                break
    return worst, partings


@pytest.mark.parametrize("name", NAMES)
def test_fixture_fp16_gpu_matches_fp32_cpu(name, tmp_path):
    """fp16 on the GPU stays as close to fp32 on the CPU as fp16 allows.

    NOTE: a fixed 1e-2 is tighter than fp16 can be on these random fixtures (logits up to ~10):
    rounding only the weights to fp16 already moves logprobs by 0.017-0.028 in fp32 arithmetic
    (measured on the emulated backend, tests/test_cuda_emulation_e2e.py). The bound is measured per
    fixture: the fp32 CPU engine on fp16-rounded weights gives the weight-rounding gap, and fp16
    (weights and activations rounded) may be 3x that. A kernel bug moves logprobs by ~1.
    """
    prompts = _prompts(name)
    params = SamplingParams(temperature=0.0, max_tokens=8, logprobs=5, prompt_logprobs=5, ignore_eos=True)
    model = FIXTURES / name
    run_cpu = lambda path: LLM(model=str(path), device="cpu").generate(prompt_token_ids=prompts, sampling_params=params)  # noqa: E731
    cpu = run_cpu(model)
    weight_gap, _ = _logprob_gaps(run_cpu(_fp16_weights_copy(model, tmp_path / name)), cpu)
    tol = 3 * max(weight_gap, 1e-3)
    gpu = LLM(model=str(model), device="cuda", dtype="float16").generate(prompt_token_ids=prompts, sampling_params=params)
    gap, partings = _logprob_gaps(gpu, cpu)
    assert gap <= tol, f"{name}: GPU fp16 logprobs differ from CPU fp32 by {gap:.4f} (fp16 weights alone: {weight_gap:.4f})"
    for p, step, gt, ct, lp in partings:       # fp16 may break a near-tie the other way, nothing more
        assert gt in lp and abs(lp[gt] - lp[ct]) <= 2 * tol, f"{name} prompt {p} step {step}: GPU chose {gt}, CPU {ct} ({lp})"


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
