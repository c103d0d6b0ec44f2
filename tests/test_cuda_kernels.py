"""The kernel table (rawpaged/backend/cuda/kernels.py) against the .cu sources, without a device.

Three links keep a kernel's parameters in step from the op to the device:
  - the builders fill `Kernel.args` by parameter name: the order and the types come from the table
    (here: it refuses a missing or extra name, a scalar for a pointer, an array of the wrong dtype,
    NULL where the kernel does not check for it, an int that does not fit);
  - the table's parameter list is the .cu template's, name for name and type for type: here by
    reading the template's declaration, and at compile time by the generated static_assert (here:
    a drifted table does not compile, with g++ in the host emulation's mode);
  - the compiled kernels take what the builders pass: tests/test_cuda_build.py (nvcc).
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from kernels_cuda import DIR as KERNEL_DIR, SOURCES, read_source
from rawpaged.backend import cuda
from rawpaged.backend.cuda import dispatch, kernels, launch

CXX = shutil.which("g++") or shutil.which("c++")


# --------------------------------------------------------------------------------------------
# The table against the templates' declarations
# --------------------------------------------------------------------------------------------
def impl_declaration(source: str, impl: str) -> list[tuple[str, str]]:
    """[(C type, name)] of the template `impl` as declared in kernels_cuda/<source>."""
    text = read_source(source, inline_headers=False)
    found = re.findall(rf"\bvoid\s+{impl}\s*\(([^)]*)\)\s*\{{", text)
    assert len(found) == 1, f"{source}: {len(found)} definitions of {impl}"
    decls = []
    for d in found[0].split(","):
        ctype, _, name = " ".join(d.replace("__restrict__", " ").split()).rpartition(" ")
        decls.append((ctype.replace(" *", "*"), name))
    return decls


def declaration_problems(family: kernels.Family) -> list[str]:
    want = impl_declaration(family.source, family.impl)
    got = [(p.ctype, p.name) for p in family.params]
    if len(want) != len(got):
        return [f"{family.name}: the table lists {len(got)} parameters, {family.impl} declares {len(want)}"]
    return [f"{family.name} parameter {i}: the table has {g[0]} {g[1]}, {family.impl} declares {w[0]} {w[1]}"
            for i, (g, w) in enumerate(zip(got, want)) if g != w]


@pytest.mark.parametrize("family", kernels.FAMILIES, ids=lambda f: f.name)
def test_table_matches_the_template_declaration(family):
    assert declaration_problems(family) == []


def test_declaration_check_sees_two_swapped_ints():
    """Same types swapped (layer <-> num_seqs): invisible to any type check, named here."""
    fam = kernels.PAGED_VARLEN
    params = list(fam.params)
    i, j = [p.name for p in params].index("num_seqs"), [p.name for p in params].index("layer")
    params[i], params[j] = params[j], params[i]
    swapped = kernels.Family(fam.name, fam.source, fam.impl, fam.template, fam.name_format, tuple(params),
                             fam.instances, fam.max_threads)
    assert declaration_problems(swapped) == [
        "paged_varlen parameter 7: the table has int layer, paged_varlen_impl declares int num_seqs",
        "paged_varlen parameter 8: the table has int num_seqs, paged_varlen_impl declares int layer"]


def test_every_source_and_kernel_name_comes_from_the_table():
    names = cuda.all_kernel_names()
    assert list(names) == list(SOURCES) and all(names.values())
    # 92 + gelu_tanh_and_mul_{f16,bf16,f32} + paged_decode_mma_{f16,bf16}_hd{64,80,96,128,256}
    # + fused_ops.cu: 5 rotary_cache, 3 fused_add_layer_norm
    assert sum(map(len, names.values())) == len(kernels.KERNELS) == 113
    assert len(names["paged_attention.cu"]) == 78
    for source in SOURCES:
        # the sources hold templates only: every extern "C" kernel is generated
        code = re.sub(r"//.*", "", read_source(source, inline_headers=False))
        assert 'extern "C"' not in code and "__global__" not in code, source
    assert kernels.kernel("paged_decode_bf16_hdany_g2").targs == ("bf16", 0, 2)
    with pytest.raises(ValueError, match="no CUDA kernel named 'paged_decode_f32_hd128_g1'"):
        kernels.kernel("paged_decode_f32_hd128_g1")


@pytest.mark.parametrize("family,targs,msg", [
    (kernels.PAGED_PREFILL, dict(T="f32", HD=128), "no paged_prefill kernel is instantiated for T=f32, HD=128"),
    (kernels.PAGED_DECODE, dict(T="f16", HD=72, GT=4), "HD=72"),
    (kernels.ROTARY, dict(T="f16", C="bf16"), "T=f16, C=bf16"),
])
def test_dispatch_cannot_name_a_missing_instantiation(family, targs, msg):
    with pytest.raises(ValueError, match=msg):
        family.kernel(**targs)


def test_program_holds_the_wrappers_of_its_dtype_and_checks_constants():
    f16 = kernels.program("paged_attention.cu", "f16")
    names = re.findall(r'^extern "C" __global__ void __launch_bounds__\(128(?:, 2)?\) (\w+)\(', f16, re.MULTILINE)
    assert sorted(names) == sorted(k.name for k in kernels.KERNELS.values() if k.tag == "f16") and len(names) == 36
    assert f16.count("__launch_bounds__(128, 2) paged_prefill_f16_hd") == 5     # the prefill names 2 blocks an SM
    for const, value in kernels.SOURCE_CONSTANTS["paged_attention.cu"].items():
        assert f"static_assert({const} == {value}," in f16
    everything = kernels.program("paged_attention.cu")
    assert len(re.findall(r'^extern "C" __global__', everything, re.MULTILINE)) == 78
    assert len(re.findall(r'^extern "C" __global__', kernels.program("norms.cu", "f16"), re.MULTILINE)) == 9   # every dtype
    assert '#include "common.cuh"' not in everything and "struct f16" in everything          # header pasted in
    w = kernels.PAGED_DECODE.kernel(T="bf16", HD=0, GT=8).wrapper()
    assert w.startswith('extern "C" __global__ void __launch_bounds__(128) paged_decode_bf16_hdany_g8(bf16* out, '
                        "float* part_out, float* part_max, float* part_sum, const bf16* q, long long q_stride,")
    assert "paged_decode_impl<bf16, 0, 8>(out, part_out," in w


def _syntax_check(text: str, tmp_path) -> subprocess.CompletedProcess:
    src = tmp_path / "program.cpp"
    src.write_text(text)
    return subprocess.run([CXX, "-std=c++17", "-fsyntax-only", "-w", "-DRP_HOST_EMULATION", f"-I{KERNEL_DIR}",
                           "-x", "c++", str(src)], capture_output=True, text=True)


@pytest.mark.skipif(CXX is None, reason="no C++ compiler (g++)")
def test_a_table_drifted_from_the_template_does_not_compile(tmp_path):
    """The generated static_assert: `int hidden` declared `long long` in the table is a compile error
    (without it C++ would convert the argument silently and the kernel would read the wrong bytes)."""
    fam = kernels.RMS_NORM
    good = _syntax_check(read_source("norms.cu") + "\n" + fam.kernel(T="f16").wrapper(), tmp_path)
    assert good.returncode == 0, good.stderr[-2000:]
    params = tuple(kernels.Param(p.name, "long long") if p.name == "hidden" else p for p in fam.params)
    drifted = kernels.Family(fam.name, fam.source, fam.impl, fam.template, fam.name_format, params,
                             fam.instances, fam.max_threads)
    bad = _syntax_check(read_source("norms.cu") + "\n" + drifted.kernel(T="f16").wrapper(), tmp_path)
    assert bad.returncode != 0
    assert "rms_norm_f16: rms_norm_impl takes other parameter types than the table" in bad.stderr


# --------------------------------------------------------------------------------------------
# Kernel.args: the builders cannot hand a kernel the wrong thing
# --------------------------------------------------------------------------------------------
def _norm_values(dt=np.float16, **changes):
    x = np.zeros((2, 32), dt)
    values = dict(out=np.zeros_like(x), x=x, weight=np.zeros(32, dt), eps=1e-5, hidden=32)
    values.update(changes)
    return values


def test_args_are_typed_and_in_table_order():
    k = kernels.RMS_NORM.kernel(T="f16")
    values = _norm_values()
    args = k.args(**dict(reversed(list(values.items()))))           # keyword order does not matter
    assert [type(a) for a in args] == [np.ndarray, np.ndarray, np.ndarray, np.float32, np.int32]
    assert args[0] is values["out"] and args[1] is values["x"] and args[4] == 32
    assert kernels.rms_norm_args(k, values["out"], values["x"], values["weight"], 1e-5)[4] == 32


@pytest.mark.parametrize("changes,err,msg", [
    (dict(hidden=None), TypeError, "hidden \\(int\\) needs an integer"),
    (dict(hidden=2.0), TypeError, "hidden \\(int\\) needs an integer"),
    (dict(hidden=2 ** 31), ValueError, "hidden = 2147483648 does not fit a int"),
    (dict(x=3), TypeError, "x \\(const T\\*\\) needs an array"),
    (dict(weight=kernels.NULL), TypeError, "weight \\(const T\\*\\) needs an array"),   # rms_norm's weight is not nullable
    (dict(out=np.zeros((2, 32), np.float32)), TypeError, "out \\(T\\*\\) needs a float16 array, got float32"),
    (dict(eps="1e-5"), TypeError, "eps \\(float\\) needs a number"),
    (dict(extra=1), TypeError, "missing \\[\\], unexpected \\['extra'\\]"),
])
def test_args_refuse_the_wrong_thing(changes, err, msg):
    k = kernels.RMS_NORM.kernel(T="f16")
    with pytest.raises(err, match=msg):
        k.args(**_norm_values(**changes))


def test_args_refuse_a_missing_argument_and_a_builder_of_another_family():
    k = kernels.RMS_NORM.kernel(T="f16")
    values = _norm_values()
    del values["eps"]
    with pytest.raises(TypeError, match=r"rms_norm_f16: arguments missing \['eps'\]"):
        k.args(**values)
    x = np.zeros((2, 32), np.float16)
    with pytest.raises(TypeError, match="rms_norm_f16 is a rms_norm kernel, not layer_norm"):
        kernels.layer_norm_args(k, x, x, None, None, 1e-5)


def test_nullable_pointers_take_null():
    k = kernels.LAYER_NORM.kernel(T="f32")
    x = np.zeros((2, 8), np.float32)
    args = kernels.layer_norm_args(k, np.zeros_like(x), x, None, None, 1e-5)
    assert args[2] is kernels.NULL and args[3] is kernels.NULL
    int64 = kernels.RESHAPE_AND_CACHE.kernel(T="f16")
    kv = np.zeros((4, 2, 2, 2, 8, 16), np.float16)
    key = np.zeros((3, 2, 16), np.float16)
    with pytest.raises(TypeError, match="slot_mapping \\(const long long\\*\\) needs a int64 array, got int32"):
        kernels.reshape_and_cache_args(int64, key, key, kv, 1, np.zeros(3, np.int32), 32, 32, True)


def test_launch_checks_the_tuple_and_the_launch_bounds():
    k = kernels.UNARY.kernel(T="f32")
    x = np.zeros(8, np.float32)
    args = kernels.unary_args(k, np.zeros_like(x), x, 2)
    with pytest.raises(TypeError, match="unary_f32 takes 4 arguments, got 3"):
        launch.launch(k, (1, 1, 1), (256, 1, 1), args[:3])
    with pytest.raises(ValueError, match=r"a block of \(512, 1, 1\) threads exceeds its launch bounds \(256\)"):
        launch.launch(k, (1, 1, 1), (512, 1, 1), args)
    norm = kernels.RMS_NORM.kernel(T="f32")
    assert dispatch.norm_threads(1 << 20) <= norm.max_threads         # the widest norm launch fits its bounds


# --------------------------------------------------------------------------------------------
# The package forwards its knobs to the module that reads them
# --------------------------------------------------------------------------------------------
def test_package_knobs_reach_dispatch_and_launch(monkeypatch):
    monkeypatch.setattr(cuda, "prefill_policy", "varlen")
    assert dispatch.prefill_policy == "varlen" == cuda.prefill_policy
    assert cuda.select_prefill_kernel(128, "float16", 16, 1, 8, 8, 40, 40).kernel == "paged_varlen_f16"
    monkeypatch.setattr(cuda, "PARTITION_SIZE", 16)
    monkeypatch.setattr(cuda, "split_k_policy", "always")
    assert cuda.select_decode_kernel(64, "float16", 16, 1, 8, 8, 40, 132).num_partitions == 3
    monkeypatch.setattr(cuda, "num_sms", lambda: 7)
    assert launch.num_sms() == 7
    monkeypatch.undo()
    assert dispatch.prefill_policy == "auto" and dispatch.PARTITION_SIZE == 64 and dispatch.split_k_policy == "auto"
    assert "split_k_policy" not in vars(cuda)        # no stale copy in the package
    monkeypatch.setattr(cuda, "decode_policy", "simt")
    assert dispatch.decode_policy == "simt"
    assert cuda.select_decode_kernel(128, "float16", 16, 1, 8, 2, 40, 132).kernel == "paged_decode_f16_hd128_g4"
    monkeypatch.undo()
    assert "decode_policy" not in vars(cuda)


def test_the_program_can_be_printed_for_compiling_by_hand():
    """python -m rawpaged.backend.cuda SOURCE [TAG]: the text the backend compiles (docs/cuda_kernels.md)."""
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    run = lambda *a: subprocess.run([sys.executable, "-m", "rawpaged.backend.cuda", *a],
                                    capture_output=True, text=True, env=env)
    res = run("paged_attention.cu", "bf16")
    assert res.returncode == 0 and res.stdout == kernels.program("paged_attention.cu", "bf16") + "\n"
    bad = run("nope.cu")
    assert bad.returncode == 2 and "usage: python -m rawpaged.backend.cuda" in bad.stderr


def test_a_compiled_head_size_must_be_q_s():
    """paged_prefill_*_hd128 reads rows of 128: a q of another head size is refused, not misread."""
    q = np.zeros((3, 4, 64), np.float16)
    batch = kernels.AttentionBatch(q, 4 * 64, np.zeros((5, 2, 2, 2, 16, 64), np.float16), 1,
                                   np.zeros((2, 4), np.int32), np.zeros(2, np.int32), np.zeros(3, np.int32), 0.1)
    with pytest.raises(ValueError, match="paged_prefill_f16_hd128 is compiled for head_dim 128, q has 64"):
        kernels.prefill_args(kernels.PAGED_PREFILL.kernel(T="f16", HD=128), q, batch, 2)
    with pytest.raises(ValueError, match="paged_decode_mma_f16_hd128 is compiled for head_dim 128, q has 64"):
        kernels.decode_args(kernels.PAGED_DECODE_MMA.kernel(T="f16", HD=128), q, batch,
                            dispatch.select_decode_kernel(64, "float16", 16, 2, 4, 2, 10, 132))
    plan = dispatch.select_decode_kernel(64, "float16", 16, 2, 4, 2, 10, 132)
    with pytest.raises(ValueError, match="paged_decode_f16_hd128_g2 is compiled for head_dim 128"):
        kernels.decode_args(kernels.PAGED_DECODE.kernel(T="f16", HD=128, GT=2), q, batch, plan)
    assert len(kernels.decode_args(kernels.kernel(plan.kernel), q, batch, plan)) == 21     # hd64_g2: fits (20 + sliding_window)
    assert len(kernels.decode_args(kernels.PAGED_DECODE.kernel(T="f16", HD=0, GT=2), q, batch, plan)) == 21
