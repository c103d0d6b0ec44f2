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


@pytest.mark.parametrize("group,tile", [(1, 1), (2, 2), (3, 1), (4, 4), (6, 2), (7, 1), (8, 8), (12, 4), (32, 8)])
def test_group_tile_divides_the_group(group, tile):
    assert cuda.group_tile(group) == tile
    assert group % tile == 0


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("head_dim", [64, 80, 96, 128, 256])
def test_decode_fast_paths(dtype, head_dim):
    plan = cuda.select_decode_kernel(head_dim, dtype, 16, 64, 32, 8, 4096, 132)
    tag = cuda.dtype_tag(dtype)
    assert plan.kernel == f"paged_decode_{tag}_hd{head_dim}_g4"
    assert plan.grid == (8, 64, 1) and plan.block == (128, 1, 1)
    assert plan.shared_mem == (4 * 4 * head_dim + 2 * 4 * 4) * 4
    assert not plan.use_split_k


@pytest.mark.parametrize("head_dim,dtype,expect", [(8, "float16", "paged_decode_f16_hdany_g1"),
                                                   (72, "bfloat16", "paged_decode_bf16_hdany_g1"),
                                                   (128, "float32", "paged_decode_f32_hdany_g1"),
                                                   (112, "float16", "paged_decode_f16_hdany_g1")])
def test_decode_generic_path(head_dim, dtype, expect):
    assert cuda.select_decode_kernel(head_dim, dtype, 8, 4, 8, 8, 100, 132).kernel == expect


@pytest.mark.parametrize("block_size", [8, 16, 32])
def test_block_size_is_a_runtime_argument(block_size):
    """Block size changes no kernel name (it is a shift inside the kernel), only validity."""
    plan = cuda.select_decode_kernel(128, "float16", block_size, 8, 32, 32, 300, 132)
    assert plan.kernel == "paged_decode_f16_hd128_g1"


def test_decode_gqa_grid_covers_every_head():
    # 48 query heads on 8 KV heads: group 6 -> tiles of 2 heads, 3 tiles per KV head
    plan = cuda.select_decode_kernel(128, "float16", 16, 5, 48, 8, 100, 132)
    assert plan.kernel.endswith("_g2") and plan.grid == (24, 5, 1)


def test_split_k_chosen_for_few_long_sequences():
    plan = cuda.select_decode_kernel(128, "float16", 16, 1, 32, 32, 4096, 132)
    assert plan.use_split_k and plan.num_partitions == 4096 // cuda.PARTITION_SIZE
    assert plan.grid == (32, 1, plan.num_partitions)
    assert plan.reduce_kernel == "paged_decode_reduce_f16" and plan.reduce_grid == (32, 1, 1)
    assert plan.reduce_shared_mem == plan.num_partitions * 4


@pytest.mark.parametrize("num_seqs,max_len,expect", [(64, 4096, False),   # 64*8 blocks fill 132 SMs
                                                      (1, 4096, True),     # 8 blocks: split
                                                      (1, 700, False),     # too short to split
                                                      (4, 1024, True)])
def test_split_k_heuristic(num_seqs, max_len, expect):
    plan = cuda.select_decode_kernel(128, "float16", 16, num_seqs, 32, 8, max_len, 132)
    assert plan.use_split_k is expect


def test_split_k_policy_forces(monkeypatch):
    assert cuda.select_decode_kernel(64, "float16", 16, 1, 8, 8, 40, 132, policy="always").use_split_k
    assert not cuda.select_decode_kernel(64, "float16", 16, 1, 8, 8, 9000, 132, policy="never").use_split_k
    monkeypatch.setattr(cuda, "split_k_policy", "always")
    plan = cuda.select_decode_kernel(64, "float16", 16, 1, 8, 8, 40, 132, partition_size=16)
    assert plan.use_split_k and plan.num_partitions == 3 and plan.partition_size == 16
    with pytest.raises(ValueError, match="split_k_policy"):
        cuda.use_split_k(1, 1, 1, policy="sometimes")


def test_prefill_dispatch():
    plan = cuda.select_prefill_kernel(128, "bfloat16", 16, 3, 32, 8, 900, 300)
    assert plan.kernel == "paged_prefill_bf16_hd128"
    assert plan.grid == (5, 32, 3) and plan.shared_mem == (64 + 64) * (128 + 8) * 2
    assert cuda.select_prefill_kernel(72, "float16", 16, 3, 32, 8, 900, 300).kernel == "paged_varlen_f16"
    assert cuda.select_prefill_kernel(128, "float32", 16, 3, 32, 8, 900, 300).kernel == "paged_varlen_f32"
    varlen = cuda.select_prefill_kernel(128, "float16", 16, 3, 30, 10, 900, 300, policy="varlen")
    assert varlen.kernel == "paged_varlen_f16" and varlen.grid == (900, 8, 1)
    with pytest.raises(ValueError, match="tensor-core prefill"):
        cuda.select_prefill_kernel(128, "float32", 16, 3, 32, 8, 900, 300, policy="mma")


def test_select_attention_kernel_picks_decode_or_prefill():
    kw = dict(num_heads=32, num_kv_heads=8)
    assert cuda.select_attention_kernel(128, "float16", 16, 8, 500, 132, **kw).kernel.startswith("paged_decode")
    assert cuda.select_attention_kernel(128, "float16", 16, 8, 500, 132, max_query_len=7, num_tokens=20, **kw).kernel.startswith("paged_prefill")
    # head size not a multiple of 8: even decode goes to the varlen kernel
    assert cuda.select_attention_kernel(12, "float16", 16, 8, 500, 132, **kw).kernel == "paged_varlen_f16"


def test_every_dispatched_kernel_is_instantiated():
    names = set(cuda.all_kernel_names()["paged_attention.cu"])
    for dtype in ("float16", "bfloat16", "float32"):
        for hd in list(range(8, 257, 8)) + [12, 20, 100]:
            for heads, kv in ((8, 8), (8, 4), (8, 2), (8, 1), (12, 2), (14, 2)):
                for mql in (1, 5):
                    for split in ("never", "always"):
                        cuda.split_k_policy = split
                        try:
                            plan = cuda.select_attention_kernel(hd, dtype, 16, 2, 3000, 132, num_heads=heads,
                                                                num_kv_heads=kv, max_query_len=mql, num_tokens=6)
                        finally:
                            cuda.split_k_policy = "auto"
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
