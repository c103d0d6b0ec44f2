"""The OpenAI-compatible server against a real uvicorn on 127.0.0.1 (a free port), CPU backend.

Texts are compared with what LLM.generate gives for the same parameters (stories260K, a real
pretrained model, and the llama-gqa fixture whose chat template transformers rendered for us).
Engine timing is made deterministic where a test needs it by parking the engine thread in a
submitted call (`gate`): the event loop keeps running, the engine takes no step until released.
"""
from __future__ import annotations

import asyncio
import json
import threading
import time
from pathlib import Path

import httpx
import pytest

from rawpaged import LLM, SamplingParams
from rawpaged.engine import EngineConfig, LLMEngine
from server_helpers import gate, wait_for
from rawpaged.server.app import BackgroundServer, ServerConfig
from rawpaged.server.chat import load_chat_template

openai = pytest.importorskip("openai")

KV = 8 << 20                          # 409 blocks of 16 tokens for stories260K
GQA_DIR = Path(__file__).parent / "fixtures" / "llama-gqa"
# transformers' apply_chat_template output for this chat (tests/fixtures/README.md)
GQA_CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"},
            {"role": "assistant", "content": "Hi"}, {"role": "user", "content": "Tell me a story."}]
GQA_RENDERED = "<s>[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nHello [/INST] Hi </s><s>[INST] Tell me a story. [/INST]"
PROMPT = "Once upon a time"


# -- fixtures -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ref(stories260k_dir):
    """The offline API on the same model: the reference texts."""
    return LLM(stories260k_dir, device="cpu", kv_cache_memory=KV)


def _engine(path, kv=KV) -> LLMEngine:
    return LLMEngine(EngineConfig(model=str(path), device="cpu", kv_cache_memory=kv))


@pytest.fixture(scope="module")
def server(stories260k_dir):
    with BackgroundServer(_engine(stories260k_dir), ServerConfig("stories260k")) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, timeout=60) as c:
        yield c


@pytest.fixture(scope="module")
def gqa():
    if not (GQA_DIR / "config.json").is_file():
        pytest.skip(f"fixture {GQA_DIR} not found")
    engine = _engine(GQA_DIR, kv=2 << 20)
    with BackgroundServer(engine, ServerConfig("gqa", chat_template=load_chat_template(engine.tokenizer, None))) as srv:
        yield srv, LLM(GQA_DIR, device="cpu", kv_cache_memory=2 << 20)


def _gen(ref: LLM, prompt=PROMPT, ids=None, **kw):
    sp = SamplingParams(**kw)
    if ids is not None:
        return ref.generate(None, sp, prompt_token_ids=[ids])[0]
    return ref.generate([prompt], sp)[0]


def _blocks(srv: BackgroundServer) -> tuple[int, int]:
    """(free, total) device blocks, asked on the engine thread."""
    return srv.state.engine.submit(lambda e: (e.block_manager.get_num_free_device_blocks(),
                                              e.block_manager.num_device_blocks)).result(10)


def _stats(srv: BackgroundServer) -> dict:
    return srv.state.engine.submit(lambda e: e.get_stats()).result(10)


def _sse(lines) -> list:
    """Parse server-sent events: a list of JSON objects, then the string '[DONE]'."""
    events = []
    for line in lines:
        if not line:
            continue
        assert line.startswith("data: "), line
        data = line[len("data: "):]
        events.append(data if data == "[DONE]" else json.loads(data))
    return events


# -- the openai client --------------------------------------------------------------------------
def test_completion_equals_llm_generate(client, ref):
    r = client.completions.create(model="stories260k", prompt=PROMPT, max_tokens=24, temperature=0)
    want = _gen(ref, max_tokens=24, temperature=0)
    assert r.choices[0].text == want.outputs[0].text
    assert r.choices[0].text.startswith(", there was a little girl named Lily")
    assert r.choices[0].finish_reason == "length"
    assert r.usage.prompt_tokens == len(want.prompt_token_ids)
    assert r.usage.completion_tokens == 24


