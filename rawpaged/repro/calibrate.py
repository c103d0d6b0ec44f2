"""Fitting the cost model's constants to step times the REAL engine measured.

    profile, report = fit_profile(base, spec, shapes, times)    # shapes: StepShape per step, times: s

The cost model (costmodel.py) is linear in the inverse of each achieved rate once it is known, step
by step, whether the GEMMs were bound by reading the weights or by their FLOPs. So the fit alternates:
classify every step under the current constants, solve a non-negative least squares problem on the
relative error (every step counts the same, short or long), repeat until the classification stops
changing. Steps whose residual is beyond 4 median absolute deviations (another process took the
core: the machine is shared) are dropped once, then the fit is redone.
Unknowns: step_overhead, seq_overhead, 1/(hbm_bw*mem_eff), 1/(flops*gemm_eff), 1/(hbm_bw*attn_eff),
1/(flops*attn_flop_eff). The base profile's peaks are kept as the normalizers of the fractions.
"""
from __future__ import annotations

from dataclasses import replace

import numpy as np

from rawpaged.errors import RawpagedError
from rawpaged.repro.costmodel import CostModel
from rawpaged.repro.specs import HardwareProfile, ModelSpec, SimSetup

COLUMNS = ("step_overhead", "seq_overhead", "weights", "gemm_flops", "decode_kv", "prefill_flops")


def features(spec: ModelSpec, shapes) -> tuple[np.ndarray, np.ndarray]:
    """Per step: [1, S, weight bytes, GEMM FLOPs, decode KV bytes, prefill attention FLOPs], and the
    fixed time the model does not fit (KV writes, swaps, copies) is left to CostModel."""
    rows = []
    for s in shapes:
        rows.append((1.0, s.num_seqs, spec.weight_bytes if s.num_tokens else 0.0,
                     2.0 * (spec.gemm_params * s.num_tokens + spec.vocab * spec.hidden * s.num_sampled),
                     s.decode_context * spec.kv_bytes_per_token, 4.0 * spec.hidden * spec.layers * s.prefill_pairs))
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


def _solve(x: np.ndarray, t: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """Coefficients for [1, S, weights-or-0, flops-or-0, kv, prefill], alternating the GEMM bound."""
    compute_bound = np.ones(len(t), dtype=bool)
    coef = np.zeros(6)
    for _ in range(20):
        a = x.copy()
        a[:, 2] *= ~compute_bound                 # memory-bound steps pay the weight read ...
        a[:, 3] *= compute_bound                  # ... compute-bound ones their GEMM FLOPs
        w = 1.0 / t[keep]                         # relative error
        coef = _nnls(a[keep] * w[:, None], t[keep] * w)
        new = x[:, 3] * coef[3] >= x[:, 2] * coef[2]
        if (new == compute_bound).all():
            break
        compute_bound = new
    return coef


def fit_profile(base: HardwareProfile, spec: ModelSpec, shapes, times) -> tuple[HardwareProfile, dict]:
    """A profile whose cost model fits `times` (seconds per step) for the steps `shapes`."""
    shapes = list(shapes)
    t = np.asarray(times, dtype=np.float64)
    if len(shapes) != len(t) or len(t) < 8:
        raise RawpagedError(f"calibration needs at least 8 measured steps, got {len(t)}")
    x, _ = features(spec, shapes)
    keep = (t > 0) & (x[:, 1] > 0)
    coef = _solve(x, t, keep)
    resid = np.abs(_predict(x, coef) - t) / t
    mad = np.median(np.abs(resid[keep] - np.median(resid[keep])))
    outliers = keep & (resid > np.median(resid[keep]) + 4 * max(mad, 1e-3))
    keep &= ~outliers
    coef = _solve(x, t, keep)
    inv = lambda c, peak: (1.0 / (c * peak)) if c > 0 else 1e9  # noqa: E731  (an unused term: ~free)
    profile = replace(base, step_overhead=float(coef[0]), seq_overhead=float(coef[1]),
                      mem_eff=inv(coef[2], base.hbm_bw), gemm_eff=inv(coef[3], base.flops),
                      attn_eff=inv(coef[4], base.hbm_bw), attn_flop_eff=inv(coef[5], base.flops))
    pred = np.array([CostModel(SimSetup(spec, profile, kv_memory=0)).step_time(s) for s in shapes])
    err = (pred - t) / t
    return profile, {"steps": int(len(t)), "outliers": int(outliers.sum()),
                     "fit_mean_step_error": float(pred[keep].mean() / t[keep].mean() - 1),
                     "fit_median_abs_step_error": float(np.median(np.abs(err[keep]))),
                     **dict(zip(COLUMNS, map(float, coef)))}


def _predict(x: np.ndarray, coef: np.ndarray) -> np.ndarray:
    gemm = np.maximum(x[:, 2] * coef[2], x[:, 3] * coef[3])
    return coef[0] * x[:, 0] + coef[1] * x[:, 1] + gemm + x[:, 4] * coef[4] + x[:, 5] * coef[5]
