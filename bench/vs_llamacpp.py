"""rawpaged against llama.cpp (and transformers) on this CPU, side by side, in one command.

    python bench/vs_llamacpp.py [--work /work/llamacpp] [--threads 2] [--dtype bfloat16] [--rounds 3]

1. llama.cpp is built from the `llama-cpp-python` sdist (it vendors llama.cpp), downloaded by pip
   into --work and built there with cmake (Release, native): llama-server, llama-batched-bench,
   llama-bench. Nothing of it enters this repository. Skipped when --work already holds the build.
2. The model: the random LLaMA h512 L8 (8 / 4 heads, vocab 32000; bench/common.py), converted to GGUF
   f32 / f16 / bf16 by llama.cpp's convert_hf_to_gguf.py, run by --torch-python (a Python with torch,
   transformers and sentencepiece; they are never rawpaged dependencies).
3. Measured in rounds, rawpaged and llama.cpp interleaved in each (medians over --rounds), with the
   same thread count (--threads) for every system and the load average beside every figure:
     floor      the weight-bandwidth floor of a batch-1 decode step: weight bytes read per step
                (every matrix but the embedding table) / the read bandwidth of a 512 MB buffer
     single     one stream, a --prompt-len prompt: prefill tok/s and decode tok/s
                (llama-bench -p / -n; rawpaged: one request through LLMEngine.step)
     same-shape --batch requests of --prompt-len tokens generating --gen tokens each, engine vs engine
                (llama-batched-bench; rawpaged LLM.generate), generated tokens / wall time
     offline    --num-requests ShareGPT requests (bench/throughput.py's workload), all at once:
                rawpaged LLM.generate, both servers through the same client (bench/serving.py,
                --rate inf), transformers `generate` in padded batches of --hf-batch
     served     Poisson arrivals at --rates req/s against both servers (bench/serving.py):
                TTFT and TPOT p50
     greedy     the first --check prompts, greedy, --check-tokens tokens: rawpaged's token ids
                against llama-server's (/completion, return_tokens), per llama.cpp precision
   llama.cpp runs at f32, f16 and bf16; its best precision is taken for each ratio.
4. Prints the tables and the ratios (rawpaged / llama.cpp's best; transformers) and writes --json.

The machine may be shared: every figure carries the load average read when it was measured, and the
ratios (measured in one run) are what to compare.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import commit, machine, random_llama  # noqa: E402

BENCH = Path(__file__).resolve().parent
LLAMA_PRECISIONS = ("f32", "f16", "bf16")
LLAMA_TARGETS = ("llama-server", "llama-batched-bench", "llama-bench")


def load() -> float:
    return round(os.getloadavg()[0], 1)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')} load {load()}] {msg}", file=sys.stderr, flush=True)


# -- llama.cpp: build and model conversion ------------------------------------------------------
def llama_source(work: Path) -> Path:
    """The llama.cpp tree vendored by the llama-cpp-python sdist (downloaded once)."""
    found = sorted(work.glob("llama_cpp_python-*/vendor/llama.cpp"))
    if found:
        return found[-1]
    work.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                    "llama-cpp-python", "-d", str(work)], check=True)
    sdist = sorted(work.glob("llama_cpp_python-*.tar.gz"))[-1]
    with tarfile.open(sdist) as tar:
        tar.extractall(work, filter="data")
    return sorted(work.glob("llama_cpp_python-*/vendor/llama.cpp"))[-1]


def build_llama(work: Path) -> Path:
    src = llama_source(work)
    build = work / "build"
    if all((build / "bin" / t).exists() for t in LLAMA_TARGETS):
        return build / "bin"
    log(f"building llama.cpp from {src} (Release, native) into {build}")
    subprocess.run(["cmake", "-S", str(src), "-B", str(build), "-DCMAKE_BUILD_TYPE=Release", "-DGGML_NATIVE=ON",
                    "-DLLAMA_CURL=OFF", "-DLLAMA_OPENSSL=OFF", "-DLLAMA_BUILD_TESTS=OFF",
                    "-DLLAMA_BUILD_EXAMPLES=OFF"], check=True, stdout=subprocess.DEVNULL)
    subprocess.run(["cmake", "--build", str(build), "--config", "Release", "-j", str(os.cpu_count()),
                    "--target", *LLAMA_TARGETS], check=True, stdout=subprocess.DEVNULL)
    return build / "bin"


def convert_gguf(work: Path, model_dir: Path, torch_python: str) -> dict[str, Path]:
    src = llama_source(work)
    out = {}
    for prec in LLAMA_PRECISIONS:
        path = work / "models" / f"{model_dir.name}-{prec}.gguf"
        if not path.exists():
            log(f"converting {model_dir} to {path.name}")
            subprocess.run([torch_python, str(src / "convert_hf_to_gguf.py"), str(model_dir), "--outtype", prec,
                            "--outfile", str(path)], check=True, capture_output=True)
        out[prec] = path
    return out


# -- servers ------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A server process on 127.0.0.1, up once /health answers 200."""

    def __init__(self, name: str, cmd: list[str], port: int, env: dict | None = None):
        self.name, self.port, self.url = name, port, f"http://127.0.0.1:{port}"
        self.proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                     start_new_session=True)
        import httpx
        deadline = time.monotonic() + 300
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{name} exited: {self.proc.stderr.read().decode()[-2000:]}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except Exception:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"{name} did not start in 300 s")
            time.sleep(0.5)

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGINT)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


