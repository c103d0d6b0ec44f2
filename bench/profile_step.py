"""Where the time of one engine step and of one served token goes, phase by phase (CPU backend).

    python bench/profile_step.py [--batches 1 16 48] [--dtype float32] [--server] [--steps 32] [--cpu-time]

Offline: `batch` requests of --prompt-len random tokens are added to an LLMEngine on the random
LLaMA h512 L8 (bench/common.py); after their prefill step, --steps decode steps are timed. Every
phase is timed exclusively (a phase nested in another is subtracted from it):

  schedule        Scheduler.schedule + on_step_done
  prepare inputs  ModelRunner's flattening of the batch (prepare_inputs) and the index uploads
  forward: <op>   each backend op the model calls (linear, lm head, attention, cache write, norms,
                  rope, activation, embedding), summed over layers; on the CPU's fused decode step
                  (rawpaged/worker/fused_decode.py) the whole decoder stack is one phase,
                  "forward: decoder stack (fused)"
  sampling        Sampler.__call__
  detokenize      IncrementalDetokenizer.step
  outputs         make_output (the RequestOutputs of the step)
  python          the rest of LLMEngine.step: bookkeeping between the phases

With --server, the same batches go through the OpenAI server (streamed /v1/completions from a client
in a child process, all requests at once) and each served token's time is split further into
  engine step        the engine thread's step (as above, all phases)
  hand-off           engine thread -> event loop (call_soon_threadsafe until the stream is woken)
  chunk + JSON       building the SSE chunk of each output
  SSE write          handing the chunk to uvicorn (send)
per streamed token. The machine's load average is printed with each table: timings on a shared
machine are noisy, compare phases within one run.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import commit, machine, random_llama  # noqa: E402

# NOTE: --cpu-time times the offline phases with this thread's CPU time (time.thread_time) instead
# of the wall clock: with NUMBA_NUM_THREADS=1 every kernel runs on the calling thread, and on a
# shared machine the CPU time is what stays put while other jobs take the core away (memory
# contention still shows). Not for --server or several threads (other threads' work is missed).
CLOCK = time.perf_counter

# op name of the backend -> the phase it is counted in
OP_PHASES = {
    "linear": "forward: linear", "paged_attention": "forward: attention",
    "reshape_and_cache": "forward: cache write", "rotary_and_cache": "forward: rope + cache write",
    "rms_norm": "forward: norms",
    "fused_add_rms_norm": "forward: norms", "layer_norm": "forward: norms",
    "rotary_embedding": "forward: rope", "silu_and_mul": "forward: activation",
    "gelu_tanh_and_mul": "forward: activation", "gelu": "forward: activation",
    "gelu_tanh": "forward: activation", "relu": "forward: activation", "embedding": "forward: embedding",
}


class Profiler:
    """Exclusive wall time per phase: a phase's time excludes the phases timed inside it."""

    def __init__(self):
        self.total = defaultdict(float)
        self.calls = defaultdict(int)
        self.stack: list[list] = []          # [phase, start, time spent in children]
        self.enabled = True

    @contextmanager
    def phase(self, name: str):
        if not self.enabled or (self.stack and self.stack[-1][0] == "forward: lm head"):
            yield                          # the GEMM inside compute_logits counts as the LM head
            return
        frame = [name, CLOCK(), 0.0]
        self.stack.append(frame)
        try:
            yield
        finally:
            self.stack.pop()
            dt = CLOCK() - frame[1]
            self.total[name] += dt - frame[2]
            self.calls[name] += 1
            if self.stack:
                self.stack[-1][2] += dt

    def wrap(self, obj, attr: str, name: str) -> None:
        fn = getattr(obj, attr)
        prof = self

        def timed(*args, **kw):
            with prof.phase(name):
                return fn(*args, **kw)
        timed.__wrapped__ = fn
        setattr(obj, attr, timed)

    def reset(self) -> None:
        self.total.clear()
        self.calls.clear()


