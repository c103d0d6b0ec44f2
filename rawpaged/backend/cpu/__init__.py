"""CPU backend: Numba for the GEMMs of few rows, the paged attention and the cache ops; NumPy (and
OpenBLAS for the GEMMs of many rows) for the rest.

  cpu/gemm.py       linear(): the small-row kernel, sgemm for many rows
  cpu/attention.py  paged attention (query tiles x KV blocks; decode: two passes) and the cache write
  cpu/simd.py       LLVM-IR intrinsics of the attention: 16 key scores / 16 values of a block at once
  cpu/lowp.py       bfloat16 / float16 storage: widened to float32 in registers, narrowed on write

Dtypes: `resolve_dtype` takes float32, bfloat16 or float16 ("auto": float32). The dtype is the
STORAGE of the weight matrices and of the KV cache; activations, norms' gains, biases and every sum
stay float32 (NOTE: the CPU has no 16-bit arithmetic worth having, while reading half the bytes is
what makes a decode step faster: it is bound by the weights and the KV cache streamed from memory).

Every function here has a CUDA twin in `rawpaged/backend/cuda/` with the same name, the same
argument order and the same memory layouts; `tests/gpu` compares the two on random data.

Layouts (shared by both backends):
  kv_cache      [num_blocks, num_layers, 2, num_kv_heads, block_size, head_dim]   (block-major)
  q             [T, num_heads, head_dim]        T = tokens of the flattened batch (no padding)
  k, v          [T, num_kv_heads, head_dim]
  block_tables  int32 [S, max_blocks_per_seq]   S = sequences in the batch
  seq_lens      int32 [S]      context length of each sequence INCLUDING this step's tokens
  query_start_loc int32 [S+1]  tokens of sequence s are q[query_start_loc[s]:query_start_loc[s+1]]
  slot_mapping  int64 [T]      physical slot of each new token = block * block_size + offset (<0: skip)
"""
from __future__ import annotations

import math
import os

# NOTE: Numba's OpenMP workers spin after a parallel kernel by default and fight OpenBLAS's own
# spinning threads for the cores: a 20-microsecond decode attention then took 4 ms. Passive workers
# sleep instead. It must be set before libgomp loads (at the first parallel launch); a user's
# explicit setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numba  # noqa: E402
import numpy as np  # noqa: E402

from rawpaged.backend.base import check_window  # noqa: E402
from rawpaged.backend.cpu import attention as _attn  # noqa: E402
from rawpaged.backend.cpu import elementwise as _ew  # noqa: E402
from rawpaged.backend.cpu import gemm as _gemm  # noqa: E402
from rawpaged.backend.cpu import lowp  # noqa: E402
from rawpaged.errors import RawpagedError  # noqa: E402

name = "cpu"
xp = np
float_dtypes = (np.float32, np.float16) + ((lowp.BFLOAT16,) if lowp.BFLOAT16 is not None else ())


# --------------------------------------------------------------------------------------------
# Paged attention (varlen, causal; prefill, chunked prefill, prefix-cached prefill and decode)
# --------------------------------------------------------------------------------------------
def paged_attention(q, kv_cache, layer, block_tables, seq_lens, query_start_loc, scale,
                    out=None, max_query_len=None, max_seq_len=None, sliding_window=None):
    """out[t, h] = softmax(q[t, h] . K[s, lo..pos]^T * scale) @ V[s, lo..pos], K/V read through the
    block table of t's sequence s; lo = 0, or max(0, pos - sliding_window + 1) with a window.
    `max_query_len`/`max_seq_len` are launch hints for the GPU. The kernel: cpu/attention.py."""
    _check_attention_args(q, kv_cache, block_tables, seq_lens, query_start_loc)
    window = check_window(sliding_window)
    q = np.ascontiguousarray(q, dtype=np.float32)
    if out is None:
        out = np.empty_like(q)
    span = max_seq_len or int(seq_lens.max())
    work = q.shape[0] * q.shape[1] * (min(span, window) if window else span)
    serial, parallel = _attn.kernels(lowp.kind_of(kv_cache.dtype))[:2]
    kernel = parallel if work >= _attn.PARALLEL_MIN_WORK and _gemm.dynamic_schedule() > 1 else serial
    kernel(q, lowp.bits(kv_cache), int(layer), block_tables, seq_lens, query_start_loc, np.float32(scale),
           window, out)
    return out


