"""Small PNGs of the experiments (matplotlib, the `bench` extra; the package itself never needs it).

    line_panels(path, [Panel(title, xlabel, ylabel, {label: (xs, ys)}), ...])
    bar_panels(path, [Bars(title, ylabel, categories, {"ours": [...], "paper": [...]}), ...])
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from rawpaged.errors import RawpagedError

COLORS = {"rawpaged": "tab:red", "orca-oracle": "tab:blue", "orca-pow2": "tab:green", "orca-max": "tab:orange",
          "static": "tab:gray", "ours": "tab:red", "paper": "tab:gray"}


@dataclass
class Panel:
    title: str
    xlabel: str
    ylabel: str
    series: dict                       # label -> (xs, ys)
    ylim: tuple | None = None
    logx: bool = False


@dataclass
class Bars:
    title: str
    ylabel: str
    categories: list
    groups: dict                       # label -> values (one per category; None: no bar)
    stacked: dict = field(default_factory=dict)   # stacked bars: part -> values (then groups unused)


def _pyplot():
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise RawpagedError("plots need matplotlib: pip install 'rawpaged[bench]'") from None
    return plt


def _grid(plt, n: int):
    cols = min(n, 3)
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 2.8 * rows), squeeze=False)
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    return fig, list(axes.flat)


def _save(plt, fig, path: Path) -> None:
    fig.tight_layout()
    tmp = Path(path).with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=72)
    plt.close(fig)
    tmp.replace(path)


def line_panels(path: Path, panels: list[Panel]) -> None:
    plt = _pyplot()
    fig, axes = _grid(plt, len(panels))
    for ax, p in zip(axes, panels):
        for label, (xs, ys) in p.series.items():
            if p.ylim:        # NOTE: an overloaded point (inf) is drawn at the top edge
                ys = [min(y, p.ylim[1]) if y == y else y for y in ys]
            ax.plot(xs, ys, marker="o", markersize=3, label=label, color=COLORS.get(label))
        ax.set_title(p.title, fontsize=9)
        ax.set_xlabel(p.xlabel, fontsize=8)
        ax.set_ylabel(p.ylabel, fontsize=8)
        ax.tick_params(labelsize=7)
        if p.logx:
            ax.set_xscale("log", base=2)
        if p.ylim:
            ax.set_ylim(*p.ylim)
        ax.legend(fontsize=6)
    _save(plt, fig, path)


def bar_panels(path: Path, panels: list[Bars]) -> None:
    plt = _pyplot()
    fig, axes = _grid(plt, len(panels))
    for ax, p in zip(axes, panels):
        xs = range(len(p.categories))
        if p.stacked:
            bottom = [0.0] * len(p.categories)
            for part, vals in p.stacked.items():
                ax.bar(xs, vals, bottom=bottom, label=part)
                bottom = [b + v for b, v in zip(bottom, vals)]
        else:
            width = 0.8 / max(1, len(p.groups))
            for k, (label, vals) in enumerate(p.groups.items()):
                pos = [x + (k - (len(p.groups) - 1) / 2) * width for x in xs]
                ax.bar(pos, [v if v is not None else 0 for v in vals], width, label=label, color=COLORS.get(label))
        ax.set_xticks(list(xs))
        ax.set_xticklabels(p.categories, fontsize=7, rotation=20)
        ax.set_title(p.title, fontsize=9)
        ax.set_ylabel(p.ylabel, fontsize=8)
        ax.tick_params(labelsize=7)
        ax.legend(fontsize=6)
    _save(plt, fig, path)
