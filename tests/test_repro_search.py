"""The rate search, the concurrent task driver, the early stop, and the host-cost fit."""
from __future__ import annotations

import math

import numpy as np
import pytest

from rawpaged.engine.config import EngineConfig
from rawpaged.executor.simulated import SIM_VOCAB, build_sim_engine
from rawpaged.repro import search
from rawpaged.repro.driver import run_workload
from rawpaged.repro.hostcost import fit_host_cost
from rawpaged.repro.runner import Point
from rawpaged.repro.search import RateSearch, Spawn, drive, round_rate
from rawpaged.repro.specs import HardwareProfile, ModelSpec, SimSetup
from rawpaged.repro.workloads import LengthSource, make_workload


def _search(latency, **kw) -> RateSearch:
    s = RateSearch(threshold=1.0, **kw)
    while (r := s.next_rate()) is not None:
        s.record(r, {"overloaded": False, "normalized_latency": latency(r)})
    return s


def test_rate_search_brackets_the_crossing_within_tol():
    # latency 1/(7 - r): crosses 1.0 at r = 6
    s = _search(lambda r: 1 / (7 - r) if r < 7 else math.inf, guess=1.0, floor=0.1, ceiling=100.0, tol=1.05)
    assert s.outcome == "found"
    assert s.lo < 6 < s.hi and s.hi / s.lo <= 1.05
    assert abs(math.log(s.rate / 6)) <= math.log(1.05) / 2 + 1e-3
    assert len(s.seen) < 12                            # doubling to 8, then bisection


def test_rate_search_reports_floor_and_ceiling():
    low = _search(lambda r: 5.0, guess=1.0, floor=0.1, ceiling=10.0)
    assert low.outcome == "below the floor" and low.rate == 0.1 and low.lo is None
    high = _search(lambda r: 0.1, guess=1.0, floor=0.1, ceiling=10.0)
    assert high.outcome == "at or above the ceiling" and high.rate == 10.0


def test_rate_search_ends_at_bounds_that_rounding_moves():
    # 1.6 x 1.71774 = 2.748384 runs as 2.748: the search once asked for that point forever
    high = _search(lambda r: 0.1, guess=1.5, floor=0.0171774, ceiling=2.748384)
    assert high.outcome == "at or above the ceiling" and high.rates[-1] == 2.748
    low = _search(lambda r: 5.0, guess=1.5, floor=0.0171774, ceiling=2.748384)
    assert low.outcome == "below the floor" and low.rates[-1] == 0.01718
    assert len(set(high.rates)) == len(high.rates) and len(set(low.rates)) == len(low.rates)


def test_overloaded_point_counts_as_above():
    s = RateSearch(threshold=1.0, guess=2.0, floor=0.1, ceiling=10.0)
    s.record(2.0, {"overloaded": True, "normalized_latency": 0.5})
    assert s.hi == 2.0 and s.lo is None


def test_round_rate_merges_equal_rates():
    assert round_rate(1.000004) == round_rate(0.9999996) == 1.0
    assert round_rate(math.inf) == math.inf


class _Ctx:
    """A one-job context whose points are run by a fake run_point (counts every run)."""
    def __init__(self):
        self.cache, self.progress = {}, None

    def pool(self):
        return None

    def point_kwargs(self):
        return {}


def test_drive_runs_tasks_and_spawned_children_and_each_point_once(monkeypatch):
    runs = []

    def fake_run_point(p, **kw):
        runs.append(p)
        return {"rate": p.rate}

    monkeypatch.setattr(search, "run_point", fake_run_point)

    def pt(rate):
        return Point("t", "opt-13b", "rawpaged", "alpaca", 10, rate)

    def child(rate):
        [a] = yield [pt(rate)]
        [b] = yield [pt(rate * 2)]
        return a["rate"] + b["rate"]

    def parent():
        got = yield Spawn([child(1.0), child(3.0)])
        [c] = yield [pt(2.0)]                            # already run by the first child: cached
        return got + [c["rate"]]

    def other():
        return (yield [pt(6.0), pt(1.0)])

    res = drive(_Ctx(), [parent(), other()])
    assert res[0] == [3.0, 9.0, 2.0]
    assert [r["rate"] for r in res[1]] == [6.0, 1.0]
    assert sorted(p.rate for p in runs) == [1.0, 2.0, 3.0, 6.0]     # each point once


