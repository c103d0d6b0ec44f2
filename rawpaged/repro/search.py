"""Running the experiments' points: every figure at once over one process pool, and the rate search.

    results = drive(ctx, [fig13_task(ctx), fig12_task(ctx), ...])     # each task a generator

A task is a generator: it yields a list of Points, is sent back their rows (dicts, in order), and
returns its result; or it yields Spawn([tasks]) and is sent back their results once they all
returned (a figure's panels run side by side so). drive() runs every task at once: a task's points go to the pool as soon as it
yields them, so the workers stay busy while one task waits for its slowest point (a rate search
needs one round's answer before its next). A point already run (ctx.cache) is not run again, and
a point two tasks ask for at once runs once. With one job everything runs in this process, in order.

RateSearch finds where a system's normalized latency crosses a threshold (the paper's "sustained
rate"): bisection in log(rate), from a guess, doubling or halving until the crossing is bracketed,
then halving the bracket until hi / lo <= `tol`; the answer is the bracket's geometric middle
(within sqrt(tol) of the crossing). A point above the threshold stops as soon as that is certain
(driver.py's `stop_above`), so the search pays little for the rates past a system's knee.
"""
from __future__ import annotations

import itertools
import math
from concurrent.futures import FIRST_COMPLETED, wait
from dataclasses import dataclass, field
from typing import Generator

from rawpaged.repro.runner import Point, run_point

Task = Generator[list, list, object]


@dataclass
class Spawn:
    """Yielded by a task instead of points: run these tasks side by side, send back their results."""
    tasks: list


def drive(ctx, tasks: list[Task], what: str = "points") -> list:
    """Run the tasks to completion (see the module docstring); their return values, in order."""
    results: dict[int, object] = {}
    gens: dict[int, Task] = {}
    parent: dict[int, tuple[int, int]] = {}       # child task -> (parent task, index among siblings)
    children: dict[int, list] = {}                # parent task -> its children's results so far
    left: dict[int, int] = {}                     # parent task -> children still running
    active: dict[int, list[Point]] = {}           # task -> the points it waits for
    inflight: dict = {}                           # future -> point
    pending: set = set()
    counts = {"done": 0, "asked": 0}
    pool = ctx.pool()

    def tick(p: Point) -> None:
        counts["done"] += 1
        if ctx.progress:
            ctx.progress(what, counts["done"], counts["asked"], p)

    def ensure(p: Point) -> None:
        if p in ctx.cache or p in pending:
            return
        counts["asked"] += 1
        if pool is None:
            ctx.cache[p] = run_point(p, **ctx.point_kwargs())
            tick(p)
        else:
            pending.add(p)
            inflight[pool.submit(run_point, p, **ctx.point_kwargs())] = p

    ids = itertools.count()

    def start(task: Task, link: tuple[int, int] | None) -> int:
        tid = next(ids)
        gens[tid] = task
        if link is not None:
            parent[tid] = link
        advance(tid, None)
        return tid

    def finish(tid: int, value) -> None:
        if tid not in parent:
            results[tid] = value
            return
        up, k = parent.pop(tid)
        children[up][k] = value
        left[up] -= 1
        if left[up] == 0:
            del left[up]
            advance(up, children.pop(up))

    def advance(tid: int, value) -> None:
        try:
            out = gens[tid].send(value)
        except StopIteration as stop:
            del gens[tid]
            finish(tid, stop.value)
            return
        if isinstance(out, Spawn):
            if not out.tasks:
                advance(tid, [])
                return
            children[tid], left[tid] = [None] * len(out.tasks), len(out.tasks)
            for k, child in enumerate(out.tasks):
                start(child, (tid, k))
            return
        active[tid] = list(out)
        for p in out:
            ensure(p)

    top = [start(task, None) for task in tasks]
    while active:
        ready = [t for t, pts in active.items() if all(p in ctx.cache for p in pts)]
        for t in ready:
            pts = active.pop(t)
            advance(t, [ctx.cache[p] for p in pts])
        if ready or not active:
            continue
        if not inflight:      # cannot happen: every point a task waits for is cached or running
            raise RuntimeError(f"search.drive: {len(active)} tasks wait for points that nothing runs")
        done, _ = wait(list(inflight), return_when=FIRST_COMPLETED)
        for fut in done:
            p = inflight.pop(fut)
            pending.discard(p)
            ctx.cache[p] = fut.result()
            tick(p)
    return [results[t] for t in top]


def round_rate(rate: float) -> float:
    """Rates to 4 significant digits: the same rate from two searches is one cached point."""
    if rate <= 0 or math.isinf(rate):
        return rate
    return float(f"{rate:.4g}")


@dataclass
class RateSearch:
    """Bisection for the rate where a system's normalized latency crosses `threshold` (module doc)."""
    threshold: float
    guess: float
    floor: float                      # not below: the answer is then "< floor"
    ceiling: float                    # not above: the answer is then ">= ceiling"
    tol: float = 1.1
    lo: float | None = None           # highest rate seen below the threshold
    hi: float | None = None           # lowest rate seen above it
    seen: list = field(default_factory=list)

    def __post_init__(self):
        # NOTE: the bounds as the rates run (round_rate): an unrounded ceiling of 2.7484 was never
        # reached by its own rounded point 2.748, and the search asked for that point forever.
        self.floor, self.ceiling = round_rate(self.floor), round_rate(self.ceiling)

    def above(self, row: dict) -> bool:
        return bool(row["overloaded"]) or row["normalized_latency"] > self.threshold

    @property
    def rates(self) -> list[float]:
        return [r for r, _ in self.seen]

    def record(self, rate: float, row: dict) -> None:
        self.seen.append((rate, row))
        if self.above(row):
            self.hi = rate if self.hi is None else min(self.hi, rate)
        else:
            self.lo = rate if self.lo is None else max(self.lo, rate)

    def next_rate(self) -> float | None:
        """The next rate to run, or None when the search is over."""
        lo, hi = self.lo, self.hi
        if lo is None and hi is None:
            nxt = round_rate(min(max(self.guess, self.floor), self.ceiling))
        elif hi is None:
            nxt = None if lo >= self.ceiling else round_rate(min(2 * lo, self.ceiling))
        elif lo is None:
            nxt = None if hi <= self.floor else round_rate(max(hi / 2, self.floor))
        elif hi / lo <= self.tol:
            nxt = None
        else:
            nxt = round_rate(math.sqrt(lo * hi))
        # a rate already run decides nothing new (rounding can bring one back): the search is over
        return None if nxt is None or any(r == nxt for r in self.rates) else nxt

    @property
    def outcome(self) -> str:
        if self.hi is None:
            return "at or above the ceiling"
        if self.lo is None:
            return "below the floor"
        return "found"

    @property
    def rate(self) -> float:
        """The sustained rate: the bracket's geometric middle; the floor or ceiling when not bracketed
        (0 below a floor of 0)."""
        if self.hi is None:
            return self.lo
        if self.lo is None:
            return self.floor
        return math.sqrt(self.lo * self.hi)
