"""CUDA backend: CuPy arrays, cuBLAS GEMMs and raw CUDA C kernels (kernels_cuda/*.cu).

Every op has the name, argument order and memory layouts of its CPU twin in
`rawpaged/backend/cpu.py` (see `rawpaged/backend/base.py` for the contract and the layouts);
`tests/gpu` compares the two on a device, `tests/test_cuda_emulation.py` on the CPU.

The package, by what each part knows:
  kernels.py   the one table of kernels: names, instantiations, parameter lists, the generated
               extern "C" entry points and one argument builder per launch kind (pure);
               spec.py    what a kernel description is (Param, Family, Kernel) and its argument checks
  dispatch.py  which kernel, grid and shared memory a call gets; argument checks; host helpers (pure)
  launch.py    CuPy, NVRTC compilation through cupy.RawModule, kernel lookup, launches, RAWPAGED_CUDA_SYNC
  ops.py       the kernel ops (attention, cache writes/copies, norms, rotary, activations)
  fused.py     the fused ops: rotary + cache write, residual add + LayerNorm (issue 13)
  dense.py     linear (cuBLAS) and embedding;  memory.py  uploads, the swap pool, streams, dtypes

How an op runs: it checks its arguments (one-line ValueError before anything is launched), a pure
`select_*` picks the kernel by its table name with its grid, block and shared memory
(tests/test_cuda_dispatch.py), the kernel's builder turns the inputs into the exact typed argument
tuple, and launch.launch compiles the source on first use (CuPy caches it on disk) and launches on
the current stream.

Dtypes: float16, bfloat16 and float32. NumPy has no bfloat16; we use `ml_dtypes.bfloat16` (CuPy >= 14
understands it), and convert fp32 host weights to bf16 bit patterns on the host before the upload.
Where CuPy or ml_dtypes lack bfloat16, asking for it is a one-line error and "auto" takes float16.

Importing this package needs neither CuPy nor a device; the ops need both.
"""
from __future__ import annotations

import sys
import types

import numpy as np

from rawpaged.backend.cuda import dense, dispatch, fused, kernels, launch, memory, ops, spec  # noqa: F401
from rawpaged.backend.cuda.dense import embedding, linear
from rawpaged.backend.cuda.dispatch import (Launch, DeviceLimits, check_attention_args, check_attention_shape,
                                            check_cache_args, check_norm_args, check_rotary_args, copy_runs,
                                            decode_inflight_bytes, decode_kernel_name, decode_partitions, dtype_tag,
                                            float32_to_bfloat16_bits, grid_1d, group_tile, norm_threads,
                                            partition_tokens, prefill_group_tile, resident_blocks,
                                            resolve_dtype_name, select_attention_kernel, select_decode_kernel,
                                            select_prefill_kernel, token_stride, use_mma_decode)
from rawpaged.backend.cuda.kernels import (DECODE_FAST_HEAD_DIMS, DECODE_MMA_HEAD_DIMS, DECODE_MMA_ROWS, DTYPE_TAGS,
                                           GROUP_TILES, MAX_HEAD_DIM, NUM_THREADS, NUM_WARPS, PACK, PREFILL_BM,
                                           PREFILL_MMA_HEAD_DIMS, all_kernel_names, decode_mma_shared, prefill_bn,
                                           prefill_shared)
from rawpaged.backend.cuda.memory import (BFLOAT16, MemorySnapshot, alloc_pinned, bfloat16_supported,
                                          free_device_memory, memory_snapshot, record_event, resolve_dtype,
                                          swap_blocks, swap_stream, synchronize, to_device, to_host,
                                          total_device_memory, wait_event)
from rawpaged.backend.cuda.ops import (copy_blocks, fused_add_rms_norm, gelu, gelu_tanh, gelu_tanh_and_mul,
                                       layer_norm, paged_attention, paged_attention_planned, relu, reshape_and_cache,
                                       rms_norm, rotary_embedding, silu_and_mul)
from rawpaged.backend.cuda.fused import fused_add_layer_norm, rotary_and_cache

name = "cuda"
xp = launch.cupy
float_dtypes = (np.dtype(np.float16),) + ((BFLOAT16,) if BFLOAT16 is not None else ()) + (np.dtype(np.float32),)


def _forward(home: types.ModuleType, attr: str) -> property:
    return property(lambda self: getattr(home, attr), lambda self, value: setattr(home, attr, value),
                    doc=f"{home.__name__}.{attr}")


class _Package(types.ModuleType):
    """NOTE: each name below lives in one submodule, which reads it at call time. Tests and
    benchmarks set them on the package (`cuda.split_k_policy = "always"`, the emulator's
    `cuda.cupy = fake`), so the package forwards reads and writes there; a copy kept in the
    package would be set and silently ignored."""
    split_k_policy = _forward(dispatch, "split_k_policy")
    prefill_policy = _forward(dispatch, "prefill_policy")
    decode_policy = _forward(dispatch, "decode_policy")
    PARTITION_SIZE = _forward(dispatch, "PARTITION_SIZE")
    cupy = _forward(launch, "cupy")
    num_sms = _forward(launch, "num_sms")


sys.modules[__name__].__class__ = _Package
