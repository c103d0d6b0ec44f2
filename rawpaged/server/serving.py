"""The OpenAI endpoints (/v1/completions, /v1/chat/completions) and vLLM's /tokenize, /detokenize.

Each handler: read the body (event loop), then parse + validate + template + tokenize in ONE hop to
a worker thread, queue the engine requests, and build the answer on a worker thread too (a streamed
answer builds each step's chunks there when they carry logprobs; plain text deltas are cheap).
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field, replace

from starlette.requests import Request
from starlette.responses import Response

from rawpaged.server import protocol, responses as R, tools
from rawpaged.server.async_engine import EngineFailed, RequestStream, merge_streams, now
from rawpaged.server.chat import no_template_error
from rawpaged.server.logs import RequestRecord
from rawpaged.server.protocol import ApiError, bad_request
from rawpaged.structured_output import GrammarError
from rawpaged.server.state import (EventStream, ServerState, api, json_bytes, json_response, read_json,
                                   until_disconnect)

logger = logging.getLogger("rawpaged.server")


@dataclass
class _Job:
    """One API request's engine requests and what its answer has said so far."""
    state: ServerState
    rid: str
    created: int
    prompts: list[tuple[str | None, list[int]]]
    streams: list[RequestStream]
    record: RequestRecord
    heavy: bool = False                 # build stream chunks on a worker thread (logprobs)
    completion_tokens: int = 0
    done: bool = False                  # the stream reached its end
    cursors: dict = field(default_factory=dict)
    tool_streams: dict = field(default_factory=dict)     # choice index -> tools.ToolStream

    @property
    def model(self) -> str:
        return self.state.config.served_model_name

    def prompt_text(self, i: int) -> str:
        text, ids = self.prompts[i]
        return text if text is not None else self.state.tokenizer.decode(ids)

    def prompt_tokens(self) -> int:
        return sum(len(ids) for _, ids in self.prompts)

    def seen(self, out) -> None:
        """Note the time to first token for the request's log line."""
        m = out.metrics or {}
        if self.record.ttft_s is None and m.get("first_token_time") is not None:
            self.record.ttft_s = m["first_token_time"] - m["arrival_time"]

    async def build(self, fn, *args):
        return await self.state.offload(fn, *args) if self.heavy else fn(*args)

    def close(self) -> None:
        """The stream ended, however: free what still runs; the log line counts what was sent."""
        self.state.abort_unfinished(self.streams)
        if self.record.completion_tokens is None:
            self.record.completion_tokens = sum(c.tokens for c in self.cursors.values())


def _log_ignored(record: RequestRecord, names: list[str]) -> None:
    if names:
        logger.debug("%s: ignoring field(s) %s (accepted, no effect here)", record.request_id, ", ".join(names))


async def _finals(streams: list[RequestStream]):
    outs = [await s.final() for s in streams]
    for out in outs:
        check_refused(out)
    return outs


def check_refused(out) -> None:
    if out.error is not None:
        raise bad_request(out.error)


def sse_error(e: Exception) -> str:
    err = e if isinstance(e, ApiError) else ApiError(500, str(e), type="server_error")
    return R.sse(err.body())


@dataclass
class _Cursor:
    """What one choice has streamed so far."""
    chars: int = 0            # of the output text
    tokens: int = 0           # of the output token ids
    offset: int = 0           # logprobs text_offset reached
    started: bool = False
    done: bool = False

    def skips(self, o) -> bool:
        # NOTE: nothing to say before the first token (the prefill may still be running).
        return self.done or (not o.token_ids and o.finish_reason is None)

    def advance(self, o) -> int:
        """Record what of output `o` was streamed; its token count once it finished, else 0."""
        self.chars, self.tokens, self.started = len(o.text), len(o.token_ids), True
        self.done = o.finish_reason is not None
        return len(o.token_ids) if self.done else 0


async def _stream_events(job: _Job, include_usage: bool, chunks_of, usage_chunk):
    """The SSE body shared by both endpoints: chunks per engine output, usage, [DONE]."""
    try:
        async for i, out in merge_streams(job.streams):
            check_refused(out)
            job.seen(out)
            for chunk in await job.build(chunks_of, i, out):
                yield chunk
    except (ApiError, EngineFailed) as e:
        job.record.error = str(e)
        yield sse_error(e)
    job.record.completion_tokens = job.completion_tokens
    if include_usage:
        yield R.sse(usage_chunk(R.usage(job.prompt_tokens(), job.completion_tokens)))
    job.done = True
    yield R.SSE_DONE


