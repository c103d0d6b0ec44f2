"""Helpers shared by the benchmarks: where the data is, machine and commit facts, random models."""
from __future__ import annotations

import atexit
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def data_dir() -> Path:
    return Path(os.environ.get("RAWPAGED_TEST_DATA", REPO.parent / "shared" / "data"))


def commit() -> str:
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                             text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True).stdout.strip()
        return sha + ("+dirty" if dirty else "")
    except Exception:
        return "unknown"


def scratch_dir() -> Path:
    """A fresh temporary folder for a run's generated models, removed when the run exits.
    NOTE: a random model is ~200 MB; left behind, every run (and every test that runs a
    benchmark) filled /tmp a little more."""
    root = Path(tempfile.mkdtemp(prefix="rawpaged-bench-"))
    atexit.register(shutil.rmtree, root, True)
    return root


def machine() -> str:
    return f"{platform.machine()} {os.cpu_count()} cores, {platform.python_implementation()} {platform.python_version()}"


def stories260k(out_root: Path) -> Path:
    from rawpaged.convert.llama2c import convert_llama2c
    out = out_root / "stories260K"
    if not out.exists():
        src = data_dir() / "models" / "stories260K"
        convert_llama2c(src / "stories260K.bin", src / "tok512.bin", out)
    return out


def random_llama(out_root: Path, **kw) -> Path:
    """The issues' random LLaMA: hidden 512, 8 layers, 8 heads, 4 KV heads, vocab 32000 (overridable)."""
    from rawpaged.testing import make_random_llama
    shape = dict(hidden_size=512, num_layers=8, num_heads=8, num_kv_heads=4, vocab_size=32000)
    shape.update(kw)
    out = out_root / f"random-llama-{shape['hidden_size']}x{shape['num_layers']}"
    if not out.exists():
        make_random_llama(out, data_dir() / "tokenizers" / "llama-32k" / "tokenizer.json", **shape)
    return out
