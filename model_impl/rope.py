"""Rotary position tables: default RoPE and the scalings of transformers' modeling_rope_utils.py.

The backends' `rotary_embedding` reads one table, [max_pos, rot_dim] float32: cos(pos * f_i) in
the first rot_dim/2 columns, sin(pos * f_i) in the rest. Every scaling is a change of that table:

  default   f_i = theta^(-2i/d)                                  (d = rot_dim, i = 0 .. d/2-1)
  linear    f_i / factor                                         (position interpolation)
  dynamic   f_i with theta grown per position (NTK-aware), see _dynamic_inv_freq
  yarn      a ramp between f_i and f_i / factor over the dims, and cos/sin times attention_factor
  llama3    f_i kept (short wavelengths), / factor (long ones), smoothed in between

transformers multiplies cos and sin by `attention_scaling` (yarn's attention_factor, 1 elsewhere);
rotating q and k with the scaled table multiplies their dot product by its square, exactly as there.
Frequencies are computed in float64 (transformers: float32), then the table is rounded to float32.
"""
from __future__ import annotations

import math

import numpy as np

from rawpaged.config import RopeSpec


def cos_sin_cache(spec: RopeSpec, max_pos: int, max_position_embeddings: int) -> np.ndarray:
    """[max_pos, rot_dim] float32 table for `spec` (max_position_embeddings: config.json's)."""
    d = spec.rot_dim
    exponents = np.arange(0, d, 2, dtype=np.float64) / d                     # 2i/d, [d/2]
    inv_freq = theta_inv_freq(spec.theta, exponents)
    scaling = 1.0
    p = spec.params
    if spec.rope_type == "linear":
        inv_freq = inv_freq / p["factor"]
    elif spec.rope_type == "dynamic":
        inv_freq = _dynamic_inv_freq(spec.theta, exponents, d, p["factor"], max_pos, max_position_embeddings)
    elif spec.rope_type == "yarn":
        inv_freq, scaling = _yarn(spec, exponents, max_position_embeddings)
    elif spec.rope_type == "llama3":
        inv_freq = _llama3(inv_freq, p)
    positions = np.arange(max_pos, dtype=np.float64)
    angles = positions[:, None] * inv_freq                     # [P, d/2]; dynamic: a row per position
    return (np.concatenate([np.cos(angles), np.sin(angles)], axis=1) * scaling).astype(np.float32)


def theta_inv_freq(theta: float, exponents: np.ndarray) -> np.ndarray:
    """f_i = 1 / theta^(2i/d)."""
    return 1.0 / theta ** exponents


def _dynamic_inv_freq(theta, exponents, d, factor, max_pos, orig_max) -> np.ndarray:
    """[max_pos, d/2]: the frequencies position p is rotated with.

    transformers (`_compute_dynamic_ntk_parameters` under `dynamic_rope_update`) recomputes the
    frequencies from the longest position of each forward call, seq_len = max(position) + 1:
        theta' = theta * (factor * L / orig_max - (factor - 1)) ^ (d / (d - 2)),  L = max(seq_len, orig_max)
    and rotates the whole call's q and k with them. Token by token with its KV cache (generate()),
    position p is rotated with L = max(p + 1, orig_max), and its key keeps that rotation in the cache.
    NOTE: that is what a paged cache can reproduce (a key is rotated once, when it is written), so
    row p of this table uses L = max(p + 1, orig_max). A whole prompt past orig_max run in one
    transformers call is rotated with the prompt's length instead; no KV cache gives that.
    """
    lengths = np.maximum(np.arange(1, max_pos + 1, dtype=np.float64), orig_max)          # [P]
    bases = theta * (factor * lengths / orig_max - (factor - 1)) ** (d / (d - 2))          # [P]
    return 1.0 / bases[:, None] ** exponents[None, :]


def _yarn(spec: RopeSpec, exponents, max_position_embeddings) -> tuple[np.ndarray, float]:
    """transformers' `_compute_yarn_parameters`: (inv_freq [d/2], attention_factor)."""
    p, d, base = spec.params, spec.rot_dim, spec.theta
    orig = p["original_max_position_embeddings"]
    factor = p.get("factor") or max_position_embeddings / orig
    attention_factor = p.get("attention_factor")
    mscale, mscale_all_dim = p.get("mscale"), p.get("mscale_all_dim")

    def get_mscale(scale, m=1.0):
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    if attention_factor is None:
        if mscale and mscale_all_dim:
            attention_factor = get_mscale(factor, mscale) / get_mscale(factor, mscale_all_dim)
        else:
            attention_factor = get_mscale(factor)
    beta_fast, beta_slow = p.get("beta_fast") or 32, p.get("beta_slow") or 1

    def correction_dim(rotations):     # the dim whose wavelength makes `rotations` turns in orig positions
        return (d * math.log(orig / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if p.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, d - 1)
    if low == high:
        high += 0.001                  # transformers: "prevent singularity"
    ramp = np.clip((np.arange(d // 2, dtype=np.float64) - low) / (high - low), 0, 1)
    pos_freqs = base ** exponents
    extrapolation = 1.0 - ramp                                    # 1: keep f_i, 0: f_i / factor
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation
    return inv_freq, float(attention_factor)


def _llama3(inv_freq: np.ndarray, p: dict) -> np.ndarray:
    """transformers' `_compute_llama3_parameters` (LLaMA 3.1 / 3.2)."""
    factor, low_ff, high_ff = p["factor"], p["low_freq_factor"], p["high_freq_factor"]
    old_len = p["original_max_position_embeddings"]
    low_wavelen, high_wavelen = old_len / low_ff, old_len / high_ff
    wavelen = 2 * math.pi / inv_freq
    scaled = np.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)      # long wavelengths: / factor
    smooth = (old_len / wavelen - low_ff) / (high_ff - low_ff)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return np.where(medium, smoothed, scaled)
