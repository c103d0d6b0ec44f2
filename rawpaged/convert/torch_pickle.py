"""Read `torch.save` zip archives (PyTorch >= 1.6) without torch and without running pickled code.

A `torch.save` file is a zip archive:
    <prefix>/data.pkl        a pickle (protocol 2) of the object, here a state dict {name: tensor}
    <prefix>/data/<key>      the raw bytes of each storage, little-endian, uncompressed
    <prefix>/byteorder       "little" or "big" (absent in archives older than torch 1.10: little)
    <prefix>/version         the archive format version
Inside data.pkl every tensor is `torch._utils._rebuild_tensor_v2(storage, offset, size, stride, ...)`
and every storage is a persistent id `('storage', torch.FloatStorage, key, location, numel)`.

Why a restricted `pickle.Unpickler` rather than an opcode-level parser (NOTE):
the only way a pickle reaches code is through a global (GLOBAL / STACK_GLOBAL / INST / OBJ / EXT
opcodes all resolve through `Unpickler.find_class`, the documented hook for restricting globals)
and then calling it (REDUCE / NEWOBJ / BUILD). Our `find_class` hands out only inert stand-ins of our
own: `collections.OrderedDict`, and functions that *record* a tensor's storage/offset/shape/stride
instead of building one, plus storage-type markers of known dtypes. Anything else raises before a
single object is made, so REDUCE can only ever call our stand-ins. Re-implementing the ~70 pickle
opcodes correctly would be more code and more room for bugs than this single, well-trodden hook.

Nothing is read from the storages while unpickling: tensors come back as `TensorRef` records and
their bytes are streamed later, in chunks, by `TorchArchive.iter_chunks` (peak memory ~ one chunk).
`write_torch_zip` writes the same format without torch (used by tests and the memory benchmark).
"""

from __future__ import annotations

import _compat_pickle
import collections
import io
import lzma
import math
import pickle
import pickletools
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from rawpaged.errors import RawpagedError

# safetensors dtype code -> numpy dtype. NOTE: numpy has no bfloat16: BF16 data travels as its raw
# uint16 bit patterns and is widened to float32 only where arithmetic needs it.
NUMPY_DTYPE = {
    "F64": np.dtype("<f8"), "F32": np.dtype("<f4"), "F16": np.dtype("<f2"), "BF16": np.dtype("<u2"),
    "I64": np.dtype("<i8"), "I32": np.dtype("<i4"), "I16": np.dtype("<i2"), "I8": np.dtype("i1"),
    "U8": np.dtype("u1"), "BOOL": np.dtype("?"),
}

# torch.<Name>Storage -> safetensors dtype code: the storage types torch.save writes for tensors.
STORAGE_DTYPE = {
    "DoubleStorage": "F64", "FloatStorage": "F32", "HalfStorage": "F16", "BFloat16Storage": "BF16",
    "LongStorage": "I64", "IntStorage": "I32", "ShortStorage": "I16", "CharStorage": "I8",
    "ByteStorage": "U8", "BoolStorage": "BOOL",
}


MAX_EXPANDED_BYTES = 1 << 30
MAX_DIMS = 32
# Bounds on what is read from an (untrusted) archive, checked against the sizes its zip directory
# declares before anything is inflated (zipfile never returns more than the declared size).
DEFAULT_MAX_EXPANSION = 4.0        # declared uncompressed bytes (and output bytes) per archive byte
MAX_PICKLE_BYTES = 256 << 20       # data.pkl: ~100 bytes per tensor in practice
MAX_BYTEORDER_BYTES = 16
# What reading a damaged or odd entry can raise (bad CRC, bad deflate/bzip2/lzma data, encryption, an
# unknown compression method).
_ZIP_ERRORS = (zipfile.BadZipFile, OSError, EOFError, zlib.error, NotImplementedError, RuntimeError, ValueError,
               lzma.LZMAError)


@dataclass(frozen=True, slots=True)
class StorageType:
    """What `find_class('torch', 'FloatStorage')` returns: a marker carrying the dtype, not a class."""
    dtype: str