def test_completion_streamed(client, ref):
    chunks = list(client.completions.create(model="stories260k", prompt=PROMPT, max_tokens=40, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    want = _gen(ref, max_tokens=40, temperature=0).outputs[0]
    assert "".join(c.choices[0].text for c in chunks if c.choices) == want.text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 40


def test_chat_completion_equals_llm_generate(gqa):
    srv, gref = gqa
    cl = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0)
    ids = gref.tokenizer.encode(GQA_RENDERED, add_special_tokens=False)
    assert ids.count(gref.tokenizer.bos_token_id) == 2 and ids[0] == gref.tokenizer.bos_token_id
    want = _gen(gref, ids=ids, max_tokens=12, temperature=0).outputs[0]
    r = cl.chat.completions.create(model="gqa", messages=GQA_CHAT, max_tokens=12, temperature=0)
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == want.text
    assert r.usage.prompt_tokens == len(ids) and r.usage.completion_tokens == 12
    chunks = list(cl.chat.completions.create(model="gqa", messages=GQA_CHAT, max_tokens=12, temperature=0,
                                             stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want.text
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.prompt_tokens == len(ids)


def test_chat_logprobs_schema(gqa):
    srv, gref = gqa
    cl = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0)
    ids = gref.tokenizer.encode(GQA_RENDERED, add_special_tokens=False)
    want = _gen(gref, ids=ids, max_tokens=6, temperature=0, logprobs=3).outputs[0]
    r = cl.chat.completions.create(model="gqa", messages=GQA_CHAT, max_tokens=6, temperature=0,
                                   logprobs=True, top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert len(content) == 6
    for item, tid, lps in zip(content, want.token_ids, want.logprobs):
        assert item.logprob == lps[tid]
        assert len(item.top_logprobs) == 3
        # greedy: the chosen token is the most likely one
        assert item.top_logprobs[0].logprob == item.logprob == max(lps.values())
        assert [t.logprob for t in item.top_logprobs] == sorted(lps.values(), reverse=True)[:3]
        assert item.bytes == list(item.token.encode("utf-8"))


def test_chat_template_renders_like_transformers():
    """llama-mqa-tied's Zephyr template (honours add_generation_prompt), golden text from transformers."""
    from rawpaged.tokenizer import Tokenizer

    path = GQA_DIR.parent / "llama-mqa-tied"
    if not (path / "tokenizer_config.json").is_file():
        pytest.skip(f"fixture {path} not found")
    template = load_chat_template(Tokenizer.from_dir(path), None)
    assert template.render(GQA_CHAT, add_generation_prompt=True) == (
        "<|system|>\nBe brief.</s>\n<|user|>\nHello</s>\n<|assistant|>\nHi</s>\n<|user|>\nTell me a story.</s>\n"
        "<|assistant|>\n")
    assert not template.render(GQA_CHAT, add_generation_prompt=False).endswith("<|assistant|>\n")


def test_chat_template_inline_or_file(tmp_path):
    """--chat-template takes the template text itself (vLLM's form) or a file; a missing file is named."""
    from rawpaged.errors import RawpagedError
    from rawpaged.tokenizer import Tokenizer

    tok = Tokenizer.from_dir(GQA_DIR)
    inline = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
    chat = [{"role": "user", "content": "Hi"}]
    assert load_chat_template(tok, inline).render(chat, add_generation_prompt=False) == "<user>Hi"
    f = tmp_path / "t.jinja"
    f.write_text("[{{ messages[0]['content'] }}]")
    assert load_chat_template(tok, str(f)).render(chat, add_generation_prompt=False) == "[Hi]"
    with pytest.raises(RawpagedError, match="chat template file not found: no/such.jinja"):
        load_chat_template(tok, "no/such.jinja")


def test_chat_template_that_does_not_compile(tmp_path):
    from rawpaged.errors import RawpagedError
    from rawpaged.server.chat import ChatTemplate

    with pytest.raises(RawpagedError, match="does not compile: line 1"):
        ChatTemplate("{% if messages %}", "<s>", "</s>", origin="t.jinja")


def test_chat_template_refusal_is_400(gqa):
    srv, _ = gqa
    r = httpx.post(srv.url + "/v1/chat/completions", timeout=30, json={
        "messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]})
    assert r.status_code == 400
    assert "roles must alternate" in r.json()["error"]["message"]


def test_n2_and_seed_reproducible(client, ref):
    kw = dict(max_tokens=16, temperature=0.9, seed=1234)
    a = client.completions.create(model="stories260k", prompt=PROMPT, n=2, **kw)
    b = client.completions.create(model="stories260k", prompt=PROMPT, n=2, **kw)
    c = client.completions.create(model="stories260k", prompt=PROMPT, n=2, **{**kw, "seed": 99})
    want = _gen(ref, n=2, **kw)
    texts = [ch.text for ch in sorted(a.choices, key=lambda ch: ch.index)]
    assert texts == [o.text for o in want.outputs]
    assert texts[0] != texts[1]
    assert texts == [ch.text for ch in sorted(b.choices, key=lambda ch: ch.index)]
    assert texts != [ch.text for ch in sorted(c.choices, key=lambda ch: ch.index)]
    streamed = {}
    for chunk in client.completions.create(model="stories260k", prompt=PROMPT, n=2, stream=True, **kw):
        for ch in chunk.choices:
            streamed[ch.index] = streamed.get(ch.index, "") + ch.text
    assert [streamed[0], streamed[1]] == texts


def test_logprobs(client, ref):
    r = client.completions.create(model="stories260k", prompt=PROMPT, max_tokens=10, temperature=0, logprobs=3)
    want = _gen(ref, max_tokens=10, temperature=0, logprobs=3).outputs[0]
    lp = r.choices[0].logprobs
    assert "".join(lp.tokens) == r.choices[0].text == want.text
    assert lp.token_logprobs == [lps[t] for t, lps in zip(want.token_ids, want.logprobs)]
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(10)]
    for top, lps in zip(lp.top_logprobs, want.logprobs):
        assert sorted(top.values(), reverse=True) == sorted(lps.values(), reverse=True)
        assert 3 <= len(top) <= 4


def test_echo_with_logprobs(client, ref):
    r = client.completions.create(model="stories260k", prompt=PROMPT, max_tokens=4, temperature=0,
                                  echo=True, logprobs=1)
    want = _gen(ref, max_tokens=4, temperature=0, logprobs=1, prompt_logprobs=1)
    assert r.choices[0].text == PROMPT + want.outputs[0].text
    n_prompt = len(want.prompt_token_ids)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == n_prompt + 4
    assert lp.token_logprobs[0] is None
    assert lp.token_logprobs[1:n_prompt] == [d[t] for t, d in zip(want.prompt_token_ids[1:],
                                                                   want.prompt_logprobs[1:])]


def test_stop_string_never_streamed(client, ref, http):
    stop = [" named Lily"]
    want = _gen(ref, max_tokens=30, temperature=0, stop=stop).outputs[0]
    assert want.finish_reason == "stop" and want.text == ", there was a little girl"
    r = client.completions.create(model="stories260k", prompt=PROMPT, max_tokens=30, temperature=0, stop=stop)
    assert r.choices[0].text == want.text and r.choices[0].finish_reason == "stop"
    with http.stream("POST", "/v1/completions", json={"prompt": PROMPT, "max_tokens": 30, "temperature": 0,
                                                      "stop": stop, "stream": True}) as resp:
        events = _sse(resp.iter_lines())
    assert events[-1] == "[DONE]"
    deltas = [e["choices"][0]["text"] for e in events[:-1]]
    assert "".join(deltas) == want.text
    assert all("named" not in d for d in deltas)
    assert events[-2]["choices"][0]["finish_reason"] == "stop"
    assert events[-2]["choices"][0]["stop_reason"] == stop[0]


def test_prompt_forms(http, ref):
    tok = ref.tokenizer
    ids_a, ids_b = tok.encode("The cat"), tok.encode(PROMPT)
    sp = dict(max_tokens=6, temperature=0)
    want_a, want_b = _gen(ref, ids=ids_a, **sp).outputs[0].text, _gen(ref, ids=ids_b, **sp).outputs[0].text
    for prompt, expect in [(ids_a, [want_a]), ([ids_a, ids_b], [want_a, want_b]),
                           (["The cat", PROMPT], [want_a, want_b])]:
        r = http.post("/v1/completions", json={"prompt": prompt, "n": 1, **sp})
        assert r.status_code == 200, r.text
        choices = sorted(r.json()["choices"], key=lambda c: c["index"])
        assert [c["text"] for c in choices] == expect
    r = http.post("/v1/completions", json={"prompt": ids_a, "echo": True, **sp}).json()
    assert r["choices"][0]["text"] == tok.decode(ids_a) + want_a
    r = http.post("/v1/completions", json={"prompt": PROMPT, "logit_bias": {}, "user": "u1", **sp})
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == want_b
    # a bias that forbids the greedy token changes the text
    first = ref.generate([PROMPT], SamplingParams(**sp))[0].outputs[0].token_ids[0]
    r = http.post("/v1/completions", json={"prompt": PROMPT, "logit_bias": {str(first): -100}, **sp}).json()
    assert r["choices"][0]["text"] == _gen(ref, logit_bias={first: -100.0}, **sp).outputs[0].text != want_b


def test_extras_and_multi_prompt_stream(http, ref):
    body = {"prompt": ["The cat", PROMPT], "max_tokens": 5, "temperature": 0, "top_k": 5, "min_p": 0.05,
            "repetition_penalty": 1.2, "ignore_eos": True, "stop_token_ids": [2], "stream": True}
    with http.stream("POST", "/v1/completions", json=body) as resp:
        events = _sse(resp.iter_lines())
    texts: dict[int, str] = {}
    for e in events[:-1]:
        for c in e["choices"]:
            texts[c["index"]] = texts.get(c["index"], "") + c["text"]
    sp = dict(max_tokens=5, temperature=0, top_k=5, min_p=0.05, repetition_penalty=1.2, ignore_eos=True,
              stop_token_ids=[2])
    assert texts == {0: _gen(ref, "The cat", **sp).outputs[0].text, 1: _gen(ref, **sp).outputs[0].text}
    r = http.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 8, "use_beam_search": True,
                                           "best_of": 3, "n": 2})
    want = _gen(ref, max_tokens=8, use_beam_search=True, best_of=3, n=2, temperature=0)
    assert [c["text"] for c in r.json()["choices"]] == [o.text for o in want.outputs]


# -- load, disconnects ----------------------------------------------------------------------------
def test_200_concurrent_streams(server, ref):
    prompts = [f"{w} went to the park" for w in ("Lily", "Ben", "Tom", "Sue", "Max")]
    want = {p: _gen(ref, p, max_tokens=8, temperature=0).outputs[0].text for p in prompts}

    async def one(client: httpx.AsyncClient, i: int):
        p = prompts[i % len(prompts)]
        body = {"prompt": p, "max_tokens": 8, "temperature": 0, "stream": True}
        async with client.stream("POST", "/v1/completions", json=body) as resp:
            assert resp.status_code == 200
            events = _sse([line async for line in resp.aiter_lines()])
        assert events[-1] == "[DONE]"
        assert events[-2]["choices"][0]["finish_reason"] == "length"
        return p, "".join(e["choices"][0]["text"] for e in events[:-1])

    async def main():
        limits = httpx.Limits(max_connections=250, max_keepalive_connections=250)
        async with httpx.AsyncClient(base_url=server.url, timeout=60, limits=limits) as client:
            return await asyncio.wait_for(asyncio.gather(*(one(client, i) for i in range(200))), 60)

    before = _stats(server)
    results = asyncio.run(main())
    assert len(results) == 200
    for p, text in results:
        assert text == want[p]
    after = _stats(server)
    assert after["num_finished"] - before["num_finished"] == 200
    free, total = _blocks(server)
    assert free == total


def test_disconnect_aborts_and_frees_blocks(server):
    body = {"prompt": PROMPT, "max_tokens": 480, "temperature": 0.8, "ignore_eos": True, "stream": True}
    before = _stats(server)
    clients = [httpx.Client(base_url=server.url, timeout=60) for _ in range(4)]
    ctxs = [c.stream("POST", "/v1/completions", json={**body, "seed": i}) for i, c in enumerate(clients)]
    responses = [ctx.__enter__() for ctx in ctxs]
    lines = [r.iter_lines() for r in responses]
    firsts = [next(line for line in it if line) for it in lines]          # every stream has started
    assert all(f.startswith("data: {") for f in firsts)
    release = gate(server)                        # no engine step until the two clients are gone
    try:
        assert server.state.engine.num_in_flight == 4
        for i in (0, 1):
            ctxs[i].__exit__(None, None, None)
            clients[i].close()
        wait_for(lambda: server.state.engine.num_in_flight == 2, what="the server to notice the disconnects")
    finally:
        release.set()
    for i in (2, 3):                               # the other streams go on to the end
        events = _sse(lines[i])
        assert events[-1] == "[DONE]"
        assert events[-2]["choices"][0]["finish_reason"] == "length"
        ctxs[i].__exit__(None, None, None)
        clients[i].close()
    after = _stats(server)
    assert after["num_aborted"] - before["num_aborted"] == 2
    free, total = _blocks(server)
    assert free == total


def test_disconnect_non_streamed(server):
    before = _stats(server)

    def post():
        try:
            httpx.post(server.url + "/v1/completions", timeout=1.0,
                       json={"prompt": PROMPT, "max_tokens": 480, "n": 8, "ignore_eos": True})
        except httpx.TimeoutException:
            pass                                    # the client gives up: its connection closes

    t = threading.Thread(target=post)
    t.start()
    # NOTE: 8 x 480 tokens take over a second here; park the engine as soon as it holds the request.
    wait_for(lambda: server.state.engine.submit(lambda e: len(e.groups)).result(10) == 1, what="the request")
    release = gate(server)
    try:
        t.join(10)
        wait_for(lambda: server.state.engine.num_in_flight == 0, what="the server to notice the disconnect")
    finally:
        release.set()
    wait_for(lambda: _stats(server)["num_aborted"] == before["num_aborted"] + 1, what="num_aborted")
    free, total = _blocks(server)
    assert free == total


# -- errors ---------------------------------------------------------------------------------------
BAD = [
    ("/v1/completions", b"{not json", 400, None),
    ("/v1/completions", b"[1, 2]", 400, None),
    ("/v1/completions", {}, 400, "prompt"),
    ("/v1/completions", {"prompt": 5}, 400, "prompt"),
    ("/v1/completions", {"prompt": []}, 400, "prompt"),
    ("/v1/completions", {"prompt": [[1, 2], "x"]}, 400, "prompt"),
    ("/v1/completions", {"prompt": "x", "n": "2"}, 400, "n"),
    ("/v1/completions", {"prompt": "x", "max_tokens": True}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "x", "stream": "yes"}, 400, "stream"),
    ("/v1/completions", {"prompt": "x", "stop": 5}, 400, "stop"),
    ("/v1/completions", {"prompt": "x", "stop": [""]}, 400, "stop"),
    ("/v1/completions", {"prompt": "x", "temperature": "hot"}, 400, "temperature"),
    ("/v1/completions", {"prompt": "x", "temperature": -1}, 400, "temperature"),
    ("/v1/completions", {"prompt": "x", "top_p": 0}, 400, "top_p"),
    ("/v1/completions", {"prompt": "x", "top_k": -5}, 400, "top_k"),
    ("/v1/completions", {"prompt": "x", "n": 0}, 400, "n"),
    ("/v1/completions", {"prompt": "x", "n": 2, "best_of": 1}, 400, "best_of"),
    ("/v1/completions", {"prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "x", "logprobs": 21}, 400, "logprobs"),
    ("/v1/completions", {"prompt": "x", "presence_penalty": 3}, 400, "presence_penalty"),
    ("/v1/completions", {"prompt": "x", "frequency_penalty": -2.5}, 400, "frequency_penalty"),
    ("/v1/completions", {"prompt": "x", "repetition_penalty": 0}, 400, "repetition_penalty"),
    ("/v1/completions", {"prompt": "x", "logit_bias": {"abc": 1}}, 400, "logit_bias"),
    ("/v1/completions", {"prompt": "x", "logit_bias": {"5": 200}}, 400, "logit_bias"),
    ("/v1/completions", {"prompt": "x", "logit_bias": {"99999": 1}}, 400, "logit_bias"),
    ("/v1/completions", {"prompt": "x", "logit_bias": [1]}, 400, "logit_bias"),
    ("/v1/completions", {"prompt": "x", "stop_token_ids": [100000]}, 400, "stop_token_ids"),
    ("/v1/completions", {"prompt": [[1, 99999]]}, 400, "prompt"),
    ("/v1/completions", {"prompt": [-1]}, 400, "prompt"),
    ("/v1/completions", {"prompt": "x", "stream_options": {"include_usage": True}}, 400, "stream_options"),
    ("/v1/completions", {"prompt": "x", "stream": True, "stream_options": {"include_usage": 1}}, 400,
     "stream_options.include_usage"),
    ("/v1/completions", {"prompt": "x", "stream": True, "best_of": 2}, 400, "best_of"),
    ("/v1/completions", {"prompt": "x", "use_beam_search": True, "n": 2, "stream": True}, 400, "stream"),
    ("/v1/completions", {"prompt": "x", "suffix": "y"}, 400, "suffix"),
    ("/v1/completions", {"prompt": "once upon a time " * 200}, 400, "prompt"),
    ("/v1/completions", {"prompt": "x", "max_tokens": 10000}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "x", "model": "gpt-4"}, 404, "model"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}, 400, "messages"),
    ("/v1/chat/completions", {"messages": []}, 400, "messages"),
    ("/v1/chat/completions", {"messages": [{"content": "hi"}]}, 400, "messages[0].role"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, 400,
     "messages[0].content[0]"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2}, 400,
     "top_logprobs"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "function"}]},
     400, "tools[0]"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "model": "x"}, 404, "model"),
]


