"""The fused per-layer ops (kernels_cuda/fused_ops.cu; issue 13, "fewer kernels per layer"):

  rotary_and_cache      rotary embedding of q (in place) and k, k and v written to the paged cache:
                        what rotary_embedding + reshape_and_cache do, in one launch, k left as it was
  fused_add_layer_norm  residual += x; x = layer_norm(residual), both in place (OPT, GPT-2, NeoX)

Both take q / k / v as strided views (of the fused qkv projection): no copies. Names, argument
order and layouts are the CPU twins' (rawpaged/backend/cpu/); tests/test_cuda_emulation.py
compares the two through the host emulator.
"""
from __future__ import annotations

import numpy as np

from rawpaged.backend.cuda import kernels, launch
from rawpaged.backend.cuda.dispatch import check_cache_args, check_norm_args, check_rotary_args, dtype_tag, norm_threads
from rawpaged.backend.cuda.kernels import rows
from rawpaged.backend.cuda.launch import on_device, require_cupy


def rotary_and_cache(positions, q, k, v, kv_cache, layer, slot_mapping, cos_sin_cache, is_neox):
    """Rotate q [T, Hq, D] in place; store rotate(k) and v [T, Hkv, D] in `layer`'s slots (slot < 0: skip)."""
    cp = require_cupy()
    positions = on_device(positions, np.int64)
    slot_mapping = on_device(slot_mapping, np.int64)
    q_stride, _ = check_rotary_args(positions, q, k, cos_sin_cache)
    k_stride, v_stride = check_cache_args(k, v, kv_cache, layer, slot_mapping)
    if q.dtype != kv_cache.dtype:
        raise ValueError(f"rotary_and_cache: q is {q.dtype} but kv_cache is {kv_cache.dtype}")
    if q.shape[0]:
        cache = cos_sin_cache if cos_sin_cache.flags.c_contiguous else cp.ascontiguousarray(cos_sin_cache)
        kern = kernels.ROTARY_CACHE.kernel(T=dtype_tag(q.dtype), C=dtype_tag(cache.dtype))
        launch.launch(kern, (q.shape[0], 1, 1), (128, 1, 1),
                      kernels.rotary_cache_args(kern, positions, q, k, v, kv_cache, int(layer), slot_mapping, cache,
                                                q_stride, k_stride, v_stride, is_neox))
    return q


def fused_add_layer_norm(x, residual, weight, bias, eps):
    """residual += x; x = layer_norm(residual) * weight + bias. Both updated in place; returns (x, residual)."""
    hidden = check_norm_args("fused_add_layer_norm", x, weight, bias)
    if x.shape != residual.shape or x.dtype != residual.dtype:
        raise ValueError(f"fused_add_layer_norm: x {tuple(x.shape)} {x.dtype} and residual {tuple(residual.shape)} "
                         f"{residual.dtype} differ")
    if not (x.flags.c_contiguous and residual.flags.c_contiguous):
        raise ValueError("fused_add_layer_norm: x and residual are updated in place and must be C-contiguous")
    if x.size:
        cp = require_cupy()
        w = None if weight is None else cp.ascontiguousarray(weight)
        b = None if bias is None else cp.ascontiguousarray(bias)
        kern = kernels.FUSED_ADD_LAYER_NORM.kernel(T=dtype_tag(x.dtype))
        launch.launch(kern, (rows(x), 1, 1), (norm_threads(hidden), 1, 1),
                      kernels.fused_add_layer_norm_args(kern, x, residual, w, b, eps))
    return x, residual