def thread_env(threads: int) -> dict:
    env = dict(os.environ)
    env.update(NUMBA_NUM_THREADS=str(threads), OPENBLAS_NUM_THREADS=str(threads), OMP_NUM_THREADS=str(threads))
    return env


def rawpaged_server(args, model_dir: Path, max_seqs: int) -> Server:
    port = free_port()
    cmd = [sys.executable, "-m", "rawpaged.cli", "serve", "--model", str(model_dir), "--device", "cpu",
           "--dtype", args.dtype, "--host", "127.0.0.1", "--port", str(port), "--max-num-seqs", str(max_seqs),
           "--kv-cache-memory", str(args.kv_memory), "--max-model-len", str(args.max_len),
           "--no-enable-prefix-caching", "--num-scheduler-steps", str(getattr(args, "num_scheduler_steps", 1))]
    return Server("rawpaged serve", cmd, port, thread_env(args.threads))


def llama_server(args, bin_dir: Path, gguf: Path, slots: int) -> Server:
    port = free_port()
    cmd = [str(bin_dir / "llama-server"), "-m", str(gguf), "--host", "127.0.0.1", "--port", str(port),
           "-t", str(args.threads), "-tb", str(args.threads), "-c", str(slots * args.max_len), "-np", str(slots),
           "--no-webui", "-b", "2048", "-ub", "512"]
    return Server(f"llama-server {gguf.name}", cmd, port)


def client(url: str, model_dir: Path, num: int, rate: float, args, seed: int = 0) -> dict:
    """bench/serving.py against url: the same requests for every server (token ids, fixed lengths)."""
    out = Path(args.work) / f"serving-{os.getpid()}.json"
    cmd = [sys.executable, str(BENCH / "serving.py"), "--url", url, "--num-prompts", str(num), "--rate", str(rate),
           "--temperature", "0", "--tokenizer", str(model_dir), "--max-prompt-len", str(args.max_len // 2),
           "--max-output-len", str(args.max_output), "--seed", str(seed), "--json", str(out)]
    subprocess.run(cmd, check=True, capture_output=True)
    s = json.loads(out.read_text())
    if s["failed"]:
        raise RuntimeError(f"{url}: {s['failed']} requests failed: {s['first_error']}")
    return s


def serve_workload(url: str, work: list[tuple[list[int], int]], args) -> float:
    """The offline workload through a server: every request sent at once (streamed, greedy, fixed
    lengths) with bench/serving.py's client code -> generated tokens / wall time."""
    import asyncio

    import httpx
    import serving

    async def go():
        async with httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(3600.0),
                                     limits=httpx.Limits(max_connections=None, max_keepalive_connections=None)) as c:
            model = (await c.get("/v1/models")).json()["data"][0]["id"]
            t = time.perf_counter()
            res = await asyncio.gather(*[serving.send(c, args, model, serving.Request(p, len(p), o)) for p, o in work])
            return res, time.perf_counter() - t
    args.temperature = 0.0
    res, dt = asyncio.run(go())
    bad = [r.error for r in res if not r.ok]
    if bad:
        raise RuntimeError(f"{url}: {len(bad)} requests failed: {bad[0]}")
    return sum(r.output_tokens for r in res) / dt