@dataclass(frozen=True, slots=True)
class StorageRef:
    """One `data/<key>` entry of the archive: `numel` elements of `dtype`."""
    key: str
    dtype: str
    numel: int


@dataclass(frozen=True, slots=True)
class TensorRef:
    """A tensor as torch pickles it: a strided view into a storage (offset and strides in elements)."""
    storage: StorageRef
    offset: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]

    @property
    def dtype(self) -> str:
        return self.storage.dtype

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * NUMPY_DTYPE[self.dtype].itemsize

    def is_contiguous(self) -> bool:
        """C-contiguous: the view is the byte range [offset, offset + numel) of the storage."""
        expected = 1
        for size, stride in zip(reversed(self.shape), reversed(self.stride)):
            if size != 1 and stride != expected:
                return False
            expected *= size
        return True

    def last_element(self) -> int:
        """Index of the last storage element the view touches (offset - 1 when it is empty)."""
        if self.numel == 0:
            return self.offset - 1
        return self.offset + sum((n - 1) * s for n, s in zip(self.shape, self.stride))


# ---- the stand-ins find_class hands out -------------------------------------------------------

def _int_tuple(value, what: str) -> tuple[int, ...]:
    if not isinstance(value, tuple) or not all(type(v) is int for v in value):
        raise RawpagedError(f"malformed tensor record: {what} must be a tuple of ints, got {value!r}")
    return value


def _rebuild_tensor(storage, storage_offset, size, stride, *_ignored) -> TensorRef:
    """Stand-in for torch._utils._rebuild_tensor(_v2): records the view, reads nothing."""
    if not isinstance(storage, StorageRef):
        raise RawpagedError(f"malformed tensor record: expected a storage, got {type(storage).__name__}")
    if type(storage_offset) is not int or storage_offset < 0:
        raise RawpagedError(f"malformed tensor record: storage offset {storage_offset!r}")
    shape, strides = _int_tuple(size, "size"), _int_tuple(stride, "stride")
    if len(shape) != len(strides) or len(shape) > MAX_DIMS or any(n < 0 for n in shape) or any(s < 0 for s in strides):
        raise RawpagedError(f"malformed tensor record: size {shape} with stride {strides}")
    ref = TensorRef(storage, storage_offset, shape, strides)
    # NOTE: bounds are checked here, before anything is read: a view reaching past its storage
    # would otherwise make as_strided read memory that is not ours.
    if ref.last_element() >= storage.numel:
        raise RawpagedError(
            f"malformed tensor record: view (offset {storage_offset}, size {shape}, stride {strides}) "
            f"reaches past its storage of {storage.numel} elements")
    # NOTE: zero or overlapping strides (torch's expand) repeat storage elements, so a tiny storage
    # can describe an astronomically large tensor; state dicts never need much of that.
    if ref.numel > storage.numel and ref.nbytes > MAX_EXPANDED_BYTES:
        raise RawpagedError(
            f"refusing tensor of size {shape} (stride {strides}): it repeats a storage of {storage.numel} "
            f"elements into {ref.nbytes} bytes")
    return ref


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, *_state) -> TensorRef:
    """Stand-in for torch._utils._rebuild_parameter(_with_state): a Parameter is just its data here."""
    if not isinstance(data, TensorRef):
        raise RawpagedError(f"malformed parameter record: expected a tensor, got {type(data).__name__}")
    return data


ALLOWED_GLOBALS = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
}


