"""The CPU kernels compile once per machine: a second process loads every one of them from Numba's
on-disk cache (a kernel that misses recompiles at every start, seconds each)."""
import os
import subprocess
import sys

import pytest

SCRIPT = """
import sys
from rawpaged import LLM
llm = LLM(sys.argv[1], device="cpu", dtype=sys.argv[2], kv_cache_memory=8 << 20)
llm.generate(["Once upon a time"])
"""


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_second_start_compiles_nothing(dtype, stories260k_dir, tmp_path):
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path / "numba"), NUMBA_DEBUG_CACHE="1")

    def saved():
        r = subprocess.run([sys.executable, "-c", SCRIPT, str(stories260k_dir), dtype], env=env,
                           capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stderr[-2000:]
        return [ln for ln in r.stdout.splitlines() if "data saved" in ln]

    first = saved()
    assert first, "the first start compiled nothing: NUMBA_DEBUG_CACHE output changed?"
    assert saved() == [], "recompiled in the second process"
