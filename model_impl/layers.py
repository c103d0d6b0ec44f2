"""Pieces shared by the model families: paged attention, RoPE tables, weight bookkeeping."""
from __future__ import annotations

import numpy as np

from rawpaged.errors import RawpagedError
from rawpaged.worker.model_runner import AttentionMetadata


def attention(backend, q, k, v, kv_cache, layer, meta: AttentionMetadata, scale, sliding_window=None):
    """Store this step's K/V in the paged cache, then attend through the block tables.

    q [T, Hq, D], k/v [T, Hkv, D] -> [T, Hq * D]. Writing first means one entry point serves
    prefill, chunked prefill, prefix-cached prefill and decode: every key is read from the cache.
    sliding_window W (None or 0: none): the query at position p sees positions max(0, p-W+1)..p.
    """
    backend.reshape_and_cache(k, v, kv_cache, layer, meta.slot_mapping)
    out = backend.paged_attention(q, kv_cache, layer, meta.block_tables, meta.seq_lens,
                                  meta.query_start_loc, scale,
                                  max_query_len=meta.max_query_len, max_seq_len=meta.max_seq_len,
                                  sliding_window=sliding_window or None)
    return out.reshape(out.shape[0], -1)


def rope_attention(backend, positions, q, k, v, cos_sin, is_neox, kv_cache, layer, meta: AttentionMetadata, scale,
                   sliding_window=None):
    """`attention` for the rotary families: q rotated in place and k rotated into the paged cache with v
    in ONE launch (backend.rotary_and_cache), then paged attention. q, k, v may be views of the fused
    qkv projection (split_heads): no copies. -> [T, Hq * D]."""
    backend.rotary_and_cache(positions, q, k, v, kv_cache, layer, meta.slot_mapping, cos_sin, is_neox)
    out = backend.paged_attention(q, kv_cache, layer, meta.block_tables, meta.seq_lens,
                                  meta.query_start_loc, scale,
                                  max_query_len=meta.max_query_len, max_seq_len=meta.max_seq_len,
                                  sliding_window=sliding_window or None)
    return out.reshape(out.shape[0], -1)


def split_heads(xp, qkv, num_heads: int, num_kv_heads: int, head_dim: int):
    """[T, (Hq + 2 Hkv) D] fused projection -> q [T, Hq, D], k, v [T, Hkv, D] as VIEWS of it (token
    stride (Hq + 2 Hkv) D). NOTE: the kernels take token strides, so the three copies per layer this
    used to make (issue 13: 96 launches of a 32-layer step) are gone; an op that needs contiguous rows
    copies for itself."""
    T, nq, nkv = qkv.shape[0], num_heads * head_dim, num_kv_heads * head_dim
    q = qkv[:, :nq].reshape(T, num_heads, head_dim)
    k = qkv[:, nq:nq + nkv].reshape(T, num_kv_heads, head_dim)
    v = qkv[:, nq + nkv:].reshape(T, num_kv_heads, head_dim)
    return q, k, v


def rope_cos_sin_cache(rot_dim: int, max_pos: int, theta: float) -> np.ndarray:
    """[max_pos, rot_dim] float32: cos(pos * f_i) then sin(pos * f_i), f_i = theta^(-2i/rot_dim).
    (Unscaled RoPE; model_impl/rope.py builds every table the models use.)"""
    inv_freq = 1.0 / (theta ** (np.arange(0, rot_dim, 2, dtype=np.float64) / rot_dim))
    angles = np.arange(max_pos, dtype=np.float64)[:, None] * inv_freq[None, :]
    return np.concatenate([np.cos(angles), np.sin(angles)], axis=1).astype(np.float32)


class Weights:
    """The checked tensors of a checkpoint: arrays, or `loader.TensorRef`s read when asked for.

    w[name] reads the whole tensor; w.read(name, (slice(a, b),)) only that part (a tensor-parallel
    rank's shard: model_impl/parallel.py)."""

    def __init__(self, tensors: dict):
        self.tensors = tensors

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def __getitem__(self, name: str) -> np.ndarray:
        return self.read(name)

    def read(self, name: str, index: tuple | None = None) -> np.ndarray:
        t = self.tensors[name]
        if isinstance(t, np.ndarray):
            return t if index is None else t[index]
        return t.read(index)


class WeightSet:
    """Collects checkpoint tensors (arrays or unread TensorRefs) by name and checks them against
    the shapes the config implies."""

    def __init__(self, expected: dict[str, tuple[int, ...]], optional: set[str] = frozenset(),
                 where: str = "checkpoint"):
        self.expected = expected
        self.optional = set(optional)
        self.where = where
        self.tensors: dict[str, np.ndarray] = {}

    def add(self, name: str, array) -> None:
        shape = self.expected.get(name)
        if shape is None:
            return                                   # e.g. rotary_emb.inv_freq: not a weight we use
        if tuple(array.shape) != tuple(shape):
            raise RawpagedError(f"tensor {name} in {self.where} has shape {tuple(array.shape)}, "
                                f"expected {tuple(shape)} from config.json")
        self.tensors[name] = array

    def finish(self) -> Weights:
        missing = [n for n in self.expected if n not in self.tensors and n not in self.optional]
        if missing:
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            raise RawpagedError(f"tensor {missing[0]}{more} missing from {self.where}")
        return Weights(self.tensors)
