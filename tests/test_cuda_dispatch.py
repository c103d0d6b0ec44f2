"""The CUDA backend without a device: the contract with cpu.py, argument checks and kernel dispatch.

Importing rawpaged.backend.cuda needs neither CuPy nor a GPU; everything here runs on NumPy arrays
(which have the .shape/.dtype/.strides/.flags the checks read).
"""
from __future__ import annotations

import inspect

import numpy as np
import pytest

from rawpaged.backend import cpu, cuda
from rawpaged.errors import RawpagedError


# --------------------------------------------------------------------------------------------
# The contract: same public names, same leading parameters as the CPU twin
# --------------------------------------------------------------------------------------------
def _public_functions(mod):
    """The public functions a backend defines: in its module or, for a package, in its submodules."""
    return {n: f for n, f in vars(mod).items() if inspect.isfunction(f) and not n.startswith("_")
            and (f.__module__ == mod.__name__ or f.__module__.startswith(mod.__name__ + "."))}


def test_cuda_exposes_every_cpu_op_with_the_same_parameters():
    cpu_ops = _public_functions(cpu)
    cuda_ops = _public_functions(cuda)
    assert cpu_ops, "cpu.py exposes no functions?"
    for name, f in cpu_ops.items():
        assert name in cuda_ops, f"the CUDA backend lacks {name}"
        want = list(inspect.signature(f).parameters)
        got = list(inspect.signature(cuda_ops[name]).parameters)
        assert got[: len(want)] == want, f"{name}: cuda{got} vs cpu{want}"
        extra = [p for p in list(inspect.signature(cuda_ops[name]).parameters.values())[len(want):]]
        assert all(p.default is not inspect.Parameter.empty for p in extra), f"{name}: extra parameters must be optional"
    assert cuda.name == "cuda" and cpu.name == "cpu"
    for hook in ("alloc_pinned", "swap_stream", "record_event", "wait_event", "free_device_memory", "total_device_memory"):
        assert callable(getattr(cuda, hook))
    assert np.dtype(np.float16) in cuda.float_dtypes and np.dtype(np.float32) in cuda.float_dtypes


@pytest.mark.skipif(cuda.cupy is not None, reason="CuPy is installed here")
def test_ops_without_cupy_raise_one_line_error():
    with pytest.raises(RawpagedError, match="CuPy"):
        cuda.rms_norm(np.ones((2, 4), np.float32), np.ones(4, np.float32), 1e-5)
    with pytest.raises(RawpagedError, match="CuPy"):
        cuda.to_device(np.ones(3))


# --------------------------------------------------------------------------------------------
# Dispatch
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype,tag", [("float16", "f16"), ("bfloat16", "bf16"), ("float32", "f32"), (np.float16, "f16"), (np.float32, "f32")])
def test_dtype_tag(dtype, tag):
    assert cuda.dtype_tag(dtype) == tag


@pytest.mark.parametrize("dtype", [np.float64, np.int32, "int8"])
def test_dtype_tag_rejects(dtype):
    with pytest.raises(ValueError, match="float16, bfloat16 and float32"):
        cuda.dtype_tag(dtype)


@pytest.mark.parametrize("group,tile", [(1, 1), (2, 2), (3, 4), (4, 4), (5, 8), (6, 8), (7, 8), (8, 8), (12, 8),
                                        (32, 8), (71, 8)])
def test_group_tile_covers_the_group(group, tile):
    """CUDA-core decode: one tile of up to 8 heads; an odd group is one tile with masked heads."""
    assert cuda.group_tile(group) == tile
    assert tile >= min(group, 8) and (tile == 8 or tile < 2 * group)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("head_dim", [64, 80, 96, 128, 256])
