"""The cost model: how long one engine step takes on a model + hardware profile.

    shape = StepShape.of(scheduler_output)       # what the step computes (counts only)
    cost = CostModel(setup).step(shape)          # StepCost: seconds per part, .total

One step of a tensor-parallel group of p ranks (every rank holds 1/p of each weight matrix and 1/p
of the KV heads, and they run in lockstep), as a sum of parts:

  gemm      max(weights_per_rank / (hbm_bw * mem_eff),           the weights are read once per step
                2 * (gemm_params * T + vocab * hidden * N) / p / (flops * gemm_eff))
            T tokens computed, N rows sampled (only they go through the LM head)
            profiles with few_rows > 0: + min(T, few_rows) * few_row_time: see "Few-row GEMMs" below
  attention decode rows (one new token): K/V bytes of their whole context, read once per step, per
            rank: sum(context) * kv_bytes_per_token / p / (hbm_bw * attn_eff)
            prefill rows: 4 * hidden * layers * (query, key) pairs under the causal mask / p
            / (flops * attn_flop_eff)
            blocks (profiles with block_latency > 0): + 2 * heads * layers * sum(blocks of the decode
            rows' contexts) * block_latency / p / (sms * warps_per_sm): see "Small blocks" below

  kv write  T * kv_bytes_per_token / p / hbm_bw
  comm      p > 1: two all-reduces of T x hidden activations per layer, ring: 2 (p-1)/p of the
            bytes over the link, plus a latency each
  swap      per block swapped: transfer_latency + block bytes / p / pcie_bw (the KV layout is
            block-major: one contiguous copy per block; each rank moves its heads)
  copy      per copy-on-write block: transfer_latency + 2 * block bytes / p / hbm_bw
  overhead  step_overhead + seq_overhead * S  (CPU: schedule, prepare inputs, sample, outputs)

Small blocks. The paper's decode kernel (vLLM 0.1's paged attention) gives each warp one KV block
per loop iteration, for K and again for V: it loads the block's number from the block table, then
the block's rows (a load that depends on the first), so each iteration waits about one memory
latency whatever the block holds. With few tokens a block, each warp has few bytes in flight and
the kernel becomes latency-bound: the paper's "small block size may not fully utilize the GPU's
parallelism for reading and processing KV cache" (section 7.2). The term above charges that wait:
the warp-iterations (2 x heads x layers x blocks per rank) times block_latency, spread over the
warps the GPU keeps resident (sms x warps_per_sm), ADDED to the bandwidth term (the wait is not
hidden behind the streaming: the load of a block's rows cannot start before its number is known).
Its constants are stated assumptions in specs.py, not fits. NOTE: rawpaged's own CUDA decode kernel
reads tokens in waves across blocks (kernels_cuda/paged_attention.cu), so the profiles of rawpaged
on H100/H200 carry no block term.

Few-row GEMMs. A GEMM kernel may multiply a batch of few rows differently from a large one: the
CPU backend's (backend/cpu/gemm.py) takes up to 8 rows one weight row at a time (a matrix-vector
product per row, no register tiling across rows), and register-tiles 4 x 4 past that, so a row
costs two to four times as much in a decode step of 2-8 sequences as in one of 16-40 (the tiny
model's 17 linear() calls of a step, measured: ~0.2 ms a row up to 8 rows, 0.05-0.1 ms past them;
fitted alone, one FLOP rate priced Alpaca's decode steps of 2-13 sequences 13-20% low). One rate
cannot price both; the term charges each of the first few_rows rows of a step the difference
(few_row_time), so a step's GEMM cost is continuous in T and steeper below the kernel's switch.
Calibration fits few_row_time; the paper-scale profiles (cuBLAS, no such path) carry none.

A profile with `prefill_alone` (the paper's vLLM 0.1 and Orca: a step computes prompts or decodes,
never both) prices a step that mixes prompt rows and one-token rows as two steps, the prompts'
and the decodes': the scheduling stays rawpaged's, the time is what the paper's systems paid.
"""
from __future__ import annotations

from dataclasses import dataclass, fields

from rawpaged.repro.specs import SimSetup


