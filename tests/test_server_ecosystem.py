"""The server in vLLM's ecosystem: vLLM's metric names (what Grafana dashboards and the Kubernetes
inference gateway read), one log line per request and a periodic engine line, and the smaller
OpenAI / vLLM endpoints and fields (/tokenize, /detokenize, /version, echo with max_tokens 0, the
fields accepted with no effect or refused)."""
from __future__ import annotations

import logging
import re
import threading
from pathlib import Path

import httpx
import pytest

from rawpaged import LLM, SamplingParams
from rawpaged.engine import EngineConfig, LLMEngine
from server_helpers import gate, wait_for
from rawpaged.server import protocol
from rawpaged.server.app import BackgroundServer, ServerConfig
from rawpaged.server.chat import ChatTemplate
from rawpaged.server.logs import JsonFormatter, RateLimitFilter

prometheus = pytest.importorskip("prometheus_client.parser")

PROMPT = "Once upon a time"
MODEL = 'stories "260k"'           # a served name that needs escaping in label values
TEMPLATE = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}" \
           "{% if add_generation_prompt %}assistant:{% endif %}"


@pytest.fixture(scope="module")
def ref(stories260k_dir):
    return LLM(stories260k_dir, device="cpu", kv_cache_memory=8 << 20)


@pytest.fixture(scope="module")
def server(stories260k_dir):
    # NOTE: one sequence at a time, so a second request waits: the waiting gauge has something to show.
    engine = LLMEngine(EngineConfig(model=str(stories260k_dir), device="cpu", kv_cache_memory=8 << 20,
                                    max_num_seqs=1))
    config = ServerConfig(MODEL, chat_template=ChatTemplate(TEMPLATE, "<s>", "</s>", origin="test"),
                          stats_log_interval_s=0.2)
    with BackgroundServer(engine, config) as srv:
        yield srv


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, timeout=60) as c:
        yield c


# -- metrics ----------------------------------------------------------------------------------
def _scrape(http) -> list:
    r = http.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    return [s for fam in prometheus.text_string_to_metric_families(r.text) for s in fam.samples]


_SELECTOR = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?$')
_MATCHER = re.compile(r'\s*([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"\s*,?')


def select(samples, selector: str) -> list[float]:
    """A Grafana / PromQL instant selector with `=` matchers (name{label="value",...}) -> values."""
    name, matchers = _SELECTOR.match(selector).groups()
    want = {k: bytes(v, "utf-8").decode("unicode_escape") for k, v in _MATCHER.findall(matchers or "")}
    return [s.value for s in samples if s.name == name and all(s.labels.get(k) == v for k, v in want.items())]


def one(samples, selector: str) -> float:
    values = select(samples, selector)
    assert len(values) == 1, (selector, values)
    return values[0]


def test_select_resolves_like_prometheus():
    from prometheus_client.samples import Sample
    samples = [Sample("vllm:x", {"model_name": 'a "b"', "k": "1"}, 3.0), Sample("vllm:x", {"model_name": "c"}, 4.0)]
    assert select(samples, 'vllm:x{model_name="a \\"b\\""}') == [3.0]
    assert select(samples, "vllm:x") == [3.0, 4.0]
    assert select(samples, 'vllm:x{model_name="c",k="1"}') == []


M = 'model_name="stories \\"260k\\""'


