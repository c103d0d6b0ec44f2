"""The fit of vLLM 0.1's host time per sequence (repro/hostfit.py): its root search, the per-point
override it runs through, and the profiles that carry the committed value."""
from __future__ import annotations

import math

from rawpaged.repro.hostfit import RootSearch
from rawpaged.repro.runner import Point, make_engine, run_point
from rawpaged.repro.specs import HARDWARE, HOST_SEQ_S, VLLM01_SEQ_S


def _solve(f, target, start, **kw) -> RootSearch:
    s = RootSearch(target, start, **kw)
    while (x := s.next_x()) is not None:
        s.record(x, f(x))
    return s


def test_root_search_finds_the_crossing_of_an_increasing_function():
    f = lambda x: 100 * math.sqrt(x / 1e-4)        # noqa: E731  crosses 132.44 at x = 1.754e-4
    s = _solve(f, 132.44, start=3e-5)
    assert abs(f(s.best) / 132.44 - 1) <= 0.01
    assert abs(s.best / 1.754e-4 - 1) < 0.03
    assert len(s.seen) < 10                        # doubling 3e-5 -> 2.4e-4, then a few secant steps


def test_root_search_from_above_halves_then_converges():
    s = _solve(lambda x: 50 + 1e5 * x, 132.44, start=1e-2)     # crosses at 8.244e-4
    assert s.lo is not None and s.hi is not None
    assert abs((50 + 1e5 * s.best) / 132.44 - 1) <= 0.01


def test_root_search_on_a_step_function_stops_on_a_narrow_bracket():
    # a simulation's batch moves in steps: no x gives the target within 1%; the bracket still closes
    f = lambda x: 100.0 if x < 2e-4 else 200.0     # noqa: E731
    s = _solve(f, 150.0, start=3e-5)
    assert s.lo[0] < 2e-4 <= s.hi[0] and s.hi[0] / s.lo[0] - 1 <= s.xtol + 0.01
    assert len(s.seen) <= s.max_points


def test_root_search_start_within_tolerance_is_one_run():
    s = _solve(lambda x: 131.9, 132.44, start=2.67e-4)
    assert list(s.seen) == [2.67e-4] and s.best == 2.67e-4


def test_point_seq_overhead_replaces_only_the_profiles_per_sequence_time():
    base = make_engine(Point("hostfit", "opt-13b", "rawpaged", "alpaca", 10, 30.0))
    over = make_engine(Point("hostfit", "opt-13b", "rawpaged", "alpaca", 10, 30.0, seq_overhead=1e-3))
    hb, ho = base.executor.setup.hardware, over.executor.setup.hardware
    assert hb.seq_overhead == HARDWARE["a100-40gb"].seq_overhead and ho.seq_overhead == 1e-3
    assert ho.step_overhead == hb.step_overhead and ho.hbm_bw == hb.hbm_bw


def test_the_paper_profiles_carry_vllm01s_time_and_rawpageds_profiles_its_own():
    assert HARDWARE["a100-40gb"].seq_overhead == HARDWARE["a100-80gb"].seq_overhead == VLLM01_SEQ_S
    assert HARDWARE["h100-80gb"].seq_overhead == HARDWARE["h200-141gb"].seq_overhead == HOST_SEQ_S


def test_a_longer_host_time_per_sequence_holds_more_requests(data_dir):
    """Little's law through the real scheduler: a slower step keeps each request longer, so the batch
    at a fixed rate grows (what makes the fit well-posed)."""
    rows = [run_point(Point("hostfit", "opt-13b", "rawpaged", "alpaca", 150, 30.0, seq_overhead=x), data_dir)
            for x in (HOST_SEQ_S, 4 * VLLM01_SEQ_S)]
    assert rows[1]["batched_requests"] > 1.3 * rows[0]["batched_requests"]
    assert rows[1]["mean_step_time"] > rows[0]["mean_step_time"]


def test_host_rawpaged_gives_the_paper_profiles_rawpageds_measured_time():
    p = Point("fig13", "opt-13b", "rawpaged", "alpaca", 10, 30.0)
    assert make_engine(p, host="rawpaged").executor.setup.hardware.seq_overhead == HOST_SEQ_S
    assert make_engine(p, host="vllm01").executor.setup.hardware.seq_overhead == VLLM01_SEQ_S
    pinned = Point("hostfit", "opt-13b", "rawpaged", "alpaca", 10, 30.0, seq_overhead=7e-4)
    assert make_engine(pinned, host="rawpaged").executor.setup.hardware.seq_overhead == 7e-4
