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

from rawpaged.backend.cuda.kernels import (DECODE_FAST_HEAD_DIMS, DECODE_MMA_CHUNK, DECODE_MMA_HEAD_DIMS,
                                           DECODE_MMA_ROWS, DTYPE_TAGS, GROUP_TILES, MAX_HEAD_DIM, NUM_THREADS,
                                           NUM_WARPS, PACK, PAGED_DECODE, PAGED_DECODE_MMA, PAGED_DECODE_REDUCE,
                                           PAGED_PREFILL, PAGED_VARLEN, PREFILL_BM, PREFILL_GROUP_TILES,
                                           PREFILL_MMA_HEAD_DIMS, decode_mma_shared, decode_mma_stages,
                                           prefill_shared)
from rawpaged.errors import RawpagedError

# Split-K decode: each sequence's keys are cut into num_partitions equal shares, each a multiple of
# PARTITION_SIZE tokens (and at least that), and a reduce kernel merges them. `split_k_policy`:
# "auto" chooses the count from the occupancy (decode_partitions), "always" splits in at least
# two, "never" does not split. `decode_policy`: "auto" takes the tensor-core kernel for groups of
# MMA_MIN_GROUP and more (fp16/bf16 at the compiled head sizes), "mma" whenever it exists, "simt"
# never (the CUDA-core kernel; for benchmarks and tests).
# NOTE: these are read at call time; `rawpaged.backend.cuda.split_k_policy = ...` sets them here.
PARTITION_SIZE = 64
MAX_PARTITIONS = 128
MMA_MIN_GROUP = 4
split_k_policy = "auto"        # "auto" | "always" | "never"
decode_policy = "auto"         # "auto" | "mma" | "simt"
prefill_policy = "auto"        # "auto" | "mma" | "varlen"

# Bytes a decode kernel should keep in flight per SM: Little's law at ~4.3 TB/s device bandwidth
# and ~600-800 ns loaded DRAM latency is 23-26 KB per SM on the H200's 132 SMs; 32 KB leaves margin
# for the latency growing under load (kernels_cuda/paged_attention.cu, its header).
INFLIGHT_PER_SM = 32 * 1024
ASSUMED_REGISTERS = 128        # a kernel whose register count is unknown (the host emulation reports 0)


@dataclass(frozen=True)
class Launch:
    """One kernel launch: which kernel, its geometry, and for split-K the reduce that follows."""
    kernel: str
    grid: tuple[int, int, int]
    block: tuple[int, int, int]
    shared_mem: int
    use_split_k: bool = False
    num_partitions: int = 1
    partition_align: int = PARTITION_SIZE
    reduce_kernel: str | None = None
    reduce_grid: tuple[int, int, int] | None = None
    reduce_shared_mem: int = 0
    group_tile: int = 0            # query heads of a group per block (prefill: the kernel's group_tile)
    blocks_per_sm: int = 0         # decode: the occupancy its partitions were planned with


@dataclass(frozen=True)
class DeviceLimits:
    """Per-SM limits occupancy is computed from (defaults: H100/H200, compute capability 9.0)."""
    shared_per_sm: int = 228 * 1024
    registers_per_sm: int = 65536
    threads_per_sm: int = 2048
    blocks_per_sm: int = 32
    reserved_shared_per_block: int = 1024