def _prepare_constraint(state: ServerState, params, constraint) -> None:
    """Worker thread: the grammar engine's matcher for the request, built (and cached) here rather
    than on the engine thread; 400 naming the field if this tokenizer cannot run it."""
    if params.structured_outputs is None:
        return
    try:
        state.grammars.prepare(params.structured_outputs)
    except GrammarError as e:
        raise bad_request(constraint.rename(str(e)), constraint.param) from None


# -- /v1/completions --------------------------------------------------------------------------
def _prepare_completion(state: ServerState, body: dict):
    """Worker thread: the request, its prompts tokenized and checked against the context length."""
    req = protocol.parse_completion(body, state.prompt_chars)
    state.check_model(req.model)
    protocol.check_vocab(req.params, state.vocab_size)
    _prepare_constraint(state, req.params, req.constraint)
    prompts = []
    for p in req.prompts:
        if isinstance(p, str):
            text, ids = p, state.tokenizer.encode(p, add_special_tokens=req.add_special_tokens)
        else:
            protocol.check_token_ids(p, state.vocab_size, "prompt")
            text, ids = None, list(p)
        protocol.check_length(len(ids), req.params.max_tokens, state.max_model_len)
        prompts.append((text, ids))
    return req, prompts


@api("cmpl")
async def create_completion(request: Request, state: ServerState, record: RequestRecord) -> Response:
    state.admit(request)
    body = await read_json(request, state)
    arrival = now()
    req, prompts = await state.offload(_prepare_completion, state, body)
    _log_ignored(record, req.ignored)
    record.prompt_tokens = sum(len(ids) for _, ids in prompts)
    streams = await until_disconnect(request, state.add_all(record.request_id, prompts, req.params, arrival))
    job = _Job(state, record.request_id, int(time.time()), prompts, streams, record,
               heavy=req.logprobs is not None)
    if req.stream:
        events = _stream_events(job, req.include_usage, lambda i, out: _completion_chunks(job, req, i, out),
                                lambda use: {"id": job.rid, "object": "text_completion", "created": job.created,
                                             "model": job.model, "choices": [], "usage": use})
        return EventStream(events, job.close, lambda: job.done)
    try:
        outs = await until_disconnect(request, _finals(streams))
    finally:
        state.abort_unfinished(streams)
    for out in outs:
        job.seen(out)
    return json_response(await state.offload(_completion_result, job, req, outs))


def _visible(req: protocol.CompletionRequest, o):
    """An output as the client sees it: with echo and max_tokens 0, the sampled token is dropped."""
    if not req.prompt_only:
        return o
    finish = "length" if o.finish_reason in ("stop", "length") else o.finish_reason
    return replace(o, text="", token_ids=[], logprobs=[] if o.logprobs is not None else None,
                   finish_reason=finish, stop_reason=None)


def _completion_result(job: _Job, req: protocol.CompletionRequest, outs) -> bytes:
    tt, n = job.state.token_text, req.params.n
    choices, completion_tokens = [], 0
    for i, out in enumerate(outs):
        _, ids = job.prompts[i]
        prefix = job.prompt_text(i) if req.echo else ""
        for o in map(lambda o: _visible(req, o), out.outputs):
            completion_tokens += len(o.token_ids)
            lp = None
            if req.logprobs is not None:
                lp = R.completion_logprobs(tt, ids, o.token_ids, o.logprobs, len(prefix))
                if req.echo:
                    lp = R.merge_logprobs(R.completion_logprobs(tt, [], ids, out.prompt_logprobs, 0), lp)
            choices.append(R.completion_choice(i * n + o.index, prefix + o.text, lp, o.finish_reason,
                                               o.stop_reason))
    job.record.completion_tokens = completion_tokens
    return json_bytes(R.completion_body(job.rid, job.created, job.model, choices,
                                        R.usage(job.prompt_tokens(), completion_tokens)))


