"""Step 1 of tools/gpu_check.sh: what the device is, whether bf16 works in CuPy's own kernels, and
every kernel module compiled, with each kernel's registers, local and shared memory.

    PYTHONPATH=. python tools/gpu_preflight.py [--md FILE]

Versions: Python, NumPy, CuPy, CUDA runtime and driver, Numba, ml_dtypes, torch (not imported by
rawpaged: only asked for its version string here), nvcc and compute-sanitizer on the PATH.
bf16 smoke test: astype to/from bfloat16, fancy indexing, an add, each against ml_dtypes on the host.
Kernels: the sources are compiled in parallel processes first (they fill CuPy's on-disk cache,
CUPY_CACHE_DIR, so later steps load instead of compiling), then every kernel of the table is
loaded here and its attributes read from the compiled function (cupy.RawKernel.attributes).
A kernel with local memory (a spill or a stack array) is flagged. Exit status 1 if the bf16 test
or a compilation failed.
"""
from __future__ import annotations

import argparse
import importlib
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))
from gpu_common import Markdown, device_name, emulated, import_cupy  # noqa: E402

COMPILE_ONE = """
import sys, time
sys.path.insert(0, {repo!r}); sys.path.insert(0, {bench!r})
from gpu_common import import_cupy
import_cupy()
from rawpaged.backend.cuda import launch
t = time.perf_counter()
launch.function({kernel!r})           # NOTE: a RawModule compiles when first asked for a function
print(f"{{time.perf_counter() - t:.1f}}")
"""


def versions(md: Markdown, cp) -> None:
    rows = [["python", platform.python_version()]]
    for name in ("numpy", "cupy", "numba", "ml_dtypes", "safetensors", "tokenizers"):
        try:
            rows.append([name, getattr(importlib.import_module(name), "__version__", "?")])
        except Exception as err:
            rows.append([name, f"missing ({type(err).__name__})"])
    try:
        from importlib.metadata import version
        rows.append(["torch (bench only)", version("torch")])
    except Exception:
        rows.append(["torch (bench only)", "missing"])
    rt = cp.cuda.runtime
    rows.append(["CUDA runtime / driver", f"{rt.runtimeGetVersion()} / {rt.driverGetVersion()}"])
    props = rt.getDeviceProperties(cp.cuda.Device().id)
    rows.append(["device", f"{device_name(cp)}, compute capability {props.get('major')}.{props.get('minor')}, "
                           f"{props.get('multiProcessorCount')} SMs, L2 {props.get('l2CacheSize', 0) / 2**20:.0f} MiB"])
    free, total = rt.memGetInfo()
    rows.append(["device memory", f"{total / 2**30:.1f} GiB, {free / 2**30:.1f} GiB free"])
    for tool in ("nvcc", "compute-sanitizer", "nvidia-smi"):
        path = shutil.which(tool)
        rows.append([tool, path or "not on PATH"])
    if emulated():
        rows.append(["backend", "HOST EMULATION (tests/cuda_emulator.py): a dry run, no GPU"])
    md("### Versions", "")
    md.table(["what", "value"], rows)
    md("")


def bf16_smoke(md: Markdown, cp) -> bool:
    """CuPy's own elementwise and indexing kernels on ml_dtypes.bfloat16 arrays, against the host."""
    import ml_dtypes
    import numpy as np
    bf16 = np.dtype(ml_dtypes.bfloat16)
    rng = np.random.default_rng(0)
    x = rng.standard_normal(1000).astype(np.float32)
    idx = rng.integers(0, 1000, 300)
    checks = []
    try:
        d = cp.asarray(x).astype(bf16)                                 # fp32 -> bf16 on the device
        checks.append(("astype fp32->bf16", np.array_equal(cp.asnumpy(d).view(np.uint16), x.astype(bf16).view(np.uint16))))
        checks.append(("astype bf16->fp32", np.array_equal(cp.asnumpy(d.astype(cp.float32)), x.astype(bf16).astype(np.float32))))
        checks.append(("fancy indexing", np.array_equal(cp.asnumpy(d[cp.asarray(idx)]).view(np.uint16),
                                                        x.astype(bf16)[idx].view(np.uint16))))
        want = (x.astype(bf16).astype(np.float32) * 2).astype(bf16)
        checks.append(("add", np.array_equal(cp.asnumpy(d + d).view(np.uint16), want.view(np.uint16))))
        h = x.astype(bf16)
        checks.append(("upload bf16 host array", np.array_equal(cp.asnumpy(cp.asarray(h)).view(np.uint16), h.view(np.uint16))))
    except Exception as err:
        checks.append((f"raised {type(err).__name__}: {str(err).splitlines()[0][:160]}", False))
    md("### bfloat16 in CuPy's own kernels", "")
    md.table(["check", "result"], [[name, "ok" if ok else "**FAILED**"] for name, ok in checks])
    md("")
    return all(ok for _, ok in checks)


def compile_all(md: Markdown) -> bool:
    """Every source (paged_attention.cu once per dtype) compiled in parallel processes."""
    from rawpaged.backend.cuda import kernels
    first = {}
    for k in kernels.KERNELS.values():
        first.setdefault((k.source, k.tag), k.name)
    jobs = sorted(first)
    t = time.perf_counter()
    procs = {job: subprocess.Popen([sys.executable, "-c", COMPILE_ONE.format(repo=str(REPO), bench=str(REPO / "bench"),
                                                                              kernel=first[job])],
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for job in jobs}
    rows, ok = [], True
    for (source, tag), p in procs.items():
        out, err = p.communicate()
        if p.returncode == 0:
            rows.append([f"{source} {tag}".strip(), f"{out.strip()} s"])
        else:
            ok = False
            rows.append([f"{source} {tag}".strip(), "**FAILED**: " + " / ".join(err.strip().splitlines()[-3:])[:400]])
    md(f"### Compilation ({len(jobs)} modules in parallel, {time.perf_counter() - t:.1f} s wall)", "")
    md.table(["module", "compile"], rows)
    md("")
    return ok


def kernel_attributes(md: Markdown) -> bool:
    from rawpaged.backend.cuda import kernels, launch
    rows, flagged, ok = [], [], True
    for name, k in kernels.KERNELS.items():
        try:
            a = launch.function(name).attributes
        except Exception as err:
            ok = False
            rows.append([name, "**FAILED**", str(err).splitlines()[0][:120], "", "", ""])
            continue
        rows.append([name, a["num_regs"], a["local_size_bytes"], a["shared_size_bytes"], a["max_threads_per_block"],
                     a["binary_version"]])
        if a["local_size_bytes"]:
            flagged.append(name)
        if a["max_threads_per_block"] < k.max_threads:
            ok = False
            flagged.append(f"{name} (takes {a['max_threads_per_block']} threads, the table launches up to {k.max_threads})")
    md(f"### Kernels ({len(rows)}): registers, local (spills, stack) and static shared bytes per thread/block", "")
    if flagged:
        md(f"**flagged ({len(flagged)}: local memory, or fewer threads than the table launches)**: "
           f"{', '.join(flagged)}", "")
    else:
        md("No kernel uses local memory; every kernel takes the block size the table launches.", "")
    md.table(["kernel", "registers", "local B", "static shared B", "max threads/block", "binary"], rows)
    md("")
    return ok


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--md", help="also append the Markdown here")
    args = ap.parse_args(argv)
    md = Markdown(args.md)
    cp = import_cupy()
    versions(md, cp)
    ok = bf16_smoke(md, cp)
    ok = compile_all(md) and ok
    ok = kernel_attributes(md) and ok
    md(f"preflight: {'ok' if ok else 'FAILED'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