def _check_attention_args(q, kv_cache, block_tables, seq_lens, query_start_loc):
    if q.ndim != 3 or kv_cache.ndim != 6:
        raise ValueError(f"paged_attention: q must be [T, H, D] and kv_cache 6-D, got {q.shape} and {kv_cache.shape}")
    if q.shape[2] != kv_cache.shape[5]:
        raise ValueError(f"paged_attention: head_dim of q ({q.shape[2]}) != head_dim of kv_cache ({kv_cache.shape[5]})")
    if q.shape[1] % kv_cache.shape[3]:
        raise ValueError(f"paged_attention: {q.shape[1]} query heads not a multiple of {kv_cache.shape[3]} KV heads")
    if query_start_loc.shape[0] != seq_lens.shape[0] + 1 or block_tables.shape[0] != seq_lens.shape[0]:
        raise ValueError("paged_attention: block_tables, seq_lens and query_start_loc disagree on the number of sequences")


# --------------------------------------------------------------------------------------------
# Cache ops
# --------------------------------------------------------------------------------------------
def reshape_and_cache(k, v, kv_cache, layer, slot_mapping):
    """Write the new tokens' K and V ([T, num_kv_heads, head_dim]) into their cache slots (rounded
    to nearest even where the cache is bfloat16 / float16)."""
    if k.shape != v.shape or k.shape[1:] != (kv_cache.shape[3], kv_cache.shape[5]):
        raise ValueError(f"reshape_and_cache: k {k.shape} / v {v.shape} do not fit kv_cache {kv_cache.shape}")
    write = _attn.kernels(lowp.kind_of(kv_cache.dtype))[2]
    write(k.astype(np.float32, copy=False), v.astype(np.float32, copy=False), lowp.bits(kv_cache), int(layer),
          slot_mapping.astype(np.int64, copy=False))


def rotary_and_cache(positions, q, k, v, kv_cache, layer, slot_mapping, cos_sin_cache, is_neox):
    """rotary_embedding of q (in place) and of k, then reshape_and_cache of the rotated k and v, in one
    pass; k itself is left as it was (only its rotated copy in the cache is read). q, k, v may be
    strided views of the fused qkv projection. Returns q."""
    if k.shape != v.shape or k.shape[1:] != (kv_cache.shape[3], kv_cache.shape[5]) or q.ndim != 3 \
            or q.shape[0] != k.shape[0] or q.shape[2] != k.shape[2]:
        raise ValueError(f"rotary_and_cache: q {q.shape} / k {k.shape} / v {v.shape} do not fit kv_cache {kv_cache.shape}")
    if q.dtype != np.float32:                      # activations are float32 here; anything else: two ops
        k = k.copy()
        rotary_embedding(positions, q, k, cos_sin_cache, is_neox)
        reshape_and_cache(k, v, kv_cache, layer, slot_mapping)
        return q
    fused = _attn.kernels(lowp.kind_of(kv_cache.dtype))[3]
    fused(np.asarray(positions).astype(np.int64, copy=False), q, k.astype(np.float32, copy=False),
          v.astype(np.float32, copy=False), lowp.bits(kv_cache), int(layer),
          np.asarray(slot_mapping).astype(np.int64, copy=False), cos_sin_cache.astype(np.float32, copy=False),
          bool(is_neox))
    return q


def copy_blocks(kv_cache, pairs):
    """Copy-on-write: kv_cache[dst] = kv_cache[src] for each (src, dst) pair, every layer at once."""
    pairs = np.asarray(pairs, dtype=np.int64).reshape(-1, 2)
    if len(pairs):
        kv_cache[pairs[:, 1]] = kv_cache[pairs[:, 0]]


def swap_blocks(src, dst, pairs, stream=None):
    """dst[d] = src[s] for each (s, d): one contiguous block copy each (block-major layout)."""
    pairs = np.asarray(pairs, dtype=np.int64).reshape(-1, 2)
    if len(pairs):
        dst[pairs[:, 1]] = src[pairs[:, 0]]


# NOTE: on the CPU the "device" pool and the swap pool are both host memory and every copy is
# synchronous, so the swap stream and its events are None and waiting is a no-op.
def alloc_pinned(shape, dtype):
    """The swap pool: plain host memory."""
    return np.empty(tuple(shape), dtype=dtype)


def swap_stream():
    return None


def record_event(stream):
    return None


