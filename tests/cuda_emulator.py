"""A NumPy-backed stand-in for CuPy that runs the real kernels_cuda/*.cu on the CPU (tests only).

kernels_cuda/host_emulation.h turns each .cu file into C++ where every CUDA thread is a fiber (a
coroutine on one OS thread), __syncthreads and warp shuffles are barriers and mma.sync is computed
from the 32 lanes' fragments as the PTX ISA lays them out. This module builds that C++ with g++ and
gives rawpaged/backend/cuda/ (and, through `install`, the whole engine) what it calls from CuPy:

  - `EmuArray`: a "device" array, a NumPy array whose `.data.ptr` is its host address. It behaves
    like a cupy.ndarray where that matters for catching bugs: mixing it with a host NumPy array in
    an operation raises TypeError (CuPy: "Unsupported type numpy.ndarray"), reductions and scalar
    indexing give 0-d device arrays (not NumPy scalars), `.get()` copies to the host, argsort is
    stable and accepts no other `kind`.
  - the `cupy` module: the functions the engine uses, a fallback to NumPy for the other names CuPy
    has too (`CUPY_NAMES`; a name outside it is an AttributeError, so code calling something CuPy
    lacks fails here as it would on a device), RawModule over the host build (with the compiled
    kernels' attributes), streams and events (one OS thread runs everything in order; an event
    records the host clock, so get_elapsed_time measures the emulation), memcpy/memset, random.
  - device memory as CuPy manages it (`FakeMemoryPool`, `MemInfo`): every device array is counted
    in the default pool from its allocation until it is garbage; the pool keeps the blocks of freed
    arrays (the driver sees them as used) until `free_all_blocks()`; `memGetInfo` reports the
    device's `MemInfo.total` less the pool's blocks and `MemInfo.outside` (the CUDA context, other
    processes); an allocation that cannot fit raises cupy.cuda.memory.OutOfMemoryError.
  - cuBLAS's `gemmEx` (the bf16 GEMM of dense.py) through `cupy_backends.cuda.libs.cublas`.
  - the `cupyx` module: `empty_pinned` (a plain NumPy array, as on a device).

Device buffers from `empty` start as NaN (poisoned), so a kernel or an engine step that reads a
value nobody wrote shows it.

CUDA graphs (`Stream.begin_capture` / `end_capture` -> `Graph.launch`, issue 13): while a stream
captures, device work is RECORDED, not run: a kernel launch, a cuBLAS call or an in-place array
operation (`out=`, `a[i] = b`) is kept as a thunk over the same buffers; an array operation that
makes a new array runs once (for its shape) and its result is poisoned (NaN: on a device it holds
nothing until the graph runs), the thunk recomputing it into that same buffer. `Graph.launch`
runs the thunks in order, reading whatever the buffers hold then: host values (scalars, shapes,
grids) are frozen at capture, as on a device. What a device refuses during capture raises here:
host<->device copies from pageable memory (`cupy.asarray(host)`, `.get()`, `.set()`), and reading a
device value on the host (`int(a)`, `float(a)`, `bool(a)`). `Graph.ops` is what was recorded.
NOTE: a recorded buffer is kept alive by its graph here, so memory a real capture would hand back
to the graphs' pool for the next capture stays counted: the emulated graph pool over-counts.
`LAUNCHES.launches` counts the device operations run outside capture (kernels, GEMMs, array
operations, uploads: what a profiler would list; a graph launch is one), for the launch-count tests.

What this cannot show: timing, concurrency between blocks or streams, NVRTC specifics, cuBLAS
rounding (matmul is NumPy's), parallel-scan rounding of cumsum, `np.asarray(device_array)` (CuPy
refuses it; an ndarray subclass cannot), and anything the emulation itself gets wrong.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import types
import weakref
from pathlib import Path

import numpy as np

KERNEL_DIR = Path(__file__).resolve().parents[1] / "kernels_cuda"
CXX = shutil.which("g++") or shutil.which("c++")


# --------------------------------------------------------------------------------------------
# Device arrays
# --------------------------------------------------------------------------------------------
def _reject_host_arrays(where: str, obj) -> None:
    """CuPy refuses host NumPy arrays (any ndim) as operands of device operations."""
    if isinstance(obj, np.ndarray) and not isinstance(obj, EmuArray):
        raise TypeError(f"emulated cupy.{where}: Unsupported type {type(obj)} (a host NumPy array "
                        f"mixed into a device operation; CuPy raises here)")
    if isinstance(obj, (list, tuple)):
        for o in obj:
            _reject_host_arrays(where, o)
    elif isinstance(obj, dict):
        for o in obj.values():
            _reject_host_arrays(where, o)


class _CaptureState:
    """The stream capture in progress (None: none) and the counters the tests read."""
    ops: list | None = None
    launches: int = 0                       # device operations run outside capture


LAUNCHES = _CaptureState                    # LAUNCHES.launches: read and reset by tests


def capturing() -> bool:
    return _CaptureState.ops is not None


def _device_work(thunk) -> None:
    """Device work with side effects only (a kernel, an in-place op): recorded while capturing, else run."""
    if _CaptureState.ops is not None:
        _CaptureState.ops.append(thunk)
    else:
        _CaptureState.launches += 1
        thunk()


def _refuse_in_capture(what: str) -> None:
    if _CaptureState.ops is not None:
        raise RuntimeError(f"emulated CUDA: {what} during stream capture (cudaErrorStreamCaptureUnsupported: "
                           f"a graph cannot hold a synchronous host<->device transfer)")


def _new_result(result, compute) -> None:
    """A freshly made result array: while capturing, poison it and record `compute` (which returns the
    new value) as writing into this same buffer; outside capture it only counts as one operation."""
    if _CaptureState.ops is None:
        _CaptureState.launches += 1
        return
    arrays = [r for r in (result if isinstance(result, tuple) else (result,)) if isinstance(r, np.ndarray)]
    hosts = [a.view(np.ndarray) for a in arrays]

    def replay():
        value = compute()
        values = value if isinstance(value, tuple) else (value,)
        for h, v in zip(hosts, [v for v in values if isinstance(v, np.ndarray) or np.isscalar(v)]):
            np.copyto(h, v, casting="unsafe")
    _CaptureState.ops.append(replay)
    for h in hosts:
        if h.dtype.kind == "f" or h.dtype.name == "bfloat16":
            h[...] = np.nan


def _as_array(result):
    """A NumPy scalar result (a full reduction) as the 0-d array CuPy would return."""
    return np.asarray(result) if isinstance(result, np.generic) else result


def _is_new(result, *sources) -> bool:
    """result is new memory (a copy), not a view of any source array."""
    if not isinstance(result, np.ndarray):
        return isinstance(result, tuple)
    r = result.view(np.ndarray)
    return not any(isinstance(src, np.ndarray) and np.may_share_memory(r, src.view(np.ndarray))
                   for src in _flat(sources))


def _flat(objs):
    for o in objs:
        if isinstance(o, (list, tuple)):
            yield from _flat(o)
        elif isinstance(o, dict):
            yield from _flat(tuple(o.values()))
        else:
            yield o


def _host(obj):
    """EmuArrays (also inside lists/tuples/dicts) -> plain NumPy views, for calling NumPy."""
    if isinstance(obj, EmuArray):
        return obj.view(np.ndarray)
    if isinstance(obj, list):
        return [_host(o) for o in obj]
    if isinstance(obj, tuple):
        return tuple(_host(o) for o in obj)
    if isinstance(obj, dict):
        return {k: _host(v) for k, v in obj.items()}
    return obj


def _wrap(obj):
    """NumPy results -> device arrays; NumPy scalars -> 0-d device arrays (what CuPy returns).
    New memory is counted in the default pool (a view of a device array is not)."""
    if isinstance(obj, np.ndarray):
        _track(obj)
        return obj.view(EmuArray)
    if isinstance(obj, np.generic):
        return _wrap(np.asarray(obj))
    if isinstance(obj, tuple):
        return tuple(_wrap(o) for o in obj)
    if isinstance(obj, list):
        return [_wrap(o) for o in obj]
    return obj


class EmuArray(np.ndarray):
    """A 'device' array: a NumPy array whose .data.ptr is its host address."""

    @property
    def data(self):
        return types.SimpleNamespace(ptr=self.view(np.ndarray).ctypes.data)

    def get(self, stream=None, order="C", out=None):
        """Device -> host copy (cupy.ndarray.get)."""
        _refuse_in_capture("ndarray.get() (a device->host copy)")
        return np.array(self.view(np.ndarray), copy=True, order=order)

    def set(self, arr, stream=None):
        """Host -> device copy into this array (cupy.ndarray.set): same shape, converted to its dtype."""
        _refuse_in_capture("ndarray.set() (a host->device copy)")
        if isinstance(arr, EmuArray) or tuple(np.shape(arr)) != tuple(self.shape):
            raise ValueError("emulated cupy: ndarray.set takes a host array of the same shape")
        _CaptureState.launches += 1
        self.view(np.ndarray)[...] = arr

    def __array_ufunc__(self, ufunc, method, *inputs, out=None, **kwargs):
        _reject_host_arrays(ufunc.__name__, inputs)
        hin = _host(inputs)
        if out is not None:
            _reject_host_arrays(ufunc.__name__, out)
            kwargs["out"] = _host(out)
            _device_work(lambda: getattr(ufunc, method)(*hin, **kwargs))
            return out[0] if len(out) == 1 else out
        result = _as_array(getattr(ufunc, method)(*hin, **kwargs))
        _new_result(result, lambda: getattr(ufunc, method)(*hin, **kwargs))
        return _wrap(result)

    def __array_function__(self, func, types_, args, kwargs):
        _reject_host_arrays(func.__name__, (args, kwargs))
        ha, hk = _host(args), _host(kwargs)
        result = _as_array(func(*ha, **hk))
        if result is None or _is_new(result, ha, hk):
            _new_result(result, lambda: func(*ha, **hk))
        return _wrap(result)

    def __getitem__(self, key):
        hk = _host(key)
        result = super().__getitem__(hk)
        if isinstance(result, np.ndarray) and _is_new(result, self.view(np.ndarray)):   # fancy indexing: a gather
            base = self.view(np.ndarray)
            _new_result(result, lambda: base[hk])
        return _wrap(result)

    def __setitem__(self, key, value):
        hk, hv, base = _host(key), _host(value), self.view(np.ndarray)
        _device_work(lambda: base.__setitem__(hk, hv))

    def astype(self, dtype, order="K", casting="unsafe", subok=True, copy=True):
        base = self.view(np.ndarray)
        result = base.astype(dtype, order=order, casting=casting, copy=copy)
        if result is base:
            return self
        _new_result(result, lambda: base.astype(dtype, order=order, casting=casting))
        return _wrap(result)

    def copy(self, order="C"):
        base = self.view(np.ndarray)
        result = base.copy(order=order)
        _new_result(result, lambda: base)
        return _wrap(result)

    def reshape(self, *shape, order="C"):
        base = self.view(np.ndarray)
        result = base.reshape(*shape, order=order)
        if _is_new(result, base):                      # a non-contiguous array reshaped: a copy
            _new_result(result, lambda: base.reshape(*shape, order=order))
        return _wrap(result)

    # Reading a device value on the host synchronises: a device refuses it while capturing.
    def __int__(self):
        _refuse_in_capture("int(device array)")
        return int(self.view(np.ndarray))

    def __float__(self):
        _refuse_in_capture("float(device array)")
        return float(self.view(np.ndarray))

    def __bool__(self):
        _refuse_in_capture("bool(device array)")
        return bool(self.view(np.ndarray))

    def item(self, *args):
        _refuse_in_capture("ndarray.item()")
        return self.view(np.ndarray).item(*args)

    def tolist(self):
        _refuse_in_capture("ndarray.tolist()")
        return self.view(np.ndarray).tolist()

    def argsort(self, axis=-1, kind=None, order=None):
        return _argsort(self, axis, kind)

    def sort(self, axis=-1, kind=None, order=None):
        if kind not in (None, "stable") or order is not None:
            raise ValueError("emulated cupy: sort accepts kind=None or 'stable' only, and no order")
        base = self.view(np.ndarray)
        _device_work(lambda: base.sort(axis=axis, kind="stable"))

    def argmax(self, axis=None, out=None, keepdims=False):
        base = self.view(np.ndarray)
        result = np.asarray(base.argmax(axis=axis, keepdims=keepdims))
        _new_result(result, lambda: base.argmax(axis=axis, keepdims=keepdims))
        return _wrap(result)

    def argmin(self, axis=None, out=None, keepdims=False):
        base = self.view(np.ndarray)
        result = np.asarray(base.argmin(axis=axis, keepdims=keepdims))
        _new_result(result, lambda: base.argmin(axis=axis, keepdims=keepdims))
        return _wrap(result)

    def __iter__(self):                       # CuPy yields 0-d arrays, not NumPy scalars
        for i in range(len(self)):
            yield self[i]


def _dev(a) -> EmuArray:
    a = np.asarray(a)
    _track(a)
    return a.view(EmuArray)


def _poisoned(shape, dtype=np.float64, order="C"):
    a = np.empty(shape, dtype=dtype, order=order)
    if a.dtype.kind == "f" or a.dtype.name == "bfloat16":
        a[...] = np.nan
    return _dev(a)


def _argsort(a, axis=-1, kind=None):
    """cupy.argsort: always stable; kind may only be None or 'stable' (CuPy's documented rule)."""
    if kind not in (None, "stable"):
        raise ValueError(f"emulated cupy: argsort accepts kind=None or 'stable' only, got {kind!r}")
    _reject_host_arrays("argsort", a)
    h = _host(a)
    result = np.argsort(h, axis=axis, kind="stable")
    _new_result(result, lambda: np.argsort(h, axis=axis, kind="stable"))
    return _wrap(result)


def _asarray(a, dtype=None, order=None):
    """Host data or a device array -> a device array (a device array of the same dtype is not copied)."""
    if isinstance(a, EmuArray):
        return a if dtype is None or a.dtype == np.dtype(dtype) else a.astype(dtype)
    _refuse_in_capture("cupy.asarray(host data) (a host->device copy)")
    _CaptureState.launches += 1
    return _dev(np.array(a, dtype=dtype, copy=True, order=order or "K"))


def _ascontiguousarray(a, dtype=None):
    if isinstance(a, EmuArray) and a.flags.c_contiguous:
        return _asarray(a, dtype)
    if not isinstance(a, EmuArray):
        _refuse_in_capture("cupy.ascontiguousarray(host data) (a host->device copy)")
    h = _host(a)
    result = np.ascontiguousarray(h, dtype=dtype)
    _new_result(result, lambda: h)
    return _dev(result)


def _asnumpy(a, stream=None, order="C"):
    if isinstance(a, EmuArray):
        return a.get(order=order)
    return np.asarray(a, order=order)


# NOTE: the NumPy names this stand-in forwards. Each is a function CuPy provides too (checked
# against the CuPy API reference); anything else fails as AttributeError so that engine code using
# a NumPy-only function is caught here rather than on the first GPU run.
CUPY_NAMES = frozenset("""
abs absolute add all allclose any arange argmax argmin around array_equal broadcast_to ceil clip
concatenate copy cos count_nonzero cumsum diff divide dot einsum equal exp expand_dims flip floor
floor_divide full full_like greater greater_equal isfinite isinf isnan less less_equal linspace log
log1p logical_and logical_not logical_or matmul max maximum mean min minimum mod multiply negative
nonzero not_equal ones ones_like outer power prod ravel repeat reshape round searchsorted sign sin
sort sqrt square squeeze stack std subtract sum take take_along_axis tanh tile transpose tril triu
true_divide unique var where zeros zeros_like bincount cumprod argwhere
""".split())
CUPY_CONSTANTS = frozenset("""
float16 float32 float64 int8 int16 int32 int64 uint8 uint16 uint32 uint64 bool_ intp dtype newaxis
inf nan pi e integer floating
""".split())


def _gemm_like(func):
    """cupy.dot / matmul of 16-bit matrices: cuBLAS multiplies them with fp32 accumulation
    (CUBLAS_COMPUTE_32F) and rounds the result once; so does this (NumPy's own float16 dot has no
    BLAS and is ~100x slower)."""
    def gemm(a, b, *rest, **kw):
        if not rest and not kw and a.dtype == b.dtype and (a.dtype == np.float16 or a.dtype.name == "bfloat16"):
            return func(a.astype(np.float32), b.astype(np.float32)).astype(a.dtype)
        return func(a, b, *rest, **kw)
    return gemm


class FakeCupyModule(types.ModuleType):
    """`import cupy` inside the tests: explicit functions below, NumPy's for CUPY_NAMES."""

    def __getattr__(self, name):
        if name in CUPY_CONSTANTS:
            return getattr(np, name)
        if name in CUPY_NAMES:
            func = getattr(np, name)

            if name in ("dot", "matmul"):
                func = _gemm_like(func)

            def device_func(*args, **kwargs):
                _reject_host_arrays(name, (args, kwargs))
                ha, hk = _host(args), _host(kwargs)
                if (name in ("dot", "matmul") and _CaptureState.ops is not None and not hk and len(ha) == 2
                        and ha[0].ndim == ha[1].ndim == 2):
                    # NOTE: recorded, not computed: the shape is all a capture needs (and the GEMMs are
                    # most of an emulated step's time)
                    result = np.empty((ha[0].shape[0], ha[1].shape[1]), dtype=np.result_type(ha[0], ha[1]))
                    _new_result(result, lambda: func(*ha))
                    return _wrap(result)
                result = _as_array(func(*ha, **hk))
                if result is None or _is_new(result, ha, hk):
                    _new_result(result, lambda: func(*ha, **hk))
                return _wrap(result)
            device_func.__name__ = name
            return device_func
        raise AttributeError(f"emulated cupy has no {name!r}: check that CuPy provides it, then add "
                             f"it to tests/cuda_emulator.py's CUPY_NAMES")


# --------------------------------------------------------------------------------------------
# Kernels: the .cu sources built for the host emulation
# --------------------------------------------------------------------------------------------
# NOTE: RAWPAGED_EMU_BUILD_DIR keeps the builds across processes (the dry run of tools/gpu_check.sh
# starts several); by default each process builds into a temporary folder of its own.
_BUILD_DIR = Path(os.environ.get("RAWPAGED_EMU_BUILD_DIR") or tempfile.mkdtemp(prefix="rawpaged_emu_"))
_BUILD_DIR.mkdir(parents=True, exist_ok=True)
_LIBS: dict[str, ctypes.CDLL] = {}


def compile_source(code: str, options: tuple = ()) -> ctypes.CDLL:
    """Build one source text for the host emulation (cached by text and options)."""
    # NOTE: the key covers the emulation header too: a build kept in RAWPAGED_EMU_BUILD_DIR from an
    # older host_emulation.h is never reused.
    header = (KERNEL_DIR / "host_emulation.h").read_text()
    key = hashlib.sha1((code + repr(options) + header).encode()).hexdigest()[:16]
    if key not in _LIBS:
        # Dynamic shared memory: `extern __shared__ T name[];` -> the emulator's per-block buffer.
        text = re.sub(r"extern __shared__ (\w+) (\w+)\[\];", r"\1* \2 = (\1*)rp_emu_dyn_smem();", code)
        src = _BUILD_DIR / f"{key}.cpp"
        lib = _BUILD_DIR / f"{key}.so"
        if not lib.is_file():
            tmp = _BUILD_DIR / f"{key}.{os.getpid()}.so"
            src.write_text(text)
            defines = [o for o in options if o.startswith("-D")]
            cmd = [CXX, "-std=c++17", "-O1", "-shared", "-fPIC", "-pthread", "-w", "-DRP_HOST_EMULATION",
                   f"-I{KERNEL_DIR}", *defines, "-x", "c++", str(src), "-o", str(tmp)]
            res = subprocess.run(cmd, capture_output=True, text=True)
            assert res.returncode == 0, f"host emulation build failed:\n{res.stderr[-4000:]}"
            os.replace(tmp, lib)
        dll = ctypes.CDLL(str(lib))
        dll.rp_emu_launch.argtypes = [ctypes.c_void_p] + [ctypes.c_uint] * 4 + [ctypes.c_ulonglong, ctypes.c_void_p, ctypes.c_void_p]
        dll.rp_emu_launch.restype = ctypes.c_int
        _LIBS[key] = dll
    return _LIBS[key]


def _split_args(args):
    """Kernel arguments -> (integer-class values, float values) for rp_emu_launch's prototype."""
    ints, floats = [], []
    for a in args:
        if isinstance(a, EmuArray):
            ints.append(a.data.ptr)
        elif isinstance(a, np.ndarray):
            # NOTE: CuPy would pass a host array's address to the kernel only by accident; a real
            # device faults on it. Refuse it here so such a bug shows.
            raise TypeError("kernel argument is a host NumPy array, not a device array")
        elif isinstance(a, np.float32):
            floats.append(float(a))
        elif isinstance(a, (np.integer, int)):
            ints.append(int(a))
        else:
            raise TypeError(f"unexpected kernel argument {type(a)}")
    assert len(ints) <= 24 and len(floats) <= 8, (len(ints), len(floats))
    return (ctypes.c_int64 * 24)(*ints), (ctypes.c_float * 8)(*floats)


class EmuKernel:
    def __init__(self, lib: ctypes.CDLL, name: str):
        self.lib, self.name = lib, name
        self.ptr = ctypes.cast(getattr(lib, name), ctypes.c_void_p).value
        self.function = types.SimpleNamespace(ptr=0)
        # What cupy.RawKernel reports from the compiled function; the host build has no registers.
        self.attributes = {"max_threads_per_block": 1024, "shared_size_bytes": 0, "const_size_bytes": 0,
                           "local_size_bytes": 0, "num_regs": 0, "ptx_version": 0, "binary_version": 0,
                           "cache_mode_ca": 0, "max_dynamic_shared_size_bytes": 48 * 1024,
                           "preferred_shared_memory_carveout": -1}
        for attr, value in self.attributes.items():
            setattr(self, attr, value)

    def __call__(self, grid, block, args, shared_mem=0):
        assert block[1] == block[2] == 1 and block[0] % 32 == 0 and block[0] <= 1024, block
        ints, floats = _split_args(args)
        keep = tuple(a for a in args if isinstance(a, EmuArray))     # a recorded launch keeps its buffers alive

        def run():
            assert keep is not None
            rc = self.lib.rp_emu_launch(self.ptr, grid[0], grid[1], grid[2], block[0], shared_mem, ints, floats)
            assert rc == 0, f"{self.name}: a block deadlocked (threads waiting on barriers no one else reaches)"
        _device_work(run)


# How the emulated cp.async lands (kernels_cuda/host_emulation.h): "deferred" (at the issuing thread's
# wait, visible to the others after its next barrier: catches a missing wait or barrier) or "eager" (at
# issue: catches a stage refilled while other warps still read it). Tests switch it with
# monkeypatch.setattr(cuda_emulator, "CP_ASYNC_MODE", "eager") and fresh module caches.
CP_ASYNC_MODE = "deferred"


class EmuModule:
    def __init__(self, code: str, options=()):
        extra = ("-DRP_EMU_CP_EAGER",) if CP_ASYNC_MODE == "eager" else ()
        self.lib = compile_source(code, tuple(options) + extra)

    def get_function(self, name: str) -> EmuKernel:
        return EmuKernel(self.lib, name)


# --------------------------------------------------------------------------------------------
# Streams, events, memory
# --------------------------------------------------------------------------------------------
class _Stream:
    """Everything runs in order on one OS thread, so streams and events only record their use."""
    _next_ptr = 1

    def __init__(self, non_blocking=False, null=False):
        if null:
            self.ptr = 0
        else:
            self.ptr = _Stream._next_ptr
            _Stream._next_ptr += 1
        self.waited = 0

    def synchronize(self):
        pass

    def record(self, event=None):
        event = event or _Event()
        event.record(self)
        return event

    def wait_event(self, event):
        assert isinstance(event, _Event) and event.recorded, "wait_event on an event never recorded"
        self.waited += 1

    # CUDA graphs: see the module docstring.
    def begin_capture(self, mode=None):
        if self.ptr == 0:
            raise RuntimeError("emulated CUDA: the legacy default stream cannot be captured (use a non-blocking stream)")
        if _CaptureState.ops is not None:
            raise RuntimeError("emulated CUDA: a stream capture is already in progress")
        _CaptureState.ops = []
        self.capturing = True

    def is_capturing(self):
        return bool(getattr(self, "capturing", False))

    def end_capture(self):
        if not self.is_capturing():
            raise RuntimeError("emulated CUDA: end_capture without begin_capture")
        ops, _CaptureState.ops = _CaptureState.ops, None
        self.capturing = False
        return _Graph(ops)

    def __enter__(self):
        self._prev = _CURRENT_STREAM[0]
        _CURRENT_STREAM[0] = self
        return self

    def __exit__(self, *exc):
        _CURRENT_STREAM[0] = self._prev
        if exc[0] is not None and self.is_capturing():        # a failed capture leaves no capture behind
            _CaptureState.ops = None
            self.capturing = False


class _Graph:
    """cupy.cuda.Graph: the recorded device work of one capture, run in order by launch()."""

    def __init__(self, ops):
        self.ops = ops
        self.launches = 0

    def upload(self, stream=None):
        pass

    def launch(self, stream=None):
        _refuse_in_capture("Graph.launch inside another capture")
        self.launches += 1
        _CaptureState.launches += 1                           # one launch for the whole graph
        for op in self.ops:
            op()


class _Event:
    """Recording takes the host clock: the work before it has run (everything runs in order)."""

    def __init__(self, block=False, disable_timing=False, interprocess=False):
        self.recorded = False
        self.disable_timing = disable_timing
        self.time = None

    def record(self, stream=None):
        self.recorded = True
        self.time = time.perf_counter()

    def synchronize(self):
        pass

    def done(self):
        return True


def _elapsed_ms(start: _Event, end: _Event) -> float:
    """cupy.cuda.get_elapsed_time: milliseconds between two recorded, timing-enabled events."""
    if start.disable_timing or end.disable_timing or start.time is None or end.time is None:
        raise RuntimeError("emulated cupy: get_elapsed_time needs two recorded events with timing enabled")
    return (end.time - start.time) * 1e3


_NULL_STREAM = _Stream(null=True)
_CURRENT_STREAM = [_NULL_STREAM]


def _memcpy(dst, src, nbytes, kind, stream):
    _device_work(lambda: ctypes.memmove(dst, src, nbytes))


class MemInfo:
    """The emulated device's memory (tests set these): `total` bytes, of which `outside` are used
    outside CuPy's pool (the CUDA context, cuBLAS workspaces, other processes)."""
    total = 1 << 31
    outside = 0


class OutOfMemoryError(MemoryError):
    """cupy.cuda.memory.OutOfMemoryError."""


class FakeMemoryPool:
    """CuPy's default device MemoryPool, as far as the engine can see it.

    Every device array is counted from its allocation until it is garbage (rounded up to 512 B, as
    CuPy rounds). Freed memory stays in the pool: `total_bytes()` (what the pool holds from the
    driver) only grows until `free_all_blocks()`, so the driver reports it as used. The model is a
    perfect pool (any cached bytes serve any later allocation); CuPy's own may hold more through
    fragmentation, never less. An allocation that does not fit even after releasing the cached
    blocks raises OutOfMemoryError, as CuPy does.
    """
    UNIT = 512

    def __init__(self):
        self.used = 0
        self.held = 0
        self._live: dict[int, weakref.ref] = {}

    def used_bytes(self) -> int:
        return self.used

    def total_bytes(self) -> int:
        return self.held

    def free_bytes(self) -> int:
        return self.held - self.used

    def free_all_blocks(self, stream=None) -> None:
        self.held = self.used

    def malloc(self, nbytes):
        """cupy.cuda.MemoryPool.malloc: only passed to using_allocator here (arrays are counted by track)."""
        raise NotImplementedError("emulated cupy: allocate through cupy.empty under using_allocator(pool.malloc)")

    def track(self, arr: np.ndarray) -> None:
        root = arr
        while isinstance(root.base, np.ndarray):
            root = root.base
        ref = self._live.get(id(root))
        if ref is not None and ref() is root:
            return                                    # memory of a live device array: a view
        nbytes = -(-max(root.nbytes, 1) // self.UNIT) * self.UNIT
        limit = MemInfo.total - MemInfo.outside - sum(p.held for p in _POOLS if p is not self)
        if self.used + nbytes > limit:
            self.held = self.used                     # CuPy frees its cached blocks before giving up
            raise OutOfMemoryError(f"emulated cupy: out of memory allocating {nbytes:,} bytes "
                                   f"({self.used:,} in use, {limit:,} available to the pool)")
        self.used += nbytes
        self.held = max(self.held, self.used)
        key = id(root)
        self._live[key] = weakref.ref(root)
        weakref.finalize(root, self._release, key, nbytes)

    def _release(self, key: int, nbytes: int) -> None:
        self.used -= nbytes
        self._live.pop(key, None)


_POOLS: "weakref.WeakSet[FakeMemoryPool]" = weakref.WeakSet()
_orig_pool_init = FakeMemoryPool.__init__


def _pool_init(self, *args, **kwargs):
    _orig_pool_init(self)
    _POOLS.add(self)


FakeMemoryPool.__init__ = _pool_init
POOL = FakeMemoryPool()
_ALLOCATOR = [POOL]          # the pool new device arrays come from (cupy.cuda.using_allocator)


class _UsingAllocator:
    """cupy.cuda.using_allocator(pool.malloc): arrays made inside come from that pool (a graph's own)."""

    def __init__(self, allocator=None):
        self.pool = getattr(allocator, "__self__", None) if allocator is not None else POOL
        if not isinstance(self.pool, FakeMemoryPool):
            raise TypeError("emulated cupy: using_allocator takes a MemoryPool's malloc")

    def __enter__(self):
        _ALLOCATOR.append(self.pool)
        return self

    def __exit__(self, *exc):
        _ALLOCATOR.pop()


def _track(arr):
    _ALLOCATOR[-1].track(arr)


def _mem_get_info():
    """(free, total) as the driver reports them: every pool's blocks count as used."""
    return MemInfo.total - MemInfo.outside - sum(p.held for p in _POOLS), MemInfo.total


def _memset(ptr, value, nbytes, stream=None):
    _device_work(lambda: ctypes.memset(ptr, value, nbytes))


def _memcpy_sync(dst, src, nbytes, kind):
    _refuse_in_capture("a synchronous cudaMemcpy")
    ctypes.memmove(dst, src, nbytes)


def _device_properties(device_id=0):
    return {"name": b"host emulation (tests/cuda_emulator.py)", "multiProcessorCount": 4,
            "l2CacheSize": 1 << 20, "totalGlobalMem": MemInfo.total, "major": 8, "minor": 0}


# --------------------------------------------------------------------------------------------
# cuBLAS: gemmEx (column-major, as cuBLAS), for dense.py's bf16 GEMM
# --------------------------------------------------------------------------------------------
_CUDA_DTYPES = {0: np.float32, 2: np.float16, 14: "bfloat16"}


def _np_cuda_dtype(code: int) -> np.dtype:
    kind = _CUDA_DTYPES[code]
    if kind == "bfloat16":
        import ml_dtypes
        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(kind)


def _column_major(ptr: int, dtype: np.dtype, rows: int, cols: int, ld: int) -> np.ndarray:
    """The rows x cols column-major matrix at ptr (leading dimension ld), as a [cols, rows] row-major view."""
    assert ld >= rows, (ld, rows)
    count = ld * (cols - 1) + rows
    buf = (ctypes.c_uint8 * (count * dtype.itemsize)).from_address(ptr)
    flat = np.frombuffer(buf, dtype=dtype, count=count)
    return np.lib.stride_tricks.as_strided(flat, shape=(cols, rows), strides=(ld * dtype.itemsize, dtype.itemsize))


def _gemm_ex(handle, transa, transb, m, n, k, alpha, A, Atype, lda, B, Btype, ldb, beta, C, Ctype, ldc,
             computeType, algo):
    """C = alpha op(A) op(B) + beta C, fp32 accumulation (computeType CUBLAS_COMPUTE_32F = 68 only).
    NOTE: alpha / beta are host pointers (CUBLAS_POINTER_MODE_HOST): read when called, as on a device."""
    assert computeType == 68, f"emulated gemmEx: compute type {computeType} not modelled"
    al = ctypes.c_float.from_address(alpha).value
    be = ctypes.c_float.from_address(beta).value
    _device_work(lambda: _gemm_ex_run(transa, transb, m, n, k, al, A, Atype, lda, B, Btype, ldb, be, C, Ctype, ldc))


def _gemm_ex_run(transa, transb, m, n, k, al, A, Atype, lda, B, Btype, ldb, be, C, Ctype, ldc):
    a_rows, a_cols = (m, k) if transa == 0 else (k, m)
    b_rows, b_cols = (k, n) if transb == 0 else (n, k)
    a = _column_major(A, _np_cuda_dtype(Atype), a_rows, a_cols, lda).T.astype(np.float32)    # [a_rows, a_cols]
    b = _column_major(B, _np_cuda_dtype(Btype), b_rows, b_cols, ldb).T.astype(np.float32)
    op_a = a if transa == 0 else a.T                                                           # [m, k]
    op_b = b if transb == 0 else b.T                                                           # [k, n]
    c_view = _column_major(C, _np_cuda_dtype(Ctype), m, n, ldc)                                # [n, m] = C^T
    acc = al * (op_a @ op_b)
    if be != 0.0:
        acc = acc + be * c_view.T.astype(np.float32)
    c_view[...] = acc.T.astype(c_view.dtype)


def make_fake_cublas() -> types.ModuleType:
    mod = types.ModuleType("cupy_backends.cuda.libs.cublas")
    mod.gemmEx = _gemm_ex
    mod.setStream = lambda handle, stream: None
    return mod


def _EmuCopy(a, dtype=None):
    """cupy.array(device array): a device-to-device copy."""
    h = _host(a)
    result = np.array(h, dtype=dtype, copy=True)
    _new_result(result, lambda: h)
    return _dev(result)


def make_fake_cupy() -> types.ModuleType:
    cp = FakeCupyModule("cupy")
    cp.__file__ = __file__
    cp.ndarray = EmuArray
    cp.is_available = lambda: True
    cp.empty = _poisoned
    cp.empty_like = lambda a, dtype=None: _poisoned(a.shape, dtype or a.dtype)
    cp.asarray = _asarray
    cp.array = lambda a, dtype=None, copy=True: (_EmuCopy(a, dtype) if isinstance(a, EmuArray) else
                                                 _asarray(np.array(a, dtype=dtype, copy=True)))
    cp.ascontiguousarray = _ascontiguousarray
    cp.asnumpy = _asnumpy
    cp.argsort = _argsort
    cp.RawModule = EmuModule
    cp.__version__ = "emulated (tests/cuda_emulator.py)"
    cp.get_default_memory_pool = lambda: POOL
    cp.get_default_pinned_memory_pool = lambda: types.SimpleNamespace(free_all_blocks=lambda: None)
    device = types.SimpleNamespace(attributes={"MultiProcessorCount": 4, "MaxSharedMemoryPerMultiprocessor": 233472,
                                               "MaxRegistersPerMultiprocessor": 65536,
                                               "MaxThreadsPerMultiProcessor": 2048, "MaxBlocksPerMultiprocessor": 32,
                                               "ReservedSharedMemoryPerBlock": 1024},
                                   synchronize=lambda: None, id=0, compute_capability="80")
    driver = types.SimpleNamespace(funcSetAttribute=lambda *a: None, CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES=8)
    runtime = types.SimpleNamespace(memcpyAsync=_memcpy, memcpy=_memcpy_sync, memsetAsync=_memset,
                                    memcpyHostToHost=0, memcpyHostToDevice=1, memcpyDeviceToHost=2,
                                    memcpyDeviceToDevice=3, memcpyDefault=4, memGetInfo=_mem_get_info,
                                    getDeviceCount=lambda: 1, getDeviceProperties=_device_properties,
                                    runtimeGetVersion=lambda: 0, driverGetVersion=lambda: 0)
    rng = np.random.default_rng(0)
    cp.random = types.SimpleNamespace(
        seed=lambda s=None: rng.bit_generator.state.update(np.random.default_rng(s).bit_generator.state),
        standard_normal=lambda size=None, dtype=np.float64: _wrap(rng.standard_normal(size).astype(dtype)),
        random=lambda size=None, dtype=np.float64: _wrap(rng.random(size).astype(dtype)),
        randint=lambda low, high=None, size=None, dtype=np.int64: _wrap(rng.integers(low, high, size).astype(dtype)))
    cuda_mod = types.ModuleType("cupy.cuda")
    cuda_mod.get_current_stream = lambda: _CURRENT_STREAM[0]
    cuda_mod.Graph = _Graph
    cuda_mod.MemoryPool = FakeMemoryPool
    cuda_mod.using_allocator = _UsingAllocator
    cuda_mod.Stream = _Stream
    cuda_mod.Event = _Event
    cuda_mod.get_elapsed_time = _elapsed_ms
    cuda_mod.Device = lambda *a: device
    cuda_mod.driver = driver
    cuda_mod.runtime = runtime
    cuda_mod.memory = types.SimpleNamespace(OutOfMemoryError=OutOfMemoryError, MemoryPool=FakeMemoryPool)
    cuda_mod.device = types.SimpleNamespace(get_cublas_handle=lambda: 1)
    # NOTE: set_allocator(None) (plain cudaMalloc per array, for compute-sanitizer) changes nothing here.
    cuda_mod.set_allocator = lambda allocator=None: None
    cuda_mod.set_pinned_memory_allocator = lambda allocator=None: None
    cp.cuda = cuda_mod
    return cp


def make_fake_cupyx() -> types.ModuleType:
    x = types.ModuleType("cupyx")
    # cupyx.empty_pinned returns a numpy.ndarray in page-locked memory: a host array, not a device one.
    x.empty_pinned = lambda shape, dtype=np.float32, order="C": np.empty(shape, dtype=dtype, order=order)
    x.zeros_pinned = lambda shape, dtype=np.float32, order="C": np.zeros(shape, dtype=dtype, order=order)
    return x


fake_cupy = make_fake_cupy()
fake_cupyx = make_fake_cupyx()
fake_cublas = make_fake_cublas()
_FAKE_MODULES = {"cupy": fake_cupy, "cupy.cuda": fake_cupy.cuda, "cupyx": fake_cupyx,
                 "cupy_backends": types.ModuleType("cupy_backends"),
                 "cupy_backends.cuda": types.ModuleType("cupy_backends.cuda"),
                 "cupy_backends.cuda.libs": types.ModuleType("cupy_backends.cuda.libs"),
                 "cupy_backends.cuda.libs.cublas": fake_cublas}
_FAKE_MODULES["cupy_backends"].cuda = _FAKE_MODULES["cupy_backends.cuda"]
_FAKE_MODULES["cupy_backends.cuda"].libs = _FAKE_MODULES["cupy_backends.cuda.libs"]
_FAKE_MODULES["cupy_backends.cuda.libs"].cublas = fake_cublas


def install(monkeypatch):
    """Make `import cupy` / `import cupyx` give the stand-ins and point rawpaged.backend.cuda at them.

    Afterwards rawpaged.backend.cuda_available() is true (it imports cupy and asks is_available()),
    so LLM(..., device="cuda") runs the engine on the emulated kernels. monkeypatch undoes all of it.
    """
    from rawpaged.backend import cuda

    for name, module in _FAKE_MODULES.items():
        monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.setattr(cuda, "cupy", fake_cupy)          # the package forwards this to cuda.launch
    monkeypatch.setattr(cuda, "xp", fake_cupy)
    monkeypatch.setattr(cuda, "num_sms", lambda: 4)       # likewise
    monkeypatch.setattr(MemInfo, "outside", MemInfo.outside)
    monkeypatch.setattr(MemInfo, "total", MemInfo.total)
    cuda.launch.clear_caches()
    return cuda


class _Setter:
    """monkeypatch's setitem/setattr without the undo (install_globally)."""
    setitem = staticmethod(lambda mapping, key, value: mapping.__setitem__(key, value))
    setattr = staticmethod(setattr)


def install_globally():
    """`install` for a whole process (the dry run's scripts: RAWPAGED_EMULATE_CUDA=1); never undone."""
    return install(_Setter())


def uninstall_caches():
    from rawpaged.backend import cuda
    cuda.launch.clear_caches()