SPEC = ModelSpec("toy", "opt", hidden=8, layers=2, heads=2, kv_heads=2, ffn=32, vocab=16, max_len=64)
HW = HardwareProfile("toy", memory_bytes=10**9, hbm_bw=1000.0, flops=10000.0, link_bw=100.0, pcie_bw=10.0,
                     mem_eff=1.0, gemm_eff=1.0, attn_eff=0.5, attn_flop_eff=0.5, step_overhead=0.5,
                     seq_overhead=0.25, allreduce_latency=0.0, transfer_latency=0.01)


def _toy():
    """(a small simulated setup, its engine config, uniform 4-30 token lengths)."""
    setup = SimSetup(SPEC, HW, kv_memory=96 * SPEC.kv_bytes_per_token)
    cfg = EngineConfig(block_size=8, enable_chunked_prefill=False, enable_prefix_caching=False,
                       max_num_batched_tokens=64, swap_space=0)
    rng = np.random.default_rng(5)
    src = LengthSource("synthetic", rng.integers(4, 30, 300), rng.integers(4, 30, 300), paired=False,
                       description="uniform test lengths")
    return setup, cfg, src


def _toy_run(rate, stop_above=None):
    setup, cfg, src = _toy()
    eng = build_sim_engine(setup, cfg)
    wl = make_workload(src, 40, rate, seed=2, max_len=eng.max_model_len)
    return run_workload(eng, wl, "model", vocab=SIM_VOCAB, stop_above=stop_above)


@pytest.mark.parametrize("rate", [0.05, 0.5])
def test_stop_above_decides_as_the_full_run(rate):
    full = _toy_run(rate)
    assert not full.overloaded
    for threshold in (0.5 * full.normalized_latency, 0.99 * full.normalized_latency, 1.01 * full.normalized_latency):
        stopped = _toy_run(rate, stop_above=threshold)
        assert stopped.overloaded == (full.normalized_latency > threshold)
        if stopped.overloaded:
            # stopped early, at a bound already past the threshold and never past the full run's latency
            assert threshold < stopped.latency_lower_bound <= full.normalized_latency + 1e-12
            assert stopped.done.sum() < full.done.sum()
        else:
            assert stopped.normalized_latency == full.normalized_latency


def test_host_cost_fit_recovers_known_constants():
    rng = np.random.default_rng(0)
    seqs = rng.integers(1, 256, 500)
    host = (1.5e-4 + 3e-5 * seqs) * rng.uniform(0.98, 1.02, 500)
    step, per_seq, err = fit_host_cost(np.concatenate([[0], seqs]), np.concatenate([[9.0], host]))  # idle step ignored
    assert step == pytest.approx(1.5e-4, rel=0.1) and per_seq == pytest.approx(3e-5, rel=0.02)
    assert err < 0.02


def test_replayed_clock_repeats_the_schedule():
    from rawpaged.repro.real import Replay
    setup, cfg, src = _toy()
    wl = make_workload(src, 40, 0.1, seed=2, max_len=64)
    first = run_workload(build_sim_engine(setup, cfg), wl, "model", vocab=SIM_VOCAB, record_batches=True)
    # a clock that runs at another speed changes the decisions; the replayed one does not
    other = run_workload(build_sim_engine(setup, cfg), wl, "model", cost_model=_Scaled(first.steps["dt"], 3.0),
                         vocab=SIM_VOCAB, record_batches=True)
    again = run_workload(build_sim_engine(setup, cfg), wl, "model", cost_model=Replay(first.steps["dt"]),
                         vocab=SIM_VOCAB, record_batches=True)
    assert other.batches != first.batches
    assert again.batches == first.batches
    np.testing.assert_array_equal(again.finish, first.finish)


class _Scaled:
    def __init__(self, dts, k):
        self.dts, self.k = iter(list(dts) * 10), k

    def step_time(self, shape):
        return self.k * next(self.dts)


def test_calibration_sanity_flags_a_bad_fit():
    from rawpaged.repro.real import CPU_BASE, _round_spread, _sanity
    assert _round_spread(np.array([[1.0, 2.0], [1.5, 2.5], [0.5, 1.5]])) == pytest.approx((4 - 2) / 3)
    good = {"per_gemm_flop": 1e-12, "per_decode_kv_byte": 0.0, "per_prefill_flop": 0.0, "round_spread": 0.05,
            "step_spread": 0.4}
    assert _sanity(CPU_BASE, good, {"all at once": {"step": 1.02}, "Poisson arrivals": {"step": 0.9}}) == []
    bad = _sanity(CPU_BASE, dict(good, per_gemm_flop=0.0, round_spread=0.6),
                  {"all at once": {"step": 1.0}, "Poisson arrivals": {"step": 2.5}})
    assert len(bad) == 3 and "too loaded" in bad[1] and "outside" in bad[2] and "Poisson" in bad[2]
