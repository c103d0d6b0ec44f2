"""A benchmark run on two commits in interleaved rounds, its tables reported as medians and ratios.

    python bench/ab.py --base <commit> [--rounds 3] [--keys kind dtype batch ctx] -- bench/cpu_attention_bench.py --threads 1

The base commit's tree is exported (git archive) to a temporary directory and given THIS tree's
bench/ (the same measuring code on both sides); then each round runs the command in the base tree
and in this one, one after the other, each with its own Numba cache (warmed by a first unmeasured
run). Every markdown table row the command prints ("| label | value | ... |") is collected by
(table title, row label, column); the report prints, per cell, the median over rounds on each side
and base / head (for times: > 1 means this tree is faster), with the load average of each run.
NOTE: on a shared machine a single run swings by 2x; interleaving the two sides round by round
and taking medians is what makes the ratio mean something.
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
_NUMBER = re.compile(r"-?[\d,]*\.?\d+")


def export_tree(commit: str, into: Path) -> Path:
    """The tree of `commit` under `into`, with this tree's bench/ (same measuring code)."""
    into.mkdir(parents=True, exist_ok=True)
    archive = subprocess.run(["git", "archive", commit], cwd=REPO, check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    shutil.rmtree(into / "bench")
    shutil.copytree(REPO / "bench", into / "bench", ignore=shutil.ignore_patterns("__pycache__"))
    return into


def run(tree: Path, cmd: list[str]) -> tuple[str, float]:
    env = dict(os.environ, PYTHONPATH=str(tree), NUMBA_CACHE_DIR=str(tree / ".numba_cache"))
    out = subprocess.run([sys.executable] + cmd, cwd=tree, env=env, check=True, capture_output=True, text=True)
    return out.stdout, os.getloadavg()[0]


def tables(text: str, keys: list[str]) -> dict[tuple[str, str, str], float]:
    """(title, row label, column) -> the first number in the cell, for every markdown table; the
    row label is the cells of the `keys` columns (default: the first column)."""
    cells, title, header = {}, "", None
    for line in text.splitlines():
        s = line.strip()
        if not s.startswith("|"):
            if s:                              # a title: its numbers (load average...) vary per run
                title, header = re.sub(r"\d[\d.,]*", "#", s), None
            continue
        parts = [p.strip().strip("*") for p in s.strip("|").split("|")]
        if header is None:
            header = parts
            continue
        if set("".join(parts)) <= set("-: "):
            continue
        key_cols = [i for i, h in enumerate(header) if h in keys] or [0]
        label = " ".join(parts[i] for i in key_cols if i < len(parts))
        for i, (col, p) in enumerate(zip(header, parts)):
            m = _NUMBER.match(p.replace(",", ""))
            if m and i not in key_cols:
                cells[(title[:80], label, col)] = float(m.group())
    return cells


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--base", required=True, help="the commit to compare this tree with")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--keys", nargs="*", default=[], help="the columns naming a row (default: the first)")
    ap.add_argument("cmd", nargs=argparse.REMAINDER, help="-- script args (run with this Python)")
    args = ap.parse_args()
    cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    with tempfile.TemporaryDirectory(prefix="rawpaged-ab-") as tmp:
        base = export_tree(args.base, Path(tmp) / "base")
        sides = {"base": base, "head": REPO}
        for tree in sides.values():            # warm each side's Numba cache
            run(tree, cmd)
        got: dict[str, dict] = {k: defaultdict(list) for k in sides}
        loads = defaultdict(list)
        for r in range(args.rounds):
            for name, tree in sides.items():
                text, load = run(tree, cmd)
                loads[name].append(load)
                for key, v in tables(text, args.keys).items():
                    got[name][key].append(v)
                print(f"round {r + 1} {name}: load {load:.1f}", file=sys.stderr, flush=True)
    head_commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                                 text=True).stdout.strip()
    print(f"base {args.base} vs head {head_commit}; {args.rounds} interleaved rounds; command: {' '.join(cmd)}")
    print(f"load average per run: base {loads['base']}, head {loads['head']}\n")
    last_title = None
    for key in got["head"]:
        if key not in got["base"]:
            continue
        title, label, col = key
        if title != last_title:
            print(f"\n{title}\n\n| row | column | base | head | base / head |\n| --- | --- | ---: | ---: | ---: |")
            last_title = title
        b, h = float(np.median(got["base"][key])), float(np.median(got["head"][key]))
        print(f"| {label} | {col} | {b:.3f} | {h:.3f} | {b / h if h else float('nan'):.2f} |")


if __name__ == "__main__":
    main()