class _StateDictUnpickler(pickle.Unpickler):
    """An Unpickler that can only build dicts, tuples, scalars and our TensorRef records."""

    def __init__(self, data: bytes, origin: str):
        super().__init__(io.BytesIO(data))
        self.origin = origin
        self.storages: dict[str, StorageRef] = {}

    def find_class(self, module: str, name: str):
        # NOTE: protocol < 3 pickles written by Python 3 carry Python 2 names (`__builtin__.exec`,
        # `commands.Popen`); map them as pickle's own find_class would, so the error names the
        # global that would actually run.
        if (module, name) in _compat_pickle.NAME_MAPPING:
            module, name = _compat_pickle.NAME_MAPPING[(module, name)]
        elif module in _compat_pickle.IMPORT_MAPPING:
            module = _compat_pickle.IMPORT_MAPPING[module]
        if (module, name) in ALLOWED_GLOBALS:
            return ALLOWED_GLOBALS[(module, name)]
        if module == "torch" and name in STORAGE_DTYPE:
            return StorageType(STORAGE_DTYPE[name])
        if module == "torch" and name.endswith("Storage"):
            raise RawpagedError(
                f"unknown storage type 'torch.{name}' in {self.origin}: "
                f"supported: {', '.join(sorted(STORAGE_DTYPE))}")
        raise RawpagedError(
            f"refusing to load global '{module}.{name}' from {self.origin}: only tensor data is allowed")

    def persistent_load(self, pid):
        # pid = ('storage', storage_type, key, location, numel)
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise RawpagedError(f"malformed storage record in {self.origin}: {pid!r:.80}")
        _, storage_type, key, _location, numel = pid
        if not isinstance(storage_type, StorageType):
            raise RawpagedError(f"unknown storage type {storage_type!r:.60} in {self.origin}")
        if not isinstance(key, str) or type(numel) is not int or numel < 0:
            raise RawpagedError(f"malformed storage record in {self.origin}: {pid!r:.80}")
        ref = StorageRef(key, storage_type.dtype, numel)
        if self.storages.setdefault(key, ref) != ref:
            raise RawpagedError(f"storage '{key}' of {self.origin} is described twice, differently")
        return ref


def _check_opcodes(data: bytes, path: Path) -> None:
    """Walk the pickle's opcodes (pickletools decodes them, runs nothing) before unpickling.

    NOTE: CPython's C unpickler sizes its memo as an array by the largest index a PUT names, and
    allocates a BINBYTES8 / BYTEARRAY8 of the length it declares before reading it: an 18-byte
    pickle saying `LONG_BINPUT 200000000` asks for 3.2 GB. Real pickles number their memo 0, 1, 2...,
    so an index past the pickle's length is refused; declared lengths past its end fail here, where
    pickletools reads only what is there.
    """
    try:
        for op, arg, pos in pickletools.genops(data):
            if op.name in ("PUT", "BINPUT", "LONG_BINPUT") and arg > len(data):
                raise RawpagedError(f"{path}: malformed pickle in data.pkl (memo index {arg} at byte {pos} "
                                    f"of a {len(data)}-byte pickle)")
    except RawpagedError:
        raise
    except Exception as err:   # truncated, unknown opcode, a length past the end...
        raise RawpagedError(f"{path}: malformed pickle in data.pkl ({type(err).__name__}: {_one_line(err)})") from None


# ---- the archive --------------------------------------------------------------------------------

def _refuse_non_zip(path: Path) -> None:
    """Say precisely why a file that is not a readable zip archive is refused."""
    with open(path, "rb") as f:
        head = f.read(512)
    if not head:
        raise RawpagedError(f"{path}: empty file, not a torch archive")
    if head.startswith(b"PK\x03\x04"):
        raise RawpagedError(f"{path}: truncated or corrupt zip archive (no central directory)")
    if head.startswith(b"\x80") or head[257:262] == b"ustar":
        raise RawpagedError(
            f"{path}: legacy (pre-1.6, non-zip) torch format is not supported: "
            f"re-save it with torch.save from torch >= 1.6")
    raise RawpagedError(f"{path}: not a torch.save zip archive")


