"""What a client may cost the server: body size, prompt length, time to send, connections.

    body          at most max_body_bytes (Content-Length checked first, then counted while reading):
                  413 in OpenAI's error format, and the connection is closed
    body time     the whole body within body_timeout_s of the headers: else 408, connection closed
    header time   a connection must deliver a request's headers within header_timeout_s of opening
                  (or of its first byte, for the next request on a kept-alive connection): else it is
                  closed with a bare 408 (slowloris)
    header size   h11's limit on an incomplete request head (max_header_bytes): uvicorn answers 400
    idle          uvicorn's keep-alive timeout between requests (keep_alive_s)
    connections   uvicorn's limit_concurrency: past it, new requests get 503 at once
    prompt        at most max_prompt_chars characters per prompt (and for a chat's messages and its
                  rendered text), checked BEFORE tokenizing: default 32 characters per token of
                  max_model_len, far above any real text (English runs near 4)

uvicorn has no header-read timeout of its own; GuardedH11Protocol adds one to its h11 protocol.
After a 413 or a 408 (the body is refused while the client may still be sending it) it ends the
connection with a lingering close, as nginx does: FIN after the response, then whatever still
arrives is read and dropped until the client has sent nothing for LINGER_IDLE_S (at most LINGER_MAX_S
in all) before the socket closes. (Closing at once with
unread bytes makes the kernel send a reset, and the client may lose the 413 it was about to read;
uvicorn's own Connection: close does exactly that.) Other responses sent before their body was read
(a 401 or 503 refuses a request before reading it) keep uvicorn's behaviour: the late body is
dropped and the connection lives on. A client trickling bytes after a response meets the header
timeout: they do not complete a request head.
"""
from __future__ import annotations

import asyncio
import resource
from dataclasses import dataclass

import h11
from starlette.requests import ClientDisconnect, Request
from uvicorn.protocols.http.h11_impl import H11Protocol

from rawpaged.server.protocol import ApiError

CHARS_PER_TOKEN = 32                # the default prompt bound: this many characters per token of context
LINGER_IDLE_S = 5.0                 # a lingering close waits this long for more late bytes (nginx: 5 s)
LINGER_MAX_S = 30.0                 # ... and never longer than this in all (nginx: 30 s)
CLOSE_AFTER_RESPONSE = "rawpaged.close_after_response"     # scope key: the body was refused


@dataclass
class ServerLimits:
    max_body_bytes: int = 16 << 20
    max_prompt_chars: int | None = None     # None: CHARS_PER_TOKEN * max_model_len
    body_timeout_s: float = 60.0
    header_timeout_s: float = 10.0
    keep_alive_s: int = 5
    max_header_bytes: int = 16 << 10        # h11's default
    limit_concurrency: int | None = None    # None: no limit (run_server derives one from the fd limit)

    def prompt_chars(self, max_model_len: int) -> int:
        return self.max_prompt_chars if self.max_prompt_chars is not None else CHARS_PER_TOKEN * max_model_len

    def uvicorn_kwargs(self) -> dict:
        return dict(timeout_keep_alive=self.keep_alive_s, limit_concurrency=self.limit_concurrency,
                    h11_max_incomplete_event_size=self.max_header_bytes,
                    http=guarded_protocol(self.header_timeout_s))


# -- the body ---------------------------------------------------------------------------------
class ClientGone(Exception):
    """The client disconnected before its response was ready."""


def refuse_body(request: Request, e: ApiError) -> ApiError:
    """The body will not be read: the connection ends (lingering) after this error's response."""
    request.scope[CLOSE_AFTER_RESPONSE] = True
    return e


def too_large(limit: int) -> ApiError:
    return ApiError(413, f"the request body is larger than {limit} bytes (see --max-body-bytes)",
                    code="request_too_large")