def _completion_chunks(job: _Job, req: protocol.CompletionRequest, i: int, out) -> list[str]:
    """The SSE chunks one engine output adds to the stream (each choice's new text / logprobs)."""
    tt, n = job.state.token_text, req.params.n
    _, ids = job.prompts[i]
    chunks = []
    for o in map(lambda o: _visible(req, o), out.outputs):
        c = job.cursors.setdefault(i * n + o.index, _Cursor())
        if c.skips(o):
            continue
        text, lp = o.text[c.chars:], None
        if not c.started and req.echo:
            prefix = job.prompt_text(i)
            text = prefix + text
            if req.logprobs is not None:
                lp = R.completion_logprobs(tt, [], ids, out.prompt_logprobs, 0)
            c.offset = len(prefix)
        if req.logprobs is not None:
            new = R.completion_logprobs(tt, ids + o.token_ids[:c.tokens], o.token_ids[c.tokens:],
                                        (o.logprobs or [])[c.tokens:], c.offset)
            c.offset += sum(len(t) for t in new["tokens"])
            lp = R.merge_logprobs(lp, new)
        new_tokens = len(o.token_ids) > c.tokens
        if text or o.finish_reason is not None or (lp is not None and new_tokens):
            chunks.append(R.sse(R.completion_chunk(job.rid, job.created, job.model, R.completion_choice(
                i * n + o.index, text, lp, o.finish_reason, o.stop_reason))))
        job.completion_tokens += c.advance(o)
    return chunks


# -- /v1/chat/completions ---------------------------------------------------------------------
def _render_chat(state: ServerState, messages, add_generation_prompt: bool, add_special_tokens: bool,
                 kwargs: dict) -> tuple[str, list[int]]:
    template = state.config.chat_template
    if template is None:
        raise no_template_error(state.config.served_model_name)
    text = template.render(messages, add_generation_prompt, max_chars=state.prompt_chars, **kwargs)
    # NOTE: the template writes its own special tokens (transformers does not add any either).
    return text, state.tokenizer.encode(text, add_special_tokens=add_special_tokens)


def _prepare_chat(state: ServerState, body: dict):
    """Worker thread: the request, its chat rendered, tokenized and checked."""
    req = protocol.parse_chat(body, state.prompt_chars)
    state.check_model(req.model)
    protocol.check_vocab(req.params, state.vocab_size)
    _check_tool_template(state, req)
    _prepare_constraint(state, req.params, req.constraint)
    text, ids = _render_chat(state, req.messages, req.add_generation_prompt, req.add_special_tokens,
                             req.template_kwargs)
    protocol.check_length(len(ids), req.params.max_tokens, state.max_model_len, what="messages")
    return req, text, ids


@api("chatcmpl")
async def create_chat_completion(request: Request, state: ServerState, record: RequestRecord) -> Response:
    state.admit(request)
    body = await read_json(request, state)
    arrival = now()
    req, text, ids = await state.offload(_prepare_chat, state, body)
    _log_ignored(record, req.ignored)
    record.prompt_tokens = len(ids)
    streams = await until_disconnect(request, state.add_all(record.request_id, [(text, ids)], req.params, arrival))
    job = _Job(state, record.request_id, int(time.time()), [(text, ids)], streams, record, heavy=req.logprobs)
    if req.stream:
        events = _stream_events(job, req.include_usage, lambda i, out: _chat_chunks(job, req, out),
                                lambda use: R.chat_chunk(job.rid, job.created, job.model, [], use))
        return EventStream(events, job.close, lambda: job.done)
    try:
        (out,) = await until_disconnect(request, _finals(streams))
    finally:
        state.abort_unfinished(streams)
    job.seen(out)
    return json_response(await state.offload(_chat_result, job, req, out))


def _check_tool_template(state: ServerState, req: protocol.ChatRequest) -> None:
    """tool_choice "auto" reads calls the model writes on its own: its template must show it the tools."""
    template = state.config.chat_template
    if req.tool_calling is not None and req.tools.choice == "auto" and template is not None \
            and not template.takes_tools:
        raise bad_request(f"tool_choice 'auto' needs a chat template that renders tools; the template of "
                          f"{state.config.served_model_name!r} does not (use tool_choice 'required' or a "
                          "named function, or start the server with --chat-template FILE)", "tool_choice")


def _tool_finish(finish_reason: str | None, called: bool) -> str | None:
    """A choice that made tool calls and stopped finishes with "tool_calls" (OpenAI's clients look)."""
    return "tool_calls" if called and finish_reason == "stop" else finish_reason