def test_vllm_gauges_move_grafana_selectors_resolve(http, server):
    """vllm:num_requests_running / _waiting and vllm:kv_cache_usage_perc (a fraction, 0..1, as in
    vLLM), read with the selectors a dashboard or the inference gateway uses."""
    idle = _scrape(http)
    assert one(idle, f"vllm:num_requests_running{{{M}}}") == 0
    assert one(idle, f"vllm:num_requests_waiting{{{M}}}") == 0
    assert one(idle, f"vllm:kv_cache_usage_perc{{{M}}}") == 0
    body = {"prompt": PROMPT, "max_tokens": 400, "ignore_eos": True, "stream": True}
    with httpx.Client(base_url=server.url, timeout=60) as a, httpx.Client(base_url=server.url, timeout=60) as b, \
            a.stream("POST", "/v1/completions", json=body) as first:
        lines = first.iter_lines()
        assert next(line for line in lines if line).startswith("data: {")
        release = gate(server)                  # the first request cannot finish meanwhile
        second = threading.Thread(target=lambda: b.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 2}))
        second.start()
        wait_for(lambda: server.state.engine.num_in_flight == 2, what="the second request to be queued")
        release.set()
        wait_for(lambda: server.state.engine.stats["num_waiting"] == 1, what="the second request to wait")
        release = gate(server)
        try:
            busy = _scrape(http)
        finally:
            release.set()
        list(lines)
        second.join(30)
    assert one(busy, f"vllm:num_requests_running{{{M}}}") == 1
    assert one(busy, f"vllm:num_requests_waiting{{{M}}}") == 1
    assert 0 < one(busy, f"vllm:kv_cache_usage_perc{{{M}}}") <= 1
    wait_for(lambda: server.state.engine.stats["num_running"] == 0, what="the engine to fall idle")
    after = _scrape(http)
    assert one(after, f"vllm:num_requests_running{{{M}}}") == 0
    assert one(after, f"vllm:kv_cache_usage_perc{{{M}}}") == 0


def test_vllm_counters_and_histograms_move(http, server, ref):
    before = _scrape(http)
    r = http.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 7, "temperature": 0, "ignore_eos": True})
    assert r.status_code == 200
    r = http.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 30, "temperature": 0, "stop": [" named"]})
    assert r.json()["choices"][0]["finish_reason"] == "stop"
    after = _scrape(http)

    def delta(selector):
        return sum(select(after, selector)) - sum(select(before, selector))

    n_prompt = len(ref.tokenizer.encode(PROMPT))
    n_stop = len(ref.generate([PROMPT], SamplingParams(temperature=0, max_tokens=30, stop=[" named"]))[0]
                 .outputs[0].token_ids)
    assert delta(f"vllm:generation_tokens_total{{{M}}}") == 7 + n_stop
    assert delta(f"vllm:prompt_tokens_total{{{M}}}") >= 1
    assert delta(f'vllm:request_success_total{{{M},finished_reason="length"}}') == 1
    assert delta(f'vllm:request_success_total{{{M},finished_reason="stop"}}') == 1
    for reason in ("abort", "error"):
        assert select(after, f'vllm:request_success_total{{{M},finished_reason="{reason}"}}') != []
    for hist in ("time_to_first_token_seconds", "e2e_request_latency_seconds", "request_queue_time_seconds",
                 "request_prefill_time_seconds", "request_decode_time_seconds", "request_inference_time_seconds",
                 "request_time_per_output_token_seconds", "request_prompt_tokens", "request_generation_tokens",
                 "request_max_num_generation_tokens", "request_params_n", "request_params_max_tokens"):
        assert delta(f"vllm:{hist}_count{{{M}}}") == 2, hist
        assert delta(f'vllm:{hist}_bucket{{{M},le="+Inf"}}') == 2, hist
    assert delta(f"vllm:time_to_first_token_seconds_sum{{{M}}}") > 0
    # one inter-token interval per step after the first token, whatever the client reads
    assert delta(f"vllm:inter_token_latency_seconds_count{{{M}}}") == 6 + n_stop - 1
    assert delta(f"vllm:request_prompt_tokens_sum{{{M}}}") == 2 * n_prompt
    assert delta(f"vllm:request_generation_tokens_sum{{{M}}}") == 7 + n_stop
    assert delta(f"vllm:iteration_tokens_total_sum{{{M}}}") == delta(f"vllm:generation_tokens_total{{{M}}}") \
        + delta(f"vllm:prompt_tokens_total{{{M}}}")
    assert delta(f'rawpaged_http_responses_total{{{M},code="200"}}') == 2
    # max_num_seqs=1: the pool is capped at one sequence of max_model_len (512 tokens), plus the watermark
    blocks = server.state.engine.engine.cache_size.num_device_blocks
    assert blocks == 33
    assert one(after, f"rawpaged_kv_cache_total_blocks{{{M}}}") == blocks
    assert one(after, f"rawpaged_kv_cache_free_blocks{{{M}}}") == blocks
    assert one(after, f'vllm:cache_config_info{{{M},block_size="16",num_gpu_blocks="{blocks}"}}') == 1
    for name in ("vllm:num_preemptions_total", "rawpaged_num_requests_swapped", "rawpaged_engine_steps_total",
                 "rawpaged_kv_cache_waste_slots", "rawpaged_kv_cache_mean_waste_ratio"):
        assert select(after, f"{name}{{{M}}}"), name
    for mode in ("recompute", "swap"):
        assert select(after, f'rawpaged_num_preemptions_total{{{M},mode="{mode}"}}')
    # the deprecated name is gone, as in vLLM 0.12+
    assert not select(after, "vllm:time_per_output_token_seconds_count")


