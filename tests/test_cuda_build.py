"""Every kernels_cuda/*.cu program compiles for sm_80 and sm_90, no kernel spills, and every
kernel's compiled parameter list is what its argument builder passes.

What is compiled is what NVRTC gets on a device: kernels.program(source), the .cu text with the
header pasted in and the extern "C" entry points generated from the table in
rawpaged/backend/cuda/kernels.py. nvcc -cubin -Xptxas -v reports, per kernel, registers, spill
stores/loads, stack frame and shared memory; we parse that and fail on any compile error or warning,
on a kernel of the table missing from the build, and on any spill or local-memory stack. With
--keep, nvcc leaves two views of each kernel's parameters, which we read back:
  - the PTX `.entry name(.param .u64 ..., .param .u32 ..., .param .f32 ...)`: count and widths;
  - the front end's host stub (`*.cudafe1.stub.c`), which registers each kernel with its C
    parameter types (`__cudaRegisterEntry(..., (void (*)(struct f16 *, long long, int, ...))name,
    name, <launch bound>)`): pointer or integer (PTX spells both .u64) and the pointee type;
and compare them, position by position, with the tuple each kernel's builder returns for sample
inputs (an array of the right dtype, NULL, np.int32, np.int64 or np.float32). The PTX also shows
what the source promises: 16-byte vector loads in decode, tensor-core mma.sync in prefill.

With no nvcc, NVRTC (the nvidia-cuda-nvrtc wheel through cuda-python) compiles instead, checking
errors only; with neither the test is skipped with a reason. Runs in ~30 s on 2 cores (each program
compiled once per architecture in a session fixture, two compiles at a time).
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from kernels_cuda import SOURCES
from rawpaged.backend.cuda import all_kernel_names, dispatch, kernels

ARCHS = ("sm_80", "sm_90")
MAIN_INSTANTIATIONS = (
    [f"paged_decode_{t}_hd128_g{g}" for t in ("f16", "bf16") for g in (1, 2, 4, 8)]
    + [f"paged_decode_mma_{t}_hd{hd}" for t in ("f16", "bf16") for hd in (128, 256)]
    + [f"paged_prefill_{t}_hd{hd}" for t in ("f16", "bf16") for hd in (128, 256)]
    + [f"paged_decode_reduce_{t}" for t in ("f16", "bf16")]
    + [f"reshape_and_cache_{t}" for t in ("f16", "bf16")]
    + ["copy_blocks_kernel"]
)


def _find_nvcc() -> str | None:
    for cand in (shutil.which("nvcc"), os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "nvcc")):
        if cand and os.path.isfile(cand) and os.access(cand, os.X_OK):
            return cand
    return None


def _nvrtc():
    try:
        from cuda.bindings import nvrtc  # cuda-python >= 12.6
        return nvrtc
    except Exception:
        try:
            from cuda import nvrtc  # older cuda-python
            return nvrtc
        except Exception:
            return None


NVCC = _find_nvcc()
NVRTC = None if NVCC else _nvrtc()
pytestmark = pytest.mark.skipif(NVCC is None and NVRTC is None,
                                reason="neither nvcc nor an NVRTC binding (cuda-python + nvidia-cuda-nvrtc) is available")

_ENTRY = re.compile(r"Compiling entry function '(\w+)' for '(\w+)'")
_PROPS = re.compile(r"Function properties for (\w+)")
_SPILL = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_USED = re.compile(r"Used (\d+) registers(?:.*?(\d+) bytes smem)?")


def parse_ptxas(log: str) -> dict[str, dict[str, int]]:
    """ptxas -v output -> {kernel: {registers, spill_stores, spill_loads, stack, smem}}."""
    info: dict[str, dict[str, int]] = {}
    current = None
    for line in log.splitlines():
        m = _ENTRY.search(line) or _PROPS.search(line)
        if m:
            current = m.group(1)
            info.setdefault(current, {})
            continue
        if current is None:
            continue
        m = _SPILL.search(line)
        if m:
            info[current].update(stack=int(m.group(1)), spill_stores=int(m.group(2)), spill_loads=int(m.group(3)))
        m = _USED.search(line)
        if m:
            info[current].update(registers=int(m.group(1)), smem=int(m.group(2) or 0))
    return info


def _nvcc_build(source: str, arch: str, out_dir: Path) -> tuple[int, str, dict]:
    keep = out_dir / f"{arch}_{source}"
    keep.mkdir(parents=True, exist_ok=True)
    program = keep / source                      # the text NVRTC compiles on a device (every dtype)
    program.write_text(kernels.program(source))
    cmd = [NVCC, "-cubin", f"-arch={arch}", "--std=c++17", "-Xptxas", "-v", "--keep", "--keep-dir", str(keep),
           "-o", str(keep / (source + ".cubin")), str(program)]
    res = subprocess.run(cmd, capture_output=True, text=True)
    log = res.stdout + res.stderr
    return res.returncode, log, parse_ptxas(log)


def _nvrtc_build(source: str, arch: str, out_dir: Path) -> tuple[int, str, dict]:
    src = kernels.program(source).encode()
    err, prog = NVRTC.nvrtcCreateProgram(src, source.encode(), 0, [], [])
    opts = [f"-arch={arch}".encode(), b"--std=c++17", b"--ptxas-options=-v"]
    (rc,) = NVRTC.nvrtcCompileProgram(prog, len(opts), opts)
    _, size = NVRTC.nvrtcGetProgramLogSize(prog)
    buf = b" " * size
    NVRTC.nvrtcGetProgramLog(prog, buf)
    log = buf.decode(errors="replace")
    return (0 if int(rc) == 0 else 1), log, parse_ptxas(log)


@pytest.fixture(scope="session")
def builds(tmp_path_factory):
    """{(arch, source): (returncode, log, per-kernel info)}, two compiles at a time."""
    out = tmp_path_factory.mktemp("cuda_build")
    build = _nvcc_build if NVCC else _nvrtc_build
    jobs = [(s, a) for a in ARCHS for s in sorted(SOURCES, key=lambda s: s != "paged_attention.cu")]
    with ThreadPoolExecutor(max_workers=2) as pool:
        results = list(pool.map(lambda job: build(job[0], job[1], out), jobs))
    return {(a, s): r for (s, a), r in zip(jobs, results)}, out


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("source", SOURCES)
def test_compiles_with_every_kernel(builds, arch, source):
    results, _ = builds
    rc, log, info = results[(arch, source)]
    assert rc == 0, f"{source} failed to compile for {arch}:\n{log[-6000:]}"
    assert "warning" not in log.lower(), f"{source} ({arch}) compiled with warnings:\n{log[-3000:]}"
    if NVCC is None and not info:
        pytest.skip("NVRTC gave no ptxas report; only the compile itself was checked")
    missing = [k for k in all_kernel_names()[source] if k not in info]
    assert not missing, f"{source} ({arch}) lacks kernels the dispatcher can ask for: {missing}"
    assert set(info) == set(all_kernel_names()[source]), f"{source} ({arch}) has kernels the table does not list"


@pytest.mark.parametrize("arch", ARCHS)
def test_no_kernel_spills(builds, arch):
    """Every kernel of the table: no spill stores or loads, no local-memory stack frame."""
    results, _ = builds
    merged: dict[str, dict] = {}
    for source in SOURCES:
        merged.update(results[(arch, source)][2])
    if not merged:
        pytest.skip("no ptxas report to check")
    for name in kernels.KERNELS:
        k = merged[name]
        assert k.get("spill_stores", 0) == 0 and k.get("spill_loads", 0) == 0, f"{name} spills on {arch}: {k}"
        assert k.get("stack", 0) == 0, f"{name} uses a local-memory stack frame on {arch}: {k}"
        assert 0 < k["registers"] <= 255
    print("\n".join(f"{name}: {merged[name]}" for name in MAIN_INSTANTIATIONS))


def _kept(builds, arch: str, source: str, suffix: str) -> str:
    _, out = builds
    found = list((out / f"{arch}_{source}").glob(f"*{suffix}"))
    assert len(found) == 1, f"nvcc --keep left {found} for *{suffix}"
    return found[0].read_text()


@pytest.mark.skipif(NVCC is None, reason="PTX inspection needs nvcc's --keep output")
def test_ptx_has_vector_loads_and_tensor_core_mma(builds):
    ptx = _kept(builds, "sm_90", "paged_attention.cu", ".ptx")

    def body(kernel: str) -> str:
        start = ptx.index(f".entry {kernel}(")
        nxt = ptx.find(".entry ", start + 10)
        return ptx[start: nxt if nxt > 0 else len(ptx)]

    for t in ("f16", "bf16"):
        decode = body(f"paged_decode_{t}_hd128_g1")
        assert "ld.global.nc.v4.u32" in decode, f"decode {t}: K/V are not read with 16-byte loads"
        assert "shfl.sync.bfly" in decode
        mma = f"mma.sync.aligned.m16n8k16.row.col.f32.{t}.{t}.f32"
        for hd in (128, 256):
            for kind in ("decode_mma", "prefill"):
                code = body(f"paged_{kind}_{t}_hd{hd}")
                assert mma in code, f"{kind} {t} hd{hd}: no tensor-core mma"
                assert "cp.async.cg.shared.global" in code and "cp.async.wait_group" in code, f"{kind}: no cp.async"
                assert "ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16" in code, f"{kind}: V not by ldmatrix.trans"
                assert "ldmatrix.sync.aligned.m8n8.x4.shared.b16" in code, f"{kind}: K not by ldmatrix"
        # Q in registers (head size <= 128): the plain ldmatrix are K's alone (HD/16 k-steps x BN/16 pairs
        # of key n-tiles, unrolled), and Q arrives once as HD/4 4-byte fragment loads per lane
        plain = "ldmatrix.sync.aligned.m8n8.x4.shared.b16"
        prefill, decode = body(f"paged_prefill_{t}_hd128"), body(f"paged_decode_mma_{t}_hd128")
        assert prefill.count(plain) == 8 * kernels.prefill_bn(128) // 16 and decode.count(plain) == 8
        assert prefill.count("ld.global.nc.u32") >= 32 and decode.count("ld.global.nc.u32") >= 32


# --------------------------------------------------------------------------------------------
# Parameter lists: what nvcc compiled vs what the argument builders pass
# --------------------------------------------------------------------------------------------
_PTX_ENTRY = re.compile(r"\.entry\s+(\w+)\s*\((.*?)\)", re.DOTALL)
_PTX_PARAM = re.compile(r"\.param\s+((?:\.\w+\s+)*)\w+")
_STUB_ENTRY = re.compile(r"__cudaRegisterEntry\(\w+, \(\(void \( \*\)\(([^()]*)\)\)(\w+)\), \2, (-?\d+)\);")


def parse_ptx_params(ptx: str) -> dict[str, list[str]]:
    """PTX -> {kernel: ['u64', 'u32', 'f32', ...]} (the .param type of each parameter in order)."""
    return {name: [m.group(1).split()[0].lstrip(".") for m in _PTX_PARAM.finditer(params)]
            for name, params in _PTX_ENTRY.findall(ptx)}


def parse_stub_entries(stub: str) -> dict[str, tuple[list[str], int]]:
    """nvcc's host stub -> {kernel: ([C parameter types], launch bound)} from its __cudaRegisterEntry calls."""
    return {name: ([t.strip() for t in types.split(",")] if types.strip() else [], int(bound))
            for types, name, bound in _STUB_ENTRY.findall(stub)}


