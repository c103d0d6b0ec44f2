"""How a kernel is described: its parameters (`Param`), its template and instantiations (`Family`),
one instantiation (`Kernel`) with the typed argument tuple it takes and the extern "C" wrapper
generated for it. The table itself, every kernel of kernels_cuda/, is kernels.py.

Pure Python: importing this needs neither CuPy nor a device.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field

import numpy as np

from kernels_cuda import SOURCES

TAG_CTYPES = {"f16": "f16", "bf16": "bf16", "f32": "float"}          # dtype tag -> C++ storage type

# The C types a kernel parameter may have ('T' / 'C': the instantiation's dtypes) -> (how the value
# is passed: an 8-byte address, i32, i64 or f32; the dtype tag a pointer's array must have, None: any).
CTYPES = {
    "T*": ("ptr", "T"), "const T*": ("ptr", "T"), "const C*": ("ptr", "C"),
    "float*": ("ptr", "f32"), "const float*": ("ptr", "f32"),
    "const int*": ("ptr", "i32"), "const long long*": ("ptr", "i64"), "uint4*": ("ptr", None),
    "int": ("i32", None), "long long": ("i64", None), "float": ("f32", None),
}
try:
    import ml_dtypes
    _BF16 = np.dtype(ml_dtypes.bfloat16)
except Exception:  # pragma: no cover - without ml_dtypes there are no bfloat16 arrays to pass
    _BF16 = None
# NOTE: dtype objects, compared with ==: `array.dtype.name` costs microseconds, and args() runs
# on every launch.
_ELEM_DTYPES = {"f16": np.dtype(np.float16), "bf16": _BF16, "f32": np.dtype(np.float32),
                "i32": np.dtype(np.int32), "i64": np.dtype(np.int64)}
# NOTE: the NumPy scalars CuPy passes by value, memoised: building one costs about as much as the
# rest of args() together, and launches repeat the same few sizes (the scalars are immutable).
_SCALAR_TYPES = {kind: functools.lru_cache(maxsize=4096)(cast)
                 for kind, cast in (("i32", np.int32), ("i64", np.int64), ("f32", np.float32))}
_F32 = _SCALAR_TYPES["f32"]
_NOT_ARRAYS = (int, float, np.generic, type(None))
_INTEGERS = (int, np.integer)                       # bool is an int (flags)
_NUMBERS = (int, float, np.integer, np.floating)

# A null pointer argument (only where the table says `nullable`).
NULL = np.uint64(0)


@dataclass(frozen=True)
class Param:
    name: str
    ctype: str                 # a key of CTYPES
    nullable: bool = False     # NULL allowed (the kernel checks for it)

    @property
    def kind(self) -> str:
        return CTYPES[self.ctype][0]

    @property
    def elem(self) -> str | None:
        return CTYPES[self.ctype][1]


def parse_params(signature: str, nullable: tuple[str, ...] = ()) -> tuple[Param, ...]:
    """'T* out, const int* seq_lens, int layer' -> Params (a C parameter list, one type per name)."""
    params = []
    for decl in signature.split(","):
        ctype, _, name = decl.strip().rpartition(" ")
        ctype = ctype.replace(" *", "*").strip()
        if ctype not in CTYPES or not name.isidentifier():
            raise ValueError(f"kernel parameter {decl.strip()!r}: type must be one of {sorted(CTYPES)}")
        params.append(Param(name, ctype, name in nullable))
    unknown = set(nullable) - {p.name for p in params}
    if unknown or len({p.name for p in params}) != len(params):
        raise ValueError(f"kernel parameters {signature!r}: duplicate names or unknown nullable {sorted(unknown)}")
    return tuple(params)


@dataclass(eq=False)
class Family:
    """One C++ template of a .cu file and the extern "C" kernels instantiated from it."""
    name: str                        # "paged_decode"
    source: str                      # "paged_attention.cu"
    impl: str                        # the template the wrappers call: "paged_decode_impl"
    template: tuple[str, ...]        # its template parameters: "T"/"C" dtypes, others ints
    name_format: str                 # "paged_decode_{T}_hd{HD}_g{GT}" (an int 0 is spelled "any")
    params: tuple[Param, ...]
    instances: tuple[tuple, ...]     # the template arguments of every instantiation
    max_threads: int                 # __launch_bounds__: the most threads a launch may use
    per_dtype: bool = False          # its source is compiled once per dtype (only the model's is built)
    min_blocks: int = 0              # __launch_bounds__'s second argument (0: none); see kernels.PAGED_PREFILL
    kernels: dict = field(default_factory=dict, repr=False)

    def __post_init__(self):
        if self.source not in SOURCES:
            raise ValueError(f"{self.name}: no kernel source {self.source!r} in kernels_cuda")
        for targs in self.instances:
            named = dict(zip(self.template, targs))
            if len(targs) != len(self.template) or not all(
                    (v in TAG_CTYPES) if t in ("T", "C") else isinstance(v, int) for t, v in named.items()):
                raise ValueError(f"{self.name}: template arguments {targs} do not fit <{', '.join(self.template)}>")
            label = {t: ("any" if v == 0 and t not in ("T", "C") else v) for t, v in named.items()}
            self.kernels[tuple(targs)] = Kernel(self, tuple(targs), self.name_format.format(**label))

    def kernel(self, **targs) -> Kernel:
        """The instantiation with these template arguments, e.g. PAGED_DECODE.kernel(T="f16", HD=128, GT=4)."""
        try:
            return self.kernels[tuple(targs[t] for t in self.template)]
        except KeyError:
            raise ValueError(f"no {self.name} kernel is instantiated for "
                             f"{', '.join(f'{k}={v}' for k, v in targs.items())}") from None

    def kernel_name(self, **targs) -> str:
        return self.kernel(**targs).name


@dataclass(frozen=True, eq=False)
class Kernel:
    """One instantiation: the name the dispatcher picks, what the launcher compiles, what the builders fill."""
    family: Family
    targs: tuple
    name: str

    @property
    def source(self) -> str:
        return self.family.source

    @property
    def params(self) -> tuple[Param, ...]:
        return self.family.params

    @property
    def max_threads(self) -> int:
        return self.family.max_threads

    @property
    def tag(self) -> str:
        """The dtype its module is compiled for ('' where the source holds every dtype)."""
        return self.dtypes()["T"] if self.family.per_dtype else ""

    @functools.cached_property
    def template_args(self) -> dict:
        """{'T': 'f16', 'HD': 128, 'GT': 4}: its template arguments by parameter name."""
        return dict(zip(self.family.template, self.targs))

    def dtypes(self) -> dict[str, str]:
        """{'T': 'f16', ...}: the dtype tags of its template arguments."""
        return {t: v for t, v in zip(self.family.template, self.targs) if t in ("T", "C")}

    def ctypes(self) -> list[str]:
        """The C parameter types of this instantiation, e.g. ['f16*', ..., 'long long', ..., 'float']."""
        subst = {t: TAG_CTYPES[v] for t, v in self.dtypes().items()}
        return [p.ctype.replace(f"{p.elem}*", f"{subst[p.elem]}*") if p.elem in subst else p.ctype
                for p in self.params]

    @functools.cached_property
    def _plan(self) -> tuple:
        """Precomputed for args(): the names in order, the scalars (position, cast, accepted types)
        and the pointers (position, dtype its array must have or None, NULL allowed)."""
        dtypes = self.dtypes()
        scalars = tuple((i, _SCALAR_TYPES[p.kind], _NUMBERS if p.kind == "f32" else _INTEGERS)
                        for i, p in enumerate(self.params) if p.kind != "ptr")
        pointers = tuple((i, _ELEM_DTYPES.get(dtypes.get(p.elem, p.elem)) if p.elem else None, p.nullable)
                         for i, p in enumerate(self.params) if p.kind == "ptr")
        return tuple(p.name for p in self.params), scalars, pointers

    def args(self, **values) -> tuple:
        """The typed argument tuple in parameter order, from every parameter given by name: arrays
        (checked: an array, of the parameter's dtype; NULL only where nullable), np.int32 / np.int64
        (checked: an integer that fits) and np.float32 (checked: a number).
        NOTE: this runs on every launch, so the checks are a few isinstance and dtype comparisons."""
        names, scalars, pointers = self._plan
        if len(values) != len(names):
            raise self._names_error(values)
        try:
            out = [values[n] for n in names]
        except KeyError:
            raise self._names_error(values) from None
        for i, cast, accepted in scalars:
            v = out[i]
            if not isinstance(v, accepted):
                what = "a number" if cast is _F32 else "an integer"
                raise TypeError(f"{self.name}: {self._describe(i)} needs {what}, got {v!r}")
            try:
                out[i] = cast(float(v) if cast is _F32 else int(v))
            except OverflowError:
                raise ValueError(f"{self.name}: {names[i]} = {int(v)} does not fit a {self.params[i].ctype}") from None
        for i, want, nullable in pointers:
            v = out[i]
            if isinstance(v, _NOT_ARRAYS):
                if not (nullable and v is NULL):
                    raise TypeError(f"{self.name}: {self._describe(i)} needs an array, got {v!r}")
            elif want is not None and v.dtype != want:
                raise TypeError(f"{self.name}: {self._describe(i)} needs a {want} array, got {v.dtype}")
        return tuple(out)

    def _describe(self, i: int) -> str:
        return f"{self.params[i].name} ({self.params[i].ctype})"

    def _names_error(self, values) -> TypeError:
        names = [p.name for p in self.params]
        missing = [n for n in names if n not in values]
        extra = [n for n in values if n not in names]
        return TypeError(f"{self.name}: arguments missing {missing}, unexpected {extra}")

    def wrapper(self) -> str:
        """The generated extern "C" entry point (see the module docstring)."""
        targs = ", ".join(TAG_CTYPES[v] if t in ("T", "C") else str(v)
                          for t, v in zip(self.family.template, self.targs))
        impl = f"{self.family.impl}<{targs}>" if targs else self.family.impl
        types = self.ctypes()
        decl = ", ".join(f"{t} {p.name}" for t, p in zip(types, self.params))
        call = ", ".join(p.name for p in self.params)
        bounds = f"{self.max_threads}, {self.family.min_blocks}" if self.family.min_blocks else f"{self.max_threads}"
        return (f'extern "C" __global__ void __launch_bounds__({bounds}) {self.name}({decl}) {{\n'
                f"    static_assert(rp_same_type<decltype(&{impl}), void (*)({', '.join(types)})>::value,\n"
                f'                  "{self.name}: {self.family.impl} takes other parameter types than the '
                f'table in rawpaged/backend/cuda/kernels.py");\n'
                f"    {impl}({call});\n}}\n")
