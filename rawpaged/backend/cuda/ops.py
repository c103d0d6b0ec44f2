"""The kernel ops: paged attention, cache writes and copies, norms, rotary embedding, activations.

Each op: checks its arguments (dispatch.check_*: one-line ValueErrors), picks its kernel from the
table (dispatch.select_* or `Family.kernel`), builds the argument tuple with that kernel's builder
(kernels.*_args) and launches it (launch.launch). Names, argument order and layouts are the CPU
twin's (rawpaged/backend/cpu.py); `tests/test_cuda_emulation.py` runs these on the real .cu files.
"""
from __future__ import annotations

import math

import numpy as np

from rawpaged.backend.cuda import kernels, launch
from rawpaged.backend.cuda.dispatch import (NUM_THREADS, PACK, check_attention_args, check_cache_args,
                                            check_norm_args, check_rotary_args, dtype_tag, grid_1d, norm_threads,
                                            select_attention_kernel, token_stride)
from rawpaged.backend.cuda.kernels import rows
from rawpaged.backend.cuda.launch import on_device, packable, require_cupy
from rawpaged.backend.base import check_window


# --------------------------------------------------------------------------------------------
# Paged attention
# --------------------------------------------------------------------------------------------
def paged_attention(q, kv_cache, layer, block_tables, seq_lens, query_start_loc, scale,
                    out=None, max_query_len=None, max_seq_len=None, sliding_window=None):
    """out[t, h] = softmax(q[t, h] . K[s, lo..pos]^T * scale) @ V[s, lo..pos] through s's block table,
    lo = 0, or max(0, pos - sliding_window + 1) with a window.

    `max_query_len` / `max_seq_len` are host-side hints (the model runner knows them); when missing
    they are read back from the device, which costs a synchronisation.
    """
    return paged_attention_planned(q, kv_cache, layer, block_tables, seq_lens, query_start_loc, scale, out,
                                   max_query_len, max_seq_len, sliding_window)


def paged_attention_planned(q, kv_cache, layer, block_tables, seq_lens, query_start_loc, scale,
                            out=None, max_query_len=None, max_seq_len=None, sliding_window=None, *,
                            max_model_len=None, num_partitions=None):
    """paged_attention with the decode grid fixed in advance, for a step captured in a CUDA graph:
    `max_model_len` plans split-K for that length (the same grid whatever the step's contexts) and
    `num_partitions` fixes the partition count outright (dispatch.select_decode_kernel).
    NOTE: a name of its own, not two more keywords on paged_attention, whose signature is the backend
    contract's (rawpaged/backend/base.py) that the CPU twin shares."""
    cp = require_cupy()
    block_tables = on_device(block_tables, np.int32)
    seq_lens = on_device(seq_lens, np.int32)
    query_start_loc = on_device(query_start_loc, np.int32)
    check_attention_args(q, kv_cache, layer, block_tables, seq_lens, query_start_loc, out)
    window = check_window(sliding_window)
    num_tokens, num_heads, head_dim = q.shape
    num_kv_heads, block_size = kv_cache.shape[3], kv_cache.shape[4]
    num_seqs = seq_lens.shape[0]
    if out is None:
        out = cp.empty(q.shape, dtype=q.dtype)
    if num_tokens == 0 or num_seqs == 0:
        return out
    if max_query_len is None:
        max_query_len = int(cp.diff(query_start_loc).max())
    if max_seq_len is None and max_model_len is None:
        max_seq_len = int(seq_lens.max())
    plan = select_attention_kernel(head_dim, q.dtype, block_size, num_seqs, max_seq_len or max_model_len,
                                   launch.num_sms(), num_heads=num_heads, num_kv_heads=num_kv_heads,
                                   max_query_len=max_query_len, num_tokens=num_tokens, sliding_window=window,
                                   blocks_per_sm=launch.occupancy, max_model_len=max_model_len,
                                   num_partitions=num_partitions)
    k = kernels.kernel(plan.kernel)
    if k.family in kernels.VECTOR_Q_FAMILIES and not packable(q):
        q = cp.ascontiguousarray(q)            # 16-byte (and 4-byte fragment) loads need aligned rows
    batch = kernels.AttentionBatch(q, token_stride(q, "paged_attention: q", (num_heads, head_dim)), kv_cache,
                                   layer, block_tables, seq_lens, query_start_loc, scale, window)
    if k.family in (kernels.PAGED_DECODE, kernels.PAGED_DECODE_MMA):
        scratch = None
        if plan.use_split_k:
            rows = num_seqs * num_heads * plan.num_partitions
            scratch = (cp.empty((rows, head_dim), dtype=cp.float32), cp.empty((rows,), dtype=cp.float32),
                       cp.empty((rows,), dtype=cp.float32))
        launch.launch(k, plan.grid, plan.block, kernels.decode_args(k, out, batch, plan, scratch), plan.shared_mem)
        if plan.use_split_k:
            reduce = kernels.kernel(plan.reduce_kernel)
            launch.launch(reduce, plan.reduce_grid, (NUM_THREADS, 1, 1),
                          kernels.decode_reduce_args(reduce, out, batch, plan, scratch), plan.reduce_shared_mem)
    elif k.family is kernels.PAGED_PREFILL:
        launch.launch(k, plan.grid, plan.block, kernels.prefill_args(k, out, batch, plan.group_tile), plan.shared_mem)
    else:
        launch.launch(k, plan.grid, plan.block, kernels.varlen_args(k, out, batch), plan.shared_mem)
    return out