def compiled_signatures(builds, arch: str) -> dict[str, dict]:
    """{kernel: {ptx: [...], ctypes: [...], bound: n}} for every kernel nvcc built for `arch`."""
    sigs = {}
    for source in SOURCES:
        ptx = parse_ptx_params(_kept(builds, arch, source, ".ptx"))
        stub = parse_stub_entries(_kept(builds, arch, source, ".cudafe1.stub.c"))
        assert set(ptx) == set(stub) and ptx, f"{source}: PTX entries {sorted(ptx)} vs stub entries {sorted(stub)}"
        for name in ptx:
            sigs[name] = dict(ptx=ptx[name], ctypes=stub[name][0], bound=stub[name][1])
    return sigs


_POINTEE = {"f16": "float16", "bf16": "bfloat16", "float": "float32", "int": "int32", "long long": "int64",
            "uint4": None}
_PTX_WIDTHS = {"ptr": ("u64", "b64"), "i64": ("u64", "s64", "b64"), "i32": ("u32", "s32", "b32"), "f32": ("f32",)}
_SCALAR_CTYPES = {"i32": "int", "i64": "long long", "f32": "float"}


def builder_kind(v) -> tuple[str, str | None]:
    """What one element of a builder's tuple passes: ('ptr', array dtype | None for NULL), ('i32', None) ..."""
    if v is kernels.NULL:
        return "ptr", None
    if isinstance(v, np.ndarray):
        return "ptr", v.dtype.name
    for kind, cls in (("i32", np.int32), ("i64", np.int64), ("f32", np.float32)):
        if type(v) is cls:
            return kind, None
    return f"unexpected {type(v).__name__}", None