def test_decode_fast_paths_take_tensor_cores_for_groups_of_four(dtype, head_dim):
    plan = cuda.select_decode_kernel(head_dim, dtype, 16, 64, 32, 8, 4096, 132)
    tag = cuda.dtype_tag(dtype)
    assert plan.kernel == f"paged_decode_mma_{tag}_hd{head_dim}"
    assert plan.grid == (8, 64, 1) and plan.block == (128, 1, 1)
    assert plan.shared_mem == cuda.decode_mma_shared(head_dim)
    assert not plan.use_split_k                    # 512 blocks: every SM has enough bytes in flight already
    simt = cuda.select_decode_kernel(head_dim, dtype, 16, 64, 32, 8, 4096, 132, decode_policy="simt")
    assert simt.kernel == f"paged_decode_{tag}_hd{head_dim}_g4"
    assert simt.shared_mem == (4 * 4 * head_dim + 2 * 4 * 4) * 4


def test_decode_mma_shared_memory():
    """DecodeMmaShape<HD>::SMEM_BYTES (the program static_asserts each): per warp a ring of K/V chunk
    buffers of 16 padded rows, 3 stages up to head size 128, 2 at 256 plus Q's 16-row tile."""
    assert cuda.decode_mma_shared(128) == 4 * 3 * 2 * 16 * 136 * 2 == 104448
    assert cuda.decode_mma_shared(64) == 4 * 3 * 2 * 16 * 72 * 2
    assert cuda.decode_mma_shared(256) == (4 * 2 * 2 * 16 * 264 + 16 * 264) * 2
    assert all(cuda.decode_mma_shared(hd) <= 227 * 1024 for hd in cuda.DECODE_MMA_HEAD_DIMS)


@pytest.mark.parametrize("head_dim,dtype,expect", [(8, "float16", "paged_decode_f16_hdany_g1"),
                                                   (72, "bfloat16", "paged_decode_bf16_hdany_g1"),
                                                   (128, "float32", "paged_decode_f32_hdany_g1"),
                                                   (112, "float16", "paged_decode_f16_hdany_g1")])
def test_decode_generic_path(head_dim, dtype, expect):
    assert cuda.select_decode_kernel(head_dim, dtype, 8, 4, 8, 8, 100, 132).kernel == expect


@pytest.mark.parametrize("head_dim,dtype,heads,kv,expect", [
    (72, "float16", 32, 8, "paged_decode_f16_hdany_g4"),       # no tensor-core kernel at 72: CUDA cores
    (128, "float32", 24, 8, "paged_decode_f32_hdany_g4"),      # fp32: CUDA cores, group 3 in a tile of 4
    (128, "float16", 24, 8, "paged_decode_f16_hd128_g4"),      # group 3 < MMA_MIN_GROUP: CUDA cores
    (128, "float16", 40, 8, "paged_decode_mma_f16_hd128"),     # group 5
])
def test_decode_kernel_by_group(head_dim, dtype, heads, kv, expect):
    assert cuda.select_decode_kernel(head_dim, dtype, 16, 4, heads, kv, 100, 132).kernel == expect


def test_decode_policy_checks():
    with pytest.raises(ValueError, match="tensor-core decode kernel needs fp16/bf16"):
        cuda.select_decode_kernel(128, "float32", 16, 4, 8, 8, 100, 132, decode_policy="mma")
    with pytest.raises(ValueError, match="decode_policy must be auto, mma or simt"):
        cuda.select_decode_kernel(128, "float16", 16, 4, 8, 8, 100, 132, decode_policy="fast")
    assert cuda.select_decode_kernel(128, "float16", 16, 4, 8, 8, 100, 132, decode_policy="mma").kernel \
        == "paged_decode_mma_f16_hd128"


@pytest.mark.parametrize("block_size", [8, 16, 32])
def test_block_size_is_a_runtime_argument(block_size):
    """Block size changes no kernel name (it is a shift inside the kernel), only validity."""
    plan = cuda.select_decode_kernel(128, "float16", block_size, 8, 32, 32, 300, 132)
    assert plan.kernel == "paged_decode_f16_hd128_g1"


@pytest.mark.parametrize("heads,kv,policy,grid_x", [(48, 8, "auto", 8), (48, 8, "simt", 8), (71, 1, "auto", 5),
                                                   (71, 1, "simt", 9), (24, 8, "auto", 8), (6, 2, "simt", 2),
                                                   (34, 2, "auto", 4)])