@pytest.mark.parametrize("path,body,status,param", BAD, ids=[f"{i}-{b[3]}" for i, b in enumerate(BAD)])
def test_bad_input(http, path, body, status, param):
    r = http.post(path, content=body) if isinstance(body, bytes) else http.post(path, json=body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert isinstance(err["message"], str) and err["message"] and "\n" not in err["message"]
    assert err["type"] == "invalid_request_error"
    assert err["param"] == param


def test_keeps_serving_after_bad_input(http, ref):
    for path, body, status, _ in BAD:
        http.post(path, content=body) if isinstance(body, bytes) else http.post(path, json=body)
    r = http.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 5, "temperature": 0})
    assert r.status_code == 200
    assert r.json()["choices"][0]["text"] == _gen(ref, max_tokens=5, temperature=0).outputs[0].text
    assert http.get("/nope").status_code == 404 and "error" in http.get("/nope").json()
    assert http.get("/v1/completions").status_code == 405


def test_context_length_error_body(http):
    r = http.post("/v1/completions", json={"prompt": "x", "max_tokens": 10000})
    err = r.json()["error"]
    assert err["code"] == "context_length_exceeded" and "512" in err["message"]


def test_models_and_health(http, server):
    assert http.get("/health").status_code == 200
    data = http.get("/v1/models").json()
    assert data["object"] == "list" and [m["id"] for m in data["data"]] == ["stories260k"]
    assert data["data"][0]["max_model_len"] == 512


