"""Run a script with CuPy replaced by the host emulation when RAWPAGED_EMULATE_CUDA=1 (the dry run of
tools/gpu_check.sh), unchanged otherwise: for scripts that do not know about the emulation.

    PYTHONPATH=. python tools/gpu_emulated.py bench/throughput.py --device cuda ...
"""
from __future__ import annotations

import os
import runpy
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit("usage: gpu_emulated.py SCRIPT [ARGS...]")
    if os.environ.get("RAWPAGED_EMULATE_CUDA") == "1":
        sys.path.insert(0, str(REPO / "tests"))
        import cuda_emulator
        cuda_emulator.install_globally()
    script = sys.argv[1]
    sys.argv = sys.argv[1:]
    sys.path.insert(0, str(Path(script).resolve().parent))
    runpy.run_path(script, run_name="__main__")
