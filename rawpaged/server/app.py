"""The OpenAI-compatible server: Starlette routes on uvicorn, the engine on its own thread.

    POST /v1/completions        prompt(s) -> text, streamed or not
    POST /v1/chat/completions   messages -> chat template -> text, streamed or not
    GET  /v1/models             the one served model
    GET  /health                200 while serving, 503 while shutting down
    GET  /metrics               Prometheus text

Shutdown (SIGINT / SIGTERM, or BackgroundServer.stop): new requests get 503 at once; the requests in
flight run to their end, for at most `drain_timeout_s`, after which they are aborted (their
streams end with finish_reason "abort"); then uvicorn closes the connections and the lifespan stops
the engine thread. A second signal stops waiting.
"""
from __future__ import annotations

import asyncio
import hmac
import json
import logging
import signal
import socket
import threading
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass

import numpy as np
import uvicorn
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from rawpaged.errors import RawpagedError
from rawpaged.server import protocol, responses as R
from rawpaged.server.async_engine import AsyncEngine, EngineFailed, RequestStream, merge_streams, now
from rawpaged.server.chat import ChatTemplate, load_chat_template, no_template_error
from rawpaged.server.metrics import ServerMetrics
from rawpaged.server.protocol import ApiError, bad_request

logger = logging.getLogger("rawpaged.server")

LOG_LEVELS = ("critical", "error", "warning", "info", "debug", "trace")


@dataclass
class ServerConfig:
    served_model_name: str
    api_key: str | None = None
    chat_template: ChatTemplate | None = None
    drain_timeout_s: float = 30.0        # in-flight requests get this long to finish at shutdown


class ClientGone(Exception):
    """The client disconnected before its (non-streamed) response was ready."""


# -- per-server state -------------------------------------------------------------------------
class ServerState:
    def __init__(self, engine, config: ServerConfig):
        self.config = config
        self.metrics = ServerMetrics()
        self.engine = AsyncEngine(engine, on_finished=self.metrics.on_finished)
        self.tokenizer = engine.tokenizer
        self.token_text = R.TokenText(engine.tokenizer)
        self.max_model_len = engine.max_model_len
        self.vocab_size = engine.model_config.vocab_size
        self.model_path = str(engine.model_config.path)
        self.created = int(time.time())
        self.draining = False

    def admit(self, request: Request) -> None:
        """503 while shutting down, 401 without the right API key."""
        if self.draining:
            raise ApiError(503, "the server is shutting down and takes no new requests",
                           type="service_unavailable_error", code="server_shutting_down")
        key = self.config.api_key
        if key is not None:
            auth = request.headers.get("authorization", "")
            scheme, _, given = auth.partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), key.encode()):
                raise ApiError(401, "missing or incorrect API key: send it as 'Authorization: Bearer <key>'",
                               code="invalid_api_key")

    def check_model(self, model: str | None) -> None:
        if model is not None and model != self.config.served_model_name:
            raise ApiError(404, f"the model {model!r} does not exist; this server serves "
                                f"{self.config.served_model_name!r}", param="model", code="model_not_found")

    def encode_prompt(self, prompt: str | list[int]) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            return prompt, self.tokenizer.encode(prompt)
        protocol.check_token_ids(prompt, self.vocab_size, "prompt")
        return None, list(prompt)

    async def add_all(self, rid: str, prompts: list[tuple[str | None, list[int]]], params,
                      arrival: float) -> list[RequestStream]:
        """One engine request per prompt; if one is refused, the others are aborted."""
        streams: list[RequestStream] = []
        try:
            for i, (text, ids) in enumerate(prompts):
                streams.append(await self.engine.add(f"{rid}-{i}", text, ids, params, arrival))
        except BaseException as e:
            for s in streams:
                self.engine.abort(s.request_id)
            if isinstance(e, RawpagedError):
                raise bad_request(str(e)) from None
            raise
        return streams

    def abort_unfinished(self, streams: list[RequestStream]) -> None:
        for s in streams:
            self.engine.abort(s.request_id)