# --------------------------------------------------------------------------------------------
# Occupancy and split-K partitions
# --------------------------------------------------------------------------------------------
def resident_blocks(num_regs: int, static_shared: int, dynamic_shared: int, threads: int,
                  limits: DeviceLimits = DeviceLimits()) -> int:
    """Resident blocks per SM of a kernel, from its registers per thread and shared memory (what
    cudaOccupancyMaxActiveBlocksPerMultiprocessor computes): registers are allocated per warp in
    units of 256 (8 per thread), each block also reserves `reserved_shared_per_block` bytes.
    num_regs 0 (unknown) counts as ASSUMED_REGISTERS."""
    warps = -(-threads // 32)
    regs_per_warp = -(-(num_regs or ASSUMED_REGISTERS) * 32 // 256) * 256
    by_regs = limits.registers_per_sm // regs_per_warp // warps
    by_threads = limits.threads_per_sm // (warps * 32)
    by_shared = limits.shared_per_sm // (static_shared + dynamic_shared + limits.reserved_shared_per_block)
    return max(0, min(by_regs, by_threads, by_shared, limits.blocks_per_sm))


def decode_inflight_bytes(mma: bool, head_dim: int, gt: int, itemsize: int) -> int:
    """K/V bytes one decode block keeps in flight (kernels_cuda/paged_attention.cu says how):
    tensor cores: 4 warps x (stages - 1) chunks of 16 K and 16 V rows; CUDA cores: 4 warps x 32
    lanes x VPL K and VPL V loads of 8 elements, on the lanes a row's packs use."""
    if mma:
        return NUM_WARPS * (decode_mma_stages(head_dim) - 1) * 2 * DECODE_MMA_CHUNK * head_dim * itemsize
    weight = (2 if itemsize == 4 else 1) * gt
    vpl = 2 if weight >= 8 else (4 if weight >= 4 else 8)
    nv = max(1, head_dim // PACK)
    nvp = 1 << (nv - 1).bit_length()
    return NUM_WARPS * 32 * nv // nvp * 2 * vpl * PACK * itemsize


def decode_partitions(base_blocks: int, span: int, num_sms: int, occupancy: int, inflight: int,
                      policy: str = "auto", align: int | None = None) -> int:
    """Split-K partitions for a decode grid of `base_blocks` blocks (KV heads x head tiles x
    sequences) whose longest key span is `span` tokens.

    auto: none (1) when the plain grid already puts enough blocks on every SM to keep
    INFLIGHT_PER_SM bytes in flight (`inflight` per block, at most `occupancy` blocks per SM);
    otherwise enough to fill every resident slot (num_sms x occupancy), so batch 1 with 8 KV heads
    runs on the whole GPU. Never more than ceil(span / align) (partitions of at least `align`
    tokens) nor MAX_PARTITIONS. always: at least 2. never: 1."""
    if policy not in ("auto", "always", "never"):
        raise ValueError(f"split_k_policy must be auto, always or never, got {policy!r}")
    if policy == "never":
        return 1
    align = align or PARTITION_SIZE
    most = max(1, min(MAX_PARTITIONS, -(-span // align)))
    occupancy = max(1, occupancy)
    needed = min(occupancy, -(-INFLIGHT_PER_SM // max(1, inflight)))
    if base_blocks >= needed * num_sms:
        parts = 1
    else:
        parts = min(most, -(-occupancy * num_sms // max(1, base_blocks)))
        share = partition_tokens(span, align, parts)
        parts = max(1, -(-span // share))                  # no trailing partition left empty
    return max(2, parts) if policy == "always" else parts


def partition_tokens(span: int, align: int, parts: int) -> int:
    """Tokens per partition when a span of `span` keys is cut into `parts` (the kernels' rule)."""
    share = -(-span // parts)
    return max(align, -(-share // align) * align)


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
    """Query heads one CUDA-core decode block handles: the group rounded up to a power of two, at
    most 8 (a group of 3 is one tile of 4 with a masked head; 12 is two tiles of 8, the second half
    masked), so every head of a tile shares each K/V row the block reads."""
    return min(GROUP_TILES[-1], 1 << max(0, group - 1).bit_length())


def use_mma_decode(tag: str, head_dim: int, group: int, policy: str | None = None) -> bool:
    """The tensor-core decode kernel: fp16/bf16 at its compiled head sizes, for groups of
    MMA_MIN_GROUP and more (auto), always where it exists (mma), never (simt)."""
    policy = policy or decode_policy
    if policy not in ("auto", "mma", "simt"):
        raise ValueError(f"decode_policy must be auto, mma or simt, got {policy!r}")
    ok = tag != "f32" and head_dim in DECODE_MMA_HEAD_DIMS
    if policy == "mma" and not ok:
        raise ValueError(f"the tensor-core decode kernel needs fp16/bf16 and head_dim in {DECODE_MMA_HEAD_DIMS}")
    return ok and (policy == "mma" or (policy == "auto" and group >= MMA_MIN_GROUP))


def decode_kernel_name(tag: str, head_dim: int, gt: int) -> str:
    """The CUDA-core kernel: the compile-time head size where one is instantiated (16-bit types),
    else the generic path."""
    hd = head_dim if (head_dim in DECODE_FAST_HEAD_DIMS and tag != "f32") else 0
    return PAGED_DECODE.kernel_name(T=tag, HD=hd, GT=gt)


def select_decode_kernel(head_dim, dtype, block_size, num_seqs, num_heads, num_kv_heads, max_seq_len,
                         num_sms, policy=None, partition_size=None, sliding_window=0, *, blocks_per_sm=None,
                         num_partitions=None, max_model_len=None, decode_policy=None) -> Launch:
    """Decode (one query token per sequence): one block per (KV head, tile of its group's query
    heads, sequence[, partition]); the tile is 16 heads on tensor cores, group_tile(group) on CUDA
    cores, and the group's last tile masks the heads past its end (any group size, odd ones too).

    Split-K (`policy`, default split_k_policy): the partition count comes from decode_partitions
    with the kernel's occupancy, `blocks_per_sm`: an int, or a callable (kernel name, dynamic shared
    bytes) -> int that reads the compiled kernel's registers on the device (ops.py passes
    launch.occupancy); None estimates it from the shared memory with ASSUMED_REGISTERS.
    For a CUDA graph the grid must not depend on the step: `max_model_len` plans the partitions for
    that length instead of max_seq_len (the same count every step), `num_partitions` fixes it.
    With a sliding window W a query reads at most W keys: the span is min(length, W)."""
    check_attention_shape(head_dim, block_size, num_heads, num_kv_heads)
    if head_dim % PACK:
        raise ValueError(f"paged decode kernel needs head_dim % {PACK} == 0, got {head_dim} (use the varlen kernel)")
    tag = dtype_tag(dtype)
    group = num_heads // num_kv_heads
    mma = use_mma_decode(tag, head_dim, group, decode_policy)
    if mma:
        tile, kernel, shared = DECODE_MMA_ROWS, PAGED_DECODE_MMA.kernel_name(T=tag, HD=head_dim), decode_mma_shared(head_dim)
    else:
        tile = group_tile(group)
        kernel = decode_kernel_name(tag, head_dim, tile)
        shared = (NUM_WARPS * tile * head_dim + 2 * NUM_WARPS * tile) * 4
    heads_grid = num_kv_heads * -(-group // tile)
    align = partition_size or PARTITION_SIZE
    if callable(blocks_per_sm):
        occupancy = blocks_per_sm(kernel, shared)
    elif blocks_per_sm is None:
        occupancy = resident_blocks(0, 0, shared, NUM_THREADS)
    else:
        occupancy = int(blocks_per_sm)
    length = max_model_len or max_seq_len
    span = min(length, sliding_window) if sliding_window else length
    if num_partitions is not None:
        if int(num_partitions) < 1:
            raise ValueError(f"num_partitions must be >= 1, got {num_partitions}")
        parts = int(num_partitions)
    else:
        itemsize = 4 if tag == "f32" else 2
        parts = decode_partitions(heads_grid * num_seqs, span, num_sms, occupancy,
                                  decode_inflight_bytes(mma, head_dim, tile, itemsize), policy or split_k_policy, align)
    if parts <= 1:
        return Launch(kernel, (heads_grid, num_seqs, 1), (NUM_THREADS, 1, 1), shared, partition_align=align,
                      blocks_per_sm=occupancy)
    return Launch(kernel, (heads_grid, num_seqs, parts), (NUM_THREADS, 1, 1), shared,
                  use_split_k=True, num_partitions=parts, partition_align=align,
                  reduce_kernel=PAGED_DECODE_REDUCE.kernel_name(T=tag), reduce_grid=(num_heads, num_seqs, 1),
                  reduce_shared_mem=parts * 4, blocks_per_sm=occupancy)


def prefill_group_tile(group: int, max_query_len: int) -> int:
    """Query heads of a group per prefill block (1, 2 or 4; a block holds 64 / that tokens): the
    choice with the fewest blocks, i.e. the fewest gathers of each K/V tile; then the fewest masked
    heads (a tile past the group's end); then the most heads. Long prompts: any tile dividing the
    group gathers alike; short chunks and decode rows in a mixed batch: 4 heads x 16 tokens instead
    of 64 mostly empty rows per head."""
    def cost(gh: int) -> tuple:
        tiles = -(-group // gh)
        return -(-max_query_len // (PREFILL_BM // gh)) * tiles, tiles * gh - group, -gh
    return min(PREFILL_GROUP_TILES, key=cost)


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
        gh = prefill_group_tile(num_heads // num_kv_heads, max_query_len)
        head_tiles = -(-(num_heads // num_kv_heads) // gh)
        return Launch(PAGED_PREFILL.kernel_name(T=tag, HD=head_dim),
                      (math.ceil(max_query_len / (PREFILL_BM // gh)), num_kv_heads * head_tiles, num_seqs),
                      (NUM_THREADS, 1, 1), prefill_shared(head_dim), group_tile=gh)
    return Launch(PAGED_VARLEN.kernel_name(T=tag), (num_tokens, math.ceil(num_heads / NUM_WARPS), 1),
                  (NUM_THREADS, 1, 1), 0)


def select_attention_kernel(head_dim, dtype, block_size, num_seqs, max_seq_len, num_sms, *, num_heads,
                            num_kv_heads, max_query_len=1, num_tokens=None, sliding_window=0, blocks_per_sm=None,
                            max_model_len=None, num_partitions=None) -> Launch:
    """The decode kernel when every sequence brings one token, else the varlen prefill kernel."""
    if max_query_len <= 1 and head_dim % PACK == 0:
        return select_decode_kernel(head_dim, dtype, block_size, num_seqs, num_heads, num_kv_heads,
                                    max_seq_len, num_sms, sliding_window=sliding_window, blocks_per_sm=blocks_per_sm,
                                    max_model_len=max_model_len, num_partitions=num_partitions)
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
