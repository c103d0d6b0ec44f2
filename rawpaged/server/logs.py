"""What the server logs, for an operator: one line per API request, a periodic engine line, and
no floods.

    INFO:     cmpl-1f3a... POST /v1/completions 200 client=10.0.0.7:51234 prompt_tokens=5 completion_tokens=16 ttft=0.012s total=0.105s
    INFO:     chatcmpl-9c2e... POST /v1/chat/completions 400 client=... error="temperature must be >= 0, got -1"
    INFO:     engine: 3 running, 0 waiting, 0 swapped, KV cache 12.3%, prompt 120.0 tokens/s, generation 340.5 tokens/s

Every API request (not /health or /metrics: probes and scrapers would drown the rest) gets exactly
one line when it ends, at info; a 5xx at error. Its fields are also attached to the record
(`record.fields`), so `--log-format json` writes them as JSON keys: one object per line for log
shippers. The engine line comes every `interval` seconds while the engine is busy (and once more
when it falls idle), as vLLM prints it.

Floods: a server at its file-descriptor limit fails accept() over and over (asyncio logs each
failure with a traceback, once a second), a client can send malformed HTTP in a loop (uvicorn
warns each time). RateLimitFilter lets the first of a kind through, then at most one per minute
with the count of those it swallowed. Request lines are never rate-limited.
"""
from __future__ import annotations

import asyncio
import json
import logging
import time
import traceback
from dataclasses import dataclass, field

logger = logging.getLogger("rawpaged.server")
requests_logger = logging.getLogger("rawpaged.server.requests")

LOG_FORMATS = ("text", "json")
TEXT_FORMAT = "%(levelname)s:     %(message)s"


# -- formats ----------------------------------------------------------------------------------
class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, the record's fields, the traceback."""

    def format(self, record: logging.LogRecord) -> str:
        obj = {"time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
                       + f".{int(record.msecs):03d}Z",
               "level": record.levelname, "logger": record.name, "message": record.getMessage()}
        obj.update(getattr(record, "fields", None) or {})
        if record.exc_info:
            obj["exception"] = "".join(traceback.format_exception(*record.exc_info)).rstrip()
        return json.dumps(obj, ensure_ascii=False, default=str)


class RateLimitFilter(logging.Filter):
    """Warnings and errors of the same kind (logger + first line) at most once per `window` s."""

    def __init__(self, window: float = 60.0, loggers: tuple[str, ...] = ("asyncio", "uvicorn")):
        super().__init__()
        self.window = window
        self.loggers = loggers
        self._seen: dict[tuple[str, str], list] = {}     # kind -> [last passed at, swallowed since]

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING or not record.name.startswith(self.loggers):
            return True
        kind = (record.name, str(record.msg).split("\n", 1)[0][:200])
        now = time.monotonic()
        seen = self._seen.get(kind)
        if seen is not None and now - seen[0] < self.window:
            seen[1] += 1
            return False
        swallowed = seen[1] if seen else 0
        self._seen[kind] = [now, 0]
        if len(self._seen) > 1000:                  # kinds are few; never grow without bound
            self._seen = {kind: self._seen[kind]}
        if swallowed:
            record.msg = f"{record.msg} ({swallowed} more like this in the last {self.window:.0f} s)"
        return True


def setup_logging(level: int, fmt: str = "text") -> None:
    """The process's logging: one stderr handler on the root logger (uvicorn's loggers propagate to
    it: the server passes log_config=None), in the chosen format, with the flood filter."""
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT))
    handler.addFilter(RateLimitFilter())
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    root.addHandler(handler)
    root.setLevel(level)


# -- one line per request ---------------------------------------------------------------------
@dataclass
class RequestRecord:
    """What one API request did, filled by its handler, logged once when its response ends."""
    method: str
    path: str
    client: str
    request_id: str = "-"
    started: float = field(default_factory=time.monotonic)
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    ttft_s: float | None = None
    error: str | None = None
    logged: bool = False

    def log(self, status: int) -> None:
        if self.logged:
            return
        self.logged = True
        fields = {"request_id": self.request_id, "method": self.method, "path": self.path, "status": status,
                  "client": self.client}
        if self.prompt_tokens is not None:
            fields["prompt_tokens"] = self.prompt_tokens
        if self.completion_tokens is not None:
            fields["completion_tokens"] = self.completion_tokens
        if self.ttft_s is not None:
            fields["ttft_s"] = round(self.ttft_s, 4)
        fields["total_s"] = round(time.monotonic() - self.started, 4)
        if self.error is not None:
            fields["error"] = self.error
        text = " ".join(_text_field(k, v) for k, v in fields.items() if k not in ("request_id", "method", "path",
                                                                                     "status"))
        level = logging.ERROR if status >= 500 else logging.INFO
        requests_logger.log(level, "%s %s %s %d %s", self.request_id, self.method, self.path, status, text,
                            extra={"fields": fields})


def _text_field(key: str, value) -> str:
    if key in ("ttft_s", "total_s"):
        return f"{key[:-2]}={value:.3f}s"
    if key == "error":
        return f"error={json.dumps(value, ensure_ascii=False)}"
    return f"{key}={value}"


# -- the periodic engine line -----------------------------------------------------------------
class StatsLogger:
    """Every `interval` s while busy: running, waiting, swapped, KV usage, prompt and generation
    tokens/s (from the counters of the engine's statistics snapshot)."""

    def __init__(self, stats, interval: float = 5.0):
        self.stats = stats                    # () -> the latest statistics snapshot
        self.interval = interval
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        if self.interval > 0:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="rawpaged-stats-log")

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()

    async def _run(self) -> None:
        last, last_t, was_busy = self.stats(), time.monotonic(), False
        while True:
            await asyncio.sleep(self.interval)
            now_stats, now = self.stats(), time.monotonic()
            busy = self.line(last, now_stats, now - last_t, was_busy)
            last, last_t, was_busy = now_stats, now, busy

    @staticmethod
    def line(before: dict, after: dict, dt: float, was_busy: bool = False) -> bool:
        """Log one engine line if the engine did or holds work (or just stopped); True if busy."""
        prompt = (after["prompt_tokens"] - before["prompt_tokens"]) / dt if dt > 0 else 0.0
        gen = (after["generation_tokens"] - before["generation_tokens"]) / dt if dt > 0 else 0.0
        busy = bool(prompt or gen or after["num_running"] or after["num_waiting"] or after["num_swapped"])
        fields = {"running": after["num_running"], "waiting": after["num_waiting"], "swapped": after["num_swapped"],
                  "kv_cache_usage": round(after["kv_usage"], 4), "prompt_tokens_per_s": round(prompt, 1),
                  "generation_tokens_per_s": round(gen, 1)}
        # NOTE: an idle server stays quiet (debug), as vLLM's; the first idle interval still shows.
        level = logging.INFO if busy or was_busy else logging.DEBUG
        logger.log(level, "engine: %d running, %d waiting, %d swapped, KV cache %.1f%%, prompt %.1f tokens/s, "
                          "generation %.1f tokens/s", after["num_running"], after["num_waiting"],
                   after["num_swapped"], 100 * after["kv_usage"], prompt, gen, extra={"fields": fields})
        return busy
