"""Distributed serving on this machine: the all-reduce a tensor-parallel step pays, and replicas.

    python bench/distributed.py allreduce [--ranks 2] [--hidden 4096] [--tokens 1,8,64,512]
    python bench/distributed.py tp-step   [--batches 1,32]          # random LLaMA h512 L8, TP 1 vs 2
    python bench/distributed.py replicas  [--requests 100] [--concurrency 16] [--max-tokens 64]

allreduce  the CPU collective (rawpaged/distributed/shm.py) between `--ranks` spawned processes:
           median microseconds per all-reduce of [tokens, hidden] float32, and what a decode step
           of a model with L layers pays (2 L + 1 all-reduces: o and down of every layer, the
           vocab-parallel embedding; plus one gather of the logits).
tp-step    decode steps of the same engine in one process and tensor-parallel 2 (mp executor),
           side by side: ms per step and the difference, against the all-reduce estimate.
replicas   requests/s of the demo model behind Ray Serve with 1 and 2 engine replicas (CPU, one
           CPU each), side by side in one run, and of the plain `rawpaged serve` as the baseline;
           closed loop: `--concurrency` clients send `--requests` completions of `--max-tokens`
           tokens each (ignore_eos, so every run does the same work).
Prints Markdown tables (bench/RESULTS.md keeps them).
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import socket
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, commit, machine, random_llama, scratch_dir  # noqa: E402


# -- allreduce ------------------------------------------------------------------------------------
def _rank(spec, rank: int, sizes, hidden: int, iters: int, out) -> None:
    from rawpaged.distributed import connect
    comm = connect(spec, rank)
    rng = np.random.default_rng(rank)
    result = {}
    for t in sizes:
        x = rng.standard_normal((t, hidden)).astype(np.float32)
        for _ in range(5):
            comm.all_reduce(x)
        times = []
        for _ in range(iters):
            t0 = time.perf_counter()
            comm.all_reduce(x)
            times.append(time.perf_counter() - t0)
        g = rng.standard_normal((t, hidden // comm.size)).astype(np.float32)
        gt = []
        for _ in range(max(5, iters // 4)):
            t0 = time.perf_counter()
            comm.gather(g)
            gt.append(time.perf_counter() - t0)
        result[t] = (statistics.median(times), statistics.median(gt))
    if rank == 0:
        out.put(result)


def allreduce(a) -> None:
    from rawpaged.distributed import create_comm_spec
    sizes = [int(s) for s in a.tokens.split(",")]
    spec = create_comm_spec("shm", a.ranks)
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=_rank, args=(spec, r, sizes, a.hidden, a.iters, q)) for r in range(a.ranks)]
    for p in procs:
        p.start()
    result = q.get(timeout=600)
    for p in procs:
        p.join()
    print(f"`python bench/distributed.py allreduce --ranks {a.ranks} --hidden {a.hidden} --tokens {a.tokens}` "
          f"({machine()}, commit {commit()}); median of {a.iters} calls\n")
    print(f"| tokens x hidden | bytes | all-reduce us | gather us of [t, {a.hidden // a.ranks}] | "
          f"per decode step of a {a.layers}-layer model (2L+1 all-reduces + 1 gather), ms |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for t, (ar, ga) in result.items():
        step = (2 * a.layers + 1) * ar + ga
        print(f"| {t} x {a.hidden} | {t * a.hidden * 4:,} | {ar * 1e6:.1f} | {ga * 1e6:.1f} | {step * 1e3:.2f} |")


# -- tp-step --------------------------------------------------------------------------------------
def _decode_ms(llm, batch: int, steps: int) -> float:
    from rawpaged import SamplingParams
    eng = llm.engine
    params = SamplingParams(temperature=0, max_tokens=steps + 2, ignore_eos=True)
    for i in range(batch):
        eng.add_request(None, None, params, prompt_token_ids=[1 + (i * 7 + j) % 500 for j in range(16)])
    eng.step()                                            # the prefill
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        eng.step()
        times.append(time.perf_counter() - t0)
    while eng.has_unfinished_requests():
        eng.step()
    return statistics.median(times) * 1e3


def tp_step(a) -> None:
    from rawpaged import LLM
    root = Path(a.work) if a.work else scratch_dir()
    model = random_llama(root)
    batches = [int(b) for b in a.batches.split(",")]
    runs = {1: [], 2: []}
    engines = {tp: LLM(str(model), device="cpu", tensor_parallel_size=tp, kv_cache_memory=256 << 20) for tp in (1, 2)}
    for llm in engines.values():
        _decode_ms(llm, 1, 3)                             # warm-up
    # NOTE: interleaved rounds, medians: this machine's load moves between runs
    for _ in range(a.rounds):
        for tp, llm in engines.items():
            runs[tp].append([_decode_ms(llm, b, a.steps) for b in batches])
    for llm in engines.values():
        llm.engine.shutdown()
    rows = [[statistics.median(r[i] for r in runs[tp]) for i in range(len(batches))] for tp in (1, 2)]
    print(f"`python bench/distributed.py tp-step --batches {a.batches}` ({machine()}, commit {commit()}, load "
          f"average {os.getloadavg()[0]:.1f}, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')} in the "
          f"one process; each rank gets cores/2): random LLaMA h512 L8 (8 q / 4 kv heads, vocab 32000), fp32, "
          f"median ms per decode step over {a.steps} steps x {a.rounds} interleaved rounds\n")
    print("| batch | one process ms | tensor-parallel 2 (mp) ms | TP 2 / one process |")
    print("| ---: | ---: | ---: | ---: |")
    for i, b in enumerate(batches):
        print(f"| {b} | {rows[0][i]:.2f} | {rows[1][i]:.2f} | {rows[1][i] / rows[0][i]:.2f}x |")


# -- replicas -------------------------------------------------------------------------------------
PROMPTS = ["Once upon a time", "The little dog", "Lily and Tom went", "One day a bird", "The sun was",
           "A big red ball", "Sam had a toy", "In the garden"]


def _load(url: str, n: int, concurrency: int, max_tokens: int) -> tuple[float, int]:
    import httpx

    def one(i: int) -> bool:
        r = httpx.post(url + "/v1/completions", timeout=600,
                       json={"model": "stories260K", "prompt": PROMPTS[i % len(PROMPTS)] + f" ({i})",
                             "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True})
        return r.status_code == 200
    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(one, range(min(n, concurrency))))    # warm-up (kernels, connections)
        t0 = time.perf_counter()
        ok = sum(pool.map(one, range(n)))
        return time.perf_counter() - t0, ok


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_up(url: str, timeout: float = 300) -> None:
    import httpx
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(url + "/v1/models", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"{url} did not come up")


def replicas(a) -> None:
    import ray
    from ray import serve
    from rawpaged.engine import EngineConfig
    from rawpaged.hub import DEMO_MODEL
    from rawpaged.server.ray_serve import ReplicaOptions, build_app

    rows = []
    port = _port()
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    plain = subprocess.Popen([sys.executable, "-m", "rawpaged.cli", "serve", "--device", "cpu", "--port", str(port),
                              "--served-model-name", "stories260K", "--log-level", "warning"], env=env,
                             stderr=subprocess.DEVNULL)
    try:
        _wait_up(f"http://127.0.0.1:{port}")
        rows.append(("plain `rawpaged serve` (one engine, no Ray)", *_load(f"http://127.0.0.1:{port}", a.requests,
                                                                         a.concurrency, a.max_tokens)))
    finally:
        plain.terminate()
        plain.wait()
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False, configure_logging=False)
    port = _port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    url = f"http://127.0.0.1:{port}"
    config = EngineConfig(model=str(DEMO_MODEL), device="cpu")
    for n in (1, 2):
        serve.run(build_app(config, ReplicaOptions("stories260K"), num_replicas=n, routing=a.routing),
                  name="rawpaged", route_prefix="/")
        _wait_up(url)
        rows.append((f"Ray Serve, {n} replica{'s' if n > 1 else ''} ({a.routing} routing)",
                     *_load(url, a.requests, a.concurrency, a.max_tokens)))
        serve.delete("rawpaged")
    serve.shutdown()
    ray.shutdown()
    base = rows[1][2] / rows[1][1]
    print(f"`python bench/distributed.py replicas --requests {a.requests} --concurrency {a.concurrency} "
          f"--max-tokens {a.max_tokens}` ({machine()}, commit {commit()}): stories260K on the CPU, "
          f"closed loop, {a.max_tokens} tokens per request (ignore_eos)\n")
    print("| server | requests ok | seconds | req/s | output tok/s | vs 1 replica |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for name, secs, ok in rows:
        print(f"| {name} | {ok}/{a.requests} | {secs:.2f} | {ok / secs:.2f} | {ok * a.max_tokens / secs:.0f} | "
              f"{ok / secs / base:.2f}x |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="what", required=True)
    ar = sub.add_parser("allreduce")
    ar.add_argument("--ranks", type=int, default=2)
    ar.add_argument("--hidden", type=int, default=4096)
    ar.add_argument("--tokens", default="1,8,64,512")
    ar.add_argument("--layers", type=int, default=32)
    ar.add_argument("--iters", type=int, default=200)
    ts = sub.add_parser("tp-step")
    ts.add_argument("--batches", default="1,32")
    ts.add_argument("--steps", type=int, default=16)
    ts.add_argument("--rounds", type=int, default=3)
    ts.add_argument("--work", default=None, help="folder for the random model (default: a temporary one)")
    rp = sub.add_parser("replicas")
    rp.add_argument("--requests", type=int, default=100)
    rp.add_argument("--concurrency", type=int, default=16)
    rp.add_argument("--max-tokens", type=int, default=64)
    rp.add_argument("--routing", default="least-loaded", choices=["prefix", "least-loaded"])
    a = p.parse_args()
    {"allreduce": allreduce, "tp-step": tp_step, "replicas": replicas}[a.what](a)


if __name__ == "__main__":
    main()
