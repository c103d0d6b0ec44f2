"""Does measuring two engines side by side change their step times? The A/B behind calibrate's CHUNK.

    python bench/calibrate_interleave.py --data ../shared/data [--rounds 2] [--out /tmp/interleave]

rawpaged repro calibrate measures the fitted workloads' steps (a replay of ShareGPT/4 at half its
throughput) side by side with held-out runs (Alpaca), so that both see the same machine load
(rawpaged/repro/real.py, interleave). This measures the replay's CPU time per step in four ways,
in this order, `--rounds` times: alone; beside an Alpaca run (all requests at once), turning to the
other engine after every step; the same in turns of CHUNK steps; alone again. It prints the mean
step time, and the median and mean of the one-sequence decode steps (the ones most exposed to the
other engine's state in the caches). One BLAS and one Numba thread, as calibrate runs.
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default="../shared/data", help="the shared data folder (workloads)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--out", default="/tmp/calibrate-interleave", help="where the random model is written")
    a = ap.parse_args()

    from rawpaged.executor.simulated import SIM_VOCAB
    from rawpaged.repro import real
    from rawpaged.repro.driver import run_workload, step_workload
    from rawpaged.repro.experiments import Context
    from rawpaged.repro.runner import lengths_for, limit_blas_threads
    from rawpaged.repro.workloads import make_workload, with_rate

    limit_blas_threads(1)
    ctx = Context(Path(a.out), Path(a.data))
    ctx.out.mkdir(parents=True, exist_ok=True)
    md, kv, shared = real.model_dir(ctx), real.slots("sharegpt"), []

    def engine():
        e = real.twin_engines(md, real.CPU_BASE, "rawpaged", kv, 512)[0]
        real._share_weights(e, shared)          # as calibrate: one set of weights for every engine
        return e

    burst = make_workload(lengths_for("sharegpt", ctx.data_dir).scaled(4), 150, math.inf, seed=11, max_len=512)
    fit = with_rate(burst, 0.5 * run_workload(engine(), burst, "cpu", vocab=SIM_VOCAB).throughput)
    first = run_workload(engine(), fit, "cpu", vocab=SIM_VOCAB)          # the schedule every replay repeats
    held = make_workload(lengths_for("alpaca", ctx.data_dir), 300, math.inf, seed=12, max_len=512)
    held_steps = len(run_workload(engine(), held, "cpu", vocab=SIM_VOCAB).steps["dt"])
    s = first.steps
    one = (s["num_seqs"] == 1) & (s["prefill_seqs"] == 0)

    def replay():
        return step_workload(engine(), fit, "model", cost_model=real.Replay(s["dt"]), vocab=SIM_VOCAB,
                             measure_cpu=True)

    print(f"replayed: {len(s['dt'])} steps ({one.sum()} one-sequence decodes); beside it: {held_steps} steps")
    print("| round | how | mean step ms | one-seq decode median ms | one-seq decode mean ms |")
    print("| ---: | --- | ---: | ---: | ---: |")
    for k in range(a.rounds):
        for how, chunk in (("alone", 0), ("side by side, turns of 1", 1),
                           (f"side by side, turns of {real.CHUNK}", real.CHUNK), ("alone", 0)):
            runs = [(replay(), len(s["dt"]))]
            if chunk:
                runs.append((step_workload(engine(), held, "cpu", vocab=SIM_VOCAB), held_steps))
            t = real.interleave(runs, max(chunk, 1))[0].step_cpu
            print(f"| {k} | {how} | {1e3 * t.mean():.3f} | {1e3 * np.median(t[one]):.3f} | {1e3 * t[one].mean():.3f} |",
                  flush=True)


if __name__ == "__main__":
    main()
