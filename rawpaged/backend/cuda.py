"""CUDA backend: CuPy arrays, cuBLAS GEMMs and raw CUDA C kernels (kernels_cuda/*.cu).

Every op has the name, argument order and memory layouts of its CPU twin in
`rawpaged/backend/cpu.py` (see that module's docstring for the layouts); `tests/gpu` compares the two.

How a kernel runs:
  1. the first call of an op compiles its source file with NVRTC through `cupy.RawModule`, for the
     current GPU's architecture and only for the dtype asked (`-DRP_ONLY_F16` ...). CuPy caches the
     cubin on disk (~/.cupy/kernel_cache, or $CUPY_CACHE_DIR) keyed by the source text, the options,
     the architecture and the NVRTC version. We paste our header into the source before compiling,
     so that key covers every line of kernel code: no cache of our own is needed.
  2. the op checks its arguments (shapes, dtypes, contiguity, head and block sizes) and raises a
     one-line ValueError before anything is launched;
  3. a small pure function (`select_*`) picks the kernel name, grid, block and shared memory; these
     are testable without a device (tests/test_cuda_dispatch.py);
  4. CuPy launches on the current stream; launch errors raise at once. With RAWPAGED_CUDA_SYNC=1
     every launch is followed by a synchronize, so an asynchronous fault names its kernel.

Dtypes: float16, bfloat16 and float32. NumPy has no bfloat16; we use `ml_dtypes.bfloat16` (CuPy >= 14
understands it), and convert fp32 host weights to bf16 bit patterns on the host before the upload.
Where CuPy or ml_dtypes lack bfloat16, asking for it is a one-line error and "auto" takes float16.

Importing this module needs neither CuPy nor a device; the ops need both.
"""
from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass

import numpy as np

from kernels_cuda import read_source
from rawpaged.errors import RawpagedError

try:  # NOTE: guarded so the dispatch code can be imported and tested on machines without CuPy.
    import cupy
except Exception:  # pragma: no cover - depends on the machine
    cupy = None

try:
    import ml_dtypes
    BFLOAT16 = np.dtype(ml_dtypes.bfloat16)
except Exception:  # pragma: no cover - depends on the machine
    BFLOAT16 = None

name = "cuda"
xp = cupy
float_dtypes = (np.dtype(np.float16),) + ((BFLOAT16,) if BFLOAT16 is not None else ()) + (np.dtype(np.float32),)

# --------------------------------------------------------------------------------------------
# What the kernels support (kept in step with kernels_cuda/paged_attention.cu's instantiations)
# --------------------------------------------------------------------------------------------
DTYPE_TAGS = {"float16": "f16", "bfloat16": "bf16", "float32": "f32"}
MAX_HEAD_DIM = 256
DECODE_FAST_HEAD_DIMS = (64, 80, 96, 128, 256)     # compile-time head size; others use the "any" path
PREFILL_MMA_HEAD_DIMS = (64, 80, 96, 128, 256)     # tensor-core prefill (fp16/bf16)
GROUP_TILES = (8, 4, 2, 1)                         # query heads per decode block (GQA)
NUM_THREADS = 128                                  # every attention kernel: 4 warps
NUM_WARPS = 4
PACK = 8                                           # elements per 16-byte lane load
PREFILL_BM, PREFILL_BN = 64, 32                    # query rows per block, keys per tile

# Split-K: with fewer than SPLIT_K_MIN_WAVES blocks per multiprocessor the decode kernel splits each
# context into partitions of PARTITION_SIZE tokens (and a reduce kernel merges them), provided the
# longest context holds at least two partitions. Tests force it on or off with `split_k_policy`.
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
# Pure dispatch (no device): names, grids, shared memory, split-K choice
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
    hd = str(head_dim) if (head_dim in DECODE_FAST_HEAD_DIMS and tag != "f32") else "any"
    return f"paged_decode_{tag}_hd{hd}_g{gt}"