def test_decode_grid_covers_every_head(heads, kv, policy, grid_x):
    """48 on 8 (group 6): one tile per KV head on either kernel; 71 on 1: 5 tensor-core tiles of 16
    or 9 CUDA-core tiles of 8; group 17: 2 tiles of 16."""
    plan = cuda.select_decode_kernel(128, "float16", 16, 5, heads, kv, 100, 132, decode_policy=policy)
    assert plan.grid[:2] == (grid_x, 5)


# --------------------------------------------------------------------------------------------
# Occupancy and split-K
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("regs,static,dynamic,threads,expect", [
    (255, 0, 0, 128, 2),          # 256 registers a thread: 32 K a block
    (168, 0, 0, 128, 3),
    (96, 0, 0, 128, 5),
    (32, 0, 0, 128, 16),          # threads: 2048 / 128
    (150, 0, 104448, 128, 2),     # tensor-core decode at head size 128: shared memory
    (236, 0, 143616, 128, 1),     # ... at 256
    (0, 0, 0, 128, 4),            # unknown registers: ASSUMED_REGISTERS = 128
    (32, 128, 0, 1024, 2),
])
def test_resident_blocks(regs, static, dynamic, threads, expect):
    assert cuda.resident_blocks(regs, static, dynamic, threads) == expect


def test_resident_blocks_reads_the_limits():
    small = cuda.DeviceLimits(shared_per_sm=100 * 1024)
    assert cuda.resident_blocks(64, 0, 40 * 1024, 128, small) == 2


def test_inflight_bytes_per_decode_block():
    """What kernels_cuda/paged_attention.cu says each block keeps in flight."""
    assert cuda.decode_inflight_bytes(True, 128, 16, 2) == 4 * 2 * 8192 == 65536      # 2 chunks of 8 KB a warp
    assert cuda.decode_inflight_bytes(True, 256, 16, 2) == 4 * 1 * 16384
    assert cuda.decode_inflight_bytes(False, 128, 1, 2) == 4 * 32 * 2 * 8 * 16         # VPL 8: 32 KB
    assert cuda.decode_inflight_bytes(False, 128, 8, 2) == 4 * 32 * 2 * 2 * 16         # VPL 2: 8 KB
    assert cuda.decode_inflight_bytes(False, 80, 1, 2) == 4 * 20 * 2 * 8 * 16          # 10 of 16 lanes a row


@pytest.mark.parametrize("base,span,occ,inflight,policy,expect", [
    (8, 4096, 2, 65536, "auto", 32),        # batch 1, 8 KV heads: fill 2 x 132 slots: 33 -> 32 of 128 tokens
    (512, 4096, 2, 65536, "auto", 1),       # batch 64 x 8 KV heads: every SM has a block already
    (100, 4096, 2, 65536, "auto", 3),       # 264 slots over 100 blocks
    (64, 4096, 4, 8192, "auto", 8),         # 8 KB a block: 4 a SM needed; 9 -> 8 partitions of 512
    (64, 4096, 3, 16384, "auto", 7),
    (8, 100, 2, 65536, "auto", 2),          # short: at most ceil(100 / 64) partitions
    (8, 40, 2, 65536, "auto", 1),
    (8, 40, 2, 65536, "always", 2),
    (8, 4096, 2, 65536, "never", 1),
    (1, 1 << 20, 2, 65536, "auto", 128),    # MAX_PARTITIONS
])
def test_decode_partitions(base, span, occ, inflight, policy, expect):
    assert cuda.decode_partitions(base, span, 132, occ, inflight, policy) == expect


def test_partition_tokens_is_the_kernels_rule():
    assert cuda.partition_tokens(4096, 64, 33) == 128 and cuda.partition_tokens(100, 64, 2) == 64
    assert cuda.partition_tokens(100, 16, 7) == 16 and cuda.partition_tokens(0, 64, 4) == 64


