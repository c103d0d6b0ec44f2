"""Hugging Face checkpoints (PyTorch .bin or safetensors) -> a rawpaged-ready model directory.

    python -m rawpaged.convert.hf SRC -o DST [--dtype float16|bfloat16|float32] [--max-shard-size 2GB] [--force]
    convert_hf(src, dst, dtype=None, max_shard_size="2GB", force=False, progress=True) -> Path

SRC holds one of (first found wins; safetensors are preferred because they need no pickle):
    model.safetensors.index.json + shards | model.safetensors
    pytorch_model.bin.index.json + shards | pytorch_model.bin     (read by torch_pickle, no torch)
DST gets what the loader reads directly: `model.safetensors` (one shard) or
`model-0000k-of-0000n.safetensors` + `model.safetensors.index.json`, `config.json` (`torch_dtype`
updated when --dtype is given) and the tokenizer / generation files copied as they are, plus a
`tokenizer.json` built from `tokenizer.model` or `vocab.json` + `merges.txt` when SRC has none.
An architecture rawpaged cannot run (`rawpaged.config.ARCHITECTURES`, the one table the engine
resolves against) is refused before anything is read or written.

The pipeline, each step a function below:
  1. list every source tensor lazily (name, dtype, shape; no data read)      -> SourceTensor
  2. fix names the way HF's own loader would (see `fix_names`)
  3. plan output shards greedily in source order, <= max_shard_size each      -> PlannedTensor lists
  4. per shard: write the header (sizes are known up front), then stream each tensor chunk by chunk
     (read 16 MiB, convert dtype, hash, write): peak memory ~ a few chunks, not a shard
  5. per shard: re-read what was written and compare dtype, shape and blake2b digest; the official
     safetensors parser must accept the file too
  6. all of it happens in a temporary directory next to DST, renamed to DST at the very end, so any
     failure (bad input, full disk, Ctrl-C) leaves nothing behind.

The source is untrusted (see "Untrusted files" in docs/DESIGN.md): every file is resolved inside SRC
(`paths.model_file`), zip entries are bounded by their declared sizes before anything is inflated
(`torch_pickle`), and the output may be at most `max_expansion` (default 4) times the source weight
files (`check_expansion`): expanded views cannot turn a kilobyte into gigabytes.

BF16 (NOTE): numpy has no bfloat16, and `safetensors.numpy` refuses BF16 files ("data type 'bfloat16'
not understood"). Here BF16 travels as its raw uint16 bit patterns: read as uint16, widened to float32
by shifting the 16 bits into the high half of a float32, narrowed with round-to-nearest-even (what
torch's `.to(torch.bfloat16)` does). BF16 output files are written by our own safetensors writer
(8-byte little-endian header length, JSON header, raw bytes) and are standard safetensors files.
Loaders read them with `SafetensorsFile` / `read_safetensors_bf16_aware` below.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import math
import os
import re
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from rawpaged.config import resolve_architecture
from rawpaged.convert.paths import check_model_files, model_file
from rawpaged.convert.progress import Progress
from rawpaged.convert.torch_pickle import DEFAULT_MAX_EXPANSION, MAX_DIMS, NUMPY_DTYPE, TensorRef, TorchArchive
from rawpaged.errors import RawpagedError

CHUNK_BYTES = 16 << 20
FLOAT_CODES = ("F64", "F32", "F16", "BF16")
# --dtype spellings -> safetensors code; and the config.json `torch_dtype` name of each code
DTYPE_CODES = {"float32": "F32", "fp32": "F32", "float16": "F16", "fp16": "F16", "half": "F16",
               "bfloat16": "BF16", "bf16": "BF16"}
TORCH_DTYPE_NAME = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}
# Files copied from SRC to DST as they are (those present).
COPIED_FILES = ("generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                "tokenizer.model", "added_tokens.json", "vocab.json", "merges.txt", "chat_template.jinja",
                "chat_template.json")
MAX_HEADER_BYTES = 100 << 20


# ---------------------------------------------------------------------------------------------
# Sizes and dtypes
# ---------------------------------------------------------------------------------------------

_SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
               "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(size: str | int) -> int:
    """'2GB' -> 2_000_000_000, '500MiB' -> 524_288_000, 1024 -> 1024 (HF's units: GB = 10^9)."""
    if isinstance(size, int) and not isinstance(size, bool):
        value = size
    else:
        match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B)?\s*", str(size), flags=re.IGNORECASE)
        unit = (match.group(2) or "").upper() if match else None
        if unit not in _SIZE_UNITS:
            raise RawpagedError(f"bad size {size!r}: expected a number with an optional unit such as 500MB, 2GB or 1GiB")
        value = int(float(match.group(1)) * _SIZE_UNITS[unit])
    if value <= 0:
        raise RawpagedError(f"bad size {size!r}: must be positive")
    return value