def _chat_result(job: _Job, req: protocol.ChatRequest, out) -> bytes:
    _, ids = job.prompts[0]
    choices = []
    for o in out.outputs:
        lp = R.chat_logprobs(job.state.token_text, ids, o.token_ids, o.logprobs, req.top_logprobs) \
            if req.logprobs else None
        if req.tool_calling is not None:
            content, calls = tools.extract(req.tool_calling, o.text)
            choices.append(R.chat_choice(o.index, content, lp, _tool_finish(o.finish_reason, bool(calls)),
                                         o.stop_reason, tool_calls=[c.as_dict() for c in calls]))
            continue
        choices.append(R.chat_choice(o.index, o.text, lp, o.finish_reason, o.stop_reason))
    job.record.completion_tokens = sum(len(o.token_ids) for o in out.outputs)
    use = R.usage(len(ids), job.record.completion_tokens)
    return json_bytes(R.chat_body(job.rid, job.created, job.model, choices, use))


def _chat_chunks(job: _Job, req: protocol.ChatRequest, out) -> list[str]:
    tt = job.state.token_text
    _, ids = job.prompts[0]
    chunks = []
    for o in out.outputs:
        c = job.cursors.setdefault(o.index, _Cursor())
        if c.skips(o):
            continue
        lp = None
        if req.logprobs and len(o.token_ids) > c.tokens:
            lp = R.chat_logprobs(tt, ids + o.token_ids[:c.tokens], o.token_ids[c.tokens:],
                                 (o.logprobs or [])[c.tokens:], req.top_logprobs)
        if req.tool_calling is not None:
            chunks += _tool_chunks(job, req, o, c, lp)
        else:
            text = o.text[c.chars:]
            delta = {"role": "assistant", "content": text} if not c.started else ({"content": text} if text else {})
            if delta or lp is not None or o.finish_reason is not None:
                chunks.append(R.sse(R.chat_chunk(job.rid, job.created, job.model, [R.chat_delta_choice(
                    o.index, delta, lp, o.finish_reason, o.stop_reason)])))
        job.completion_tokens += c.advance(o)
    return chunks


def _tool_chunks(job: _Job, req: protocol.ChatRequest, o, c: _Cursor, lp) -> list[str]:
    """One choice's chunks under tool calling: content and tool-call deltas (tools.ToolStream), the
    first with the role, the logprobs on the first chunk of the step, the finish on the last."""
    stream = job.tool_streams.setdefault(o.index, tools.ToolStream(req.tool_calling))
    deltas = stream.feed(o.text, o.finish_reason is not None)
    if not c.started:
        deltas = [{"role": "assistant", **(deltas[0] if deltas else {})}] + deltas[1:]
    if not deltas and (lp is not None or o.finish_reason is not None):
        deltas = [{}]
    finish = _tool_finish(o.finish_reason, stream.called)
    last = len(deltas) - 1
    return [R.sse(R.chat_chunk(job.rid, job.created, job.model, [R.chat_delta_choice(
        o.index, delta, lp if i == 0 else None, finish if i == last else None,
        o.stop_reason if i == last else None)])) for i, delta in enumerate(deltas)]


# -- /tokenize, /detokenize (vLLM's extension) ------------------------------------------------
def _tokenize(state: ServerState, body: dict) -> bytes:
    req = protocol.parse_tokenize(body, state.prompt_chars)
    state.check_model(req.model)
    if req.messages is not None:
        _, ids = _render_chat(state, req.messages, req.add_generation_prompt, req.add_special_tokens,
                              req.template_kwargs)
    else:
        ids = state.tokenizer.encode(req.prompt, add_special_tokens=req.add_special_tokens)
    strs = state.tokenizer.convert_ids_to_tokens(ids) if req.return_token_strs else None
    return json_bytes({"count": len(ids), "max_model_len": state.max_model_len, "tokens": ids, "token_strs": strs})


@api("tokenize")
async def tokenize(request: Request, state: ServerState, record: RequestRecord) -> Response:
    state.admit(request)
    body = await read_json(request, state)
    return json_response(await state.offload(_tokenize, state, body))


def _detokenize(state: ServerState, body: dict) -> bytes:
    model, ids = protocol.parse_detokenize(body, state.vocab_size)
    state.check_model(model)
    return json_bytes({"prompt": state.tokenizer.decode(ids, skip_special_tokens=False)})


@api("detokenize")
async def detokenize(request: Request, state: ServerState, record: RequestRecord) -> Response:
    state.admit(request)
    body = await read_json(request, state)
    return json_response(await state.offload(_detokenize, state, body))
