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


# -- serial and parallel compilations of one kernel (backend/cpu/jit.py) ---------------------------
TWINS = """
import numpy as np
from rawpaged.backend.cpu import elementwise
serial, parallel = elementwise._KERNELS["_rms_norm"]
x = np.random.default_rng(0).standard_normal((4, 8)).astype(np.float32)
w, out = np.ones(8, np.float32), np.empty_like(x)
for kernel in (serial, parallel):      # the serial one first: the order that made both serial
    kernel(x, w, np.float32(1e-5), out)

def runs_a_parfor(kernel):
    try:
        obj = kernel.overloads[kernel.signatures[0]].library.serialize_using_object_code()[2][0]
    except RuntimeError:               # no object code: it was loaded from the cache
        return None
    return b"__numba_parfor_gufunc" in obj

print(runs_a_parfor(serial), runs_a_parfor(parallel))
"""


def test_parallel_kernel_is_not_the_serial_one_from_the_cache(tmp_path):
    """numba#6845: Numba's cache keys a function without its compile options, so a parallel=True
    compilation of a function whose serial compilation is cached loaded the serial code (and the
    paged attention's parallel kernel ran on one thread). In a fresh cache, the serial kernel first:
    the parallel one must be compiled as such, with its prange as a parallel gufunc."""
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path / "numba"), NUMBA_NUM_THREADS="2")
    r = subprocess.run([sys.executable, "-c", TWINS], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.split() == ["False", "True"], r.stdout


def test_every_serial_parallel_pair_has_its_own_cache_index():
    from rawpaged.backend.cpu import attention, elementwise, gemm, lowp
    pairs = [attention.kernels(kind)[:2] for kind in (lowp.F32, lowp.BF16, lowp.F16)]
    pairs += list(elementwise._KERNELS.values()) + list(gemm._KERNELS.values())
    assert len(pairs) >= 12
    for serial, parallel in pairs:
        # NOTE: Numba's private attribute: the index file each dispatcher reads and writes
        paths = serial._cache._cache_file._index_path, parallel._cache._cache_file._index_path
        assert paths[0] != paths[1], paths
