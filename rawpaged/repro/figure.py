"""What an experiment produces: rows for its CSV, the paper's numbers beside ours, notes, a plot.

    fig = Figure("fig13", "Average batched requests", source="simulator ...")
    fig.rows.append({...})                                   # -> fig13.csv
    fig.compare("ShareGPT 2 req/s, vLLM", paper=30.42, ours=28.1, why="...")
    fig.save(out_dir, plot=lambda ax_grid: ...)              # fig13.csv, fig13.png
"""
from __future__ import annotations

import csv
import math
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Comparison:
    label: str
    paper: float | str | None        # a number, a range as text ("1.7-2.7"), or None (no paper value)
    ours: float | None
    unit: str = ""
    why: str = ""                    # one sentence on the difference

    @property
    def ratio(self) -> float | None:
        if isinstance(self.paper, (int, float)) and self.ours is not None and self.paper:
            return self.ours / self.paper
        return None

    def within(self, tolerance: float) -> bool | None:
        """Whether ours is within `tolerance` (relative) of a numeric paper value."""
        r = self.ratio
        return None if r is None else abs(r - 1) <= tolerance


@dataclass
class Figure:
    key: str
    title: str
    source: str                      # "simulator ..." or "real engine ..."
    rows: list[dict] = field(default_factory=list)
    comparisons: list[Comparison] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    files: list[str] = field(default_factory=list)
    wall_s: float = 0.0

    def compare(self, label: str, paper, ours, unit: str = "", why: str = "") -> Comparison:
        c = Comparison(label, paper, ours, unit, why)
        self.comparisons.append(c)
        return c

    def write_csv(self, out_dir: Path, name: str | None = None, rows: list[dict] | None = None) -> Path:
        rows = self.rows if rows is None else rows
        path = Path(out_dir) / f"{name or self.key}.csv"
        keys: list[str] = []
        for r in rows:
            keys += [k for k in r if k not in keys]
        tmp = path.with_suffix(".csv.tmp")
        with tmp.open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=keys)
            w.writeheader()
            for r in rows:
                w.writerow({k: _fmt(r.get(k)) for k in keys})
        tmp.replace(path)                 # NOTE: never a half-written CSV
        self.files.append(path.name)
        return path


def _fmt(v):
    if isinstance(v, float):
        if math.isnan(v):
            return ""
        return f"{v:.6g}"
    return v