def signature_problems(name: str, args: tuple, compiled: dict) -> list[str]:
    """How a builder's tuple differs from the compiled parameter list (empty: they agree)."""
    ptx, ctypes = compiled["ptx"], compiled["ctypes"]
    if len(args) != len(ptx) or len(args) != len(ctypes):
        return [f"{name}: the builder passes {len(args)} arguments, the kernel takes {len(ptx)} (PTX) / {len(ctypes)} (C)"]
    problems = []
    for i, (v, width, ctype) in enumerate(zip(args, ptx, ctypes)):
        kind, dtype = builder_kind(v)
        base = " ".join(ctype.replace("__restrict__", "").replace("const ", "").replace("struct ", "").split())
        is_ptr = base.endswith("*")
        if kind not in _PTX_WIDTHS:
            problems.append(f"{name} arg {i}: the builder passes {kind}")
        elif width not in _PTX_WIDTHS[kind]:
            problems.append(f"{name} arg {i}: the builder passes {kind}, the PTX parameter is .{width}")
        elif (kind == "ptr") != is_ptr or (kind != "ptr" and base != _SCALAR_CTYPES[kind]):
            problems.append(f"{name} arg {i}: the builder passes {kind}, the kernel takes {ctype!r}")
        elif kind == "ptr" and dtype is not None:
            want = _POINTEE.get(base[:-1].strip(), "unknown pointee")
            if want is not None and want != dtype:
                problems.append(f"{name} arg {i}: the builder passes a {dtype} array, the kernel takes {ctype!r}")
    return problems