def test_split_k_chosen_for_few_long_sequences():
    plan = cuda.select_decode_kernel(128, "float16", 16, 1, 32, 8, 4096, 132, blocks_per_sm=2)
    assert plan.use_split_k and plan.num_partitions == 32 and plan.grid == (8, 1, 32)
    assert plan.reduce_kernel == "paged_decode_reduce_f16" and plan.reduce_grid == (32, 1, 1)
    assert plan.reduce_shared_mem == 32 * 4 and plan.partition_align == cuda.PARTITION_SIZE


def test_occupancy_is_read_through_the_callable():
    """ops.py passes launch.occupancy: (kernel name, dynamic shared bytes) -> resident blocks per SM."""
    seen = []

    def occupancy(name, shared):
        seen.append((name, shared))
        return 1
    plan = cuda.select_decode_kernel(128, "float16", 16, 1, 32, 8, 4096, 132, blocks_per_sm=occupancy)
    assert seen == [("paged_decode_mma_f16_hd128", 104448)] and plan.blocks_per_sm == 1
    assert plan.num_partitions == 16                 # ceil(132 / 8) = 17 shares of 241 -> 256 tokens: 16


@pytest.mark.parametrize("num_seqs,max_len,expect", [(64, 4096, False),   # 64*8 blocks fill 132 SMs
                                                      (1, 4096, True),     # 8 blocks: split
                                                      (1, 700, True),      # 11 partitions of 64 at most
                                                      (1, 60, False),      # one partition's worth
                                                      (4, 1024, True)])
def test_split_k_heuristic(num_seqs, max_len, expect):
    plan = cuda.select_decode_kernel(128, "float16", 16, num_seqs, 32, 8, max_len, 132)
    assert plan.use_split_k is expect


def test_split_k_with_a_window_plans_for_the_window():
    long = cuda.select_decode_kernel(128, "float16", 16, 1, 32, 8, 32768, 132, blocks_per_sm=2)
    windowed = cuda.select_decode_kernel(128, "float16", 16, 1, 32, 8, 32768, 132, blocks_per_sm=2,
                                         sliding_window=256)
    assert long.num_partitions == 32 and windowed.num_partitions == 4     # 256 keys: 4 x 64


def test_split_k_fixed_for_cuda_graphs():
    """max_model_len: one plan whatever the step's longest context; num_partitions: exactly that."""
    plans = {cuda.select_decode_kernel(128, "float16", 16, 4, 32, 8, n, 132, max_model_len=8192) for n in (1, 700, 8192)}
    assert len(plans) == 1 and plans.pop().num_partitions > 1
    fixed = cuda.select_decode_kernel(128, "float16", 16, 4, 32, 8, 100, 132, num_partitions=5)
    assert fixed.use_split_k and fixed.grid == (8, 4, 5) and fixed.reduce_shared_mem == 20
    assert not cuda.select_decode_kernel(128, "float16", 16, 4, 32, 8, 9000, 132, num_partitions=1).use_split_k
    with pytest.raises(ValueError, match="num_partitions must be >= 1"):
        cuda.select_decode_kernel(128, "float16", 16, 4, 32, 8, 100, 132, num_partitions=0)


def test_split_k_policy_forces(monkeypatch):
    assert cuda.select_decode_kernel(64, "float16", 16, 1, 8, 8, 40, 132, policy="always").use_split_k
    assert not cuda.select_decode_kernel(64, "float16", 16, 1, 8, 8, 9000, 132, policy="never").use_split_k
    monkeypatch.setattr(cuda, "split_k_policy", "always")
    plan = cuda.select_decode_kernel(64, "float16", 16, 1, 8, 8, 40, 132, partition_size=16)
    assert plan.use_split_k and plan.num_partitions == 3 and plan.partition_align == 16
    with pytest.raises(ValueError, match="split_k_policy"):
        cuda.decode_partitions(1, 1, 1, 1, 1, policy="sometimes")


