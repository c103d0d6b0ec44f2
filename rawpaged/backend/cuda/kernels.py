"""The one table of CUDA kernels: names, instantiations, parameter lists and argument builders.

Every extern "C" kernel the backend launches is described here, once, as a `Family` (one C++
template in kernels_cuda/*.cu, its parameter list and its instantiations; spec.py says what a
Family, a Kernel and a Param are). From this table:
  - `program(source, tag)` is the text NVRTC compiles: the .cu file (headers pasted in) followed by
    one generated `__global__` wrapper per instantiation,
        extern "C" __global__ void __launch_bounds__(128) paged_decode_f16_hd128_g4(<parameters>) {
            static_assert(rp_same_type<decltype(&paged_decode_impl<f16, 128, 4>), void (*)(<types>)>::value, ...);
            paged_decode_impl<f16, 128, 4>(<parameter names>);
        }
    so the .cu files hold templates only, and a template whose parameter list drifts from the table
    is a compile error (the static_assert), never a misread argument on the device;
  - the dispatcher names kernels through `Family.kernel(...)`: asking for an instantiation that does
    not exist is a ValueError before anything compiles;
  - the argument builders at the end turn an op's inputs into the typed tuple CuPy passes, in the
    table's order (`Kernel.args` takes every parameter by name: pointers must be arrays of the
    parameter's dtype, or NULL where the table allows it; ints are range-checked into np.int32 /
    np.int64; floats become np.float32);
  - tests/test_cuda_build.py compiles every program with nvcc and compares each builder's tuple with
    the parameter list nvcc compiled (PTX .param widths and the front end's C types).

NOTE: why generated extern "C" wrappers and not `__global__` templates fetched through
`cupy.RawModule(name_expressions=...)`: CuPy skips its on-disk kernel cache whenever name
expressions are given (it recompiles to learn the mangled names), so every process start would
recompile the attention kernels; with plain extern "C" names the cache keeps working, the names in
a profiler stay short, and the host emulation finds the kernels with dlsym.

Pure Python: importing this needs neither CuPy nor a device.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

from kernels_cuda import SOURCES, read_source
from rawpaged.backend.cuda.spec import NULL, TAG_CTYPES, Family, Kernel, Param, parse_params  # noqa: F401

# --------------------------------------------------------------------------------------------
# What the kernels support (paged_attention.cu's constants are checked against these: see program)
# --------------------------------------------------------------------------------------------
DTYPE_TAGS = {"float16": "f16", "bfloat16": "bf16", "float32": "f32"}
MAX_HEAD_DIM = 256
DECODE_FAST_HEAD_DIMS = (64, 80, 96, 128, 256)     # compile-time head size; others use the "any" path
DECODE_MMA_HEAD_DIMS = DECODE_FAST_HEAD_DIMS       # tensor-core decode (fp16/bf16)
PREFILL_MMA_HEAD_DIMS = (64, 80, 96, 128, 256)     # tensor-core prefill (fp16/bf16)
GROUP_TILES = (1, 2, 4, 8)                         # query heads per CUDA-core decode block (GQA)
DECODE_MMA_ROWS = 16                               # query heads per tensor-core decode block (the mma's M)
DECODE_MMA_CHUNK = 16                              # tokens per warp step of the tensor-core decode
PREFILL_GROUP_TILES = (1, 2, 4)                    # query heads of a group per prefill block
NUM_THREADS = 128                                  # every attention kernel: 4 warps
NUM_WARPS = 4
PACK = 8                                           # elements per 16-byte lane load
PREFILL_BM = 64                                    # query rows (token x head pairs) per prefill block


def decode_mma_stages(head_dim: int) -> int:
    """cp.async stages per warp of the tensor-core decode (DecodeMmaShape<HD>::STAGES)."""
    return 3 if head_dim <= 128 else 2


def decode_mma_shared(head_dim: int) -> int:
    """Dynamic shared memory of paged_decode_mma_*_hd<head_dim> (DecodeMmaShape<HD>::SMEM_BYTES):
    each warp's ring of K/V chunk buffers, 16 rows of head_dim + 8 (padded) each, and Q's tile
    where it is not kept in registers (head size 256)."""
    stride = head_dim + 8
    pipe = NUM_WARPS * decode_mma_stages(head_dim) * 2 * DECODE_MMA_CHUNK * stride
    q_tile = 0 if head_dim <= 128 else DECODE_MMA_ROWS * stride
    return (pipe + q_tile) * 2


def prefill_bn(head_dim: int) -> int:
    """Keys per tile of the tensor-core prefill (PrefillShape<HD>::BN)."""
    return 64 if head_dim <= 64 else 32


def prefill_shared(head_dim: int) -> int:
    """Dynamic shared memory of paged_prefill_*_hd<head_dim> (PrefillShape<HD>::SMEM_BYTES): two
    stages of K and V tiles, and the warps' Q tiles where Q is not kept in registers (256)."""
    stride = head_dim + 8
    q_tiles = 0 if head_dim <= 128 else NUM_WARPS * 16 * stride
    return (2 * 2 * prefill_bn(head_dim) * stride + q_tiles) * 2