# --------------------------------------------------------------------------------------------
# Cache ops
# --------------------------------------------------------------------------------------------
def reshape_and_cache(k, v, kv_cache, layer, slot_mapping):
    """Write the new tokens' K and V ([T, num_kv_heads, head_dim]) into their cache slots (slot < 0: skip)."""
    require_cupy()
    slot_mapping = on_device(slot_mapping, np.int64)
    k_stride, v_stride = check_cache_args(k, v, kv_cache, layer, slot_mapping)
    if k.shape[0] == 0:
        return
    head_dim = kv_cache.shape[5]
    vec = (head_dim % PACK == 0 and packable(k) and packable(v) and kv_cache.data.ptr % 16 == 0
           and (head_dim * k.dtype.itemsize) % 16 == 0)
    kern = kernels.RESHAPE_AND_CACHE.kernel(T=dtype_tag(k.dtype))
    launch.launch(kern, (k.shape[0], 1, 1), (128, 1, 1),
                  kernels.reshape_and_cache_args(kern, k, v, kv_cache, layer, slot_mapping, k_stride, v_stride, vec))


def copy_blocks(kv_cache, pairs):
    """Copy-on-write: kv_cache[dst] = kv_cache[src] for each (src, dst) pair, every layer, one launch.
    NOTE: no pair may read a block another pair of the same call writes (the block manager's pairs never do)."""
    cp = require_cupy()
    pairs = np.asarray(pairs, dtype=np.int64).reshape(-1, 2)
    if not len(pairs):
        return
    if not kv_cache.flags.c_contiguous:
        raise ValueError("copy_blocks: kv_cache must be C-contiguous")
    if pairs.min() < 0 or pairs.max() >= kv_cache.shape[0]:
        raise ValueError(f"copy_blocks: block ids must be in [0, {kv_cache.shape[0]}), got {pairs.min()}..{pairs.max()}")
    block_bytes = kv_cache[0].nbytes
    if block_bytes % 16:
        raise ValueError(f"copy_blocks: a block of {block_bytes} bytes is not a multiple of 16")
    kern = kernels.COPY_BLOCKS.kernel()
    launch.launch(kern, (len(pairs), min(64, math.ceil(block_bytes // 16 / 256)), 1), (256, 1, 1),
                  kernels.copy_blocks_args(kern, kv_cache, cp.asarray(pairs)))


# --------------------------------------------------------------------------------------------
# Norms, rotary embedding, activations
# --------------------------------------------------------------------------------------------
def rms_norm(x, weight, eps):
    """y = x / sqrt(mean(x^2) + eps) * weight, over the last axis (fp32 statistics)."""
    cp = require_cupy()
    hidden = check_norm_args("rms_norm", x, weight)
    x = cp.ascontiguousarray(x)
    out = cp.empty_like(x)
    if x.size:
        kern = kernels.RMS_NORM.kernel(T=dtype_tag(x.dtype))
        launch.launch(kern, (rows(x), 1, 1), (norm_threads(hidden), 1, 1),
                      kernels.rms_norm_args(kern, out, x, cp.ascontiguousarray(weight), eps))
    return out


def fused_add_rms_norm(x, residual, weight, eps):
    """residual += x; x = rms_norm(residual). Both updated in place; returns (x, residual)."""
    hidden = check_norm_args("fused_add_rms_norm", x, weight)
    if x.shape != residual.shape or x.dtype != residual.dtype:
        raise ValueError(f"fused_add_rms_norm: x {tuple(x.shape)} {x.dtype} and residual {tuple(residual.shape)} {residual.dtype} differ")
    if not (x.flags.c_contiguous and residual.flags.c_contiguous):
        raise ValueError("fused_add_rms_norm: x and residual are updated in place and must be C-contiguous")
    if x.size:
        kern = kernels.FUSED_ADD_RMS_NORM.kernel(T=dtype_tag(x.dtype))
        launch.launch(kern, (rows(x), 1, 1), (norm_threads(hidden), 1, 1),
                      kernels.fused_add_rms_norm_args(kern, x, residual, require_cupy().ascontiguousarray(weight), eps))
    return x, residual


def layer_norm(x, weight, bias, eps):
    """y = (x - mean) / sqrt(var + eps) * weight + bias, over the last axis (weight/bias may be None)."""
    cp = require_cupy()
    hidden = check_norm_args("layer_norm", x, weight, bias)
    x = cp.ascontiguousarray(x)
    out = cp.empty_like(x)
    if x.size:
        w = cp.ascontiguousarray(weight) if weight is not None else None
        b = cp.ascontiguousarray(bias) if bias is not None else None
        kern = kernels.LAYER_NORM.kernel(T=dtype_tag(x.dtype))
        launch.launch(kern, (rows(x), 1, 1), (norm_threads(hidden), 1, 1),
                      kernels.layer_norm_args(kern, out, x, w, b, eps))
    return out


def rotary_embedding(positions, q, k, cos_sin_cache, is_neox):
    """Rotate the first rot_dim features of q [T, Hq, D] and k [T, Hk, D] in place (see cpu.py)."""
    cp = require_cupy()
    positions = on_device(positions, np.int64)
    q_stride, k_stride = check_rotary_args(positions, q, k, cos_sin_cache)
    if q.shape[0]:
        cache = cp.ascontiguousarray(cos_sin_cache)
        kern = kernels.ROTARY.kernel(T=dtype_tag(q.dtype), C=dtype_tag(cache.dtype))
        launch.launch(kern, (q.shape[0], 1, 1), (128, 1, 1),
                      kernels.rotary_args(kern, positions, q, k, cache, q_stride, k_stride, is_neox))
    return q, k


def silu_and_mul(x):
    """x [..., 2I] -> silu(x[..., :I]) * x[..., I:]."""
    cp = require_cupy()
    if x.shape[-1] % 2:
        raise ValueError(f"silu_and_mul: last dim {x.shape[-1]} must be even (gate and up halves)")
    x = cp.ascontiguousarray(x)
    out = cp.empty(x.shape[:-1] + (x.shape[-1] // 2,), dtype=x.dtype)
    if out.size:
        kern = kernels.SILU_AND_MUL.kernel(T=dtype_tag(x.dtype))
        launch.launch(kern, grid_1d(out.size), (256, 1, 1), kernels.silu_and_mul_args(kern, out, x))
    return out


def gelu_tanh_and_mul(x):
    """x [..., 2I] -> gelu_tanh(x[..., :I]) * x[..., I:] (GeGLU)."""
    cp = require_cupy()
    if x.shape[-1] % 2:
        raise ValueError(f"gelu_tanh_and_mul: last dim {x.shape[-1]} must be even (gate and up halves)")
    x = cp.ascontiguousarray(x)
    out = cp.empty(x.shape[:-1] + (x.shape[-1] // 2,), dtype=x.dtype)
    if out.size:
        kern = kernels.GELU_TANH_AND_MUL.kernel(T=dtype_tag(x.dtype))
        launch.launch(kern, grid_1d(out.size), (256, 1, 1), kernels.gelu_tanh_and_mul_args(kern, out, x))
    return out


def _unary(x, op: int):
    cp = require_cupy()
    x = cp.ascontiguousarray(x)
    out = cp.empty_like(x)
    if x.size:
        kern = kernels.UNARY.kernel(T=dtype_tag(x.dtype))
        launch.launch(kern, grid_1d(x.size), (256, 1, 1), kernels.unary_args(kern, out, x, op))
    return out


def gelu(x):
    """Exact GELU: x * Phi(x)."""
    return _unary(x, 0)


def gelu_tanh(x):
    """GELU, tanh approximation (gelu_new / gelu_pytorch_tanh)."""
    return _unary(x, 1)


def relu(x):
    return _unary(x, 2)
