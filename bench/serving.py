"""Online serving benchmark: Poisson arrivals against a running OpenAI-compatible server.

    rawpaged serve --model DIR --port 8000 &
    python bench/serving.py --url http://127.0.0.1:8000 --rate 2 --num-prompts 100 [--tokenizer DIR]

Requests (seeded): real prompts from ../shared/data/workloads (RAWPAGED_TEST_DATA), sent to
/v1/completions streamed, with a fixed output length (ignore_eos) so every server does the same work.
  --dataset sharegpt  ShareGPT first-turn prompts; output lengths drawn from the ShareGPT length
                      table (sharegpt_multiturn_lengths.csv, num_decode_tokens).
  --dataset alpaca    Alpaca instruction (+ input) prompts; output length = the length of the record's
                      reference output (tokens with --tokenizer, else words * 4/3).
With --tokenizer (the served model's directory) prompts are sent as token ids cut to --max-prompt-len
and outputs capped so prompt + output fits the server's max_model_len (prompts at most half of it); without it prompts are text
cut to --max-prompt-chars. Outputs are capped at --max-output-len either way.

Arrivals: a Poisson process of --rate requests/s (exponential gaps), or all at once with --rate inf.

Reported, over the requests that succeeded:
  throughput           requests/s, output tokens/s, total (prompt + output) tokens/s over the run
  TTFT                 time to first token: request sent -> first streamed text
  TPOT                 time per output token after the first: (e2e - TTFT) / (output tokens - 1)
  ITL                  inter-token latency: gaps between streamed chunks (a chunk can carry several
                       tokens when the client reads slower than the engine steps)
  normalized latency   the PagedAttention paper's metric: e2e latency / output tokens, averaged
                       over requests (seconds per token)
each as mean, p50 and p99.
"""
from __future__ import annotations

import argparse
import asyncio
import csv
import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import commit, data_dir, machine  # noqa: E402


@dataclass
class Request:
    prompt: str | list[int]
    prompt_len: int | None          # tokens, when known
    output_len: int


@dataclass
class Result:
    ok: bool
    prompt_tokens: int = 0
    output_tokens: int = 0
    ttft: float = 0.0
    e2e: float = 0.0
    chunk_times: list[float] = field(default_factory=list)
    error: str = ""


