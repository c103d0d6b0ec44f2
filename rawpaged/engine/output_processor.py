"""Output processing: the logits of one step become tokens, forks, finished sequences and outputs.

For each batch entry that samples (the scheduler's ScheduledSeq carries its group):
  - parallel sampling: at the prompt's first sample the sequence forks into best_of sequences that
    share every block (copy-on-write on the first write);
  - beam search: each beam proposes its 2*width best tokens; beams fork or are dropped;
  - plain sampling: one token per sequence, through the sampler, in one batched call.
Then each new token advances the sequence's grammar (structured outputs), is detokenized
incrementally, and the stop checks run (EOS, stop_token_ids, stop strings, max_tokens,
max_model_len, a grammar that is complete). A sequence that finishes (or leaves its group) frees its
blocks through the scheduler and releases its grammar state; nothing here touches the block manager
or keeps state keyed by sequence.

Structured outputs (the logits-processor seam): a constrained sequence carries its grammar state
(`Sequence.constraint`); the rows that have one get their allowed tokens from the grammar engine in
ONE batched call (`Grammars.fill_bitmask`), handed to the sampler as a TokenMask. The call starts
before the model runs (`prefetch_masks`, on the grammar engine's thread: it lets the GIL go), since
no state changes between the schedule and the sampling; a sequence forked at its first sample has
its parent's state, so its parent's mask. Forks copy the state (Sequence.fork), so parallel samples
and beams continue independently. Unconstrained batches build no mask at all.
"""
from __future__ import annotations

import logging
import time

import numpy as np

from rawpaged import beam_search
from rawpaged.outputs import CompletionOutput, RequestOutput
from rawpaged.sampler import SamplingRow, TokenMask
from rawpaged.sampling_params import SamplingParams
from rawpaged.sequence import ScheduledSeq, Sequence, SequenceGroup, SequenceStatus, next_seq_id
from rawpaged.stop import StopChecker
from rawpaged.tokenizer import IncrementalDetokenizer

logger = logging.getLogger("rawpaged.engine")


