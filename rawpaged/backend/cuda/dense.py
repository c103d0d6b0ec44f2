"""Dense ops: linear through cuBLAS (fp32 accumulation for every dtype) and embedding lookups."""
from __future__ import annotations

import numpy as np

from rawpaged.backend.cuda.dispatch import dtype_tag
from rawpaged.backend.cuda.launch import on_device, require_cupy

# cuBLAS enums (cublas_api.h / library_types.h)
_CUBLAS_OP_N, _CUBLAS_OP_T = 0, 1
_CUDA_R_32F, _CUDA_R_16F, _CUDA_R_16BF = 0, 2, 14
_CUBLAS_COMPUTE_32F = 68
_CUBLAS_GEMM_DEFAULT = -1


def _gemm_bf16(x2, weight, out):
    """out[T, O] = x2[T, I] @ weight[O, I]^T in bf16 with fp32 accumulation (cublasGemmEx).
    Column-major view: out^T [O, T] = weight (op T of the [I, O] col-major weight) @ x2^T."""
    cp = require_cupy()
    from cupy_backends.cuda.libs import cublas
    handle = cp.cuda.device.get_cublas_handle()
    cublas.setStream(handle, cp.cuda.get_current_stream().ptr)
    one, zero = np.array(1.0, np.float32), np.array(0.0, np.float32)
    t, i = x2.shape
    o = weight.shape[0]
    cublas.gemmEx(handle, _CUBLAS_OP_T, _CUBLAS_OP_N, o, t, i, one.ctypes.data,
                  weight.data.ptr, _CUDA_R_16BF, i, x2.data.ptr, _CUDA_R_16BF, i,
                  zero.ctypes.data, out.data.ptr, _CUDA_R_16BF, o, _CUBLAS_COMPUTE_32F, _CUBLAS_GEMM_DEFAULT)



def linear(x, weight, bias=None):
    """x [..., in] @ weight[out, in]^T (+ bias) through cuBLAS, fp32 accumulation for every dtype.

    NOTE: x is flattened to 2-D first: CuPy's N-D matmul promotes float16 to float32, its 2-D dot
    calls cublasGemmEx with CUBLAS_COMPUTE_32F (fp16 in, fp32 accumulate, fp16 out). bfloat16 goes
    to cublasGemmEx directly with the same compute type.
    """
    cp = require_cupy()
    if weight.ndim != 2 or x.shape[-1] != weight.shape[1]:
        raise ValueError(f"linear: x {tuple(x.shape)} does not match weight {tuple(weight.shape)} ([out, in])")
    if x.dtype != weight.dtype:
        raise ValueError(f"linear: x is {x.dtype} but weight is {weight.dtype}")
    lead = x.shape[:-1]
    x2 = cp.ascontiguousarray(x.reshape(-1, x.shape[-1]))
    if dtype_tag(x.dtype) == "bf16":
        weight = cp.ascontiguousarray(weight)
        y = cp.empty((x2.shape[0], weight.shape[0]), dtype=x.dtype)
        if y.size:
            _gemm_bf16(x2, weight, y)
    else:
        y = cp.dot(x2, weight.T)
    if bias is not None:
        y += bias
    return y.reshape(lead + (weight.shape[0],))



def embedding(token_ids, table):
    return table[on_device(token_ids)]