# -- rawpaged offline -----------------------------------------------------------------------------
def rawpaged_llm(args, model_dir: Path, max_seqs: int, dtype: str | None = None):
    """NOTE: prefix caching off: each round sends the same prompts again, and a cached prefix would
    skip the prefill the other systems (fresh processes) do."""
    from rawpaged import LLM
    return LLM(model_dir, device="cpu", dtype=dtype or args.dtype, kv_cache_memory=args.kv_memory,
               num_scheduler_steps=getattr(args, "num_scheduler_steps", 1),
               max_num_seqs=max_seqs, max_num_batched_tokens=max(2048, args.max_len), max_model_len=args.max_len,
               enable_prefix_caching=False)


def rawpaged_generate(llm, work: list[tuple[list[int], int]]) -> tuple[float, list[list[int]]]:
    from rawpaged import SamplingParams
    params = [SamplingParams(temperature=0, max_tokens=o, ignore_eos=True) for _, o in work]
    t = time.perf_counter()
    outs = llm.generate(None, params, prompt_token_ids=[p for p, _ in work])
    dt = time.perf_counter() - t
    return sum(o for _, o in work) / dt, [list(o.outputs[0].token_ids) for o in outs]


def rawpaged_single(llm, prompt: list[int], gen: int) -> tuple[float, float]:
    """(prefill tok/s, decode tok/s) of one stream, step by step (a step makes several tokens with
    --num-scheduler-steps: the generated tokens are counted)."""
    from rawpaged import SamplingParams
    eng = llm.engine
    eng.add_request(None, None, SamplingParams(temperature=0, max_tokens=gen + 1, ignore_eos=True),
                    prompt_token_ids=prompt)
    t0 = time.perf_counter()
    eng.step()                                  # the whole prompt (one step) and its first token
    t1 = time.perf_counter()
    first = eng.stats.generation_tokens
    while eng.has_unfinished_requests():
        eng.step()
    t2 = time.perf_counter()
    return len(prompt) / (t1 - t0), (eng.stats.generation_tokens - first) / (t2 - t1)


# -- llama.cpp offline ---------------------------------------------------------------------------
def llama_bench(args, bin_dir: Path, gguf: Path) -> tuple[float, float]:
    r = subprocess.run([str(bin_dir / "llama-bench"), "-m", str(gguf), "-p", str(args.prompt_len), "-n", str(args.gen),
                        "-t", str(args.threads), "-r", "3", "-o", "json"], check=True, capture_output=True, text=True)
    rows = json.loads(r.stdout)
    pp = next(x["avg_ts"] for x in rows if x["n_prompt"] > 0 and x["n_gen"] == 0)
    tg = next(x["avg_ts"] for x in rows if x["n_gen"] > 0 and x["n_prompt"] == 0)
    return pp, tg


def parse_batched_bench(text: str) -> float:
    """Generated tokens / total time from llama-batched-bench's table row
    |  PP |  TG |  B | N_KV | T_PP s | S_PP t/s | T_TG s | S_TG t/s | T s | S t/s |."""
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 10 and cells[0].isdigit():
            tg, b, total = int(cells[1]), int(cells[2]), float(cells[8])
            return tg * b / total
    raise ValueError("no result row in llama-batched-bench's output")


def llama_batched(args, bin_dir: Path, gguf: Path) -> float:
    ctx = args.batch * (args.prompt_len + args.gen) + 64
    r = subprocess.run([str(bin_dir / "llama-batched-bench"), "-m", str(gguf), "-c", str(ctx), "-b", "2048",
                        "-ub", "512", "-npp", str(args.prompt_len), "-ntg", str(args.gen), "-npl", str(args.batch),
                        "-t", str(args.threads), "-tb", str(args.threads)],
                       check=True, capture_output=True, text=True)
    return parse_batched_bench(r.stdout + r.stderr)