def parse_dtype(dtype: str | None) -> str | None:
    """--dtype value -> safetensors code ('F16', 'BF16', 'F32'), or None to keep the source dtypes."""
    if dtype is None:
        return None
    code = DTYPE_CODES.get(str(dtype).lower().removeprefix("torch."))
    if code is None:
        raise RawpagedError(f"unsupported dtype {dtype!r}: choose float16, bfloat16 or float32")
    return code


def bf16_to_float32(bits: np.ndarray) -> np.ndarray:
    """uint16 bf16 bit patterns -> float32 (exact): bf16 is the high half of an IEEE float32."""
    return (bits.astype(np.uint32) << 16).view(np.float32)


def float32_to_bf16(x: np.ndarray) -> np.ndarray:
    """float32 -> uint16 bf16 bit patterns, rounding to nearest even like torch."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    # Add 0x7FFF plus the lowest kept bit, then drop the low 16 bits: ties go to the even neighbour.
    # Finite values never overflow uint32 (largest is -inf's 0xFF800000 + 0x8000); NaNs are patched.
    bits = ((u + (np.uint32(0x7FFF) + ((u >> 16) & 1))) >> 16).astype(np.uint16)
    nan = np.isnan(x)
    if nan.any():
        bits[nan] = 0x7FC0  # torch's canonical bf16 NaN
    return bits


def convert_chunk(chunk: np.ndarray, src: str, dst: str) -> np.ndarray:
    """Convert a 1-D chunk between safetensors dtype codes (BF16 as uint16 bits on both sides)."""
    if src == dst:
        return chunk
    # NOTE: everything goes through float32, as torch's CPU casts do (double -> half/bfloat16 is
    # double -> float -> half there too), so results match torch bit for bit.
    x = bf16_to_float32(chunk) if src == "BF16" else chunk.astype(np.float32)
    if dst == "F32":
        return x
    if dst == "F16":
        with np.errstate(over="ignore"):  # beyond 65504 becomes inf, as in torch
            return x.astype(np.float16)
    return float32_to_bf16(x)


# ---------------------------------------------------------------------------------------------
# safetensors files: our own reader (BF16 included) and writer
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class SafetensorsEntry:
    name: str
    dtype: str
    shape: tuple[int, ...]
    start: int   # absolute byte offsets in the file
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


class _DuplicateKey(Exception):
    pass


def _no_duplicate_keys(pairs: list[tuple[str, object]]) -> dict:
    out = dict(pairs)
    if len(out) != len(pairs):
        seen: set[str] = set()
        raise _DuplicateKey(next(k for k, _ in pairs if k in seen or seen.add(k)))
    return out


def _parse_header_json(path: Path, raw: bytes) -> dict:
    """The header's JSON object; a name given twice is refused (json.loads would keep the last)."""
    try:
        header = json.loads(raw, object_pairs_hook=_no_duplicate_keys)
    except _DuplicateKey as dup:
        raise RawpagedError(f"{path}: corrupt safetensors header: '{dup.args[0]}' appears twice "
                            f"(each tensor must have exactly one byte range)") from None
    except json.JSONDecodeError as err:
        raise RawpagedError(f"{path}: corrupt safetensors header (not valid JSON at byte {err.pos})") from None
    except (ValueError, RecursionError):   # not UTF-8, an integer too long, nesting too deep
        raise RawpagedError(f"{path}: corrupt safetensors header (not valid JSON)") from None
    if not isinstance(header, dict):
        raise RawpagedError(f"{path}: corrupt safetensors header (not a JSON object)")
    return header