class TorchArchive:
    """A `torch.save` zip archive opened for lazy, chunked reading of its tensors.

    NOTE (untrusted input): a zip entry may inflate ~1000x (deflate) or more (bzip2), so a 1.5 MB
    file can hold a 1.5 GB entry. The zip directory declares every entry's uncompressed size and
    zipfile never returns more than that, so the declared sizes are checked first: their sum may be
    at most `max_expansion` times the archive (torch.save stores entries uncompressed: ~1x), and
    each entry read whole has its own bound. Reads are streamed against those bounds.
    """

    def __init__(self, path: str | Path, max_expansion: float = DEFAULT_MAX_EXPANSION):
        self.path = Path(path)
        if not zipfile.is_zipfile(self.path):
            _refuse_non_zip(self.path)
        try:
            self.zip = zipfile.ZipFile(self.path)
        except (zipfile.BadZipFile, OSError) as err:
            raise RawpagedError(f"{self.path}: corrupt zip archive ({err})") from None
        try:
            self._check_declared_sizes(max_expansion)
            self.prefix = self._find_prefix()
            self._check_byteorder()
        except BaseException:
            self.zip.close()
            raise

    def __enter__(self) -> "TorchArchive":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.zip.close()

    def _find_prefix(self) -> str:
        pickles = [n for n in self.zip.namelist() if n.count("/") == 1 and n.endswith("/data.pkl")]
        if len(pickles) != 1:
            raise RawpagedError(f"{self.path}: zip archive without exactly one <name>/data.pkl: not torch.save output")
        return pickles[0][: -len("data.pkl")]

    def _check_declared_sizes(self, max_expansion: float) -> None:
        size = self.path.stat().st_size
        declared = sum(info.file_size for info in self.zip.infolist())
        if declared > max_expansion * size:
            raise RawpagedError(
                f"{self.path}: its zip entries declare {declared} bytes uncompressed, {declared / size:.0f} times "
                f"the {size}-byte archive (limit: {max_expansion:g}x; a zip bomb?): "
                f"raise it with --max-expansion if this is expected")

    def _read_entry(self, name: str, limit: int) -> bytes:
        """A whole entry, refused before inflating when it declares more than `limit` bytes."""
        entry = self.prefix + name
        info = self.zip.NameToInfo[entry]
        if info.file_size > limit:
            raise RawpagedError(f"{self.path}: entry '{entry}' declares {info.file_size} bytes, "
                                f"more than the {limit} such an entry may hold")
        try:
            with self.zip.open(info) as f:
                data = f.read(limit + 1)    # NOTE: bounded even if the declared size were not
        except _ZIP_ERRORS as err:
            raise RawpagedError(f"{self.path}: corrupt entry '{entry}' ({_one_line(err)})") from None
        if len(data) > limit:
            raise RawpagedError(f"{self.path}: entry '{entry}' holds more than {limit} bytes")
        return data

    def _check_byteorder(self) -> None:
        if self.prefix + "byteorder" not in self.zip.NameToInfo:
            return  # NOTE: archives from torch < 1.10 carry no record and are little-endian
        order = self._read_entry("byteorder", MAX_BYTEORDER_BYTES).decode("ascii", "replace").strip()
        if order == "big":
            raise RawpagedError(f"{self.path}: big-endian torch archive is not supported: re-save it on a little-endian machine")
        if order != "little":
            raise RawpagedError(f"{self.path}: unknown byteorder record {order!r:.20}")

    def state_dict(self) -> dict[str, TensorRef]:
        """Unpickle data.pkl into {name: TensorRef}; check every storage entry is there, whole."""
        data = self._read_entry("data.pkl", MAX_PICKLE_BYTES)
        _check_opcodes(data, self.path)
        unpickler = _StateDictUnpickler(data, self.path.name)
        try:
            obj = unpickler.load()
        except RawpagedError:
            raise
        except Exception as err:  # any pickle-level failure: truncated, bad opcode, bad BUILD...
            raise RawpagedError(f"{self.path}: malformed pickle in data.pkl ({type(err).__name__}: {err})") from None
        if not isinstance(obj, dict):
            raise RawpagedError(f"{self.path}: expected a state dict, found a pickled {type(obj).__name__}")
        for name, value in obj.items():
            if not isinstance(name, str) or not isinstance(value, TensorRef):
                raise RawpagedError(f"{self.path}: entry {name!r:.60} is not a tensor: only flat state dicts of tensors are supported")
        for storage in unpickler.storages.values():
            self._check_storage(storage)
        return dict(obj)

    def _check_storage(self, storage: StorageRef) -> None:
        entry = self.prefix + "data/" + storage.key
        info = self.zip.NameToInfo.get(entry)
        if info is None:
            raise RawpagedError(f"{self.path}: storage entry '{entry}' is missing")
        expected = storage.numel * NUMPY_DTYPE[storage.dtype].itemsize
        if info.file_size != expected:
            raise RawpagedError(f"{self.path}: storage entry '{entry}' holds {info.file_size} bytes, expected {expected}")

    def iter_chunks(self, ref: TensorRef, chunk_bytes: int) -> Iterator[np.ndarray]:
        """The tensor's elements in C order, as 1-D arrays of the storage dtype, ~chunk_bytes each."""
        dtype = NUMPY_DTYPE[ref.dtype]
        if ref.numel == 0:
            return
        if ref.is_contiguous():
            yield from self._iter_range(ref.storage, ref.offset * dtype.itemsize, ref.nbytes, chunk_bytes)
            return
        # NOTE: a non-contiguous view (e.g. a transposed weight) needs its whole storage at once
        # (its declared size was checked against the archive); bounds were checked in
        # _rebuild_tensor, so as_strided stays inside the buffer. The view itself is copied a
        # chunk at a time: an expanded (stride 0) view may be far larger than its storage.
        nbytes = ref.storage.numel * dtype.itemsize
        storage = np.frombuffer(self._read_entry("data/" + ref.storage.key, nbytes), dtype=dtype)
        view = np.lib.stride_tricks.as_strided(
            storage[ref.offset:], shape=ref.shape, strides=[s * dtype.itemsize for s in ref.stride], writeable=False)
        yield from view_chunks(view, max(1, chunk_bytes // dtype.itemsize))

    def _iter_range(self, storage: StorageRef, start: int, length: int, chunk_bytes: int) -> Iterator[np.ndarray]:
        dtype = NUMPY_DTYPE[storage.dtype]
        step = max(1, chunk_bytes // dtype.itemsize) * dtype.itemsize
        entry = self.prefix + "data/" + storage.key
        try:
            with self.zip.open(entry) as f:
                f.seek(start)
                left = length
                while left > 0:
                    data = f.read(min(step, left))
                    if not data:
                        raise RawpagedError(f"{self.path}: storage entry '{entry}' ends early")
                    left -= len(data)
                    yield np.frombuffer(data, dtype=dtype)
                # NOTE: zipfile checks the CRC-32 when a read reaches the end of the entry; a view
                # covering the whole storage (the usual case) is therefore checksum-verified.
                if start + length == storage.numel * dtype.itemsize:
                    f.read(1)
        except _ZIP_ERRORS as err:
            raise RawpagedError(f"{self.path}: corrupt entry '{entry}' ({_one_line(err)})") from None


def view_chunks(view: np.ndarray, step: int) -> Iterator[np.ndarray]:
    """A strided view's elements in C order as contiguous 1-D arrays of at most `step` elements
    (a single innermost row longer than `step` is cut too): never more than a chunk is copied."""
    if view.size <= step:
        yield np.ascontiguousarray(view).reshape(-1)
    elif view.ndim == 1:
        for start in range(0, view.shape[0], step):
            yield np.ascontiguousarray(view[start:start + step])
    elif view[0].size <= step:                 # whole rows of the first axis per chunk
        rows = step // view[0].size
        for start in range(0, view.shape[0], rows):
            yield np.ascontiguousarray(view[start:start + rows]).reshape(-1)
    else:                                      # one row of the first axis is itself too big
        for row in view:
            yield from view_chunks(row, step)


def _one_line(err: Exception) -> str:
    return " ".join(str(err).split()) or type(err).__name__


# ---- a torch-free writer of the same format (tests and benchmarks) -------------------------------

class _PickleWriter:
    """Emits the protocol-2 opcodes torch.save uses for a flat state dict, without torch importable."""

    def __init__(self):
        self.out = io.BytesIO()
        self.out.write(pickle.PROTO + b"\x02")

    def op(self, code: bytes, arg: bytes = b"") -> None:
        self.out.write(code + arg)

    def global_(self, module: str, name: str) -> None:
        self.op(pickle.GLOBAL, f"{module}\n{name}\n".encode())

    def str_(self, s: str) -> None:
        raw = s.encode()
        self.op(pickle.BINUNICODE, len(raw).to_bytes(4, "little") + raw)

    def int_(self, n: int) -> None:
        if not 0 <= n < 2**63:
            raise ValueError(n)
        raw = n.to_bytes(8, "little").rstrip(b"\x00") + b"\x00"  # LONG1: little-endian two's complement
        self.op(pickle.LONG1, bytes([len(raw)]) + raw)

    def int_tuple(self, values: tuple[int, ...]) -> None:
        self.op(pickle.MARK)
        for v in values:
            self.int_(v)
        self.op(pickle.TUPLE)

    def empty_ordered_dict(self) -> None:
        self.global_("collections", "OrderedDict")
        self.op(pickle.EMPTY_TUPLE)
        self.op(pickle.REDUCE)

    def tensor(self, key: str, storage_name: str, numel: int, shape: tuple[int, ...],
               stride: tuple[int, ...] | None = None, offset: int = 0) -> None:
        """`_rebuild_tensor_v2(storage, offset, shape, stride, False, OrderedDict())` (C order by default)."""
        strides = stride if stride is not None else tuple(math.prod(shape[i + 1:]) for i in range(len(shape)))
        self.global_("torch._utils", "_rebuild_tensor_v2")
        self.op(pickle.MARK)
        self.op(pickle.MARK)  # persistent id ('storage', torch.XStorage, key, 'cpu', numel)
        self.str_("storage")
        self.global_("torch", storage_name)
        self.str_(key)
        self.str_("cpu")
        self.int_(numel)
        self.op(pickle.TUPLE)
        self.op(pickle.BINPERSID)
        self.int_(offset)
        self.int_tuple(shape)
        self.int_tuple(strides)
        self.op(pickle.NEWFALSE)
        self.empty_ordered_dict()  # backward hooks
        self.op(pickle.TUPLE)
        self.op(pickle.REDUCE)


def write_torch_zip(path: str | Path, tensors: Iterable[tuple[str, np.ndarray]], bf16: Iterable[str] = (),
                    byteorder: str = "little") -> None:
    """Write (name, array) pairs as a `torch.save(OrderedDict)` archive that torch.load reads.

    Arrays whose name is in `bf16` must be uint16 bit patterns and are stored as BFloat16Storage.
    `tensors` may be a generator: each array is written and dropped before the next is made.
    """
    path, bf16 = Path(path), set(bf16)
    storage_name = {v: k for k, v in STORAGE_DTYPE.items()}
    prefix = path.stem + "/"
    pkl = _PickleWriter()
    pkl.empty_ordered_dict()
    pkl.op(pickle.MARK)
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
        for index, (name, array) in enumerate(tensors):
            code = "BF16" if name in bf16 else next(
                (c for c, d in NUMPY_DTYPE.items() if c != "BF16" and d == array.dtype.newbyteorder("<")), None)
            if code is None or (code == "BF16" and array.dtype != np.uint16):
                raise ValueError(f"cannot store {name} of dtype {array.dtype}")
            with zf.open(f"{prefix}data/{index}", "w", force_zip64=array.nbytes >= 2**31) as f:
                f.write(np.ascontiguousarray(array, dtype=NUMPY_DTYPE[code]).tobytes())
            pkl.str_(name)
            pkl.tensor(str(index), storage_name[code], array.size, tuple(array.shape))
        pkl.op(pickle.SETITEMS)
        pkl.op(pickle.STOP)
        zf.writestr(prefix + "data.pkl", pkl.out.getvalue())
        zf.writestr(prefix + "byteorder", byteorder)
        zf.writestr(prefix + "version", "3\n")