# -- workload ---------------------------------------------------------------------------------
def load_requests(args, max_model_len: int) -> list[Request]:
    rng = np.random.default_rng(args.seed)
    work = data_dir() / "workloads"
    if not work.is_dir():
        sys.exit(f"workloads not found at {work} (set RAWPAGED_TEST_DATA to the shared data folder)")
    tok = None
    if args.tokenizer:
        from rawpaged.tokenizer import Tokenizer
        tok = Tokenizer.from_dir(args.tokenizer)
    if args.dataset == "sharegpt":
        records = json.loads((work / "sharegpt_prompts_1000.json").read_text())
        texts = [r["conversations"][0]["value"] for r in records]
        with open(work / "sharegpt_multiturn_lengths.csv") as f:
            lengths = [int(r["num_decode_tokens"]) for r in csv.DictReader(f)]
        picks = rng.choice(len(texts), args.num_prompts, replace=args.num_prompts > len(texts))
        out_lens = rng.choice(lengths, args.num_prompts)
        pairs = [(texts[i], int(n)) for i, n in zip(picks, out_lens)]
    else:
        records = json.loads((work / "alpaca_200.json").read_text())
        picks = rng.choice(len(records), args.num_prompts, replace=args.num_prompts > len(records))
        pairs = []
        for i in picks:
            r = records[i]
            text = r["instruction"] + ("\n\n" + r["input"] if r["input"] else "")
            n = len(tok.encode(r["output"], add_special_tokens=False)) if tok else len(r["output"].split()) * 4 // 3
            pairs.append((text, max(1, n)))
    requests = []
    for text, n in pairs:
        n = min(n, args.max_output_len)
        if tok is not None:
            ids = tok.encode(text)[:min(args.max_prompt_len, max_model_len // 2)]
            n = max(1, min(n, max_model_len - len(ids)))
            requests.append(Request(ids, len(ids), n))
        else:
            requests.append(Request(text[:args.max_prompt_chars], None, n))
    return requests


def arrival_gaps(n: int, rate: float, seed: int) -> list[float]:
    if math.isinf(rate):
        return [0.0] * n
    return list(np.random.default_rng(seed + 1).exponential(1.0 / rate, n))


# -- one request ------------------------------------------------------------------------------
async def send(client, args, model: str, req: Request) -> Result:
    body = {"model": model, "prompt": req.prompt, "max_tokens": req.output_len, "temperature": args.temperature,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    res = Result(ok=False)
    start = time.perf_counter()
    try:
        async with client.stream("POST", "/v1/completions", json=body) as resp:
            if resp.status_code != 200:
                res.error = f"HTTP {resp.status_code}: {(await resp.aread()).decode()[:200]}"
                return res
            async for line in resp.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[6:]
                if data == "[DONE]":
                    res.ok = True
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    res.error = chunk["error"]["message"]
                    return res
                if chunk.get("usage"):
                    res.prompt_tokens = chunk["usage"]["prompt_tokens"]
                    res.output_tokens = chunk["usage"]["completion_tokens"]
                if any(c.get("text") for c in chunk.get("choices", [])):
                    res.chunk_times.append(time.perf_counter() - start)
    except Exception as e:          # noqa: BLE001 - a failed request is reported, the run goes on
        res.error = f"{type(e).__name__}: {e}"
        return res
    res.e2e = time.perf_counter() - start
    res.ttft = res.chunk_times[0] if res.chunk_times else res.e2e
    return res


# -- the run ----------------------------------------------------------------------------------
async def run(args) -> dict:
    import httpx

    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(base_url=args.url.rstrip("/"), headers=headers, limits=limits,
                                 timeout=httpx.Timeout(args.timeout)) as client:
        r = await client.get("/v1/models")
        r.raise_for_status()
        card = r.json()["data"][0]
        model = args.model or card["id"]
        requests = load_requests(args, int(card.get("max_model_len") or 1 << 30))
        gaps = arrival_gaps(len(requests), args.rate, args.seed)
        tasks = []
        start = time.perf_counter()
        for req, gap in zip(requests, gaps):
            await asyncio.sleep(gap)
            tasks.append(asyncio.create_task(send(client, args, model, req)))
        results = await asyncio.gather(*tasks)
        duration = time.perf_counter() - start
    return summarize(args, model, results, duration)


def _stats(values: list[float], scale: float = 1000.0) -> dict:
    if not values:
        return {"mean": None, "p50": None, "p99": None}
    v = np.asarray(values) * scale
    return {"mean": float(v.mean()), "p50": float(np.percentile(v, 50)), "p99": float(np.percentile(v, 99))}


def summarize(args, model: str, results: list[Result], duration: float) -> dict:
    ok = [r for r in results if r.ok and r.output_tokens > 0]
    failed = [r for r in results if not r.ok]
    out_tokens = sum(r.output_tokens for r in ok)
    in_tokens = sum(r.prompt_tokens for r in ok)
    itl = [b - a for r in ok for a, b in zip(r.chunk_times, r.chunk_times[1:])]
    return {
        "url": args.url, "model": model, "dataset": args.dataset, "rate": args.rate, "seed": args.seed,
        "num_requests": len(results), "succeeded": len(ok), "failed": len(failed),
        "first_error": failed[0].error if failed else None,
        "duration_s": duration,
        "throughput": {"requests_per_s": len(ok) / duration, "output_tokens_per_s": out_tokens / duration,
                       "total_tokens_per_s": (in_tokens + out_tokens) / duration},
        "mean_prompt_tokens": in_tokens / len(ok) if ok else None,
        "mean_output_tokens": out_tokens / len(ok) if ok else None,
        "ttft_ms": _stats([r.ttft for r in ok]),
        "tpot_ms": _stats([(r.e2e - r.ttft) / (r.output_tokens - 1) for r in ok if r.output_tokens > 1]),
        "itl_ms": _stats(itl),
        "e2e_ms": _stats([r.e2e for r in ok]),
        "normalized_latency_s_per_token": {"mean": float(np.mean([r.e2e / r.output_tokens for r in ok]))
                                           if ok else None},
        "commit": commit(), "machine": machine(),
    }


def print_report(s: dict) -> None:
    print(f"serving benchmark: {s['num_requests']} requests ({s['dataset']}) at {s['rate']} req/s "
          f"-> {s['url']} ({s['model']})")
    print(f"  succeeded {s['succeeded']}, failed {s['failed']}" +
          (f" (first error: {s['first_error']})" if s["first_error"] else ""))
    if not s["succeeded"]:
        return
    t = s["throughput"]
    print(f"  duration {s['duration_s']:.2f} s; mean prompt {s['mean_prompt_tokens']:.1f} / output "
          f"{s['mean_output_tokens']:.1f} tokens")
    print(f"  throughput: {t['requests_per_s']:.2f} req/s, {t['output_tokens_per_s']:.1f} output tok/s, "
          f"{t['total_tokens_per_s']:.1f} total tok/s")
    print(f"  {'ms':<6}{'mean':>10}{'p50':>10}{'p99':>10}")
    for name in ("ttft", "tpot", "itl", "e2e"):
        st = s[f"{name}_ms"]
        if st["mean"] is not None:
            print(f"  {name.upper():<6}{st['mean']:>10.2f}{st['p50']:>10.2f}{st['p99']:>10.2f}")
    print(f"  normalized latency (e2e / output tokens, mean): "
          f"{s['normalized_latency_s_per_token']['mean']:.4f} s/token")
    print(f"  commit {s['commit']}, {s['machine']}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--url", default="http://127.0.0.1:8000", help="server base URL (without /v1)")
    p.add_argument("--model", default=None, help="model name to send (default: the server's first)")
    p.add_argument("--api-key", default=None)
    p.add_argument("--dataset", default="sharegpt", choices=["sharegpt", "alpaca"])
    p.add_argument("--num-prompts", type=int, default=100)
    p.add_argument("--rate", type=float, default=float("inf"), help="requests per second (inf: all at once)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tokenizer", default=None, help="the served model's directory: exact token lengths")
    p.add_argument("--max-prompt-len", type=int, default=1024, help="tokens (with --tokenizer)")
    p.add_argument("--max-prompt-chars", type=int, default=4000, help="characters (without --tokenizer)")
    p.add_argument("--max-output-len", type=int, default=1024)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per request")
    p.add_argument("--json", default=None, help="also write the summary to this file")
    args = p.parse_args(argv)
    if args.num_prompts < 1 or args.rate <= 0:
        p.error("--num-prompts and --rate must be positive")
    summary = asyncio.run(run(args))
    print_report(summary)
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2) + "\n")
    return 0 if summary["succeeded"] else 1


if __name__ == "__main__":
    sys.exit(main())
