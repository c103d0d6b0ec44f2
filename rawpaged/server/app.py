"""The OpenAI-compatible server: Starlette routes on uvicorn, the engine on its own thread.

    POST /v1/completions        prompt(s) -> text, streamed or not
    POST /v1/chat/completions   messages -> chat template -> text, streamed or not
    GET  /v1/models             the one served model
    POST /tokenize              text or messages -> token ids (vLLM's shape)
    POST /detokenize            token ids -> text (vLLM's shape)
    GET  /version               {"version": ...}
    GET  /health                200 while serving, 503 while shutting down
    GET  /metrics               Prometheus text (vLLM's metric names)

Modules: state.py (per-server state, the HTTP plumbing), serving.py (the endpoints), protocol.py
(request validation), limits.py (what a client may cost), logs.py (request lines, the engine line).

Shutdown (SIGINT / SIGTERM, or BackgroundServer.stop): new requests get 503 at once; the requests in
flight run to their end, for at most `drain_timeout_s`, after which they are aborted (their
streams end with finish_reason "abort"); then uvicorn closes the connections and the lifespan stops
the engine thread. A second signal stops waiting.
"""
from __future__ import annotations

import logging
import signal
import socket
import threading
import time
from contextlib import asynccontextmanager

import numpy as np
import uvicorn
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from rawpaged.errors import RawpagedError
from rawpaged.server import limits as L
from rawpaged.server.chat import load_chat_template
from rawpaged.server.logs import LOG_FORMATS, setup_logging
from rawpaged.server.metrics import CONTENT_TYPE
from rawpaged.server.protocol import ApiError
from rawpaged.server.serving import create_chat_completion, create_completion, detokenize, tokenize
from rawpaged.server.state import ServerConfig, ServerState, api, error_response, version_body

__all__ = ["BackgroundServer", "ServerConfig", "build_app", "run_server"]

logger = logging.getLogger("rawpaged.server")

LOG_LEVELS = ("critical", "error", "warning", "info", "debug", "trace")


# -- the small endpoints ----------------------------------------------------------------------
@api("models")
async def list_models(request: Request, state: ServerState, record) -> Response:
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
    return Response(state.metrics.render(), media_type=CONTENT_TYPE)


async def version(request: Request) -> Response:
    return JSONResponse(version_body())


async def http_error(request: Request, exc: HTTPException) -> Response:
    """Unknown routes and wrong methods, in OpenAI's error shape too."""
    return error_response(ApiError(exc.status_code, f"{request.method} {request.url.path[:200]}: {exc.detail}",
                                   code="not_found" if exc.status_code == 404 else None))


