"""Decode steps on persistent buffers, padded to batch buckets, replayed as CUDA graphs (issue 13).

A decode step is ~10 launches per layer, each with Python in front of it: at small batches the host,
not the GPU, sets the pace. A CUDA graph replays the whole step (every layer, the LM head) with one
launch. A graph bakes in every address, grid and host scalar of the step it recorded, so the step
must be the same every time:

  - inputs live in PERSISTENT buffers (`DecodeBuffers`: ids, positions, slot mapping, block tables,
    seq lens, query start locations), written in place each step: two uploads from a staging copy
    in host memory (one int64, one int32) instead of seven fresh arrays;
  - the batch is padded to a BUCKET (1, 2, 4, 8, ... up to max_num_seqs, at most 256): a padding
    row is a sequence with query length 0 and context 0 whose token has slot -1 and position 0, so
    its cache write stores nothing (rotary_cache / reshape_and_cache skip slot < 0), attention
    skips it (a decode kernel returns for q_len != 1) and its logits row is never read;
  - the attention launch is planned for a context of max_model_len (`max_seq_len` hint): the split
    into partitions is fixed by max_model_len, and partitions past a sequence's context exit at once;
  - outputs and workspaces come from the graphs' own memory pool, allocated during capture and held
    for the graphs' lifetime: one pool for every bucket, captured largest first so the smaller ones
    reuse its blocks. NOTE: the logits a replay returns are valid until the next replay.

The CPU backend runs eagerly (graphs are a CUDA mechanism), but everything here except `capture`
is backend-neutral: `attach` runs the same padded, persistent-buffer step eagerly, which is how
tests/test_graphs.py checks padding on the CPU and compares a replay with an eager step under the
CUDA emulator.
"""
from __future__ import annotations

import logging
import time

import numpy as np

from rawpaged.worker.model_runner import AttentionMetadata, BatchInputs

logger = logging.getLogger("rawpaged")

MAX_CAPTURE_BATCH = 256


def batch_buckets(max_num_seqs: int) -> tuple[int, ...]:
    """1, 2, 4, ... below min(max_num_seqs, 256), then that cap itself."""
    cap = max(1, min(int(max_num_seqs), MAX_CAPTURE_BATCH))
    out, b = [], 1
    while b < cap:
        out.append(b)
        b *= 2
    return tuple(out + [cap])


def bucket_for(n: int, buckets: tuple[int, ...]) -> int | None:
    """The smallest bucket holding n rows (None: more rows than the largest)."""
    for b in buckets:
        if b >= n:
            return b
    return None


def is_pure_decode(inputs: BatchInputs) -> bool:
    """Every sequence computes one token and samples it, and no prompt logits are wanted."""
    m = inputs.meta
    n = len(m.seq_lens)
    return (m.max_query_len == 1 and len(inputs.input_ids) == n and len(inputs.sample_rows) == n
            and all(r is None for r in inputs.prompt_rows))


class DecodeBuffers:
    """The step's inputs in persistent device arrays, sized for the largest bucket.

    dev64 int64 [3, M]            rows: input ids, positions, slot mapping
    dev32 int32 [2M + 1 + M*B]    seq_lens [M] | query_start_loc [M + 1] | block tables [M, B]
    (M = largest bucket, B = blocks of a max_model_len sequence). A bucket's views are prefixes of
    each part, so its addresses never change. Each step writes a host staging copy (page-locked on
    the GPU) and uploads it with two copies.
    NOTE: an upload from page-locked memory is asynchronous: before the staging copy is rewritten,
    `write` waits for the event recorded after the previous upload (in practice long done: the
    previous step's sampled ids came back to the host after it).
    """

    def __init__(self, backend, max_batch: int, max_blocks: int):
        xp = backend.xp
        self.max_batch, self.max_blocks = max_batch, max_blocks
        n32 = 2 * max_batch + 1 + max_batch * max_blocks
        self.dev64 = xp.zeros((3, max_batch), dtype=np.int64)
        self.dev32 = xp.zeros((n32,), dtype=np.int32)
        self.on_host = xp is np                 # CPU: the buffers ARE host memory, nothing to upload
        self.xp = xp
        self.uploaded = None                    # event after the last upload (GPU)
        if self.on_host:
            self.host64, self.host32 = self.dev64, self.dev32
        else:
            self.host64 = backend.alloc_pinned((3, max_batch), np.int64)
            self.host32 = backend.alloc_pinned((n32,), np.int32)
            self.host64[...] = 0
            self.host32[...] = 0

    # -- the views one bucket's step reads (the same addresses every step) -----------------------
    def _parts(self, a32, B: int):
        M, nb = self.max_batch, self.max_blocks
        seq_lens = a32[:B]
        qsl = a32[M:M + B + 1]
        tables = a32[2 * M + 1:2 * M + 1 + B * nb].reshape(B, nb)
        return seq_lens, qsl, tables

    def inputs(self, B: int, max_seq_len: int):
        """(input_ids [B], positions [B], AttentionMetadata) over the device buffers."""
        seq_lens, qsl, tables = self._parts(self.dev32, B)
        meta = AttentionMetadata(slot_mapping=self.dev64[2, :B], block_tables=tables, seq_lens=seq_lens,
                                 query_start_loc=qsl, max_query_len=1, max_seq_len=max_seq_len)
        return self.dev64[0, :B], self.dev64[1, :B], meta

    # -- writing a step ---------------------------------------------------------------------------
    def write(self, inputs: BatchInputs | None, B: int) -> None:
        """Stage the n <= B decode rows of `inputs` (None: none) and pad rows n..B-1, then upload."""
        if self.uploaded is not None:
            self.uploaded.synchronize()         # the previous upload has read the staging copy
        h64 = self.host64
        seq_lens, qsl, tables = self._parts(self.host32, B)
        n = 0 if inputs is None else len(inputs.meta.seq_lens)
        if n:
            m = inputs.meta
            h64[0, :n] = inputs.input_ids
            h64[1, :n] = inputs.positions
            h64[2, :n] = m.slot_mapping
            seq_lens[:n] = m.seq_lens
            qsl[:n + 1] = m.query_start_loc
            w = m.block_tables.shape[1]
            tables[:n, :w] = m.block_tables
            tables[:n, w:] = 0
        # padding: token 0 at position 0 stored nowhere (slot -1), a sequence of q_len 0 and context 0
        h64[0, n:B] = 0
        h64[1, n:B] = 0
        h64[2, n:B] = -1
        seq_lens[n:] = 0
        qsl[0] = 0
        qsl[n + 1:] = n
        tables[n:] = 0
        self._upload(B)

    def _upload(self, B: int) -> None:
        if self.on_host:
            return
        used = 2 * self.max_batch + 1 + B * self.max_blocks
        stream = self.xp.cuda.get_current_stream()
        self.dev64.set(self.host64, stream=stream)
        self.dev32[:used].set(self.host32[:used], stream=stream)
        self.uploaded = stream.record()