def test_api_key(stories260k_dir):
    with BackgroundServer(_engine(stories260k_dir, kv=1 << 20), ServerConfig("s", api_key="sekret")) as srv:
        body = {"prompt": PROMPT, "max_tokens": 2}
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "sekret"}):
            r = httpx.post(srv.url + "/v1/completions", json=body, headers=headers, timeout=30)
            assert r.status_code == 401
            assert r.json()["error"]["code"] == "invalid_api_key"
        assert httpx.get(srv.url + "/v1/models", timeout=30).status_code == 401
        r = httpx.post(srv.url + "/v1/completions", json=body, headers={"Authorization": "Bearer sekret"}, timeout=30)
        assert r.status_code == 200
        cl = openai.OpenAI(base_url=srv.url + "/v1", api_key="wrong", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            cl.completions.create(model="s", prompt=PROMPT, max_tokens=2)
        assert httpx.get(srv.url + "/health", timeout=30).status_code == 200


# -- metrics --------------------------------------------------------------------------------------
def _metrics(http) -> dict:
    from prometheus_client.parser import text_string_to_metric_families

    r = http.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    samples = {}
    for fam in text_string_to_metric_families(r.text):
        for s in fam.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples


def test_metrics_parse_and_move(http, server):
    """vLLM's names (docs/server.md); tests/test_server_ecosystem.py checks every one of them."""
    pytest.importorskip("prometheus_client")
    model = (("model_name", "stories260k"),)
    m0 = _metrics(http)
    r = http.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 7, "temperature": 0, "ignore_eos": True})
    assert r.status_code == 200
    m1 = _metrics(http)

    def delta(name, **labels):
        key = (name, tuple(sorted({**dict(model), **labels}.items())))
        return m1[key] - m0.get(key, 0)

    assert delta("vllm:generation_tokens_total") == 7
    assert delta("vllm:prompt_tokens_total") >= 1
    assert delta("vllm:request_success_total", finished_reason="length") == 1
    assert delta("vllm:time_to_first_token_seconds_count") == 1
    assert delta("vllm:e2e_request_latency_seconds_count") == 1
    assert delta("vllm:request_time_per_output_token_seconds_count") == 1
    assert delta("vllm:inter_token_latency_seconds_count") == 6
    assert delta("vllm:e2e_request_latency_seconds_bucket", le="+Inf") == 1
    assert delta("vllm:time_to_first_token_seconds_sum") > 0
    assert delta("rawpaged_http_responses_total", code="200") >= 1
    assert m1[("rawpaged_kv_cache_total_blocks", model)] == 409
    assert m1[("rawpaged_kv_cache_free_blocks", model)] == 409
    for name in ("vllm:num_requests_running", "vllm:num_requests_waiting", "rawpaged_num_requests_swapped",
                 "vllm:kv_cache_usage_perc", "vllm:num_preemptions_total"):
        assert (name, model) in m1
    for mode in ("recompute", "swap"):
        assert ("rawpaged_num_preemptions_total", (("mode", mode),) + model) in m1
    # the prompt repeats: its full blocks come from the prefix cache the second time
    long_prompt = "Once upon a time, there was a little girl named Lily. She loved to play outside in the park."
    for _ in range(2):
        http.post("/v1/completions", json={"prompt": long_prompt, "max_tokens": 2})
    m2 = _metrics(http)
    assert m2[("vllm:prefix_cache_hits_total", model)] > m1[("vllm:prefix_cache_hits_total", model)]
    assert m2[("vllm:prefix_cache_hits_total", model)] <= m2[("vllm:prefix_cache_queries_total", model)]


