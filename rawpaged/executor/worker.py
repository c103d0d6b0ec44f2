"""Worker: one rank of the model: its backend and device, its shard of the weights, the paged KV
cache of its heads, and the model runner.

Every executor drives workers: `LocalExecutor` one in its own process (no communicator: the model
is whole), `MultiprocExecutor` / `RayExecutor` one per GPU (or CPU process), each holding 1/N of the
model (model_impl/parallel.py). The driver keeps the scheduler and the block tables; every rank
runs the same flattened batch against the same block tables, on its own heads (the paper's Fig. 4).
"""
from __future__ import annotations

import dataclasses
import logging
import math
import threading
from dataclasses import dataclass

import numpy as np

from model_impl import get_model_class
from model_impl.parallel import SINGLE, TensorParallel, held_bytes
from rawpaged.backend import get_backend
from rawpaged.config import ModelConfig
from rawpaged.errors import RawpagedError
from rawpaged.executor import CacheSize, ModelOutput
from rawpaged.loader import Checkpoint
from rawpaged.sequence import ScheduledSeq, Sequence
from rawpaged.worker.cache_engine import CacheEngine, block_bytes, num_blocks_for
from rawpaged.worker.graph_runner import DecodeGraphs
from rawpaged.worker.model_runner import BatchInputs, ModelRunner, prepare_inputs

logger = logging.getLogger("rawpaged")

GiB = 1 << 30
CPU_DEFAULT_KV_MEMORY = 1 * GiB
# NOTE: a bound for models whose max_num_seqs x max_model_len is huge (long-context configs):
# 2M tokens at block size 16, more than one H200 holds for any real model but the smallest, and
# ~1 s and ~40 MB of host memory for the block manager's records.
MAX_KV_BLOCKS = 1 << 17
# NOTE: the CUDA graphs' pool is estimated from one measured step; CuPy's pool rounds and splits
# blocks, so a quarter more is left for it (tests/gpu/test_graphs_gpu.py checks it fits).
GRAPH_POOL_MARGIN = 1.25


@dataclass
class StepInputs:
    """What the driver sends every rank each step: the cache moves and the flattened batch."""
    blocks_to_swap_out: list
    blocks_to_swap_in: list
    blocks_to_copy: list
    batch: BatchInputs | None             # None: no sequence computes this step

    @classmethod
    def of(cls, out, block_size: int) -> "StepInputs":
        batch = prepare_inputs(out.batch, block_size) if out.batch else None
        return cls(out.blocks_to_swap_out, out.blocks_to_swap_in, out.blocks_to_copy, batch)


