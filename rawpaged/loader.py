"""Read a Hugging Face model directory's weights as NumPy arrays (safetensors' NumPy API, no PyTorch).

Accepted layouts: `model.safetensors`, or shards named by `model.safetensors.index.json`.
PyTorch `.bin` checkpoints are refused with a pointer to `rawpaged convert hf`.
"""
from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from safetensors import safe_open

from rawpaged.errors import RawpagedError


def weight_files(model_dir: Path) -> list[Path]:
    """The safetensors files holding the model's weights, in a stable order."""
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise RawpagedError(f"{index} is not a valid safetensors index: {e}") from None
        files = sorted({model_dir / f for f in weight_map.values()})
        for f in files:
            if not f.is_file():
                raise RawpagedError(f"shard {f.name} named by {index.name} is missing from {model_dir}")
        return files
    single = model_dir / "model.safetensors"
    if single.is_file():
        return [single]
    if list(model_dir.glob("*.safetensors")):
        return sorted(model_dir.glob("*.safetensors"))
    if list(model_dir.glob("pytorch_model*.bin")):
        raise RawpagedError(f"{model_dir} holds PyTorch .bin weights: convert them first with "
                            f"`rawpaged convert hf {model_dir} -o OUT_DIR`")
    raise RawpagedError(f"no model.safetensors or model.safetensors.index.json in {model_dir}")


def iter_tensors(model_dir: str | Path) -> Iterator[tuple[str, np.ndarray]]:
    """Yield (name, array) for every tensor of every weight file. BF16 arrives as float32."""
    for f in weight_files(Path(model_dir)):
        yield from _read_file(f)


def _read_file(path: Path) -> Iterator[tuple[str, np.ndarray]]:
    header = _read_header(path)
    try:
        handle = safe_open(str(path), framework="numpy")
    except Exception as e:  # safetensors raises its own error types; name the file
        raise RawpagedError(f"cannot read {path}: {_one_line(e)}") from None
    with handle as f:
        for name in f.keys():
            if header[name]["dtype"] == "BF16":
                yield name, _read_bf16(path, header, name)
                continue
            try:
                yield name, f.get_tensor(name)
            except Exception as e:
                raise RawpagedError(f"cannot read tensor {name} from {path}: {_one_line(e)}") from None


def _read_header(path: Path) -> dict:
    """Parse the safetensors header ourselves to check the file is complete before reading it."""
    size = path.stat().st_size
    with open(path, "rb") as fh:
        raw = fh.read(8)
        if len(raw) < 8:
            raise RawpagedError(f"{path} is truncated: {size} bytes, shorter than a safetensors header")
        (n,) = struct.unpack("<Q", raw)
        if n > size - 8:
            raise RawpagedError(f"{path} is truncated or not safetensors: header says {n} bytes, file has {size}")
        try:
            header = json.loads(fh.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise RawpagedError(f"{path} is not a safetensors file (bad header)") from None
    header.pop("__metadata__", None)
    end = max((t["data_offsets"][1] for t in header.values()), default=0)
    if 8 + n + end > size:
        raise RawpagedError(f"{path} is truncated: tensors need {8 + n + end} bytes, file has {size}")
    for name, t in header.items():
        t["_base"] = 8 + n
    return header


def _read_bf16(path: Path, header: dict, name: str) -> np.ndarray:
    """bfloat16 is the top half of a float32: widen the 16-bit patterns by a shift."""
    t = header[name]
    start, end = t["data_offsets"]
    raw = np.fromfile(path, dtype="<u2", count=(end - start) // 2, offset=t["_base"] + start)
    return (raw.astype(np.uint32) << 16).view(np.float32).reshape(t["shape"])


def _one_line(e: Exception) -> str:
    return " ".join(str(e).split()) or type(e).__name__