def test_prefill_dispatch():
    plan = cuda.select_prefill_kernel(128, "bfloat16", 16, 3, 32, 8, 900, 300)
    assert plan.kernel == "paged_prefill_bf16_hd128" and plan.group_tile == 4      # 4 heads x 16 tokens a block
    assert plan.grid == (19, 8, 3) and plan.shared_mem == 2 * 2 * 32 * 136 * 2 == cuda.prefill_shared(128)
    mha = cuda.select_prefill_kernel(64, "float16", 16, 3, 32, 32, 900, 300)
    assert mha.group_tile == 1 and mha.grid == (5, 32, 3) and mha.shared_mem == 2 * 2 * 64 * 72 * 2
    assert cuda.select_prefill_kernel(72, "float16", 16, 3, 32, 8, 900, 300).kernel == "paged_varlen_f16"
    assert cuda.select_prefill_kernel(128, "float32", 16, 3, 32, 8, 900, 300).kernel == "paged_varlen_f32"
    varlen = cuda.select_prefill_kernel(128, "float16", 16, 3, 30, 10, 900, 300, policy="varlen")
    assert varlen.kernel == "paged_varlen_f16" and varlen.grid == (900, 8, 1)
    with pytest.raises(ValueError, match="tensor-core prefill"):
        cuda.select_prefill_kernel(128, "float32", 16, 3, 32, 8, 900, 300, policy="mma")


@pytest.mark.parametrize("group,max_q,tile", [(1, 500, 1), (2, 500, 2), (4, 500, 4), (8, 500, 4), (5, 500, 1),
                                              (5, 12, 4), (3, 16, 4), (6, 40, 2)])
