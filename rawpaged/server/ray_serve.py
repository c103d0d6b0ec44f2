"""N engine replicas behind one OpenAI endpoint, on Ray Serve (data parallelism).

    rawpaged serve --ray --data-parallel-size 2 [--routing prefix|least-loaded] [--port 8000]

    # or from Python (a Ray cluster of RAY_ADDRESS, or a local one):
    from ray import serve
    from rawpaged.engine import EngineConfig
    from rawpaged.server.ray_serve import ReplicaOptions, build_app
    serve.run(build_app(EngineConfig(model="facebook/opt-125m"), ReplicaOptions("opt"), num_replicas=2),
              name="rawpaged", route_prefix="/")

The way a request goes:

    client -> Serve's HTTP proxy -> OpenAIIngress (one replica: reads the body, takes the text the
           prefix is matched on) -> DeploymentHandle, whose request router (PrefixAffinityRouter,
           rawpaged/server/routing.py) picks the engine replica -> EngineReplica.handle: the
           existing server app (rawpaged/server/app.py: protocol, validation, responses, metrics)
           called in-process through ASGI on that replica's own LLMEngine -> the response's
           messages stream back through the handle -> the ingress answers the client.

Nothing of the OpenAI API is implemented twice: a replica runs the very Starlette app `rawpaged
serve` runs. The ingress adds `GET /v1/replicas` (each replica's id, pid and engine statistics as of
the newest snapshot its answers carried) and the `x-rawpaged-replica` response header.

Failures: Serve restarts a replica that dies (its actor is gone, or `check_health` finds the engine
thread dead). A request in flight on it ends with an OpenAI-shaped 503 (`replica_unavailable`),
or, when its stream had begun, with an error event and `data: [DONE]`; requests on the other
replicas carry on.
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import time
from dataclasses import dataclass, field

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from rawpaged.errors import RawpagedError
from rawpaged.executor.ray_executor import _import_roots, ensure_ray, import_ray, ray_device
from rawpaged.server import responses as R
from rawpaged.server.limits import ServerLimits
from rawpaged.server.protocol import ApiError
from rawpaged.server.routing import CAPACITY, CHUNK, ROUTINGS, PrefixTable, route_text

logger = logging.getLogger("rawpaged.server")

REPLICA_HEADER = "x-rawpaged-replica"
_DROP_HEADERS = {"content-length", "transfer-encoding", "connection"}


@dataclass
class ReplicaOptions:
    """What each replica's server app is built with (`rawpaged serve`'s server flags)."""
    served_model_name: str
    api_key: str | None = None
    chat_template: str | None = None       # a file or the template text (as --chat-template)
    drain_timeout_s: float = 30.0
    stats_log_interval_s: float = 0.0
    limits: ServerLimits = field(default_factory=ServerLimits)


@dataclass
class HttpRequest:
    """An HTTP request as the ingress hands it to a replica (the router reads `route_text`)."""
    method: str
    path: str
    query_string: bytes
    headers: list[tuple[bytes, bytes]]
    body: bytes
    route_text: str | None = None
    client: tuple[str, int] | None = None


# -- the engine replica ---------------------------------------------------------------------------
class EngineReplica:
    """One LLMEngine and the OpenAI server app around it, in one Ray Serve replica."""

    def __init__(self, engine_config, options: ReplicaOptions):
        from rawpaged.engine import LLMEngine
        from rawpaged.server.app import build_app as build_http_app
        from rawpaged.server.chat import load_chat_template
        from rawpaged.server.state import ServerConfig

        self.engine = LLMEngine(engine_config)
        config = ServerConfig(served_model_name=options.served_model_name, api_key=options.api_key,
                              chat_template=load_chat_template(self.engine.tokenizer, options.chat_template),
                              drain_timeout_s=options.drain_timeout_s, limits=options.limits,
                              stats_log_interval_s=options.stats_log_interval_s)
        self.app = build_http_app(self.engine, config)
        self.state = self.app.state.rp
        self.started = False
        self.replica_id = _replica_id()
        self.pid = os.getpid()
        self.num_abouts = 0                     # numbers this replica's snapshots, oldest first

    def _start(self) -> None:
        # NOTE: the engine thread hands outputs to the event loop it was started from: this
        # replica's, so it starts with the first request (the lifespan of `rawpaged serve`).
        if not self.started:
            self.state.start()
            self.started = True

    def about(self) -> dict:
        self.num_abouts += 1
        return {"replica": self.replica_id, "pid": self.pid, "snapshot": self.num_abouts,
                "stats": dict(self.state.engine.stats)}

    async def handle(self, req: HttpRequest):
        """The app's answer to req: ("start", status, headers), ("body", bytes)..., ("end", about)."""
        self._start()
        async for message in call_asgi(self.app, req):
            if message["type"] == "http.response.start":
                headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in message.get("headers", [])]
                yield ("start", message["status"], headers + [(REPLICA_HEADER, self.replica_id)])
            elif message["type"] == "http.response.body":
                if message.get("body"):
                    yield ("body", message["body"])
                if not message.get("more_body", False):
                    break
        yield ("end", self.about())

    def check_health(self) -> None:
        """Serve's health check: a replica whose engine thread died is restarted."""
        if self.started and not self.state.engine.is_alive:
            raise RuntimeError("the engine thread of this replica is not running")

    def __del__(self):
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.shutdown()


