"""Read a Hugging Face model directory's weights as NumPy arrays (safetensors' NumPy API, no PyTorch).

Accepted layouts: `model.safetensors`, or shards named by `model.safetensors.index.json`.
PyTorch `.bin` checkpoints are refused with a pointer to `rawpaged convert hf`.
Every file is resolved inside the model directory (`paths.model_file`): an index entry such as
`/etc/passwd` or `../x`, or a symlink leaving the directory, is refused by name and never opened.
"""
from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from safetensors import safe_open

from rawpaged.convert.hf import SafetensorsFile
from rawpaged.convert.progress import Progress
from rawpaged.convert.paths import model_file
from rawpaged.errors import RawpagedError


def weight_files(model_dir: Path) -> list[Path]:
    """The safetensors files holding the model's weights, in a stable order."""
    index = model_file(model_dir, "model.safetensors.index.json")
    if index.is_file():
        files = [model_file(model_dir, name) for name in sorted(_index_shards(index))]
        for f in files:
            if not f.is_file():
                raise RawpagedError(f"shard {f.name} named by {index.name} is missing from {model_dir}")
        return files
    single = model_file(model_dir, "model.safetensors")
    if single.is_file():
        return [single]
    if list(model_dir.glob("*.safetensors")):
        return [model_file(model_dir, f.name) for f in sorted(model_dir.glob("*.safetensors"))]
    if list(model_dir.glob("pytorch_model*.bin")):
        raise RawpagedError(f"{model_dir} holds PyTorch .bin weights: convert them first with "
                            f"`rawpaged convert hf {model_dir} -o OUT_DIR`")
    raise RawpagedError(f"no model.safetensors or model.safetensors.index.json in {model_dir}")


def _index_shards(index: Path) -> set[str]:
    """The shard names an index's weight_map points at (checked: strings, read as given)."""
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) and v for v in weight_map.values()):
            raise TypeError("weight_map must map tensor names to file names")
    except json.JSONDecodeError as e:
        raise RawpagedError(f"{index} is not a valid safetensors index: {e}") from None
    except (KeyError, TypeError, ValueError, RecursionError) as e:
        raise RawpagedError(f"{index} is not a valid safetensors index: {type(e).__name__} {e}") from None
    return set(weight_map.values())


PROGRESS_MIN_BYTES = 256 << 20      # smaller models load too fast for a progress bar to help


def iter_tensors(model_dir: str | Path, progress: bool = False) -> Iterator[tuple[str, np.ndarray]]:
    """Yield (name, array) for every tensor of every weight file. BF16 arrives as float32.

    With `progress`, a bar on stderr counts tensors and bytes (only for a terminal and a model of at
    least PROGRESS_MIN_BYTES)."""
    files = weight_files(Path(model_dir))
    bar = None
    if progress and sys.stderr.isatty():
        entries = [SafetensorsFile(f).entries for f in files]
        total = sum(e.nbytes for es in entries for e in es.values())
        if total >= PROGRESS_MIN_BYTES:
            bar = Progress(sum(map(len, entries)), total, label="loading weights")
    for i, f in enumerate(files):
        for name, array in _read_file(f):
            if bar is not None:
                bar.update(entries[i][name].nbytes)        # bytes as stored (BF16 arrives widened)
                bar.tensor_done()
            yield name, array
    if bar is not None:
        bar.close()


def _read_file(path: Path) -> Iterator[tuple[str, np.ndarray]]:
    # NOTE: the header is checked first (a truncated file is named before any tensor is read);
    # BF16 tensors, which safetensors' NumPy API refuses, are widened to float32 by that reader.
    header = SafetensorsFile(path)
    # NOTE: the official parser's messages quote header content ("invalid type: string ..."); the
    # header checks above are as strict as its own, so its refusal is named, not quoted.
    try:
        handle = safe_open(str(path), framework="numpy")
    except Exception as e:  # safetensors raises its own error types; name the file
        raise RawpagedError(f"cannot read {path}: the safetensors library refused it ({type(e).__name__})") from None
    with handle as f:
        for name in f.keys():
            if header.entries[name].dtype == "BF16":
                yield name, header.get(name)
                continue
            try:
                yield name, f.get_tensor(name)
            except Exception as e:
                raise RawpagedError(f"cannot read tensor {name} from {path}: {_one_line(e)}") from None


def _one_line(e: Exception) -> str:
    return " ".join(str(e).split()) or type(e).__name__