def instrument(engine, prof: Profiler) -> None:
    """Time the engine's phases and the backend ops its model calls (patched on the instances and
    modules this engine uses; the profile is of this process only)."""
    import rawpaged.engine.output_processor as op_mod
    import rawpaged.worker.model_runner as mr_mod
    from rawpaged.tokenizer import IncrementalDetokenizer

    ex = engine.executor
    backend = ex.backend
    for op, phase in OP_PHASES.items():
        if hasattr(backend, op) and not hasattr(getattr(backend, op), "__wrapped__"):
            prof.wrap(backend, op, phase)
    model = ex.model
    prof.wrap(model, "compute_logits", "forward: lm head")
    fused = getattr(getattr(ex, "runner", None), "graphs", None)
    if fused is not None and hasattr(fused, "hidden"):            # the CPU's fused decode step
        prof.wrap(fused, "hidden", "forward: decoder stack (fused)")
    prof.wrap(engine.scheduler, "schedule", "schedule")
    prof.wrap(engine.scheduler, "on_step_done", "schedule")
    if not hasattr(mr_mod.prepare_inputs, "__wrapped__"):
        prof.wrap(mr_mod, "prepare_inputs", "prepare inputs")
    prof.wrap(backend, "to_device", "prepare inputs")
    sampler = engine.output_processor.sampler
    orig_call = type(sampler).__call__

    class TimedSampler(type(sampler)):
        def __call__(self, logits, rows, *rest):
            with prof.phase("sampling"):
                return orig_call(self, logits, rows, *rest)
    sampler.__class__ = TimedSampler
    if not hasattr(IncrementalDetokenizer.step, "__wrapped__"):
        prof.wrap(IncrementalDetokenizer, "step", "detokenize")
    if not hasattr(op_mod.make_output, "__wrapped__"):
        prof.wrap(op_mod, "make_output", "outputs")
    prof.wrap(engine, "step", "python")


def make_engine(args, max_seqs: int):
    from rawpaged.engine import EngineConfig, LLMEngine
    root = Path(tempfile.gettempdir()) / "rawpaged-bench"
    model = random_llama(root)
    return LLMEngine(EngineConfig(model=str(model), device="cpu", dtype=args.dtype, kv_cache_memory=1 << 30,
                                  max_num_seqs=max(max_seqs, 8),
                                  max_num_batched_tokens=max(2048, max_seqs * args.prompt_len)))


def add_requests(engine, n: int, prompt_len: int, max_tokens: int, seed: int = 0) -> None:
    from rawpaged.sampling_params import SamplingParams
    rng = np.random.default_rng(seed)
    sp = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    for _ in range(n):
        engine.add_request(None, None, sp, prompt_token_ids=rng.integers(3, engine.model_config.vocab_size,
                                                                         prompt_len).tolist())


def profile_offline(engine, prof: Profiler, batch: int, args) -> tuple[dict, dict, float]:
    """(prefill step phases ms, mean decode step phases ms, decode step ms)."""
    # NOTE: prompts of their own per batch (and for the warm-up): a prompt drawn before would be
    # served by the prefix cache and the prefill would compute only its last tokens
    add_requests(engine, batch, args.prompt_len, args.steps + 2, seed=getattr(args, "seed", batch))
    prof.reset()
    while engine.stats.generation_tokens < batch:             # the prefill step(s)
        engine.step()
    prefill = {k: 1e3 * v for k, v in prof.total.items()}
    prof.reset()
    t = CLOCK()
    for _ in range(args.steps):
        engine.step()
    per_step = (CLOCK() - t) / args.steps
    decode = {k: 1e3 * v / args.steps for k, v in prof.total.items()}
    while engine.has_unfinished_requests():
        engine.step()
    engine.stats.generation_tokens = 0
    return prefill, decode, 1e3 * per_step


PHASE_ORDER = ["schedule", "prepare inputs", "forward: embedding", "forward: norms", "forward: linear",
               "forward: rope", "forward: cache write", "forward: rope + cache write", "forward: attention", "forward: activation",
               "forward: decoder stack (fused)",
               "forward: lm head", "sampling", "detokenize", "outputs", "python",
               "hand-off", "chunk + JSON", "SSE write"]


def print_table(title: str, columns: dict[str, dict], totals: dict[str, float]) -> None:
    print(f"\n{title} (load average {os.getloadavg()[0]:.1f})\n")
    names = list(columns)
    print("| phase | " + " | ".join(names) + " |")
    print("| --- | " + " | ".join("---:" for _ in names) + " |")
    phases = [p for p in PHASE_ORDER if any(p in c for c in columns.values())]
    for p in phases:
        cells = []
        for n in names:
            v = columns[n].get(p, 0.0)
            share = 100 * v / totals[n] if totals[n] else 0
            cells.append(f"{v:.3f} ({share:.0f}%)")
        print(f"| {p} | " + " | ".join(cells) + " |")
    print("| **total** | " + " | ".join(f"**{totals[n]:.3f}**" for n in names) + " |")


