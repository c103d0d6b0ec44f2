"""Backend selection: the same ops, the same argument order and the same memory layouts on the CPU
(NumPy + Numba) and on the GPU (CuPy + raw CUDA C). The model code calls `backend.<op>(...)` and
never knows which one runs.
"""
from __future__ import annotations

from types import ModuleType

from rawpaged.errors import RawpagedError

DEVICES = ("auto", "cpu", "cuda")


def cuda_available() -> bool:
    try:
        import cupy  # noqa: F401
    except Exception:
        return False
    try:
        return bool(cupy.is_available())
    except Exception:
        return False


def resolve_device(device: str) -> str:
    """'auto' -> 'cuda' when CuPy sees a device, else 'cpu'."""
    if device not in DEVICES:
        raise RawpagedError(f"unknown device {device!r}: choose one of {', '.join(DEVICES)}")
    if device == "auto":
        return "cuda" if cuda_available() else "cpu"
    if device == "cuda" and not cuda_available():
        raise RawpagedError("device='cuda' but no CUDA device is usable (CuPy missing or cupy.is_available() is false); use device='cpu'")
    return device


def get_backend(device: str) -> ModuleType:
    device = resolve_device(device)
    if device == "cuda":
        from rawpaged.backend import cuda
        return cuda
    from rawpaged.backend import cpu
    return cpu
