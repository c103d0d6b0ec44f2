"""End-to-end checks shared by tests/test_cuda_emulation_e2e.py (emulated kernels) and tests/gpu (a device).

16-bit runs are compared with the fp32 CPU engine by their logprobs. The bound is measured, not
fixed: the fp32 CPU engine on weights rounded to the 16-bit dtype gives the gap that rounding the
weights alone causes, and a 16-bit run (weights AND activations rounded, 16-bit GEMM outputs) may be
BOUND_MULTIPLE times that. Measured on the emulated backend (numbers in the tests' docstrings), the
full 16-bit gap is 1.2-2x the weight gap; a kernel bug (a wrong head, a skipped key, a wrong scale)
moves logprobs by 0.3-2, far beyond the bound.

The head-128 model: the fixtures from Hugging Face have head sizes 8 and 16, which only the generic
kernels take. `make_head128_llama` writes a random LLaMA with head size 128 and a GQA group of 4,
whose steps take the fast paths (paged_decode_*_hd128_g4, the tensor-core prefill, split-K on long
contexts, 16-byte cache writes, cuBLAS bf16 GEMMs).
"""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

from rawpaged.hub import DEMO_MODEL
from rawpaged.testing import make_random_llama

BOUND_MULTIPLE = 3

# NOTE: init_std 0.05 gives attention scores and logits a spread of ~1 (std 0.02 leaves every token
# near -log(512), where a broken kernel moves logprobs too little to tell from rounding).
HEAD128 = dict(hidden_size=512, num_layers=2, num_heads=4, num_kv_heads=1, vocab_size=512,
               max_position_embeddings=4096, init_std=0.05, seed=1)


def make_head128_llama(out_dir: Path) -> Path:
    """A random LLaMA (head size 128, 4 query heads sharing 1 KV head, 2 layers) with the demo
    model's 512-token tokenizer; float32 weights, written once per out_dir."""
    if not (out_dir / "config.json").is_file():
        make_random_llama(out_dir, DEMO_MODEL / "tokenizer.json", **HEAD128)
    return out_dir


def head128_prompts(long_context: int = 0) -> list[list[int]]:
    """Prompts of 40, 17, 5 and 70 tokens (several KV blocks, ends mid-block), plus one of
    `long_context` tokens when given (on a device: long enough for split-K decode)."""
    rng = np.random.default_rng(0)
    lens = [40, 17, 5, 70] + ([long_context] if long_context else [])
    return [rng.integers(3, HEAD128["vocab_size"], n).tolist() for n in lens]


def rounded_weights_copy(src: Path, dst: Path, dtype) -> Path:
    """The model directory with every weight rounded to `dtype` (float16 / bfloat16), stored as fp32."""
    from safetensors.numpy import load_file, save_file
    if dst.exists():
        return dst
    shutil.copytree(src, dst)
    for f in dst.glob("*.safetensors"):
        save_file({k: v.astype(dtype).astype(np.float32) for k, v in load_file(str(f)).items()}, str(f))
    return dst


def np_dtype(name: str):
    if name == "bfloat16":
        import ml_dtypes
        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


def _gap(got: dict, want: dict) -> float:
    common = set(got) & set(want)
    assert common, f"no token in common between {sorted(got)} and {sorted(want)}"
    return max(abs(got[t] - want[t]) for t in common)


def logprob_gaps(got, want) -> tuple[float, list[tuple]]:
    """Largest |logprob difference| over prompt positions (where prompt logprobs were asked for)
    and over decode steps up to the first step where the greedy tokens part; and the partings
    (prompt, step, got token, want token, want's logprobs at that step)."""
    worst, partings = 0.0, []
    for p, (g, c) in enumerate(zip(got, want)):
        for gd, cd in zip(g.prompt_logprobs or [], c.prompt_logprobs or []):
            if gd is not None and cd is not None:
                worst = max(worst, _gap(gd, cd))
        go, co = g.outputs[0], c.outputs[0]
        assert len(go.token_ids) == len(co.token_ids), f"prompt {p}: {len(go.token_ids)} vs {len(co.token_ids)} tokens"
        for step, (gt, ct) in enumerate(zip(go.token_ids, co.token_ids)):
            worst = max(worst, _gap(go.logprobs[step], co.logprobs[step]))
            if gt != ct:
                partings.append((p, step, gt, ct, co.logprobs[step]))
                break
    return worst, partings


def assert_follows_fp32(name: str, got, cpu, weight_gap: float) -> float:
    """A 16-bit run `got` stays within BOUND_MULTIPLE x the weight-rounding gap of the fp32 CPU
    run; where greedy tokens part, it is a near-tie broken the other way. Returns the gap."""
    tol = BOUND_MULTIPLE * max(weight_gap, 1e-3)
    gap, partings = logprob_gaps(got, cpu)
    assert gap <= tol, f"{name}: logprobs differ from fp32 by {gap:.4f} (> {tol:.4f}; weights alone: {weight_gap:.4f})"
    for p, step, gt, ct, lp in partings:
        assert gt in lp and abs(lp[gt] - lp[ct]) <= 2 * tol, f"{name} prompt {p} step {step}: chose {gt}, fp32 {ct} ({lp})"
    return gap