# -- HTTP plumbing ----------------------------------------------------------------------------
def error_response(e: ApiError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status)


def api(handler):
    """Run a handler: ApiError -> its OpenAI-shaped error, anything else -> 500; count statuses."""
    async def endpoint(request: Request) -> Response:
        state: ServerState = request.app.state.rp
        try:
            response = await handler(request, state)
        except ApiError as e:
            response = error_response(e)
        except ClientGone:
            response = Response(status_code=499)      # nobody reads it: nginx's "client closed"
        except Exception as e:                         # noqa: BLE001 - the server must keep serving
            logger.exception("internal error on %s", request.url.path)
            response = error_response(ApiError(500, f"internal server error: {type(e).__name__}",
                                               type="server_error"))
        state.metrics.on_response(response.status_code)
        return response
    return endpoint


async def read_json(request: Request) -> dict:
    body = await request.body()
    try:
        obj = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise bad_request(f"the request body is not valid JSON: {e}") from None
    if not isinstance(obj, dict):
        raise bad_request(f"the request body must be a JSON object, got {type(obj).__name__}")
    return obj


async def until_disconnect(request: Request, coro):
    """Await coro, unless the client disconnects first (then coro is cancelled: ClientGone)."""
    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    work, gone = asyncio.ensure_future(coro), asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not work.done():
            work.cancel()
    if not work.done() or work.cancelled():
        raise ClientGone()
    return work.result()