def select_decode_kernel(head_dim, dtype, block_size, num_seqs, num_heads, num_kv_heads, max_seq_len,
                         num_sms, policy=None, partition_size=None) -> Launch:
    """Decode (one query token per sequence): one block per (KV head, group tile, sequence[, partition])."""
    check_attention_shape(head_dim, block_size, num_heads, num_kv_heads)
    if head_dim % PACK:
        raise ValueError(f"paged decode kernel needs head_dim % {PACK} == 0, got {head_dim} (use the varlen kernel)")
    tag = dtype_tag(dtype)
    gt = group_tile(num_heads // num_kv_heads)
    heads_grid = num_kv_heads * (num_heads // num_kv_heads // gt)
    shared = (NUM_WARPS * gt * head_dim + 2 * NUM_WARPS * gt) * 4
    kernel = decode_kernel_name(tag, head_dim, gt)
    part = partition_size or PARTITION_SIZE
    if not use_split_k(heads_grid * num_seqs, max_seq_len, num_sms, policy or split_k_policy, part):
        return Launch(kernel, (heads_grid, num_seqs, 1), (NUM_THREADS, 1, 1), shared)
    parts = max(1, math.ceil(max_seq_len / part))
    return Launch(kernel, (heads_grid, num_seqs, parts), (NUM_THREADS, 1, 1), shared,
                  use_split_k=True, num_partitions=parts, partition_size=part,
                  reduce_kernel=f"paged_decode_reduce_{tag}", reduce_grid=(num_heads, num_seqs, 1),
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
        return Launch(f"paged_prefill_{tag}_hd{head_dim}", (math.ceil(max_query_len / PREFILL_BM), num_heads, num_seqs),
                      (NUM_THREADS, 1, 1), shared)
    return Launch(f"paged_varlen_{tag}", (num_tokens, math.ceil(num_heads / NUM_WARPS), 1), (NUM_THREADS, 1, 1), 0)


def select_attention_kernel(head_dim, dtype, block_size, num_seqs, max_seq_len, num_sms, *, num_heads,
                            num_kv_heads, max_query_len=1, num_tokens=None) -> Launch:
    """The decode kernel when every sequence brings one token, else the varlen prefill kernel."""
    if max_query_len <= 1 and head_dim % PACK == 0:
        return select_decode_kernel(head_dim, dtype, block_size, num_seqs, num_heads, num_kv_heads,
                                    max_seq_len, num_sms)
    return select_prefill_kernel(head_dim, dtype, block_size, num_seqs, num_heads, num_kv_heads,
                                 num_tokens if num_tokens is not None else num_seqs * max(1, max_query_len),
                                 max(1, max_query_len))


def all_kernel_names() -> dict[str, list[str]]:
    """Every extern "C" kernel each source file must define (the build test checks them)."""
    attn = []
    for tag in ("f16", "bf16", "f32"):
        attn += [f"paged_decode_reduce_{tag}", f"paged_varlen_{tag}"]
        hds = ("any",) + (tuple(str(h) for h in DECODE_FAST_HEAD_DIMS) if tag != "f32" else ())
        attn += [f"paged_decode_{tag}_hd{hd}_g{gt}" for hd in hds for gt in GROUP_TILES]
        if tag != "f32":
            attn += [f"paged_prefill_{tag}_hd{hd}" for hd in PREFILL_MMA_HEAD_DIMS]
    tags = ("f16", "bf16", "f32")
    return {
        "paged_attention.cu": attn,
        "cache_ops.cu": ["copy_blocks_kernel"] + [f"reshape_and_cache_{t}" for t in tags],
        "norms.cu": [f"{op}_{t}" for op in ("rms_norm", "fused_add_rms_norm", "layer_norm") for t in tags],
        "rotary.cu": ["rotary_f16_f32", "rotary_f16_f16", "rotary_bf16_f32", "rotary_bf16_bf16", "rotary_f32_f32"],
        "activations.cu": [f"{op}_{t}" for op in ("silu_and_mul", "unary") for t in tags],
    }


def norm_threads(hidden: int) -> int:
    """Threads per row for the norm kernels: enough that each thread handles a handful of elements."""
    if hidden <= 1024:
        return 128
    if hidden <= 4096:
        return 256
    return 1024


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


# --------------------------------------------------------------------------------------------
# Device plumbing: modules, kernels, launches
# --------------------------------------------------------------------------------------------
def _require_cupy():
    if cupy is None:
        raise RawpagedError("the CUDA backend needs CuPy (pip install 'rawpaged[cuda]') and a CUDA device")
    return cupy


_ONLY = {"f16": "-DRP_ONLY_F16", "bf16": "-DRP_ONLY_BF16", "f32": "-DRP_ONLY_F32"}


@functools.lru_cache(maxsize=None)
def _module(source: str, tag: str):
    """The compiled module of one source file; paged_attention.cu is compiled for one dtype."""
    cp = _require_cupy()
    options = ("--std=c++17",)
    if source == "paged_attention.cu":
        options += (_ONLY[tag],)
    return cp.RawModule(code=read_source(source), options=options)


@functools.lru_cache(maxsize=None)
def _kernel(source: str, kernel_name: str, tag: str = ""):
    return _module(source, tag).get_function(kernel_name)


def _allow_shared(kernel, nbytes: int) -> None:
    """Opt a kernel in to more than 48 KiB of dynamic shared memory (prefill at head size 256)."""
    if nbytes <= 48 * 1024:
        return
    from cupy.cuda import driver
    fn = getattr(kernel, "function", None) or getattr(kernel, "kernel")
    driver.funcSetAttribute(fn.ptr, driver.CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, int(nbytes))


_SYNC = os.environ.get("RAWPAGED_CUDA_SYNC", "") not in ("", "0")


def _launch(source: str, kernel_name: str, grid, block, args, shared_mem: int = 0, tag: str = "") -> None:
    kernel = _kernel(source, kernel_name, tag)
    _allow_shared(kernel, shared_mem)
    kernel(tuple(int(g) for g in grid), tuple(int(b) for b in block), args, shared_mem=int(shared_mem))
    if _SYNC:
        try:
            cupy.cuda.get_current_stream().synchronize()
        except Exception as err:
            raise RuntimeError(f"CUDA kernel {kernel_name} failed: {err}") from err


@functools.lru_cache(maxsize=None)
def num_sms() -> int:
    return int(_require_cupy().cuda.Device().attributes["MultiProcessorCount"])


def _i32(x) -> np.int32:
    return np.int32(x)


def _i64(x) -> np.int64:
    return np.int64(x)


def _f32(x) -> np.float32:
    return np.float32(x)


_NULL = np.uint64(0)


def _on_device(arr, dtype=None):
    """Index arrays may come from the host: upload (and convert) them; device arrays pass through."""
    cp = _require_cupy()
    if isinstance(arr, cp.ndarray):
        return arr if dtype is None or arr.dtype == dtype else arr.astype(dtype)
    return cp.asarray(np.ascontiguousarray(arr, dtype=dtype))


def _packable(x) -> bool:
    """Rows of x can be read with 16-byte loads: aligned base, token stride a multiple of 16 bytes."""
    return x.data.ptr % 16 == 0 and (x.shape[0] <= 1 or x.strides[0] % 16 == 0) and (x.shape[-1] * x.dtype.itemsize) % 16 == 0


# --------------------------------------------------------------------------------------------
# Paged attention
# --------------------------------------------------------------------------------------------
def paged_attention(q, kv_cache, layer, block_tables, seq_lens, query_start_loc, scale,
                    out=None, max_query_len=None, max_seq_len=None):
    """out[t, h] = softmax(q[t, h] . K[s, 0..pos]^T * scale) @ V[s, 0..pos] through s's block table.

    `max_query_len` / `max_seq_len` are host-side hints (the model runner knows them); when missing
    they are read back from the device, which costs a synchronisation.
    """
    cp = _require_cupy()
    block_tables = _on_device(block_tables, np.int32)
    seq_lens = _on_device(seq_lens, np.int32)
    query_start_loc = _on_device(query_start_loc, np.int32)
    check_attention_args(q, kv_cache, layer, block_tables, seq_lens, query_start_loc, out)
    num_tokens, num_heads, head_dim = q.shape
    num_layers, num_kv_heads, block_size = kv_cache.shape[1], kv_cache.shape[3], kv_cache.shape[4]
    num_seqs = seq_lens.shape[0]
    if out is None:
        out = cp.empty(q.shape, dtype=q.dtype)
    if num_tokens == 0 or num_seqs == 0:
        return out
    if max_query_len is None:
        max_query_len = int(cp.diff(query_start_loc).max())
    if max_seq_len is None:
        max_seq_len = int(seq_lens.max())
    tag = dtype_tag(q.dtype)
    plan = select_attention_kernel(head_dim, q.dtype, block_size, num_seqs, max_seq_len, num_sms(),
                                   num_heads=num_heads, num_kv_heads=num_kv_heads,
                                   max_query_len=max_query_len, num_tokens=num_tokens)
    if plan.kernel.startswith(("paged_decode", "paged_prefill")) and not _packable(q):
        q = cp.ascontiguousarray(q)            # 16-byte loads need aligned rows
    q_stride = token_stride(q, "paged_attention: q", (num_heads, head_dim))
    common = (kv_cache, block_tables, seq_lens, query_start_loc)
    sizes = (_i32(layer), _i32(num_layers), _i32(num_heads), _i32(num_kv_heads), _i32(block_size),
             _i32(block_tables.shape[1]))
    if plan.kernel.startswith("paged_decode"):
        if plan.use_split_k:
            rows = num_seqs * num_heads * plan.num_partitions
            part_out = cp.empty((rows, head_dim), dtype=cp.float32)
            part_max = cp.empty((rows,), dtype=cp.float32)
            part_sum = cp.empty((rows,), dtype=cp.float32)
        else:
            part_out = part_max = part_sum = _NULL
        _launch("paged_attention.cu", plan.kernel, plan.grid, plan.block,
                (out, part_out, part_max, part_sum, q, _i64(q_stride), *common, *sizes, _i32(head_dim),
                 _i32(plan.partition_size), _i32(plan.num_partitions), _f32(scale)),
                plan.shared_mem, tag)
        if plan.use_split_k:
            _launch("paged_attention.cu", plan.reduce_kernel, plan.reduce_grid, (NUM_THREADS, 1, 1),
                    (out, part_out, part_max, part_sum, seq_lens, query_start_loc, _i32(num_heads),
                     _i32(head_dim), _i32(plan.partition_size), _i32(plan.num_partitions)),
                    plan.reduce_shared_mem, tag)
    elif plan.kernel.startswith("paged_prefill"):
        _launch("paged_attention.cu", plan.kernel, plan.grid, plan.block,
                (out, q, _i64(q_stride), *common, *sizes, _f32(scale)), plan.shared_mem, tag)
    else:
        _launch("paged_attention.cu", plan.kernel, plan.grid, plan.block,
                (out, q, _i64(q_stride), *common, _i32(num_seqs), *sizes, _i32(head_dim), _f32(scale)),
                plan.shared_mem, tag)
    return out


# --------------------------------------------------------------------------------------------
# Cache ops
# --------------------------------------------------------------------------------------------
def reshape_and_cache(k, v, kv_cache, layer, slot_mapping):
    """Write the new tokens' K and V ([T, num_kv_heads, head_dim]) into their cache slots (slot < 0: skip)."""
    _require_cupy()
    slot_mapping = _on_device(slot_mapping, np.int64)
    k_stride, v_stride = check_cache_args(k, v, kv_cache, layer, slot_mapping)
    if k.shape[0] == 0:
        return
    _, num_layers, _, num_kv_heads, block_size, head_dim = kv_cache.shape
    vec = int(head_dim % PACK == 0 and _packable(k) and _packable(v) and kv_cache.data.ptr % 16 == 0
              and (head_dim * k.dtype.itemsize) % 16 == 0)
    _launch("cache_ops.cu", f"reshape_and_cache_{dtype_tag(k.dtype)}", (k.shape[0], 1, 1), (128, 1, 1),
            (k, v, kv_cache, slot_mapping, _i64(k_stride), _i64(v_stride), _i32(layer), _i32(num_layers),
             _i32(num_kv_heads), _i32(block_size), _i32(head_dim), _i32(vec)))


def copy_blocks(kv_cache, pairs):
    """Copy-on-write: kv_cache[dst] = kv_cache[src] for each (src, dst) pair, every layer, one launch.
    NOTE: no pair may read a block another pair of the same call writes (the block manager's pairs never do)."""
    cp = _require_cupy()
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
    words = block_bytes // 16
    _launch("cache_ops.cu", "copy_blocks_kernel", (len(pairs), min(64, math.ceil(words / 256)), 1), (256, 1, 1),
            (kv_cache, cp.asarray(pairs), _i64(words)))


def _host_or_device_ptr(arr) -> int:
    cp = _require_cupy()
    if isinstance(arr, cp.ndarray):
        return arr.data.ptr
    return arr.ctypes.data


def swap_blocks(src, dst, pairs, stream=None):
    """dst[d] = src[s] for each (s, d): device <-> pinned host, one async copy per run of consecutive
    blocks (block-major layout: a block is contiguous). On `stream` (the swap stream) the copies first
    wait for the work already queued on the current stream, so a swap-out reads finished blocks; the
    caller records an event on `stream` and the compute stream waits on it (record_event/wait_event)."""
    cp = _require_cupy()
    pairs = np.asarray(pairs, dtype=np.int64).reshape(-1, 2)
    if not len(pairs):
        return
    if tuple(src.shape[1:]) != tuple(dst.shape[1:]) or src.dtype.itemsize != dst.dtype.itemsize:
        raise ValueError(f"swap_blocks: block shapes differ: {tuple(src.shape)} {src.dtype} vs {tuple(dst.shape)} {dst.dtype}")
    if not (src.flags.c_contiguous and dst.flags.c_contiguous):
        raise ValueError("swap_blocks: both caches must be C-contiguous")
    if pairs[:, 0].min() < 0 or pairs[:, 0].max() >= src.shape[0] or pairs[:, 1].min() < 0 or pairs[:, 1].max() >= dst.shape[0]:
        raise ValueError("swap_blocks: block id out of range")
    block_bytes = int(np.prod(src.shape[1:])) * src.dtype.itemsize
    src_ptr, dst_ptr = _host_or_device_ptr(src), _host_or_device_ptr(dst)
    current = cp.cuda.get_current_stream()
    stream = stream or current
    if stream.ptr != current.ptr:
        stream.wait_event(current.record())
    for s, d, n in copy_runs(pairs):
        cp.cuda.runtime.memcpyAsync(dst_ptr + d * block_bytes, src_ptr + s * block_bytes, n * block_bytes,
                                    cp.cuda.runtime.memcpyDefault, stream.ptr)


def alloc_pinned(shape, dtype):
    """A NumPy array in page-locked host memory (the CPU swap pool): async copies need it."""
    _require_cupy()
    import cupyx
    return cupyx.empty_pinned(tuple(shape), dtype=np.dtype(dtype))


def swap_stream():
    """A dedicated non-blocking stream for swaps (it does not serialise with the legacy default stream)."""
    return _require_cupy().cuda.Stream(non_blocking=True)


def record_event(stream):
    event = _require_cupy().cuda.Event(disable_timing=True)
    event.record(stream)
    return event


def wait_event(event):
    """The current (compute) stream waits for `event` before the work queued after this call."""
    _require_cupy().cuda.get_current_stream().wait_event(event)


def free_device_memory() -> int:
    """Bytes the driver reports free. CuPy's pool keeps freed blocks, so after a profiling forward
    pass total - free is the peak the model needed (weights + activations + CUDA context)."""
    return int(_require_cupy().cuda.runtime.memGetInfo()[0])


def total_device_memory() -> int:
    return int(_require_cupy().cuda.runtime.memGetInfo()[1])


# --------------------------------------------------------------------------------------------
# Norms, rotary embedding, activations
# --------------------------------------------------------------------------------------------
def _rows(x):
    return int(np.prod(x.shape[:-1])) if x.ndim > 1 else 1


def rms_norm(x, weight, eps):
    """y = x / sqrt(mean(x^2) + eps) * weight, over the last axis (fp32 statistics)."""
    cp = _require_cupy()
    hidden = check_norm_args("rms_norm", x, weight)
    x = cp.ascontiguousarray(x)
    out = cp.empty_like(x)
    if x.size:
        _launch("norms.cu", f"rms_norm_{dtype_tag(x.dtype)}", (_rows(x), 1, 1), (norm_threads(hidden), 1, 1),
                (out, x, cp.ascontiguousarray(weight), _f32(eps), _i32(hidden)))
    return out


def fused_add_rms_norm(x, residual, weight, eps):
    """residual += x; x = rms_norm(residual). Both updated in place; returns (x, residual)."""
    hidden = check_norm_args("fused_add_rms_norm", x, weight)
    if x.shape != residual.shape or x.dtype != residual.dtype:
        raise ValueError(f"fused_add_rms_norm: x {tuple(x.shape)} {x.dtype} and residual {tuple(residual.shape)} {residual.dtype} differ")
    if not (x.flags.c_contiguous and residual.flags.c_contiguous):
        raise ValueError("fused_add_rms_norm: x and residual are updated in place and must be C-contiguous")
    if x.size:
        _launch("norms.cu", f"fused_add_rms_norm_{dtype_tag(x.dtype)}", (_rows(x), 1, 1), (norm_threads(hidden), 1, 1),
                (x, residual, _require_cupy().ascontiguousarray(weight), _f32(eps), _i32(hidden)))
    return x, residual


def layer_norm(x, weight, bias, eps):
    """y = (x - mean) / sqrt(var + eps) * weight + bias, over the last axis (weight/bias may be None)."""
    cp = _require_cupy()
    hidden = check_norm_args("layer_norm", x, weight, bias)
    x = cp.ascontiguousarray(x)
    out = cp.empty_like(x)
    if x.size:
        w = cp.ascontiguousarray(weight) if weight is not None else _NULL
        b = cp.ascontiguousarray(bias) if bias is not None else _NULL
        _launch("norms.cu", f"layer_norm_{dtype_tag(x.dtype)}", (_rows(x), 1, 1), (norm_threads(hidden), 1, 1),
                (out, x, w, b, _f32(eps), _i32(hidden)))
    return out


def rotary_embedding(positions, q, k, cos_sin_cache, is_neox):
    """Rotate the first rot_dim features of q [T, Hq, D] and k [T, Hk, D] in place (see cpu.py)."""
    cp = _require_cupy()
    positions = _on_device(positions, np.int64)
    q_stride, k_stride = check_rotary_args(positions, q, k, cos_sin_cache)
    if q.shape[0]:
        cache = cp.ascontiguousarray(cos_sin_cache)
        kname = f"rotary_{dtype_tag(q.dtype)}_{dtype_tag(cache.dtype)}"
        _launch("rotary.cu", kname, (q.shape[0], 1, 1), (128, 1, 1),
                (positions, q, k, cache, _i64(q_stride), _i64(k_stride), _i32(q.shape[1]), _i32(k.shape[1]),
                 _i32(q.shape[2]), _i32(cache.shape[1]), _i32(bool(is_neox))))
    return q, k


def _grid_1d(n: int) -> tuple[int, int, int]:
    return (max(1, min(65535, math.ceil(n / 256))), 1, 1)


def silu_and_mul(x):
    """x [..., 2I] -> silu(x[..., :I]) * x[..., I:]."""
    cp = _require_cupy()
    if x.shape[-1] % 2:
        raise ValueError(f"silu_and_mul: last dim {x.shape[-1]} must be even (gate and up halves)")
    x = cp.ascontiguousarray(x)
    inner = x.shape[-1] // 2
    out = cp.empty(x.shape[:-1] + (inner,), dtype=x.dtype)
    if out.size:
        _launch("activations.cu", f"silu_and_mul_{dtype_tag(x.dtype)}", _grid_1d(out.size), (256, 1, 1),
                (out, x, _i64(_rows(x)), _i32(inner)))
    return out


def _unary(x, op: int):
    cp = _require_cupy()
    x = cp.ascontiguousarray(x)
    out = cp.empty_like(x)
    if x.size:
        _launch("activations.cu", f"unary_{dtype_tag(x.dtype)}", _grid_1d(x.size), (256, 1, 1),
                (out, x, _i64(x.size), _i32(op)))
    return out


def gelu(x):
    """Exact GELU: x * Phi(x)."""
    return _unary(x, 0)


def gelu_tanh(x):
    """GELU, tanh approximation (gelu_new / gelu_pytorch_tanh)."""
    return _unary(x, 1)


def relu(x):
    return _unary(x, 2)


# --------------------------------------------------------------------------------------------
# Dense ops and memory
# --------------------------------------------------------------------------------------------
# cuBLAS enums (cublas_api.h / library_types.h)
_CUBLAS_OP_N, _CUBLAS_OP_T = 0, 1
_CUDA_R_32F, _CUDA_R_16F, _CUDA_R_16BF = 0, 2, 14
_CUBLAS_COMPUTE_32F = 68
_CUBLAS_GEMM_DEFAULT = -1


def _gemm_bf16(x2, weight, out):
    """out[T, O] = x2[T, I] @ weight[O, I]^T in bf16 with fp32 accumulation (cublasGemmEx).
    Column-major view: out^T [O, T] = weight (op T of the [I, O] col-major weight) @ x2^T."""
    cp = _require_cupy()
    from cupy_backends.cuda.libs import cublas
    handle = cp.cuda.device.get_cublas_handle()
    cublas.setStream(handle, cp.cuda.get_current_stream().ptr)
    one, zero = np.array(1.0, np.float32), np.array(0.0, np.float32)
    t, i = x2.shape
    o = weight.shape[0]
    cublas.gemmEx(handle, _CUBLAS_OP_T, _CUBLAS_OP_N, o, t, i, one.ctypes.data,
                  weight.data.ptr, _CUDA_R_16BF, i, x2.data.ptr, _CUDA_R_16BF, i,
                  zero.ctypes.data, out.data.ptr, _CUDA_R_16BF, o, _CUBLAS_COMPUTE_32F, _CUBLAS_GEMM_DEFAULT)


def linear(x, weight, bias=None):
    """x [..., in] @ weight[out, in]^T (+ bias) through cuBLAS, fp32 accumulation for every dtype.

    NOTE: x is flattened to 2-D first: CuPy's N-D matmul promotes float16 to float32, its 2-D dot
    calls cublasGemmEx with CUBLAS_COMPUTE_32F (fp16 in, fp32 accumulate, fp16 out). bfloat16 goes
    to cublasGemmEx directly with the same compute type.
    """
    cp = _require_cupy()
    if weight.ndim != 2 or x.shape[-1] != weight.shape[1]:
        raise ValueError(f"linear: x {tuple(x.shape)} does not match weight {tuple(weight.shape)} ([out, in])")
    if x.dtype != weight.dtype:
        raise ValueError(f"linear: x is {x.dtype} but weight is {weight.dtype}")
    lead = x.shape[:-1]
    x2 = cp.ascontiguousarray(x.reshape(-1, x.shape[-1]))
    if dtype_tag(x.dtype) == "bf16":
        weight = cp.ascontiguousarray(weight)
        y = cp.empty((x2.shape[0], weight.shape[0]), dtype=x.dtype)
        if y.size:
            _gemm_bf16(x2, weight, y)
    else:
        y = cp.dot(x2, weight.T)
    if bias is not None:
        y += bias
    return y.reshape(lead + (weight.shape[0],))


def embedding(token_ids, table):
    return table[_on_device(token_ids)]


def to_device(array, dtype=None):
    """Host (or device) array -> contiguous CuPy array, converted to `dtype` (bf16 rounded on the host)."""
    cp = _require_cupy()
    want = np.dtype(dtype) if dtype is not None else None
    if isinstance(array, cp.ndarray):
        return cp.ascontiguousarray(array if want is None or array.dtype == want else array.astype(want))
    array = np.asarray(array)
    if want is not None and want.name == "bfloat16" and array.dtype.name != "bfloat16":
        bits = float32_to_bfloat16_bits(array.astype(np.float32, copy=False))
        return cp.asarray(bits).view(want)
    return cp.asarray(np.ascontiguousarray(array, dtype=want))


def to_host(array):
    cp = _require_cupy()
    return cp.asnumpy(array) if isinstance(array, cp.ndarray) else np.asarray(array)


def synchronize():
    _require_cupy().cuda.Device().synchronize()


def bfloat16_supported() -> bool:
    """ml_dtypes is importable and this CuPy can hold a bfloat16 array."""
    if BFLOAT16 is None or cupy is None:
        return False
    try:
        cupy.empty((1,), dtype=BFLOAT16)
        return True
    except Exception:
        return False


def resolve_dtype(dtype, torch_dtype=None):
    """'auto' (from the checkpoint's torch_dtype), 'float16', 'bfloat16' or 'float32' -> a NumPy dtype."""
    name_ = resolve_dtype_name(dtype, torch_dtype, bf16_ok=bfloat16_supported())
    return BFLOAT16 if name_ == "bfloat16" else np.dtype(name_)