# Constants a source defines that the Python side relies on: the program static_asserts each.
SOURCE_CONSTANTS = {
    "paged_attention.cu": {"NUM_THREADS": NUM_THREADS, "NUM_WARPS": NUM_WARPS, "PACK": PACK, "PF_BM": PREFILL_BM,
                           "DM_ROWS": DECODE_MMA_ROWS, "DM_CHUNK": DECODE_MMA_CHUNK,
                           **{f"DecodeMmaShape<{hd}>::SMEM_BYTES": decode_mma_shared(hd) for hd in DECODE_MMA_HEAD_DIMS},
                           **{f"PrefillShape<{hd}>::BN": prefill_bn(hd) for hd in PREFILL_MMA_HEAD_DIMS},
                           **{f"PrefillShape<{hd}>::SMEM_BYTES": prefill_shared(hd) for hd in PREFILL_MMA_HEAD_DIMS}},
}

# --------------------------------------------------------------------------------------------
# The table
# --------------------------------------------------------------------------------------------
TAGS = ("f16", "bf16", "f32")
HALF_TAGS = ("f16", "bf16")

# paged_attention.cu. Decode on CUDA cores: compile-time head sizes for the 16-bit types, the
# generic ("any" = 0) path for every dtype; each for every group tile. Decode on tensor cores: the
# 16-bit types at the compile-time head sizes; same parameters (decode_args fills both).
_DECODE_PARAMS = parse_params(
    "T* out, float* part_out, float* part_max, float* part_sum, const T* q, long long q_stride, "
    "const T* kv_cache, const int* block_tables, const int* seq_lens, const int* query_start_loc, "
    "int layer, int num_layers, int num_heads, int num_kv_heads, int block_size, "
    "int max_blocks_per_seq, int head_dim, int partition_align, int num_partitions, int sliding_window, "
    "float scale",
    nullable=("part_out", "part_max", "part_sum"))

PAGED_DECODE = Family(
    "paged_decode", "paged_attention.cu", "paged_decode_impl", ("T", "HD", "GT"), "paged_decode_{T}_hd{HD}_g{GT}",
    _DECODE_PARAMS,
    tuple((t, hd, gt) for t in TAGS for hd in (0,) + (DECODE_FAST_HEAD_DIMS if t != "f32" else ())
          for gt in GROUP_TILES),
    NUM_THREADS, per_dtype=True)

PAGED_DECODE_MMA = Family(
    "paged_decode_mma", "paged_attention.cu", "paged_decode_mma_impl", ("T", "HD"), "paged_decode_mma_{T}_hd{HD}",
    _DECODE_PARAMS, tuple((t, hd) for t in HALF_TAGS for hd in DECODE_MMA_HEAD_DIMS), NUM_THREADS, per_dtype=True)

PAGED_DECODE_REDUCE = Family(
    "paged_decode_reduce", "paged_attention.cu", "paged_decode_reduce_impl", ("T",), "paged_decode_reduce_{T}",
    parse_params("T* out, const float* part_out, const float* part_max, const float* part_sum, "
                 "const int* seq_lens, const int* query_start_loc, int num_heads, int head_dim, "
                 "int partition_align, int num_partitions, int sliding_window"),
    tuple((t,) for t in TAGS), NUM_THREADS, per_dtype=True)

