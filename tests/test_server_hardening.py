"""The server against hostile or careless clients: client mistakes are 400s (never 500s), the offline
API and the server refuse the same sampling values with the same message, bodies and headers are
bounded in size and time, and heavy work stays off the event loop (/health answers meanwhile).

Raw sockets play the slow clients (a client library would not send half a request).
"""
from __future__ import annotations

import json
import math
import socket
import threading
import time

import httpx
import pytest

from rawpaged import SamplingParams
from rawpaged.engine import EngineConfig, LLMEngine
from rawpaged.server.app import BackgroundServer, ServerConfig
from rawpaged.server.chat import ChatTemplate
from rawpaged.server.limits import ServerLimits

# A template that misbehaves on request: the first message's content picks the misbehaviour.
HOSTILE_TEMPLATE = (
    "{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}"
    "{% if messages[0].content == 'recurse' %}{{ f(1) }}"
    "{% elif messages[0].content == 'range' %}{% for i in range(10**9) %}x{% endfor %}"
    "{% elif messages[0].content == 'slow' %}{% for i in range(100000) %}{% for j in range(100000) %}"
    "{% endfor %}{% endfor %}"
    "{% elif messages[0].content == 'huge' %}{{ 'abc' * 10**8 }}"
    "{% else %}{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}assistant:{% endif %}")
LIMITS = ServerLimits(max_body_bytes=256 << 10, body_timeout_s=1.0, header_timeout_s=1.0, max_prompt_chars=4000)


@pytest.fixture(scope="module")
def server(stories260k_dir):
    engine = LLMEngine(EngineConfig(model=str(stories260k_dir), device="cpu", kv_cache_memory=8 << 20))
    template = ChatTemplate(HOSTILE_TEMPLATE, "<s>", "</s>", origin="test", render_timeout_s=0.5)
    with BackgroundServer(engine, ServerConfig("h", chat_template=template, limits=LIMITS)) as srv:
        yield srv


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, timeout=60) as c:
        yield c


def _error(r: httpx.Response, status: int = 400) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["message"] and "\n" not in err["message"], err
    return err


def _still_serving(http) -> None:
    r = http.post("/v1/completions", json={"prompt": "Once upon a time", "max_tokens": 3, "temperature": 0})
    assert r.status_code == 200 and r.json()["choices"][0]["text"]
    assert http.get("/health").status_code == 200


# -- one validator for the offline API and the server ----------------------------------------
# (field, the value as JSON text, the same value in Python)
SAME_REFUSAL = [
    ("temperature", "NaN", math.nan),
    ("temperature", "1e999", math.inf),
    ("top_p", "NaN", math.nan),
    ("min_p", "-Infinity", -math.inf),
    ("presence_penalty", "3", 3),
    ("logit_bias", '{"5": NaN}', {"5": math.nan}),
    ("logit_bias", '{"5": 1e999}', {"5": math.inf}),
    ("logit_bias", '{"abc": 1}', {"abc": 1}),
    ("stop", '[""]', [""]),
    ("stop", "5", 5),
    ("seed", "-1", -1),
    ("seed", str(2**64), 2**64),
    ("seed", "1.5", 1.5),
    ("n", "1.5", 1.5),
    ("n", '"2"', "2"),
    ("n", "true", True),
    ("n", "0", 0),
    ("n", "1" * 400, int("1" * 400)),
    ("best_of", "1e999", math.inf),
    ("top_k", "-5", -5),
    ("stop_token_ids", "[-1]", [-1]),
    ("logprobs", "21", 21),
    ("max_tokens", "0", 0),
    ("early_stopping", '"sometimes"', "sometimes"),
    ("ignore_eos", '"yes"', "yes"),
]


@pytest.mark.parametrize("name,json_text,value", SAME_REFUSAL, ids=[f"{c[0]}={c[1][:12]}" for c in SAME_REFUSAL])
def test_offline_and_server_refuse_alike(http, name, json_text, value):
    with pytest.raises(ValueError) as offline:
        SamplingParams(**{name: value})
    body = '{"prompt": "Once upon a time", "%s": %s}' % (name, json_text)
    err = _error(http.post("/v1/completions", content=body.encode(), headers={"content-type": "application/json"}))
    assert err["message"] == str(offline.value)
    assert err["param"] == name == offline.value.param
    assert len(err["message"]) < 200                     # a 400-digit integer is not quoted whole


def test_stop_empty_string_no_longer_stops_after_one_token():
    with pytest.raises(ValueError, match="stop strings must not be empty"):
        SamplingParams(stop=["x", ""])


