"""Shared pytest fixtures.

The read-only test data (real checkpoints, tokenizers, golden files, workloads) lives outside the
repository; tests find it through RAWPAGED_TEST_DATA (default: ../shared/data next to the repo root)
and skip, saying why, where it is absent.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """The shared test data folder (skips the test when it is missing)."""
    path = Path(os.environ.get("RAWPAGED_TEST_DATA", REPO_ROOT.parent / "shared" / "data"))
    if not path.is_dir():
        pytest.skip(f"test data not found at {path} (set RAWPAGED_TEST_DATA to the shared data folder)")
    return path


@pytest.fixture(scope="session")
def stories260k_dir(data_dir: Path, tmp_path_factory) -> Path:
    """stories260K converted once per session into a Hugging Face LlamaForCausalLM directory."""
    from rawpaged.convert.llama2c import convert_llama2c

    src = data_dir / "models" / "stories260K"
    if not (src / "stories260K.bin").is_file():
        pytest.skip(f"stories260K checkpoint not found in {src}")
    out = tmp_path_factory.mktemp("stories260K") / "hf"
    return convert_llama2c(src / "stories260K.bin", src / "tok512.bin", out)
