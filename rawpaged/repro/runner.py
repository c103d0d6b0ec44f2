"""One experiment point = one engine, one workload, one run; points run in a process pool.

    point = Point("fig13", "opt-13b", "rawpaged", "sharegpt", num_requests=500, rate=2.0)
    row = run_point(point, data_dir)            # a flat dict: the point's fields + its metrics
    rows = run_points(points, data_dir, jobs=2, progress=...)

A point runs on the simulator (`mode="sim"`: a paper-scale SimSetup, the cost model's clock) or on
the real engine (`mode="real"`: the CPU backend and a small random model, every length and the KV
budget divided by `scale`, measured step times). Systems are the engine's KV managers and batching:
  rawpaged      the paged manager, continuous batching (vLLM in the paper's figures)
  orca-max / orca-pow2 / orca-oracle   Orca's contiguous reservations placed by a buddy allocator
                (the paper's), continuous batching; orca-*-ff: the same placed first-fit
  static        orca-max reservations with request-level batching (FasterTransformer)
"""
from __future__ import annotations

import math
import os
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, fields, replace
from pathlib import Path

from rawpaged.engine.config import BLOCK_SIZES, EngineConfig
from rawpaged.errors import RawpagedError
from rawpaged.executor.simulated import SIM_VOCAB, build_sim_engine
from rawpaged.repro.costmodel import CostModel
from rawpaged.repro.driver import RunResult, run_workload
from rawpaged.repro.specs import HOST_SEQ_S, HardwareProfile, SimSetup, paper_setup
from rawpaged.repro.workloads import LengthSource, load_lengths, make_workload

SYSTEMS = {
    "rawpaged": dict(kv_manager="paged"),
    "orca-oracle": dict(kv_manager="orca-oracle"),
    "orca-pow2": dict(kv_manager="orca-pow2"),
    "orca-max": dict(kv_manager="orca-max"),
    "static": dict(kv_manager="orca-max", batching="static"),
    "orca-oracle-ff": dict(kv_manager="orca-oracle", orca_allocator="first-fit"),
    "orca-pow2-ff": dict(kv_manager="orca-pow2", orca_allocator="first-fit"),
}
# The paper's vLLM: blocks of 16, at most 256 sequences and 2560 tokens a step, no chunked prefill,
# no prefix caching (but in the shared-prefix experiment), 4 GiB of swap per GPU.
PAPER_ENGINE = dict(block_size=16, max_num_seqs=256, max_num_batched_tokens=2560, enable_chunked_prefill=False,
                    enable_prefix_caching=False, swap_space=4.0)
REAL_MODEL = dict(hidden_size=256, num_layers=4, num_heads=4, num_kv_heads=4, vocab_size=512,
                  max_position_embeddings=2048)


@dataclass(frozen=True)
class Point:
    figure: str
    model: str                   # a paper model (sim), or "tiny" (real)
    system: str
    workload: str                # sharegpt | alpaca | chatbot | translate-one-shot | translate-five-shot
    num_requests: int
    rate: float
    seed: int = 0
    n: int = 1
    beam_width: int = 0
    block_size: int = 16
    preemption_mode: str = "auto"
    mode: str = "sim"            # sim | real
    scale: int = 1               # real mode: lengths, max_len and KV slots / scale
    stop_overloaded: bool = False    # stop when a quarter of the requests wait (rate past capacity)
    stop_above: float | None = None  # stop once the mean normalized latency must exceed this (driver.py)
    measure_sharing: bool = False
    device: str = "cpu"          # real mode: the backend
    seq_overhead: float | None = None    # sim: the profile's host seconds per batched sequence, replaced (hostfit.py)

    def label(self) -> str:
        rate = "inf" if math.isinf(self.rate) else f"{self.rate:g}"
        extra = f" n={self.n}" if self.n > 1 else f" beam={self.beam_width}" if self.beam_width else ""
        return f"{self.model} {self.workload} {self.system}{extra} bs={self.block_size} @ {rate} req/s"


def engine_options(system: str, *, simulated: bool, prefix: bool) -> dict:
    """EngineConfig keyword arguments of a system (one-line error for an unknown one)."""
    if system not in SYSTEMS:
        raise RawpagedError(f"unknown system {system!r}: choose from {', '.join(SYSTEMS)}")
    opts = dict(SYSTEMS[system])
    known = {f.name for f in fields(EngineConfig)}
    if system == "rawpaged" and "kv_manager" not in known:
        opts = {}                                    # NOTE: an engine from before the baselines: paged
    missing = sorted(set(opts) - known)
    if missing:
        raise RawpagedError(f"system {system!r} needs the engine option {missing[0]!r}, which this build of "
                            f"rawpaged lacks (the Orca baselines are not merged)")
    if opts.get("kv_manager", "paged") != "paged":
        if simulated and "orca_granularity" in known:
            opts["orca_granularity"] = 1             # Orca reserves token ranges, not blocks
    else:
        opts["enable_prefix_caching"] = prefix
    return opts