# Sample inputs for every launch kind: small NumPy arrays of the dtypes an op passes (values unused).
def _dt(tag: str):
    if tag == "bf16":
        return np.dtype(pytest.importorskip("ml_dtypes").bfloat16)
    return np.dtype({"f16": np.float16, "f32": np.float32}[tag])


def _attention_batch(k: kernels.Kernel, head_dim: int = 64):
    d = k.dtypes()["T"]
    hd = dict(zip(k.family.template, k.targs)).get("HD") or head_dim
    q = np.zeros((3, 4, hd), _dt(d))
    kv = np.zeros((5, 2, 2, 2, 16, hd), _dt(d))
    batch = kernels.AttentionBatch(q, 4 * hd, kv, 1, np.zeros((2, 4), np.int32), np.zeros(2, np.int32),
                                   np.zeros(3, np.int32), 0.125)
    plan = dispatch.Launch(k.name, (1, 1, 1), (128, 1, 1), 0, use_split_k=True, num_partitions=2, partition_align=16)
    rows = 2 * 4 * 2
    scratch = (np.zeros((rows, hd), np.float32), np.zeros(rows, np.float32), np.zeros(rows, np.float32))
    return q, batch, plan, scratch


def _attention_samples(k):
    q, batch, plan, scratch = _attention_batch(k)
    out = np.zeros_like(q)
    if k.family in (kernels.PAGED_DECODE, kernels.PAGED_DECODE_MMA):
        return [kernels.decode_args(k, out, batch, plan, scratch), kernels.decode_args(k, out, batch, plan)]
    if k.family is kernels.PAGED_DECODE_REDUCE:
        return [kernels.decode_reduce_args(k, out, batch, plan, scratch)]
    if k.family is kernels.PAGED_PREFILL:
        return [kernels.prefill_args(k, out, batch, 2)]
    return [kernels.varlen_args(k, out, batch)]


