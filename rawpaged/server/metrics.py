"""/metrics: vLLM's metric names, so vLLM's Grafana dashboards and the Kubernetes inference gateway
(which reads vllm:num_requests_waiting, vllm:num_requests_running and vllm:kv_cache_usage_perc)
work unchanged; rawpaged_* names only for what vLLM has no name for (swapped requests, free blocks,
memory waste, preemptions by mode, engine steps, HTTP statuses). Every sample carries the label
model_name (the served model name), as vLLM's do.

NOTE: written with prometheus-client, on a CollectorRegistry of this server's own. The text format
is simple, but label values (model_name is whatever --served-model-name says) need escaping, and
histogram lines must stay cumulative and consistent; prometheus-client does both, and its parser is
what the tests read with. Its process-global default registry would break two servers in one
process (the tests run several), hence one registry per server. The engine's counters and gauges
already live in the statistics snapshot the engine thread publishes after every iteration
(`engine.get_stats()`), so a collector reads them at scrape time instead of copying them into
Counter objects; the latency histograms are prometheus-client Histograms filled on the engine thread.

Timing (vLLM's definitions, on the engine's monotonic clock; arrival = the HTTP request was read):
    TTFT            first token - arrival
    inter-token     between successive iterations that gave a request new tokens
    request TPOT    (last token - first token) / (tokens - 1), per request
    queue           first scheduled (start of the first step that ran it) - arrival
    prefill         first token - first scheduled;  decode: last token - first token
    inference       last token - first scheduled;   e2e: last token - arrival
A request with n > 1 is one request for the histograms; vllm:request_success_total counts each of
its n sequences (vLLM v1 runs them as n requests), labelled with its finish reason.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from rawpaged.outputs import RequestOutput

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
FINISH_REASONS = ("stop", "length", "abort", "error")

# Buckets in seconds, vLLM's (so dashboards read them the same way).
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
                10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
TPOT_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                20.0, 40.0, 80.0)
REQUEST_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0,
                   240.0, 480.0, 960.0, 1920.0, 7680.0)
ITERATION_BUCKETS = (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)


def buckets_1_2_5(max_value: int) -> list[int]:
    """1, 2, 5, 10, 20, 50, ... up to max_value (vLLM's token-count buckets)."""
    out, scale = [], 1
    while True:
        for m in (1, 2, 5):
            if m * scale > max_value:
                return out
            out.append(m * scale)
        scale *= 10


@dataclass
class _Live:
    """What the metrics remember of one request in flight (engine thread only)."""
    arrival: float
    n: int
    max_tokens: int | None
    scheduled: float | None = None
    tokens: int = 0                     # the longest sequence's output tokens so far
    last_token: float = 0.0
    reasons: list = field(default_factory=list)


class ServerMetrics:
    """The server's registry. on_added / on_step / on_aborted run on the engine thread;
    on_response and render on the event loop."""

    def __init__(self, model_name: str, stats, *, block_size: int, max_model_len: int, cache_info: dict):
        self.model_name = model_name
        self.stats = stats                          # () -> the latest statistics snapshot (a dict)
        self.block_size = block_size
        self.cache_info = {k: str(v) for k, v in cache_info.items()}
        self.registry = CollectorRegistry(auto_describe=False)
        tokens = buckets_1_2_5(max_model_len)
        h = self._histogram
        self.ttft = h("vllm:time_to_first_token_seconds", "Histogram of time to first token in seconds.",
                      TTFT_BUCKETS)
        self.itl = h("vllm:inter_token_latency_seconds", "Histogram of inter-token latency in seconds.",
                     TPOT_BUCKETS)
        self.tpot = h("vllm:request_time_per_output_token_seconds",
                      "Histogram of time_per_output_token_seconds per request.", TPOT_BUCKETS)
        self.e2e = h("vllm:e2e_request_latency_seconds", "Histogram of e2e request latency in seconds.",
                     REQUEST_BUCKETS)
        self.queue = h("vllm:request_queue_time_seconds", "Histogram of time spent in WAITING phase for request.",
                       REQUEST_BUCKETS)
        self.prefill = h("vllm:request_prefill_time_seconds",
                         "Histogram of time spent in PREFILL phase for request.", REQUEST_BUCKETS)
        self.decode = h("vllm:request_decode_time_seconds", "Histogram of time spent in DECODE phase for request.",
                        REQUEST_BUCKETS)
        self.inference = h("vllm:request_inference_time_seconds",
                           "Histogram of time spent in RUNNING phase for request.", REQUEST_BUCKETS)
        self.prompt_len = h("vllm:request_prompt_tokens", "Number of prefill tokens processed.", tokens)
        self.gen_len = h("vllm:request_generation_tokens", "Number of generation tokens processed.", tokens)
        self.max_gen = h("vllm:request_max_num_generation_tokens",
                         "Histogram of maximum number of requested generation tokens.", tokens)
        self.params_n = h("vllm:request_params_n", "Histogram of the n request parameter.", (1, 2, 5, 10, 20))
        self.params_max_tokens = h("vllm:request_params_max_tokens",
                                   "Histogram of the max_tokens request parameter.", tokens)
        self.iteration_tokens = h("vllm:iteration_tokens_total", "Histogram of number of tokens per engine_step.",
                                  ITERATION_BUCKETS)
        # NOTE: one writer each (finished: engine thread; http: event loop); readers tolerate a
        # count that is one step behind.
        self.finished = dict.fromkeys(FINISH_REASONS, 0)
        self.http_responses: dict[int, int] = {}
        self._live: dict[str, _Live] = {}
        self.registry.register(_StatsCollector(self))

    def _histogram(self, name: str, doc: str, buckets):
        return Histogram(name, doc, ["model_name"], registry=self.registry, buckets=buckets).labels(self.model_name)

    # -- engine thread ------------------------------------------------------------------------
    def on_added(self, request_id: str, params, arrival: float) -> None:
        self._live[request_id] = _Live(arrival=arrival, n=params.n, max_tokens=params.max_tokens)

    def on_step(self, outputs: list[RequestOutput], started: float, ended: float, new_tokens: int) -> None:
        """One engine iteration that began at `started` and returned `outputs` at `ended`."""
        if new_tokens > 0:
            self.iteration_tokens.observe(new_tokens)
        for out in outputs:
            live = self._live.get(out.request_id)
            if live is None:
                continue
            if live.scheduled is None:
                live.scheduled = started            # NOTE: every scheduled request has an output
            self._tokens(out, live, ended)
            live.reasons = [o.finish_reason for o in out.outputs]
            if out.finished:
                del self._live[out.request_id]
                self._finish(out, live, ended)

    def on_aborted(self, request_id: str, reason: str = "abort") -> None:
        live = self._live.pop(request_id, None)
        if live is not None:
            done = sum(1 for r in live.reasons if r)
            self.finished[reason] = self.finished.get(reason, 0) + live.n - done
            for r in live.reasons:
                if r:
                    self.finished[r] = self.finished.get(r, 0) + 1

    def _tokens(self, out: RequestOutput, live: _Live, ended: float) -> None:
        num = max((len(o.token_ids) for o in out.outputs), default=0)
        if num <= live.tokens:
            return
        if live.tokens == 0:
            first = (out.metrics or {}).get("first_token_time") or ended
            self.ttft.observe(max(0.0, first - live.arrival))
        else:
            self.itl.observe(ended - live.last_token)
        live.tokens, live.last_token = num, ended

    def _finish(self, out: RequestOutput, live: _Live, ended: float) -> None:
        reasons = [o.finish_reason or "abort" for o in out.outputs] + ["abort"] * (live.n - len(out.outputs))
        if out.error is not None:
            reasons = ["error"] * live.n
        for r in reasons:
            self.finished[r] = self.finished.get(r, 0) + 1
        if out.error is not None:
            return
        m = out.metrics or {}
        first, done = m.get("first_token_time"), m.get("finished_time") or ended
        scheduled = live.scheduled if live.scheduled is not None else live.arrival
        self.e2e.observe(done - live.arrival)
        self.queue.observe(max(0.0, scheduled - live.arrival))
        if first is not None:
            self.prefill.observe(max(0.0, first - scheduled))
            self.decode.observe(max(0.0, done - first))
            self.inference.observe(max(0.0, done - scheduled))
            if live.tokens > 1:
                self.tpot.observe((done - first) / (live.tokens - 1))
        self.prompt_len.observe(len(out.prompt_token_ids))
        self.gen_len.observe(sum(len(o.token_ids) for o in out.outputs))
        self.max_gen.observe(max((len(o.token_ids) for o in out.outputs), default=0))
        self.params_n.observe(live.n)
        if live.max_tokens is not None:
            self.params_max_tokens.observe(live.max_tokens)

    # -- event loop ---------------------------------------------------------------------------
    def on_response(self, status: int) -> None:
        self.http_responses[status] = self.http_responses.get(status, 0) + 1

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _StatsCollector:
    """Counters and gauges read from the engine's statistics snapshot at scrape time."""

    def __init__(self, metrics: ServerMetrics):
        self.m = metrics

    def collect(self):
        m, stats = self.m, self.m.stats()
        model = [m.model_name]

        def gauge(name, doc, value, **labels):
            g = GaugeMetricFamily(name, doc, labels=["model_name", *labels])
            g.add_metric(model + list(labels.values()), value)
            return g

        def counter(name, doc, rows: dict | float, label: str | None = None):
            c = CounterMetricFamily(name, doc, labels=["model_name"] + ([label] if label else []))
            for key, value in (rows.items() if label else [(None, rows)]):
                c.add_metric(model + ([str(key)] if label else []), value)
            return c

        yield gauge("vllm:num_requests_running", "Number of requests in model execution batches.",
                    stats["num_running"])
        yield gauge("vllm:num_requests_waiting", "Number of requests waiting to be processed.", stats["num_waiting"])
        yield gauge("vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.", stats["kv_usage"])
        yield counter("vllm:prefix_cache_queries", "Prefix cache queries, in terms of number of queried tokens.",
                      stats["prefix_cache_queries"] * m.block_size)
        yield counter("vllm:prefix_cache_hits", "Prefix cache hits, in terms of number of cached tokens.",
                      stats["prefix_cache_hits"] * m.block_size)
        yield counter("vllm:num_preemptions", "Cumulative number of preemption from the engine.",
                      stats["num_preemptions_recompute"] + stats["num_preemptions_swap"])
        yield counter("vllm:prompt_tokens", "Number of prefill tokens processed.", stats["prompt_tokens"])
        yield counter("vllm:generation_tokens", "Number of generation tokens processed.", stats["generation_tokens"])
        yield counter("vllm:request_success", "Count of successfully processed requests.", dict(m.finished),
                      "finished_reason")
        info = GaugeMetricFamily("vllm:cache_config_info", "Information of the LLMEngine CacheConfig",
                                 labels=["model_name", *m.cache_info])
        info.add_metric(model + list(m.cache_info.values()), 1)
        yield info
        # rawpaged's own: what vLLM has no name for
        yield gauge("rawpaged_num_requests_swapped", "Requests swapped out to CPU memory.", stats["num_swapped"])
        yield gauge("rawpaged_kv_cache_free_blocks", "Free device KV cache blocks.", stats["num_free_blocks"])
        yield gauge("rawpaged_kv_cache_total_blocks", "Device KV cache blocks.", stats["num_device_blocks"])
        yield gauge("rawpaged_kv_cache_waste_slots", "Allocated KV token slots not holding a token (latest step).",
                    stats["memory_waste_slots"])
        yield gauge("rawpaged_kv_cache_mean_waste_ratio", "Mean over steps of wasted / allocated KV token slots.",
                    stats["mean_waste_fraction"])
        yield counter("rawpaged_num_preemptions", "Sequence groups preempted, by mode.",
                      {"recompute": stats["num_preemptions_recompute"], "swap": stats["num_preemptions_swap"]}, "mode")
        yield counter("rawpaged_engine_steps", "Engine iterations.", stats["num_steps"])
        yield counter("rawpaged_http_responses", "HTTP responses of the API endpoints, by status code.",
                      dict(sorted(m.http_responses.items())), "code")
