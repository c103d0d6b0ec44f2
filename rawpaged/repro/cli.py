"""`rawpaged repro EXPERIMENT... --out DIR`: re-run the paper's experiments, write CSVs, PNGs, REPORT.md.

    rawpaged repro all --out bench/repro            # everything (under 15 minutes on 2 CPU cores)
    rawpaged repro fig13 fig2 --out /tmp/r          # some figures; REPORT.md covers every figure in DIR
    rawpaged repro calibrate --out /tmp/r           # fit the cost model to this machine's real engine
    rawpaged repro hostfit --out /tmp/r             # the paper's vLLM 0.1 host time, fitted to Fig. 13b
    rawpaged repro real --device cuda --out /tmp/r  # the small-scale real-engine runs on a GPU
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

from rawpaged.errors import RawpagedError

SIM_EXPERIMENTS = ("hostfit", "fig2", "fig12", "fig13", "fig14", "fig15", "fig16", "fig17", "fig18", "fig19")
REAL_EXPERIMENTS = ("calibrate", "validate", "real")
EXPERIMENTS = SIM_EXPERIMENTS + REAL_EXPERIMENTS
# `report` runs nothing: it rewrites REPORT.md from the figures already in --out.
MODELS_OF = {"fig16": ("llama-13b",), "fig12": ("opt-13b", "opt-66b", "opt-175b")}
WORKLOADS_OF = {"hostfit": ("alpaca",), "fig2": ("sharegpt",), "fig13": ("sharegpt", "alpaca"), "fig12": ("sharegpt", "alpaca"),
                "fig14": ("alpaca",), "fig15": ("alpaca",), "fig16": ("translate-one-shot",), "fig17": ("chatbot",),
                "fig18": ("sharegpt", "alpaca"), "fig19": ("sharegpt",), "calibrate": ("sharegpt", "alpaca"),
                "validate": ("sharegpt", "alpaca"), "real": ("sharegpt", "alpaca")}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("experiments", nargs="+", metavar="EXPERIMENT",
                   help=f"all, report (rewrite REPORT.md only), or any of: {', '.join(EXPERIMENTS)}")
    p.add_argument("--out", required=True, help="folder for the CSVs, PNGs and REPORT.md")
    p.add_argument("--data", default=None, help="the shared data folder (workloads, tokenizers); default "
                                                "$RAWPAGED_TEST_DATA, else ../shared/data beside the repository")
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="worker processes (default: every CPU)")
    p.add_argument("--quick", action="store_true", help="fewer requests and rates (a smoke run)")
    p.add_argument("--hardware", default=None, help="simulate on this hardware profile (a100-40gb, a100-80gb, "
                                                    "h100-80gb, h200-141gb, or a JSON file) instead of the paper's")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="real-mode backend")
    p.add_argument("--host", default="vllm01", choices=("vllm01", "rawpaged"),
                   help="host time per batched sequence of the simulated GPUs: vllm01 = each profile's own (the "
                        "A100s: vLLM 0.1's, fitted by hostfit), rawpaged = rawpaged's, measured (specs.HOST_SEQ_S)")


def _data_dir(arg: str | None) -> Path:
    if arg:
        return Path(arg)
    env = os.environ.get("RAWPAGED_TEST_DATA")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[2].parent / "shared" / "data"


def _selected(names: list[str]) -> list[str]:
    out = []
    for name in names:
        if name == "all":
            out += [e for e in EXPERIMENTS if e not in out]
        elif name in EXPERIMENTS or name == "report":
            if name not in out:
                out.append(name)
        else:
            raise RawpagedError(f"unknown experiment {name!r}: choose all, report or any of {', '.join(EXPERIMENTS)}")
    return out


def _check_inputs(selected: list[str], data_dir: Path, hardware: str | None, jobs: int) -> None:
    """Every one-line refusal before any work starts: data files, hardware profile, model fit."""
    from rawpaged.repro.runner import sim_setup
    from rawpaged.repro.workloads import FILES
    if jobs < 1:
        raise RawpagedError(f"--jobs must be at least 1, got {jobs}")
    if not data_dir.is_dir():
        raise RawpagedError(f"data folder not found: {data_dir} (give --data or set RAWPAGED_TEST_DATA)")
    needed = {"opt_tokenizer"}
    for e in selected:
        for w in WORKLOADS_OF.get(e, ()):
            needed |= {"sharegpt": {"sharegpt_prompts", "sharegpt_lengths"}, "alpaca": {"alpaca"},
                       "chatbot": {"sharegpt_lengths"}}.get(w, set())
    for key in sorted(needed):
        if not (data_dir / FILES[key]).is_file():
            raise RawpagedError(f"workload file not found: {data_dir / FILES[key]}")
    models = {m for e in selected if e in SIM_EXPERIMENTS for m in MODELS_OF.get(e, ("opt-13b",))}
    for m in sorted(models):
        sim_setup(m, hardware)          # unknown profile, or a model that does not fit: one line


class Progress:
    """One status line on stderr (rewritten in place on a terminal)."""

    def __init__(self, stream=sys.stderr):
        self.stream = stream
        self.tty = stream.isatty()
        self.start = time.perf_counter()
        self.last = ""
        self.last_line = 0.0

    def __call__(self, what: str, done: int, total: int, point=None) -> None:
        el = time.perf_counter() - self.start
        line = f"[{int(el // 60)}:{int(el % 60):02d}] {what}: {done}/{total}" + (f"  {point.label()}" if point else "")
        if self.tty:
            self.stream.write("\r" + line[:120].ljust(120))
        elif done == total or what != self.last or el - self.last_line >= 15:
            self.stream.write(line + "\n")
            self.last_line = el
        self.last = what
        self.stream.flush()

    def say(self, text: str) -> None:
        if self.tty:
            self.stream.write("\r" + " " * 120 + "\r")
        self.stream.write(text + "\n")
        self.stream.flush()


def run(a: argparse.Namespace) -> int:
    from rawpaged.repro import experiments as ex
    from rawpaged.repro import real
    from rawpaged.repro.report import commit, machine, save_figure, write_report

    selected = _selected(a.experiments)
    data_dir = _data_dir(a.data)
    _check_inputs(selected, data_dir, a.hardware, a.jobs)
    out = Path(a.out)
    if out.exists() and not out.is_dir():
        raise RawpagedError(f"--out {out} exists and is not a folder")
    out.mkdir(parents=True, exist_ok=True)
    progress = Progress()
    ctx = ex.Context(out, data_dir, jobs=a.jobs, quick=a.quick, hardware=a.hardware, device=a.device, host=a.host,
                     progress=progress)
    info = {"command": "rawpaged repro " + " ".join(sys.argv[2:] if sys.argv[1:2] == ["repro"] else a.experiments),
            "commit": commit(), "machine": machine(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    info["workloads"] = _workload_lines(ctx)
    started = time.perf_counter()
    profile = None

    def save(figs) -> None:
        for f in figs:
            save_figure(f, out)
            progress.say(f"wrote {f.key}: {', '.join(f.files)}")
        info["wall_s"] = time.perf_counter() - started
        write_report(out, info)

    # NOTE: every simulated figure at once, over one pool (search.drive), then the real-engine runs,
    # which measure CPU time and so should not share the cores with the simulator.
    save(ex.run_figures(ctx, selected))
    for name in REAL_EXPERIMENTS:
        if name not in selected:
            continue
        t0 = time.perf_counter()
        if name == "calibrate":
            fig, profile = real.calibrate(ctx, a.device)
            figs = [fig]
        elif name == "validate":
            figs = [real.validate(ctx, profile)]
        else:
            figs = real.real_fig13(ctx) + [real.real_fig15(ctx)]
        for f in figs:
            f.wall_s = time.perf_counter() - t0
        save(figs)
    info["wall_s"] = time.perf_counter() - started
    run_file = out / "run.json"
    if set(selected) != set(EXPERIMENTS) and run_file.is_file():
        # NOTE: a partial run keeps the header of the run that made the other figures, and is listed under it.
        first = json.loads(run_file.read_text())
        if selected != ["report"]:
            first.setdefault("later_runs", []).append(
                {k: info[k] for k in ("command", "commit", "date", "wall_s")} | {"experiments": selected})
        info = first
    run_file.write_text(json.dumps(info, indent=1) + "\n")
    path = write_report(out, info)
    progress.say(f"wrote {path} ({info['wall_s']:.0f} s)")
    return 0


def _workload_lines(ctx) -> list[str]:
    from rawpaged.repro.runner import lengths_for
    from rawpaged.repro.workloads import make_workload
    lines = []
    for w in ("sharegpt", "alpaca", "chatbot", "translate-five-shot"):
        try:
            src = lengths_for(w, ctx.data_dir)
        except RawpagedError:
            continue
        wl = make_workload(src, 2000, math.inf, seed=0)
        lines.append(f"{w}: {src.description}. Drawn (2000 requests, seed 0): mean input {wl.mean_input:.1f}, "
                     f"mean output {wl.mean_output:.1f} tokens.")
    return lines