class EventStream(StreamingResponse):
    """Server-sent events; `on_close` runs however the response ends (done, disconnect, error).

    NOTE: Starlette cancels the body iterator when the client disconnects (ASGI spec < 2.4) or
    raises on the next write (>= 2.4); either way on_close aborts the requests still running,
    which frees their KV blocks.
    """

    def __init__(self, events, on_close):
        super().__init__(events, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.on_close = on_close

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.on_close()


def sse_error(e: Exception) -> str:
    err = e if isinstance(e, ApiError) else ApiError(500, str(e), type="server_error")
    return R.sse(err.body())


def check_refused(out) -> None:
    if out.error is not None:
        raise bad_request(out.error)


# -- /v1/completions --------------------------------------------------------------------------
@api
async def create_completion(request: Request, state: ServerState) -> Response:
    state.admit(request)
    req = protocol.parse_completion(await read_json(request))
    state.check_model(req.model)
    protocol.check_vocab(req.params, state.vocab_size)
    arrival = now()
    prompts = [state.encode_prompt(p) for p in req.prompts]
    for _, ids in prompts:
        protocol.check_length(len(ids), req.params.max_tokens, state.max_model_len)
    rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
    streams = await until_disconnect(request, state.add_all(rid, prompts, req.params, arrival))
    job = _Job(state, rid, created, prompts, streams)
    if req.stream:
        return EventStream(_completion_events(job, req), lambda: state.abort_unfinished(streams))
    try:
        outs = await until_disconnect(request, _finals(streams))
    finally:
        state.abort_unfinished(streams)
    return JSONResponse(_completion_result(job, req, outs))


@dataclass
class _Job:
    state: ServerState
    rid: str
    created: int
    prompts: list[tuple[str | None, list[int]]]
    streams: list[RequestStream]

    @property
    def model(self) -> str:
        return self.state.config.served_model_name

    def prompt_text(self, i: int) -> str:
        text, ids = self.prompts[i]
        return text if text is not None else self.state.tokenizer.decode(ids)

    def prompt_tokens(self) -> int:
        return sum(len(ids) for _, ids in self.prompts)


async def _finals(streams: list[RequestStream]):
    outs = [await s.final() for s in streams]
    for out in outs:
        check_refused(out)
    return outs


def _completion_result(job: _Job, req: protocol.CompletionRequest, outs) -> dict:
    tt, n = job.state.token_text, req.params.n
    choices, completion_tokens = [], 0
    for i, out in enumerate(outs):
        _, ids = job.prompts[i]
        prefix = job.prompt_text(i) if req.echo else ""
        for o in out.outputs:
            completion_tokens += len(o.token_ids)
            lp = None
            if req.logprobs is not None:
                lp = R.completion_logprobs(tt, ids, o.token_ids, o.logprobs, len(prefix))
                if req.echo:
                    lp = R.merge_logprobs(R.completion_logprobs(tt, [], ids, out.prompt_logprobs, 0), lp)
            choices.append(R.completion_choice(i * n + o.index, prefix + o.text, lp, o.finish_reason,
                                               o.stop_reason))
    return R.completion_body(job.rid, job.created, job.model, choices,
                             R.usage(job.prompt_tokens(), completion_tokens))


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


async def _completion_events(job: _Job, req: protocol.CompletionRequest):
    tt, n = job.state.token_text, req.params.n
    cursors: dict[int, _Cursor] = {}
    completion_tokens = 0
    try:
        async for i, out in merge_streams(job.streams):
            check_refused(out)
            _, ids = job.prompts[i]
            for o in out.outputs:
                c = cursors.setdefault(i * n + o.index, _Cursor())
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
                    yield R.sse(R.completion_chunk(job.rid, job.created, job.model, R.completion_choice(
                        i * n + o.index, text, lp, o.finish_reason, o.stop_reason)))
                completion_tokens += c.advance(o)
    except (ApiError, EngineFailed) as e:
        yield sse_error(e)
    if req.include_usage:
        yield R.sse({"id": job.rid, "object": "text_completion", "created": job.created, "model": job.model,
                     "choices": [], "usage": R.usage(job.prompt_tokens(), completion_tokens)})
    yield R.SSE_DONE


# -- /v1/chat/completions ---------------------------------------------------------------------
@api
async def create_chat_completion(request: Request, state: ServerState) -> Response:
    state.admit(request)
    req = protocol.parse_chat(await read_json(request))
    state.check_model(req.model)
    protocol.check_vocab(req.params, state.vocab_size)
    template = state.config.chat_template
    if template is None:
        raise no_template_error(state.config.served_model_name)
    arrival = now()
    text = template.render(req.messages, req.add_generation_prompt, **req.extra_template_kwargs)
    # NOTE: the template writes its own special tokens (transformers does not add any either).
    ids = state.tokenizer.encode(text, add_special_tokens=False)
    protocol.check_length(len(ids), req.params.max_tokens, state.max_model_len, what="messages")
    rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
    streams = await until_disconnect(request, state.add_all(rid, [(text, ids)], req.params, arrival))
    job = _Job(state, rid, created, [(text, ids)], streams)
    if req.stream:
        return EventStream(_chat_events(job, req), lambda: state.abort_unfinished(streams))
    try:
        (out,) = await until_disconnect(request, _finals(streams))
    finally:
        state.abort_unfinished(streams)
    choices = []
    for o in out.outputs:
        lp = R.chat_logprobs(state.token_text, ids, o.token_ids, o.logprobs, req.top_logprobs) \
            if req.logprobs else None
        choices.append(R.chat_choice(o.index, o.text, lp, o.finish_reason, o.stop_reason))
    use = R.usage(len(ids), sum(len(o.token_ids) for o in out.outputs))
    return JSONResponse(R.chat_body(rid, created, job.model, choices, use))


async def _chat_events(job: _Job, req: protocol.ChatRequest):
    tt = job.state.token_text
    _, ids = job.prompts[0]
    cursors: dict[int, _Cursor] = {}
    completion_tokens = 0
    try:
        async for _, out in merge_streams(job.streams):
            check_refused(out)
            for o in out.outputs:
                c = cursors.setdefault(o.index, _Cursor())
                if c.skips(o):
                    continue
                text = o.text[c.chars:]
                delta = {"role": "assistant", "content": text} if not c.started else \
                    ({"content": text} if text else {})
                lp = None
                if req.logprobs and len(o.token_ids) > c.tokens:
                    lp = R.chat_logprobs(tt, ids + o.token_ids[:c.tokens], o.token_ids[c.tokens:],
                                         (o.logprobs or [])[c.tokens:], req.top_logprobs)
                if delta or lp is not None or o.finish_reason is not None:
                    yield R.sse(R.chat_chunk(job.rid, job.created, job.model, [R.chat_delta_choice(
                        o.index, delta, lp, o.finish_reason, o.stop_reason)]))
                completion_tokens += c.advance(o)
    except (ApiError, EngineFailed) as e:
        yield sse_error(e)
    if req.include_usage:
        yield R.sse(R.chat_chunk(job.rid, job.created, job.model, [], R.usage(len(ids), completion_tokens)))
    yield R.SSE_DONE


# -- the rest ---------------------------------------------------------------------------------
@api
async def list_models(request: Request, state: ServerState) -> Response:
    state.admit(request)
    card = {"id": state.config.served_model_name, "object": "model", "created": state.created,
            "owned_by": "rawpaged", "root": state.model_path, "max_model_len": state.max_model_len}
    return JSONResponse({"object": "list", "data": [card]})


async def health(request: Request) -> Response:
    state: ServerState = request.app.state.rp
    if state.draining or not state.engine.is_alive:
        return Response(status_code=503)
    return Response(status_code=200)


async def metrics(request: Request) -> Response:
    state: ServerState = request.app.state.rp
    return PlainTextResponse(state.metrics.render(state.engine.stats),
                             media_type="text/plain; version=0.0.4; charset=utf-8")


async def http_error(request: Request, exc: HTTPException) -> Response:
    """Unknown routes and wrong methods, in OpenAI's error shape too."""
    return error_response(ApiError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}",
                                   code="not_found" if exc.status_code == 404 else None))