_background: set = set()      # app tasks still finishing after their client left


async def call_asgi(app, req: HttpRequest):
    """Run the ASGI app on req in this event loop; yield the messages it sends.

    The body arrives in one message; a later receive() waits until this generator is closed (the
    client went away), then says http.disconnect, so the app aborts what it queued."""
    scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
             "method": req.method, "scheme": "http", "path": req.path, "raw_path": req.path.encode(),
             "query_string": req.query_string, "root_path": "", "headers": list(req.headers),
             "client": req.client or ("127.0.0.1", 0), "server": ("rawpaged-replica", 0), "state": {}}
    messages: asyncio.Queue = asyncio.Queue()
    gone = asyncio.Event()
    body_sent = False
    done = object()

    async def receive():
        nonlocal body_sent
        if not body_sent:
            body_sent = True
            return {"type": "http.request", "body": req.body, "more_body": False}
        await gone.wait()
        return {"type": "http.disconnect"}

    async def send(message):
        messages.put_nowait(message)

    async def run():
        try:
            await app(scope, receive, send)
        finally:
            messages.put_nowait(done)

    task = asyncio.ensure_future(run())
    try:
        while True:
            message = await messages.get()
            if message is done:
                break
            yield message
        await task                      # the app's own exception, if any
    finally:
        gone.set()
        if not task.done():
            _background.add(task)
            task.add_done_callback(_background.discard)


def _replica_id() -> str:
    try:
        from ray import serve
        ctx = serve.get_replica_context()
        rid = getattr(ctx, "replica_id", None)
        return getattr(rid, "unique_id", None) or str(getattr(ctx, "replica_tag", rid))
    except Exception:                   # noqa: BLE001 - outside Serve (tests build one directly)
        return f"local-{os.getpid()}"