def _cache_samples(k):
    if k.family is kernels.COPY_BLOCKS:
        return [kernels.copy_blocks_args(k, np.zeros((4, 2, 2, 2, 8, 16), np.float16), np.zeros((2, 2), np.int64))]
    dt = _dt(k.dtypes()["T"])
    key, value = np.zeros((3, 2, 16), dt), np.zeros((3, 2, 16), dt)
    return [kernels.reshape_and_cache_args(k, key, value, np.zeros((4, 2, 2, 2, 8, 16), dt), 1,
                                           np.zeros(3, np.int64), 32, 32, True)]


def _layer_samples(k):
    dt = _dt(k.dtypes()["T"])
    x, w = np.zeros((2, 32), dt), np.zeros(32, dt)
    f = k.family
    if f is kernels.RMS_NORM:
        return [kernels.rms_norm_args(k, np.zeros_like(x), x, w, 1e-5)]
    if f is kernels.FUSED_ADD_RMS_NORM:
        return [kernels.fused_add_rms_norm_args(k, x, np.zeros_like(x), w, 1e-5)]
    if f is kernels.LAYER_NORM:
        return [kernels.layer_norm_args(k, np.zeros_like(x), x, w, w, 1e-5),
                kernels.layer_norm_args(k, np.zeros_like(x), x, None, None, 1e-5)]
    if f is kernels.ROTARY:
        q, key = np.zeros((3, 4, 16), dt), np.zeros((3, 2, 16), dt)
        return [kernels.rotary_args(k, np.zeros(3, np.int64), q, key, np.zeros((8, 16), _dt(k.dtypes()["C"])),
                                    64, 32, True)]
    if f is kernels.SILU_AND_MUL:
        return [kernels.silu_and_mul_args(k, np.zeros((2, 16), dt), x)]
    if k.family is kernels.GELU_TANH_AND_MUL:
        return [kernels.gelu_tanh_and_mul_args(k, np.zeros((2, 16), dt), x)]
    return [kernels.unary_args(k, np.zeros_like(x), x, 1)]


def _fused_samples(k):
    dt = _dt(k.dtypes()["T"])
    if k.family is kernels.FUSED_ADD_LAYER_NORM:
        x, w = np.zeros((2, 32), dt), np.zeros(32, dt)
        return [kernels.fused_add_layer_norm_args(k, x, np.zeros_like(x), w, w, 1e-5),
                kernels.fused_add_layer_norm_args(k, x, np.zeros_like(x), None, None, 1e-5)]
    q, key = np.zeros((3, 4, 16), dt), np.zeros((3, 2, 16), dt)
    return [kernels.rotary_cache_args(k, np.zeros(3, np.int64), q, key, key, np.zeros((4, 2, 2, 2, 8, 16), dt), 1,
                                      np.zeros(3, np.int64), np.zeros((8, 16), _dt(k.dtypes()["C"])), 64, 32, 32, True)]


SAMPLES = {"paged_attention.cu": _attention_samples, "cache_ops.cu": _cache_samples, "norms.cu": _layer_samples,
           "rotary.cu": _layer_samples, "activations.cu": _layer_samples, "fused_ops.cu": _fused_samples}


def builder_tuples(k: kernels.Kernel) -> list[tuple]:
    """The tuples kernel k's builder returns for sample inputs (every variant: with and without NULLs)."""
    return SAMPLES[k.source](k)


@pytest.mark.skipif(NVCC is None, reason="the compiled parameter lists come from nvcc's --keep output")
@pytest.mark.parametrize("arch", ARCHS)
def test_every_builder_matches_the_compiled_parameter_list(builds, arch):
    pytest.importorskip("ml_dtypes")
    sigs = compiled_signatures(builds, arch)
    assert set(sigs) == set(kernels.KERNELS)
    checked = 0
    for name, k in kernels.KERNELS.items():
        for args in builder_tuples(k):
            assert signature_problems(name, args, sigs[name]) == []
            checked += 1
        assert sigs[name]["bound"] == k.max_threads, f"{name}: launch bound {sigs[name]['bound']} vs table {k.max_threads}"
    assert checked >= len(kernels.KERNELS)


