"""AsyncEngine: the LLMEngine stepping on a thread of its own, one async stream per request.

    event loop (uvicorn)                         engine thread
    ----------------------------------------     ------------------------------------------------
    add()    -> command queue  --------------->  engine.add_request  (result via a Future)
    abort()  -> command queue  --------------->  engine.abort_request (blocks freed)
                                                 while requests run: engine.step()
    RequestStream.put <- call_soon_threadsafe <- outputs of the step

The engine is not thread-safe, so every engine call happens on the engine thread; the event loop
only queues commands. While no request runs, the thread blocks on the command queue (no busy
loop). After each iteration it publishes a snapshot of the engine statistics, which /metrics,
the periodic log line and the tests read without touching the engine. An observer (the server's
metrics) hears of every accepted request, every iteration (with its start and end times) and
every abort, on the engine thread.

NOTE: RequestOutputs are cumulative (full text and tokens so far), so a stream keeps only the
newest one: a slow client skips intermediate states and still loses nothing.
"""
from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import replace
from typing import Callable, Protocol

from rawpaged.outputs import CompletionOutput, RequestOutput
from rawpaged.sampling_params import SamplingParams

logger = logging.getLogger("rawpaged.server")


class EngineFailed(Exception):
    """The engine raised while stepping; the requests it held were aborted."""


class RequestStream:
    """The newest output of one request, read by the one coroutine that serves it."""

    def __init__(self, request_id: str, n: int):
        self.request_id = request_id
        self.n = n
        self.latest: RequestOutput | None = None
        self.finished = False
        self.error: Exception | None = None
        self._changed = asyncio.Event()

    def put(self, out: RequestOutput) -> None:
        if self.finished:
            return
        self.latest = out
        self.finished = out.finished
        self._changed.set()

    def fail(self, error: Exception) -> None:
        if not self.finished:
            self.error, self.finished = error, True
            self._changed.set()

    def abort(self) -> None:
        """Finish the stream with finish_reason "abort" on every choice still running."""
        if self.finished:
            return
        last = self.latest
        outputs = list(last.outputs) if last is not None else []
        outputs += [CompletionOutput(index=i, text="", token_ids=[], cumulative_logprob=0.0)
                    for i in range(len(outputs), self.n)]
        outputs = [o if o.finish_reason else replace(o, finish_reason="abort") for o in outputs]
        self.put(RequestOutput(self.request_id, last.prompt if last else None,
                               last.prompt_token_ids if last else [], outputs, finished=True,
                               prompt_logprobs=last.prompt_logprobs if last else None,
                               metrics=last.metrics if last else {}))

    def __aiter__(self):
        return self._iterate()

    async def _iterate(self):
        while True:
            await self._changed.wait()
            self._changed.clear()
            if self.error is not None:
                raise self.error
            yield self.latest
            if self.finished:
                return

    async def final(self) -> RequestOutput:
        out = None
        async for out in self:
            pass
        return out


class Observer(Protocol):
    """Called on the engine thread (the server's metrics implement it)."""

    def on_added(self, request_id: str, params: SamplingParams, arrival: float) -> None: ...

    def on_step(self, outputs: list[RequestOutput], started: float, ended: float, new_tokens: int) -> None: ...

    def on_aborted(self, request_id: str, reason: str = "abort") -> None: ...


