"""Fitting the cost model's constants to step times the REAL engine measured.

    profile, info = fit_profile(base, spec, shapes, times)    # shapes: StepShape per step, times: s

Unknowns, each a time per unit of one feature of the step: step_overhead (per step), seq_overhead
(per sequence), 1/(flops*gemm_eff) (per GEMM FLOP: every computed token through every weight, the
sampled rows through the LM head), 1/(hbm_bw*attn_eff) (per decode KV byte), 1/(flops*attn_flop_eff)
(per prefill attention FLOP), few_row_time (per GEMM row up to the base profile's few_rows, the
rows a kernel with a matrix-vector path multiplies one weight row at a time: costmodel.py, "Few-row
GEMMs"; fitted only where few_rows > 0). The weight-read floor of the cost model's GEMM term (its max with the
FLOPs) is not fitted: for one model it is a constant per step, indistinguishable from step_overhead,
which absorbs it (the fitted profile reads weights for free). So the fit is linear: non-negative
least squares on the step times (with the intercept, the mean step time is matched). What it
does not estimate (KV writes, all-reduces, swaps, copies) is priced by the base profile and taken
off the measured times first. Every measured step counts: NOTE dropping the slow ones as outliers
(other jobs share the machine) biased the fit low by 7% on the held-out workload, whose steps
carry the same noise. The base profile's peaks stay as the normalizers of the fitted fractions.
"""
from __future__ import annotations

from dataclasses import replace

import numpy as np

from rawpaged.errors import RawpagedError
from rawpaged.repro.costmodel import CostModel
from rawpaged.repro.specs import HardwareProfile, ModelSpec, SimSetup

COLUMNS = ("step_overhead", "seq_overhead", "weights", "per_gemm_flop", "per_decode_kv_byte", "per_prefill_flop",
           "per_few_row")


def features(spec: ModelSpec, shapes, few_rows: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Per step: [1, S, weight bytes, GEMM FLOPs, decode KV bytes, prefill attention FLOPs, few rows]
    (few rows: min(T, few_rows), the GEMM rows a few-row kernel path multiplies)."""
    rows = []
    for s in shapes:
        rows.append((1.0, s.num_seqs, spec.weight_bytes if s.num_tokens else 0.0,
                     2.0 * (spec.gemm_params * s.num_tokens + spec.vocab * spec.hidden * s.num_sampled),
                     s.decode_context * spec.kv_bytes_per_token, 4.0 * spec.hidden * spec.layers * s.prefill_pairs,
                     min(s.num_tokens, few_rows)))
    return np.array(rows, dtype=np.float64), np.ones(len(rows))


def _nnls(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """min |a x - b| with x >= 0: least squares, dropping negative coefficients until none is left."""
    active = np.ones(a.shape[1], dtype=bool)
    x = np.zeros(a.shape[1])
    for _ in range(a.shape[1] + 1):
        sol, *_ = np.linalg.lstsq(a[:, active], b, rcond=None)
        if (sol >= 0).all():
            x[:] = 0
            x[active] = sol
            return x
        idx = np.flatnonzero(active)
        active[idx[np.argmin(sol)]] = False
    return x


def _solve(x: np.ndarray, t: np.ndarray, keep: np.ndarray, few_rows: int = 0) -> np.ndarray:
    """Coefficients of [1, S, -, flops, kv, prefill, few rows] (the weights column stays 0: see the
    docstring; the few-rows column too without a few-row path)."""
    cols = [0, 1, 3, 4, 5] + ([6] if few_rows > 0 else [])
    coef = np.zeros(len(COLUMNS))
    # NOTE: absolute least squares: with the intercept, the fitted steps' mean time is matched exactly.
    coef[cols] = _nnls(x[keep][:, cols], t[keep])
    return coef


def fit_profile(base: HardwareProfile, spec: ModelSpec, shapes, times) -> tuple[HardwareProfile, dict]:
    """A profile whose cost model fits `times` (seconds per step) for the steps `shapes`."""
    shapes = list(shapes)
    t = np.asarray(times, dtype=np.float64)
    if len(shapes) != len(t) or len(t) < 8:
        raise RawpagedError(f"calibration needs at least 8 measured steps, got {len(t)}")
    x, _ = features(spec, shapes, base.few_rows)
    # NOTE: what the fit does not estimate (KV writes at peak bandwidth, all-reduces, swaps, copies)
    # is taken off the measured times first, as the base profile prices it.
    base_cm = CostModel(SimSetup(spec, base, kv_memory=0))
    fixed = np.array([_fixed(base_cm.step(s)) for s in shapes])
    t_all = t
    t = np.maximum(t - fixed, 1e-9)
    keep = (t_all > 0) & (x[:, 1] > 0)
    coef = _solve(x, t, keep, base.few_rows)
    inv = lambda c, peak: (1.0 / (c * peak)) if c > 0 else 1e9  # noqa: E731  (an unused term: ~free)
    profile = replace(base, step_overhead=float(coef[0]), seq_overhead=float(coef[1]),
                      mem_eff=1e9, gemm_eff=inv(coef[3], base.flops),
                      attn_eff=inv(coef[4], base.hbm_bw), attn_flop_eff=inv(coef[5], base.flops),
                      few_row_time=float(coef[6]))
    pred = np.array([CostModel(SimSetup(spec, profile, kv_memory=0)).step_time(s) for s in shapes])
    t = t_all
    err = (pred - t) / t
    return profile, {"steps": int(len(t)), "unused": int((~keep).sum()),
                     "fit_mean_step_error": float(pred[keep].mean() / t[keep].mean() - 1),
                     "fit_median_abs_step_error": float(np.median(np.abs(err[keep]))),
                     **dict(zip(COLUMNS, map(float, coef)))}


def _fixed(cost) -> float:
    return cost.kv_write + cost.comm + cost.swap + cost.copy


def _predict(x: np.ndarray, coef: np.ndarray) -> np.ndarray:
    return x @ coef
