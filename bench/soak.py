"""Soak test of `rawpaged serve` under hostile load, on loopback only, bounded in time.

    python bench/soak.py [--model DIR] [--streams 1000] [--disconnect 0.1] [--bad 100] [--slow 20]

Starts the server as a child process (the demo model by default, on the CPU), then at once:
  - `--streams` concurrent streaming completions, of which a `--disconnect` fraction hang up after
    their first chunk (a client gone mid-stream);
  - `--bad` malformed or out-of-range requests (bad JSON, deep nesting, lone surrogates, NaN, huge
    integers, n too large, unknown model, wrong types, oversized bodies): each must get a 4xx;
  - `--slow` slow clients that send half a request head or half a body and then wait: the server
    must cut them off (its header/body timeouts) instead of holding them forever.
Then it checks that every KV block is free again and reads the server's peak RSS.

Counted: completed (stream ended with [DONE]), disconnected (on purpose), refused (4xx as expected),
lost (an accepted stream that ended without [DONE], a 5xx, a connection error: must be 0), hung (not
finished by the deadline: must be 0), slow clients cut off, peak RSS, KV blocks in use afterwards (must
be 0). Exit status 1 when lost, hung or blocks in use is not 0. Prints a Markdown table.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
PROMPTS = ["Once upon a time", "The little dog", "Lily and Ben went to the park", "One day, a cat",
           "There was a big tree", "Tom had a red ball and"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(args, port: int) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "rawpaged.cli", "serve", "--device", "cpu", "--port", str(port),
           "--kv-cache-memory", args.kv_cache_memory, "--max-num-seqs", str(args.max_num_seqs),
           "--header-timeout", str(args.timeout), "--body-timeout", str(args.timeout),
           "--log-level", "warning"]
    if args.model:
        cmd += ["--model", args.model]
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


async def wait_healthy(url: str, proc: subprocess.Popen, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    async with httpx.AsyncClient() as c:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise SystemExit(f"server exited: {proc.stderr.read()[-2000:]}")
            try:
                if (await c.get(url + "/health", timeout=2)).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            await asyncio.sleep(0.2)
    raise SystemExit("server did not become healthy")


# -- the three kinds of client --------------------------------------------------------------------
async def stream_client(client: httpx.AsyncClient, url: str, model: str, rng: random.Random,
                        disconnect: bool, counts: dict) -> None:
    body = {"model": model, "prompt": rng.choice(PROMPTS), "max_tokens": rng.randint(8, 32),
            "temperature": 0.8, "stream": True, "n": rng.choice([1, 1, 1, 2])}
    try:
        async with client.stream("POST", url + "/v1/completions", json=body) as r:
            if r.status_code >= 500:
                counts["lost"] += 1
                counts["why"].append(f"stream got {r.status_code}")
                return
            if r.status_code >= 400:
                counts["refused"] += 1
                return
            done = False
            async for line in r.aiter_lines():
                if disconnect and line.startswith("data: {"):
                    counts["disconnected"] += 1
                    return                              # leaving the block closes the connection
                if line == "data: [DONE]":
                    done = True
                elif line.startswith("data: ") and '"error"' in line:
                    counts["lost"] += 1
                    counts["why"].append(f"stream error event: {line[:120]}")
                    return
            if done:
                counts["completed"] += 1
            else:
                counts["lost"] += 1
                counts["why"].append("stream ended without [DONE]")
    except httpx.HTTPError as e:
        counts["lost"] += 1
        counts["why"].append(f"stream {type(e).__name__}: {e}")


def bad_bodies(model: str) -> list[tuple[str, bytes]]:
    """(what, raw body) pairs; each must be answered with a 4xx."""
    deep = ("[" * 100_000 + "]" * 100_000).encode()
    return [
        ("invalid JSON", b'{"model": "m", "prompt": '),
        ("deep nesting", b'{"model": "%s", "prompt": "x", "stop": ' % model.encode() + deep + b"}"),
        ("lone surrogate", json.dumps({"model": model, "prompt": "a\ud800b"}).encode()),
        ("NaN temperature", b'{"model": "%s", "prompt": "x", "temperature": NaN}' % model.encode()),
        ("huge integer", b'{"model": "%s", "prompt": "x", "max_tokens": ' % model.encode() + b"9" * 5000 + b"}"),
        ("n too large", json.dumps({"model": model, "prompt": "x", "n": 100000}).encode()),
        ("negative max_tokens", json.dumps({"model": model, "prompt": "x", "max_tokens": -1}).encode()),
        ("unknown model", json.dumps({"model": "no-such-model", "prompt": "x"}).encode()),
        ("wrong type", json.dumps({"model": model, "prompt": {"a": 1}}).encode()),
        ("empty stop string", json.dumps({"model": model, "prompt": "x", "stop": [""]}).encode()),
        ("oversized body", json.dumps({"model": model, "prompt": "x" * (17 << 20)}).encode()),
    ]


async def bad_client(client: httpx.AsyncClient, url: str, what: str, body: bytes, counts: dict) -> None:
    try:
        r = await client.post(url + "/v1/completions", content=body,
                              headers={"content-type": "application/json"})
    except httpx.HTTPError as e:
        counts["lost"] += 1
        counts["why"].append(f"bad request ({what}) {type(e).__name__}: {e}")
        return
    if 400 <= r.status_code < 500:
        counts["refused"] += 1
    else:
        counts["lost"] += 1
        counts["why"].append(f"bad request ({what}) got {r.status_code}")


async def slow_client(port: int, half_body: bool, timeout: float, counts: dict) -> None:
    """Send half a request (head or body), then wait for the server to close the connection."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    if half_body:
        writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 1000\r\n\r\n{\"prompt\": ")
    else:
        writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Le")
    await writer.drain()
    try:
        # NOTE: the server may answer (408) before closing; read until EOF either way.
        await asyncio.wait_for(reader.read(-1), timeout + 30)
        counts["slow_cut_off"] += 1
    except asyncio.TimeoutError:
        counts["slow_held"] += 1
    finally:
        writer.close()


