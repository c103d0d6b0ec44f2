"""Offline throughput: rawpaged's continuous batching vs Hugging Face `generate` on padded batches.

    python bench/throughput.py [--num-requests 64] [--scale 0.25] [--max-len 512] [--hf-batch 8]

Requests: real ShareGPT first-turn prompts (tokenized with the LLaMA tokenizer) with output lengths
drawn from the ShareGPT length table; lengths are scaled by --scale and capped so prompt + output
fits --max-len. Outputs have a fixed length (ignore_eos). Model: a random LLaMA (hidden 512,
8 layers, 8 heads, 4 KV heads, vocab 32000) in fp32 on the CPU, or with `--shape llama7b` LLaMA-7B's
layer shapes with `--layers` layers (for `--device cuda`).

The baseline (only when torch and transformers import; they are never rawpaged dependencies) runs
the same weights through transformers' `generate`, FCFS batches of --hf-batch requests, left padding,
each batch decoding to its longest requested output: the static batching the paper compares against.
Only the requested tokens count as generated for both.
"""
from __future__ import annotations

import argparse
import csv
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import commit, data_dir, machine, random_llama, scratch_dir  # noqa: E402

_OMP_BEFORE = __import__("os").environ.get("OMP_WAIT_POLICY")   # before rawpaged sets its default


def make_workload(n: int, scale: float, max_len: int, seed: int = 0) -> list[tuple[list[int], int]]:
    from rawpaged.tokenizer import Tokenizer
    tok = Tokenizer.from_dir(data_dir() / "tokenizers" / "llama-32k")
    prompts = json.loads((data_dir() / "workloads" / "sharegpt_prompts_1000.json").read_text())
    with open(data_dir() / "workloads" / "sharegpt_multiturn_lengths.csv") as f:
        out_lens = [int(r["num_decode_tokens"]) for r in csv.DictReader(f)]
    rng = np.random.default_rng(seed)
    picks = rng.choice(len(prompts), n, replace=False)
    work = []
    for i in picks:
        ids = tok.encode(prompts[i]["conversations"][0]["value"])
        p_len = max(4, int(len(ids) * scale))
        o_len = max(4, int(out_lens[rng.integers(len(out_lens))] * scale))
        p_len = min(p_len, max_len // 2)
        o_len = min(o_len, max_len - p_len)
        work.append((ids[:p_len], o_len))
    return work


def run_rawpaged(model_dir: Path, work, args) -> dict:
    from rawpaged import LLM, SamplingParams
    llm = LLM(model_dir, device=args.device, kv_cache_memory=args.kv_memory if args.device == "cpu" else None,
              max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens)
    llm.generate(None, SamplingParams(temperature=0, max_tokens=2, ignore_eos=True),
                 prompt_token_ids=[w[0][:8] for w in work[:4]])                 # warm-up (Numba)
    llm.engine.stats.__init__()
    params = [SamplingParams(temperature=0, max_tokens=o, ignore_eos=True) for _, o in work]
    t = time.perf_counter()
    outs = llm.generate(None, params, prompt_token_ids=[p for p, _ in work])
    dt = time.perf_counter() - t
    assert all(len(o.outputs[0].token_ids) == w[1] for o, w in zip(outs, work))
    s = llm.get_stats()
    return {"seconds": dt, "mean_running": s["mean_running_seqs"], "waste": s["mean_waste_fraction"],
            "preemptions": s["num_preemptions_recompute"] + s["num_preemptions_swap"]}


def run_transformers(model_dir: Path, work, args) -> dict | None:
    """The baseline runs in a child process with the caller's environment: rawpaged's CPU backend
    sets OMP_WAIT_POLICY=PASSIVE for Numba, which would slow torch's OpenMP threads down."""
    import os
    import subprocess
    env = dict(os.environ)
    if _OMP_BEFORE is None:
        env.pop("OMP_WAIT_POLICY", None)
    else:
        env["OMP_WAIT_POLICY"] = _OMP_BEFORE
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(work, f)
    cmd = [sys.executable, __file__, "--baseline-child", f.name, "--model-dir", str(model_dir),
           "--hf-batch", str(args.hf_batch), "--threads", str(args.threads), "--device", args.device]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True)
    os.unlink(f.name)
    if r.returncode != 0:
        print(f"transformers baseline skipped: {r.stderr.strip().splitlines()[-1] if r.stderr.strip() else r.returncode}")
        return None
    return json.loads(r.stdout.strip().splitlines()[-1])