class AsyncEngine:
    def __init__(self, engine, observer: Observer | None = None):
        self.engine = engine
        self.observer = observer
        self.stats: dict = engine.get_stats()
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._streams: dict[str, RequestStream] = {}      # event-loop side only
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stopping = False

    # -- lifecycle (event loop) ---------------------------------------------------------------
    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name="rawpaged-engine", daemon=True)
        self._thread.start()

    @property
    def is_alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def num_in_flight(self) -> int:
        return len(self._streams)

    async def shutdown(self, timeout: float = 10.0) -> None:
        """Abort what still runs, stop the thread and wait for it (bounded)."""
        self.abort_all()
        self._commands.put(("stop",))
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, timeout)
            if self._thread.is_alive():
                logger.warning("engine thread still busy after %.0f s; leaving it (daemon)", timeout)

    # -- requests (event loop) ----------------------------------------------------------------
    async def add(self, request_id: str, prompt: str | None, prompt_token_ids: list[int],
                  params: SamplingParams, arrival_time: float | None = None) -> RequestStream:
        """Queue a request; returns its stream once the engine accepted it (RawpagedError if not)."""
        stream = RequestStream(request_id, params.n)
        self._streams[request_id] = stream
        done: Future = Future()
        self._commands.put(("add", request_id, prompt, prompt_token_ids, params, arrival_time, done))
        self.engine.interrupt_bursts()          # NOTE: a multi-step burst in flight ends after its step
        try:
            await asyncio.wrap_future(done)
        except BaseException:
            # NOTE: also on cancellation (client gone): the add may still happen, so abort it.
            self.abort(request_id)
            raise
        return stream

    def abort(self, request_id: str) -> None:
        """Stop a request (client gone); its blocks are freed on the engine thread."""
        stream = self._streams.pop(request_id, None)
        if stream is not None and not stream.finished:
            self._commands.put(("abort", request_id))

    def abort_all(self) -> None:
        """Finish every request now with finish_reason "abort" (shutdown deadline)."""
        for rid, stream in list(self._streams.items()):
            self._commands.put(("abort", rid))
            stream.abort()
        self._streams.clear()

    async def call(self, fn: Callable):
        """Run fn(engine) on the engine thread and return its result."""
        return await asyncio.wrap_future(self.submit(fn))

    def submit(self, fn: Callable) -> Future:
        """Thread-safe: fn(engine) on the engine thread; a concurrent.futures.Future of the result."""
        done: Future = Future()
        self._commands.put(("call", fn, done))
        return done

    # -- engine thread ------------------------------------------------------------------------
    def _run(self) -> None:
        engine = self.engine
        while not self._stopping:
            # NOTE: block only when idle; while requests run, pending commands are drained
            # between steps so a step never waits on the queue.
            if not engine.has_unfinished_requests():
                self._execute(self._commands.get())
            engine.interrupt_bursts(False)          # what arrives from here on interrupts the next burst
            self._drain_commands()
            if self._stopping:
                break
            if engine.has_unfinished_requests():
                self._step()
            else:
                self.stats = engine.get_stats()
        self._abort_everything()
        logger.debug("engine thread stopped")

    def _drain_commands(self) -> None:
        while True:
            try:
                cmd = self._commands.get_nowait()
            except queue.Empty:
                return
            self._execute(cmd)

    def _execute(self, cmd) -> None:
        if cmd is None:
            return
        kind = cmd[0]
        if kind == "add":
            _, rid, prompt, ids, params, arrival, done = cmd
            if not done.set_running_or_notify_cancel():
                return
            try:
                self.engine.add_request(rid, prompt, params, prompt_token_ids=ids, arrival_time=arrival)
            except Exception as e:
                done.set_exception(e)
            else:
                done.set_result(rid)
                self._observe("on_added", rid, params, arrival or time.monotonic())
        elif kind == "abort":
            if self.engine.abort_request(cmd[1]):
                self._observe("on_aborted", cmd[1])
        elif kind == "call":
            _, fn, done = cmd
            if not done.set_running_or_notify_cancel():
                return
            try:
                done.set_result(fn(self.engine))
            except Exception as e:
                done.set_exception(e)
        elif kind == "stop":
            self._stopping = True

    def _step(self) -> None:
        started = time.monotonic()
        try:
            outputs = self.engine.step()
        except Exception as e:
            logger.exception("engine step failed; aborting the requests it held")
            failed = self._abort_everything(reason="error")
            self._publish_failure(failed, EngineFailed(f"engine error: {type(e).__name__}: {e}"))
            self.stats = self.engine.get_stats()
            return
        ended = time.monotonic()
        before, self.stats = self.stats, self.engine.get_stats()
        new_tokens = (self.stats["prompt_tokens"] + self.stats["generation_tokens"]
                      - before["prompt_tokens"] - before["generation_tokens"])
        self._observe("on_step", outputs, started, ended, new_tokens)
        self._publish(outputs)

    def _observe(self, hook: str, *args) -> None:
        if self.observer is not None:
            try:
                getattr(self.observer, hook)(*args)
            except Exception:                     # noqa: BLE001 - metrics must not stop the engine
                logger.exception("metrics update (%s) failed", hook)

    def _abort_everything(self, reason: str = "abort") -> list[str]:
        ids = list(self.engine.groups)
        for rid in ids:
            try:
                self.engine.abort_request(rid)
            except Exception:
                logger.exception("abort of %s failed", rid)
            self._observe("on_aborted", rid, reason)
        return ids

    def _publish(self, outputs: list[RequestOutput]) -> None:
        if outputs:
            self._call_in_loop(self._deliver, outputs)

    def _publish_failure(self, ids: list[str], error: Exception) -> None:
        self._call_in_loop(self._deliver_failure, ids, error)

    def _call_in_loop(self, fn, *args) -> None:
        try:
            self._loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:          # the loop is closed: nobody is listening any more
            pass

    # -- event loop: hand outputs to the streams ----------------------------------------------
    def _deliver(self, outputs: list[RequestOutput]) -> None:
        for out in outputs:
            stream = self._streams.get(out.request_id)
            if stream is None:
                continue
            stream.put(out)
            if out.finished:
                del self._streams[out.request_id]

    def _deliver_failure(self, ids: list[str], error: Exception) -> None:
        for rid in ids:
            stream = self._streams.pop(rid, None)
            if stream is not None:
                stream.fail(error)


def now() -> float:
    """The clock the engine uses for arrival / first-token / finish times."""
    return time.monotonic()


async def merge_streams(streams: list[RequestStream]):
    """Yield (stream index, output) from several streams as outputs arrive (a request's prompts)."""
    if len(streams) == 1:
        async for out in streams[0]:
            yield 0, out
        return
    inbox: asyncio.Queue = asyncio.Queue()
    end = object()

    async def pump(i: int, stream: RequestStream) -> None:
        try:
            async for out in stream:
                inbox.put_nowait((i, out))
        except Exception as e:            # noqa: BLE001 - handed to the reader
            inbox.put_nowait((i, e))
        inbox.put_nowait((i, end))

    tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(streams)
        while remaining:
            i, item = await inbox.get()
            if item is end:
                remaining -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield i, item
    finally:
        for t in tasks:
            t.cancel()
