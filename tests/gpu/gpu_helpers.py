"""Helpers shared by the GPU tests: tolerances by dtype and random paged batches."""
from __future__ import annotations

import numpy as np
import pytest

# Tolerance by dtype (outputs of fp32 math rounded to the storage type).
TOL = {"float16": dict(rtol=2e-3, atol=2e-3), "bfloat16": dict(rtol=1.6e-2, atol=1.6e-2),
       "float32": dict(rtol=2e-5, atol=2e-5)}


def np_dtype(name: str):
    if name == "bfloat16":
        from rawpaged.backend import cuda
        if not cuda.bfloat16_supported():
            pytest.skip("this CuPy cannot hold bfloat16 arrays (needs CuPy >= 14 and ml_dtypes)")
        return cuda.BFLOAT16
    return np.dtype(name)


def make_batch(rng, dtype, head_dim, block_size, num_heads, num_kv_heads, ctx_lens, q_lens, num_layers=2, layer=1):
    """A paged KV cache (host, NumPy) with each context scattered over shuffled blocks; the slots past
    each context and every unused block-table entry point at NaN, so a kernel that reads them fails."""
    dt = np_dtype(dtype)
    blocks_per_seq = [-(-c // block_size) for c in ctx_lens]
    num_blocks = sum(blocks_per_seq) + 2
    kv = rng.standard_normal((num_blocks, num_layers, 2, num_kv_heads, block_size, head_dim)).astype(np.float32)
    trap = num_blocks - 1
    kv[trap] = np.nan
    perm = rng.permutation(num_blocks - 1)
    tables = np.full((len(ctx_lens), max(blocks_per_seq) + 1), trap, np.int32)
    k = 0
    for s, n in enumerate(blocks_per_seq):
        tables[s, :n] = perm[k:k + n]
        k += n
        tail = ctx_lens[s] % block_size
        if tail:
            kv[tables[s, n - 1], :, :, :, tail:, :] = np.nan
    qsl = np.concatenate([[0], np.cumsum(q_lens)]).astype(np.int32)
    q = rng.standard_normal((int(qsl[-1]), num_heads, head_dim)).astype(np.float32)
    # round through the storage dtype so the fp32 reference sees exactly what the GPU sees
    return q.astype(dt), kv.astype(dt), tables, np.asarray(ctx_lens, np.int32), qsl, layer
