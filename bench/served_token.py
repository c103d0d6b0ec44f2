"""A served token against the engine's own step, at the lowest load: one request at a time (issue 18,
item 2: "the served TPOT at low load within 1.2x of the engine's batch-1 step; TTFT within 1.2x of
the prefill time").

    python bench/served_token.py [--rounds 5] [--requests 3] [--threads 2] [--dtype bfloat16]
                                 [--num-scheduler-steps 1] [--server-env OMP_WAIT_POLICY=PASSIVE ...]

The random LLaMA h512 L8 (bench/common.py). In each round, interleaved:
  offline  one request of --prompt-len fresh random tokens through LLMEngine.step in this process
           (as bench/vs_llamacpp.py's "single"): the prefill step's ms, and the mean decode step
           ms of its --gen tokens;
  served   --requests requests of the same shape, one after the other, streamed from `rawpaged
           serve` (a child process started once, the same engine options) with bench/serving.py's
           client code in this process: TTFT p50 and TPOT p50 (bench/serving.py's definitions).
Reported per round and as medians: served TPOT / offline decode step, served TTFT / offline prefill.
Both sides run greedy with fixed lengths (ignore_eos) and prefix caching off, so every prompt is
prefilled in full. --server-env adds environment variables to the server's process only (to compare
runtime settings, e.g. the OpenMP wait policy of Numba's threads). Tests never time anything.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import commit, machine, random_llama  # noqa: E402
from vs_llamacpp import Server, free_port, rawpaged_llm, rawpaged_single, thread_env  # noqa: E402


def served(url: str, prompts: list[list[int]], gen: int) -> list:
    """Each prompt streamed alone, one after the other -> serving.Result per request."""
    import httpx
    import serving

    async def go():
        async with httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(600.0)) as c:
            model = (await c.get("/v1/models")).json()["data"][0]["id"]
            args = argparse.Namespace(temperature=0.0)
            out = []
            for p in prompts:
                out.append(await serving.send(c, args, model, serving.Request(p, len(p), gen)))
            return out
    res = asyncio.run(go())
    bad = [r.error for r in res if not r.ok]
    if bad:
        raise RuntimeError(f"{url}: {len(bad)} requests failed: {bad[0]}")
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--requests", type=int, default=3, help="served requests per round, one at a time")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--gen", type=int, default=128)
    ap.add_argument("--max-len", type=int, default=512)
    ap.add_argument("--kv-memory", type=int, default=1 << 30)
    ap.add_argument("--num-scheduler-steps", type=int, default=1, help="both sides' multi-step decoding")
    ap.add_argument("--server-env", nargs="*", default=[], help="NAME=VALUE for the server process only")
    args = ap.parse_args()
    os.environ.update(NUMBA_NUM_THREADS=str(args.threads), OPENBLAS_NUM_THREADS=str(args.threads))
    model_dir = random_llama(Path(tempfile.gettempdir()) / "rawpaged-bench", max_position_embeddings=2048)
    llm = rawpaged_llm(args, model_dir, 8)
    rng = np.random.default_rng(0)
    fresh = lambda: rng.integers(3, 32000, args.prompt_len).tolist()      # noqa: E731
    rawpaged_single(llm, fresh()[:16], 4)                                  # warm-up
    env = thread_env(args.threads)
    env.update(kv.split("=", 1) for kv in args.server_env)
    port = free_port()
    cmd = [sys.executable, "-m", "rawpaged.cli", "serve", "--model", str(model_dir), "--device", "cpu",
           "--dtype", args.dtype, "--host", "127.0.0.1", "--port", str(port), "--max-num-seqs", "8",
           "--kv-cache-memory", str(args.kv_memory), "--max-model-len", str(args.max_len),
           "--no-enable-prefix-caching", "--num-scheduler-steps", str(args.num_scheduler_steps)]
    rows = []
    with Server("rawpaged serve", cmd, port, env) as srv:
        served(srv.url, [fresh()[:16]], 4)                                 # warm-up
        for rnd in range(args.rounds):
            pre_tps, dec_tps = rawpaged_single(llm, fresh(), args.gen)
            step_ms, prefill_ms = 1e3 / dec_tps, 1e3 * args.prompt_len / pre_tps
            res = served(srv.url, [fresh() for _ in range(args.requests)], args.gen)
            ttft = 1e3 * float(np.median([r.ttft for r in res]))
            tpot = 1e3 * float(np.median([(r.e2e - r.ttft) / (r.output_tokens - 1) for r in res]))
            rows.append((rnd + 1, step_ms, tpot, tpot / step_ms, prefill_ms, ttft, ttft / prefill_ms,
                         os.getloadavg()[0]))
            print(f"round {rnd + 1}: step {step_ms:.2f} ms, served TPOT {tpot:.2f} ms; prefill {prefill_ms:.1f} ms, "
                  f"served TTFT {ttft:.1f} ms", file=sys.stderr, flush=True)
    extra = f"; server env {' '.join(args.server_env)}" if args.server_env else ""
    extra += f"; num_scheduler_steps {args.num_scheduler_steps}" if args.num_scheduler_steps > 1 else ""
    print(f"## A served token against the engine's step ({machine()}, commit {commit()})\n")
    print(f"random LLaMA h512 L8, {args.dtype}, {args.threads} threads, prompt {args.prompt_len}, {args.gen} tokens; "
          f"{args.requests} served requests a round, one at a time{extra}\n")
    print("| round | offline decode step ms | served TPOT p50 ms | TPOT / step | offline prefill ms | "
          "served TTFT p50 ms | TTFT / prefill | load |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(f"| {r[0]} | {r[1]:.2f} | {r[2]:.2f} | {r[3]:.2f} | {r[4]:.1f} | {r[5]:.1f} | {r[6]:.2f} | {r[7]:.1f} |")
    med = [float(np.median([r[i] for r in rows])) for i in range(1, 7)]
    print(f"| **median** | {med[0]:.2f} | {med[1]:.2f} | **{med[2]:.2f}** | {med[3]:.1f} | {med[4]:.1f} | "
          f"**{med[5]:.2f}** | - |")


if __name__ == "__main__":
    main()