class OutputProcessor:
    def __init__(self, scheduler, sampler, tokenizer, eos_ids: set[int], max_model_len: int, stats,
                 grammars=None):
        self.scheduler = scheduler
        self.sampler = sampler
        self.tokenizer = tokenizer
        self.eos_ids = eos_ids
        self.max_model_len = max_model_len
        self.stats = stats
        self.grammars = grammars              # structured_output.Grammars (structured outputs)
        self._masks = None                    # this step's prefetched masks: (future or bits, {seq_id: row})

    def start(self, group: SequenceGroup, seq: Sequence, index: int) -> None:
        """A sequence starts producing tokens: its seeded generator, its detokenizer, its grammar
        (a fork already has a copy of its parent's)."""
        sp = group.sampling_params
        if sp.seed is not None:
            seq.generator = np.random.default_rng([sp.seed, index])
        if seq.detok_state is None:
            seq.detok_state = IncrementalDetokenizer(self.tokenizer, seq.prompt_token_ids, sp.skip_special_tokens)
        if sp.structured_outputs is not None and seq.constraint is None and not seq.output_token_ids:
            seq.constraint = self.grammars.new_state(sp.structured_outputs)

    # -- one step ----------------------------------------------------------------------------------
    def prefetch_masks(self, out) -> None:
        """Start computing the masks of this step's constrained rows (before the model runs)."""
        seqs = [s.seq for s in out.batch if s.sample and s.seq.constraint is not None]
        self._masks = None
        if seqs:
            self._masks = (self.grammars.fill_bitmask_async([s.constraint for s in seqs]),
                           {s.seq_id: i for i, s in enumerate(seqs)})

    def process(self, out, model_output) -> list[RequestOutput]:
        """The RequestOutputs of one step: refused groups, then every scheduled group."""
        results = [self._refuse(group, why) for group, why in out.ignored]
        if out.batch:
            self._record_prompt_logprobs(out.batch, model_output.prompt_logits)
            try:
                if model_output.sampled is not None:
                    self._take_steps(out.batch, *model_output.sampled)
                else:
                    self._sample(out.batch, model_output.sample_logits)
            finally:
                self._masks = None
            now = time.monotonic()
            for sg in out.scheduled:
                group = sg.group
                if group.finished:
                    group.finished_time = now
                    self.stats.on_finish(group)
                results.append(make_output(group))
        self.scheduler.free_finished()
        return results

    def _refuse(self, group: SequenceGroup, why: str) -> RequestOutput:
        group.error = why
        group.finished_time = time.monotonic()
        self.stats.on_finish(group)
        return make_output(group)

    # -- sampling ----------------------------------------------------------------------------------
    def _sample(self, batch: list[ScheduledSeq], logits) -> None:
        """Sample every row at once; beam groups take their rows to a beam step."""
        xp = self.sampler.xp
        if self._masks is not None:
            # NOTE: wait for the grammar thread before anything forks (a fork copies a matcher).
            future, index = self._masks
            self._masks = (future.result(), index)
        beam_rows: dict[int, tuple[SequenceGroup, list[int], list[Sequence]]] = {}
        plain_rows, plain_seqs, plain_src = [], [], []
        row = -1
        for s in batch:
            if not s.sample:
                continue
            row += 1
            group = s.group
            if group.sampling_params.use_beam_search:
                entry = beam_rows.setdefault(id(group), (group, [], []))
                entry[1].append(row)
                entry[2].append(s.seq)
                continue
            for target in self._fork_samples(group, s.seq):
                plain_rows.append(row)
                plain_seqs.append((group, target))
                plain_src.append(s.seq)                     # a new fork has its parent's mask
        for group, rows, beams in beam_rows.values():
            self._beam_step(group, beams, logits[xp.asarray(rows)])
        if plain_seqs:
            rows = [SamplingRow(g.sampling_params, s.prompt_token_ids, s.output_token_ids, s.generator,
                                g.sampling_params.logprobs) for g, s in plain_seqs]
            mask = self._token_mask(plain_src)
            # NOTE: every row in order (the common case): no index upload, no gather
            same = len(plain_rows) == logits.shape[0] and plain_rows == list(range(len(plain_rows)))
            results = self.sampler(logits if same else logits[xp.asarray(plain_rows)], rows, mask)
            self.stats.generation_tokens += len(results)
            for (group, seq), res in zip(plain_seqs, results):
                seq.append_token(res.token_id, res.logprob, res.top_logprobs)
                self._after_token(group, seq)

    def _take_steps(self, batch: list[ScheduledSeq], tokens: np.ndarray, logprobs: np.ndarray) -> None:
        """A multi-step call's greedy tokens [steps, n] (plain greedy sequences only, no forks): each
        sequence takes its tokens in order until it finishes; the ones after its end are dropped.
        The K/V of every token it took but the last is in the cache now."""
        for s, toks, lps in zip(batch, tokens.T.tolist(), logprobs.T.tolist()):
            seq = s.seq
            for tok, lp in zip(toks, lps):
                seq.append_token(tok, lp)
                self.stats.generation_tokens += 1
                self._after_token(s.group, seq)
                if seq.finished:
                    break
            seq.num_computed_tokens = seq.num_tokens - 1

    def _token_mask(self, seqs: list[Sequence]) -> TokenMask | None:
        """The allowed tokens of the constrained ones among `seqs` (the scheduled sequences, one per
        row), or None: the prefetched masks, or one grammar-engine call now."""
        rows = [i for i, s in enumerate(seqs) if s.constraint is not None]
        if not rows:
            return None
        if self._masks is not None:
            bits, index = self._masks
            if all(seqs[i].seq_id in index for i in rows):
                return TokenMask(rows, bits[[index[seqs[i].seq_id] for i in rows]])
        # NOTE: a parent stands for its new forks here: each state is filled once.
        index = {}
        for i in rows:
            index.setdefault(seqs[i].seq_id, len(index))
        states = {seqs[i].seq_id: seqs[i].constraint for i in rows}
        bits = self.grammars.fill_bitmask(list(states.values()))
        return TokenMask(rows, bits[[index[seqs[i].seq_id] for i in rows]])

    def _fork_samples(self, group: SequenceGroup, seq: Sequence) -> list[Sequence]:
        """Parallel sampling: at the prompt's first sample one sequence becomes best_of."""
        sp = group.sampling_params
        if sp.best_of == 1 or len(group.seqs) > 1 or seq.output_token_ids:
            return [seq]
        children = []
        for i in range(1, sp.best_of):
            child = seq.fork(next_seq_id())
            self.scheduler.fork_seq(seq, child)
            group.add(child)
            self.start(group, child, index=i)
            children.append(child)
        return [seq] + children

    def _after_token(self, group: SequenceGroup, seq: Sequence) -> None:
        """Detokenize the new token and apply the stop checks; free the sequence if it finished."""
        sp = group.sampling_params
        if group.first_token_time is None:
            group.first_token_time = time.monotonic()
        complete = self._advance_grammar(seq)
        delta = seq.detok_state.step(seq.output_token_ids[-1])
        seq.output_text += delta
        status = StopChecker.check(seq, sp, len(delta), self.eos_ids, self._max_tokens(seq, sp))
        if status is None and complete:
            seq.stop_reason = None                        # the grammar is complete: "stop", like EOS
            status = SequenceStatus.FINISHED_STOPPED
        if status is not None:
            if not isinstance(seq.stop_reason, str):      # a stop string already cut the text
                seq.output_text += seq.detok_state.flush()
            seq.status = status
            self._release(seq)

    @staticmethod
    def _advance_grammar(seq: Sequence) -> bool:
        """The sequence's grammar takes its newest token; True when the grammar is then complete
        (nothing but EOS may follow) or refused the token (which the mask rules out)."""
        if seq.constraint is None:
            return False
        if not seq.constraint.accept(seq.output_token_ids[-1]):
            logger.warning("sequence %d: the grammar refused token %d (%s); the sequence stops", seq.seq_id,
                           seq.output_token_ids[-1], seq.constraint.error)
            return True
        return seq.constraint.finished

    def _release(self, seq: Sequence) -> None:
        """A sequence is done: its blocks go back to the pool, its grammar state is dropped."""
        seq.constraint = None
        self.scheduler.free_seq(seq)

    def _max_tokens(self, seq: Sequence, sp: SamplingParams) -> int:
        room = self.max_model_len - seq.num_prompt_tokens
        return room if sp.max_tokens is None else min(sp.max_tokens, room)

    # -- beam search -------------------------------------------------------------------------------
    def _beam_step(self, group: SequenceGroup, beams: list[Sequence], logits) -> None:
        sp = group.sampling_params
        width = sp.best_of
        mask = self._token_mask(beams)
        values, ids = self.sampler.topk_logprobs(logits, 2 * width, mask)
        self.stats.generation_tokens += len(beams)
        # NOTE: with a grammar, EOS ends a beam even with ignore_eos: the grammar decides where the
        # output may end (EOS is allowed only there), and a complete grammar allows nothing else.
        eos = set() if sp.ignore_eos and sp.structured_outputs is None else (self.eos_ids | set(sp.stop_token_ids))
        if mask is not None:                                 # forbidden candidates (-inf) are none
            values, ids = _finite_candidates(values, ids)
        keep, finished = beam_search.select(beams, values, ids, width, eos)
        for c in finished:                                   # finished hypotheses hold no blocks
            hyp = c.parent.fork(next_seq_id())
            hyp.constraint = None
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
                self.scheduler.fork_seq(c.parent, child)
                group.add(child)
                new_beams.append((child, c))
            else:
                used.add(c.parent.seq_id)
                new_beams.append((c.parent, c))
        for seq, c in new_beams:
            seq.append_token(c.token_id, c.logprob)
            if self._advance_grammar(seq):                   # complete: a finished hypothesis now
                seq.status = SequenceStatus.FINISHED_STOPPED
                seq.stop_reason = None
                self._release(seq)
        for beam in beams:                                   # beams nobody continues are dropped
            if beam.seq_id not in used:
                self._drop(group, beam)
        _prune_hypotheses(group)
        running = group.get_seqs(SequenceStatus.RUNNING)
        max_out = self._max_tokens(running[0], sp) if running else 0
        done_length = running and running[0].num_output_tokens >= max_out
        hyps = [s for s in group.seqs if s.status == SequenceStatus.FINISHED_STOPPED]
        if done_length or beam_search.is_done(hyps, running, sp, max_out):
            for seq in running:
                seq.status = SequenceStatus.FINISHED_LENGTH if done_length else SequenceStatus.FINISHED_STOPPED
                if done_length:
                    self._release(seq)
                else:                                        # unfinished beams are not results
                    self._drop(group, seq)
            _prune_hypotheses(group)
            for seq in group.seqs:                           # beams are detokenized once, at the end
                detok = IncrementalDetokenizer(self.tokenizer, seq.prompt_token_ids, sp.skip_special_tokens)
                seq.output_text = detok.step(seq.output_token_ids) + detok.flush()
        if group.first_token_time is None:
            group.first_token_time = time.monotonic()

    def _drop(self, group: SequenceGroup, seq: Sequence) -> None:
        """A beam leaves its group: its blocks are freed."""
        self._release(seq)
        group.remove(seq.seq_id)

    # -- prompt logprobs ---------------------------------------------------------------------------
    def _record_prompt_logprobs(self, batch: list[ScheduledSeq], prompt_logits) -> None:
        for s, logits in zip(batch, prompt_logits):
            if logits is None:
                continue
            group = s.group
            prompt = s.seq.prompt_token_ids
            # NOTE: the scheduler already advanced num_computed_tokens past this chunk.
            start = s.seq.num_computed_tokens - s.num_new_tokens
            if group.prompt_logprobs is None:
                group.prompt_logprobs = [None] * (start + 1)   # first token: nothing predicts it
            # Row i (position start+i) predicts prompt token start+i+1.
            targets = prompt[start + 1:start + s.num_new_tokens + 1]
            if targets:
                _, tops = self.sampler.logprobs(logits[:len(targets)], targets,
                                                group.sampling_params.prompt_logprobs)
                group.prompt_logprobs.extend(tops)


def _finite_candidates(values: np.ndarray, ids: np.ndarray) -> tuple[list, list]:
    """Per beam, its candidates whose logprob is finite (a grammar's forbidden tokens are -inf)."""
    ok = np.isfinite(values)
    return [v[k] for v, k in zip(values, ok)], [i[k] for i, k in zip(ids, ok)]


def _prune_hypotheses(group: SequenceGroup) -> None:
    """Keep the best `width` finished hypotheses of a beam group."""
    sp = group.sampling_params
    done = [s for s in group.seqs if s.finished]
    if len(done) <= sp.best_of:
        return
    done.sort(key=lambda s: beam_search.beam_score(s, sp.length_penalty), reverse=True)
    for s in done[sp.best_of:]:
        group.remove(s.seq_id)


def make_output(group: SequenceGroup) -> RequestOutput:
    """The request's state as vLLM's RequestOutput: the n best sequences once it finished."""
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