# -- per-process caches (workers load each length source once) -----------------------------------
_SOURCES: dict = {}
_HARDWARE: dict = {}


def lengths_for(workload: str, data_dir: Path) -> LengthSource:
    key = (workload, str(data_dir))
    if key not in _SOURCES:
        if workload.startswith("translate-"):
            _SOURCES[key] = load_lengths("translate", data_dir, prefix=workload.removeprefix("translate-"))
        else:
            _SOURCES[key] = load_lengths(workload, data_dir)
    return _SOURCES[key]


def sim_setup(model: str, hardware: str | None) -> SimSetup:
    if hardware and (hardware.endswith(".json") or os.sep in hardware):
        if hardware not in _HARDWARE:
            _HARDWARE[hardware] = HardwareProfile.from_json(hardware)
        return paper_setup(model, _HARDWARE[hardware])
    return paper_setup(model, hardware)


def make_engine(p: Point, *, hardware: str | None = None, real_model_dir: Path | None = None,
                real_kv_slots: int | None = None, cost_model: CostModel | None = None, host: str = "vllm01"):
    """The engine of a point: simulated (paper setup) or real (CPU backend, small model).
    host="rawpaged": the simulated profile pays rawpaged's measured host time per sequence (specs.HOST_SEQ_S)
    instead of its own (the A100 profiles': vLLM 0.1's, fitted); a point's seq_overhead overrides both."""
    prefix = p.workload.startswith("translate-")
    opts = dict(PAPER_ENGINE, **engine_options(p.system, simulated=p.mode == "sim", prefix=prefix),
                block_size=p.block_size, preemption_mode=p.preemption_mode)
    if p.mode == "sim":
        config = EngineConfig(**dict(opts, block_size=p.block_size if p.block_size in BLOCK_SIZES else 16))
        setup = sim_setup(p.model, hardware)
        seq = p.seq_overhead if p.seq_overhead is not None else HOST_SEQ_S if host == "rawpaged" else None
        if seq is not None:
            setup = replace(setup, hardware=replace(setup.hardware, seq_overhead=seq))
        return build_sim_engine(setup, config, cost_model, block_size=p.block_size)
    from rawpaged.engine.llm_engine import LLMEngine
    if real_model_dir is None or real_kv_slots is None:
        raise RawpagedError("a real-mode point needs a model directory and a KV budget")
    from rawpaged.config import ModelConfig
    mc = ModelConfig.from_dir(real_model_dir)
    dtype_bytes = 4 if p.device == "cpu" else 2            # float32 on the CPU, float16 on a GPU
    per_token = 2 * mc.num_layers * mc.num_kv_heads * mc.head_dim * dtype_bytes
    max_len = min(mc.max_model_len, 2048 // p.scale)
    opts.update(model=str(real_model_dir), device=p.device, dtype="float32" if p.device == "cpu" else "float16",
                kv_cache_memory=real_kv_slots * per_token,
                max_model_len=max_len, swap_space=opts["swap_space"] / 64,
                max_num_batched_tokens=max(PAPER_ENGINE["max_num_batched_tokens"] // p.scale, max_len))
    return LLMEngine(EngineConfig(**opts))


def real_model(directory: str | Path) -> Path:
    """The small random LLaMA the real-mode points run (written once; the demo model's tokenizer)."""
    from rawpaged.hub import DEMO_MODEL
    from rawpaged.testing import make_random_llama
    path = Path(directory)
    if not (path / "config.json").is_file():
        make_random_llama(path, Path(DEMO_MODEL) / "tokenizer.json", **REAL_MODEL)
    return path


def workload_for(p: Point, data_dir: Path, max_len: int):
    src = lengths_for(p.workload, data_dir).scaled(p.scale)
    return make_workload(src, p.num_requests, p.rate, p.seed, max_len=max_len, n=p.n, beam_width=p.beam_width)


def summarize(p: Point, r: RunResult, **extra) -> dict:
    mem = r.memory_fractions()
    row = {f.name: getattr(p, f.name) for f in fields(p)}
    row.update(
        normalized_latency=r.normalized_latency, throughput=r.throughput, token_throughput=r.token_throughput,
        batched_requests=r.mean_batched_requests, mean_step_time=r.mean_step_time, steps=len(r.steps["dt"]),
        preemptions=r.num_preemptions, sharing_saving=r.sharing_saving() if p.measure_sharing else float("nan"),
        mem_real=mem["real_tokens"], mem_reserved=mem["reserved"], mem_internal=mem["internal"],
        mem_external=mem["external"], **{f"pool_{k}": v for k, v in r.memory_fractions(whole_pool=True).items()},
        sim_seconds=r.duration, wall_s=r.wall_s, overloaded=r.overloaded,
        latency_lower_bound=r.latency_lower_bound, completed=int(r.done.sum()), **extra)
    return row


def clock_of(p: Point) -> str:
    """The simulator's cost model; on the real engine the CPU time of a step on the CPU backend
    (robust to other jobs on a shared machine: see driver.py), wall time on a GPU."""
    return "model" if p.mode == "sim" else "cpu" if p.device == "cpu" else "wall"


def limit_blas_threads(n: int = 1) -> None:
    """One OpenBLAS thread for real-mode runs, unless OPENBLAS_NUM_THREADS says otherwise.

    NOTE: on this shared 2-core machine a multi-threaded OpenBLAS made the small model's decode step
    20x slower (its threads wait on descheduled threads); one thread measures the engine, not the
    contention. NumPy has loaded OpenBLAS by now, so the limit is set through its own entry point.
    Numba's threads too (the CPU backend's GEMMs and attention are Numba kernels): a step's CPU time
    with two threads counted the threads' waits for each other, and repeats of the same schedule
    spread by a third on an idle machine.
    """
    if "NUMBA_NUM_THREADS" not in os.environ:
        import numba
        numba.set_num_threads(n)        # NOTE: this thread's parallel regions (the engine steps here)
    if "OPENBLAS_NUM_THREADS" in os.environ:
        return
    import ctypes
    try:
        with open("/proc/self/maps") as f:
            libs = {line.split()[-1] for line in f if "openblas" in line.lower() and "/" in line}
    except OSError:
        return
    for path in libs:
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for name in ("scipy_openblas_set_num_threads64_", "openblas_set_num_threads64_",
                     "scipy_openblas_set_num_threads", "openblas_set_num_threads"):
            if hasattr(lib, name):
                getattr(lib, name)(ctypes.c_int(n))
                break


def run_point(p: Point, data_dir: str | Path, hardware: str | None = None,
              real_model_dir: str | Path | None = None, real_kv_slots: int | None = None, host: str = "vllm01") -> dict:
    if p.mode == "real":
        limit_blas_threads(1)
    engine = make_engine(p, hardware=hardware, real_model_dir=real_model_dir and Path(real_model_dir),
                         real_kv_slots=real_kv_slots, host=host)
    wl = workload_for(p, Path(data_dir), engine.max_model_len)
    r = run_workload(engine, wl, clock=clock_of(p), vocab=SIM_VOCAB,
                     measure_sharing=p.measure_sharing, stop_above=p.stop_above,
                     max_waiting=max(20, p.num_requests // 4) if p.stop_overloaded else None)
    return summarize(p, r)


def _run_packed(args):
    p, kwargs = args
    return run_point(p, **kwargs)


def run_points(points: list[Point], data_dir: Path, *, jobs: int = 1, progress=None, **kwargs) -> list[dict]:
    """Every point's row, in the order given; `progress(done, total, point)` after each.

    Real-mode points limit BLAS to one thread (limit_blas_threads).
    """
    rows: list[dict | None] = [None] * len(points)
    kwargs = dict(kwargs, data_dir=data_dir)
    if jobs <= 1 or len(points) == 1:
        for i, p in enumerate(points):
            rows[i] = run_point(p, **kwargs)
            if progress:
                progress(i + 1, len(points), p)
        return rows
    # NOTE: the longest points first, so the pool does not wait on one long tail at the end.
    order = sorted(range(len(points)), key=lambda i: -_weight(points[i]))
    context = None
    if any(p.mode == "real" for p in points):
        # NOTE: the real engine's Numba kernels start OpenMP threads; fork() after that is unsafe.
        import multiprocessing
        context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=jobs, mp_context=context) as pool:
        futures = {pool.submit(_run_packed, (points[i], kwargs)): i for i in order}
        for done, fut in enumerate(as_completed(futures), 1):
            i = futures[fut]
            rows[i] = fut.result()
            if progress:
                progress(done, len(points), points[i])
    return rows


def _weight(p: Point) -> float:
    per = {"sharegpt": 340, "chatbot": 440, "alpaca": 60}.get(p.workload, 45)
    return p.num_requests * per * max(p.n, p.beam_width, 1)
