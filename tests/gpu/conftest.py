"""tests/gpu: run only where CuPy sees a CUDA device; every test here gets the `gpu` marker.

Without CuPy, or with cupy.is_available() false, the whole folder is skipped with the reason.
On a device:
  - after each test its engines and arrays are dropped and CuPy's pools hand their cached blocks
    back (`release_device`), so no test's KV cache shrinks the next one's budget;
  - RAWPAGED_TEST_TIMEOUT=N (tools/gpu_check.sh sets it) fails a test that runs longer than N
    seconds (SIGALRM: there is no pytest-timeout plugin to rely on), so one hang does not eat the
    run; a hang inside one CUDA call is cut by the `timeout` around the whole module instead.
"""
from __future__ import annotations

import gc
import os
import signal
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent

# NOTE: RAWPAGED_EMULATE_CUDA=1 runs this folder on the host emulation of tests/cuda_emulator.py
# (the dry run of tools/gpu_check.sh, and a check of these tests themselves before a device run).
if os.environ.get("RAWPAGED_EMULATE_CUDA") == "1":
    import cuda_emulator
    cuda_emulator.install_globally()


def _probe() -> tuple[bool, str]:
    try:
        import cupy
    except Exception as err:  # pragma: no cover - depends on the machine
        return False, f"CuPy not importable ({type(err).__name__}): GPU tests need cupy-cuda13x and a device"
    try:
        if not cupy.is_available():
            return False, "cupy.is_available() is false: no usable CUDA device"
    except Exception as err:  # pragma: no cover
        return False, f"CUDA probe failed: {err}"
    return True, ""


GPU_OK, GPU_REASON = _probe()


def pytest_collection_modifyitems(config, items):
    for item in items:
        if HERE in Path(str(item.fspath)).resolve().parents:
            item.add_marker(pytest.mark.gpu)
            if not GPU_OK:
                item.add_marker(pytest.mark.skip(reason=GPU_REASON))


def pytest_report_header(config):
    return None if GPU_OK else f"tests/gpu skipped: {GPU_REASON}"


@pytest.fixture(autouse=True)
def release_device():
    yield
    if GPU_OK:
        import cupy
        gc.collect()
        cupy.cuda.Device().synchronize()
        cupy.get_default_memory_pool().free_all_blocks()
        cupy.get_default_pinned_memory_pool().free_all_blocks()


class TestTimeout(Exception):
    pass


@pytest.fixture(autouse=True)
def per_test_timeout(request):
    limit = int(os.environ.get("RAWPAGED_TEST_TIMEOUT", "0") or 0)
    if limit <= 0 or not hasattr(signal, "SIGALRM"):
        yield
        return

    def expire(signum, frame):
        raise TestTimeout(f"{request.node.nodeid} ran past RAWPAGED_TEST_TIMEOUT={limit}s")
    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(limit)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