PAGED_PREFILL = Family(
    "paged_prefill", "paged_attention.cu", "paged_prefill_impl", ("T", "HD"), "paged_prefill_{T}_hd{HD}",
    parse_params("T* out, const T* q, long long q_stride, const T* kv_cache, const int* block_tables, "
                 "const int* seq_lens, const int* query_start_loc, int layer, int num_layers, int num_heads, "
                 "int num_kv_heads, int block_size, int max_blocks_per_seq, int group_tile, int sliding_window, "
                 "float scale"),
    tuple((t, hd) for t in HALF_TAGS for hd in PREFILL_MMA_HEAD_DIMS), NUM_THREADS, per_dtype=True,
    # NOTE: with a bare __launch_bounds__(128) ptxas capped hd80 at 128 registers and spilled 8 bytes
    # on sm_80 (nvcc 13.0); naming 2 resident blocks (any count up to 255 registers allows it) lifts
    # the cap: 136 registers, no spill.
    min_blocks=2)

PAGED_VARLEN = Family(
    "paged_varlen", "paged_attention.cu", "paged_varlen_impl", ("T",), "paged_varlen_{T}",
    parse_params("T* out, const T* q, long long q_stride, const T* kv_cache, const int* block_tables, "
                 "const int* seq_lens, const int* query_start_loc, int num_seqs, int layer, int num_layers, "
                 "int num_heads, int num_kv_heads, int block_size, int max_blocks_per_seq, int head_dim, int sliding_window, "
                 "float scale"),
    tuple((t,) for t in TAGS), NUM_THREADS, per_dtype=True)

# cache_ops.cu
RESHAPE_AND_CACHE = Family(
    "reshape_and_cache", "cache_ops.cu", "reshape_and_cache_impl", ("T",), "reshape_and_cache_{T}",
    parse_params("const T* k, const T* v, T* kv_cache, const long long* slot_mapping, long long k_stride, "
                 "long long v_stride, int layer, int num_layers, int num_kv_heads, int block_size, int head_dim, int vec"),
    tuple((t,) for t in TAGS), 128)

COPY_BLOCKS = Family(
    "copy_blocks", "cache_ops.cu", "copy_blocks_impl", (), "copy_blocks_kernel",
    parse_params("uint4* cache, const long long* pairs, long long block_words"), ((),), 256)

# norms.cu: one block per row, up to 1024 threads (norm_threads)
RMS_NORM = Family(
    "rms_norm", "norms.cu", "rms_norm_impl", ("T",), "rms_norm_{T}",
    parse_params("T* out, const T* x, const T* weight, float eps, int hidden"), tuple((t,) for t in TAGS), 1024)

FUSED_ADD_RMS_NORM = Family(
    "fused_add_rms_norm", "norms.cu", "fused_add_rms_norm_impl", ("T",), "fused_add_rms_norm_{T}",
    parse_params("T* x, T* residual, const T* weight, float eps, int hidden"), tuple((t,) for t in TAGS), 1024)

LAYER_NORM = Family(
    "layer_norm", "norms.cu", "layer_norm_impl", ("T",), "layer_norm_{T}",
    parse_params("T* out, const T* x, const T* weight, const T* bias, float eps, int hidden",
                 nullable=("weight", "bias")),
    tuple((t,) for t in TAGS), 1024)

# rotary.cu: the cos/sin table is fp32 or the model dtype
ROTARY = Family(
    "rotary", "rotary.cu", "rotary_impl", ("T", "C"), "rotary_{T}_{C}",
    parse_params("const long long* positions, T* q, T* k, const C* cos_sin, long long q_stride, long long k_stride, "
                 "int num_q_heads, int num_k_heads, int head_dim, int rot, int is_neox"),
    (("f16", "f32"), ("f16", "f16"), ("bf16", "f32"), ("bf16", "bf16"), ("f32", "f32")), 256)

# activations.cu: grid-stride loops of 256 threads
SILU_AND_MUL = Family(
    "silu_and_mul", "activations.cu", "silu_and_mul_impl", ("T",), "silu_and_mul_{T}",
    parse_params("T* out, const T* x, long long rows, int inner"), tuple((t,) for t in TAGS), 256)

GELU_TANH_AND_MUL = Family(
    "gelu_tanh_and_mul", "activations.cu", "gelu_tanh_and_mul_impl", ("T",), "gelu_tanh_and_mul_{T}",
    parse_params("T* out, const T* x, long long rows, int inner"), tuple((t,) for t in TAGS), 256)

UNARY = Family(
    "unary", "activations.cu", "unary_impl", ("T",), "unary_{T}",
    parse_params("T* out, const T* x, long long n, int op"), tuple((t,) for t in TAGS), 256)