class DecodeGraphs:
    """Decode steps of a batch-size bucket on persistent buffers: replayed from a CUDA graph once
    `capture` has recorded them, run eagerly on the same buffers after `attach` (the CPU, tests)."""

    def __init__(self, model, backend, block_size: int, max_num_seqs: int, max_model_len: int):
        self.model, self.backend = model, backend
        self.buckets = batch_buckets(max_num_seqs)
        self.max_model_len = int(max_model_len)
        self.buffers = DecodeBuffers(backend, self.buckets[-1], -(-self.max_model_len // block_size))
        self.kv_cache = None
        self.graphs: dict[int, object] = {}      # bucket -> cupy.cuda.Graph
        self.outputs: dict[int, object] = {}     # bucket -> logits [B, V] the graph writes
        self.pool = None                         # the graphs' own device memory pool
        self.capture_seconds = 0.0

    # -- which steps take this path ---------------------------------------------------------------
    def can_run(self, inputs: BatchInputs, kv_cache) -> bool:
        m = inputs.meta
        return (kv_cache is self.kv_cache and is_pure_decode(inputs)
                and bucket_for(len(m.seq_lens), self.buckets) is not None
                and m.max_seq_len <= self.max_model_len and m.block_tables.shape[1] <= self.buffers.max_blocks)

    # -- the step ---------------------------------------------------------------------------------
    def step(self, B: int, kv_cache):
        """Bucket B's decode step on the persistent buffers -> float32 logits [B, V] (rows past the
        batch: padding, never read)."""
        ids, positions, meta = self.buffers.inputs(B, self.max_model_len)
        hidden = self.model.forward(ids, positions, kv_cache, meta)
        return self.model.compute_logits(hidden)

    def run(self, inputs: BatchInputs, kv_cache):
        """A pure decode batch of n rows -> (logits [n, V], [None] * n) like ModelRunner.run."""
        n = len(inputs.meta.seq_lens)
        B = bucket_for(n, self.buckets)
        self.buffers.write(inputs, B)
        graph = self.graphs.get(B)
        if graph is not None:
            graph.launch()
            logits = self.outputs[B]
        else:
            logits = self.step(B, kv_cache)
        return logits[:n], [None] * n

    # -- setting up -------------------------------------------------------------------------------
    def attach(self, kv_cache) -> None:
        """Run decode steps on the persistent buffers, eagerly (no capture)."""
        self.kv_cache = kv_cache

    def capture(self, kv_cache) -> None:
        """Record one CUDA graph per bucket (largest first), each after an eager warm-up step that
        compiles its kernels and fills the graphs' pool; every row is padding, so neither the
        warm-up nor the capture stores anything in the cache."""
        cp = self.backend.xp
        self.kv_cache = kv_cache
        self.pool = cp.cuda.MemoryPool()
        stream = cp.cuda.Stream(non_blocking=True)
        start = time.perf_counter()
        for B in reversed(self.buckets):
            self.buffers.write(None, B)
            # NOTE: the upload ran on the current stream; a non-blocking stream does not wait for it
            self.backend.synchronize()
            with cp.cuda.using_allocator(self.pool.malloc), stream:
                self.step(B, kv_cache)
                stream.synchronize()
                stream.begin_capture()
                try:
                    self.outputs[B] = self.step(B, kv_cache)
                finally:
                    graph = stream.end_capture()
                graph.upload(stream)
            self.graphs[B] = graph
        stream.synchronize()
        self.capture_seconds = time.perf_counter() - start

    def pool_bytes(self) -> int:
        return 0 if self.pool is None else int(self.pool.total_bytes())

    def outputs_bytes(self, vocab_size: int) -> int:
        """The logits every bucket's graph holds (float32 [B, V] each)."""
        return sum(4 * B * vocab_size for B in self.buckets)