def test_prefix_cache_counters_in_tokens(http):
    long_prompt = "Once upon a time, there was a little girl named Lily. She loved to play outside in the park."
    before = _scrape(http)
    for _ in range(2):
        assert http.post("/v1/completions", json={"prompt": long_prompt, "max_tokens": 2}).status_code == 200
    after = _scrape(http)
    hits = sum(select(after, f"vllm:prefix_cache_hits_total{{{M}}}")) - sum(select(before, f"vllm:prefix_cache_hits_total{{{M}}}"))
    queries = sum(select(after, f"vllm:prefix_cache_queries_total{{{M}}}")) - \
        sum(select(before, f"vllm:prefix_cache_queries_total{{{M}}}"))
    assert hits > 0 and hits % 16 == 0 and queries >= hits      # whole blocks of 16 tokens


def test_aborted_request_counts_as_abort(http, server):
    before = sum(select(_scrape(http), f'vllm:request_success_total{{{M},finished_reason="abort"}}'))
    c = httpx.Client(base_url=server.url, timeout=60)
    ctx = c.stream("POST", "/v1/completions", json={"prompt": PROMPT, "max_tokens": 400, "ignore_eos": True,
                                                    "stream": True})
    assert next(line for line in ctx.__enter__().iter_lines() if line).startswith("data: {")
    release = gate(server)                      # it cannot finish before the server notices the client left
    try:
        ctx.__exit__(None, None, None)
        c.close()
        wait_for(lambda: server.state.engine.num_in_flight == 0, what="the abort")
    finally:
        release.set()
    wait_for(lambda: sum(select(_scrape(http), f'vllm:request_success_total{{{M},finished_reason="abort"}}'))
              == before + 1, what="the abort to be counted")


# -- logs -------------------------------------------------------------------------------------
def test_one_log_line_per_request_and_per_error(http, caplog):
    caplog.set_level(logging.INFO, logger="rawpaged.server")
    ok = http.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 5, "temperature": 0})
    with http.stream("POST", "/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}],
                                                           "max_tokens": 4, "stream": True}) as resp:
        list(resp.iter_lines())
        streamed_id = resp.headers["x-request-id"]
    bad = http.post("/v1/completions", json={"prompt": PROMPT, "temperature": -1})
    missing = http.post("/v1/completions", json={"prompt": PROMPT, "model": "nope"})
    http.get("/health")
    http.get("/metrics")
    wait_for(lambda: any(streamed_id in r.getMessage() for r in caplog.records), what="the stream's line")
    lines = [r for r in caplog.records if r.name == "rawpaged.server.requests"]
    ids = [ok.json()["id"], streamed_id, bad.headers["x-request-id"], missing.headers["x-request-id"]]
    for rid in ids:
        mine = [r for r in lines if r.fields["request_id"] == rid]
        assert len(mine) == 1, (rid, [r.getMessage() for r in lines])
    by_id = {r.fields["request_id"]: r for r in lines}
    good = by_id[ids[0]].fields
    assert good["status"] == 200 and good["prompt_tokens"] == 5 and good["completion_tokens"] == 5
    assert good["ttft_s"] > 0 and good["total_s"] >= good["ttft_s"]
    assert re.search(r" POST /v1/completions 200 client=127\.0\.0\.1:\d+ prompt_tokens=5 completion_tokens=5 "
                     r"ttft=\d\.\d{3}s total=\d\.\d{3}s$", by_id[ids[0]].getMessage())
    assert by_id[ids[1]].fields["status"] == 200 and by_id[ids[1]].fields["completion_tokens"] == 4
    assert by_id[ids[2]].fields["status"] == 400 and "temperature must be >= 0" in by_id[ids[2]].fields["error"]
    assert 'error="temperature must be >= 0' in by_id[ids[2]].getMessage()
    assert by_id[ids[3]].fields["status"] == 404 and "does not exist" in by_id[ids[3]].fields["error"]
    assert not [r for r in lines if r.fields["path"] in ("/health", "/metrics")]