# -- shutdown -------------------------------------------------------------------------------------
def _parked_stream(srv, **body):
    """Park srv's engine, then stream a completion from a thread: (release event, reader thread, the
    events it parses). NOTE: parked BEFORE the request arrives, the request is certainly in flight
    when a test begins the drain. (Parked after its first streamed event, a loaded machine let the
    engine finish all 50 tokens first: the stream came as one chunk, nothing was left in flight.)"""
    release = gate(srv)
    events: list = []

    def stream():
        with httpx.Client(base_url=srv.url, timeout=30) as c, \
                c.stream("POST", "/v1/completions", json=dict(body, prompt=PROMPT, stream=True)) as resp:
            events.extend(_sse(resp.iter_lines()))

    reader = threading.Thread(target=stream, daemon=True)
    reader.start()
    wait_for(lambda: srv.state.engine.num_in_flight == 1, what="the request to be in flight")
    return release, reader, events


def test_drain_refuses_new_and_finishes_in_flight(stories260k_dir):
    srv = BackgroundServer(_engine(stories260k_dir, kv=1 << 20), ServerConfig("s", drain_timeout_s=20)).start()
    try:
        release, reader, events = _parked_stream(srv, max_tokens=50, ignore_eos=True)
        try:
            srv.server.begin_drain("test")
            with httpx.Client(base_url=srv.url, timeout=30) as other:
                r = other.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 2})
                assert r.status_code == 503
                assert r.json()["error"]["code"] == "server_shutting_down"
                assert other.get("/health").status_code == 503
            assert srv.state.engine.num_in_flight == 1
        finally:
            release.set()
        reader.join(30)
        assert not reader.is_alive()
        assert events[-1] == "[DONE]" and events[-2]["choices"][0]["finish_reason"] == "length"
        assert "".join(e["choices"][0]["text"] for e in events[:-1])
        srv.thread.join(20)
        assert not srv.thread.is_alive()
        assert not srv.state.engine.is_alive
    finally:
        if srv.thread.is_alive():
            srv.stop()