def test_valid_values_are_normalized_alike():
    sp = SamplingParams(n=2.0, temperature=1, logit_bias={"5": 3}, stop="x", seed=2**64 - 1)
    assert (sp.n, type(sp.n), sp.temperature, type(sp.temperature)) == (2, int, 1.0, float)
    assert sp.logit_bias == {5: 3.0} and sp.stop == ["x"] and sp.best_of == 2


# -- client mistakes are 400s -----------------------------------------------------------------
RAW_MISTAKES = [
    ("/v1/completions", b'{"prompt": "\\ud800 lone"}', "prompt", "lone surrogate"),
    ("/v1/completions", b'{"prompt": ["ok", "\\udfff"]}', "prompt[1]", "lone surrogate"),
    ("/v1/completions", b'{"prompt": "x", "stop": ["\\ud800"]}', "stop[0]", "lone surrogate"),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "\\ud83d"}]}', "messages[0].content",
     "lone surrogate"),
    ("/v1/completions", b'{"prompt": "x", "\\ud800": 1}', "a key", "lone surrogate"),
    ("/v1/completions", b'{"prompt": "x", "max_tokens": ' + b"7" * 5000 + b"}", None, "too long"),
    ("/v1/completions", b'{"prompt": "x", "a": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", None, "nested too deeply"),
    ("/v1/completions", b'{"prompt": "x", "a": ' + b"[" * 100 + b"]" * 100 + b"}", "a" + "[0]" * 63, "nested too deeply"),
]


@pytest.mark.parametrize("path,body,param,reason", RAW_MISTAKES, ids=[m[3] + str(i) for i, m in enumerate(RAW_MISTAKES)])
def test_raw_body_mistakes_are_400(http, path, body, param, reason):
    err = _error(http.post(path, content=body, headers={"content-type": "application/json"}))
    assert reason in err["message"]
    assert err["param"] == param


CHAT_MISTAKES = [
    ({"chat_template_kwargs": {"messages": [{"role": "user", "content": "x"}]}}, "chat_template_kwargs", "messages"),
    ({"chat_template_kwargs": {"add_generation_prompt": False}}, "chat_template_kwargs", "add_generation_prompt"),
    ({"messages": [{"role": "user", "content": "recurse"}]}, "messages", "recursed too deeply"),
    ({"messages": [{"role": "user", "content": "range"}]}, "messages", "Range too big"),
    ({"messages": [{"role": "user", "content": "slow"}]}, "messages", "longer than 0.5 s"),
    ({"messages": [{"role": "user", "content": "huge"}]}, "messages", "would build"),
    ({"messages": [{"role": "user", "content": "x" * 4001}]}, "messages", "characters"),
]


@pytest.mark.parametrize("extra,param,reason", CHAT_MISTAKES, ids=[m[2] for m in CHAT_MISTAKES])
def test_chat_mistakes_are_400(http, extra, param, reason):
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, **extra}
    err = _error(http.post("/v1/chat/completions", json=body))
    assert reason in err["message"]
    assert err["param"] == param


def test_keeps_serving_after_mistakes(http):
    for path, body, _, _ in RAW_MISTAKES:
        http.post(path, content=body, headers={"content-type": "application/json"})
    _still_serving(http)
    r = http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "Tell me a story"}],
                                               "max_tokens": 3, "temperature": 0})
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"]


# -- limits -----------------------------------------------------------------------------------
def test_oversized_body_is_413(http):
    big = json.dumps({"prompt": "x" * (300 << 10)}).encode()
    err = _error(http.post("/v1/completions", content=big, headers={"content-type": "application/json"}), 413)
    assert err["code"] == "request_too_large" and str(256 << 10) in err["message"]

    def chunks():                                  # no Content-Length: counted while reading
        yield b'{"prompt": "'
        for _ in range(40):
            yield b"y" * 10_000
        yield b'"}'

    with httpx.Client(base_url=http.base_url, timeout=30) as fresh:
        err = _error(fresh.post("/v1/completions", content=chunks(), headers={"content-type": "application/json"}), 413)
    assert err["code"] == "request_too_large"
    _still_serving(http)


def test_prompt_characters_bounded_before_tokenizing(http):
    err = _error(http.post("/v1/completions", json={"prompt": "a " * 2001, "max_tokens": 1}))
    assert err["param"] == "prompt" and err["code"] == "context_length_exceeded"
    assert "4002 characters" in err["message"] and "at most 4000" in err["message"]
    err = _error(http.post("/tokenize", json={"prompt": "a" * 4001}))
    assert err["param"] == "prompt"


def _raw(server: BackgroundServer, data: bytes, wait: float = 10.0) -> tuple[bytes, float, bool]:
    """Send `data` on a fresh connection and read until the server closes it (or `wait` s pass):
    (what came back, seconds until the close, closed?)."""
    host, port = server.url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=wait)
    got, closed = b"", False
    try:
        sock.sendall(data)
        t0 = time.monotonic()
        while True:
            try:
                chunk = sock.recv(65536)
            except socket.timeout:
                break
            except ConnectionResetError:
                closed = True
                break
            if not chunk:
                closed = True
                break
            got += chunk
        return got, time.monotonic() - t0, closed
    finally:
        sock.close()


