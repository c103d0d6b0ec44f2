"""Tensor parallelism (Megatron-LM's, as vLLM runs it) for every model family.

N ranks each hold a shard of every large matrix and the paged KV cache of their heads; the
hidden state between layers is whole (replicated) on every rank:

  column-parallel   qkv, gate/up, fc1          rank r holds the output rows of its heads / its
                                               slice of the MLP: no communication
  row-parallel      o, down, fc2               rank r holds the matching input columns; the partial
                                               products are summed by an all-reduce
  vocab-parallel    token embedding, LM head   rank r holds vocabulary rows [r*R, (r+1)*R) (R =
                                               ceil(V / N), zero-padded): an embedding row is
                                               looked up by the rank holding it (zeros elsewhere)
                                               and all-reduced; the logits' columns are gathered
                                               to rank 0 (the only one that samples)
  replicated        norms, positions, OPT's project_in/out, q/k norms

Heads: rank r runs query heads [r*Hq/N, (r+1)*Hq/N). KV heads are split the same way when there
are at least N of them; with fewer (MQA, GQA past its group count) each is replicated on N/Hkv
ranks and rank r holds KV head r*Hkv/N, the one its query heads read.

NOTE: biases of row-parallel layers live on rank 0 only (vLLM's RowParallelLinear): the all-reduce
adds them once, with no elementwise op after it.

`TensorParallel()` (no communicator) is the single-process model, unchanged. With a communicator
(even of size 1: the `mp` executor with one worker) every collective runs.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from rawpaged.config import GATED_FAMILIES, ModelConfig
from rawpaged.errors import RawpagedError


@dataclass(frozen=True)
class HeadShard:
    q_start: int          # first query head of this rank
    num_q: int            # query heads of this rank
    kv_start: int         # first KV head of this rank
    num_kv: int           # KV heads of this rank (1 when replicated)


@dataclass(frozen=True)
class VocabShard:
    start: int            # first vocabulary row of this rank
    stop: int             # past its last real row (<= vocab_size)
    rows: int             # rows every rank holds (padded): ceil(vocab / N)


@dataclass
class TensorParallel:
    rank: int = 0
    size: int = 1
    comm: Any = None      # rawpaged.distributed Communicator; None: one process holds the whole model

    @property
    def enabled(self) -> bool:
        return self.comm is not None

    # -- what this rank holds --------------------------------------------------------------------
    def heads(self, num_heads: int, num_kv_heads: int) -> HeadShard:
        n, r = self.size, self.rank
        q = num_heads // n
        if num_kv_heads >= n:
            kv = num_kv_heads // n
            return HeadShard(r * q, q, r * kv, kv)
        return HeadShard(r * q, q, r * num_kv_heads // n, 1)      # replicated KV head

    def part(self, total: int) -> tuple[int, int]:
        """[start, stop) of an evenly split dimension (checked by check_tensor_parallel)."""
        each = total // self.size
        return self.rank * each, (self.rank + 1) * each

    def vocab(self, vocab_size: int) -> VocabShard:
        rows = -(-vocab_size // self.size)
        start = min(self.rank * rows, vocab_size)
        return VocabShard(start, min(start + rows, vocab_size), rows)

    # -- collectives -----------------------------------------------------------------------------
    def all_reduce(self, x):
        """Sum over ranks of a partial result (a row-parallel layer's output); identity without TP."""
        return x if self.comm is None else self.comm.all_reduce(x)

    def embed(self, backend, ids, table, vocab_size: int):
        """Vocab-parallel lookup: table [rows + 1, H] holds this rank's rows and a zero row last."""
        if self.comm is None:
            return backend.embedding(ids, table)
        xp, shard = backend.xp, self.vocab(vocab_size)
        local = ids - shard.start
        # NOTE: ids another rank holds read the zero row: a gather, no arithmetic in the table's dtype.
        outside = (local < 0) | (local >= shard.stop - shard.start)
        local = xp.where(outside, shard.rows, local)
        return self.all_reduce(backend.embedding(local, table))

    def logits(self, backend, hidden, head, vocab_size: int):
        """hidden [N, H] @ head [rows, H]^T -> float32 logits [N, vocab] on rank 0, None elsewhere."""
        xp = backend.xp
        part = backend.linear(hidden, head).astype(xp.float32, copy=False)
        if self.comm is None:
            return part
        parts = self.comm.gather(part)          # rank 0: [size, N, rows]; others: None
        if parts is None:
            return None
        return xp.ascontiguousarray(xp.concatenate(list(parts), axis=1)[:, :vocab_size])


SINGLE = TensorParallel()


# -- loading shards -------------------------------------------------------------------------------
def rows(w, name: str, start: int, stop: int) -> np.ndarray:
    return w.read(name, (slice(start, stop),))


def cols(w, name: str, start: int, stop: int) -> np.ndarray:
    return w.read(name, (slice(None), slice(start, stop)))


def vocab_table(tp: TensorParallel, w, name: str, vocab_size: int, zero_row: bool) -> np.ndarray:
    """This rank's vocabulary rows of [V, H] `name`, zero-padded to shard.rows (+ the zero row the
    embedding reads for ids other ranks hold). Without TP: the tensor as stored."""
    if not tp.enabled:
        return w[name]
    shard = tp.vocab(vocab_size)
    part = rows(w, name, shard.start, shard.stop)
    out = np.zeros((shard.rows + int(zero_row), part.shape[1]), dtype=part.dtype)
    out[:len(part)] = part
    return out


def rank0_only(tp: TensorParallel, array):
    """A row-parallel layer's bias: rank 0 adds it before the all-reduce, the others hold none."""
    return array if tp.rank == 0 else None


# -- what must divide ---------------------------------------------------------------------------
def mlp_size(cfg: ModelConfig) -> tuple[str, int]:
    """(config field, size) of the MLP's hidden dimension, the one split across ranks."""
    if cfg.family == "opt":
        return "ffn_dim", int(cfg.hf["ffn_dim"])
    if cfg.family == "gpt2":
        return "n_inner", int(cfg.hf.get("intermediate_size") or 4 * cfg.hidden_size)
    return "intermediate_size", int(cfg.hf["intermediate_size"])


def check_tensor_parallel(cfg: ModelConfig, size: int) -> None:
    """A one-line error unless `size` ranks can split this model (before any process starts)."""
    if size < 1:
        raise RawpagedError(f"tensor_parallel_size must be at least 1, got {size}")
    if size == 1:
        return
    where = f"{cfg.path}/config.json"
    if cfg.num_heads % size:
        raise RawpagedError(f"tensor_parallel_size={size} does not divide num_attention_heads={cfg.num_heads} "
                            f"({where}): attention heads are split across ranks")
    kv = cfg.num_kv_heads
    if cfg.family in GATED_FAMILIES and kv % size and size % kv:
        raise RawpagedError(f"tensor_parallel_size={size} and num_key_value_heads={kv} ({where}): one must "
                            f"divide the other (KV heads are split across ranks, or replicated when fewer)")
    field, n = mlp_size(cfg)
    if n % size:
        raise RawpagedError(f"tensor_parallel_size={size} does not divide {field}={n} ({where}): the MLP is "
                            f"split across ranks")


def held_bytes(model) -> int:
    """Bytes of the arrays a model holds (each buffer once: a tied head or a view is not counted twice)."""
    seen: dict[int, int] = {}

    def visit(obj) -> None:
        if isinstance(obj, dict):
            obj = list(obj.values())
        if isinstance(obj, (list, tuple)):
            for item in obj:
                visit(item)
            return
        if not isinstance(obj, type) and hasattr(obj, "nbytes") and hasattr(obj, "shape"):
            base = obj
            while getattr(base, "base", None) is not None and hasattr(base.base, "nbytes"):
                base = base.base
            seen[id(base)] = int(base.nbytes)

    visit(list(vars(model).values()))
    return sum(seen.values())


__all__ = ["HeadShard", "SINGLE", "TensorParallel", "VocabShard", "check_tensor_parallel", "cols", "held_bytes",
           "mlp_size", "rank0_only", "rows", "vocab_table"]
