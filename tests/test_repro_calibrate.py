"""Calibration: the few-row GEMM term (cost model, features, fit), and measuring side by side."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from rawpaged.engine.config import EngineConfig
from rawpaged.executor.simulated import SIM_VOCAB, build_sim_engine
from rawpaged.repro.calibrate import COLUMNS, features, fit_profile
from rawpaged.repro.costmodel import CostModel, StepShape
from rawpaged.repro.driver import run_workload, step_workload
from rawpaged.repro.specs import HARDWARE, HardwareProfile, ModelSpec, SimSetup
from rawpaged.repro.workloads import LengthSource, make_workload

# Round numbers, so every step time below is worked out by hand (the toy of test_repro.py, with the
# weights read for free: mem_eff huge, no weight-read floor under the GEMM term).
SPEC = ModelSpec("toy", "opt", hidden=8, layers=2, heads=2, kv_heads=2, ffn=32, vocab=16, max_len=64)
HW = HardwareProfile("toy", memory_bytes=10**9, hbm_bw=1000.0, flops=10000.0, link_bw=100.0, pcie_bw=10.0,
                     mem_eff=1e9, gemm_eff=1.0, attn_eff=0.5, attn_flop_eff=0.5, step_overhead=0.5,
                     seq_overhead=0.25, allreduce_latency=0.0, transfer_latency=0.01)
FEW = dataclasses.replace(HW, few_rows=4, few_row_time=0.1)


def test_few_row_term_by_hand():
    # gemm_params = 2 layers x 768 = 1536: a token 2 * 1536 / 10000 = 0.3072 s, a sampled row through
    # the LM head 2 * 16 * 8 / 10000 = 0.0256 s; each of the first 4 rows 0.1 s more
    three = StepShape(num_seqs=3, num_tokens=3, num_sampled=3)
    assert CostModel(SimSetup(SPEC, FEW, kv_memory=0)).step(three).gemm == pytest.approx(
        3 * 0.3072 + 3 * 0.0256 + 3 * 0.1)
    ten = StepShape(num_seqs=2, num_tokens=10, num_sampled=2)            # a prompt of 9 and a decode row
    assert CostModel(SimSetup(SPEC, FEW, kv_memory=0)).step(ten).gemm == pytest.approx(
        10 * 0.3072 + 2 * 0.0256 + 4 * 0.1)
    # without a few-row path (the default) the term is 0; over 2 ranks each pays half of it
    assert CostModel(SimSetup(SPEC, HW, kv_memory=0)).step(three).gemm == pytest.approx(3 * 0.3072 + 3 * 0.0256)
    two = CostModel(SimSetup(SPEC, FEW, num_gpus=2, kv_memory=0)).step(three).gemm
    assert two == pytest.approx((3 * 0.3072 + 3 * 0.0256 + 3 * 0.1) / 2)


def test_paper_profiles_carry_no_few_row_term():
    for hw in HARDWARE.values():
        assert hw.few_rows == 0 and hw.few_row_time == 0.0


def test_few_row_feature_column():
    shapes = [StepShape(num_seqs=3, num_tokens=3, num_sampled=3), StepShape(num_seqs=2, num_tokens=50, num_sampled=2),
              StepShape(num_seqs=8, num_tokens=8, num_sampled=8)]
    x, _ = features(SPEC, shapes, few_rows=8)
    assert x.shape == (3, len(COLUMNS)) and COLUMNS[6] == "per_few_row"
    np.testing.assert_array_equal(x[:, 6], [3, 8, 8])
    np.testing.assert_array_equal(x[:, 3], [2 * (1536 * 3 + 128 * 3), 2 * (1536 * 50 + 128 * 2),
                                            2 * (1536 * 8 + 128 * 8)])
    np.testing.assert_array_equal(features(SPEC, shapes)[0][:, 6], [0, 0, 0])


def _steps(rng, n=300):
    """Decode batches of 1-30 rows, some with a prompt of up to 200 tokens: rows on both sides of a
    few-row switch, and T apart from S (else GEMM FLOPs and sequences are one column)."""
    out = []
    for _ in range(n):
        s = int(rng.integers(1, 31))
        prompt = int(rng.integers(2, 200)) if rng.random() < 0.3 else 0
        dec = s - (prompt > 0)
        out.append(StepShape(num_seqs=s, num_tokens=dec + prompt, num_sampled=s,
                             decode_context=dec * int(rng.integers(1, 300)), prefill_pairs=prompt * (prompt + 1) // 2,
                             prefill_seqs=int(prompt > 0), prefill_tokens=prompt))
    return out


def test_fit_recovers_the_few_row_time():
    truth = dataclasses.replace(HW, step_overhead=0.3, seq_overhead=0.02, gemm_eff=0.5, attn_eff=0.25,
                                few_rows=8, few_row_time=0.07)
    cm = CostModel(SimSetup(SPEC, truth, kv_memory=0))
    shapes = _steps(np.random.default_rng(1))
    times = [cm.step_time(s) for s in shapes]
    fitted, info = fit_profile(dataclasses.replace(HW, few_rows=8), SPEC, shapes, times)
    assert info["fit_median_abs_step_error"] < 1e-9
    for name in ("step_overhead", "seq_overhead", "gemm_eff", "attn_eff", "attn_flop_eff", "few_row_time"):
        assert getattr(fitted, name) == pytest.approx(getattr(truth, name), rel=1e-6), name
    assert info["per_few_row"] == pytest.approx(0.07, rel=1e-6)
    # a base profile without the kernel's few-row path fits no such term, and cannot match these steps
    plain, info = fit_profile(HW, SPEC, shapes, times)
    assert plain.few_rows == 0 and plain.few_row_time == 0.0 and info["per_few_row"] == 0.0
    assert info["fit_median_abs_step_error"] > 1e-5
    # ... and it misprices small decode batches: the kink at few_rows is not in its features
    small = [StepShape(num_seqs=s, num_tokens=s, num_sampled=s, decode_context=50 * s) for s in range(1, 9)]
    for prof, bound in ((fitted, 1e-9), (plain, None)):
        err = max(abs(CostModel(SimSetup(SPEC, prof, kv_memory=0)).step_time(s) / cm.step_time(s) - 1) for s in small)
        assert err < bound if bound else err > 0.01


def test_cpu_profile_names_the_kernels_switch():
    from rawpaged.backend.cpu import gemm
    from rawpaged.repro.real import CPU_BASE, CPU_FEW_ROWS
    assert CPU_BASE.few_rows == CPU_FEW_ROWS == gemm._FEW_ROWS


# -- measuring side by side ---------------------------------------------------------------------------

def _counter(name, n, log):
    for _ in range(n):
        log.append(name)
        yield
    return f"{name} done"


def test_interleave_keeps_runs_at_the_same_fraction():
    from rawpaged.repro.real import interleave
    log = []
    out = interleave([(_counter("a", 12, log), 12), (_counter("b", 4, log), 4)])
    assert out == ["a done", "b done"]
    assert log.count("a") == 12 and log.count("b") == 4
    # after every step the two have done the same share of their steps, give or take one step
    for k in range(1, len(log) + 1):
        a, b = log[:k].count("a") / 12, log[:k].count("b") / 4
        assert abs(a - b) <= 1 / 4 + 1e-12
    # in chunks: each turn takes `chunk` steps in a row (or what is left), at the same shares between turns
    log = []
    assert interleave([(_counter("a", 12, log), 12), (_counter("b", 6, log), 6)], chunk=3) == ["a done", "b done"]
    assert "".join(log) == "aaabbbaaaaaabbbaaa"
    # a run longer than expected still runs to its end
    log = []
    assert interleave([(_counter("a", 6, log), 2), (_counter("b", 2, log), 2)]) == ["a done", "b done"]
    assert log.count("a") == 6


def _toy_setup():
    setup = SimSetup(SPEC, dataclasses.replace(HW, mem_eff=1.0), kv_memory=96 * SPEC.kv_bytes_per_token)
    cfg = EngineConfig(block_size=8, enable_chunked_prefill=False, enable_prefix_caching=False,
                       max_num_batched_tokens=64, swap_space=0)
    rng = np.random.default_rng(5)
    src = LengthSource("synthetic", rng.integers(4, 30, 300), rng.integers(4, 30, 300), paired=False,
                       description="uniform test lengths")
    return setup, cfg, make_workload(src, 30, 0.2, seed=2, max_len=64)


def test_step_workload_yields_once_per_step_and_returns_the_run():
    setup, cfg, wl = _toy_setup()
    whole = run_workload(build_sim_engine(setup, cfg), wl, "model", vocab=SIM_VOCAB, record_batches=True)
    steps = step_workload(build_sim_engine(setup, cfg), wl, "model", vocab=SIM_VOCAB, record_batches=True)
    yields = 0
    while True:
        try:
            next(steps)
            yields += 1
        except StopIteration as stop:
            r = stop.value
            break
    assert yields == len(r.steps["dt"]) == len(whole.steps["dt"]) > 20
    assert r.batches == whole.batches
    np.testing.assert_array_equal(r.finish, whole.finish)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    from rawpaged.hub import DEMO_MODEL
    from rawpaged.testing import make_random_llama
    return make_random_llama(tmp_path_factory.mktemp("tiny") / "m", DEMO_MODEL / "tokenizer.json", hidden_size=64,
                             num_layers=2, num_heads=2, num_kv_heads=2, vocab_size=512, max_position_embeddings=256)


def test_real_engines_sharing_weights_side_by_side_decide_as_alone(tiny_model):
    from rawpaged.repro.real import CPU_BASE, _share_weights, interleave, twin_engines
    rng = np.random.default_rng(3)
    src = LengthSource("synthetic", rng.integers(4, 40, 300), rng.integers(4, 40, 300), paired=False,
                       description="uniform test lengths")
    wls = [make_workload(src, 10, 30.0, seed=s, max_len=128) for s in (1, 2)]

    def engine(shared=None):
        real, _, cm = twin_engines(tiny_model, CPU_BASE, "rawpaged", kv_slots=192, max_len=128)
        if shared is not None:
            _share_weights(real, shared)
        return real, cm

    alone = []
    for wl in wls:
        real, cm = engine()
        alone.append(run_workload(real, wl, "model", cost_model=cm, vocab=SIM_VOCAB, record_batches=True))
    shared = []
    (a, cm_a), (b, cm_b) = engine(shared), engine(shared)
    assert a.executor.worker.model is b.executor.worker.model is b.executor.worker.runner.model
    fused_a, fused_b = a.executor.worker.runner.graphs, b.executor.worker.runner.graphs   # the CPU's fused decode step
    assert fused_b.stack is fused_a.stack and fused_b.model is fused_a.model
    assert fused_b.kv_cache is b.executor.worker.cache.device_cache is not fused_a.kv_cache
    side = interleave([(step_workload(a, wls[0], "model", cost_model=cm_a, vocab=SIM_VOCAB, record_batches=True),
                        len(alone[0].batches)),
                       (step_workload(b, wls[1], "model", cost_model=cm_b, vocab=SIM_VOCAB, record_batches=True),
                        len(alone[1].batches))])
    for got, want in zip(side, alone):
        assert got.batches == want.batches and len(want.batches) > 10
        np.testing.assert_array_equal(got.finish, want.finish)


def test_real_mode_on_the_cuda_backend_decides_as_the_simulator(tiny_model, monkeypatch):
    """Real mode "through the same command on a GPU": the CUDA backend (its .cu kernels on the host
    emulation of tests/cuda_emulator.py) in float16 makes the simulator's decisions step for step, and
    a real-mode point on it runs on the wall clock (a GPU step's CPU time is not its cost)."""
    from cuda_emulator import CXX, install, uninstall_caches
    if CXX is None:
        pytest.skip("no C++ compiler (g++) to build the host emulation")
    from rawpaged.repro.real import CPU_BASE, twin_engines
    from rawpaged.repro.runner import Point, clock_of, make_engine
    install(monkeypatch)
    try:
        rng = np.random.default_rng(4)
        src = LengthSource("synthetic", rng.integers(4, 40, 300), rng.integers(4, 40, 300), paired=False,
                           description="uniform test lengths")
        wl = make_workload(src, 8, 30.0, seed=3, max_len=128)
        real, sim, cm = twin_engines(tiny_model, CPU_BASE, "rawpaged", kv_slots=96, max_len=128, device="cuda")
        assert real.device == "cuda" and np.dtype(real.dtype) == np.float16
        got = run_workload(real, wl, "model", cost_model=cm, vocab=SIM_VOCAB, record_batches=True)
        want = run_workload(sim, wl, "model", cost_model=cm, vocab=SIM_VOCAB, record_batches=True)
        assert got.batches == want.batches and len(want.batches) > 10
        assert got.num_preemptions == want.num_preemptions
        np.testing.assert_array_equal(got.finish, want.finish)
        p = Point("fig13", "tiny", "rawpaged", "alpaca", 8, 30.0, mode="real", device="cuda")
        assert clock_of(p) == "wall"
        engine = make_engine(p, real_model_dir=tiny_model, real_kv_slots=96)
        r = run_workload(engine, wl, clock_of(p), vocab=SIM_VOCAB)
        assert np.isfinite(r.finish).all() and (r.steps["dt"] > 0).all() and r.throughput > 0
    finally:
        uninstall_caches()