def test_drain_timeout_aborts(stories260k_dir):
    srv = BackgroundServer(_engine(stories260k_dir, kv=1 << 20), ServerConfig("s", drain_timeout_s=0.3)).start()
    try:
        release, reader, events = _parked_stream(srv, max_tokens=50, ignore_eos=True)
        try:
            srv.server.begin_drain("test")
            time.sleep(1.0)                        # past the drain timeout, the engine still parked
        finally:
            release.set()
        reader.join(30)
        assert not reader.is_alive()
        assert events[-1] == "[DONE]" and events[-2]["choices"][0]["finish_reason"] == "abort"
        srv.thread.join(20)
        assert not srv.thread.is_alive()
    finally:
        if srv.thread.is_alive():
            srv.stop()


def test_engine_failure_is_500_and_serving_goes_on(stories260k_dir):
    engine = _engine(stories260k_dir, kv=1 << 20)
    real_step, failures = engine.step, []

    def step():
        if not failures:
            failures.append(1)
            raise RuntimeError("injected")
        return real_step()

    engine.step = step
    with BackgroundServer(engine, ServerConfig("s")) as srv, httpx.Client(base_url=srv.url, timeout=30) as c:
        r = c.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 4})
        assert r.status_code == 500 and r.json()["error"]["type"] == "server_error"
        with c.stream("POST", "/v1/completions", json={"prompt": PROMPT, "max_tokens": 4, "stream": True}) as resp:
            events = _sse(resp.iter_lines())
        assert events[-1] == "[DONE]" and events[-2]["choices"][0]["finish_reason"] == "length"
        failures.clear()
        with c.stream("POST", "/v1/completions", json={"prompt": PROMPT, "max_tokens": 4, "stream": True}) as resp:
            events = _sse(resp.iter_lines())
        assert events[-1] == "[DONE]" and "error" in events[-2]
        assert c.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 4}).status_code == 200
        assert _blocks(srv)[0] == _blocks(srv)[1]
