"""Reduced-precision storage on the CPU: bfloat16 and float16 held as their 16-bit patterns.

Numba has no 16-bit float arrays, so a bfloat16 (ml_dtypes) or float16 array is handed to the
kernels as a `.view(np.uint16)` and each element is widened to float32 in registers:

  bfloat16  the high half of a float32: bits << 16, reinterpreted (exact)
  float16   LLVM's `fpext half -> float` (vcvtph2ps where F16C exists; exact)

and narrowed back with round-to-nearest-even (`to_bf16_bits`, `to_f16_bits`). Arithmetic is always
float32: the 16-bit types are a storage format here (weights and the KV cache), never a compute one.
"""
from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic

try:
    import ml_dtypes
    BFLOAT16 = np.dtype(ml_dtypes.bfloat16)
except Exception:  # pragma: no cover - ml_dtypes is a dependency; without it there is no bfloat16
    BFLOAT16 = None

# storage kinds the kernels take (a compile-time constant argument)
F32, BF16, F16 = 0, 1, 2


_KINDS = {np.dtype(np.float32): F32, np.dtype(np.float16): F16}
if BFLOAT16 is not None:
    _KINDS[BFLOAT16] = BF16


def kind_of(dtype) -> int:
    kind = _KINDS.get(dtype)
    if kind is None:
        kind = _KINDS.get(np.dtype(dtype))
        if kind is None:
            raise ValueError(f"the CPU kernels store float32, bfloat16 or float16, not {np.dtype(dtype)}")
    return kind


def bits(a: np.ndarray) -> np.ndarray:
    """The array the kernels read: float32 as is, 16-bit floats as their uint16 patterns (a view)."""
    return a if a.dtype == np.float32 else a.view(np.uint16)


@intrinsic
def _u32_as_f32(typingctx, u):
    """Reinterpret a uint32's bits as a float32 (no conversion)."""
    def codegen(context, builder, sig, args):
        return builder.bitcast(args[0], ir.FloatType())
    return types.float32(types.uint32), codegen


@intrinsic
def _f32_as_u32(typingctx, f):
    def codegen(context, builder, sig, args):
        return builder.bitcast(args[0], ir.IntType(32))
    return types.uint32(types.float32), codegen


@intrinsic
def _f16_bits_to_f32(typingctx, h):
    def codegen(context, builder, sig, args):
        return builder.fpext(builder.bitcast(args[0], ir.HalfType()), ir.FloatType())
    return types.float32(types.uint16), codegen


@intrinsic
def _f32_to_f16_bits(typingctx, f):
    def codegen(context, builder, sig, args):
        return builder.bitcast(builder.fptrunc(args[0], ir.HalfType()), ir.IntType(16))
    return types.uint16(types.float32), codegen


@njit(inline="always")
def widen(v, kind):
    """One stored element -> float32 (kind: F32, BF16 or F16; constant-folded per compilation)."""
    if kind == BF16:
        return _u32_as_f32(np.uint32(v) << np.uint32(16))
    if kind == F16:
        return _f16_bits_to_f32(v)
    return np.float32(v)


@njit(inline="always")
def to_bf16_bits(x):
    """float32 -> bfloat16 bits, round to nearest even (NaN stays a quiet NaN)."""
    u = _f32_as_u32(np.float32(x))
    if (u & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000):
        return np.uint16((u >> np.uint32(16)) | np.uint32(0x40))
    u = u + np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1))
    return np.uint16(u >> np.uint32(16))


@njit(inline="always")
def to_f16_bits(x):
    return _f32_to_f16_bits(np.float32(x))


@njit(inline="always")
def narrow(x, kind):
    """float32 -> the stored element of `kind` (a uint16 pattern, or float32 as is)."""
    if kind == BF16:
        return to_bf16_bits(x)
    if kind == F16:
        return to_f16_bits(x)
    return np.float32(x)


def _prefetch(locality: int):
    """The intrinsic  prefetch(arr, i, j): hint the hardware to bring the cache line of arr[i, j]
    (a 2-D array) into the caches; locality 3 (prefetcht0): into every level, 2 (prefetcht1): into
    L2 (and L3), not L1."""
    @intrinsic
    def prefetch(typingctx, arr, i, j):
        def codegen(context, builder, sig, args):
            from numba.core import cgutils
            aryty = sig.args[0]
            ary = context.make_array(aryty)(context, builder, args[0])
            ptr = cgutils.get_item_pointer(context, builder, aryty, ary, [args[1], args[2]], wraparound=False)
            i32 = ir.IntType(32)
            fnty = ir.FunctionType(ir.VoidType(), [ptr.type, i32, i32, i32])
            fn = cgutils.get_or_insert_function(builder.module, fnty, "llvm.prefetch.p0")
            builder.call(fn, [ptr, i32(0), i32(locality), i32(1)])   # read, locality, data cache
            return context.get_dummy_value()
        return types.void(arr, i, j), codegen
    return prefetch


# NOTE: module-level names: Numba kernels call them as globals (the on-disk cache needs them importable)
prefetch = _prefetch(3)
prefetch_l2 = _prefetch(2)