def test_periodic_engine_line_while_busy(http, caplog):
    caplog.set_level(logging.INFO, logger="rawpaged.server")
    http.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 100, "ignore_eos": True})
    wait_for(lambda: any(r.getMessage().startswith("engine: ") for r in caplog.records), what="an engine line")
    line = next(r for r in caplog.records if r.getMessage().startswith("engine: "))
    assert re.fullmatch(r"engine: \d+ running, \d+ waiting, \d+ swapped, KV cache \d+\.\d%, "
                        r"prompt \d+\.\d tokens/s, generation \d+\.\d tokens/s", line.getMessage())
    assert set(line.fields) == {"running", "waiting", "swapped", "kv_cache_usage", "prompt_tokens_per_s",
                                "generation_tokens_per_s"}


def test_json_log_format_and_flood_filter():
    import json

    record = logging.LogRecord("rawpaged.server.requests", logging.INFO, __file__, 1, "%s done", ("r1",), None)
    record.fields = {"request_id": "r1", "status": 200, "text": 'q"uote\nnewline'}
    line = JsonFormatter().format(record)
    assert "\n" not in line
    obj = json.loads(line)
    assert obj["message"] == "r1 done" and obj["status"] == 200 and obj["level"] == "INFO"
    assert obj["time"].endswith("Z")

    flt = RateLimitFilter(window=60)

    def rec(name, msg, level=logging.ERROR):
        return logging.LogRecord(name, level, __file__, 1, msg, None, None)

    accepts = [rec("asyncio", "socket.accept() out of system resource\nsocket: <x>") for _ in range(1000)]
    assert sum(flt.filter(r) for r in accepts) == 1
    assert flt.filter(rec("asyncio", "another kind"))                      # another kind passes
    assert all(flt.filter(rec("rawpaged.server.requests", "x", logging.ERROR)) for _ in range(5))
    assert all(flt.filter(rec("uvicorn.error", "x", logging.INFO)) for _ in range(5))
    flt._seen[("asyncio", "socket.accept() out of system resource")][0] -= 61      # a minute later
    late = rec("asyncio", "socket.accept() out of system resource")
    assert flt.filter(late) and "999 more like this" in late.msg


# -- smaller OpenAI / vLLM gaps ---------------------------------------------------------------
def test_echo_with_max_tokens_0_scores_the_prompt(http, ref):
    want = ref.generate([PROMPT], SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=2))[0]
    ids = want.prompt_token_ids
    r = http.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 0, "echo": True, "logprobs": 2})
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    assert choice["text"] == PROMPT and choice["finish_reason"] == "length"
    assert r.json()["usage"] == {"prompt_tokens": len(ids), "completion_tokens": 0, "total_tokens": len(ids)}
    lp = choice["logprobs"]
    assert len(lp["tokens"]) == len(ids) and lp["token_logprobs"][0] is None
    assert lp["token_logprobs"][1:] == [d[t] for t, d in zip(ids[1:], want.prompt_logprobs[1:])]
    assert all(2 <= len(top) <= 3 for top in lp["top_logprobs"][1:])
    # streamed: one chunk with the prompt, then [DONE]
    with http.stream("POST", "/v1/completions", json={"prompt": PROMPT, "max_tokens": 0, "echo": True, "logprobs": 2,
                                                      "stream": True}) as resp:
        events = [line[6:] for line in resp.iter_lines() if line]
    import json
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e)["choices"][0] for e in events[:-1]]
    assert "".join(c["text"] for c in chunks) == PROMPT and chunks[-1]["finish_reason"] == "length"
    assert sum(len(c["logprobs"]["tokens"]) for c in chunks) == len(ids)
    # without echo, max_tokens 0 is refused as offline
    r = http.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 0})
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens"


