"""LLM: the offline API, in the shape vLLM users know.

    from rawpaged import LLM, SamplingParams
    llm = LLM(model="path/to/hf_dir", device="auto", block_size=16)
    outs = llm.generate(["Once upon a time"], SamplingParams(temperature=0, max_tokens=32))
    outs[0].outputs[0].text

Every option of EngineConfig is a keyword argument.
"""
from __future__ import annotations

from collections.abc import Sequence as Seq

from rawpaged.engine import EngineConfig, LLMEngine
from rawpaged.errors import RawpagedError
from rawpaged.outputs import RequestOutput
from rawpaged.sampling_params import SamplingParams


class LLM:
    def __init__(self, model: str | None = None, **engine_args):
        self.engine = LLMEngine(EngineConfig.from_kwargs(model=None if model is None else str(model),
                                                         **engine_args))
        self._next_id = 0

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    def get_stats(self) -> dict:
        """The engine's statistics (running/waiting/swapped, KV usage, preemptions, prefix hits...)."""
        return self.engine.get_stats()

    def generate(self, prompts: str | Seq[str] | None = None,
                 sampling_params: SamplingParams | Seq[SamplingParams] | None = None,
                 prompt_token_ids: Seq[Seq[int]] | None = None) -> list[RequestOutput]:
        """One RequestOutput per prompt, in order. Requests run with continuous batching.

        Every request is checked before any is queued: a bad one raises and none runs."""
        if isinstance(prompts, str):
            prompts = [prompts]
        if prompts is None and prompt_token_ids is None:
            raise RawpagedError("generate() needs prompts or prompt_token_ids")
        if prompts is not None and prompt_token_ids is not None and len(prompts) != len(prompt_token_ids):
            raise RawpagedError(f"{len(prompts)} prompts but {len(prompt_token_ids)} prompt_token_ids lists")
        n = len(prompts) if prompts is not None else len(prompt_token_ids)
        if sampling_params is None:
            sampling_params = SamplingParams()
        if isinstance(sampling_params, SamplingParams):
            sampling_params = [sampling_params] * n
        if len(sampling_params) != n:
            raise RawpagedError(f"{len(sampling_params)} sampling params for {n} prompts")
        groups = []
        for i in range(n):
            groups.append(self.engine.make_group(
                f"gen-{self._next_id + i}", prompts[i] if prompts is not None else None, sampling_params[i],
                prompt_token_ids=prompt_token_ids[i] if prompt_token_ids is not None else None))
        self._next_id += n
        for group in groups:
            self.engine.enqueue(group)
        return self._run([g.request_id for g in groups])

    def _run(self, ids: list[str]) -> list[RequestOutput]:
        wanted = set(ids)
        done: dict[str, RequestOutput] = {}
        while len(done) < len(ids) and self.engine.has_unfinished_requests():
            for out in self.engine.step():
                if out.finished and out.request_id in wanted:
                    done[out.request_id] = out
        missing = [i for i in ids if i not in done]
        if missing:
            raise RuntimeError(f"engine stopped with unfinished requests {missing}")
        return [done[i] for i in ids]