async def read_body(request: Request, limits: ServerLimits) -> bytes:
    """The request body, within the size and time limits."""
    length = request.headers.get("content-length")
    if length is not None and length.strip().isdigit() and int(length) > limits.max_body_bytes:
        raise refuse_body(request, too_large(limits.max_body_bytes))

    async def read() -> bytes:
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limits.max_body_bytes:
                raise refuse_body(request, too_large(limits.max_body_bytes))
            chunks.append(chunk)
        return b"".join(chunks)

    try:
        return await asyncio.wait_for(read(), limits.body_timeout_s)
    except asyncio.TimeoutError:
        raise refuse_body(request, ApiError(408, f"the request body did not arrive within {limits.body_timeout_s:g} s",
                                            code="request_timeout")) from None
    except ClientDisconnect:
        raise ClientGone() from None


# -- the connection ---------------------------------------------------------------------------
_TIMEOUT_RESPONSE = (b"HTTP/1.1 408 Request Timeout\r\ncontent-type: text/plain; charset=utf-8\r\n"
                     b"connection: close\r\ncontent-length: 32\r\n\r\nrequest headers took too long.\r\n")


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a header-read timeout (see the module docstring)."""

    header_timeout_s: float = 10.0

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._header_timer = None
        self._lingering = False
        self._arm_header_timer()

    def data_received(self, data: bytes) -> None:
        if self._lingering:                     # a body nobody reads: dropped, the linger goes on
            self._linger_timer.cancel()
            self._linger_timer = self.loop.call_at(min(self.loop.time() + LINGER_IDLE_S, self._linger_end),
                                                   self.transport.close)
            return
        if self._awaiting_headers():
            self._arm_header_timer()
        super().data_received(data)
        if not self._awaiting_headers():
            self._cancel_header_timer()

    def connection_lost(self, exc) -> None:
        self._cancel_header_timer()
        super().connection_lost(exc)

    def on_response_complete(self) -> None:
        # NOTE: the app refused the body the client may still be sending: close rather than wait.
        if self.scope is not None and self.scope.get(CLOSE_AFTER_RESPONSE) \
                and self.conn.their_state is h11.SEND_BODY and not self.transport.is_closing():
            self.server_state.total_requests += 1
            self._linger()
            return
        super().on_response_complete()
        # NOTE: bytes of the next request that came with this one start its header clock too.
        if self._awaiting_headers() and self.conn.trailing_data[0]:
            self._arm_header_timer()

    def _linger(self) -> None:
        self._lingering = True
        self._cancel_header_timer()
        self.flow.resume_reading()
        if self.transport.can_write_eof():
            self.transport.write_eof()
        # NOTE: until the client goes quiet, not a fixed time: a loaded client (or event loop) can
        # take seconds to push a large refused body, and closing on unread bytes resets the connection
        # before the client reads its 413.
        self._linger_end = self.loop.time() + LINGER_MAX_S
        self._linger_timer = self.loop.call_later(LINGER_IDLE_S, self.transport.close)

    def _awaiting_headers(self) -> bool:
        return self.cycle is None or self.cycle.response_complete

    def _arm_header_timer(self) -> None:
        if self._header_timer is None:
            self._header_timer = self.loop.call_later(self.header_timeout_s, self._header_timeout)

    def _cancel_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _header_timeout(self) -> None:
        self._header_timer = None
        # NOTE: armed only at connect and when bytes of a new request arrive (idling after a
        # response is uvicorn's keep-alive timer's business), so firing means a head never completed.
        if self._awaiting_headers() and not self.transport.is_closing():
            self.transport.write(_TIMEOUT_RESPONSE)
            self.transport.close()


def guarded_protocol(header_timeout_s: float) -> type[GuardedH11Protocol]:
    return type("GuardedH11Protocol", (GuardedH11Protocol,), {"header_timeout_s": header_timeout_s})


def raise_fd_limit() -> int:
    """Raise the soft limit on open files to the hard one (vLLM does the same); the soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 65536)
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    return soft


def default_concurrency(fd_limit: int) -> int:
    """Connections + running requests before uvicorn answers 503: the fd limit less a reserve for
    model files, the engine and logs, so the server refuses politely before accept() fails."""
    return max(16, min(fd_limit - 64, 8192) if fd_limit != resource.RLIM_INFINITY else 8192)
