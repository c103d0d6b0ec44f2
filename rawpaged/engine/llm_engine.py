"""LLMEngine: requests in, one scheduled step at a time, RequestOutputs out.

    add_request -> Scheduler.schedule -> CacheEngine (swap out / swap in / copy-on-write)
                -> ModelRunner (flattened varlen batch) -> Sampler -> output processing

Output processing appends the sampled tokens, forks parallel samples, advances beam search,
detokenizes incrementally and applies the stop checks (EOS, stop_token_ids, stop strings,
max_tokens, max_model_len). Finished sequences free their blocks at once.
"""
from __future__ import annotations

import itertools
import time
from dataclasses import dataclass

import numpy as np

from model_impl import get_model_class
from rawpaged import beam_search
from rawpaged.backend import get_backend
from rawpaged.core.block_manager import BlockSpaceManager
from rawpaged.worker.cache_engine import CacheEngine, block_bytes, num_blocks_for
from rawpaged.config import ModelConfig
from rawpaged.errors import RawpagedError
from rawpaged.hub import resolve_model
from rawpaged.loader import iter_tensors
from rawpaged.worker.model_runner import ModelRunner, ScheduledSeq
from rawpaged.outputs import CompletionOutput, RequestOutput
from rawpaged.sampler import Sampler, SamplingRow, verify_for_vocab
from rawpaged.sampling_params import SamplingParams
from rawpaged.core.scheduler import Scheduler, SchedulerConfig
from rawpaged.sequence import Sequence, SequenceGroup, SequenceStatus, next_seq_id
from rawpaged.engine.stats import EngineStats
from rawpaged.stop import StopChecker
from rawpaged.tokenizer import IncrementalDetokenizer, Tokenizer

GiB = 1 << 30


@dataclass
class EngineConfig:
    model: str
    device: str = "auto"
    dtype: str = "auto"
    block_size: int = 16
    kv_cache_memory: int | None = None        # bytes for the device KV pool (CPU backend; overrides GPU sizing)
    gpu_memory_utilization: float = 0.90
    swap_space: float = 1.0                   # GiB for the CPU swap pool
    max_num_seqs: int = 256
    max_num_batched_tokens: int | None = None
    max_model_len: int | None = None
    preemption_mode: str = "auto"
    enable_prefix_caching: bool = True
    enable_chunked_prefill: bool = True
    watermark: float = 0.01
    seed: int = 0

    def verify(self) -> None:
        if self.preemption_mode not in ("auto", "recompute", "swap"):
            raise RawpagedError(f"preemption_mode must be auto, recompute or swap, got {self.preemption_mode!r}")
        if self.max_num_seqs < 1:
            raise RawpagedError(f"max_num_seqs must be at least 1, got {self.max_num_seqs}")
        if self.kv_cache_memory is not None and self.kv_cache_memory <= 0:
            raise RawpagedError(f"kv_cache_memory must be a positive number of bytes, got {self.kv_cache_memory}")
        if self.swap_space < 0:
            raise RawpagedError(f"swap_space must be >= 0 GiB, got {self.swap_space}")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise RawpagedError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")


CPU_DEFAULT_KV_MEMORY = 1 * GiB


