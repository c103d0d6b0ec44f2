"""Per-server state and the HTTP plumbing every API endpoint shares.

Nothing heavy runs on the event loop: it reads bodies, awaits engine outputs and writes bytes.
JSON parsing, validation, chat templating, tokenization and response building run on a small pool
of worker threads (`ServerState.offload`), so /health, /metrics and the other streams stay
responsive while one request parses megabytes or builds a 30 MB logprobs answer.
(NOTE: a worker thread helps only while the work lets go of the GIL now and then; pure-Python work
does, every few milliseconds, and so does the tokenizer's batch entry point; see
rawpaged/server/limits.py for the bounds that keep any single piece of work short.)
"""
from __future__ import annotations

import asyncio
import functools
import hmac
import json
import logging
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

import rawpaged
from rawpaged.errors import RawpagedError
from rawpaged.server import responses as R
from rawpaged.server.async_engine import AsyncEngine, RequestStream
from rawpaged.server.chat import ChatTemplate
from rawpaged.server.limits import ClientGone, ServerLimits, read_body
from rawpaged.server.logs import RequestRecord, StatsLogger
from rawpaged.server.metrics import ServerMetrics
from rawpaged.server.protocol import ApiError, bad_request, parse_json_body

logger = logging.getLogger("rawpaged.server")


@dataclass
class ServerConfig:
    served_model_name: str
    api_key: str | None = None
    chat_template: ChatTemplate | None = None
    drain_timeout_s: float = 30.0        # in-flight requests get this long to finish at shutdown
    limits: ServerLimits = field(default_factory=ServerLimits)
    stats_log_interval_s: float = 5.0    # the periodic engine log line (0: never)
    workers: int = 4                     # threads for parsing, templating, tokenizing, building responses


class ServerState:
    def __init__(self, engine, config: ServerConfig):
        self.config = config
        self.engine = AsyncEngine(engine)
        self.metrics = ServerMetrics(
            config.served_model_name, lambda: self.engine.stats, block_size=engine.config.block_size,
            max_model_len=engine.max_model_len,
            cache_info={"block_size": engine.config.block_size, "num_gpu_blocks": engine.cache_size.num_device_blocks,
                        "num_cpu_blocks": self.engine.stats.get("num_cpu_blocks", 0),
                        "enable_prefix_caching": engine.config.enable_prefix_caching})
        self.engine.observer = self.metrics
        self.stats_logger = StatsLogger(lambda: self.engine.stats, config.stats_log_interval_s)
        self.tokenizer = engine.tokenizer
        self.token_text = R.TokenText(engine.tokenizer)
        self.max_model_len = engine.max_model_len
        self.vocab_size = engine.model_config.vocab_size
        self.grammars = engine.grammars          # structured outputs: matchers built on worker threads
        self.model_path = str(engine.model_config.path)
        self.prompt_chars = config.limits.prompt_chars(engine.max_model_len)
        self.created = int(time.time())
        self.draining = False
        self.pool = ThreadPoolExecutor(max_workers=config.workers, thread_name_prefix="rawpaged-work")

    # -- lifecycle (the app's lifespan) -----------------------------------------------------
    def start(self) -> None:
        self.engine.start()
        self.stats_logger.start()

    async def stop(self) -> None:
        self.stats_logger.stop()
        await self.engine.shutdown()
        self.pool.shutdown(wait=False, cancel_futures=True)

    # -- requests ---------------------------------------------------------------------------
    async def offload(self, fn, *args):
        """fn(*args) on a worker thread (off the event loop)."""
        return await asyncio.get_running_loop().run_in_executor(self.pool, functools.partial(fn, *args))

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
            raise ApiError(404, f"the model {model[:100]!r} does not exist; this server serves "
                                f"{self.config.served_model_name!r}", param="model", code="model_not_found")

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
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)


def json_bytes(obj) -> bytes:
    """What JSONResponse would send; built on a worker thread for large bodies."""
    return json.dumps(obj, ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode("utf-8")


def json_response(payload: bytes) -> Response:
    return Response(payload, media_type="application/json")


def _client(request: Request) -> str:
    c = request.client
    return f"{c.host}:{c.port}" if c else "-"


def api(prefix: str):
    """An API endpoint: a request id, ApiError -> its OpenAI-shaped error, anything else -> 500,
    status counts, and the request's one log line (when its response, or its stream, ends).

        @api("cmpl")
        async def handler(request, state, record) -> Response
    """
    def wrap(handler):
        @functools.wraps(handler)
        async def endpoint(request: Request) -> Response:
            state: ServerState = request.app.state.rp
            record = RequestRecord(request.method, request.url.path, _client(request),
                                   request_id=f"{prefix}-{uuid.uuid4().hex}")
            try:
                response = await handler(request, state, record)
            except ApiError as e:
                record.error = e.message
                response = error_response(e)
            except ClientGone:
                record.error = "client disconnected"
                response = Response(status_code=499)      # nobody reads it: nginx's "client closed"
            except Exception as e:                         # noqa: BLE001 - the server must keep serving
                logger.exception("internal error in %s on %s", record.request_id, request.url.path)
                record.error = f"internal server error: {type(e).__name__}"
                response = error_response(ApiError(500, record.error, type="server_error"))
            state.metrics.on_response(response.status_code)
            response.headers.setdefault("x-request-id", record.request_id)
            if isinstance(response, EventStream):
                response.record = record                   # its line is written when the stream ends
            else:
                record.log(response.status_code)
            return response
        return endpoint
    return wrap


async def read_json(request: Request, state: ServerState) -> dict:
    """The body (size and time limits on the loop: that is I/O), parsed on a worker thread."""
    body = await read_body(request, state.config.limits)
    return await state.offload(parse_json_body, body)


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
    """Server-sent events; `on_close` runs however the response ends (done, disconnect, error),
    then the request's log line is written.

    NOTE: Starlette cancels the body iterator when the client disconnects (ASGI spec < 2.4) or
    raises on the next write (>= 2.4); either way on_close aborts the requests still running,
    which frees their KV blocks.
    """

    def __init__(self, events, on_close, completed=lambda: True):
        super().__init__(events, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.on_close = on_close
        self.completed = completed           # () -> did the event generator reach its end?
        self.record: RequestRecord | None = None

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.on_close()
            if self.record is not None:
                if not self.completed() and self.record.error is None:
                    self.record.error = "client disconnected mid-stream"
                self.record.log(self.status_code)


def version_body() -> dict:
    return {"version": rawpaged.__version__}