# -- the ingress ----------------------------------------------------------------------------------
class OpenAIIngress:
    """The HTTP entry point: forwards each request to the engine replica the router picks."""

    def __init__(self, engine_handle, max_body_bytes: int = ServerLimits().max_body_bytes):
        self.engine = engine_handle
        self.max_body_bytes = max_body_bytes
        self.replicas: dict[str, dict] = {}          # replica id -> its latest about()

    async def __call__(self, request: Request) -> Response:
        if request.url.path == "/v1/replicas" and request.method == "GET":
            return JSONResponse({"object": "list", "data": sorted(self.replicas.values(),
                                                                   key=lambda r: r["replica"])})
        body = await request.body()
        text = None
        if request.method == "POST" and 0 < len(body) <= self.max_body_bytes:
            try:
                text = route_text(json.loads(body))
            except (ValueError, RecursionError):
                text = None                  # the replica answers the bad body with its 400
        client = (request.client.host, request.client.port) if request.client else None
        req = HttpRequest(request.method, request.url.path, request.url.query.encode("latin-1"),
                          list(request.scope["headers"]), body, text, client)
        gen = self.engine.options(stream=True).handle.remote(req)
        try:
            _, status, headers = await gen.__anext__()
        except Exception as e:               # noqa: BLE001 - the replica died or is unreachable
            return _replica_error(e)
        headers = {k: v for k, v in headers if k.lower() not in _DROP_HEADERS}
        if headers.get("content-type", "").startswith("text/event-stream"):
            return StreamingResponse(self._relay(gen), status_code=status, headers=headers)
        chunks = []
        try:
            async for item in gen:
                if item[0] == "body":
                    chunks.append(item[1])
                else:
                    self._seen(item[1])
        except Exception as e:               # noqa: BLE001
            return _replica_error(e)
        return Response(b"".join(chunks), status_code=status, headers=headers)

    async def _relay(self, gen):
        """A stream's chunks; if the replica dies mid-stream, an error event and [DONE]."""
        try:
            async for item in gen:
                if item[0] == "body":
                    yield item[1]
                else:
                    self._seen(item[1])
        except Exception as e:               # noqa: BLE001
            yield R.sse(_unavailable(e).body())
            yield R.SSE_DONE
        finally:
            gen.cancel()

    def _seen(self, about: dict) -> None:
        # NOTE: answers from one replica reach the ingress in any order; an older snapshot (from
        # the same process) never replaces a newer one, so the table only moves forward.
        held = self.replicas.get(about["replica"])
        if held is not None and held["pid"] == about["pid"] and held["snapshot"] > about["snapshot"]:
            return
        self.replicas[about["replica"]] = {**about, "last_seen": time.time()}


def _unavailable(e: Exception) -> ApiError:
    detail = (str(e).strip().splitlines() or [""])[0][:300]
    return ApiError(503, f"the engine replica serving this request failed ({type(e).__name__}: {detail}); "
                         f"Ray Serve restarts it: retry the request", type="service_unavailable_error",
                    code="replica_unavailable")


def _replica_error(e: Exception) -> Response:
    logger.warning("engine replica failed: %s: %s", type(e).__name__, e)
    err = _unavailable(e)
    return JSONResponse(err.body(), status_code=err.status)


# -- the application --------------------------------------------------------------------------------
def build_app(engine_config, options: ReplicaOptions | None = None, *, num_replicas: int = 1,
              routing: str = "prefix", replica_cpus: float = 1.0, replica_gpus: float | None = None,
              max_ongoing_requests: int = 256, imbalance: int = 8):
    """The Serve application: an OpenAIIngress in front of `num_replicas` EngineReplicas.

    Each replica reserves `replica_cpus` CPUs and `replica_gpus` GPUs (default: one per rank of
    engine_config.tensor_parallel_size where the cluster has GPUs and the device allows them, else
    none). `routing`: "prefix" (default) or "least-loaded" (rawpaged/server/routing.py)."""
    ray = import_ray()
    from ray import serve
    from ray.serve.config import RequestRouterConfig

    if routing not in ROUTINGS:
        raise RawpagedError(f"routing must be one of {', '.join(ROUTINGS)}, got {routing!r}")
    if num_replicas < 1:
        raise RawpagedError(f"data_parallel_size must be at least 1, got {num_replicas}")
    ensure_ray(ray)
    if options is None:
        options = ReplicaOptions(served_model_name=engine_config.model or "rawpaged")
    if replica_gpus is None:
        replica_gpus = engine_config.tensor_parallel_size if ray_device(ray, engine_config.device) == "cuda" else 0
    # NOTE: the driver's import roots travel to the replicas, so a checkout runs its own code.
    env = {"env_vars": {"PYTHONPATH": os.pathsep.join(p for p in _import_roots() if p)}}
    router = RequestRouterConfig(request_router_class=PrefixAffinityRouter,
                                 request_router_kwargs={"routing": routing, "imbalance": imbalance})
    engine = serve.deployment(EngineReplica, name="EngineReplica", num_replicas=num_replicas,
                              max_ongoing_requests=max_ongoing_requests, request_router_config=router,
                              health_check_period_s=5, graceful_shutdown_timeout_s=5,
                              ray_actor_options={"num_cpus": replica_cpus, "num_gpus": replica_gpus,
                                                 "runtime_env": env})
    ingress = serve.deployment(OpenAIIngress, name="OpenAIIngress", num_replicas=1,
                               max_ongoing_requests=max(4096, 4 * num_replicas * max_ongoing_requests),
                               ray_actor_options={"num_cpus": 0, "runtime_env": env})
    return ingress.bind(engine.bind(engine_config, options), options.limits.max_body_bytes)