def wait_event(event):
    pass


# --------------------------------------------------------------------------------------------
# Norms, rotary embedding, activations
# --------------------------------------------------------------------------------------------
def _rows(x):
    """x [..., n] -> a C-contiguous float32 [rows, n] (a view where x already is one)."""
    return np.ascontiguousarray(x.reshape(-1, x.shape[-1]), dtype=np.float32)


def rms_norm(x, weight, eps):
    """y = x / sqrt(mean(x^2) + eps) * weight, over the last axis (fp32 statistics)."""
    xr = _rows(x)
    out = np.empty_like(xr)
    _ew.kernel("_rms_norm", xr.size)(xr, weight.astype(np.float32, copy=False), np.float32(eps), out)
    return out.reshape(x.shape).astype(x.dtype, copy=False)


def fused_add_rms_norm(x, residual, weight, eps):
    """residual += x; x = rms_norm(residual). Both updated in place; returns (x, residual)."""
    if x.dtype == residual.dtype == np.float32 and x.flags.c_contiguous and residual.flags.c_contiguous:
        xr, rr = x.reshape(-1, x.shape[-1]), residual.reshape(-1, x.shape[-1])
        _ew.kernel("_add_rms_norm", xr.size)(xr, rr, weight.astype(np.float32, copy=False), np.float32(eps))
        return x, residual
    residual += x
    x[...] = rms_norm(residual, weight, eps)
    return x, residual


def layer_norm(x, weight, bias, eps):
    """y = (x - mean) / sqrt(var + eps) * weight + bias, over the last axis."""
    mean = x.mean(axis=-1, keepdims=True)
    var = np.mean(np.square(x - mean), axis=-1, keepdims=True)
    y = (x - mean) / np.sqrt(var + np.float32(eps))
    if weight is not None:
        y = y * weight
    if bias is not None:
        y = y + bias
    return y.astype(x.dtype, copy=False)


def fused_add_layer_norm(x, residual, weight, bias, eps):
    """residual += x; x = layer_norm(residual) * weight + bias. Both updated in place; returns (x, residual)."""
    if x.shape != residual.shape:
        raise ValueError(f"fused_add_layer_norm: x {x.shape} and residual {residual.shape} differ")
    if x.dtype == residual.dtype == np.float32 and x.flags.c_contiguous and residual.flags.c_contiguous:
        xr, rr = x.reshape(-1, x.shape[-1]), residual.reshape(-1, x.shape[-1])
        none = np.empty(0, np.float32)
        w = none if weight is None else weight.astype(np.float32, copy=False)
        b = none if bias is None else bias.astype(np.float32, copy=False)
        _ew.kernel("_add_layer_norm", xr.size)(xr, rr, w, b, np.float32(eps))
        return x, residual
    residual += x
    x[...] = layer_norm(residual, weight, bias, eps)
    return x, residual


def rotary_embedding(positions, q, k, cos_sin_cache, is_neox):
    """Rotate the first rot_dim features of q [T, Hq, D] and k [T, Hk, D] in place.

    cos_sin_cache [max_pos, rot_dim]: cos in the first rot_dim/2 columns, sin in the rest.
    is_neox=True rotates halves (x[:r/2], x[r/2:r]) as Hugging Face LLaMA does; False rotates
    interleaved pairs (x[0::2], x[1::2]) as GPT-J and llama2.c do.
    """
    pos = np.asarray(positions).astype(np.int64, copy=False)
    table = cos_sin_cache.astype(np.float32, copy=False)
    if (q.dtype == k.dtype == np.float32 and q.flags.c_contiguous and k.flags.c_contiguous
            and q.shape[0] == k.shape[0] == pos.shape[0]):
        _ew.kernel("_rotary", q.size + k.size)(pos, q, k, table, bool(is_neox))
    else:
        _rotary_numpy(pos, q, k, table, is_neox)
    return q, k


