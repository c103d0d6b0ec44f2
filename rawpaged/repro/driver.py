"""The driver: replays a workload through an engine on a clock it owns, and records what happened.

    result = run_workload(engine, workload, clock="model")    # simulated time (the cost model)
    result = run_workload(engine, workload, clock="wall")     # measured step times (a real engine)

Loop: requests whose arrival time has passed join the engine; one engine step runs; the clock
advances by the step's time: the cost model's (`model`: the simulator's, or a real engine timed by
the same model, for validation), the step's measured wall time (`wall`), or the CPU time this
process spent in it (`cpu`: on a machine shared with other jobs, what the step would take alone
when one thread does the work; calibration measures with it). When nothing is in the
engine the clock jumps to the next arrival (nobody sleeps). First tokens and completions are stamped
with the clock at the end of the step that produced them: arrivals, first tokens and completions
are all in the driver's time, never the engine's own timestamps.

The engine's executor is wrapped (`record_shapes`) so every step's SchedulerOutput is seen before
the model runs: its StepShape (for the cost model and calibration), the number of requests in the
batch, and optionally the batch's composition (request id, sequence index, tokens) for validation.
It also times the executor in this thread's CPU clock, so each step's host time (the engine's own
work: scheduling, KV bookkeeping, sampling, detokenizing, and the inputs a simulated executor
prepares on request) is the step's CPU time minus the executor's (hostcost.py fits it).

Early stop (`stop_above`): the mean normalized latency of a run is bounded below at any moment by
counting every request that has arrived but not finished as if it finished now (and the ones still
to come as 0): sum((finish or now) - arrival) / output_len) / n only grows. Once that bound passes
`stop_above`, the run's latency is above it whatever the rest does: the run stops there (a rate
search needs no more), exactly, so a stopped run decides the same as a full one.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import numpy as np

from rawpaged.errors import RawpagedError
from rawpaged.repro.costmodel import CostModel, StepShape
from rawpaged.repro.workloads import Workload, prompt_token_ids
from rawpaged.sampling_params import SamplingParams

STEP_FIELDS = ("t", "dt", "num_seqs", "num_tokens", "num_sampled", "decode_context", "prefill_pairs",
               "swap_blocks", "copy_blocks", "batched_requests", "real_tokens", "reserved",
               "internal", "external", "free", "total", "logical_blocks", "physical_blocks", "prefill_seqs",
               "prefill_tokens", "decode_blocks", "rounding", "host_cpu")
MEASURED_FIELDS = ("host_cpu",)     # timed on this machine: differs from run to run (the rest is deterministic)


def record_shapes(executor, record_batches: bool = False, measure_host: bool = False):
    """Wrap executor.execute_model so the driver sees each step's SchedulerOutput first (and, with
    `measure_host`, times it in this thread's CPU clock)."""
    inner = executor.execute_model
    executor.shapes_seen = []
    executor.last_execute_cpu = 0.0

    def execute_model(out):
        executor.last_out_shape = StepShape.of(out, executor.config.block_size)
        executor.last_batched_requests = len(out.scheduled)
        if record_batches:
            executor.last_batch = tuple((s.group.request_id, s.group.seqs.index(s.seq), s.num_new_tokens)
                                        for s in out.batch)
        start, cpu = time.perf_counter(), time.thread_time() if measure_host else 0.0
        result = inner(out)
        if measure_host:
            executor.last_execute_cpu = time.thread_time() - cpu
        executor.last_execute_wall = time.perf_counter() - start
        return result

    executor.execute_model = execute_model
    return executor


