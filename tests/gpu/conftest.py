"""tests/gpu: run only where CuPy sees a CUDA device; every test here gets the `gpu` marker.

Without CuPy, or with cupy.is_available() false, the whole folder is skipped with the reason.
"""
from __future__ import annotations

from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent


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
