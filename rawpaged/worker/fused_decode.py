"""Decode steps on the CPU through one compiled call for the whole decoder stack (issue 18): the CPU's
counterpart of graph_runner.DecodeGraphs, with the same two methods (`can_run`, `run`) so that
ModelRunner hands it the pure decode batches the same way.

A pure decode batch (every sequence computes one token and samples it) runs: the embedding lookup,
then backend/cpu/decode_step.py's step: every layer and the LM head on every row (all are sampled)
in one Numba call. Prefill, chunked and mixed steps, prompt logprobs and the models the step does not
cover (model.fuses_decode()) keep the per-op path. NOTE: no bucket padding as the CUDA graphs need:
a CPU step's cost grows with its rows, and nothing here bakes in a shape.
"""
from __future__ import annotations

import numpy as np

from rawpaged.backend.cpu import decode_step, lowp
from rawpaged.worker.graph_runner import is_pure_decode
from rawpaged.worker.model_runner import BatchInputs


class FusedDecode:
    def __init__(self, model, backend):
        self.model, self.backend = model, backend
        names = ("in_norm", "post_norm", "qkv", "o", "gate_up", "down")
        stacked = decode_step.stack_layers(model.layers, names)
        self.stack = decode_step.DecoderStack(
            *stacked, final_norm=np.ascontiguousarray(model.norm, np.float32),
            windows=np.asarray([w or 0 for w in model.windows], np.int64), eps=model.eps, scale=model.scale)
        self.cos_sin = np.ascontiguousarray(model.cos_sin, np.float32)
        self.kv_cache = None
        self.rows = self.workers = 0                # rows and team size the scratch holds
        # NOTE: set from any thread (a request arrived): a multi-step call stops after its current step
        self.interrupt = np.zeros(1, np.int64)
        self.fbuf = self.xbuf = None

    @staticmethod
    def supports(model, backend) -> bool:
        return backend.name == "cpu" and getattr(model, "fuses_decode", lambda: False)()

    # -- which steps take this path ---------------------------------------------------------------
    def attach(self, kv_cache) -> None:
        self.kv_cache = kv_cache

    def can_run(self, inputs: BatchInputs, kv_cache) -> bool:
        return kv_cache is self.kv_cache and is_pure_decode(inputs) and inputs.num_steps == 1

    def runs_steps(self) -> bool:
        """Whether this model's step can run several decode steps in one call (multi-step
        scheduling): its LM head and embedding table stored as its layers (the step widens one kind)."""
        kind = self.stack.wkind
        return all(lowp.kind_of(w.dtype) == kind for w in (self.model.lm_head, self.model.embed))

    def can_run_steps(self, inputs: BatchInputs, kv_cache) -> bool:
        return kv_cache is self.kv_cache and is_pure_decode(inputs) and self.runs_steps()

    # -- the step ---------------------------------------------------------------------------------
    def scratch(self, rows: int) -> tuple[np.ndarray, np.ndarray]:
        """The stack's scratch for `rows` rows (grown to the largest batch and team seen, then reused)."""
        workers = decode_step.team_size()
        if rows > self.rows or workers > self.workers:
            self.rows, self.workers = max(rows, self.rows), max(workers, self.workers)
            nf, nx = self.stack.scratch_sizes(self.rows, self.workers)
            self.fbuf, self.xbuf = np.empty(nf, np.float32), np.empty(nx, np.uint16)
        return self.fbuf, self.xbuf

    def hidden(self, inputs: BatchInputs, kv_cache, lm_head=None, **steps):
        """The decode rows' final normalised hidden states [n, H] (valid until the next step), and
        their logits when lm_head is given and stored as the layers are (else None: see run_stack)."""
        m = inputs.meta
        h = self.backend.embedding(inputs.input_ids, self.model.embed)
        fbuf, xbuf = self.scratch(h.shape[0])
        return decode_step.run_stack(self.stack, h, inputs.positions, m.slot_mapping, m.block_tables, m.seq_lens,
                                     kv_cache, self.cos_sin, fbuf, xbuf, lm_head, **steps)

    def interrupt_bursts(self, on: bool = True) -> None:
        """Thread-safe: make a multi-step call in flight (and the next ones) stop after their current
        step (on), or let them run (off: the engine thread, before it takes in new requests)."""
        self.interrupt[0] = int(on)

    def run_steps(self, inputs: BatchInputs, kv_cache, block_size: int):
        """inputs.num_steps decode steps of a pure decode batch in one call -> (tokens [steps, n],
        logprobs [steps, n]): each row's greedy token of each step, fed back as its next input;
        fewer steps when interrupt_bursts() was called during the call."""
        return self.hidden(inputs, kv_cache, self.model.lm_head, steps=inputs.num_steps, embed=self.model.embed,
                           block_size=block_size, interrupt=self.interrupt)

    def run(self, inputs: BatchInputs, kv_cache):
        """A pure decode batch of n rows -> (logits [n, V], [None] * n) like ModelRunner.run."""
        rows, logits = self.hidden(inputs, kv_cache, self.model.lm_head)
        if logits is None:
            logits = self.model.compute_logits(rows)
        return logits, [None] * len(inputs.meta.seq_lens)