def run_ray_serve(args) -> int:
    """`rawpaged serve --ray`: the application on Ray Serve's proxy at --host:--port, until SIGINT/SIGTERM."""
    from rawpaged.engine import EngineConfig
    from rawpaged.server.app import server_limits

    ray = import_ray()
    ensure_ray(ray)
    from ray import serve

    options = ReplicaOptions(served_model_name=args.served_model_name or args.model, api_key=args.api_key,
                             chat_template=args.chat_template, drain_timeout_s=args.drain_timeout,
                             stats_log_interval_s=0.0, limits=server_limits(args))
    app = build_app(EngineConfig.from_cli_args(args), options, num_replicas=args.data_parallel_size,
                    routing=args.routing)
    serve.start(http_options={"host": args.host, "port": args.port})
    serve.run(app, name="rawpaged", route_prefix="/")
    print(f"rawpaged serve: {args.data_parallel_size} replica(s) of {args.model} on Ray Serve at "
          f"http://{args.host}:{args.port} (routing: {args.routing}; Ctrl+C to stop)", flush=True)
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        serve.shutdown()
    return 0


# -- the router (Ray Serve's RequestRouter; the policy is routing.PrefixTable) ---------------------
def _router_base():
    from ray.serve.request_router import FIFOMixin, RequestRouter
    return FIFOMixin, RequestRouter


class PrefixAffinityRouter(*_router_base()):
    """Least-loaded, or the replica that served the longest prefix of the prompt (routing.py)."""

    def initialize_state(self, routing: str = "prefix", imbalance: int = 8, chunk: int = CHUNK,
                         capacity: int = CAPACITY):
        self.routing, self.imbalance = routing, imbalance
        self.table = PrefixTable(capacity, chunk)

    def _load(self, replica) -> int:
        n = self._replica_queue_len_cache.get(replica.replica_id)
        return 0 if n is None else n

    async def choose_replicas(self, candidate_replicas, pending_request=None):
        if not candidate_replicas:
            return []
        if pending_request is not None:
            pending_request.routing_context.should_backoff = True    # every replica full: back off
        by_load = sorted(candidate_replicas, key=lambda r: (self._load(r), r.replica_id.unique_id))
        text = None
        if pending_request is not None and self.routing == "prefix":
            # NOTE: duck-typed: the router class reaches the ingress by value (cloudpickle), so its
            # HttpRequest may not be the class object the ingress builds requests with.
            text = next((a.route_text for a in pending_request.args if hasattr(a, "route_text")), None)
        if not text:
            return [by_load]                 # Serve takes the one with the shortest queue among them
        owner, _ = self.table.match(text, [r.replica_id for r in candidate_replicas])
        chosen = next((r for r in candidate_replicas if r.replica_id == owner), None)
        if chosen is None or self._load(chosen) > self._load(by_load[0]) + self.imbalance:
            chosen = by_load[0]
        # NOTE: recorded now, not when the answer comes back: the next request sharing this
        # prefix may be routed before this one has reached its replica.
        self.table.record(text, chosen.replica_id)
        return [[chosen], [r for r in by_load if r is not chosen]]

    def on_replica_actor_died(self, replica_id):
        super().on_replica_actor_died(replica_id)
        self.table.forget(replica_id)