# -- after the load -------------------------------------------------------------------------------
async def blocks_in_use(url: str, wait_s: float = 20.0) -> int:
    """KV blocks still allocated, read from /metrics (waits for aborts to be processed)."""
    deadline = time.monotonic() + wait_s
    async with httpx.AsyncClient() as c:
        while True:
            text = (await c.get(url + "/metrics", timeout=10)).text
            free = float(re.search(r"^rawpaged_kv_cache_free_blocks\{[^}]*\} (\S+)", text, re.M).group(1))
            total = float(re.search(r"^rawpaged_kv_cache_total_blocks\{[^}]*\} (\S+)", text, re.M).group(1))
            if free == total or time.monotonic() > deadline:
                return int(total - free)
            await asyncio.sleep(0.5)


def peak_rss_mb(pid: int) -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmHWM:\s+(\d+) kB", status).group(1)) / 1024


async def soak(args) -> dict:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = start_server(args, port)
    try:
        await wait_healthy(url, proc)
        async with httpx.AsyncClient() as c:
            model = (await c.get(url + "/v1/models")).json()["data"][0]["id"]
        counts = {"completed": 0, "disconnected": 0, "refused": 0, "lost": 0, "slow_cut_off": 0,
                  "slow_held": 0, "why": []}
        rng = random.Random(args.seed)
        limits = httpx.Limits(max_connections=args.streams + args.bad + 10, max_keepalive_connections=0)
        t0 = time.monotonic()
        async with httpx.AsyncClient(limits=limits, timeout=httpx.Timeout(args.deadline)) as client:
            tasks = [stream_client(client, url, model, rng, rng.random() < args.disconnect, counts)
                     for _ in range(args.streams)]
            bodies = bad_bodies(model)
            tasks += [bad_client(client, url, *bodies[i % len(bodies)], counts) for i in range(args.bad)]
            tasks += [slow_client(port, i % 2 == 1, args.timeout, counts) for i in range(args.slow)]
            rng.shuffle(tasks)
            jobs = [asyncio.ensure_future(t) for t in tasks]
            done, pending = await asyncio.wait(jobs, timeout=args.deadline)
            for j in pending:
                j.cancel()
        wall = time.monotonic() - t0
        health = httpx.get(url + "/health", timeout=10).status_code
        return {**counts, "hung": len(pending), "requests": len(tasks), "wall_s": wall,
                "blocks_in_use": await blocks_in_use(url), "peak_rss_mb": peak_rss_mb(proc.pid),
                "health_after": health}
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None, help="model directory or org/name (default: the demo model)")
    ap.add_argument("--streams", type=int, default=1000)
    ap.add_argument("--disconnect", type=float, default=0.1, help="fraction of streams that hang up early")
    ap.add_argument("--bad", type=int, default=100)
    ap.add_argument("--slow", type=int, default=20)
    ap.add_argument("--timeout", type=float, default=5.0, help="the server's header and body read timeouts (s)")
    ap.add_argument("--deadline", type=float, default=600.0, help="seconds before a client counts as hung")
    ap.add_argument("--kv-cache-memory", default="32MiB")
    ap.add_argument("--max-num-seqs", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    r = asyncio.run(soak(args))
    print("| requests | completed | disconnected | refused 4xx | lost | hung | slow cut off | slow held "
          "| blocks in use after | peak RSS MB | /health after | wall s |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    print(f"| {r['requests']} | {r['completed']} | {r['disconnected']} | {r['refused']} | {r['lost']} | {r['hung']} "
          f"| {r['slow_cut_off']} | {r['slow_held']} | {r['blocks_in_use']} | {r['peak_rss_mb']:.0f} "
          f"| {r['health_after']} | {r['wall_s']:.1f} |")
    for why in r["why"][:20]:
        print("lost:", why)
    ok = r["lost"] == 0 and r["hung"] == 0 and r["blocks_in_use"] == 0 and r["slow_held"] == 0
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
