"""The host emulation's models of mma.sync, ldmatrix and cp.async against the PTX ISA's layouts
(tests/intrinsic_probes.py; the same probes run on a device in tests/gpu/test_ops_gpu.py), and its
two cp.async modes catching the pipeline bugs they are there for: a read before the wait, a read of
another lane's copy without the barrier that publishes it, a stage refilled while a warp reads it."""
from __future__ import annotations

import numpy as np
import pytest

import cuda_emulator
import intrinsic_probes as probes
from cuda_emulator import install, uninstall_caches


@pytest.fixture(params=["deferred", "eager"])
def emu(request, monkeypatch):
    monkeypatch.setattr(cuda_emulator, "CP_ASYNC_MODE", request.param)
    install(monkeypatch)
    import cupy
    yield cupy, probes.probe_module(cupy), request.param
    uninstall_caches()


def test_ldmatrix_plain_and_trans_follow_the_ptx_layout(emu):
    cp, mod, _ = emu
    tile = probes.ldmatrix_source(np.random.default_rng(1))
    np.testing.assert_array_equal(probes.run_ldmatrix(cp, mod, tile), probes.ldmatrix_expected(tile))


@pytest.mark.parametrize("tag", ["f16", "bf16"])
def test_mma_m16n8k16_is_acc_plus_a_times_b(emu, tag):
    cp, mod, _ = emu
    a, b, acc = probes.mma_operands(np.random.default_rng(2))
    np.testing.assert_array_equal(probes.run_mma(cp, mod, tag, a, b, acc), acc + a @ b)


def test_cp_async_lands_after_wait_and_barrier(emu):
    cp, mod, _ = emu
    src = probes.cp_async_source(np.random.default_rng(3))
    np.testing.assert_array_equal(probes.run_cp_async(cp, mod, src, 0), probes.cp_async_expected(src))


def test_deferred_cp_async_shows_a_missing_wait_or_barrier(emu):
    """Deferred mode: a read before the wait sees the old contents (the sentinel 7s), and so does a
    read of another lane's copy with no barrier between its wait and the read."""
    cp, mod, mode = emu
    if mode != "deferred":
        pytest.skip("the deferred mode's check")
    src = probes.cp_async_source(np.random.default_rng(4))
    assert (probes.run_cp_async(cp, mod, src, 1) == 7).all()
    assert (probes.run_cp_async(cp, mod, src, 2) == 7).all()


def test_eager_cp_async_shows_a_stage_refilled_too_early(emu):
    """Eager mode (copies land at issue, the lowest warp runs ahead): a refill with no barrier after
    the other warp's read overwrites what it reads; with the barrier it reads the first tile."""
    cp, mod, mode = emu
    src = probes.cp_async_source(np.random.default_rng(5))
    np.testing.assert_array_equal(probes.run_cp_refill(cp, mod, src, 1), src[:32, 0])
    racy = probes.run_cp_refill(cp, mod, src, 0)
    if mode == "eager":
        assert np.isin(racy, src[32:, 0]).any() and (racy != src[:32, 0]).any()
    else:
        np.testing.assert_array_equal(racy, src[:32, 0])     # deferred: the refill lands at the wait