def _transformers_child(args) -> None:
    import torch
    from transformers import LlamaForCausalLM
    model_dir = Path(args.model_dir)
    work = [(p, o) for p, o in json.loads(Path(args.baseline_child).read_text())]
    torch.set_num_threads(args.threads)
    dev = "cuda" if args.device == "cuda" else "cpu"
    dtype = torch.float16 if dev == "cuda" else torch.float32
    model = LlamaForCausalLM.from_pretrained(model_dir, dtype=dtype).to(dev).eval()
    with torch.inference_mode():                          # warm-up, as rawpaged gets one
        model.generate(input_ids=torch.tensor([work[0][0][:8]], device=dev), max_new_tokens=2,
                       min_new_tokens=2, do_sample=False, pad_token_id=0)
    t = time.perf_counter()
    with torch.inference_mode():
        for i in range(0, len(work), args.hf_batch):
            batch = work[i:i + args.hf_batch]
            L = max(len(p) for p, _ in batch)
            ids = torch.zeros((len(batch), L), dtype=torch.long)
            mask = torch.zeros((len(batch), L), dtype=torch.long)
            for j, (p, _) in enumerate(batch):               # left padding
                ids[j, L - len(p):] = torch.tensor(p)
                mask[j, L - len(p):] = 1
            new = max(o for _, o in batch)
            model.generate(input_ids=ids.to(dev), attention_mask=mask.to(dev), max_new_tokens=new, min_new_tokens=new,
                           do_sample=False, pad_token_id=0)
    if dev == "cuda":
        torch.cuda.synchronize()
    print(json.dumps({"seconds": time.perf_counter() - t}))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--num-requests", type=int, default=64)
    ap.add_argument("--scale", type=float, default=0.25)
    ap.add_argument("--max-len", type=int, default=512)
    ap.add_argument("--hf-batch", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--kv-memory", type=int, default=512 << 20)
    ap.add_argument("--max-num-seqs", type=int, default=64)
    ap.add_argument("--max-num-batched-tokens", type=int, default=2048)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--shape", default="small", choices=["small", "llama7b"],
                    help="small: hidden 512 x 8 layers; llama7b: LLaMA-7B's layer shapes (hidden 4096, "
                         "32 heads, FFN 11008) with --layers layers, stored in fp16")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--baseline-child", help=argparse.SUPPRESS)
    ap.add_argument("--model-dir", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.baseline_child:
        return _transformers_child(args)
    root = scratch_dir()
    if args.shape == "small":
        model_dir = random_llama(root, max_position_embeddings=args.max_len)
    else:
        model_dir = random_llama(root, hidden_size=4096, num_layers=args.layers, num_heads=32, num_kv_heads=32,
                                 intermediate_size=11008, max_position_embeddings=max(args.max_len, 2048),
                                 dtype="float16")
    work = make_workload(args.num_requests, args.scale, args.max_len)
    n_in, n_out = sum(len(p) for p, _ in work), sum(o for _, o in work)
    print(f"machine: {machine()}; commit {commit()}")
    print(f"{len(work)} requests, mean input {n_in / len(work):.1f} / output {n_out / len(work):.1f} tokens "
          f"(ShareGPT scaled by {args.scale}, capped at {args.max_len})\n")
    rows = [("rawpaged (continuous batching, paged KV)", run_rawpaged(model_dir, work, args))]
    hf = run_transformers(model_dir, work, args)
    if hf is not None:
        rows.append((f"transformers generate (padded batches of {args.hf_batch})", hf))
    print("| system | req/s | generated tok/s | total tok/s | vs transformers |")
    print("| --- | ---: | ---: | ---: | ---: |")
    base = hf["seconds"] if hf else None
    for name, r in rows:
        s = r["seconds"]
        ratio = f"{base / s:.2f}x" if base else "n/a"
        print(f"| {name} | {len(work) / s:.2f} | {n_out / s:,.1f} | {(n_in + n_out) / s:,.1f} | {ratio} |")
    r = rows[0][1]
    print(f"\nrawpaged: mean running sequences {r['mean_running']:.1f}, mean KV waste "
          f"{100 * r['waste']:.1f}% of allocated slots, {r['preemptions']} preemptions")


if __name__ == "__main__":
    main()