def _rotary_numpy(positions, q, k, cos_sin_cache, is_neox):
    rot = cos_sin_cache.shape[1]
    cos = cos_sin_cache[positions, : rot // 2][:, None, :]     # [T, 1, rot/2]
    sin = cos_sin_cache[positions, rot // 2:][:, None, :]
    for x in (q, k):
        if is_neox:
            x1 = x[..., : rot // 2].copy()
            x2 = x[..., rot // 2: rot].copy()
            x[..., : rot // 2] = x1 * cos - x2 * sin
            x[..., rot // 2: rot] = x2 * cos + x1 * sin
        else:
            x1 = x[..., 0:rot:2].copy()
            x2 = x[..., 1:rot:2].copy()
            x[..., 0:rot:2] = x1 * cos - x2 * sin
            x[..., 1:rot:2] = x2 * cos + x1 * sin
    return q, k


def silu_and_mul(x):
    """x [T, 2I] -> silu(x[:, :I]) * x[:, I:]  (SwiGLU's gate and up projections fused)."""
    xr = _rows(x)
    out = np.empty((xr.shape[0], xr.shape[1] // 2), np.float32)
    _ew.kernel("_silu_and_mul", out.size)(xr, out)
    return out.reshape(*x.shape[:-1], out.shape[1]).astype(x.dtype, copy=False)


def gelu_tanh_and_mul(x):
    """x [T, 2I] -> gelu_tanh(x[:, :I]) * x[:, I:]  (GeGLU, Gemma's MLP: gate and up fused)."""
    d = x.shape[-1] // 2
    return (gelu_tanh(x[..., :d]) * x[..., d:]).astype(x.dtype, copy=False)


@numba.vectorize(["float32(float32)", "float64(float64)"], cache=True)
def _gelu_erf(v):
    return 0.5 * v * (1.0 + math.erf(v / math.sqrt(2.0)))


def gelu(x):
    """Exact GELU: x * Phi(x)."""
    return _gelu_erf(x)


def gelu_tanh(x):
    """GELU, tanh approximation (gelu_new / gelu_pytorch_tanh)."""
    c = np.float32(math.sqrt(2.0 / math.pi))
    return (0.5 * x * (1.0 + np.tanh(c * (x + np.float32(0.044715) * x * x * x)))).astype(x.dtype, copy=False)


def relu(x):
    return np.maximum(x, 0)


# --------------------------------------------------------------------------------------------
# Dense ops and memory
# --------------------------------------------------------------------------------------------
def linear(x, weight, bias=None):
    """x [T, in] @ weight[out, in]^T (+ bias) -> float32: Hugging Face's weight layout, stored
    float32, bfloat16 or float16, float32 sums (cpu/gemm.py)."""
    y = _gemm.linear(x.astype(np.float32, copy=False), weight)
    if bias is not None:
        y += bias
    return y


def embedding(token_ids, table):
    """table[token_ids] as float32 (the table may be stored in 16 bits)."""
    return table[token_ids].astype(np.float32, copy=False)


def to_device(array, dtype=None):
    """Host array -> backend array (a no-op on the CPU but for the dtype).

    NOTE: with a 16-bit dtype only matrices (weights, embedding tables) are stored in 16 bits;
    vectors (norm gains, biases) stay float32: they are tiny, and every op reads them as float32.
    """
    if dtype is not None and np.dtype(dtype) != np.float32 and np.ndim(array) < 2 \
            and np.issubdtype(np.asarray(array).dtype, np.floating):
        dtype = np.float32
    return np.ascontiguousarray(array, dtype=dtype)


def to_host(array):
    return np.asarray(array)


def synchronize():
    pass


def free_device_memory() -> int:
    """Bytes of host memory available (the CPU backend's device is the host)."""
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def total_device_memory() -> int:
    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


_DTYPE_NAMES = {"float32": "float32", "float": "float32", "fp32": "float32",
                "bfloat16": "bfloat16", "bf16": "bfloat16",
                "float16": "float16", "half": "float16", "fp16": "float16"}


def resolve_dtype(dtype, torch_dtype=None):
    """'auto' -> float32 (whatever the checkpoint's dtype: exact, and what the fixtures check);
    float32, bfloat16 or float16 (or their short names) -> that storage dtype."""
    if isinstance(dtype, str) and dtype == "auto":
        return np.dtype(np.float32)
    key = dtype if isinstance(dtype, str) else np.dtype(dtype).name
    name = _DTYPE_NAMES.get(key)
    if name is None:
        raise RawpagedError(f"dtype {dtype!r} not supported on the CPU: choose auto, float32, bfloat16 or float16")
    if name == "bfloat16":
        if lowp.BFLOAT16 is None:
            raise RawpagedError("dtype='bfloat16' on the CPU needs the ml_dtypes package (pip install ml_dtypes)")
        return lowp.BFLOAT16
    return np.dtype(name)