def run_offline(args) -> None:
    prof = Profiler()
    engine = make_engine(args, max(args.batches))
    instrument(engine, prof)
    # NOTE: the warm-up's prompts as long as the measured ones: a first prefill of several query
    # tiles ran the attention ~10 ms slower than the next ones, which a 16-token warm-up left in the
    # measured prefill step
    profile_offline(engine, prof, 2, argparse.Namespace(prompt_len=args.prompt_len, steps=2, seed=10_000))
    pre, dec, tot_pre, tot_dec = {}, {}, {}, {}
    for b in args.batches:
        p, d, step_ms = profile_offline(engine, prof, b, args)
        pre[f"batch {b}"], dec[f"batch {b}"] = p, d
        tot_pre[f"batch {b}"] = sum(p.values())
        tot_dec[f"batch {b}"] = step_ms
    clock = "thread CPU time" if CLOCK is time.thread_time else "wall clock"
    print(f"machine: {machine()}; commit {commit()}; dtype {args.dtype}; prompt {args.prompt_len} tokens; {clock}")
    print_table("Prefill step, ms (one step of `batch` prompts)", pre, tot_pre)
    print_table(f"Decode step, ms (mean of {args.steps} steps)", dec, tot_dec)


# -- the server ---------------------------------------------------------------------------------
def instrument_server(prof: Profiler) -> None:
    """Time the event-loop side of a served token: the hand-off from the engine thread, the chunk
    building and the SSE write. The engine thread's phases land in the same profiler (the phases of
    the two threads never nest: each thread keeps its own stack)."""
    import threading

    from rawpaged.server import async_engine, serving, state

    local = threading.local()
    orig_phase = prof.phase

    @contextmanager
    def per_thread_phase(name):            # one stack per thread
        saved = prof.stack
        prof.stack = getattr(local, "stack", None) or []
        local.stack = prof.stack
        try:
            with orig_phase(name):
                yield
        finally:
            prof.stack = saved
    prof.phase = per_thread_phase

    orig_call_in_loop = async_engine.AsyncEngine._call_in_loop

    def call_in_loop(self, fn, *a):
        sent = time.perf_counter()

        def timed(*b):
            prof.total["hand-off"] += time.perf_counter() - sent
            prof.calls["hand-off"] += 1
            return fn(*b)
        return orig_call_in_loop(self, timed, *a)
    async_engine.AsyncEngine._call_in_loop = call_in_loop
    prof.wrap(serving, "_completion_chunks", "chunk + JSON")
    orig = state.EventStream.__call__

    async def call(self, scope, receive, send):
        async def timed_send(msg):
            t = time.perf_counter()
            await send(msg)
            prof.total["SSE write"] += time.perf_counter() - t
            prof.calls["SSE write"] += 1
        return await orig(self, scope, receive, timed_send)
    state.EventStream.__call__ = call


def run_server(args) -> None:
    from rawpaged.server.app import BackgroundServer
    from rawpaged.server.state import ServerConfig
    prof = Profiler()
    engine = make_engine(args, max(args.batches))
    instrument(engine, prof)
    instrument_server(prof)
    cols, totals = {}, {}
    with BackgroundServer(engine, ServerConfig("m", stats_log_interval_s=0)) as srv:
        client = [sys.executable, str(Path(__file__).parent / "serving.py"), "--url", srv.url,
                  "--num-prompts", "", "--rate", "inf", "--temperature", "0",
                  "--tokenizer", str(engine.model_config.path), "--max-prompt-len", str(args.prompt_len),
                  "--max-output-len", str(args.steps)]
        warm = list(client)
        warm[warm.index("--num-prompts") + 1] = "2"
        subprocess.run(warm, capture_output=True, check=True)
        for b in args.batches:
            cmd = list(client)
            cmd[cmd.index("--num-prompts") + 1] = str(b)
            out_json = Path(tempfile.mkstemp(suffix=".json")[1])
            prof.reset()
            t = time.perf_counter()
            subprocess.run(cmd + ["--json", str(out_json)], capture_output=True, check=True)
            wall = time.perf_counter() - t
            s = json.loads(out_json.read_text())
            tokens = s["mean_output_tokens"] * s["succeeded"]
            col = {k: 1e3 * v / tokens for k, v in prof.total.items()}
            cols[f"batch {b}"] = col
            totals[f"batch {b}"] = sum(col.values())
            print(f"batch {b}: {tokens:.0f} tokens in {wall:.2f} s, TPOT p50 {s['tpot_ms']['p50']:.2f} ms, "
                  f"TTFT p50 {s['ttft_ms']['p50']:.2f} ms", flush=True)
    print(f"machine: {machine()}; commit {commit()}; dtype {args.dtype}")
    print_table("Served token, ms of each phase per streamed token (engine thread + event loop)", cols, totals)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 16, 48])
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--server", action="store_true", help="profile served tokens (else one engine step)")
    ap.add_argument("--cpu-time", action="store_true",
                    help="offline, 1 thread: time phases by this thread's CPU time (shared machines)")
    args = ap.parse_args()
    if args.cpu_time:
        if args.server:
            ap.error("--cpu-time times the offline step only")
        global CLOCK
        CLOCK = time.thread_time
    (run_server if args.server else run_offline)(args)


if __name__ == "__main__":
    main()