# The families that read q with 16-byte (or 4-byte fragment) loads: ops.py copies a q whose rows are not aligned.
VECTOR_Q_FAMILIES = (PAGED_DECODE, PAGED_DECODE_MMA, PAGED_PREFILL)

# fused_ops.cu (issue 13): rotary + cache write in one launch; residual add + LayerNorm
ROTARY_CACHE = Family(
    "rotary_cache", "fused_ops.cu", "rotary_cache_impl", ("T", "C"), "rotary_cache_{T}_{C}",
    parse_params("const long long* positions, T* q, const T* k, const T* v, T* kv_cache, const long long* slot_mapping, "
                 "const C* cos_sin, long long q_stride, long long k_stride, long long v_stride, int num_q_heads, "
                 "int num_kv_heads, int head_dim, int rot, int is_neox, int layer, int num_layers, int block_size"),
    ROTARY.instances, 256)

FUSED_ADD_LAYER_NORM = Family(
    "fused_add_layer_norm", "fused_ops.cu", "fused_add_layer_norm_impl", ("T",), "fused_add_layer_norm_{T}",
    parse_params("T* x, T* residual, const T* weight, const T* bias, float eps, int hidden",
                 nullable=("weight", "bias")),
    tuple((t,) for t in TAGS), 1024)

FAMILIES = (PAGED_DECODE, PAGED_DECODE_MMA, PAGED_DECODE_REDUCE, PAGED_PREFILL, PAGED_VARLEN, RESHAPE_AND_CACHE,
            COPY_BLOCKS, RMS_NORM, FUSED_ADD_RMS_NORM, LAYER_NORM, ROTARY, SILU_AND_MUL, GELU_TANH_AND_MUL, UNARY,
            ROTARY_CACHE, FUSED_ADD_LAYER_NORM)
KERNELS: dict[str, Kernel] = {k.name: k for f in FAMILIES for k in f.kernels.values()}
if len(KERNELS) != sum(len(f.kernels) for f in FAMILIES) or {f.source for f in FAMILIES} != set(SOURCES) or any(
        f.per_dtype != g.per_dtype for f in FAMILIES for g in FAMILIES if f.source == g.source):
    raise ValueError("the kernel table names two instantiations alike, leaves a kernels_cuda source without "
                     "kernels, or compiles one source both per dtype and whole")


def kernel(name: str) -> Kernel:
    try:
        return KERNELS[name]
    except KeyError:
        raise ValueError(f"no CUDA kernel named {name!r} in the table") from None


def all_kernel_names() -> dict[str, list[str]]:
    """Every extern "C" kernel of each source file (the build test checks nvcc compiled each)."""
    return {s: [k.name for k in KERNELS.values() if k.source == s] for s in SOURCES}


@functools.lru_cache(maxsize=None)
def program(source: str, tag: str = "") -> str:
    """What NVRTC compiles for `source`: its text and the generated entry points (for dtype `tag`
    only, where the source is compiled per dtype; '' = every instantiation)."""
    chosen = [k for k in KERNELS.values() if k.source == source and (not tag or not k.tag or k.tag == tag)]
    if not chosen:
        raise ValueError(f"no kernels of {source!r} for dtype {tag!r}")
    lines = [read_source(source), "",
             "// ==== generated by rawpaged/backend/cuda/kernels.py: constants and entry points ====="]
    for const, value in SOURCE_CONSTANTS.get(source, {}).items():
        lines.append(f'static_assert({const} == {value}, "{const} in {source} differs from rawpaged/backend/cuda/kernels.py");')
    lines += [k.wrapper() for k in chosen]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Argument builders: one per launch kind. Each takes the op's (already checked) inputs and returns
# the kernel's exact argument tuple; sizes are read from the arrays' shapes.
# --------------------------------------------------------------------------------------------
@dataclass(slots=True)
class AttentionBatch:
    """What every attention kernel reads: q [T, H, D] (token stride q_stride), the 6-D kv_cache, the
    int32 block_tables [S, B] / seq_lens [S] / query_start_loc [S+1], the layer and the softmax scale."""
    q: object
    q_stride: int
    kv_cache: object
    layer: int
    block_tables: object
    seq_lens: object
    query_start_loc: object
    scale: float
    sliding_window: int = 0            # 0: none; W: the last W positions

    def arrays(self) -> dict:
        return dict(q=self.q, q_stride=self.q_stride, kv_cache=self.kv_cache, block_tables=self.block_tables,
                    seq_lens=self.seq_lens, query_start_loc=self.query_start_loc)

    def sizes(self) -> dict:
        """layer, num_layers, num_heads, num_kv_heads, block_size, max_blocks_per_seq."""
        _, num_layers, _, num_kv_heads, block_size, _ = self.kv_cache.shape
        return dict(layer=self.layer, num_layers=num_layers, num_heads=self.q.shape[1], num_kv_heads=num_kv_heads,
                    block_size=block_size, max_blocks_per_seq=self.block_tables.shape[1])


