"""Read a Hugging Face model directory's weights as NumPy arrays (safetensors' NumPy API, no PyTorch).

Two ways in:
  iter_tensors(dir)       (name, array) for every tensor, read whole (tests, converters);
  Checkpoint(dir).refs()  (name, TensorRef) for every tensor, read nothing yet: the model reads what
                          it holds, whole or a slice (`ref.read((slice(a, b), slice(None)))`), so a
                          tensor-parallel rank reads its shard and never the rest (safetensors'
                          `get_slice`; BF16, which its NumPy API refuses, through a memory map).

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

from rawpaged.convert.hf import SafetensorsFile, bf16_to_float32
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


class TensorRef:
    """One checkpoint tensor, not read yet: its name and shape, and reads of all or part of it."""

    def __init__(self, checkpoint: "Checkpoint", path: Path, header: SafetensorsFile, name: str):
        entry = header.entries[name]
        self.checkpoint, self.path, self.name = checkpoint, path, name
        self.shape: tuple[int, ...] = tuple(entry.shape)
        self.ndim = len(self.shape)
        self._entry = entry

    def read(self, index: tuple | None = None) -> np.ndarray:
        """The tensor, or `self[index]` for a tuple of slices (basic slicing: only those bytes are read)."""
        array = self._read(index)
        self.checkpoint.on_read(array.nbytes if self._entry.dtype != "BF16" else array.nbytes // 2)
        return array

    def _read(self, index):
        entry, name = self._entry, self.name
        if entry.dtype == "BF16":
            # NOTE: a read-only map of the tensor's bytes: slicing it touches only the slice's pages.
            bits = np.memmap(self.path, dtype=np.uint16, mode="r", offset=entry.start, shape=entry.shape)
            return bf16_to_float32(np.array(bits if index is None else bits[index]))
        try:
            handle = self.checkpoint.handle(self.path)
            if index is None:
                return handle.get_tensor(name)
            return handle.get_slice(name)[index]
        except RawpagedError:
            raise
        except Exception as e:
            raise RawpagedError(f"cannot read tensor {name} from {self.path}: {_one_line(e)}") from None


class Checkpoint:
    """A model directory's weight files, opened once; `refs()` names every tensor without reading it.

    `bytes_read` counts what the model asked for (as stored on disk): a tensor-parallel rank reads
    about 1/N of the checkpoint (tests/test_tensor_parallel.py measures it)."""

    def __init__(self, model_dir: str | Path, progress: bool = False):
        self.model_dir = Path(model_dir)
        self.files = weight_files(self.model_dir)
        self.headers = {f: SafetensorsFile(f) for f in self.files}
        self.bytes_read = 0
        self.tensors_read = 0
        self._handles: dict[Path, object] = {}
        total = sum(e.nbytes for h in self.headers.values() for e in h.entries.values())
        self._bar = None
        if progress and sys.stderr.isatty() and total >= PROGRESS_MIN_BYTES:
            count = sum(len(h.entries) for h in self.headers.values())
            self._bar = Progress(count, total, label="loading weights")

    def refs(self) -> Iterator[tuple[str, TensorRef]]:
        for path, header in self.headers.items():
            for name in header.keys():
                yield name, TensorRef(self, path, header, name)

    def handle(self, path: Path):
        if path not in self._handles:
            try:
                self._handles[path] = safe_open(str(path), framework="numpy")
            except Exception as e:  # safetensors raises its own error types; name the file
                raise RawpagedError(f"cannot read {path}: the safetensors library refused it "
                                    f"({type(e).__name__})") from None
        return self._handles[path]

    def on_read(self, nbytes: int) -> None:
        self.bytes_read += nbytes
        self.tensors_read += 1
        if self._bar is not None:
            self._bar.update(nbytes)
            self._bar.tensor_done()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        self._handles.clear()


def _one_line(e: Exception) -> str:
    return " ".join(str(e).split()) or type(e).__name__
