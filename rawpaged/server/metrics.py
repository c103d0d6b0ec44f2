"""/metrics: the engine's statistics and request latencies in the Prometheus text format (0.0.4).

NOTE: written by hand rather than with prometheus-client. The numbers already live in two places
(the engine's statistics snapshot, and three latency histograms filled on the engine thread), so
a registry would only copy them; prometheus-client's default registry is also process-global,
which breaks two servers in one process (the tests run several). The text format is small:
`# HELP`, `# TYPE`, then `name{labels} value` lines; a histogram is cumulative `_bucket{le=...}`
lines ending in `le="+Inf"`, then `_sum` and `_count`.
"""
from __future__ import annotations

import bisect
import math
import threading

from rawpaged.outputs import RequestOutput

# Buckets in seconds (vLLM's, so existing dashboards read them the same way).
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
                10.0, 20.0, 40.0, 80.0)
TPOT_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                20.0, 40.0, 80.0)
E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0,
               240.0, 480.0, 960.0, 1920.0, 7680.0)

PREFIX = "rawpaged_"


class Histogram:
    def __init__(self, buckets: tuple[float, ...]):
        self.buckets = buckets
        self.counts = [0] * (len(buckets) + 1)       # the last one is +Inf
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.sum += value
        self.count += 1

    def lines(self, name: str) -> list[str]:
        out, running = [], 0
        for le, c in zip(list(self.buckets) + [math.inf], self.counts):
            running += c
            out.append(f'{name}_bucket{{le="{_le(le)}"}} {running}')
        out += [f"{name}_sum {_num(self.sum)}", f"{name}_count {self.count}"]
        return out


def _le(v: float) -> str:
    return "+Inf" if v == math.inf else repr(float(v))


def _num(v) -> str:
    if isinstance(v, bool):
        v = int(v)
    if isinstance(v, int):
        return str(v)
    if math.isnan(v):
        return "NaN"
    if math.isinf(v):
        return "+Inf" if v > 0 else "-Inf"
    return repr(float(v))


class ServerMetrics:
    """Latency histograms (filled on the engine thread) and HTTP status counts (event loop)."""

    def __init__(self):
        self._lock = threading.Lock()
        self.ttft = Histogram(TTFT_BUCKETS)
        self.tpot = Histogram(TPOT_BUCKETS)
        self.e2e = Histogram(E2E_BUCKETS)
        self.http_responses: dict[int, int] = {}

    def on_finished(self, out: RequestOutput) -> None:
        """A request finished normally: time to first token, time per output token, end to end."""
        m = out.metrics or {}
        arrival, first, done = m.get("arrival_time"), m.get("first_token_time"), m.get("finished_time")
        if out.error is not None or arrival is None or first is None or done is None:
            return
        # NOTE: with n > 1 the sequences decode in lockstep; the longest one sets the pace.
        num_tokens = max((len(o.token_ids) for o in out.outputs), default=0)
        with self._lock:
            self.ttft.observe(first - arrival)
            self.e2e.observe(done - arrival)
            if num_tokens > 1:
                self.tpot.observe((done - first) / (num_tokens - 1))

    def on_response(self, status: int) -> None:
        with self._lock:
            self.http_responses[status] = self.http_responses.get(status, 0) + 1

    def render(self, stats: dict) -> str:
        lines: list[str] = []

        def family(name: str, kind: str, help: str, samples: list[str]) -> None:
            lines.append(f"# HELP {PREFIX}{name} {help}")
            lines.append(f"# TYPE {PREFIX}{name} {kind}")
            lines.extend(samples)

        def gauge(name: str, help: str, value) -> None:
            family(name, "gauge", help, [f"{PREFIX}{name} {_num(value)}"])

        def counter(name: str, help: str, value) -> None:
            # NOTE: the family is named without `_total`, its sample with it (OpenMetrics style,
            # what prometheus-client itself writes).
            family(name, "counter", help, [f"{PREFIX}{name}_total {_num(value)}"])

        gauge("num_sequences_running", "Sequences in the running batch (a request with n > 1 counts n).",
              stats["num_running"])
        gauge("num_requests_waiting", "Requests waiting to be scheduled.", stats["num_waiting"])
        gauge("num_requests_swapped", "Requests swapped out to CPU memory.", stats["num_swapped"])
        gauge("kv_cache_usage_ratio", "Fraction of device KV cache blocks in use (0 to 1).", stats["kv_usage"])
        gauge("kv_cache_free_blocks", "Free device KV cache blocks.", stats["num_free_blocks"])
        gauge("kv_cache_total_blocks", "Device KV cache blocks.", stats["num_device_blocks"])
        gauge("prefix_cache_hit_rate", "Prefix cache hits / queries, in blocks, since start.",
              stats["prefix_cache_hit_rate"])
        counter("prefix_cache_queries", "Blocks looked up in the prefix cache.", stats["prefix_cache_queries"])
        counter("prefix_cache_hits", "Blocks found in the prefix cache.", stats["prefix_cache_hits"])
        family("num_preemptions", "counter", "Sequence groups preempted, by mode.",
               [f'{PREFIX}num_preemptions_total{{mode="recompute"}} {stats["num_preemptions_recompute"]}',
                f'{PREFIX}num_preemptions_total{{mode="swap"}} {stats["num_preemptions_swap"]}'])
        counter("prompt_tokens", "Prompt tokens computed (prefix-cache hits excluded).", stats["prompt_tokens"])
        counter("generation_tokens", "Tokens generated.", stats["generation_tokens"])
        family("requests", "counter", "Requests by outcome.",
               [f'{PREFIX}requests_total{{outcome="{k}"}} {stats[f"num_{k}"]}'
                for k in ("finished", "aborted", "refused")])
        counter("engine_steps", "Engine iterations.", stats["num_steps"])
        with self._lock:
            family("time_to_first_token_seconds", "histogram", "Time from arrival to the first token.",
                   self.ttft.lines(f"{PREFIX}time_to_first_token_seconds"))
            family("time_per_output_token_seconds", "histogram", "Time per output token after the first.",
                   self.tpot.lines(f"{PREFIX}time_per_output_token_seconds"))
            family("e2e_request_latency_seconds", "histogram", "Time from arrival to the last token.",
                   self.e2e.lines(f"{PREFIX}e2e_request_latency_seconds"))
            family("http_responses", "counter", "HTTP responses of the API endpoints, by status code.",
                   [f'{PREFIX}http_responses_total{{code="{c}"}} {n}'
                    for c, n in sorted(self.http_responses.items())])
        return "\n".join(lines) + "\n"