@dataclass(frozen=True)
class StepShape:
    """What one step computes, in counts (the cost model's only input)."""
    num_seqs: int = 0            # S: sequences computing tokens
    num_tokens: int = 0          # T: tokens computed
    num_sampled: int = 0         # N: rows sampled
    decode_context: int = 0      # sum of context lengths (new token included) of one-token rows
    prefill_pairs: int = 0       # (query, key) pairs of multi-token rows under the causal mask
    swap_blocks: int = 0         # blocks swapped in + out
    copy_blocks: int = 0         # copy-on-write block copies
    prefill_seqs: int = 0        # rows computing more than one token (prompts, recomputations)
    prefill_tokens: int = 0      # their tokens
    decode_blocks: int = 0       # KV blocks the one-token rows' contexts span (for a block size given to of())

    @classmethod
    def of(cls, out, block_size: int = 0) -> "StepShape":
        """The shape of a SchedulerOutput, read before the step runs (num_computed_tokens is
        still the count before this step's tokens); decode_blocks counts blocks of `block_size`."""
        tokens = sampled = decode_ctx = pairs = pre_seqs = pre_tokens = blocks = 0
        for s in out.batch:
            q, c0 = s.num_new_tokens, s.seq.num_computed_tokens
            tokens += q
            sampled += s.sample
            if q == 1:
                decode_ctx += c0 + 1
                if block_size:
                    blocks += -(-(c0 + 1) // block_size)
            else:
                pairs += q * c0 + q * (q + 1) // 2     # query at position p sees keys 0..p
                pre_seqs += 1
                pre_tokens += q
        return cls(len(out.batch), tokens, sampled, decode_ctx, pairs,
                   len(out.blocks_to_swap_in) + len(out.blocks_to_swap_out), len(out.blocks_to_copy),
                   pre_seqs, pre_tokens, blocks)

    def split(self) -> tuple["StepShape", "StepShape"]:
        """(the prompt rows alone, the one-token rows with the swaps and copies)."""
        pre_sampled = min(self.num_sampled, self.prefill_seqs)
        pre = StepShape(num_seqs=self.prefill_seqs, num_tokens=self.prefill_tokens, num_sampled=pre_sampled,
                        prefill_pairs=self.prefill_pairs, prefill_seqs=self.prefill_seqs,
                        prefill_tokens=self.prefill_tokens)
        dec = StepShape(num_seqs=self.num_seqs - self.prefill_seqs, num_tokens=self.num_tokens - self.prefill_tokens,
                        num_sampled=self.num_sampled - pre_sampled, decode_context=self.decode_context,
                        decode_blocks=self.decode_blocks, swap_blocks=self.swap_blocks, copy_blocks=self.copy_blocks)
        return pre, dec

    def as_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass(frozen=True)
class StepCost:
    gemm: float = 0.0
    attention: float = 0.0
    kv_write: float = 0.0
    comm: float = 0.0
    swap: float = 0.0
    copy: float = 0.0
    overhead: float = 0.0

    @property
    def total(self) -> float:
        return (self.gemm + self.attention + self.kv_write + self.comm + self.swap + self.copy
                + self.overhead)


class CostModel:
    def __init__(self, setup: SimSetup, block_size: int = 16):
        self.setup = setup
        self.block_size = block_size
        m, hw, p = setup.model, setup.hardware, setup.num_gpus
        self.p = p
        self._weight_time = m.weight_bytes / p / (hw.hbm_bw * hw.mem_eff)
        self._flop_time_per_token = 2 * m.gemm_params / p / (hw.flops * hw.gemm_eff)
        self._flop_time_per_sample = 2 * m.vocab * m.hidden / p / (hw.flops * hw.gemm_eff)
        kv_rank = m.kv_bytes_per_token / p
        self._kv_read_per_token = kv_rank / (hw.hbm_bw * hw.attn_eff)
        self._pair_time = 4 * m.hidden * m.layers / p / (hw.flops * hw.attn_flop_eff)
        self._block_time = 0.0
        if hw.block_latency > 0:
            self._block_time = 2 * m.heads * m.layers * hw.block_latency / p / (hw.sms * hw.warps_per_sm)
        self._few_rows, self._few_row_time = hw.few_rows, hw.few_row_time / p
        self._kv_write_per_token = kv_rank / hw.hbm_bw
        self._allreduce_per_token = 2 * (p - 1) / p * m.hidden * m.dtype_bytes / hw.link_bw
        block_rank = kv_rank * block_size
        self._swap_per_block = hw.transfer_latency + block_rank / hw.pcie_bw
        self._copy_per_block = hw.transfer_latency + 2 * block_rank / hw.hbm_bw

    def step(self, s: StepShape) -> StepCost:
        if self.setup.hardware.prefill_alone and 0 < s.prefill_seqs < s.num_seqs:
            a, b = (self._step(part) for part in s.split())
            return StepCost(*(getattr(a, f.name) + getattr(b, f.name) for f in fields(StepCost)))
        return self._step(s)

    def _step(self, s: StepShape) -> StepCost:
        if s.num_seqs == 0 and s.swap_blocks == 0 and s.copy_blocks == 0:
            return StepCost()
        hw, m = self.setup.hardware, self.setup.model
        compute = (s.num_tokens * self._flop_time_per_token + s.num_sampled * self._flop_time_per_sample
                   + min(s.num_tokens, self._few_rows) * self._few_row_time)
        gemm = max(self._weight_time, compute) if s.num_tokens else 0.0
        attention = (s.decode_context * self._kv_read_per_token + s.decode_blocks * self._block_time
                     + s.prefill_pairs * self._pair_time)
        comm = 0.0
        if self.p > 1 and s.num_tokens:
            comm = 2 * m.layers * (hw.allreduce_latency + s.num_tokens * self._allreduce_per_token)
        return StepCost(gemm=gemm, attention=attention, kv_write=s.num_tokens * self._kv_write_per_token,
                        comm=comm, swap=s.swap_blocks * self._swap_per_block,
                        copy=s.copy_blocks * self._copy_per_block,
                        overhead=hw.step_overhead + hw.seq_overhead * s.num_seqs)

    def step_time(self, s: StepShape) -> float:
        return self.step(s).total