class LLMEngine:
    def __init__(self, config: EngineConfig):
        config.verify()
        self.config = config
        model_dir = resolve_model(config.model)   # hub.py: a directory, an org/name (HF cache first), None: demo
        self.model_config = ModelConfig.from_dir(model_dir)
        self.tokenizer = Tokenizer.from_dir(model_dir)
        self.backend = get_backend(config.device)
        self.device = self.backend.name
        self.dtype = self.backend.resolve_dtype(config.dtype, torch_dtype=self.model_config.torch_dtype)
        self.model = self._load_model()
        self.runner = ModelRunner(self.model, self.backend, config.block_size)
        self.max_model_len = self._configured_max_model_len()
        max_tokens = config.max_num_batched_tokens or max(2048, 0 if config.enable_chunked_prefill else self.max_model_len)
        self.cache = self._init_cache(max_tokens)
        self.max_model_len = self._cap_to_cache(self.max_model_len)
        self.scheduler = Scheduler(
            SchedulerConfig(max_num_seqs=config.max_num_seqs, max_num_batched_tokens=max_tokens,
                            max_model_len=self.max_model_len, preemption_mode=config.preemption_mode,
                            enable_chunked_prefill=config.enable_chunked_prefill),
            BlockSpaceManager(config.block_size, self.cache.num_device_blocks, self.cache.num_cpu_blocks,
                              watermark=config.watermark, enable_prefix_caching=config.enable_prefix_caching))
        self.block_manager = self.scheduler.block_manager
        self.sampler = Sampler(self.backend.xp, seed=config.seed)
        self.eos_ids = set(self.model_config.eos_token_ids) or set(self.tokenizer.eos_token_ids)
        self.stats = EngineStats()
        self.groups: dict[str, SequenceGroup] = {}
        self._group_of: dict[int, str] = {}          # seq_id -> request_id
        self._generators: dict[int, np.random.Generator] = {}
        self._request_counter = itertools.count()

    # -- set-up ------------------------------------------------------------------------------
    def _load_model(self):
        model = get_model_class(self.model_config.family)(self.model_config, self.backend, self.dtype)
        model.load_weights(iter_tensors(self.model_config.path), where=str(self.model_config.path))
        return model

    def _init_cache(self, max_batched_tokens: int) -> CacheEngine:
        c = self.config
        bb = block_bytes(self.model_config, c.block_size, self.dtype)
        if c.kv_cache_memory is not None:
            memory = c.kv_cache_memory
        elif self.device == "cuda":
            memory = self._profile_kv_memory(min(max_batched_tokens, self.max_model_len))
        else:
            memory = CPU_DEFAULT_KV_MEMORY
        num_device = num_blocks_for(memory, self.model_config, c.block_size, self.dtype)
        if num_device < 1:
            raise RawpagedError(f"kv_cache_memory={memory} bytes holds no KV block (one block is {bb} bytes)")
        num_cpu = int(c.swap_space * GiB // bb)
        return CacheEngine(self.model_config, self.backend, self.dtype, c.block_size, num_device, num_cpu)

    def _profile_kv_memory(self, num_tokens: int) -> int:
        """GPU: run the largest step once, then give the KV cache what the peak leaves of
        gpu_memory_utilization * total memory (vLLM's profiling pass)."""
        b, c = self.backend, self.config
        blocks = -(-num_tokens // c.block_size)
        scratch = CacheEngine(self.model_config, b, self.dtype, c.block_size, blocks, 0)
        seq = Sequence(-1, [0] * num_tokens)
        self.runner.execute([ScheduledSeq(seq, num_tokens, list(range(blocks)), sample=True)], scratch.device_cache)
        b.synchronize()
        del scratch
        peak = b.total_device_memory() - b.free_device_memory()
        # NOTE: the sampler holds fp32 logits for up to max_num_seqs rows at once.
        logits = 4 * self.model_config.vocab_size * c.max_num_seqs * 4
        budget = int(b.total_device_memory() * c.gpu_memory_utilization) - peak - logits
        if budget <= 0:
            raise RawpagedError(f"no GPU memory left for the KV cache at gpu_memory_utilization="
                                f"{c.gpu_memory_utilization} (weights and activations use {peak / GiB:.2f} GiB)")
        return budget

    def _configured_max_model_len(self) -> int:
        limit = self.model_config.max_model_len
        if self.config.max_model_len is not None:
            if self.config.max_model_len > limit:
                raise RawpagedError(f"max_model_len={self.config.max_model_len} exceeds the model's "
                                    f"max_position_embeddings={limit}")
            limit = self.config.max_model_len
        return limit

    def _cap_to_cache(self, limit: int) -> int:
        # NOTE: a single sequence must always fit in the cache, or it could be preempted forever.
        watermark = int(self.config.watermark * self.cache.num_device_blocks)
        return min(limit, (self.cache.num_device_blocks - watermark) * self.config.block_size)

    # -- requests ----------------------------------------------------------------------------
    def add_request(self, request_id: str | None, prompt: str | None, params: SamplingParams,
                    prompt_token_ids: list[int] | None = None, arrival_time: float | None = None) -> str:
        """Queue a request. A request that can never fit is finished with an error at the next step."""
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
        bad = next((t for t in prompt_token_ids if not 0 <= t < self.model_config.vocab_size), None)
        if bad is not None:
            raise RawpagedError(f"prompt token id {bad} is outside the vocabulary [0, {self.model_config.vocab_size})")
        verify_for_vocab(params, self.model_config.vocab_size)
        seq = Sequence(next_seq_id(), prompt_token_ids)
        group = SequenceGroup(request_id, [seq], params, arrival_time or time.monotonic(), prompt=prompt)
        self._start_seq(group, seq, index=0)
        self.groups[request_id] = group
        self.scheduler.add_group(group)
        self.stats.on_arrival(group)
        return request_id

    def abort_request(self, request_id: str) -> bool:
        group = self.scheduler.abort_group(request_id)
        if group is None:
            return False
        self._forget(group)
        self.stats.num_aborted += 1
        return True

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished()

    def get_stats(self) -> dict:
        """Counters, and gauges read live from the scheduler (so an abort shows at once)."""
        return self.stats.as_dict(self)

    # -- one iteration -----------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        out = self.scheduler.schedule()
        results: list[RequestOutput] = []
        for group, why in out.ignored:
            group.error = why
            group.finished_time = time.monotonic()
            results.append(self._make_output(group))
            self._forget(group)
        self.cache.swap_out(out.blocks_to_swap_out)
        self.cache.swap_in(out.blocks_to_swap_in)
        # NOTE: the compute stream waits for the swaps before the copies too: a block swapped in
        # this step may be the source of a copy-on-write.
        self.cache.wait_for_swaps()
        self.cache.copy(out.blocks_to_copy)
        if out.scheduled:
            batch = self._batch(out)
            logits, prompt_logits = self.runner.execute(batch, self.cache.device_cache)
            self._record_prompt_logprobs(batch, prompt_logits)
            for s in batch:
                s.seq.num_computed_tokens += s.num_new_tokens
                self.block_manager.mark_computed(s.seq)
            self._process_samples(batch, logits)
            now = time.monotonic()
            for sg in out.scheduled:
                group = sg.group
                if group.finished:
                    group.finished_time = now
                results.append(self._make_output(group))
                if group.finished:
                    self._forget(group)
        self.scheduler.free_finished()
        self.stats.on_step(self, out)
        return results

    def _batch(self, out) -> list[ScheduledSeq]:
        """One ScheduledSeq per sequence that computes tokens this step."""
        batch = []
        for sg in out.scheduled:
            for seq in sg.group.seqs:
                n = sg.num_new_tokens.get(seq.seq_id)
                if n:
                    batch.append(ScheduledSeq(seq, n, self.block_manager.get_block_table(seq),
                                              sample=seq.num_computed_tokens + n == seq.num_tokens,
                                              prompt_logits=self._wants_prompt_logprobs(sg.group, seq)))
        return batch

    # -- sampling and output processing ------------------------------------------------------
    def _process_samples(self, batch: list[ScheduledSeq], logits) -> None:
        """Group the sampled rows by request, then sample, fork beams/samples and stop-check."""
        rows_by_group: dict[str, list[tuple[int, Sequence]]] = {}
        groups: dict[str, SequenceGroup] = {}
        row = 0
        for s in batch:
            if s.sample:
                group = self.groups[self._group_of[s.seq.seq_id]]
                rows_by_group.setdefault(group.request_id, []).append((row, s.seq))
                groups[group.request_id] = group
                row += 1
        xp = self.backend.xp
        plain_rows, plain_seqs = [], []
        for rid, entries in rows_by_group.items():
            group = groups[rid]
            if group.sampling_params.use_beam_search:
                rows = xp.asarray([r for r, _ in entries])
                self._beam_step(group, [seq for _, seq in entries], logits[rows])
                continue
            for r, seq in entries:
                for target in self._fork_samples(group, seq):
                    plain_rows.append(r)
                    plain_seqs.append((group, target))
        if plain_seqs:
            rows = [SamplingRow(g.sampling_params, s.prompt_token_ids, s.output_token_ids,
                                self._generators.get(s.seq_id), g.sampling_params.logprobs)
                    for g, s in plain_seqs]
            results = self.sampler(logits[xp.asarray(plain_rows)], rows)
            self.stats.generation_tokens += len(results)
            for (group, seq), res in zip(plain_seqs, results):
                seq.append_token(res.token_id, res.logprob, res.top_logprobs)
                self._after_token(group, seq)

    def _fork_samples(self, group: SequenceGroup, seq: Sequence) -> list[Sequence]:
        """Parallel sampling: at the prompt's first sample one sequence becomes best_of."""
        sp = group.sampling_params
        if sp.best_of == 1 or len(group.seqs) > 1 or seq.output_token_ids:
            return [seq]
        children = []
        for i in range(1, sp.best_of):
            child = seq.fork(next_seq_id())
            self.block_manager.fork(seq, child)
            group.add(child)
            self._start_seq(group, child, index=i)
            children.append(child)
        return [seq] + children

    def _start_seq(self, group: SequenceGroup, seq: Sequence, index: int) -> None:
        sp = group.sampling_params
        self._group_of[seq.seq_id] = group.request_id
        if sp.seed is not None:
            self._generators[seq.seq_id] = np.random.default_rng([sp.seed, index])
        if seq.detok_state is None:
            seq.detok_state = IncrementalDetokenizer(self.tokenizer, seq.prompt_token_ids, sp.skip_special_tokens)

    def _after_token(self, group: SequenceGroup, seq: Sequence) -> None:
        """Detokenize the new token and apply the stop checks; free the sequence if it finished."""
        sp = group.sampling_params
        if group.first_token_time is None:
            group.first_token_time = time.monotonic()
        delta = seq.detok_state.step(seq.output_token_ids[-1])
        seq.output_text += delta
        status = StopChecker.check(seq, sp, len(delta), self.eos_ids, self._max_tokens(seq, sp))
        if status is not None:
            if not isinstance(seq.stop_reason, str):      # a stop string already cut the text
                seq.output_text += seq.detok_state.flush()
            seq.status = status
            self.block_manager.free(seq)

    def _max_tokens(self, seq: Sequence, sp: SamplingParams) -> int:
        room = self.max_model_len - seq.num_prompt_tokens
        return room if sp.max_tokens is None else min(sp.max_tokens, room)

    def _beam_step(self, group: SequenceGroup, beams: list[Sequence], logits) -> None:
        sp = group.sampling_params
        width = sp.best_of
        values, ids = self.sampler.topk_logprobs(logits, 2 * width)
        self.stats.generation_tokens += len(beams)
        eos = set() if sp.ignore_eos else (self.eos_ids | set(sp.stop_token_ids))
        keep, finished = beam_search.select(beams, values, ids, width, eos)
        for c in finished:                                   # finished hypotheses hold no blocks
            hyp = c.parent.fork(next_seq_id())
            hyp.append_token(c.token_id, c.logprob)
            hyp.status = SequenceStatus.FINISHED_STOPPED
            hyp.stop_reason = c.token_id
            group.add(hyp)
        # Fork before appending: a parent chosen k times gives k-1 children plus itself.
        used: set[int] = set()
        new_beams = []
        for c in keep:
            if c.parent.seq_id in used:
                child = c.parent.fork(next_seq_id())
                self.block_manager.fork(c.parent, child)
                self._group_of[child.seq_id] = group.request_id
                group.add(child)
                new_beams.append((child, c))
            else:
                used.add(c.parent.seq_id)
                new_beams.append((c.parent, c))
        for seq, c in new_beams:
            seq.append_token(c.token_id, c.logprob)
        for beam in beams:                                   # beams nobody continues are dropped
            if beam.seq_id not in used:
                self._drop(group, beam)
        self._prune_hypotheses(group)
        running = group.get_seqs(SequenceStatus.RUNNING)
        max_out = self._max_tokens(running[0], sp) if running else 0
        done_length = running and running[0].num_output_tokens >= max_out
        hyps = [s for s in group.seqs if s.status == SequenceStatus.FINISHED_STOPPED]
        if done_length or beam_search.is_done(hyps, running, sp, max_out):
            for seq in running:
                seq.status = SequenceStatus.FINISHED_LENGTH if done_length else SequenceStatus.FINISHED_STOPPED
                if done_length:
                    self.block_manager.free(seq)
                else:                                        # unfinished beams are not results
                    self._drop(group, seq)
            self._prune_hypotheses(group)
            for seq in group.seqs:                           # beams are detokenized once, at the end
                detok = IncrementalDetokenizer(self.tokenizer, seq.prompt_token_ids, sp.skip_special_tokens)
                seq.output_text = detok.step(seq.output_token_ids) + detok.flush()
        if group.first_token_time is None:
            group.first_token_time = time.monotonic()

    def _drop(self, group: SequenceGroup, seq: Sequence) -> None:
        """A beam leaves its group: blocks freed, bookkeeping forgotten."""
        self.block_manager.free(seq)
        group.remove(seq.seq_id)
        self._group_of.pop(seq.seq_id, None)

    @staticmethod
    def _prune_hypotheses(group: SequenceGroup) -> None:
        """Keep the best `width` finished hypotheses of a beam group."""
        sp = group.sampling_params
        done = [s for s in group.seqs if s.finished]
        if len(done) <= sp.best_of:
            return
        done.sort(key=lambda s: beam_search.beam_score(s, sp.length_penalty), reverse=True)
        for s in done[sp.best_of:]:
            group.remove(s.seq_id)

    # -- prompt logprobs ---------------------------------------------------------------------
    @staticmethod
    def _wants_prompt_logprobs(group: SequenceGroup, seq: Sequence) -> bool:
        return (group.sampling_params.prompt_logprobs is not None and seq is group.seqs[0]
                and seq.is_prefill and seq.num_output_tokens == 0)

    def _record_prompt_logprobs(self, batch: list[ScheduledSeq], prompt_logits) -> None:
        for s, logits in zip(batch, prompt_logits):
            if logits is None:
                continue
            group = self.groups[self._group_of[s.seq.seq_id]]
            prompt = s.seq.prompt_token_ids
            start = s.seq.num_computed_tokens
            if group.prompt_logprobs is None:
                group.prompt_logprobs = [None] * (start + 1)   # first token: nothing predicts it
            # Row i (position start+i) predicts prompt token start+i+1.
            targets = prompt[start + 1:start + s.num_new_tokens + 1]
            if targets:
                _, tops = self.sampler.logprobs(logits[:len(targets)], targets,
                                                group.sampling_params.prompt_logprobs)
                group.prompt_logprobs.extend(tops)

    # -- outputs -----------------------------------------------------------------------------
    def _make_output(self, group: SequenceGroup) -> RequestOutput:
        sp = group.sampling_params
        seqs = list(group.seqs)
        if group.finished and len(seqs) > sp.n:
            if sp.use_beam_search:
                key = lambda s: beam_search.beam_score(s, sp.length_penalty)  # noqa: E731
            else:
                key = lambda s: s.cumulative_logprob  # noqa: E731
            seqs = sorted(seqs, key=key, reverse=True)[:sp.n]
        outputs = [CompletionOutput(
            index=i, text=StopChecker.visible_text(seq, sp), token_ids=list(seq.output_token_ids),
            cumulative_logprob=seq.cumulative_logprob,
            logprobs=list(seq.output_logprobs) if sp.logprobs is not None else None,
            finish_reason=seq.status.finish_reason, stop_reason=seq.stop_reason)
            for i, seq in enumerate(seqs)]
        metrics = {"arrival_time": group.arrival_time, "first_token_time": group.first_token_time,
                   "finished_time": group.finished_time, "num_preemptions": group.num_preemptions}
        return RequestOutput(group.request_id, group.prompt, list(group.prompt_token_ids), outputs,
                             finished=group.finished, prompt_logprobs=group.prompt_logprobs,
                             error=group.error, metrics=metrics)

    def _forget(self, group: SequenceGroup) -> None:
        self.groups.pop(group.request_id, None)
        for seq in group.seqs:
            self.block_manager.free(seq)
            self._group_of.pop(seq.seq_id, None)
            self._generators.pop(seq.seq_id, None)
        self.stats.on_finish(group)
