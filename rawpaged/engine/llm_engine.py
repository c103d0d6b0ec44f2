"""LLMEngine: requests in, one scheduled step at a time, RequestOutputs out.

    step() = Scheduler.schedule          which groups run, how many tokens each, swaps and copies
           -> Executor.execute_model     swap out / swap in / copy-on-write, then the varlen batch
           -> Scheduler.on_step_done     the batch's tokens are in the cache
           -> OutputProcessor.process    sample, fork, beam steps, detokenize, stop checks, outputs
"""
from __future__ import annotations

import dataclasses
import itertools
import time

from rawpaged.config import ModelConfig
from rawpaged.core.kv_managers import make_kv_manager
from rawpaged.core.scheduler import Scheduler
from rawpaged.engine.config import EngineConfig
from rawpaged.engine.output_processor import OutputProcessor
from rawpaged.engine.stats import EngineStats
from rawpaged.errors import RawpagedError
from rawpaged.executor import select_executor
from rawpaged.hub import resolve_model
from rawpaged.outputs import RequestOutput
from rawpaged.sampler import Sampler, verify_for_vocab
from rawpaged.sampling_params import SamplingParams
from rawpaged.sequence import Sequence, SequenceGroup, next_seq_id
from rawpaged.structured_output import Grammars
from rawpaged.tokenizer import Tokenizer


