"""ModelRunner: flatten the scheduled sequences into one varlen batch and run the model.

Input of a step: for each scheduled sequence, how many of its uncomputed tokens to compute now
(a whole prompt, a prefill chunk, or the one decode token) and its block table. Output: float32
logits for the rows the sampler needs (the last token of every sequence that samples this step),
and optionally for every prompt position (prompt logprobs).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from rawpaged.sequence import ScheduledSeq


@dataclass
class AttentionMetadata:
    """The flattened batch of one step (DESIGN.md, "The batch the model sees").

    T tokens from S sequences; sequence s owns tokens query_start_loc[s]:query_start_loc[s+1].
    """
    slot_mapping: object      # int64 [T]     where each new token's K/V goes
    block_tables: object      # int32 [S, B]  logical block -> physical block per sequence
    seq_lens: object          # int32 [S]     context length including this step's tokens
    query_start_loc: object   # int32 [S+1]
    max_query_len: int = 0
    max_seq_len: int = 0


@dataclass
class BatchInputs:
    input_ids: np.ndarray        # int64 [T]
    positions: np.ndarray        # int64 [T]
    meta: AttentionMetadata
    sample_rows: np.ndarray      # int64 [N] rows of the batch whose logits are sampled
    prompt_rows: list            # per scheduled seq: rows whose logits are wanted for prompt logprobs (or None)
    num_steps: int = 1           # multi-step decode: steps in one call, each row feeding back its greedy token


def prepare_inputs(batch: list[ScheduledSeq], block_size: int) -> BatchInputs:
    """Build input_ids, positions, slot_mapping, query_start_loc, seq_lens and block_tables."""
    if all(s.num_new_tokens == 1 and not s.prompt_logits for s in batch):
        return prepare_decode(batch, block_size)
    return prepare_any(batch, block_size)


def prepare_decode(batch: list[ScheduledSeq], block_size: int) -> BatchInputs:
    """prepare_inputs of a step that computes one token per sequence (a decode step): the same
    arrays, from Python ints in one pass.
    NOTE: why a path of its own: prepare_any's ~8 NumPy calls per sequence cost ~0.1 ms at batch 1
    (the step's weights have just flushed the caches) and ~0.5 ms at batch 48, every decode step."""
    ids, pos, slots, sample_rows = [], [], [], []
    for i, s in enumerate(batch):
        seq, p = s.seq, s.seq.num_computed_tokens
        ids.append(seq.get_token_ids_range(p, p + 1)[0])
        pos.append(p)
        slots.append(s.block_table[p // block_size] * block_size + p % block_size)
        if s.sample:
            sample_rows.append(i)
    width = max(len(s.block_table) for s in batch)
    tables = np.array([s.block_table + [0] * (width - len(s.block_table)) for s in batch], dtype=np.int32)
    n = len(batch)
    positions = np.array(pos, dtype=np.int64)
    meta = AttentionMetadata(
        slot_mapping=np.array(slots, dtype=np.int64),
        block_tables=tables,
        seq_lens=(positions + 1).astype(np.int32),
        query_start_loc=np.arange(n + 1, dtype=np.int32),
        max_query_len=1,
        max_seq_len=max(pos) + 1,
    )
    return BatchInputs(np.array(ids, dtype=np.int64), positions, meta, np.array(sample_rows, dtype=np.int64),
                       [None] * n, 1 + batch[0].lookahead)


def prepare_any(batch: list[ScheduledSeq], block_size: int) -> BatchInputs:
    """prepare_inputs of any step (prefills, chunks, decodes, prompt logprobs)."""
    ids, pos, slots, q_lens, seq_lens = [], [], [], [], []
    sample_rows, prompt_rows = [], []
    max_blocks = max(len(s.block_table) for s in batch)
    tables = np.zeros((len(batch), max_blocks), dtype=np.int32)
    row = 0
    for i, s in enumerate(batch):
        start, n = s.seq.num_computed_tokens, s.num_new_tokens
        p = np.arange(start, start + n, dtype=np.int64)
        table = np.asarray(s.block_table, dtype=np.int64)
        tables[i, :len(table)] = table
        ids.append(np.asarray(s.seq.get_token_ids_range(start, start + n), dtype=np.int64))
        pos.append(p)
        slots.append(table[p // block_size] * block_size + p % block_size)
        q_lens.append(n)
        seq_lens.append(start + n)
        prompt_rows.append(np.arange(row, row + n) if s.prompt_logits else None)
        row += n
        if s.sample:
            sample_rows.append(row - 1)
    query_start_loc = np.zeros(len(batch) + 1, dtype=np.int32)
    np.cumsum(q_lens, out=query_start_loc[1:])
    meta = AttentionMetadata(
        slot_mapping=np.concatenate(slots),
        block_tables=tables,
        seq_lens=np.asarray(seq_lens, dtype=np.int32),
        query_start_loc=query_start_loc,
        max_query_len=max(q_lens),
        max_seq_len=max(seq_lens),
    )
    return BatchInputs(np.concatenate(ids), np.concatenate(pos), meta,
                       np.asarray(sample_rows, dtype=np.int64), prompt_rows)


class ModelRunner:
    def __init__(self, model, backend, block_size: int, graphs=None):
        self.model = model
        self.backend = backend
        self.block_size = block_size
        # NOTE: a graph_runner.DecodeGraphs once the worker captured (or attached) it: pure decode
        # batches run there (persistent buffers, bucket padding, CUDA graph replay); the rest here.
        self.graphs = graphs

    def execute(self, batch: list[ScheduledSeq], kv_cache):
        """Run one step. Returns (sample_logits [N, V], prompt_logits list per seq or None)."""
        return self.run(prepare_inputs(batch, self.block_size), kv_cache)

    def run_steps(self, inputs: BatchInputs, kv_cache):
        """A multi-step decode batch (inputs.num_steps > 1) -> (tokens int64 [steps, n], logprobs
        float32 [steps, n]): the greedy tokens of every step, from one call of the fused step."""
        if not (self.graphs is not None and getattr(self.graphs, "can_run_steps", None)
                and self.graphs.can_run_steps(inputs, kv_cache)):
            raise RuntimeError("a multi-step decode batch reached a runner without the fused decode step")
        return self.graphs.run_steps(inputs, kv_cache, self.block_size)

    def run(self, inputs: BatchInputs, kv_cache):
        """Run a flattened batch (a tensor-parallel rank gets it from the driver, already flattened)."""
        if self.graphs is not None and self.graphs.can_run(inputs, kv_cache):
            return self.graphs.run(inputs, kv_cache)
        b = self.backend
        meta = inputs.meta
        dev_meta = AttentionMetadata(
            slot_mapping=b.to_device(meta.slot_mapping), block_tables=b.to_device(meta.block_tables),
            seq_lens=b.to_device(meta.seq_lens), query_start_loc=b.to_device(meta.query_start_loc),
            max_query_len=meta.max_query_len, max_seq_len=meta.max_seq_len)
        hidden = self.model.forward(b.to_device(inputs.input_ids), b.to_device(inputs.positions),
                                    kv_cache, dev_meta)
        sample_logits = self.model.compute_logits(hidden[b.to_device(inputs.sample_rows)]) \
            if len(inputs.sample_rows) else None
        prompt_logits = [None if rows is None else self.model.compute_logits(hidden[b.to_device(rows)])
                         for rows in inputs.prompt_rows]
        return sample_logits, prompt_logits
