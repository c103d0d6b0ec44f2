"""CUDA C sources of rawpaged's GPU kernels, shipped as package data.

One `.cu` file per op family (paged_attention, cache_ops, norms, rotary, activations, fused_ops) plus the
shared headers `common.cuh` and `vec.cuh`. The files hold templates only: `rawpaged/backend/cuda/kernels.py` (the table of
every kernel) reads them with `read_source`, which pastes the header in place of its #include line
(so the text CuPy hashes for its kernel cache is the whole program), appends the generated extern "C"
entry points and hands the text to NVRTC through `cupy.RawModule`.
"""
from __future__ import annotations

import re
from pathlib import Path

DIR = Path(__file__).resolve().parent
SOURCES = ("paged_attention.cu", "cache_ops.cu", "norms.cu", "rotary.cu", "activations.cu", "fused_ops.cu")
HEADERS = ("common.cuh", "vec.cuh")

_INCLUDE = re.compile(r'^#include "([^"]+)"\s*$', re.MULTILINE)


def source_path(name: str) -> Path:
    """Path of one kernel source file, e.g. source_path("norms.cu")."""
    path = DIR / name
    if name not in SOURCES + HEADERS or not path.is_file():
        raise FileNotFoundError(f"no CUDA source {name!r} in {DIR} (have {', '.join(SOURCES + HEADERS)})")
    return path


def read_source(name: str, inline_headers: bool = True) -> str:
    """The text of a kernel source; with inline_headers, each `#include "x.cuh"` of ours is replaced
    by that header's text (once), so the result compiles with no include path."""
    text = source_path(name).read_text()
    if not inline_headers:
        return text
    seen: set[str] = set()

    def paste(match: re.Match) -> str:
        header = match.group(1)
        if header not in HEADERS:
            return match.group(0)
        if header in seen:
            return ""
        seen.add(header)
        body = source_path(header).read_text().replace("#pragma once", "")
        return f"// ---- begin {header} ----\n{body}\n// ---- end {header} ----"

    return _INCLUDE.sub(paste, text)