class LLMEngine:
    def __init__(self, config: EngineConfig, executor_class=None, *,
                 model_config: ModelConfig | None = None, tokenizer: Tokenizer | None = None):
        """`model_config` and `tokenizer` given (both) skip the model directory: a simulated engine
        (executor/simulated.py) is built from a model spec, with no files. Without `executor_class`
        the config picks it (executor.select_executor: this process, `mp` or `ray`)."""
        if executor_class is None:
            executor_class = select_executor(config)
        self.config = config
        if model_config is None or tokenizer is None:
            model_dir = resolve_model(config.model, revision=config.revision, token=config.hf_token)
            model_config, tokenizer = ModelConfig.from_dir(model_dir), Tokenizer.from_dir(model_dir)
        self.model_config, self.tokenizer = model_config, tokenizer
        self.executor = executor_class(config, self.model_config)
        self.device, self.dtype = self.executor.device, self.executor.dtype
        max_model_len = self._configured_max_model_len()
        max_tokens = config.max_num_batched_tokens or max(2048, 0 if config.enable_chunked_prefill else max_model_len)
        size = self.executor.determine_cache_size(max_tokens, max_model_len)
        self.executor.init_cache(size.num_device_blocks, size.num_cpu_blocks)
        if config.num_scheduler_steps > 1 and not getattr(self.executor, "runs_steps", lambda: False)():
            raise RawpagedError("num_scheduler_steps > 1 needs the CPU backend's fused decode step: device cpu, a "
                                "LLaMA-family model on one rank, enforce_eager off")
        self.cache_size = size
        self.max_model_len = self._cap_to_cache(max_model_len, size.num_device_blocks)
        # NOTE: an executor that reads no KV cache (the simulator) says so with reads_block_tables = False.
        block_manager = make_kv_manager(config, size.num_device_blocks, size.num_cpu_blocks, self.max_model_len,
                                        getattr(self.executor, "reads_block_tables", True))
        self.scheduler = Scheduler(dataclasses.replace(config, max_model_len=self.max_model_len,
                                                       max_num_batched_tokens=max_tokens), block_manager)
        self.stats = EngineStats()
        eos_ids = set(self.model_config.eos_token_ids) or set(self.tokenizer.eos_token_ids)
        self.grammars = Grammars(self.tokenizer, self.model_config.vocab_size, eos_ids)
        self.output_processor = OutputProcessor(self.scheduler, Sampler(self.executor.xp, seed=config.seed),
                                                self.tokenizer, eos_ids, self.max_model_len, self.stats,
                                                grammars=self.grammars)
        self.groups: dict[str, SequenceGroup] = {}          # request id -> its unfinished group
        self._request_counter = itertools.count()

    def _configured_max_model_len(self) -> int:
        limit = self.model_config.max_model_len
        if self.config.max_model_len is not None:
            if self.config.max_model_len > limit:
                raise RawpagedError(f"max_model_len={self.config.max_model_len} exceeds the model's "
                                    f"max_position_embeddings={limit}")
            limit = self.config.max_model_len
        return limit

    def _cap_to_cache(self, limit: int, num_device_blocks: int) -> int:
        # NOTE: a single sequence must always fit in the cache, or it could be preempted forever.
        watermark = int(self.config.watermark * num_device_blocks)
        return min(limit, (num_device_blocks - watermark) * self.config.block_size)

    # -- requests --------------------------------------------------------------------------------
    def add_request(self, request_id: str | None, prompt: str | None, params: SamplingParams,
                    prompt_token_ids: list[int] | None = None, arrival_time: float | None = None) -> str:
        """Queue a request, or refuse it now (RawpagedError) if it can never run here."""
        group = self.make_group(request_id, prompt, params, prompt_token_ids, arrival_time)
        self.enqueue(group)
        return group.request_id

    def make_group(self, request_id: str | None, prompt: str | None, params: SamplingParams,
                   prompt_token_ids: list[int] | None = None, arrival_time: float | None = None) -> SequenceGroup:
        """Validate a request and build its group without queueing it (LLM.generate checks a whole
        batch before adding any)."""
        if request_id is None:
            request_id = str(next(self._request_counter))
        if request_id in self.groups:
            raise RawpagedError(f"request id {request_id!r} is already in use")
        if prompt_token_ids is None:
            if prompt is None:
                raise RawpagedError("a request needs a prompt or prompt_token_ids")
            prompt_token_ids = self.tokenizer.encode(prompt)
        prompt_token_ids = [int(t) for t in prompt_token_ids]
        if not prompt_token_ids:
            raise RawpagedError("the prompt is empty (no tokens)")
        vocab = self.model_config.vocab_size
        bad = next((t for t in prompt_token_ids if not 0 <= t < vocab), None)
        if bad is not None:
            raise RawpagedError(f"prompt token id {bad} is outside the vocabulary [0, {vocab})")
        verify_for_vocab(params, vocab)
        if params.structured_outputs is not None:
            self.grammars.prepare(params.structured_outputs)     # GrammarError: this tokenizer cannot
        group = SequenceGroup(request_id, [Sequence(next_seq_id(), prompt_token_ids)], params,
                              time.monotonic() if arrival_time is None else arrival_time, prompt=prompt)
        why = self.scheduler.why_too_wide(group)
        if why is not None:
            raise RawpagedError(why)
        return group

    def enqueue(self, group: SequenceGroup) -> None:
        if group.request_id in self.groups:
            raise RawpagedError(f"request id {group.request_id!r} is already in use")
        self.output_processor.start(group, group.seqs[0], index=0)
        self.groups[group.request_id] = group
        self.scheduler.add_group(group)
        self.stats.on_arrival(group)

    def interrupt_bursts(self, on: bool = True) -> None:
        """Thread-safe (unlike the rest of the engine): a request is on its way, so a multi-step
        decode call in flight stops after its current step and the next schedule admits it (on);
        off: the engine thread, before it takes in what arrived. (num_scheduler_steps > 1 only.)"""
        if self.config.num_scheduler_steps > 1:
            self.executor.interrupt_bursts(on)

    def abort_request(self, request_id: str) -> bool:
        group = self.scheduler.abort_group(request_id)
        if group is None:
            return False
        self.groups.pop(request_id, None)
        self.stats.num_aborted += 1
        return True

    def shutdown(self) -> None:
        """Stop the executor's worker processes or actors (none for the in-process executor)."""
        stop = getattr(self.executor, "shutdown", None)
        if stop is not None:
            stop()

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished()

    @property
    def block_manager(self):
        """The scheduler's KV cache manager (tests and benchmarks inspect it)."""
        return self.scheduler.block_manager

    def get_stats(self) -> dict:
        """Counters, and gauges read live from the scheduler (so an abort shows at once)."""
        return self.stats.as_dict(self.scheduler.stats())

    # -- one iteration ---------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        out = self.scheduler.schedule()
        self.output_processor.prefetch_masks(out)        # structured outputs: while the model runs
        model_output = self.executor.execute_model(out)
        self.scheduler.on_step_done(out)
        outputs = self.output_processor.process(out, model_output)
        for o in outputs:
            if o.finished:
                self.groups.pop(o.request_id, None)
        self.stats.on_step(out, self.scheduler.stats())
        return outputs


__all__ = ["EngineConfig", "LLMEngine"]