def _expect(k: Kernel, family, batch: AttentionBatch | None = None) -> None:
    families = family if isinstance(family, tuple) else (family,)
    if k.family not in families:
        raise TypeError(f"{k.name} is a {k.family.name} kernel, not {' or '.join(f.name for f in families)}")
    # NOTE: a compile-time head size (HD > 0) is the only one the kernel reads: another q would be misread.
    if batch is not None and k.template_args.get("HD") and k.template_args["HD"] != batch.q.shape[2]:
        raise ValueError(f"{k.name} is compiled for head_dim {k.template_args['HD']}, q has {batch.q.shape[2]}")


def decode_args(k: Kernel, out, batch: AttentionBatch, plan, scratch=None) -> tuple:
    """paged_decode_* and paged_decode_mma_*: `plan` (dispatch.Launch) gives the partitions; `scratch` =
    (part_out, part_max, part_sum) fp32 arrays for split-K, None otherwise."""
    _expect(k, (PAGED_DECODE, PAGED_DECODE_MMA), batch)
    part_out, part_max, part_sum = scratch if scratch is not None else (NULL, NULL, NULL)
    return k.args(out=out, part_out=part_out, part_max=part_max, part_sum=part_sum, **batch.arrays(),
                  **batch.sizes(), head_dim=batch.q.shape[2], partition_align=plan.partition_align,
                  num_partitions=plan.num_partitions, sliding_window=batch.sliding_window, scale=batch.scale)


def decode_reduce_args(k: Kernel, out, batch: AttentionBatch, plan, scratch) -> tuple:
    """paged_decode_reduce_*: merges the split-K partitions of decode_args' scratch into out."""
    _expect(k, PAGED_DECODE_REDUCE)
    part_out, part_max, part_sum = scratch
    return k.args(out=out, part_out=part_out, part_max=part_max, part_sum=part_sum, seq_lens=batch.seq_lens,
                  query_start_loc=batch.query_start_loc, num_heads=batch.q.shape[1], head_dim=batch.q.shape[2],
                  partition_align=plan.partition_align, num_partitions=plan.num_partitions,
                  sliding_window=batch.sliding_window)


def prefill_args(k: Kernel, out, batch: AttentionBatch, group_tile: int) -> tuple:
    """paged_prefill_* (tensor cores; the head size is the template's; group_tile query heads of a
    group per block, as the dispatcher chose for the grid)."""
    _expect(k, PAGED_PREFILL, batch)
    return k.args(out=out, **batch.arrays(), **batch.sizes(), group_tile=group_tile,
                  sliding_window=batch.sliding_window, scale=batch.scale)


def varlen_args(k: Kernel, out, batch: AttentionBatch) -> tuple:
    """paged_varlen_* (one warp per token and head)."""
    _expect(k, PAGED_VARLEN)
    return k.args(out=out, **batch.arrays(), num_seqs=batch.seq_lens.shape[0], **batch.sizes(),
                  head_dim=batch.q.shape[2], sliding_window=batch.sliding_window, scale=batch.scale)


def reshape_and_cache_args(k: Kernel, key, value, kv_cache, layer, slot_mapping, k_stride, v_stride, vec) -> tuple:
    """reshape_and_cache_*: key/value [T, Hkv, D] with token strides k_stride/v_stride; vec: 16-byte moves."""
    _expect(k, RESHAPE_AND_CACHE)
    _, num_layers, _, num_kv_heads, block_size, head_dim = kv_cache.shape
    return k.args(k=key, v=value, kv_cache=kv_cache, slot_mapping=slot_mapping, k_stride=k_stride, v_stride=v_stride,
                  layer=layer, num_layers=num_layers, num_kv_heads=num_kv_heads, block_size=block_size,
                  head_dim=head_dim, vec=int(bool(vec)))