def build_app(engine, config: ServerConfig) -> Starlette:
    """The Starlette app around an LLMEngine; the engine thread runs while the app's lifespan does."""
    state = ServerState(engine, config)

    @asynccontextmanager
    async def lifespan(app):
        state.start()
        try:
            yield
        finally:
            await state.stop()

    routes = [
        Route("/v1/completions", create_completion, methods=["POST"]),
        Route("/v1/chat/completions", create_chat_completion, methods=["POST"]),
        Route("/v1/models", list_models, methods=["GET"]),
        Route("/tokenize", tokenize, methods=["POST"]),
        Route("/detokenize", detokenize, methods=["POST"]),
        Route("/version", version, methods=["GET"]),
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


def _uvicorn_config(app, log_level: str, access_log: bool, limits: L.ServerLimits) -> uvicorn.Config:
    # NOTE: after the drain, connections are idle; the grace period only bounds stragglers.
    # log_config=None: uvicorn's loggers propagate to the root handler setup_logging installs.
    # NOTE: loop="asyncio", not uvicorn's "auto": uvloop arrives with ray[serve] and, once installed,
    # "auto" picked it, silently changing what was built and tested here (at the fd limit libuv drops
    # connections without a word where asyncio logs and backs off; the lingering close, the soak).
    return uvicorn.Config(app, loop="asyncio", log_level=log_level, access_log=access_log, lifespan="on",
                          timeout_graceful_shutdown=5, log_config=None, **limits.uvicorn_kwargs())


def server_limits(args) -> L.ServerLimits:
    """The serve flags -> ServerLimits; the connection limit defaults to what the fd limit allows."""
    d = L.ServerLimits()

    def given(name: str, default):
        value = getattr(args, name, None)
        return default if value is None else value

    limits = L.ServerLimits(
        max_body_bytes=given("max_body_bytes", d.max_body_bytes),
        max_prompt_chars=given("max_prompt_chars", d.max_prompt_chars),
        body_timeout_s=given("body_timeout", d.body_timeout_s), header_timeout_s=given("header_timeout", d.header_timeout_s),
        keep_alive_s=given("timeout_keep_alive", d.keep_alive_s), max_header_bytes=given("max_header_bytes", d.max_header_bytes),
        limit_concurrency=given("limit_concurrency", None))
    if limits.limit_concurrency is None:
        limits.limit_concurrency = L.default_concurrency(L.raise_fd_limit())
    flags = {"max_body_bytes": "--max-body-bytes", "max_prompt_chars": "--max-prompt-chars",
             "body_timeout_s": "--body-timeout", "header_timeout_s": "--header-timeout",
             "keep_alive_s": "--timeout-keep-alive", "max_header_bytes": "--max-header-bytes",
             "limit_concurrency": "--limit-concurrency"}
    for name, flag in flags.items():
        value = getattr(limits, name)
        if value is not None and value <= 0:
            raise RawpagedError(f"{flag} must be positive, got {value}")
    return limits


def run_server(args) -> int:
    """`rawpaged serve`: load the engine, log what was loaded, serve until SIGINT/SIGTERM."""
    from rawpaged.engine import EngineConfig, LLMEngine

    level = str(args.log_level).lower()
    if level not in LOG_LEVELS:
        raise RawpagedError(f"--log-level must be one of {', '.join(LOG_LEVELS)}, got {args.log_level!r}")
    log_format = getattr(args, "log_format", "text")
    if log_format not in LOG_FORMATS:
        raise RawpagedError(f"--log-format must be one of {', '.join(LOG_FORMATS)}, got {log_format!r}")
    limits = server_limits(args)
    setup_logging(logging.DEBUG if level == "trace" else getattr(logging, level.upper()), log_format)
    engine = LLMEngine(EngineConfig.from_cli_args(args))
    blocks = engine.cache_size.num_device_blocks
    logger.info("rawpaged serve: model %s on %s (%s), %d KV blocks of %d tokens (%d token slots; %s), "
                "max_model_len %d", args.model, engine.device, np.dtype(engine.dtype).name, blocks,
                engine.config.block_size, blocks * engine.config.block_size, engine.cache_size.why,
                engine.max_model_len)
    config = ServerConfig(served_model_name=args.served_model_name or args.model, api_key=args.api_key,
                          chat_template=load_chat_template(engine.tokenizer, args.chat_template),
                          drain_timeout_s=getattr(args, "drain_timeout", 30.0), limits=limits,
                          stats_log_interval_s=getattr(args, "log_stats_interval", 5.0))
    if config.chat_template is None:
        logger.info("no chat template: /v1/chat/completions answers 400 (use --chat-template FILE)")
    logger.info("limits: body %d bytes (%g s to arrive), prompts %d characters, headers %g s, "
                "%d connections", limits.max_body_bytes, limits.body_timeout_s,
                limits.prompt_chars(engine.max_model_len), limits.header_timeout_s, limits.limit_concurrency)
    sock = bind_socket(args.host, args.port)
    app = build_app(engine, config)
    server = RawpagedServer(_uvicorn_config(app, level, access_log=level in ("debug", "trace"), limits=limits),
                            app.state.rp)
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
        self.server = RawpagedServer(_uvicorn_config(self.app, log_level, access_log=False, limits=config.limits),
                                     self.state)
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
