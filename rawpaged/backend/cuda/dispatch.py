"""Which kernel, grid and shared memory a call gets, and the argument checks: pure, device-free.

Everything here works on anything with .shape/.dtype/.strides/.flags (NumPy arrays in the CPU
tests, tests/test_cuda_dispatch.py): the ops in ops.py call these before anything is launched, so a
bad argument is a one-line ValueError, never a fault on the device. Kernel names come from the table
in kernels.py (`Family.kernel_name`), never from string formatting here.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from rawpaged.backend.cuda.kernels import (DECODE_FAST_HEAD_DIMS, DTYPE_TAGS, GROUP_TILES, MAX_HEAD_DIM,
                                           NUM_THREADS, NUM_WARPS, PACK, PAGED_DECODE, PAGED_DECODE_REDUCE,
                                           PAGED_PREFILL, PAGED_VARLEN, PREFILL_BM, PREFILL_BN,
                                           PREFILL_MMA_HEAD_DIMS)
from rawpaged.errors import RawpagedError

# Split-K: with fewer than SPLIT_K_MIN_WAVES blocks per multiprocessor the decode kernel splits each
# context into partitions of PARTITION_SIZE tokens (and a reduce kernel merges them), provided the
# longest context holds at least two partitions. Tests force it on or off with `split_k_policy`.
# NOTE: these three are read at call time; `rawpaged.backend.cuda.split_k_policy = ...` sets them here.
PARTITION_SIZE = 512
SPLIT_K_MIN_WAVES = 2
split_k_policy = "auto"        # "auto" | "always" | "never"
prefill_policy = "auto"        # "auto" | "mma" | "varlen"


@dataclass(frozen=True)
class Launch:
    """One kernel launch: which kernel, its geometry, and for split-K the reduce that follows."""
    kernel: str
    grid: tuple[int, int, int]
    block: tuple[int, int, int]
    shared_mem: int
    use_split_k: bool = False
    num_partitions: int = 1
    partition_size: int = 0
    reduce_kernel: str | None = None
    reduce_grid: tuple[int, int, int] | None = None
    reduce_shared_mem: int = 0


# --------------------------------------------------------------------------------------------
# Kernel choice: names, grids, shared memory, split-K
# --------------------------------------------------------------------------------------------
def dtype_tag(dtype) -> str:
    """'f16' | 'bf16' | 'f32' for a supported dtype (or its name), else a one-line ValueError."""
    if isinstance(dtype, str) and dtype in DTYPE_TAGS:
        return DTYPE_TAGS[dtype]
    dt = np.dtype(dtype)
    if dt.name not in DTYPE_TAGS:
        raise ValueError(f"CUDA kernels support float16, bfloat16 and float32, not {dt.name}")
    return DTYPE_TAGS[dt.name]


def check_attention_shape(head_dim: int, block_size: int, num_heads: int, num_kv_heads: int) -> None:
    if not 1 <= head_dim <= MAX_HEAD_DIM:
        raise ValueError(f"paged_attention: head_dim {head_dim} not supported on CUDA (1..{MAX_HEAD_DIM})")
    if block_size < 1 or block_size & (block_size - 1):
        raise ValueError(f"paged_attention: block_size {block_size} must be a power of two (8, 16 or 32)")
    if num_kv_heads < 1 or num_heads % num_kv_heads:
        raise ValueError(f"paged_attention: {num_heads} query heads not a multiple of {num_kv_heads} KV heads")


def group_tile(group: int) -> int:
    """Query heads one decode block handles: the largest of 8, 4, 2, 1 dividing the GQA group."""
    return next(gt for gt in GROUP_TILES if group % gt == 0)


def use_split_k(num_blocks: int, max_seq_len: int, num_sms: int, policy: str = "auto",
                partition_size: int = PARTITION_SIZE) -> bool:
    """Split each context across blocks when the plain grid leaves the GPU idle and contexts are long."""
    if policy not in ("auto", "always", "never"):
        raise ValueError(f"split_k_policy must be auto, always or never, got {policy!r}")
    if policy != "auto":
        return policy == "always"
    return num_blocks < SPLIT_K_MIN_WAVES * num_sms and max_seq_len >= 2 * partition_size


def decode_kernel_name(tag: str, head_dim: int, gt: int) -> str:
    """The compile-time head size where one is instantiated (16-bit types), else the generic path."""
    hd = head_dim if (head_dim in DECODE_FAST_HEAD_DIMS and tag != "f32") else 0
    return PAGED_DECODE.kernel_name(T=tag, HD=hd, GT=gt)


def select_decode_kernel(head_dim, dtype, block_size, num_seqs, num_heads, num_kv_heads, max_seq_len,
                         num_sms, policy=None, partition_size=None, sliding_window=0) -> Launch:
    """Decode (one query token per sequence): one block per (KV head, group tile, sequence[, partition]).
    With a sliding window W a query reads at most W keys: split-K is chosen on min(max_seq_len, W), and
    the partitions wholly before a sequence's window return at once (grid z still spans max_seq_len)."""
    check_attention_shape(head_dim, block_size, num_heads, num_kv_heads)
    if head_dim % PACK:
        raise ValueError(f"paged decode kernel needs head_dim % {PACK} == 0, got {head_dim} (use the varlen kernel)")
    tag = dtype_tag(dtype)
    gt = group_tile(num_heads // num_kv_heads)
    heads_grid = num_kv_heads * (num_heads // num_kv_heads // gt)
    shared = (NUM_WARPS * gt * head_dim + 2 * NUM_WARPS * gt) * 4
    kernel = decode_kernel_name(tag, head_dim, gt)
    part = partition_size or PARTITION_SIZE
    span = min(max_seq_len, sliding_window) if sliding_window else max_seq_len
    if not use_split_k(heads_grid * num_seqs, span, num_sms, policy or split_k_policy, part):
        return Launch(kernel, (heads_grid, num_seqs, 1), (NUM_THREADS, 1, 1), shared)
    parts = max(1, math.ceil(max_seq_len / part))
    return Launch(kernel, (heads_grid, num_seqs, parts), (NUM_THREADS, 1, 1), shared,
                  use_split_k=True, num_partitions=parts, partition_size=part,
                  reduce_kernel=PAGED_DECODE_REDUCE.kernel_name(T=tag), reduce_grid=(num_heads, num_seqs, 1),
                  reduce_shared_mem=parts * 4)


def select_prefill_kernel(head_dim, dtype, block_size, num_seqs, num_heads, num_kv_heads, num_tokens,
                          max_query_len, policy=None) -> Launch:
    """Varlen causal attention: tensor-core tiles for fp16/bf16 at the usual head sizes, else the
    one-warp-per-(token, head) kernel that takes any head size up to 256."""
    check_attention_shape(head_dim, block_size, num_heads, num_kv_heads)
    tag = dtype_tag(dtype)
    policy = policy or prefill_policy
    if policy not in ("auto", "mma", "varlen"):
        raise ValueError(f"prefill_policy must be auto, mma or varlen, got {policy!r}")
    mma_ok = tag != "f32" and head_dim in PREFILL_MMA_HEAD_DIMS
    if policy == "mma" and not mma_ok:
        raise ValueError(f"the tensor-core prefill kernel needs fp16/bf16 and head_dim in {PREFILL_MMA_HEAD_DIMS}")
    if mma_ok and policy != "varlen":
        shared = (PREFILL_BM + 2 * PREFILL_BN) * (head_dim + 8) * 2
        return Launch(PAGED_PREFILL.kernel_name(T=tag, HD=head_dim),
                      (math.ceil(max_query_len / PREFILL_BM), num_heads, num_seqs), (NUM_THREADS, 1, 1), shared)
    return Launch(PAGED_VARLEN.kernel_name(T=tag), (num_tokens, math.ceil(num_heads / NUM_WARPS), 1),
                  (NUM_THREADS, 1, 1), 0)


def select_attention_kernel(head_dim, dtype, block_size, num_seqs, max_seq_len, num_sms, *, num_heads,
                            num_kv_heads, max_query_len=1, num_tokens=None, sliding_window=0) -> Launch:
    """The decode kernel when every sequence brings one token, else the varlen prefill kernel."""
    if max_query_len <= 1 and head_dim % PACK == 0:
        return select_decode_kernel(head_dim, dtype, block_size, num_seqs, num_heads, num_kv_heads,
                                    max_seq_len, num_sms, sliding_window=sliding_window)
    return select_prefill_kernel(head_dim, dtype, block_size, num_seqs, num_heads, num_kv_heads,
                                 num_tokens if num_tokens is not None else num_seqs * max(1, max_query_len),
                                 max(1, max_query_len))


def norm_threads(hidden: int) -> int:
    """Threads per row for the norm kernels: enough that each thread handles a handful of elements."""
    if hidden <= 1024:
        return 128
    if hidden <= 4096:
        return 256
    return 1024


def grid_1d(n: int) -> tuple[int, int, int]:
    """Blocks of a 256-thread grid-stride launch over n elements (at most 65535)."""
    return (max(1, min(65535, math.ceil(n / 256))), 1, 1)


# --------------------------------------------------------------------------------------------
# Host-side helpers
# --------------------------------------------------------------------------------------------
def copy_runs(pairs) -> list[tuple[int, int, int]]:
    """(src, dst) pairs -> (src, dst, count) runs of consecutive blocks, so each run is one copy."""
    runs: list[list[int]] = []
    for s, d in np.asarray(pairs, dtype=np.int64).reshape(-1, 2).tolist():
        if runs and runs[-1][0] + runs[-1][2] == s and runs[-1][1] + runs[-1][2] == d:
            runs[-1][2] += 1
        else:
            runs.append([s, d, 1])
    return [tuple(r) for r in runs]


def float32_to_bfloat16_bits(x: np.ndarray) -> np.ndarray:
    """fp32 -> bf16 bit patterns (uint16), rounding to nearest even, NaN kept NaN (host side)."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounded = ((u + (np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1)))) >> np.uint32(16)).astype(np.uint16)
    nan = (u & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000)
    return np.where(nan, np.uint16(0x7FC0), rounded)


def resolve_dtype_name(dtype, torch_dtype=None, bf16_ok: bool = True) -> str:
    """'auto' | a dtype name | a dtype -> 'float16' | 'bfloat16' | 'float32'.

    auto follows the checkpoint's torch_dtype; float32 (or unknown) checkpoints run in float16 on the
    GPU, as vLLM does, and bfloat16 falls back to float16 where this CuPy cannot hold bfloat16.
    """
    aliases = {"half": "float16", "fp16": "float16", "float16": "float16", "bf16": "bfloat16",
               "bfloat16": "bfloat16", "float": "float32", "fp32": "float32", "float32": "float32"}
    if isinstance(dtype, str) and dtype == "auto":
        want = aliases.get(str(torch_dtype).replace("torch.", ""), "float16") if torch_dtype else "float16"
        if want == "float32":
            want = "float16"
        if want == "bfloat16" and not bf16_ok:
            want = "float16"
        return want
    key = dtype if isinstance(dtype, str) else np.dtype(dtype).name
    if key not in aliases:
        raise RawpagedError(f"dtype {dtype!r} not supported on CUDA: choose auto, float16, bfloat16 or float32")
    want = aliases[key]
    if want == "bfloat16" and not bf16_ok:
        raise RawpagedError("dtype='bfloat16' on the GPU needs CuPy >= 14 with ml_dtypes installed; use dtype='float16'")
    return want


# --------------------------------------------------------------------------------------------
# Argument checks (work on anything with .shape/.dtype/.strides: NumPy arrays in the CPU tests)
# --------------------------------------------------------------------------------------------
def token_stride(x, name: str, inner: tuple[int, ...]) -> int:
    """Elements between consecutive tokens of x [T, *inner] whose inner dims are contiguous."""
    if tuple(x.shape[1:]) != tuple(inner):
        raise ValueError(f"{name}: shape {tuple(x.shape)} does not match [T, {', '.join(map(str, inner))}]")
    item = x.dtype.itemsize
    expect = item
    for dim, stride in zip(reversed(x.shape[1:]), reversed(x.strides[1:])):
        if dim > 1 and stride != expect:
            raise ValueError(f"{name}: its last {len(inner)} dims must be contiguous (strides {x.strides})")
        expect *= dim
    if x.shape[0] > 1 and (x.strides[0] % item or x.strides[0] < expect):
        raise ValueError(f"{name}: token stride {x.strides[0]} bytes is not a whole, non-overlapping row")
    return x.strides[0] // item if x.shape[0] > 1 else int(np.prod(inner))


def check_attention_args(q, kv_cache, layer, block_tables, seq_lens, query_start_loc, out=None) -> None:
    if q.ndim != 3 or kv_cache.ndim != 6:
        raise ValueError(f"paged_attention: q must be [T, H, D] and kv_cache 6-D, got {tuple(q.shape)} and {tuple(kv_cache.shape)}")
    num_blocks, num_layers, two, num_kv_heads, block_size, head_dim = kv_cache.shape
    if two != 2:
        raise ValueError(f"paged_attention: kv_cache dim 2 must be 2 (K and V), got {two}")
    if q.shape[2] != head_dim:
        raise ValueError(f"paged_attention: head_dim of q ({q.shape[2]}) != head_dim of kv_cache ({head_dim})")
    check_attention_shape(head_dim, block_size, q.shape[1], num_kv_heads)
    if q.dtype != kv_cache.dtype:
        raise ValueError(f"paged_attention: q is {q.dtype} but kv_cache is {kv_cache.dtype}")
    dtype_tag(q.dtype)
    if not kv_cache.flags.c_contiguous:
        raise ValueError("paged_attention: kv_cache must be C-contiguous")
    if not 0 <= int(layer) < num_layers:
        raise ValueError(f"paged_attention: layer {layer} out of range for {num_layers} layers")
    token_stride(q, "paged_attention: q", tuple(q.shape[1:]))
    for arr, nm, nd in ((block_tables, "block_tables", 2), (seq_lens, "seq_lens", 1), (query_start_loc, "query_start_loc", 1)):
        if arr.ndim != nd or np.dtype(arr.dtype) != np.int32:
            raise ValueError(f"paged_attention: {nm} must be {nd}-D int32, got {arr.ndim}-D {arr.dtype}")
    if query_start_loc.shape[0] != seq_lens.shape[0] + 1 or block_tables.shape[0] != seq_lens.shape[0]:
        raise ValueError("paged_attention: block_tables, seq_lens and query_start_loc disagree on the number of sequences")
    if out is not None and (tuple(out.shape) != tuple(q.shape) or out.dtype != q.dtype or not out.flags.c_contiguous):
        raise ValueError(f"paged_attention: out must be a C-contiguous {q.dtype} array of shape {tuple(q.shape)}")


def check_cache_args(k, v, kv_cache, layer, slot_mapping) -> tuple[int, int]:
    if kv_cache.ndim != 6 or not kv_cache.flags.c_contiguous:
        raise ValueError(f"reshape_and_cache: kv_cache must be a C-contiguous 6-D array, got shape {tuple(kv_cache.shape)}")
    inner = (kv_cache.shape[3], kv_cache.shape[5])
    if k.shape != v.shape or k.ndim != 3:
        raise ValueError(f"reshape_and_cache: k {tuple(k.shape)} / v {tuple(v.shape)} do not fit kv_cache {tuple(kv_cache.shape)}")
    if k.dtype != kv_cache.dtype or v.dtype != kv_cache.dtype:
        raise ValueError(f"reshape_and_cache: k/v are {k.dtype}/{v.dtype} but kv_cache is {kv_cache.dtype}")
    if slot_mapping.ndim != 1 or slot_mapping.shape[0] != k.shape[0]:
        raise ValueError(f"reshape_and_cache: slot_mapping must be [{k.shape[0]}], got {tuple(slot_mapping.shape)}")
    if not 0 <= int(layer) < kv_cache.shape[1]:
        raise ValueError(f"reshape_and_cache: layer {layer} out of range for {kv_cache.shape[1]} layers")
    return token_stride(k, "reshape_and_cache: k", inner), token_stride(v, "reshape_and_cache: v", inner)


def check_rotary_args(positions, q, k, cos_sin_cache) -> tuple[int, int]:
    if q.ndim != 3 or k.ndim != 3 or q.shape[0] != k.shape[0] or q.shape[2] != k.shape[2]:
        raise ValueError(f"rotary_embedding: q {tuple(q.shape)} and k {tuple(k.shape)} must be [T, H, D] with the same T and D")
    if positions.ndim != 1 or positions.shape[0] != q.shape[0]:
        raise ValueError(f"rotary_embedding: positions must be [{q.shape[0]}], got {tuple(positions.shape)}")
    if cos_sin_cache.ndim != 2 or cos_sin_cache.shape[1] % 2 or cos_sin_cache.shape[1] > q.shape[2]:
        raise ValueError(f"rotary_embedding: cos_sin_cache must be [max_pos, rot] with even rot <= {q.shape[2]}, got {tuple(cos_sin_cache.shape)}")
    if q.dtype != k.dtype:
        raise ValueError(f"rotary_embedding: q is {q.dtype} but k is {k.dtype}")
    if cos_sin_cache.dtype not in (np.dtype(np.float32), q.dtype):
        raise ValueError(f"rotary_embedding: cos_sin_cache must be float32 or {q.dtype}, got {cos_sin_cache.dtype}")
    return token_stride(q, "rotary_embedding: q", tuple(q.shape[1:])), token_stride(k, "rotary_embedding: k", tuple(k.shape[1:]))


def check_norm_args(op: str, x, weight, bias=None) -> int:
    hidden = x.shape[-1]
    for arr, nm in ((weight, "weight"), (bias, "bias")):
        if arr is not None and (tuple(arr.shape) != (hidden,) or arr.dtype != x.dtype):
            raise ValueError(f"{op}: {nm} must be [{hidden}] {x.dtype}, got {tuple(arr.shape)} {arr.dtype}")
    dtype_tag(x.dtype)
    return hidden