def llama_tokens(url: str, prompt: list[int], n: int) -> list[int]:
    import httpx
    r = httpx.post(url + "/completion", json={"prompt": prompt, "n_predict": n, "temperature": 0, "top_k": 1,
                                              "ignore_eos": True, "return_tokens": True, "cache_prompt": False},
                   timeout=600)
    r.raise_for_status()
    return list(r.json()["tokens"])


def agreement(a: list[int], b: list[int]) -> int:
    """Length of the common prefix."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


# -- the weight-bandwidth floor ------------------------------------------------------------------
def read_bandwidth(threads: int) -> float:
    """GB/s of reading a 512 MB buffer once, `threads` NumPy reductions on parts of it at once
    (NumPy's sum is vectorised and releases the GIL), median of 5."""
    from concurrent.futures import ThreadPoolExecutor
    a = np.ones(128 << 20, np.float32)
    parts = np.array_split(a, threads)
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(np.sum, parts))
        ts = []
        for _ in range(5):
            t = time.perf_counter()
            list(pool.map(np.sum, parts))
            ts.append(time.perf_counter() - t)
    return a.nbytes / float(np.median(ts)) / 1e9


def decode_weight_bytes(model_dir: Path, itemsize: int) -> int:
    """Bytes of every weight matrix a decode step reads (all but the embedding table)."""
    cfg = json.loads((model_dir / "config.json").read_text())
    H, L, V, I = cfg["hidden_size"], cfg["num_hidden_layers"], cfg["vocab_size"], cfg["intermediate_size"]
    D = H // cfg["num_attention_heads"]
    kv = cfg["num_key_value_heads"] * D
    per_layer = H * (H + 2 * kv) + H * H + 2 * I * H + I * H
    return (L * per_layer + V * H) * itemsize


