"""bench/soak.py at a small size: the script cannot rot, and the server holds under a mixed load."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_small_soak_loses_nothing(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "NUMBA_CACHE_DIR": os.environ.get("NUMBA_CACHE_DIR", str(tmp_path / "numba"))}
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "soak.py"), "--streams", "60", "--bad", "11",
                        "--slow", "4", "--timeout", "2", "--deadline", "240"],
                       env=env, capture_output=True, text=True, timeout=400)
    assert r.returncode == 0, r.stdout + r.stderr[-3000:]
    row = [c.strip() for c in r.stdout.strip().splitlines()[2].strip("|").split("|")]
    requests, completed, disconnected, refused, lost, hung, cut, held, blocks = map(int, row[:9])
    assert (requests, lost, hung, held, blocks) == (75, 0, 0, 0, 0)
    assert refused == 11 and cut == 4 and completed + disconnected == 60 and disconnected > 0