def copy_blocks_args(k: Kernel, kv_cache, pairs) -> tuple:
    """copy_blocks_kernel: pairs int64 [N, 2]; a block is moved as 16-byte words."""
    _expect(k, COPY_BLOCKS)
    return k.args(cache=kv_cache, pairs=pairs, block_words=kv_cache[0].nbytes // 16)


def rows(x) -> int:
    """Rows of x [..., n]: the product of its leading dims (1 for a vector)."""
    return int(np.prod(x.shape[:-1])) if x.ndim > 1 else 1


def rms_norm_args(k: Kernel, out, x, weight, eps) -> tuple:
    _expect(k, RMS_NORM)
    return k.args(out=out, x=x, weight=weight, eps=eps, hidden=x.shape[-1])


def fused_add_rms_norm_args(k: Kernel, x, residual, weight, eps) -> tuple:
    _expect(k, FUSED_ADD_RMS_NORM)
    return k.args(x=x, residual=residual, weight=weight, eps=eps, hidden=x.shape[-1])


def layer_norm_args(k: Kernel, out, x, weight, bias, eps) -> tuple:
    """weight / bias may be None (NULL: the kernel skips them)."""
    _expect(k, LAYER_NORM)
    return k.args(out=out, x=x, weight=NULL if weight is None else weight, bias=NULL if bias is None else bias,
                  eps=eps, hidden=x.shape[-1])


def rotary_args(k: Kernel, positions, q, key, cos_sin, q_stride, k_stride, is_neox) -> tuple:
    """rotary_*: q [T, Hq, D], key [T, Hk, D] (token strides q_stride / k_stride), cos_sin [max_pos, rot]."""
    _expect(k, ROTARY)
    return k.args(positions=positions, q=q, k=key, cos_sin=cos_sin, q_stride=q_stride, k_stride=k_stride,
                  num_q_heads=q.shape[1], num_k_heads=key.shape[1], head_dim=q.shape[2], rot=cos_sin.shape[1],
                  is_neox=int(bool(is_neox)))


def silu_and_mul_args(k: Kernel, out, x) -> tuple:
    """x [..., 2I] -> out [..., I]."""
    _expect(k, SILU_AND_MUL)
    return k.args(out=out, x=x, rows=rows(x), inner=out.shape[-1])


def gelu_tanh_and_mul_args(k: Kernel, out, x) -> tuple:
    """x [..., 2I] -> out [..., I]."""
    _expect(k, GELU_TANH_AND_MUL)
    return k.args(out=out, x=x, rows=rows(x), inner=out.shape[-1])


def unary_args(k: Kernel, out, x, op: int) -> tuple:
    """op: 0 gelu, 1 gelu_tanh, 2 relu."""
    _expect(k, UNARY)
    return k.args(out=out, x=x, n=x.size, op=op)


def rotary_cache_args(k: Kernel, positions, q, key, value, kv_cache, layer, slot_mapping, cos_sin, q_stride, k_stride,
                      v_stride, is_neox) -> tuple:
    """rotary_cache_*: q [T, Hq, D] rotated in place; key/value [T, Hkv, D] (rotated key) into `layer` of the
    cache at slot_mapping; token strides q_stride / k_stride / v_stride; cos_sin [max_pos, rot]."""
    _expect(k, ROTARY_CACHE)
    _, num_layers, _, num_kv_heads, block_size, head_dim = kv_cache.shape
    return k.args(positions=positions, q=q, k=key, v=value, kv_cache=kv_cache, slot_mapping=slot_mapping,
                  cos_sin=cos_sin, q_stride=q_stride, k_stride=k_stride, v_stride=v_stride, num_q_heads=q.shape[1],
                  num_kv_heads=num_kv_heads, head_dim=head_dim, rot=cos_sin.shape[1], is_neox=int(bool(is_neox)),
                  layer=layer, num_layers=num_layers, block_size=block_size)


def fused_add_layer_norm_args(k: Kernel, x, residual, weight, bias, eps) -> tuple:
    """weight / bias may be None (NULL: the kernel skips them)."""
    _expect(k, FUSED_ADD_LAYER_NORM)
    return k.args(x=x, residual=residual, weight=NULL if weight is None else weight,
                  bias=NULL if bias is None else bias, eps=eps, hidden=x.shape[-1])