# -- the run -------------------------------------------------------------------------------------
def median(xs):
    return float(np.median(xs)) if xs else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", default="/work/llamacpp", help="llama.cpp's sdist, build and GGUF files (outside the repo)")
    ap.add_argument("--torch-python", default="/work/venv-torch/bin/python")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--dtype", default="bfloat16", help="rawpaged's --dtype")
    ap.add_argument("--num-scheduler-steps", type=int, default=1,
                    help="rawpaged's --num-scheduler-steps (multi-step decoding of plain greedy batches), everywhere")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--gen", type=int, default=128)
    ap.add_argument("--batch", type=int, default=48)
    ap.add_argument("--num-requests", type=int, default=48)
    ap.add_argument("--hf-batch", type=int, default=16)
    ap.add_argument("--rates", type=float, nargs="+", default=[1.0, 2.0, 4.0])
    ap.add_argument("--served-prompts", type=int, default=24)
    ap.add_argument("--max-len", type=int, default=512)
    ap.add_argument("--max-output", type=int, default=128, help="output cap of the served requests")
    ap.add_argument("--kv-memory", type=int, default=1 << 30)
    ap.add_argument("--check", type=int, default=4)
    ap.add_argument("--check-tokens", type=int, default=32)
    ap.add_argument("--skip", nargs="*", default=[], choices=["single", "same-shape", "offline", "served", "greedy"])
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    os.environ.update(NUMBA_NUM_THREADS=str(args.threads), OPENBLAS_NUM_THREADS=str(args.threads))
    work = Path(args.work)
    bin_dir = build_llama(work)
    model_dir = random_llama(work / "models", max_position_embeddings=2048)
    ggufs = convert_gguf(work, model_dir, args.torch_python)
    from throughput import make_workload
    sharegpt = make_workload(args.num_requests, 0.25, args.max_len)
    rng = np.random.default_rng(0)
    same = [(rng.integers(3, 32000, args.prompt_len).tolist(), args.gen) for _ in range(args.batch)]
    R: dict = {"load": [], "rounds": args.rounds, "threads": args.threads, "dtype": args.dtype,
               "num_scheduler_steps": args.num_scheduler_steps,
               "commit": commit(), "machine": machine()}

    def note(key, value):
        R.setdefault(key, []).append(value)
        R["load"].append((key, load()))
        log(f"{key}: {value}")

    from rawpaged.backend import cpu
    itemsize = np.dtype(cpu.resolve_dtype(args.dtype)).itemsize
    llm = rawpaged_llm(args, model_dir, max(64, args.batch))
    rawpaged_generate(llm, [(p[:8], 2) for p, _ in same[:4]])                         # warm-up
    for rnd in range(args.rounds):
        log(f"round {rnd + 1} of {args.rounds}")
        bw = read_bandwidth(args.threads)
        note("read GB/s", bw)
        note("floor tok/s rawpaged", bw * 1e9 / decode_weight_bytes(model_dir, itemsize))
        if "single" not in args.skip:
            fresh = np.random.default_rng(100 + rnd).integers(3, 32000, args.prompt_len).tolist()
            note("rawpaged single", rawpaged_single(llm, fresh, args.gen))
            for prec in LLAMA_PRECISIONS:
                note(f"llama.cpp {prec} single", llama_bench(args, bin_dir, ggufs[prec]))
        if "same-shape" not in args.skip:
            note("rawpaged same-shape", rawpaged_generate(llm, same)[0])
            for prec in LLAMA_PRECISIONS:
                note(f"llama.cpp {prec} same-shape", llama_batched(args, bin_dir, ggufs[prec]))
        if "offline" not in args.skip:
            tps, raw_tokens = rawpaged_generate(llm, sharegpt)
            note("rawpaged offline", tps)
            with rawpaged_server(args, model_dir, max(64, args.num_requests)) as srv:
                note("rawpaged server offline", serve_workload(srv.url, sharegpt, args))
            for prec in LLAMA_PRECISIONS:
                with llama_server(args, bin_dir, ggufs[prec], args.num_requests) as srv:
                    note(f"llama.cpp {prec} server offline", serve_workload(srv.url, sharegpt, args))
            if rnd == 0:
                hf = transformers_baseline(args, model_dir, sharegpt)
                if hf:
                    note("transformers offline", hf)
        if "served" not in args.skip:
            best = best_llama(R, "server offline") or "f16"
            for rate in args.rates:
                for name, start in (("rawpaged", lambda: rawpaged_server(args, model_dir, 64)),
                                    (f"llama.cpp {best}", lambda: llama_server(args, bin_dir, ggufs[best], 16))):
                    with start() as srv:
                        s = client(srv.url, model_dir, args.served_prompts, rate, args, seed=rnd)
                    note(f"{name} served {rate:g}", (s["ttft_ms"]["p50"], s["tpot_ms"]["p50"]))
        if "greedy" not in args.skip and rnd == 0:
            prompts = [p for p, _ in sharegpt[:args.check]]
            ours = {args.dtype: rawpaged_generate(llm, [(p, args.check_tokens) for p in prompts])[1]}
            if args.dtype != "float32":                      # float32 against llama.cpp's f32 too
                llm32 = rawpaged_llm(args, model_dir, 8, "float32")
                ours["float32"] = rawpaged_generate(llm32, [(p, args.check_tokens) for p in prompts])[1]
                del llm32
            for prec in LLAMA_PRECISIONS:
                with llama_server(args, bin_dir, ggufs[prec], 1) as srv:
                    theirs = [llama_tokens(srv.url, p, args.check_tokens) for p in prompts]
                for name, toks in ours.items():
                    note(f"greedy agreement rawpaged {name} vs llama.cpp {prec}",
                         [agreement(a, b) for a, b in zip(toks, theirs)])
    report(R, args)
    if args.json:
        Path(args.json).write_text(json.dumps(R, indent=1) + "\n")


def transformers_baseline(args, model_dir: Path, work) -> float | None:
    import tempfile
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(work, f)
    env = dict(os.environ)
    env.pop("OMP_WAIT_POLICY", None)
    r = subprocess.run([args.torch_python, str(BENCH / "throughput.py"), "--baseline-child", f.name, "--model-dir",
                        str(model_dir), "--hf-batch", str(args.hf_batch), "--threads", str(args.threads)],
                       capture_output=True, text=True, env=env)
    if r.returncode != 0:
        log(f"transformers baseline skipped: {r.stderr.strip()[-300:]}")
        return None
    return sum(o for _, o in work) / json.loads(r.stdout.strip().splitlines()[-1])["seconds"]