def build_app(engine, config: ServerConfig) -> Starlette:
    """The Starlette app around an LLMEngine; the engine thread runs while the app's lifespan does."""
    state = ServerState(engine, config)

    @asynccontextmanager
    async def lifespan(app):
        state.engine.start()
        try:
            yield
        finally:
            await state.engine.shutdown()

    routes = [
        Route("/v1/completions", create_completion, methods=["POST"]),
        Route("/v1/chat/completions", create_chat_completion, methods=["POST"]),
        Route("/v1/models", list_models, methods=["GET"]),
        Route("/health", health, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
    ]
    app = Starlette(routes=routes, lifespan=lifespan, exception_handlers={HTTPException: http_error})
    app.state.rp = state
    return app


# -- uvicorn with a graceful drain ------------------------------------------------------------
class RawpagedServer(uvicorn.Server):
    """uvicorn.Server whose first SIGINT/SIGTERM drains: 503 for new requests, in-flight ones finish
    (aborted after the drain timeout), then uvicorn's own shutdown. A second signal stops waiting."""

    def __init__(self, config: uvicorn.Config, state: ServerState):
        super().__init__(config)
        self.state = state
        self._deadline: float | None = None
        self._aborted = False

    async def startup(self, sockets=None) -> None:
        await super().startup(sockets=sockets)
        if self.started and sockets:
            # NOTE: uvicorn logs its address only for sockets it bound itself.
            host, port = sockets[0].getsockname()[:2]
            logger.info("running on http://%s:%d (Ctrl+C to stop)", host if ":" not in host else f"[{host}]", port)

    def handle_exit(self, sig, frame) -> None:
        if self.state.draining:
            super().handle_exit(sig, frame)
            return
        self.begin_drain(signal.Signals(sig).name)

    def begin_drain(self, why: str = "stop requested") -> None:
        """Thread-safe: the event loop's next tick (every 0.1 s) carries it on."""
        if self.state.draining:
            return
        self._deadline = time.monotonic() + self.state.config.drain_timeout_s
        self.state.draining = True
        logger.info("shutting down (%s): refusing new requests, %d in flight get %.0f s to finish",
                    why, self.state.engine.num_in_flight, self.state.config.drain_timeout_s)

    async def on_tick(self, counter: int) -> bool:
        if self.state.draining and not self.should_exit:
            engine = self.state.engine
            if engine.num_in_flight == 0:
                self.should_exit = True
            elif not self._aborted and time.monotonic() >= self._deadline:
                logger.warning("drain timeout: aborting %d requests still in flight", engine.num_in_flight)
                engine.abort_all()
                self._aborted = True
        return await super().on_tick(counter)


def bind_socket(host: str, port: int) -> socket.socket:
    """Bind before uvicorn starts, so a busy port is a one-line error (and port 0 picks a free one)."""
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except OSError as e:
        raise RawpagedError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    sock.set_inheritable(True)
    return sock


def _uvicorn_config(app, log_level: str, access_log: bool) -> uvicorn.Config:
    # NOTE: after the drain, connections are idle; the grace period only bounds stragglers.
    return uvicorn.Config(app, log_level=log_level, access_log=access_log, lifespan="on",
                          timeout_graceful_shutdown=5)


def run_server(args) -> int:
    """`rawpaged serve`: load the engine, log what was loaded, serve until SIGINT/SIGTERM."""
    from rawpaged.engine import EngineConfig, LLMEngine

    level = str(args.log_level).lower()
    if level not in LOG_LEVELS:
        raise RawpagedError(f"--log-level must be one of {', '.join(LOG_LEVELS)}, got {args.log_level!r}")
    logging.basicConfig(level=logging.DEBUG if level == "trace" else level.upper(),
                        format="%(levelname)s:     %(message)s")
    engine = LLMEngine(EngineConfig.from_cli_args(args))
    blocks = engine.cache_size.num_device_blocks
    logger.info("rawpaged serve: model %s on %s (%s), %d KV blocks of %d tokens (%d token slots; %s), "
                "max_model_len %d", args.model, engine.device, np.dtype(engine.dtype).name, blocks,
                engine.config.block_size, blocks * engine.config.block_size, engine.cache_size.why,
                engine.max_model_len)
    config = ServerConfig(served_model_name=args.served_model_name or args.model, api_key=args.api_key,
                          chat_template=load_chat_template(engine.tokenizer, args.chat_template))
    if config.chat_template is None:
        logger.info("no chat template: /v1/chat/completions answers 400 (use --chat-template FILE)")
    sock = bind_socket(args.host, args.port)
    app = build_app(engine, config)
    server = RawpagedServer(_uvicorn_config(app, level, access_log=level in ("debug", "trace")), app.state.rp)
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()
    return 0


class BackgroundServer:
    """A server on a thread of its own, on 127.0.0.1 and a free port (tests, benchmarks).

        with BackgroundServer(engine, ServerConfig("m")) as srv:
            httpx.get(srv.url + "/health")
    """

    def __init__(self, engine, config: ServerConfig, host: str = "127.0.0.1", port: int = 0,
                 log_level: str = "warning"):
        self.sock = bind_socket(host, port)
        self.url = f"http://{host}:{self.sock.getsockname()[1]}"
        self.app = build_app(engine, config)
        self.state: ServerState = self.app.state.rp
        self.server = RawpagedServer(_uvicorn_config(self.app, log_level, access_log=False), self.state)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]},
                                       name="rawpaged-uvicorn", daemon=True)

    def start(self, timeout: float = 30.0) -> "BackgroundServer":
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"server at {self.url} did not start within {timeout} s")
            time.sleep(0.02)
        return self

    def stop(self, timeout: float = 30.0) -> None:
        self.server.begin_drain("stop()")
        self.thread.join(timeout)
        self.sock.close()
        if self.thread.is_alive():
            raise RuntimeError(f"server at {self.url} did not stop within {timeout} s")

    def __enter__(self) -> "BackgroundServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
