"""Every kernels_cuda/*.cu file compiles for sm_80 and sm_90, and the main instantiations do not spill.

nvcc -cubin -Xptxas -v reports, per kernel, registers, spill stores/loads, stack frame and shared
memory; we parse that and fail on any compile error, on a missing instantiation and on any spill or
local-memory stack in the main instantiations (head size 128, fp16 and bf16; the block size is a
runtime argument). The PTX of the sm_90 build is kept to check what the source promises: 16-byte
vector loads in the decode kernel, tensor-core mma.sync in the prefill kernel.

With no nvcc, NVRTC (the nvidia-cuda-nvrtc wheel through cuda-python) compiles instead, checking
errors only; with neither the test is skipped with a reason. Runs in ~30 s on 2 cores (each file
compiled once per architecture in a session fixture, two compiles at a time).
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from kernels_cuda import DIR as KERNEL_DIR, SOURCES
from rawpaged.backend.cuda import all_kernel_names

ARCHS = ("sm_80", "sm_90")
MAIN_INSTANTIATIONS = (
    [f"paged_decode_{t}_hd128_g{g}" for t in ("f16", "bf16") for g in (1, 2, 4, 8)]
    + [f"paged_prefill_{t}_hd128" for t in ("f16", "bf16")]
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
    cmd = [NVCC, "-cubin", f"-arch={arch}", "--std=c++17", "-Xptxas", "-v", "--keep", "--keep-dir", str(keep),
           "-o", str(keep / (source + ".cubin")), str(KERNEL_DIR / source)]
    res = subprocess.run(cmd, capture_output=True, text=True)
    log = res.stdout + res.stderr
    return res.returncode, log, parse_ptxas(log)


def _nvrtc_build(source: str, arch: str, out_dir: Path) -> tuple[int, str, dict]:
    from kernels_cuda import read_source
    src = read_source(source).encode()
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


@pytest.mark.parametrize("arch", ARCHS)
def test_main_instantiations_do_not_spill(builds, arch):
    results, _ = builds
    merged: dict[str, dict] = {}
    for source in SOURCES:
        merged.update(results[(arch, source)][2])
    if not merged:
        pytest.skip("no ptxas report to check")
    report = []
    for name in MAIN_INSTANTIATIONS:
        k = merged[name]
        report.append(f"{name}: {k}")
        assert k.get("spill_stores", 0) == 0 and k.get("spill_loads", 0) == 0, f"{name} spills on {arch}: {k}"
        assert k.get("stack", 0) == 0, f"{name} uses a local-memory stack frame on {arch}: {k}"
        assert 0 < k["registers"] <= 255
    print("\n".join(report))


@pytest.mark.skipif(NVCC is None, reason="PTX inspection needs nvcc's --keep output")
def test_ptx_has_vector_loads_and_tensor_core_mma(builds):
    _, out = builds
    ptx_files = list((out / "sm_90_paged_attention.cu").glob("*.ptx"))
    assert ptx_files, "nvcc --keep left no PTX"
    ptx = ptx_files[0].read_text()

    def body(kernel: str) -> str:
        start = ptx.index(f".entry {kernel}(")
        nxt = ptx.find(".entry ", start + 10)
        return ptx[start: nxt if nxt > 0 else len(ptx)]

    for t in ("f16", "bf16"):
        decode = body(f"paged_decode_{t}_hd128_g1")
        assert "ld.global.nc.v4.u32" in decode, f"decode {t}: K/V are not read with 16-byte loads"
        assert "shfl.sync.bfly" in decode
        prefill = body(f"paged_prefill_{t}_hd128")
        assert f"mma.sync.aligned.m16n8k16.row.col.f32.{t}.{t}.f32" in prefill, f"prefill {t}: no tensor-core mma"