def best_llama(R: dict, what: str) -> str | None:
    """llama.cpp's precision with the best median at `what` (higher tok/s)."""
    scores = {p: median(R.get(f"llama.cpp {p} {what}", [])) for p in LLAMA_PRECISIONS}
    scores = {p: v for p, v in scores.items() if v == v}
    return max(scores, key=scores.get) if scores else None


def report(R: dict, args) -> None:
    loads = R.get("load", [])
    print(f"\nrawpaged vs llama.cpp: {R['machine']}; commit {R['commit']}; rawpaged dtype {args.dtype}; "
          f"rawpaged num_scheduler_steps {args.num_scheduler_steps}; {args.threads} threads each; "
          f"medians of {args.rounds} interleaved rounds; load average now {load()}\n")
    med = lambda k: median(R.get(k, []))  # noqa: E731
    rows = []
    floor = med("floor tok/s rawpaged")
    if "rawpaged single" in R:
        pre = median([x[0] for x in R["rawpaged single"]])
        dec = median([x[1] for x in R["rawpaged single"]])
        ll = {p: (median([x[0] for x in R[f"llama.cpp {p} single"]]), median([x[1] for x in R[f"llama.cpp {p} single"]]))
              for p in LLAMA_PRECISIONS}
        bp = max(ll, key=lambda p: ll[p][0])
        bd = max(ll, key=lambda p: ll[p][1])
        rows.append(("single stream prefill tok/s", pre, ll[bp][0], bp))
        rows.append(("single stream decode tok/s", dec, ll[bd][1], bd))
        print(f"weight-bandwidth floor ({args.dtype} weights): {floor:.0f} tok/s at {med('read GB/s'):.1f} GB/s read; "
              f"rawpaged batch-1 decode = {dec / floor:.2f} of it")
    for what in ("same-shape", "offline"):
        if f"rawpaged {what}" in R:
            key = "server offline" if what == "offline" else what
            bp = best_llama(R, key)
            rows.append((f"{what} generated tok/s (rawpaged LLM vs llama.cpp {'server' if what == 'offline' else 'batched-bench'})",
                         med(f"rawpaged {what}"), med(f"llama.cpp {bp} {key}"), bp))
    if "rawpaged server offline" in R:
        bp = best_llama(R, "server offline")
        rows.append(("offline through the servers, output tok/s", med("rawpaged server offline"),
                     med(f"llama.cpp {bp} server offline"), bp))
    print("| measure | rawpaged | llama.cpp (best precision) | ratio |\n| --- | ---: | ---: | ---: |")
    for name, ours, theirs, prec in rows:
        print(f"| {name} | {ours:,.1f} | {theirs:,.1f} ({prec}) | {ours / theirs:.2f}x |")
    if "transformers offline" in R:
        print(f"\ntransformers generate (padded batches of {args.hf_batch}): {med('transformers offline'):,.1f} tok/s; "
              f"rawpaged offline / transformers = {med('rawpaged offline') / med('transformers offline'):.2f}x")
    served = [k for k in R if " served " in k]
    if served:
        print("\n| served rate req/s | rawpaged TTFT p50 ms | llama-server TTFT p50 ms | rawpaged TPOT p50 ms | llama-server TPOT p50 ms |")
        print("| ---: | ---: | ---: | ---: | ---: |")
        for rate in args.rates:
            ours = R.get(f"rawpaged served {rate:g}", [])
            theirs = next((v for k, v in R.items() if k.startswith("llama.cpp") and k.endswith(f"served {rate:g}")), [])
            if ours and theirs:
                print(f"| {rate:g} | {median([x[0] for x in ours]):.1f} | {median([x[0] for x in theirs]):.1f} | "
                      f"{median([x[1] for x in ours]):.1f} | {median([x[1] for x in theirs]):.1f} |")
    for k, v in R.items():
        if k.startswith("greedy"):
            print(f"\n{k}: common prefix of {v[0]} tokens (of {args.check_tokens}) per prompt")
    print(f"\nall figures with their load averages: --json; raw: {json.dumps({k: v for k, v in R.items() if k != 'load'})[:4000]}")


if __name__ == "__main__":
    main()