def test_prefill_group_tile_is_the_fewest_blocks(group, max_q, tile):
    """Query heads of a group per prefill block: each K/V tile a block gathers feeds all its heads."""
    assert cuda.prefill_group_tile(group, max_q) == tile
    plan = cuda.select_prefill_kernel(128, "float16", 16, 1, 2 * group, 2, max_q, max_q)
    assert plan.group_tile == tile and plan.grid == (-(-max_q // (64 // tile)), 2 * -(-group // tile), 1)



def test_select_attention_kernel_picks_decode_or_prefill():
    kw = dict(num_heads=32, num_kv_heads=8)
    assert cuda.select_attention_kernel(128, "float16", 16, 8, 500, 132, **kw).kernel.startswith("paged_decode")
    assert cuda.select_attention_kernel(128, "float16", 16, 8, 500, 132, max_query_len=7, num_tokens=20, **kw).kernel.startswith("paged_prefill")
    # head size not a multiple of 8: even decode goes to the varlen kernel
    assert cuda.select_attention_kernel(12, "float16", 16, 8, 500, 132, **kw).kernel == "paged_varlen_f16"


def test_every_dispatched_kernel_is_instantiated(monkeypatch):
    names = set(cuda.all_kernel_names()["paged_attention.cu"])
    for dtype in ("float16", "bfloat16", "float32"):
        for hd in list(range(8, 257, 8)) + [12, 20, 100]:
            for heads, kv in ((8, 8), (8, 4), (8, 2), (8, 1), (12, 2), (14, 2), (71, 1), (34, 2)):
                for mql in (1, 5):
                    for split in ("never", "always"):
                        for decode in ("auto", "simt"):
                            monkeypatch.setattr(cuda, "split_k_policy", split)
                            monkeypatch.setattr(cuda, "decode_policy", decode)
                            plan = cuda.select_attention_kernel(hd, dtype, 16, 2, 3000, 132, num_heads=heads,
                                                                num_kv_heads=kv, max_query_len=mql, num_tokens=6)
                            assert plan.kernel in names, plan.kernel
                            assert plan.reduce_kernel is None or plan.reduce_kernel in names


@pytest.mark.parametrize("args,msg", [((257, 16, 8, 8), "head_dim 257"), ((0, 16, 8, 8), "head_dim 0"),
                                      ((64, 12, 8, 8), "power of two"), ((64, 16, 6, 4), "not a multiple")])
def test_attention_shape_errors(args, msg):
    with pytest.raises(ValueError, match=msg):
        cuda.check_attention_shape(*args)


def test_norm_threads():
    assert cuda.norm_threads(64) == 128 and cuda.norm_threads(4096) == 256 and cuda.norm_threads(8192) == 1024


# --------------------------------------------------------------------------------------------
# Argument checks (on NumPy arrays)
# --------------------------------------------------------------------------------------------
def _attn_args(T=3, H=8, Hkv=2, D=64, bs=16, S=2, dtype=np.float16):
    q = np.ones((T, H, D), dtype)
    kv = np.ones((5, 2, 2, Hkv, bs, D), dtype)
    tables = np.zeros((S, 4), np.int32)
    ctx = np.full(S, 3, np.int32)
    qsl = np.array([0, 1, 3][: S + 1], np.int32)
    return q, kv, 1, tables, ctx, qsl


def test_attention_args_accept_a_good_batch():
    cuda.check_attention_args(*_attn_args())


def test_attention_args_accept_a_strided_q_view():
    qkv = np.ones((3, (8 + 2 * 2) * 64), np.float16)
    q = qkv[:, : 8 * 64].reshape(3, 8, 64)
    _, kv, layer, tables, ctx, qsl = _attn_args()
    cuda.check_attention_args(q, kv, layer, tables, ctx, qsl)
    assert cuda.token_stride(q, "q", (8, 64)) == 12 * 64


@pytest.mark.parametrize("mutate,msg", [
    (lambda a: (a[0].astype(np.float32),) + a[1:], "q is float32 but kv_cache is float16"),
    (lambda a: (a[0][:, :, :32],) + a[1:], "head_dim of q"),
    (lambda a: a[:3] + (a[3].astype(np.int64),) + a[4:], "block_tables must be 2-D int32"),
    (lambda a: a[:4] + (a[4][:1],) + a[5:], "disagree on the number of sequences"),
    (lambda a: a[:2] + (2,) + a[3:], "layer 2 out of range"),
    (lambda a: (a[0], a[1][:, :, :, :, ::2]) + a[2:], "C-contiguous"),
    (lambda a: (np.ones((3, 7, 64), np.float16),) + a[1:], "7 query heads not a multiple of 2 KV heads"),
    (lambda a: (np.ones((3, 8, 64), np.float64), a[1].astype(np.float64)) + a[2:], "float16, bfloat16 and float32"),
    (lambda a: (np.ones((3, 64, 8), np.float16).transpose(0, 2, 1),) + a[1:], "contiguous"),
])
def test_attention_args_reject(mutate, msg):
    with pytest.raises(ValueError, match=msg):
        cuda.check_attention_args(*mutate(_attn_args()))


def test_attention_args_reject_bad_out():
    args = _attn_args()
    with pytest.raises(ValueError, match="out must be"):
        cuda.check_attention_args(*args, out=np.ones((3, 8, 32), np.float16))


def test_cache_args():
    kv = np.ones((4, 2, 2, 2, 8, 16), np.float16)
    qkv = np.ones((5, 8 * 16), np.float16)
    k = qkv[:, 4 * 16: 6 * 16].reshape(5, 2, 16)
    v = qkv[:, 6 * 16:].reshape(5, 2, 16)
    assert cuda.check_cache_args(k, v, kv, 1, np.zeros(5, np.int64)) == (128, 128)
    with pytest.raises(ValueError, match="slot_mapping must be"):
        cuda.check_cache_args(k, v, kv, 1, np.zeros(4, np.int64))
    with pytest.raises(ValueError, match="do not fit"):
        cuda.check_cache_args(k, v[:, :1], kv, 1, np.zeros(5, np.int64))
    with pytest.raises(ValueError, match="k/v are float32"):
        cuda.check_cache_args(k.astype(np.float32), v.astype(np.float32), kv, 1, np.zeros(5, np.int64))
    with pytest.raises(ValueError, match="layer 2 out of range"):
        cuda.check_cache_args(k, v, kv, 2, np.zeros(5, np.int64))


def test_rotary_args():
    q = np.ones((4, 8, 16), np.float16)
    k = np.ones((4, 2, 16), np.float16)
    pos = np.zeros(4, np.int64)
    assert cuda.check_rotary_args(pos, q, k, np.ones((32, 16), np.float32)) == (128, 32)
    with pytest.raises(ValueError, match="even rot"):
        cuda.check_rotary_args(pos, q, k, np.ones((32, 18), np.float32))
    with pytest.raises(ValueError, match="positions must be"):
        cuda.check_rotary_args(pos[:3], q, k, np.ones((32, 16), np.float32))
    with pytest.raises(ValueError, match="cos_sin_cache must be float32"):
        cuda.check_rotary_args(pos, q, k, np.ones((32, 16), np.float64))


def test_norm_args():
    x = np.ones((3, 32), np.float16)
    assert cuda.check_norm_args("rms_norm", x, np.ones(32, np.float16)) == 32
    with pytest.raises(ValueError, match="weight must be"):
        cuda.check_norm_args("rms_norm", x, np.ones(31, np.float16))
    with pytest.raises(ValueError, match="bias must be"):
        cuda.check_norm_args("layer_norm", x, None, np.ones(32, np.float32))


# --------------------------------------------------------------------------------------------
# Host-side helpers: swap runs, bf16 rounding, dtype resolution
# --------------------------------------------------------------------------------------------
def test_copy_runs_merges_consecutive_blocks():
    assert cuda.copy_runs([(0, 5), (1, 6), (2, 7), (9, 1), (10, 3)]) == [(0, 5, 3), (9, 1, 1), (10, 3, 1)]
    assert cuda.copy_runs([]) == []
    assert cuda.copy_runs(np.array([[4, 4], [5, 5]])) == [(4, 4, 2)]


def test_float32_to_bfloat16_bits_rounds_to_nearest_even():
    xs = np.array([1.0, 1.0 + 2.0 ** -8, 1.0 + 3 * 2.0 ** -8, -0.0, np.inf, -np.inf, np.nan,
                   np.float32(3.4028235e38), 1e-40], np.float32)
    bits = cuda.float32_to_bfloat16_bits(xs)
    #             1.0     tie->even  tie->even(up)  -0     +inf    -inf    NaN     max->inf  subnormal
    assert bits.tolist() == [0x3F80, 0x3F80, 0x3F82, 0x8000, 0x7F80, 0xFF80, 0x7FC0, 0x7F80, 0x0001]


def test_float32_to_bfloat16_bits_matches_ml_dtypes():
    ml_dtypes = pytest.importorskip("ml_dtypes")
    x = (np.random.default_rng(0).standard_normal(10000) * 10.0 ** np.random.default_rng(1).integers(-30, 30, 10000)).astype(np.float32)
    want = x.astype(ml_dtypes.bfloat16).view(np.uint16)
    np.testing.assert_array_equal(cuda.float32_to_bfloat16_bits(x), want)


@pytest.mark.parametrize("dtype,torch_dtype,bf16_ok,expect", [
    ("auto", "float16", True, "float16"), ("auto", "bfloat16", True, "bfloat16"),
    ("auto", "bfloat16", False, "float16"), ("auto", "float32", True, "float16"), ("auto", None, True, "float16"),
    ("auto", "torch.bfloat16", True, "bfloat16"),
    ("float32", "bfloat16", True, "float32"), ("half", None, True, "float16"), ("bf16", None, True, "bfloat16"),
    (np.float16, None, True, "float16"), (np.float32, None, False, "float32"),
])
def test_resolve_dtype_name(dtype, torch_dtype, bf16_ok, expect):
    assert cuda.resolve_dtype_name(dtype, torch_dtype, bf16_ok) == expect


def test_resolve_dtype_name_errors():
    with pytest.raises(RawpagedError, match="ml_dtypes"):
        cuda.resolve_dtype_name("bfloat16", None, bf16_ok=False)
    with pytest.raises(RawpagedError, match="float64"):
        cuda.resolve_dtype_name("float64")