@pytest.mark.skipif(NVCC is None, reason="the compiled parameter lists come from nvcc's --keep output")
def test_the_parameter_check_rejects_wrong_builders(builds, monkeypatch):
    """Deliberately wrong builders, each seen and named by signature_problems."""
    pytest.importorskip("ml_dtypes")
    sigs = compiled_signatures(builds, "sm_90")
    k = kernels.PAGED_DECODE.kernel(T="f16", HD=128, GT=4)
    q, batch, plan, scratch = _attention_batch(k)
    good = kernels.decode_args(k, np.zeros_like(q), batch, plan, scratch)
    assert signature_problems(k.name, good, sigs[k.name]) == []

    # 1. a table that declares q_stride an int: its builder passes np.int32 where the kernel takes long long
    params = tuple(kernels.Param(p.name, "int") if p.name == "q_stride" else p for p in k.params)
    family = kernels.Family("paged_decode", k.source, "paged_decode_impl", k.family.template, k.family.name_format,
                            params, (k.targs,), k.max_threads)
    monkeypatch.setattr(kernels, "PAGED_DECODE", family)
    wrong = family.kernel(T="f16", HD=128, GT=4)
    problems = signature_problems(k.name, kernels.decode_args(wrong, np.zeros_like(q), batch, plan, scratch), sigs[k.name])
    assert problems == [f"{k.name} arg 5: the builder passes i32, the PTX parameter is .u64"]

    # 2. a builder that forgets the last argument (scale)
    problems = signature_problems(k.name, good[:-1], sigs[k.name])
    assert len(problems) == 1 and "passes 20 arguments, the kernel takes 21" in problems[0]

    # 3. pointer and int64 swapped (q_stride before q): both are .u64 in PTX; the C types tell them apart
    swapped = good[:4] + (good[5], good[4]) + good[6:]
    assert signature_problems(k.name, swapped, sigs[k.name]) == [
        f"{k.name} arg 4: the builder passes i64, the kernel takes 'const struct f16 *'",
        f"{k.name} arg 5: the builder passes ptr, the kernel takes 'long long'"]

    # 4. an fp32 output array for an fp16 kernel
    wrong_out = (np.zeros(q.shape, np.float32),) + good[1:]
    assert signature_problems(k.name, wrong_out, sigs[k.name]) == [
        f"{k.name} arg 0: the builder passes a float32 array, the kernel takes 'struct f16 *'"]

    # 5. a float where an int goes, and a Python int that was never converted
    assert "arg 10" in signature_problems(k.name, good[:10] + (np.float32(1),) + good[11:], sigs[k.name])[0]
    assert "unexpected int" in signature_problems(k.name, good[:10] + (1,) + good[11:], sigs[k.name])[0]


def test_parsers_read_ptx_and_stub_entries():
    """The two parsers on text in the form nvcc 13 writes it (so a format change fails here, loudly)."""
    ptx = (".visible .entry k1(\n\t.param .u64 k1_param_0,\n\t.param .u32 k1_param_1,\n\t.param .f32 k1_param_2\n)\n"
           ".maxntid 128, 1, 1\n{\n}\n.visible .entry k2(\n\n)\n{\n}\n")
    assert parse_ptx_params(ptx) == {"k1": ["u64", "u32", "f32"], "k2": []}
    stub = ("__cudaRegisterEntry(__T39, ((void ( *)(struct uint4 *, const long long *, long long))copy_blocks_kernel), "
            "copy_blocks_kernel, 256); __cudaRegisterEntry(__T39, ((void ( *)(const struct f16 *, int, float))k), k, 128);")
    assert parse_stub_entries(stub) == {"copy_blocks_kernel": (["struct uint4 *", "const long long *", "long long"], 256),
                                        "k": (["const struct f16 *", "int", "float"], 128)}