class Worker:
    def __init__(self, config, model_config: ModelConfig, tp: TensorParallel = SINGLE):
        self.config = config
        self.model_config = model_config
        self.tp = tp
        self.backend = get_backend(config.device)
        self.device = self.backend.name
        self.xp = self.backend.xp
        self.dtype = self.backend.resolve_dtype(config.dtype, torch_dtype=model_config.torch_dtype)
        # NOTE: the CPU backend honours float32, bfloat16 and float16 as the storage of the weights
        # and the KV cache (activations and sums stay float32: rawpaged/backend/cpu/__init__.py).
        if self.device == "cpu" and np.dtype(self.dtype) != np.float32 and tp.rank == 0:
            logger.info("CPU: weights and KV cache stored in %s, computed in float32", np.dtype(self.dtype).name)
        self.model = get_model_class(model_config.family)(model_config, self.backend, self.dtype, tp)
        # NOTE: the model reads what it holds from the checkpoint, tensor by tensor and, on a
        # tensor-parallel rank, only its shard of each (sliced reads).
        checkpoint = Checkpoint(model_config.path, progress=not tp.enabled)
        try:
            self.model.load_weights(checkpoint.refs(), where=str(model_config.path))
        finally:
            checkpoint.close()
        self.bytes_read = checkpoint.bytes_read
        self.weight_bytes = held_bytes(self.model)
        # this rank's KV heads: the cache holds only those
        self.cache_config = dataclasses.replace(model_config, num_kv_heads=self.model.heads.num_kv)
        self.runner = ModelRunner(self.model, self.backend, config.block_size)
        self.cache: CacheEngine | None = None
        self.graphs: DecodeGraphs | None = None      # made by determine_cache_size, captured by init_cache
        self.graph_reserve = 0                       # bytes the KV sizing left for the graphs

    def wants_graphs(self) -> bool:
        """CUDA graphs for decode steps: on the GPU, unless enforce_eager.
        NOTE: not under tensor parallelism yet: its all-reduces (NCCL) would be captured too, which
        nobody has run on a device; TP ranks keep the eager path. Nor with RAWPAGED_CUDA_SYNC=1
        (a synchronize after every launch, to name a faulting kernel): a capturing stream cannot
        synchronize."""
        if self.device != "cuda" or getattr(self.config, "enforce_eager", False) or self.tp.enabled:
            return False
        return not self.backend.launch.SYNC

    def wants_fused_decode(self) -> bool:
        """The CPU's decode steps through one compiled call for the decoder stack (worker/fused_decode.py),
        unless enforce_eager (every op from Python, as the GPU without graphs)."""
        if self.device != "cpu" or getattr(self.config, "enforce_eager", False):
            return False
        from rawpaged.worker.fused_decode import FusedDecode     # NOTE: imports the CPU kernels
        return FusedDecode.supports(self.model, self.backend)

    def info(self) -> dict:
        return {"device": self.device, "dtype": np.dtype(self.dtype), "weight_bytes": self.weight_bytes,
                "bytes_read": self.bytes_read, "num_kv_heads": self.cache_config.num_kv_heads}

    # -- the KV cache ----------------------------------------------------------------------------
    def determine_cache_size(self, max_batched_tokens: int, max_model_len: int) -> CacheSize:
        """Blocks of the device pool and of the swap pool, and why (the engine's startup line).

        The device pool gets what the memory source allows (kv_cache_memory, the GPU profiling pass,
        or the CPU default), but never more than the engine can use: max_num_seqs sequences of
        max_model_len tokens (plus the watermark), at most MAX_KV_BLOCKS. The swap pool likewise.
        With tensor parallelism every figure is per rank (a block holds this rank's KV heads).
        """
        c = self.config
        bb = block_bytes(self.cache_config, c.block_size, self.dtype)
        if self.wants_graphs():
            # the persistent buffers exist before the profiling pass: they count as arrays in use
            self.graphs = DecodeGraphs(self.model, self.backend, c.block_size, c.max_num_seqs, max_model_len)
        if c.kv_cache_memory is not None:
            memory, why = c.kv_cache_memory, f"kv_cache_memory={c.kv_cache_memory} bytes"
        elif self.device == "cuda":
            memory, why = self._profile_kv_memory(min(max_batched_tokens, max_model_len))
        else:
            memory, why = CPU_DEFAULT_KV_MEMORY, f"the CPU default of {CPU_DEFAULT_KV_MEMORY / GiB:.0f} GiB"
        num_device = num_blocks_for(memory, self.cache_config, c.block_size, self.dtype)
        if num_device < 1:
            raise RawpagedError(f"{why} holds no KV block (one block is {bb} bytes)")
        usable, usable_why = self._usable_blocks(max_model_len)
        if num_device > usable:
            num_device, why = usable, f"{usable_why} (memory allowed {num_device} blocks: {why})"
        else:
            why = f"{why}: {num_device} blocks"
        num_cpu = min(int(c.swap_space * GiB // bb), usable)
        return CacheSize(num_device, num_cpu, why)

    def _usable_blocks(self, max_model_len: int) -> tuple[int, str]:
        """The most blocks the engine can ever fill: max_num_seqs sequences of max_model_len tokens,
        each rounded up to whole blocks, plus the watermark the block manager keeps free.

        NOTE: without this bound a tiny model got the whole budget (0.9 x 141 GB is tens of millions
        of blocks of a test model): a Python record per block in the block manager costs seconds
        and gigabytes of host memory for slots no request can reach.
        """
        c = self.config
        per_seq = -(-max_model_len // c.block_size)
        want = math.ceil(c.max_num_seqs * per_seq / (1 - c.watermark))
        if want > MAX_KV_BLOCKS:
            return MAX_KV_BLOCKS, f"capped at MAX_KV_BLOCKS={MAX_KV_BLOCKS} blocks"
        return want, (f"capped at {want} blocks: max_num_seqs={c.max_num_seqs} x max_model_len={max_model_len} "
                      f"tokens + watermark {c.watermark}")

    def init_cache(self, num_device_blocks: int, num_cpu_blocks: int) -> None:
        self.cache = CacheEngine(self.cache_config, self.backend, self.dtype, self.config.block_size,
                                 num_device_blocks, num_cpu_blocks)
        if self.wants_fused_decode():
            from rawpaged.worker.fused_decode import FusedDecode
            if not isinstance(self.runner.graphs, FusedDecode):
                self.runner.graphs = FusedDecode(self.model, self.backend)
            self.runner.graphs.attach(self.cache.device_cache)
        self._warm_up()
        if self.graphs is not None:
            self._capture_graphs()

    def _capture_graphs(self) -> None:
        """One CUDA graph per decode bucket over the device cache; the cost and memory said once."""
        g = self.graphs
        g.capture(self.cache.device_cache)
        self.runner.graphs = g
        if self.tp.rank == 0:
            reserved = f", {_size(self.graph_reserve)} reserved for them in the KV sizing" if self.graph_reserve else ""
            logger.info("CUDA graphs: %d decode batch sizes (%s) captured in %.2f s; their memory pool holds %s%s "
                        "(--enforce-eager runs without them)", len(g.buckets), ", ".join(map(str, g.buckets)),
                        g.capture_seconds, _size(g.pool_bytes()), reserved)

    def _warm_up(self) -> None:
        """Compile (or load from the on-disk caches) the kernels of a prefill and a decode step now,
        not in the first request; say so while it takes long (the first run on a machine)."""
        notice = threading.Timer(1.0, lambda: logger.info(
            "compiling the %s kernels for this machine (first run only: they are cached afterwards)...",
            self.device))
        notice.daemon = True
        if self.tp.rank == 0:
            notice.start()
        try:
            # NOTE: block 0 is scratch here: the cache holds nothing yet, and every slot a sequence
            # reads is written by that sequence first.
            seq = Sequence(-1, [0, 0])
            self.runner.execute([ScheduledSeq(seq, 2, [0], sample=True)], self.cache.device_cache)
            seq.num_computed_tokens = 2
            seq.output_token_ids.append(0)
            self.runner.execute([ScheduledSeq(seq, 1, [0], sample=True)], self.cache.device_cache)
            self.backend.synchronize()
        finally:
            notice.cancel()

    def _profile_kv_memory(self, num_tokens: int) -> tuple[int, str]:
        """GPU: run the largest step once, then give the KV cache what gpu_memory_utilization * total
        leaves after what is in use and the step's peak (vLLM's profiling pass).

        Everything on the device counts against the fraction (this engine's weights, other engines'
        arrays in this process, the CUDA context, other processes): the measure is taken from CuPy's
        pool, not from the driver alone, because the pool keeps freed blocks. Read from the driver
        only, a second engine in a process saw the first one's cached blocks as used (and got no
        cache), and the pass's peak hid in whatever the pool had kept before it.
        """
        b, c = self.backend, self.config
        before = b.memory_snapshot(release=True)          # live arrays only: weights, other engines
        blocks = -(-num_tokens // c.block_size)
        scratch = CacheEngine(self.cache_config, b, self.dtype, c.block_size, blocks, 0)
        scratch_bytes = int(scratch.device_cache.nbytes)
        seq = Sequence(-1, [0] * num_tokens)
        self.runner.execute([ScheduledSeq(seq, num_tokens, list(range(blocks)), sample=True)], scratch.device_cache)
        b.synchronize()
        after = b.memory_snapshot()                       # the pool held the pass's peak
        self.graph_reserve = self._graph_memory(scratch.device_cache) if self.graphs is not None else 0
        del scratch
        b.memory_snapshot(release=True)                   # and hands it back
        activations = max(0, after.pool_held - before.pool_used - scratch_bytes)
        in_use = before.pool_used + after.outside_pool
        # NOTE: the sampler holds fp32 logits for up to max_num_seqs rows at once.
        logits = 4 * self.model_config.vocab_size * c.max_num_seqs * 4
        allowed = int(after.total * c.gpu_memory_utilization)
        budget = allowed - in_use - activations - logits - self.graph_reserve
        graphs = f", {_size(self.graph_reserve)} for the CUDA graphs" if self.graph_reserve else ""
        what = (f"gpu_memory_utilization={c.gpu_memory_utilization} of {_size(after.total)} = {_size(allowed)}, "
                f"less {_size(before.pool_used)} of arrays (weights, other engines), {_size(after.outside_pool)} "
                f"outside CuPy's pool (CUDA context, cuBLAS, other processes), {_size(activations)} activation "
                f"peak, {_size(logits)} logits{graphs}")
        if budget <= 0:
            raise RawpagedError(f"no GPU memory left for the KV cache: {what}")
        return budget, what

    def _graph_memory(self, scratch_cache) -> int:
        """What the graphs' own pool will hold: the largest bucket's decode step measured (its peak of
        workspaces and outputs; every smaller bucket reuses those blocks) plus the logits each smaller
        bucket's graph keeps, and GRAPH_POOL_MARGIN for the pool's rounding and fragmentation."""
        b, g = self.backend, self.graphs
        B = g.buckets[-1]
        before = b.memory_snapshot(release=True)
        g.buffers.write(None, B)                          # all padding: nothing is stored in the cache
        g.step(B, scratch_cache)
        b.synchronize()
        peak = max(0, b.memory_snapshot().pool_held - before.pool_used)
        need = peak + g.outputs_bytes(self.model_config.vocab_size) - 4 * B * self.model_config.vocab_size
        return int(need * GRAPH_POOL_MARGIN)

    # -- one step --------------------------------------------------------------------------------
    def _move_blocks(self, swap_out, swap_in, copy) -> None:
        cache = self.cache
        cache.swap_out(swap_out)
        cache.swap_in(swap_in)
        # NOTE: the compute stream waits for the swaps before the copies too: a block swapped in
        # this step may be the source of a copy-on-write.
        cache.wait_for_swaps()
        cache.copy(copy)

    def execute_model(self, out) -> ModelOutput | None:
        """This process's step (LocalExecutor): the SchedulerOutput's moves, then its batch."""
        self._move_blocks(out.blocks_to_swap_out, out.blocks_to_swap_in, out.blocks_to_copy)
        if not out.batch:
            return None
        if out.batch[0].lookahead:                      # multi-step: the step samples itself
            inputs = prepare_inputs(out.batch, self.runner.block_size)
            return ModelOutput(None, [None] * len(out.batch), self.runner.run_steps(inputs, self.cache.device_cache))
        return ModelOutput(*self.runner.execute(out.batch, self.cache.device_cache))

    def interrupt_bursts(self, on: bool = True) -> None:
        """Thread-safe: see FusedDecode.interrupt_bursts (nothing to do without multi-step calls)."""
        if hasattr(self.runner.graphs, "interrupt_bursts"):
            self.runner.graphs.interrupt_bursts(on)

    def runs_steps(self) -> bool:
        """Whether multi-step decode batches can run here (EngineConfig.num_scheduler_steps)."""
        graphs = self.runner.graphs
        return self.tp.size == 1 and graphs is not None and bool(getattr(graphs, "runs_steps", lambda: False)())

    def execute_step(self, step: StepInputs) -> ModelOutput | None:
        """A rank's step (the distributed executors): the broadcast inputs. Rank 0 returns the logits
        as host arrays (the driver samples them); the other ranks return None."""
        self._move_blocks(step.blocks_to_swap_out, step.blocks_to_swap_in, step.blocks_to_copy)
        if step.batch is None:
            return None
        sample, prompt = self.runner.run(step.batch, self.cache.device_cache)
        if self.tp.rank != 0:
            return None
        host = self.backend.to_host
        return ModelOutput(None if sample is None else host(sample),
                           [None if p is None else host(p) for p in prompt])


def _size(nbytes: int) -> str:
    return f"{nbytes / GiB:.2f} GiB" if abs(nbytes) >= GiB // 10 else f"{nbytes / (1 << 20):.1f} MiB"