@dataclass
class RunResult:
    steps: dict                        # STEP_FIELDS -> np.ndarray, one entry per step
    arrival: np.ndarray
    first_token: np.ndarray
    finish: np.ndarray
    prompt_len: np.ndarray
    output_len: np.ndarray
    num_preemptions: int
    wall_s: float                      # how long the run took on this machine
    batches: list = field(default_factory=list)   # per step composition (record_batches=True)
    step_wall: np.ndarray | None = None           # measured wall seconds of each step
    step_cpu: np.ndarray | None = None            # CPU seconds of this process in each step
    overloaded: bool = False                      # stopped early: queue past max_waiting, or latency past stop_above
    latency_lower_bound: float = math.nan         # where a run stopped by stop_above had got (> stop_above)

    @property
    def num_requests(self) -> int:
        return len(self.arrival)

    @property
    def done(self) -> np.ndarray:
        return ~np.isnan(self.finish)

    @property
    def duration(self) -> float:
        """From the first arrival to the last completion (to the last step when stopped early)."""
        if not self.num_requests:
            return 0.0
        end = float(self.steps["t"][-1] + self.steps["dt"][-1]) if self.overloaded else float(np.nanmax(self.finish))
        return end - float(self.arrival.min())

    @property
    def throughput(self) -> float:
        """Completed requests per second from the first arrival to the last completion."""
        return int(self.done.sum()) / self.duration if self.duration > 0 else math.inf

    @property
    def token_throughput(self) -> float:
        return float(self.output_len[self.done].sum()) / self.duration if self.duration > 0 else math.inf

    @property
    def normalized_latency(self) -> float:
        """The paper's metric: mean over requests of end-to-end latency / output length (s/token);
        inf for a run stopped because its queue kept growing (past the knee of the curve)."""
        if self.overloaded:
            return math.inf
        return float(np.mean((self.finish - self.arrival) / self.output_len))

    @property
    def mean_step_time(self) -> float:
        dt = self.steps["dt"]
        return float(dt[self.steps["num_seqs"] > 0].mean())

    def window(self) -> np.ndarray:
        """Time weights of the steady state: steps between the arrival of the request 10% into the
        workload and the last arrival (no warm-up from an empty engine, no drain after the last
        arrival), each weighted by its duration. A run with all arrivals at once: every step."""
        s = self.steps
        lo, hi = float(np.sort(self.arrival)[len(self.arrival) // 10]), float(self.arrival.max())
        if hi <= lo:
            return s["dt"].copy()
        end = s["t"] + s["dt"]
        overlap = np.clip(np.minimum(end, hi) - np.maximum(s["t"], lo), 0, None)
        return overlap if overlap.sum() > 0 else s["dt"].copy()

    @property
    def mean_batched_requests(self) -> float:
        """Requests in the batch, time-averaged over the steady state (Fig. 13). NOTE: a plain mean
        over steps counts the many short steps of small batches (warm-up, drain) too often."""
        w = self.window()
        return float((self.steps["batched_requests"] * w).sum() / w.sum()) if w.sum() > 0 else 0.0

    def memory_fractions(self, whole_pool: bool = False) -> dict:
        """Shares of the KV memory over the steady state (Fig. 2): of the memory in use (every slot but
        the free ones), or of the whole pool (`whole_pool`, the paper's bars, which add up to 100%).

        The paper's categories: real tokens, reservation (slots a sequence will fill), internal
        fragmentation (over-reservation for a length the sequence never reaches, and whole-unit
        rounding), external fragmentation & others (gaps between ranges, the buddy allocator's
        rounding: "external fragmentation from the memory allocator like the buddy allocator", and,
        of the whole pool, the free slots)."""
        s = self.steps
        parts = ("real_tokens", "reserved", "internal", "external")
        base = s["total"] if whole_pool else s["total"] - s["free"]
        w = self.window() * (base > 0)
        if w.sum() == 0:
            return {k: 0.0 for k in parts}
        vals = {"real_tokens": s["real_tokens"], "reserved": s["reserved"], "internal": s["internal"] - s["rounding"],
                "external": s["external"] + s["rounding"] + (s["free"] if whole_pool else 0)}
        safe = np.maximum(base, 1)
        return {k: float((vals[k] / safe * w).sum() / w.sum()) for k in parts}

    def sharing_saving(self) -> float:
        """Share of KV blocks sharing saves: 1 - physical / logical, over the steady state (Fig. 15)."""
        s = self.steps
        w = self.window() * (s["logical_blocks"] > 0)
        if w.sum() == 0:
            return 0.0
        frac = 1 - s["physical_blocks"] / np.maximum(s["logical_blocks"], 1)
        return float((frac * w).sum() / w.sum())


def sampling_params(r) -> SamplingParams:
    """What a workload request asks the engine for: exactly output_len tokens."""
    if r.beam_width:
        return SamplingParams(n=r.beam_width, best_of=r.beam_width, use_beam_search=True, temperature=0.0,
                              ignore_eos=True, max_tokens=r.output_len)
    return SamplingParams(n=r.n, temperature=1.0 if r.n > 1 else 0.0, ignore_eos=True, max_tokens=r.output_len)


def _sharing(engine) -> tuple[int, int]:
    """(logical, physical) device blocks of the running sequences."""
    bm = engine.block_manager
    logical, physical = 0, set()
    for group in engine.scheduler.running:
        for seq in group.get_unfinished_seqs():
            table = bm.get_block_table(seq)
            logical += len(table)
            physical.update(table)
    return logical, len(physical)


def run_workload(engine, wl: Workload, clock: str = "model", **kw) -> RunResult:
    """Replay `wl` through `engine` to the end (see the module docstring and step_workload)."""
    steps = step_workload(engine, wl, clock, **kw)
    while True:
        try:
            next(steps)
        except StopIteration as stop:
            return stop.value


def step_workload(engine, wl: Workload, clock: str = "model", *, cost_model: CostModel | None = None,
                  vocab: int, record_batches: bool = False, measure_sharing: bool = False,
                  max_waiting: int | None = None, stop_above: float | None = None, max_steps: int = 10_000_000,
                  measure_cpu: bool | None = None, measure_host: bool = False, progress=None):
    """run_workload one engine step at a time: a generator that yields after every step and returns
    the RunResult (StopIteration.value), so a caller can interleave the steps of several runs
    (calibration measures two workloads side by side). `progress(done, total)` is called
    now and then. With `max_waiting`, a run whose waiting queue grows past it stops early and is
    marked overloaded (its rate is past the system's capacity: latency grows without bound). With
    `stop_above`, a run stops as soon as its mean normalized latency is certain to exceed it.
    `measure_cpu` (default: with the "cpu" clock) records each step's process CPU time (step_cpu),
    `measure_host` its host time (the host_cpu column; hostcost.py); unmeasured, they are NaN.
    NOTE: off by default because CPU clocks are system calls (no vDSO): on this machine the four
    a step took a fifth of a simulated run's time."""
    if clock not in ("model", "wall", "cpu"):
        raise RawpagedError(f"clock must be 'model', 'wall' or 'cpu', got {clock!r}")
    ex = record_shapes(engine.executor, record_batches, measure_host)
    if measure_cpu is None:
        measure_cpu = clock == "cpu"
    snapshot = _record_snapshots(engine.scheduler)
    overloaded = False
    if clock == "model" and cost_model is None:
        cost_model = getattr(ex, "cost_model", None)
        if cost_model is None:
            raise RawpagedError("clock='model' needs a cost model for a real executor")
    reqs = wl.requests
    n = len(reqs)
    index = {}
    first = np.full(n, np.nan)
    finish = np.full(n, np.nan)
    rows, batches, walls, cpus = [], [], [], []
    t, nxt, done, steps = 0.0, 0, 0, 0
    # The latency bound's running sums: finished requests' latency / output, and over the requests
    # in the engine sum(1 / output) and sum(arrival / output).
    bound_done, bound_inv, bound_arr = 0.0, 0.0, 0.0
    bound = math.nan
    rounding = getattr(engine.block_manager, "allocator_rounding", None)
    start_wall = time.perf_counter()
    while done < n:
        while nxt < n and reqs[nxt].arrival <= t:
            r = reqs[nxt]
            rid = str(nxt)
            index[rid] = nxt
            engine.add_request(rid, None, sampling_params(r), prompt_token_ids=prompt_token_ids(wl, nxt, vocab),
                               arrival_time=r.arrival)
            bound_inv += 1.0 / r.output_len
            bound_arr += r.arrival / r.output_len
            nxt += 1
        if not engine.has_unfinished_requests():
            t = max(t, reqs[nxt].arrival)
            continue
        ex.last_execute_cpu = 0.0
        w0 = time.perf_counter()
        c0 = time.process_time() if measure_cpu else 0.0
        h0 = time.thread_time() if measure_host else 0.0
        outputs = engine.step()
        host = (time.thread_time() - h0 - ex.last_execute_cpu + getattr(ex, "last_prepare_cpu", 0.0)
                if measure_host else math.nan)
        wall = time.perf_counter() - w0
        cpu = time.process_time() - c0 if measure_cpu else math.nan
        shape = ex.last_out_shape
        dt = cost_model.step_time(shape) if clock == "model" else wall if clock == "wall" else cpu
        t += dt
        for o in outputs:
            i = index[o.request_id]
            if math.isnan(first[i]) and any(c.token_ids for c in o.outputs):
                first[i] = t
            if o.finished:
                if o.error:
                    raise RawpagedError(f"request {o.request_id} was refused: {o.error}")
                finish[i] = t
                done += 1
                r = reqs[i]
                bound_done += (t - r.arrival) / r.output_len
                bound_inv -= 1.0 / r.output_len
                bound_arr -= r.arrival / r.output_len
        kv = snapshot[0].kv_slots              # the accounting the engine's own stats just took
        logical, physical = _sharing(engine) if measure_sharing else (0, 0)
        rows.append((t - dt, dt, shape.num_seqs, shape.num_tokens, shape.num_sampled, shape.decode_context,
                     shape.prefill_pairs, shape.swap_blocks, shape.copy_blocks, ex.last_batched_requests,
                     kv.real_tokens, kv.reserved_unused, kv.internal_fragmentation, kv.external_fragmentation,
                     kv.free, kv.total, logical, physical, shape.prefill_seqs, shape.prefill_tokens,
                     shape.decode_blocks, rounding() if rounding else 0, host))
        walls.append(wall)
        cpus.append(cpu)
        if record_batches:
            batches.append(ex.last_batch)
        steps += 1
        yield
        if steps >= max_steps:
            raise RawpagedError(f"workload did not finish in {max_steps} steps ({done}/{n} requests done)")
        if progress is not None and steps % 500 == 0:
            progress(done, n)
        if max_waiting is not None and len(engine.scheduler.waiting) > max_waiting:
            overloaded = True
            break
        if stop_above is not None and done < n:
            bound = (bound_done + t * bound_inv - bound_arr) / n
            if bound > stop_above:
                overloaded = True
                break
    cols = np.array(rows, dtype=np.float64).T if rows else np.zeros((len(STEP_FIELDS), 0))
    stats = engine.get_stats()
    return RunResult(
        steps=dict(zip(STEP_FIELDS, cols)), arrival=np.array([r.arrival for r in reqs]), first_token=first,
        finish=finish, prompt_len=np.array([r.prompt_len for r in reqs]),
        output_len=np.array([r.output_len for r in reqs]),
        num_preemptions=stats["num_preemptions_recompute"] + stats["num_preemptions_swap"],
        wall_s=time.perf_counter() - start_wall, batches=batches, step_wall=np.array(walls), step_cpu=np.array(cpus),
        overloaded=overloaded, latency_lower_bound=bound if overloaded and stop_above is not None else math.nan)


def _record_snapshots(scheduler) -> list:
    """Keep the last Scheduler.stats() the engine took (one slot accounting per step, not two)."""
    holder = [None]
    inner = scheduler.stats

    def stats():
        holder[0] = inner()
        return holder[0]

    scheduler.stats = stats
    return holder