def _check_layout(path: Path, entries: list[SafetensorsEntry], data_start: int, size: int) -> None:
    """The tensors tile the data section: sorted by offset, each starts where the previous ends,
    the last ends at the end of the file (the official parser's rule). Overlapping ranges would let
    two names share bytes (the converter would duplicate them, the official loader refuses them)."""
    end, prev = data_start, None
    for e in sorted(entries, key=lambda e: (e.start, e.end)):
        if e.start < end:
            raise RawpagedError(f"{path}: corrupt safetensors header: tensors '{prev.name}' and '{e.name}' "
                                f"overlap (each tensor must have its own byte range)")
        if e.start > end:
            raise RawpagedError(f"{path}: corrupt safetensors header: {e.start - end} bytes before tensor "
                                f"'{e.name}' belong to no tensor (tensors must be stored back to back)")
        end, prev = e.end, e
    if end != size:
        raise RawpagedError(f"{path}: corrupt safetensors file: its last {size - end} bytes belong to no tensor")


class SafetensorsFile:
    """A safetensors file read through its header: lazy, chunked, and BF16-aware (numpy has no bf16)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.entries: dict[str, SafetensorsEntry] = {}
        self.metadata: dict = {}
        self._parse_header()

    def _parse_header(self) -> None:
        # NOTE: messages never quote the file's bytes (not even the length field as a number): a
        # file that is not safetensors at all may be anything, e.g. a path an index pointed at.
        try:
            size = self.path.stat().st_size
            with open(self.path, "rb") as f:
                head = f.read(8)
                if len(head) < 8:
                    raise RawpagedError(f"{self.path}: truncated safetensors file ({size} bytes)")
                n = int.from_bytes(head, "little")
                if n > MAX_HEADER_BYTES or 8 + n > size:
                    raise RawpagedError(f"{self.path}: truncated or corrupt safetensors file (its header "
                                        f"length field points past the end of the {size}-byte file)")
                raw = f.read(n)
        except OSError as err:
            raise RawpagedError(f"{self.path}: cannot read: {err.strerror or type(err).__name__}") from None
        header = _parse_header_json(self.path, raw)
        metadata = header.pop("__metadata__", None) or {}
        if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
            raise RawpagedError(f"{self.path}: corrupt safetensors header (__metadata__ must map strings to strings)")
        self.metadata = metadata
        for name, info in header.items():
            self.entries[name] = self._entry(name, info, 8 + n, size)
        _check_layout(self.path, list(self.entries.values()), 8 + n, size)

    def _entry(self, name: str, info, data_start: int, size: int) -> SafetensorsEntry:
        try:
            dtype, shape, (begin, end) = info["dtype"], tuple(info["shape"]), info["data_offsets"]
            if not all(type(v) is int and v >= 0 for v in (*shape, begin, end)) or len(shape) > MAX_DIMS:
                raise ValueError
        except (TypeError, KeyError, ValueError):
            raise RawpagedError(f"{self.path}: corrupt header entry for tensor '{name}'") from None
        if dtype not in NUMPY_DTYPE:
            raise RawpagedError(f"{self.path}: unsupported dtype '{dtype}' for tensor '{name}' "
                                f"(supported: {', '.join(NUMPY_DTYPE)})")
        expected = math.prod(shape) * NUMPY_DTYPE[dtype].itemsize
        if end - begin != expected:
            raise RawpagedError(f"{self.path}: tensor '{name}' of shape {list(shape)} {dtype} spans {end - begin} bytes, expected {expected}")
        if data_start + end > size:
            raise RawpagedError(f"{self.path}: truncated: tensor '{name}' ends at byte {data_start + end}, file has {size}")
        return SafetensorsEntry(name, dtype, shape, data_start + begin, data_start + end)

    def keys(self) -> list[str]:
        return list(self.entries)

    def iter_chunks(self, entry: SafetensorsEntry, chunk_bytes: int) -> Iterator[np.ndarray]:
        """The tensor's elements as 1-D arrays of its dtype (BF16 as uint16), ~chunk_bytes each."""
        dtype = NUMPY_DTYPE[entry.dtype]
        step = max(1, chunk_bytes // dtype.itemsize) * dtype.itemsize
        with open(self.path, "rb") as f:
            f.seek(entry.start)
            left = entry.nbytes
            while left > 0:
                data = f.read(min(step, left))
                if not data:
                    raise RawpagedError(f"{self.path}: truncated while reading tensor '{entry.name}'")
                left -= len(data)
                yield np.frombuffer(data, dtype=dtype)

    def get_raw(self, name: str) -> np.ndarray:
        """The tensor in its stored dtype (BF16 as uint16 bit patterns), a writable array."""
        entry = self.entries[name]
        out = np.empty(entry.shape, dtype=NUMPY_DTYPE[entry.dtype])
        with open(self.path, "rb") as f:
            f.seek(entry.start)
            if f.readinto(out.reshape(-1).view(np.uint8)) != entry.nbytes:
                raise RawpagedError(f"{self.path}: truncated while reading tensor '{name}'")
        return out

    def get(self, name: str) -> np.ndarray:
        """The tensor as numpy can hold it: BF16 widened (exactly) to float32, others as stored."""
        raw = self.get_raw(name)
        return bf16_to_float32(raw) if self.entries[name].dtype == "BF16" else raw


def read_safetensors_bf16_aware(path: str | Path) -> dict[str, np.ndarray]:
    """Every tensor of a safetensors file; BF16 ones as float32 (which `safetensors.numpy` cannot do)."""
    sf = SafetensorsFile(path)
    return {name: sf.get(name) for name in sf.keys()}


def safetensors_header(tensors: list[tuple[str, str, tuple[int, ...]]]) -> bytes:
    """8-byte little-endian length + JSON header for (name, dtype, shape) laid out back to back."""
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, dtype, shape in tensors:
        nbytes = math.prod(shape) * NUMPY_DTYPE[dtype].itemsize
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # NOTE: pad so the data (and every tensor, see write_shard) is aligned
    return len(raw).to_bytes(8, "little") + raw


# ---------------------------------------------------------------------------------------------
# Source tensors
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class SourceTensor:
    """One tensor of the source checkpoint, not yet read: `reader.iter_chunks(ref)` yields its data."""
    name: str
    dtype: str
    shape: tuple[int, ...]
    file: str
    reader: TorchArchive | SafetensorsFile
    ref: TensorRef | SafetensorsEntry

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * NUMPY_DTYPE[self.dtype].itemsize

    def chunks(self, chunk_bytes: int) -> Iterator[np.ndarray]:
        return self.reader.iter_chunks(self.ref, chunk_bytes)


def _open_weight_file(path: Path, stack: contextlib.ExitStack, max_expansion: float) -> list[SourceTensor]:
    if path.suffix == ".safetensors":
        sf = SafetensorsFile(path)
        return [SourceTensor(e.name, e.dtype, e.shape, path.name, sf, e) for e in sf.entries.values()]
    archive = stack.enter_context(TorchArchive(path, max_expansion=max_expansion))
    return [SourceTensor(name, ref.dtype, ref.shape, path.name, archive, ref)
            for name, ref in archive.state_dict().items()]


def _read_index(src: Path, index_name: str) -> dict[str, str]:
    try:
        weight_map = json.loads(model_file(src, index_name).read_text(encoding="utf-8"))["weight_map"]
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise ValueError
    except (ValueError, KeyError, TypeError, RecursionError):
        raise RawpagedError(f"{src / index_name}: not a valid index (expected a JSON object with a 'weight_map')") from None
    for shard in weight_map.values():
        if Path(shard).name != shard or shard in ("", ".", ".."):
            raise RawpagedError(f"{src / index_name}: shard name {shard!r} is not a plain file name")
    return weight_map


def load_source_tensors(src: Path, stack: contextlib.ExitStack,
                        max_expansion: float = DEFAULT_MAX_EXPANSION) -> list[SourceTensor]:
    """Every tensor of the checkpoint in SRC, in file then storage order, checked against its index."""
    for index_name, single in (("model.safetensors.index.json", "model.safetensors"),
                               ("pytorch_model.bin.index.json", "pytorch_model.bin")):
        if model_file(src, index_name).is_file():
            return _load_sharded(src, index_name, stack, max_expansion)
        if model_file(src, single).is_file():
            return _open_weight_file(src / single, stack, max_expansion)
    raise RawpagedError(f"{src}: no weights found (expected model.safetensors[.index.json] or pytorch_model.bin[.index.json])")


def _load_sharded(src: Path, index_name: str, stack: contextlib.ExitStack, max_expansion: float) -> list[SourceTensor]:
    weight_map = _read_index(src, index_name)
    shards = list(dict.fromkeys(weight_map.values()))
    for shard in shards:  # NOTE: check every shard exists (and stays inside src) before reading any
        if not model_file(src, shard).is_file():
            raise RawpagedError(f"{src}: missing shard '{shard}' named by {index_name}")
    tensors: list[SourceTensor] = []
    seen: dict[str, str] = {}
    for shard in shards:
        for t in _open_weight_file(src / shard, stack, max_expansion):
            if t.name in seen:
                raise RawpagedError(f"{src}: tensor '{t.name}' is in both '{seen[t.name]}' and '{shard}'")
            seen[t.name] = shard
            tensors.append(t)
    for name, shard in weight_map.items():
        if seen.get(name) != shard:
            raise RawpagedError(f"{src / index_name} names tensor '{name}' in '{shard}', which that file does not hold")
    return tensors


def fix_names(tensors: list[SourceTensor], model_type: str | None) -> list[tuple[str, SourceTensor]]:
    """(output name, tensor) pairs, with the fixes HF's own loading applies to .bin checkpoints.

    - `*.rotary_emb.inv_freq` buffers are dropped: HF recomputes them from config (and no longer saves them).
    - OPT checkpoints saved from the bare `OPTModel` name tensors `decoder.*`; the loader wants the
      `OPTForCausalLM` names `model.decoder.*` (vLLM's OPT loader does the same rename).
    - Exact aliases (one storage, same offset/shape/stride: a tied `lm_head.weight` in a .bin) are
      written once, as safetensors cannot share storage and HF's `save_pretrained` drops them too.
      The name kept is the first that is not an output head, so the loader ties `lm_head` as usual.
    """
    kept: dict[tuple, tuple[str, SourceTensor]] = {}
    for t in tensors:
        if t.name.endswith("rotary_emb.inv_freq"):
            continue
        name = t.name
        if model_type == "opt" and name.startswith("decoder."):
            name = "model." + name
        key = (id(t.reader), t.ref) if isinstance(t.ref, TensorRef) else (id(t.reader), t.name)
        if key in kept and (name.endswith("lm_head.weight") or not kept[key][0].endswith("lm_head.weight")):
            continue
        kept[key] = (name, t)
    # NOTE: dict keeps first-insertion order, so replaced aliases keep their place; sort back to source order.
    order = {id(t): i for i, t in enumerate(tensors)}
    out = sorted(kept.values(), key=lambda pair: order[id(pair[1])])
    names = [n for n, _ in out]
    if len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise RawpagedError(f"two source tensors map to the output name '{dup}'")
    return out


# ---------------------------------------------------------------------------------------------
# Planning, writing, verifying
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class PlannedTensor:
    name: str
    dtype: str
    source: SourceTensor

    @property
    def shape(self) -> tuple[int, ...]:
        return self.source.shape

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * NUMPY_DTYPE[self.dtype].itemsize


def plan_shards(named: list[tuple[str, SourceTensor]], target: str | None, max_bytes: int) -> list[list[PlannedTensor]]:
    """Greedy in source order, like HF: a new shard when the next tensor would pass max_bytes
    (a tensor larger than max_bytes gets a shard of its own)."""
    shards: list[list[PlannedTensor]] = [[]]
    size = 0
    for name, t in named:
        dtype = target if target and t.dtype in FLOAT_CODES else t.dtype
        p = PlannedTensor(name, dtype, t)
        if shards[-1] and size + p.nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(p)
        size += p.nbytes
    return shards


def shard_names(n: int) -> list[str]:
    if n == 1:
        return ["model.safetensors"]
    return [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]


def write_shard(path: Path, tensors: list[PlannedTensor], progress: Progress) -> dict[str, bytes]:
    """Write one safetensors shard by streaming each tensor; return each tensor's blake2b digest."""
    # NOTE: widest dtypes first: with an 8-byte aligned header every tensor is then naturally
    # aligned in the file, so a loader may memory-map it and view it without copying.
    ordered = sorted(tensors, key=lambda p: -NUMPY_DTYPE[p.dtype].itemsize)
    digests: dict[str, bytes] = {}
    with open(path, "wb") as f:
        f.write(safetensors_header([(p.name, p.dtype, p.shape) for p in ordered]))
        for p in ordered:
            h = hashlib.blake2b(digest_size=16)
            written = 0
            for chunk in p.source.chunks(CHUNK_BYTES):
                raw = memoryview(np.ascontiguousarray(convert_chunk(chunk, p.source.dtype, p.dtype))).cast("B")
                h.update(raw)
                f.write(raw)
                written += len(raw)
                progress.update(len(raw))
            if written != p.nbytes:
                raise RawpagedError(f"{p.source.file}: tensor '{p.source.name}' gave {written} bytes, expected {p.nbytes}")
            digests[p.name] = h.digest()
            progress.tensor_done()
    return digests


def verify_shard(path: Path, tensors: list[PlannedTensor], digests: dict[str, bytes]) -> None:
    """Re-read a written shard: same names, dtypes, shapes, and byte-identical data (blake2b)."""
    from safetensors import safe_open

    written = SafetensorsFile(path)
    if set(written.entries) != {p.name for p in tensors}:
        raise RawpagedError(f"verification failed: {path.name} does not hold the planned tensors")
    with safe_open(str(path), framework="numpy") as official:  # the reference parser must accept it too
        official_keys = set(official.keys())
        for p in tensors:
            entry = written.entries[p.name]
            sl = official.get_slice(p.name) if p.name in official_keys else None
            if (entry.dtype, entry.shape) != (p.dtype, p.shape) or sl is None \
                    or (sl.get_dtype(), tuple(sl.get_shape())) != (p.dtype, p.shape):
                raise RawpagedError(f"verification failed: tensor '{p.name}' in {path.name} has the wrong dtype or shape")
            h = hashlib.blake2b(digest_size=16)
            for chunk in written.iter_chunks(entry, CHUNK_BYTES):
                h.update(memoryview(chunk).cast("B"))
            if h.digest() != digests[p.name]:
                raise RawpagedError(f"verification failed: tensor '{p.name}' in {path.name} differs from its source")


def write_index(out: Path, shards: list[list[PlannedTensor]], names: list[str]) -> None:
    weight_map = {p.name: fname for fname, shard in zip(names, shards) for p in shard}
    total = sum(p.nbytes for shard in shards for p in shard)
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def write_config(config: dict, target: str | None, out: Path) -> None:
    if target is not None:
        config["torch_dtype"] = TORCH_DTYPE_NAME[target]
        if "dtype" in config:  # NOTE: transformers >= 4.56 writes `dtype`; keep both in step
            config["dtype"] = TORCH_DTYPE_NAME[target]
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")


# ---------------------------------------------------------------------------------------------
# The whole conversion
# ---------------------------------------------------------------------------------------------

def _read_config(src: Path) -> dict:
    try:
        config = json.loads(model_file(src, "config.json").read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise RawpagedError(f"{src}: no config.json (not a Hugging Face model directory)") from None
    except OSError as err:
        raise RawpagedError(f"{src / 'config.json'}: cannot read: {err.strerror or type(err).__name__}") from None
    except (ValueError, RecursionError) as err:
        raise RawpagedError(f"{src / 'config.json'}: invalid JSON ({_json_error(err)})") from None
    if not isinstance(config, dict):
        raise RawpagedError(f"{src / 'config.json'}: expected a JSON object")
    return config


def _json_error(err: Exception) -> str:
    """Where a JSON text went wrong, without quoting it."""
    if isinstance(err, json.JSONDecodeError):
        return f"{err.msg} at line {err.lineno} column {err.colno}"
    return "nesting too deep" if isinstance(err, RecursionError) else "not UTF-8 text"


def parse_max_expansion(value: float | str | None) -> float:
    if value is None:
        return DEFAULT_MAX_EXPANSION
    try:
        factor = float(value)
    except (TypeError, ValueError):
        factor = math.nan
    if not (factor > 0 and math.isfinite(factor)) or isinstance(value, bool):
        raise RawpagedError(f"bad max expansion {value!r}: expected a positive number (output bytes per input byte)")
    return factor


def check_expansion(src: Path, tensors: list[SourceTensor], shards: list[list[PlannedTensor]], factor: float) -> None:
    """Refuse to write more than `factor` times the bytes of the weight files read.

    NOTE: a .bin tensor is a view: zero strides (torch's expand) or many views of one storage make
    a tiny file describe gigabytes of output. Real checkpoints stay near 1x (2x when --dtype widens
    bf16/fp16 to float32; a little more where views overlap), so the default of 4x only stops
    files that repeat their data; --max-expansion raises it for a checkpoint that really does.
    """
    files = {id(t.reader): t.reader.path for t in tensors}
    read = sum(path.stat().st_size for path in files.values())
    written = sum(p.nbytes for shard in shards for p in shard)
    if written > factor * max(read, 1):
        raise RawpagedError(f"{src}: the converted weights would take {written} bytes, {written / max(read, 1):.0f} "
                            f"times the {read} bytes of the source weight files (limit: {factor:g}x; "
                            f"expanded or repeated tensor views?): raise it with --max-expansion if this is expected")


def _check_paths(src: Path, dst: Path, force: bool) -> None:
    if not src.is_dir():
        raise RawpagedError(f"source {src} is not a directory")
    if dst == dst.parent:
        raise RawpagedError(f"bad output path {dst}")
    if not dst.parent.is_dir():
        raise RawpagedError(f"parent directory of output {dst} does not exist")
    if dst.exists() or dst.is_symlink():
        if not force:
            raise RawpagedError(f"output {dst} already exists (use --force to replace it)")
        if src.resolve() == dst.resolve() or dst.resolve() in src.resolve().parents:
            raise RawpagedError(f"refusing to replace {dst}: it holds the source {src}")


def _replace(tmp: Path, dst: Path) -> None:
    """Move the finished tmp dir to dst; an existing dst (force) is moved aside first, then removed."""
    if not (dst.exists() or dst.is_symlink()):
        tmp.rename(dst)
        return
    trash = Path(tempfile.mkdtemp(prefix=f".{dst.name}.old-", dir=dst.parent))
    old = trash / "old"
    dst.rename(old)
    try:
        tmp.rename(dst)
    except BaseException:
        old.rename(dst)
        raise
    finally:
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(trash, ignore_errors=True)
        else:
            old.unlink(missing_ok=True)
            trash.rmdir()


def convert_hf(src: str | Path, dst: str | Path, dtype: str | None = None, max_shard_size: str | int = "2GB",
               force: bool = False, progress: bool = True, max_expansion: float | None = None) -> Path:
    """Convert the HF model directory `src` into `dst` (see the module docstring); returns dst.

    The output may be at most `max_expansion` (default 4) times the size of the source weight files.
    """
    try:
        return _convert_hf(src, dst, dtype, max_shard_size, force, progress, max_expansion)
    except MemoryError:
        # NOTE: the bounds above keep memory to ~ a storage plus a chunk; this is the last line.
        raise RawpagedError(f"out of memory while converting {src}") from None


def _convert_hf(src, dst, dtype, max_shard_size, force, progress, max_expansion) -> Path:
    # NOTE: abspath, not resolve: "." or "x/.." get a real name and parent, a symlink stays a link.
    src, dst = Path(src), Path(os.path.abspath(dst))
    target, max_bytes = parse_dtype(dtype), parse_size(max_shard_size)
    factor = parse_max_expansion(max_expansion)
    _check_paths(src, dst, force)
    config = _read_config(src)
    resolve_architecture(config, src / "config.json")      # NOTE: refuse what the engine cannot run
    check_model_files(src, COPIED_FILES)
    with contextlib.ExitStack() as stack:
        # Everything that can be checked without writing is checked here, before any output exists.
        tensors = load_source_tensors(src, stack, factor)
        named = fix_names(tensors, config.get("model_type"))
        shards = plan_shards(named, target, max_bytes)
        check_expansion(src, tensors, shards, factor)
        names = shard_names(len(shards))
        bar = Progress(len(named), sum(p.nbytes for s in shards for p in s), enabled=progress)
        tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.partial-", dir=dst.parent))
        try:
            write_tokenizer(src, tmp)
            for fname, shard in zip(names, shards):
                digests = write_shard(tmp / fname, shard, bar)
                verify_shard(tmp / fname, shard, digests)
            bar.close()
            if len(shards) > 1:
                write_index(tmp, shards, names)
            write_config(config, target, tmp)
            for fname in COPIED_FILES:
                if (src / fname).is_file():
                    shutil.copyfile(src / fname, tmp / fname)
            _replace(tmp, dst)
        except OSError as err:
            shutil.rmtree(tmp, ignore_errors=True)
            raise RawpagedError(f"writing {dst}: {err.strerror or err}" + (f" ({err.filename})" if err.filename else "")) from None
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return dst


def write_tokenizer(src: Path, out: Path) -> None:
    """tokenizer.json for a source that ships only the slow tokenizer's files (tokenizer.model, or
    vocab.json + merges.txt): built as `Tokenizer.from_dir` builds it, so the output needs no build
    at load time. A source with a tokenizer.json (copied as it is) or no tokenizer is left alone."""
    from rawpaged.tokenizer_build import write_tokenizer_json   # NOTE: late: tokenizer_build imports config

    has = lambda name: model_file(src, name).is_file()  # noqa: E731
    if not has("tokenizer.json") and (has("tokenizer.model") or (has("vocab.json") and has("merges.txt"))):
        write_tokenizer_json(src, out / "tokenizer.json")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rawpaged.convert.hf",
                                     description="Convert a Hugging Face checkpoint (.bin or safetensors) for rawpaged.")
    parser.add_argument("src")
    parser.add_argument("-o", "--output", required=True)
    parser.add_argument("--dtype", choices=["float16", "bfloat16", "float32"])
    parser.add_argument("--max-shard-size", default="2GB")
    parser.add_argument("--force", action="store_true")
    parser.add_argument("--max-expansion", type=float, default=None,
                        help=f"refuse output over this many times the input's size (default {DEFAULT_MAX_EXPANSION:g})")
    args = parser.parse_args(argv)
    try:
        out = convert_hf(args.src, args.output, args.dtype, args.max_shard_size, args.force,
                         max_expansion=args.max_expansion)
    except RawpagedError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
