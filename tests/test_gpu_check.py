"""tools/gpu_check.sh cannot rot between device runs: a dry run of the whole script on this machine.

- With RAWPAGED_EMULATE_CUDA=1 (and GPU_CHECK_QUICK=1: pytest subsets, --smoke benchmarks) every
  step runs on the host emulation of tests/cuda_emulator.py: the preflight compiles every module and
  reads the kernels' attributes, a subset of tests/gpu passes, tools/gpu_launch_all.py launches
  every kernel of the table, the benchmarks fill their tables, throughput runs --device cuda.
- Without CuPy every GPU step is skipped with its reason, the pytest steps show theirs.
- Either way the report is well formed and $OUT holds at most 8 files (what the device returns).
- The data the run reads travels in a folder tools/gpu_data.sh fills from $RAWPAGED_TEST_DATA.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from cuda_emulator import CXX

REPO = Path(__file__).resolve().parent.parent
STEPS = ["preflight", "op tests", "end to end", "compute-sanitizer", "kernel performance", "decode step", "throughput"]
NAME_OK = re.compile(r"^[A-Za-z0-9._-]+$")


def run_check(out: Path, env_extra: dict, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("RAWPAGED_EMULATE_CUDA", "GPU_CHECK_QUICK", "OUT")
           and not k.startswith("PYTEST_")}
    env.update({"OUT": str(out), "PYTHON": sys.executable, **env_extra})
    return subprocess.run(["bash", str(REPO / "tools" / "gpu_check.sh")], env=env, capture_output=True, text=True,
                          timeout=timeout)


def check_out_folder(out: Path) -> str:
    """What the device tool returns: at most 8 files, no deeper than 2 folders, plain names."""
    files = [p for p in out.rglob("*") if p.is_file()]
    assert 0 < len(files) <= 8, sorted(str(p) for p in files)
    for p in files:
        rel = p.relative_to(out)
        assert len(rel.parts) <= 3 and all(NAME_OK.match(part) for part in rel.parts), rel
        assert p.stat().st_size < 16 << 20, rel
    assert not list(out.rglob("*.nbi")) and not list(out.rglob("*.nbc")), "the Numba cache ended up in $OUT"
    return (out / "report.md").read_text()


def sections(report: str) -> list[str]:
    return re.findall(r"^## (\d)\. ", report, flags=re.M)


def summary_rows(report: str) -> list[list[str]]:
    table = report.split("| step | what | result | time | log |")[1].split("\n\n")[0]
    return [[c.strip() for c in line.strip("|").split("|")] for line in table.strip().splitlines()[1:]]


@pytest.fixture(scope="module")
def gpu_data(tmp_path_factory, data_dir) -> Path:
    dest = tmp_path_factory.mktemp("carry") / ".gpu_data"
    r = subprocess.run(["bash", str(REPO / "tools" / "gpu_data.sh"), str(dest)], capture_output=True, text=True,
                       env={**os.environ, "RAWPAGED_TEST_DATA": str(data_dir)})
    assert r.returncode == 0, r.stderr
    return dest


def test_gpu_data_holds_what_the_run_reads(gpu_data):
    for rel in ("models/stories260K/stories260K.bin", "models/stories260K/tok512.bin",
                "models/stories260K/greedy_reference.json", "tokenizers/llama-32k/tokenizer.json",
                "workloads/sharegpt_prompts_1000.json", "workloads/sharegpt_multiturn_lengths.csv", "SOURCE.txt"):
        assert (gpu_data / rel).is_file(), rel
    assert sum(p.stat().st_size for p in gpu_data.rglob("*") if p.is_file()) < 32 << 20


def test_gpu_data_names_a_missing_file_and_leaves_the_destination(tmp_path):
    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / "keep").write_text("x")
    r = subprocess.run(["bash", str(REPO / "tools" / "gpu_data.sh"), str(dest)], capture_output=True, text=True,
                       env={**os.environ, "RAWPAGED_TEST_DATA": str(tmp_path / "nowhere")})
    assert r.returncode == 1 and "models/stories260K/stories260K.bin not found" in r.stderr, r.stderr
    assert (dest / "keep").is_file()


@pytest.mark.skipif(CXX is None, reason="no C++ compiler (g++) to build the host emulation")
def test_dry_run_on_the_emulator(tmp_path, gpu_data):
    out = tmp_path / "out"
    r = run_check(out, {"RAWPAGED_EMULATE_CUDA": "1", "GPU_CHECK_QUICK": "1", "RAWPAGED_TEST_DATA": str(gpu_data),
                        # NOTE: builds are keyed by their text and the emulation header: safe to share
                        "RAWPAGED_EMU_BUILD_DIR": str(Path(tempfile.gettempdir()) / "rawpaged-emu-build"),
                        "NUMBA_CACHE_DIR": str(tmp_path / "numba"), "CUPY_CACHE_DIR": str(tmp_path / "cupy")})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    report = check_out_folder(out)
    assert "DRY RUN on the host emulation" in report
    rows = summary_rows(report)
    assert [row[0] for row in rows] == [str(i) for i in range(1, 8)]
    for row, step in zip(rows, STEPS):
        assert step in row[1] and row[2] == "ok", row
    assert sections(report) == [str(i) for i in range(1, 8)]
    assert "## Failures\n\nnone" in report
    assert "Traceback" not in report
    # what each step must have shown
    from rawpaged.backend.cuda import kernels
    n = len(kernels.KERNELS)
    assert f"### Kernels ({n})" in report and "| paged_decode_f16_hd128_g4 |" in report       # preflight
    assert "passed" in report.split("## 2. ")[1].split("## 3. ")[0]                        # op tests
    e2e = report.split("## 3. ")[1].split("## 4. ")[0]                                       # end to end
    assert "llama-gqa float16: logprob gap" in e2e and "llama-gqa bfloat16: logprob gap" in e2e, e2e
    assert f"launched {n} of {n} kernels" in report               # every kernel of the table, once at least
    for title in ("### Ceilings", "### Decode attention", "### Prefill attention", "### Memory-bound kernels",
                  "### GEMM"):
        assert title in report
    assert "| batch | mode | host ms | GPU ms (events)" in report                          # decode step (eager, graph)
    assert "| graph |" in report and "CUDA graphs: buckets" in report
    assert "| rawpaged (continuous batching, paged KV) |" in report                          # throughput
    assert re.search(r"^- commit: [0-9a-f]{40} ", report, flags=re.M), report[:600]


def test_without_a_gpu_every_step_skips_with_its_reason(tmp_path):
    out = tmp_path / "out"
    r = run_check(out, {"RAWPAGED_TEST_DATA": str(tmp_path / "no-data"), "GPU_CHECK_STEPS": "1,2,3,4,5,6"}, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    report = check_out_folder(out)
    assert "no usable CUDA device" in report.split("\n")[2]
    rows = summary_rows(report)
    assert len(rows) == 7
    for row in rows:
        if row[0] in ("2", "3"):               # pytest runs; every module skipped, with the reason
            assert row[2] == "skipped: no test ran (could not import 'cupy': No module named 'cupy')", row
        elif row[0] == "7":
            assert row[2] == "skipped: not in GPU_CHECK_STEPS=1,2,3,4,5,6", row
        else:
            assert row[2].startswith("skipped: no usable CUDA device"), row
    body = report.split("## 2. ")[1]
    assert "SKIPPED [" in body and ("could not import 'cupy'" in body or "no usable CUDA device" in body)
    assert "## Failures\n\nnone" in report


def test_steps_are_time_boxed_and_failures_listed(tmp_path):
    """A step that fails shows in the summary and the failures list, with its failing tests; a
    step that would start past the budget is skipped, saying so."""
    fake = tmp_path / "python"
    fake.write_text(f"""#!/usr/bin/env bash
if [ "$1 $2" = "-m pytest" ]; then
    echo "tests/gpu/test_ops_gpu.py::test_decode[1] PASSED"
    echo "FAILED tests/gpu/test_ops_gpu.py::test_decode[2] - AssertionError: boom"
    echo "1 failed, 1 passed in 0.10s"
    sleep 12
    exit 1
fi
exec {sys.executable} "$@"
""")
    fake.chmod(0o755)
    out = tmp_path / "out"
    r = run_check(out, {"PYTHON": str(fake), "GPU_CHECK_BUDGET": "24"}, timeout=120)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    report = check_out_folder(out)
    rows = {row[0]: row for row in summary_rows(report)}
    assert rows["2"][2] == "FAILED (rc 1)"
    failures = report.split("## Failures")[1].split("## 1.")[0]
    assert "step 2: FAILED tests/gpu/test_ops_gpu.py::test_decode[2] - AssertionError: boom" in failures
    assert "step 2 (op tests" in failures
    # 24 s of budget: step 2 took ~12 s, so step 3 would get < 15 s and every later one is out of time
    assert rows["3"][2].startswith("skipped: out of time"), rows["3"]
    assert rows["7"][2].startswith("skipped: out of time"), rows["7"]