def test_half_sent_body_is_cut_off(server):
    head = (b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 200\r\n\r\n")
    got, took, closed = _raw(server, head + b'{"prompt": "Once upon')
    assert closed, f"connection still open after {took:.1f} s"
    status, _, rest = got.partition(b"\r\n")
    assert status == b"HTTP/1.1 408 Request Timeout", got
    assert json.loads(rest.split(b"\r\n\r\n", 1)[1])["error"]["code"] == "request_timeout"


@pytest.mark.parametrize("data", [b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Le", b"", b"GET /hea"],
                         ids=["half-header", "silent", "half-request-line"])
def test_half_sent_header_is_cut_off(server, data):
    got, took, closed = _raw(server, data)
    assert closed, f"connection still open after {took:.1f} s"
    assert got.startswith(b"HTTP/1.1 408 "), got


def test_header_timeout_applies_to_the_next_request_on_a_kept_alive_connection(server):
    first = b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n"
    got, took, closed = _raw(server, first + b"GET /health HTTP/1.1\r\nHo")
    assert got.startswith(b"HTTP/1.1 200 OK") and closed, (got, took)
    assert got.count(b"HTTP/1.1 ") == 2 and b"HTTP/1.1 408 " in got


# -- the event loop stays free ----------------------------------------------------------------
def test_health_answers_while_a_large_response_is_built(stories260k_dir):
    """16 choices echoing a 506-token prompt with 20 logprobs per token: a 4 MB answer that took
    seconds to build on the event loop (/health waited as long); built on a worker thread now."""
    engine = LLMEngine(EngineConfig(model=str(stories260k_dir), device="cpu", kv_cache_memory=8 << 20))
    prompt = "Once upon a time, there was a little girl named Lily. She liked to play. " * 24
    assert len(engine.tokenizer.encode(prompt)) > 500
    with BackgroundServer(engine, ServerConfig("s")) as srv:
        done: dict = {}

        def heavy():
            t0 = time.monotonic()
            r = httpx.post(srv.url + "/v1/completions", timeout=300, json={
                "prompt": prompt, "n": 16, "max_tokens": 1, "echo": True, "logprobs": 20, "seed": 1})
            done.update(status=r.status_code, size=len(r.content), took=time.monotonic() - t0)

        worker = threading.Thread(target=heavy)
        worker.start()
        latencies = []
        with httpx.Client(base_url=srv.url, timeout=60) as c:
            while worker.is_alive():
                t0 = time.monotonic()
                assert c.get("/health").status_code == 200
                latencies.append(time.monotonic() - t0)
                time.sleep(0.02)
        worker.join()
    assert done["status"] == 200 and done["size"] > 3_000_000
    # generous: the answer takes seconds here; /health must not wait for it
    assert max(latencies) < 1.0, (max(latencies), done)
    assert done["took"] > 3 * max(latencies), (max(latencies), done)


def test_connection_limit_answers_503(stories260k_dir):
    """uvicorn's limit_concurrency: past it a request gets 503 at once instead of a file descriptor."""
    engine = LLMEngine(EngineConfig(model=str(stories260k_dir), device="cpu", kv_cache_memory=1 << 20))
    with BackgroundServer(engine, ServerConfig("c", limits=ServerLimits(limit_concurrency=3))) as srv:
        host, port = srv.url.removeprefix("http://").split(":")
        idle = [socket.create_connection((host, int(port)), timeout=5) for _ in range(3)]
        try:
            time.sleep(0.2)                               # the server has accepted them
            assert httpx.get(srv.url + "/health", timeout=10).status_code == 503
        finally:
            for s in idle:
                s.close()
        deadline = time.monotonic() + 10
        while httpx.get(srv.url + "/health", timeout=10).status_code != 200:
            assert time.monotonic() < deadline
            time.sleep(0.05)


def test_answer_before_the_body_keeps_the_connection(server):
    """A response sent before its body arrived (an unknown route, a 401, a 503 at shutdown) leaves the
    kept-alive connection usable: the late body is dropped, the next request is served."""
    host, port = server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(b"POST /nope HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\n")
        got = b""
        while b"\r\n\r\n" not in got or not got.endswith(b"}"):
            got += sock.recv(65536)
        assert got.startswith(b"HTTP/1.1 404 ")
        sock.sendall(b"0123456789" + b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        got = sock.recv(65536)
        assert got.startswith(b"HTTP/1.1 200 "), got
