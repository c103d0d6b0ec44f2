"""The engine's host time per step, measured: what a GPU step costs besides the GPU's work.

    cost = measure_host_cost(data_dir)      # HostCost: seconds per step + per batched sequence

A GPU step of rawpaged (or of the paper's vLLM 0.1) is the GPU's work plus the Python around it:
schedule, KV bookkeeping, input preparation, sampling's per-row logic, detokenizing, the stop
checks and the outputs. The simulator runs exactly that code, with the paper's OPT-13B setup, so
this measures it there: the engine's CPU time per step minus the simulated executor's own (driver.py),
plus the real executor's input preparation (the simulator builds the inputs too, timed apart), with
the real OPT tokenizer detokenizing. NOTE: the executor's synthetic logits have 32 columns, so
sampling costs its per-row Python here; on a GPU the vocabulary-wide math runs on the device.
The fit is least squares of host time on [1, sequences in the batch] over every step of a ShareGPT
burst (batches up to max_num_seqs) and of a run at half the burst's throughput (small batches).
Times are this thread's CPU time (time.thread_time): other jobs on a shared machine add little.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from rawpaged.engine.config import EngineConfig
from rawpaged.executor.simulated import SIM_VOCAB, build_sim_engine
from rawpaged.repro.driver import run_workload
from rawpaged.repro.specs import paper_setup
from rawpaged.repro.workloads import FILES, load_lengths, make_workload, with_rate


@dataclass(frozen=True)
class HostCost:
    step: float                  # seconds per step
    per_seq: float               # seconds per sequence in the batch
    steps: int                   # steps fitted
    median_abs_error: float      # of the fit, relative, per step
    max_batch: int

    def as_dict(self) -> dict:
        return asdict(self)


def fit_host_cost(num_seqs, host) -> tuple[float, float, float]:
    """(per step, per sequence, median relative error) of host ~ a + b * num_seqs."""
    s, h = np.asarray(num_seqs, dtype=np.float64), np.asarray(host, dtype=np.float64)
    keep = s > 0
    a = np.stack([np.ones(keep.sum()), s[keep]], axis=1)
    (step, per_seq), *_ = np.linalg.lstsq(a, h[keep], rcond=None)
    err = float(np.median(np.abs(a @ [step, per_seq] - h[keep]) / h[keep]))
    return float(step), float(per_seq), err


def _opt_tokenizer(data_dir: Path):
    import tokenizers

    from rawpaged.tokenizer import Tokenizer
    return Tokenizer(tokenizers.Tokenizer.from_file(str(Path(data_dir) / FILES["opt_tokenizer"])))


def measure_host_cost(data_dir: str | Path, num_requests: int = 200, seed: int = 21) -> tuple[HostCost, dict]:
    """Host time per step of the paged engine on OPT-13B / A100-40GB, ShareGPT (see the module docstring)."""
    from rawpaged.repro.runner import PAPER_ENGINE
    setup = paper_setup("opt-13b")
    config = EngineConfig(**dict(PAPER_ENGINE, enable_prefix_caching=False))
    src = load_lengths("sharegpt", data_dir)
    burst = make_workload(src, num_requests, math.inf, seed=seed)
    runs = []
    for wl in (burst, None):
        if wl is None:
            wl = with_rate(burst, 0.5 * runs[0].throughput)
        engine = build_sim_engine(setup, config, tokenizer=_opt_tokenizer(data_dir), prepare_inputs=True)
        runs.append(run_workload(engine, wl, "model", vocab=SIM_VOCAB, measure_host=True))
    seqs = np.concatenate([r.steps["num_seqs"] for r in runs])
    host = np.concatenate([r.steps["host_cpu"] for r in runs])
    step, per_seq, err = fit_host_cost(seqs, host)
    cost = HostCost(step, per_seq, int((seqs > 0).sum()), err, int(seqs.max()))
    info = {"burst_mean_batch": float(runs[0].steps["num_seqs"].mean()),
            "half_rate_mean_batch": float(runs[1].steps["num_seqs"].mean()),
            "mean_host_ms": 1e3 * float(host[seqs > 0].mean())}
    return cost, info