def test_tokenize_detokenize_version(http, ref):
    tok = ref.tokenizer
    r = http.post("/tokenize", json={"model": MODEL, "prompt": PROMPT})
    assert r.status_code == 200
    assert r.json() == {"count": len(tok.encode(PROMPT)), "max_model_len": 512, "tokens": tok.encode(PROMPT),
                        "token_strs": None}
    r = http.post("/tokenize", json={"prompt": PROMPT, "add_special_tokens": False, "return_token_strs": True}).json()
    assert r["tokens"] == tok.encode(PROMPT, add_special_tokens=False)
    assert r["token_strs"] == tok.convert_ids_to_tokens(r["tokens"])
    chat = [{"role": "user", "content": "Tell me a story."}]
    r = http.post("/tokenize", json={"messages": chat}).json()
    assert r["tokens"] == tok.encode("user: Tell me a story.\nassistant:", add_special_tokens=False)
    r = http.post("/detokenize", json={"tokens": tok.encode(PROMPT)})
    assert r.status_code == 200 and r.json() == {"prompt": tok.decode(tok.encode(PROMPT), skip_special_tokens=False)}
    assert http.post("/detokenize", json={"tokens": [99999]}).json()["error"]["param"] == "tokens"
    assert http.post("/detokenize", json={"tokens": "abc"}).json()["error"]["param"] == "tokens"
    assert http.post("/tokenize", json={}).json()["error"]["param"] == "prompt"
    assert http.post("/tokenize", json={"prompt": "x", "model": "other"}).status_code == 404
    import rawpaged
    assert http.get("/version").json() == {"version": rawpaged.__version__}


@pytest.mark.parametrize("field,value", [
    ("tool_choice", "auto"), ("tool_choice", {"type": "function", "function": {"name": "f"}}),
    ("functions", [{"name": "f"}]), ("function_call", "auto"), ("echo", True),
    ("guided_decoding_backend", "xgrammar"), ("guided_whitespace_pattern", " "), ("continue_final_message", True),
    ("chat_template", "{{ messages }}"), ("min_tokens", 3), ("prompt_logprobs", 1), ("modalities", ["audio"]),
    ("logits_processors", ["x"]), ("priority", 1),
])
def test_refused_fields_name_themselves(http, field, value):
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, field: value}
    r = http.post("/v1/chat/completions", json=body)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == field


@pytest.mark.parametrize("field,value", [("tool_choice", "none"), ("parallel_tool_calls", True), ("echo", False),
                                         ("user", "u1"), ("store", False), ("metadata", {"a": "b"}),
                                         ("modalities", ["text"]), ("min_tokens", 0), ("priority", 0),
                                         ("response_format", {"type": "text"}), ("brand_new_field", 1)])
def test_neutral_and_ignored_fields_are_accepted_and_logged(http, caplog, field, value):
    caplog.set_level(logging.DEBUG, logger="rawpaged.server")
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "temperature": 0, field: value}
    r = http.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    if field in protocol.IGNORED or field == "brand_new_field":
        rid = r.json()["id"]
        assert any(rec.getMessage() == f"{rid}: ignoring field(s) {field} (accepted, no effect here)"
                   for rec in caplog.records)


def test_docs_list_every_field_rule():
    docs = (Path(__file__).resolve().parent.parent / "docs" / "server.md").read_text()
    for name in sorted(protocol.IGNORED | set(protocol.REFUSED_CHAT) | set(protocol.REFUSED_COMPLETION)):
        assert f"`{name}`" in docs, f"docs/server.md does not mention {name}"
