"""`rawpaged serve` as a user runs it: a subprocess, its log, its API key, its chat template file,
and a clean stop on SIGTERM (new requests 503, the request in flight finishes, exit status 0)."""
from __future__ import annotations

import json
import os
import resource
import signal
import socket
import sys
import time
from pathlib import Path

import httpx
import pytest

from rawpaged import LLM, SamplingParams
from server_helpers import ServeProcess

REPO_ROOT = Path(__file__).resolve().parent.parent
TEMPLATE = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}" \
           "{% if add_generation_prompt %}assistant:{% endif %}"


class Served(ServeProcess):
    """`python -m rawpaged.cli serve ARGS` from this checkout, optionally at an open-file limit."""

    def __init__(self, *args: str, max_open_files: int | None = None):
        env = {**os.environ, "PYTHONPATH": str(REPO_ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}

        def limit_files():                  # soft and hard: the server cannot raise it
            resource.setrlimit(resource.RLIMIT_NOFILE, (max_open_files, max_open_files))

        super().__init__([sys.executable, "-m", "rawpaged.cli", "serve", *args], env=env,
                         preexec_fn=limit_files if max_open_files else None)


@pytest.fixture
def serve():
    started: list[Served] = []

    def start(*args: str, **kw) -> Served:
        s = Served(*args, **kw)
        started.append(s)
        return s

    yield start
    for s in started:
        s.close()


def test_serve_key_template_and_sigterm(serve, stories260k_dir, tmp_path):
    tpl = tmp_path / "chat.jinja"
    tpl.write_text(TEMPLATE)
    srv = serve("--model", str(stories260k_dir), "--device", "cpu", "--kv-cache-memory", str(8 << 20),
                "--port", "0", "--api-key", "k3y", "--chat-template", str(tpl), "--served-model-name", "stories")
    url = srv.wait_ready()
    first = srv.lines[0]
    assert str(stories260k_dir) in first and "cpu" in first and "409 KV blocks" in first, first
    assert f"kv_cache_memory={8 << 20} bytes: 409 blocks" in first, first       # how the pool was sized
    auth = {"Authorization": "Bearer k3y"}
    with httpx.Client(base_url=url, timeout=60) as c:
        assert c.post("/v1/completions", json={"prompt": "Once", "max_tokens": 2}).status_code == 401
        # the chat template file renders the messages (no BOS: the template writes none)
        messages = [{"role": "user", "content": "Tell me a story."}]
        r = c.post("/v1/chat/completions", headers=auth, json={"model": "stories", "messages": messages,
                                                               "max_tokens": 12, "temperature": 0})
        assert r.status_code == 200, r.text
        ref = LLM(stories260k_dir, device="cpu", kv_cache_memory=8 << 20)
        ids = ref.tokenizer.encode("user: Tell me a story.\nassistant:", add_special_tokens=False)
        want = ref.generate(None, SamplingParams(max_tokens=12, temperature=0), prompt_token_ids=[ids])[0]
        assert r.json()["choices"][0]["message"]["content"] == want.outputs[0].text
        assert r.json()["usage"]["prompt_tokens"] == len(ids)

        # a long stream is in flight when SIGTERM arrives (8 x 480 tokens take seconds here)
        body = {"prompt": "Once upon a time", "max_tokens": 480, "n": 8, "temperature": 0.8, "seed": 1,
                "ignore_eos": True, "stream": True}
        with c.stream("POST", "/v1/completions", headers=auth, json=body) as resp:
            lines = resp.iter_lines()
            assert next(line for line in lines if line).startswith("data: {")
            srv.proc.send_signal(signal.SIGTERM)
            time.sleep(0.3)                                          # the signal is handled
            with httpx.Client(base_url=url, timeout=30) as other:
                r = other.post("/v1/completions", headers=auth, json={"prompt": "Once", "max_tokens": 2})
                assert r.status_code == 503, r.text
                assert r.json()["error"]["code"] == "server_shutting_down"
                assert other.get("/health").status_code == 503
            events = [line[6:] for line in lines if line]
        assert events[-1] == "[DONE]"
        finish = {}
        for e in events[:-1]:
            for ch in json.loads(e)["choices"]:
                if ch["finish_reason"]:
                    finish[ch["index"]] = ch["finish_reason"]
        assert finish == {i: "length" for i in range(8)}            # finished, not aborted
    assert srv.exit_status(30) == 0
    assert any("shutting down" in line for line in srv.lines)


def test_serve_user_errors_are_one_line(serve, stories260k_dir, tmp_path):
    missing = serve("--model", str(tmp_path / "nope"), "--device", "cpu", "--port", "0")
    assert missing.exit_status() == 1
    assert len(missing.lines) == 1 and missing.lines[0].startswith("rawpaged: error:"), missing.lines

    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    try:
        port = str(busy.getsockname()[1])
        taken = serve("--model", str(stories260k_dir), "--device", "cpu", "--kv-cache-memory", str(1 << 20),
                      "--port", port)
        assert taken.exit_status() == 1
        assert taken.lines[-1].startswith("rawpaged: error: cannot listen on 127.0.0.1:" + port), taken.lines
        bad_tpl = serve("--model", str(stories260k_dir), "--device", "cpu", "--kv-cache-memory", str(1 << 20),
                        "--port", "0", "--chat-template", str(tmp_path / "missing.jinja"))
        assert bad_tpl.exit_status() == 1
        assert bad_tpl.lines[-1].startswith("rawpaged: error: chat template file not found"), bad_tpl.lines
    finally:
        busy.close()


def test_serve_json_logs_one_line_per_request(serve, stories260k_dir):
    srv = serve("--model", str(stories260k_dir), "--device", "cpu", "--kv-cache-memory", str(8 << 20),
                "--port", "0", "--log-format", "json", "--log-stats-interval", "0.2")
    url = srv.wait_ready()
    with httpx.Client(base_url=url, timeout=60) as c:
        ok = c.post("/v1/completions", json={"prompt": "Once upon a time", "max_tokens": 200, "ignore_eos": True})
        with c.stream("POST", "/v1/completions", json={"prompt": "Once", "max_tokens": 5, "stream": True}) as resp:
            list(resp.iter_lines())
            streamed = resp.headers["x-request-id"]
        bad = c.post("/v1/completions", json={"prompt": "Once", "top_p": 0})
        junk = c.post("/v1/completions", content=b"{not json")
        assert c.get("/health").status_code == 200
    srv.proc.send_signal(signal.SIGTERM)
    assert srv.exit_status(30) == 0
    records = [json.loads(line) for line in srv.lines]            # every line is one JSON object
    assert all({"time", "level", "logger", "message"} <= set(r) for r in records)
    requests = [r for r in records if r["logger"] == "rawpaged.server.requests"]
    ids = [ok.json()["id"], streamed, bad.headers["x-request-id"], junk.headers["x-request-id"]]
    assert sorted(r["request_id"] for r in requests) == sorted(ids)           # one line each, nothing else
    by_id = {r["request_id"]: r for r in requests}
    assert by_id[ids[0]]["status"] == 200 and by_id[ids[0]]["completion_tokens"] == 200
    assert by_id[ids[0]]["prompt_tokens"] == 5 and by_id[ids[0]]["ttft_s"] >= 0 and by_id[ids[0]]["total_s"] > 0
    assert by_id[ids[1]]["completion_tokens"] == 5 and "error" not in by_id[ids[1]]
    assert by_id[ids[2]]["status"] == 400 and by_id[ids[2]]["error"] == "top_p must be in (0, 1], got 0.0"
    assert by_id[ids[3]]["status"] == 400 and "not valid JSON" in by_id[ids[3]]["error"]
    engine = [r for r in records if r["message"].startswith("engine: ")]
    assert engine and any(r["generation_tokens_per_s"] > 0 for r in engine)
    assert any("running on http://" in r["message"] for r in records)


def test_serve_accept_errors_at_the_fd_limit_do_not_flood(serve, stories260k_dir):
    """At its open-file limit the server fails accept() in a loop; asyncio logged every failure with
    a traceback (thousands of lines a second). Now: the first, then at most one a minute."""
    srv = serve("--model", str(stories260k_dir), "--device", "cpu", "--kv-cache-memory", str(1 << 20),
                "--port", "0", max_open_files=100)
    url = srv.wait_ready()
    host, port = url.removeprefix("http://").split(":")
    clients = []
    try:
        for _ in range(150):                          # more connections than the server has descriptors
            clients.append(socket.create_connection((host, int(port)), timeout=5))
        time.sleep(2.5)
    finally:
        for c in clients:
            c.close()
    deadline = time.monotonic() + 20
    while True:                                       # the server recovers once the clients are gone
        try:
            if httpx.get(url + "/health", timeout=5).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline, srv.lines[-20:]
        time.sleep(0.2)
    srv.proc.send_signal(signal.SIGTERM)
    assert srv.exit_status(30) == 0
    failures = [line for line in srv.lines if "socket.accept() out of system resource" in line]
    assert 1 <= len(failures) <= 2, len(failures)
