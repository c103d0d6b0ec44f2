"""Structured outputs and tool calls through the server, with the unmodified openai client.

The model is RANDOM (the 32000-token LLaMA tokenizer, random weights): it writes no JSON on its own,
so every valid answer below is the constraint's doing. Answers are checked with `jsonschema` and
`re`, and by the openai SDK's own parsing (`chat.completions.parse` with a pydantic model).
"""
from __future__ import annotations

import json
import re
from typing import Literal

import httpx
import pytest

from rawpaged.engine import EngineConfig, LLMEngine
from rawpaged.server import protocol, tools
from rawpaged.server.app import BackgroundServer, ServerConfig
from rawpaged.server.chat import ChatTemplate
from rawpaged.structured_output import no_extra_properties

openai = pytest.importorskip("openai")
jsonschema = pytest.importorskip("jsonschema")
pydantic = pytest.importorskip("pydantic")

# A Hermes / Qwen 2.5 style template: it renders the tools and past tool calls and results.
HERMES = """{%- if tools %}<|im_start|>system
You may call functions. Their signatures:
<tools>
{%- for tool in tools %}
{{ tool | tojson }}
{%- endfor %}
</tools>
Return each call as <tool_call>{"name": <name>, "arguments": <args>}</tool_call><|im_end|>
{% endif %}
{%- for m in messages %}<|im_start|>{{ m.role }}
{%- if m.content %}
{{ m.content }}{% endif %}
{%- for call in m.tool_calls or [] %}
<tool_call>{"name": "{{ call.function.name }}", "arguments": {{ call.function.arguments }}}</tool_call>
{%- endfor %}<|im_end|>
{% endfor %}
{%- if add_generation_prompt %}<|im_start|>assistant
{% endif %}"""
PLAIN = "{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}assistant:"

ORDER = {
    "type": "object",
    "properties": {
        "item": {"type": "string", "minLength": 1, "maxLength": 10},
        "qty": {"type": "integer", "minimum": 1, "maximum": 99},
        "size": {"enum": ["S", "M", "L"]},
        "gift": {"type": "boolean"},
        "notes": {"type": "array", "items": {"type": "string", "maxLength": 6}, "maxItems": 2},
        "ship": {"type": "object", "properties": {"zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
                 "required": ["zip"]},
    },
    "required": ["item", "qty", "size", "gift", "notes", "ship"],
}
# The same, closed by hand (guided_json and a non-strict response_format follow JSON Schema: without
# additionalProperties false, any extra property may be generated).
ORDER_CLOSED = no_extra_properties(ORDER)
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "minLength": 1, "maxLength": 12},
                                                    "unit": {"enum": ["celsius", "fahrenheit"]}},
                   "required": ["city", "unit"]},
    "strict": True}}
SEARCH = {"type": "function", "function": {
    "name": "search", "parameters": {"type": "object", "properties": {"q": {"type": "string", "maxLength": 8},
                                                                      "top": {"type": "integer", "minimum": 1, "maximum": 5}},
                                     "required": ["q", "top"], "additionalProperties": False}}}
TOOLS = [WEATHER, SEARCH]
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


def _validator(schema):
    return jsonschema.Draft202012Validator(no_extra_properties(schema))


def _tool_validator(name):
    tool = next(t for t in TOOLS if t["function"]["name"] == name)
    return _validator(tool["function"]["parameters"])


# -- fixtures -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def model_dir(data_dir, tmp_path_factory):
    from rawpaged.testing import make_random_llama
    return make_random_llama(tmp_path_factory.mktemp("srv") / "m", data_dir / "tokenizers" / "llama-32k" / "tokenizer.json",
                             hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, vocab_size=32000,
                             max_position_embeddings=1024, init_std=0.5, seed=5)


def _server(model_dir, template):
    engine = LLMEngine(EngineConfig(model=str(model_dir), device="cpu", kv_cache_memory=32 << 20))
    return BackgroundServer(engine, ServerConfig("rand", chat_template=ChatTemplate(template, "<s>", "</s>", origin="test")))


@pytest.fixture(scope="module")
def server(model_dir):
    with _server(model_dir, HERMES) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, timeout=120) as c:
        yield c


# -- structured outputs -------------------------------------------------------------------------
def test_json_schema_50_seeded_samples_validate(client):
    r = client.chat.completions.create(
        model="rand", messages=[{"role": "user", "content": "An order, as JSON."}], n=50, seed=7, temperature=1.0,
        max_tokens=200, response_format={"type": "json_schema", "json_schema": {"name": "order", "schema": ORDER,
                                                                                 "strict": True}})
    assert len(r.choices) == 50
    validator = _validator(ORDER)
    for c in r.choices:
        assert c.finish_reason == "stop", c.message.content
        validator.validate(json.loads(c.message.content))
    assert len({c.message.content for c in r.choices}) > 40
    free = client.chat.completions.create(model="rand", messages=[{"role": "user", "content": "An order, as JSON."}],
                                          n=5, seed=7, max_tokens=30)
    assert not any(c.message.content.startswith("{") for c in free.choices)      # the model alone: no JSON


class Pet(pydantic.BaseModel):
    name: str = pydantic.Field(min_length=1, max_length=8)
    kind: Literal["cat", "dog", "fish"]
    age: int = pydantic.Field(ge=0, le=30)


def test_openai_sdk_parse_with_a_pydantic_model(client):
    r = client.chat.completions.parse(model="rand", messages=[{"role": "user", "content": "A pet."}],
                                      response_format=Pet, seed=3, max_tokens=100)
    pet = r.choices[0].message.parsed
    assert isinstance(pet, Pet) and pet.kind in ("cat", "dog", "fish")


def test_completions_streamed_equals_non_streamed(client):
    body = dict(model="rand", prompt="An order:", n=2, seed=21, temperature=1.0, max_tokens=200,
                extra_body={"response_format": {"type": "json_schema", "json_schema": {"name": "o", "schema": ORDER_CLOSED}}})
    full = client.completions.create(**body)
    texts = {0: "", 1: ""}
    finish = {}
    for chunk in client.completions.create(stream=True, **body):
        for ch in chunk.choices:
            texts[ch.index] += ch.text
            if ch.finish_reason:
                finish[ch.index] = ch.finish_reason
    assert [texts[c.index] for c in full.choices] == [c.text for c in full.choices]
    assert finish == {0: "stop", 1: "stop"}
    for c in full.choices:
        jsonschema.validate(json.loads(c.text), ORDER)


@pytest.mark.parametrize("endpoint", ["chat", "completions"])
def test_guided_choice_regex_grammar_and_json_object(client, endpoint):
    def ask(**extra):
        if endpoint == "chat":
            r = client.chat.completions.create(model="rand", messages=ASK, n=4, seed=1, max_tokens=40, **extra)
            return [c.message.content for c in r.choices]
        r = client.completions.create(model="rand", prompt="Q:", n=4, seed=1, max_tokens=40, **extra)
        return [c.text for c in r.choices]

    choices = ["sunny", "rainy", "snow storm"]
    got = ask(extra_body={"guided_choice": choices})
    assert all(t in choices for t in got), got
    for t in ask(extra_body={"guided_regex": r"[A-Z]{2}-[0-9]{3}"}):
        assert re.fullmatch(r"[A-Z]{2}-[0-9]{3}", t), t
    for t in ask(extra_body={"guided_grammar": 'start: "x=" NUM ";"\nNUM: /[0-9]{1,4}/'}):
        assert re.fullmatch(r"x=[0-9]{1,4};", t), t
    for t in ask(extra_body={"structured_outputs": {"choice": ["on", "off"]}}):
        assert t in ("on", "off")
    for t in ask(extra_body={"guided_json": {"type": "object", "properties": {"k": {"enum": [1, 2]}},
                                             "required": ["k"], "additionalProperties": False}}):
        assert json.loads(t) in ({"k": 1}, {"k": 2})
    fmt = {"response_format": {"type": "json_object"}}
    kw = {"response_format": fmt["response_format"]} if endpoint == "chat" else {"extra_body": fmt}
    for t in ask(**kw):
        assert t.startswith("{")


def test_beam_search_constrained(client):
    r = client.completions.create(model="rand", prompt="Order:", n=3, max_tokens=200,
                                  extra_body={"use_beam_search": True, "guided_json": ORDER_CLOSED})
    assert len(r.choices) == 3
    for c in r.choices:
        assert c.finish_reason == "stop"
        _validator(ORDER).validate(json.loads(c.text))


# -- tool calls ---------------------------------------------------------------------------------
def _stream_tool_calls(stream):
    """Per choice: (deltas, {call index: {"id", "name", "arguments"}}, finish_reason)."""
    out = {}
    for chunk in stream:
        for ch in chunk.choices:
            deltas, calls, _ = out.setdefault(ch.index, ([], {}, None))
            deltas.append(ch.delta)
            for tc in ch.delta.tool_calls or []:
                call = calls.setdefault(tc.index, {"id": None, "name": None, "arguments": ""})
                if tc.id is not None:
                    assert call["id"] is None and tc.type == "function" and tc.function.name
                    call["id"], call["name"] = tc.id, tc.function.name
                    assert tc.function.arguments == ""             # the first delta: id and name only
                else:
                    assert call["id"] is not None                    # fragments follow the announcement
                    call["arguments"] += tc.function.arguments
            if ch.finish_reason:
                out[ch.index] = (deltas, calls, ch.finish_reason)
    return out


@pytest.mark.parametrize("stream", [False, True])
def test_named_tool_call(client, stream):
    body = dict(model="rand", messages=ASK, tools=TOOLS, n=3, seed=4, max_tokens=100,
                tool_choice={"type": "function", "function": {"name": "get_weather"}})
    if not stream:
        r = client.chat.completions.create(**body)
        for c in r.choices:
            assert c.finish_reason == "tool_calls" and c.message.content is None
            (call,) = c.message.tool_calls
            assert call.type == "function" and call.function.name == "get_weather" and call.id.startswith("call_")
            _tool_validator("get_weather").validate(json.loads(call.function.arguments))
        return
    want = client.chat.completions.create(**body)
    got = _stream_tool_calls(client.chat.completions.create(stream=True, **body))
    for c in want.choices:
        deltas, calls, finish = got[c.index]
        assert deltas[0].role == "assistant" and finish == "tool_calls"
        assert len([d for d in deltas if d.tool_calls]) >= 3          # announced, then several fragments
        assert [(calls[0]["name"], calls[0]["arguments"])] == \
            [(t.function.name, t.function.arguments) for t in c.message.tool_calls]


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("parallel", [False, True])
def test_required_tool_calls(client, stream, parallel):
    body = dict(model="rand", messages=ASK, tools=TOOLS, tool_choice="required", parallel_tool_calls=parallel,
                n=4, seed=8, temperature=1.0, max_tokens=300)
    want = client.chat.completions.create(**body)
    for c in want.choices:
        assert c.finish_reason == "tool_calls", c.message
        calls = c.message.tool_calls
        assert len(calls) == 1 if not parallel else len(calls) >= 1
        for call in calls:
            _tool_validator(call.function.name).validate(json.loads(call.function.arguments))
    if parallel:
        assert any(len(c.message.tool_calls) > 1 for c in want.choices)       # an array of calls
    if not stream:
        return
    got = _stream_tool_calls(client.chat.completions.create(stream=True, **body))
    for c in want.choices:
        _, calls, finish = got[c.index]
        assert finish == "tool_calls"
        assert [(calls[i]["name"], calls[i]["arguments"]) for i in sorted(calls)] == \
            [(t.function.name, t.function.arguments) for t in c.message.tool_calls]


def test_tool_round_trip_renders_calls_and_results(client):
    """A conversation with a past call and its result goes back through the template."""
    first = client.chat.completions.create(model="rand", messages=ASK, tools=TOOLS, tool_choice="required",
                                           parallel_tool_calls=False, seed=2, max_tokens=100)
    call = first.choices[0].message.tool_calls[0]
    messages = ASK + [first.choices[0].message.model_dump(exclude_none=True),
                      {"role": "tool", "tool_call_id": call.id, "content": "21 C"}]
    r = client.chat.completions.create(model="rand", messages=messages, tools=TOOLS, max_tokens=5, seed=1)
    assert r.choices[0].finish_reason in ("stop", "length")
    assert r.usage.prompt_tokens > first.usage.prompt_tokens


def test_auto_renders_tools_and_answers_in_text(client, http):
    r = client.chat.completions.create(model="rand", messages=ASK, tools=TOOLS, max_tokens=8, seed=1)
    c = r.choices[0]
    assert not c.message.tool_calls and c.finish_reason in ("stop", "length")     # a random model calls nothing
    without = client.chat.completions.create(model="rand", messages=ASK, max_tokens=8, seed=1)
    assert r.usage.prompt_tokens > without.usage.prompt_tokens + 50               # the tools were rendered
    none = client.chat.completions.create(model="rand", messages=ASK, tools=TOOLS, tool_choice="none",
                                          max_tokens=8, seed=1)
    assert none.usage.prompt_tokens == r.usage.prompt_tokens and not none.choices[0].message.tool_calls


def test_auto_needs_a_template_that_renders_tools(model_dir):
    with _server(model_dir, PLAIN) as srv, httpx.Client(base_url=srv.url, timeout=60) as http:
        body = {"messages": ASK, "tools": TOOLS, "max_tokens": 4}
        r = http.post("/v1/chat/completions", json=body)
        assert r.status_code == 400 and r.json()["error"]["param"] == "tool_choice"
        r = http.post("/v1/chat/completions", json={**body, "tool_choice": "required", "max_tokens": 100})
        assert r.status_code == 200 and r.json()["choices"][0]["message"]["tool_calls"]


BAD = [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "objectx"}}}},
     "response_format", "response_format.json_schema.schema is not valid"),
    ({"response_format": {"type": "xml"}}, "response_format", "response_format.type must be"),
    ({"response_format": {"type": "json_schema"}}, "response_format", "json_schema must be an object"),
    ({"guided_regex": "a(b"}, "guided_regex", "guided_regex is not valid"),
    ({"guided_grammar": "start: foo"}, "guided_grammar", "guided_grammar is not valid"),
    ({"guided_choice": []}, "guided_choice", "non-empty list"),
    ({"guided_json": [1]}, "guided_json", "guided_json must be a JSON schema"),
    ({"guided_choice": ["a"], "guided_regex": "b"}, "guided_choice", "guided_choice cannot be combined with guided_regex"),
    ({"guided_choice": ["a"], "response_format": {"type": "json_object"}}, "guided_choice", "cannot be combined"),
    ({"structured_outputs": {"regex": "a", "structural_tag": "x"}}, "structured_outputs", "structural_tag"),
    ({"guided_decoding_backend": "xgrammar", "guided_regex": "a"}, "guided_decoding_backend", "llguidance"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice", "not among"),
    ({"tools": TOOLS, "tool_choice": "sometimes"}, "tool_choice", "tool_choice must be"),
    ({"tool_choice": "required"}, "tool_choice", "needs tools"),
    ({"tools": [WEATHER, WEATHER]}, "tools[1].function.name", "given twice"),
    ({"tools": [{"type": "function", "function": {"name": "a b"}}]}, "tools[0].function.name", "1 to 64"),
    ({"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}}, "response_format",
     "cannot be combined with tool_choice"),
    ({"tools": [WEATHER, {"type": "function", "function": {"name": "f", "parameters": {"type": "nope"}}}],
      "tool_choice": "required"}, "tools[1].function.parameters", "tools[1].function.parameters is not valid"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "nope"}}}],
      "tool_choice": {"type": "function", "function": {"name": "f"}}}, "tools[0].function.parameters", "is not valid"),
    ({"parallel_tool_calls": "yes"}, "parallel_tool_calls", "true or false"),
]


@pytest.mark.parametrize("extra,param,needle", BAD, ids=[f"{i}-{b[1]}" for i, b in enumerate(BAD)])
def test_bad_structured_requests_are_400s_naming_the_field(http, extra, param, needle):
    r = http.post("/v1/chat/completions", json={"messages": ASK, "max_tokens": 4, **extra})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and needle in err["message"] and "\n" not in err["message"], err


def test_completions_take_response_format_not_tools(http):
    r = http.post("/v1/completions", json={"prompt": "x", "max_tokens": 4,
                                           "response_format": {"type": "json_schema", "json_schema": {"schema": {"type": 3}}}})
    assert r.status_code == 400 and r.json()["error"]["param"] == "response_format"
    r = http.post("/v1/completions", json={"prompt": "x", "max_tokens": 30, "guided_choice": ["ab", "cd"]})
    assert r.status_code == 200 and r.json()["choices"][0]["text"] in ("ab", "cd")


# -- the tool-call parser (no server) -------------------------------------------------------------
def _req(choice="auto", parallel=True):
    return tools.parse_tools({"tools": TOOLS, "tool_choice": choice, "parallel_tool_calls": parallel})


@pytest.mark.parametrize("text,content,calls", [
    ('<tool_call>{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}</tool_call>',
     None, [("get_weather", '{"city": "Paris", "unit": "celsius"}')]),
    ('Let me check.\n<tool_call>\n{"name": "search", "arguments": {"q": "x", "top": 2}}\n</tool_call>\n'
     '<tool_call>{"name": "get_weather", "arguments": "{\\"city\\": \\"Oslo\\"}"}</tool_call>',
     "Let me check.", [("search", '{"q": "x", "top": 2}'), ("get_weather", '{"city": "Oslo"}')]),
    ('{"name": "search", "parameters": {"q": "y", "top": 1}}', None, [("search", '{"q": "y", "top": 1}')]),
    ("It is sunny.", "It is sunny.", []),
    ("<tool_call>not json</tool_call> ok", "<tool_call>not json</tool_call> ok", []),
    ("<tool_call>{\"name\": \"search\"", "<tool_call>{\"name\": \"search\"", []),
    ('{"a": 1}', '{"a": 1}', []),
])
def test_auto_parser_streamed_equals_whole(text, content, calls):
    req = _req()
    got_content, got_calls = tools.extract(req, text)
    assert got_content == content and [(c.name, c.arguments) for c in got_calls] == calls
    for step in (1, 3, 7):                                  # streamed in pieces of `step` characters
        stream, streamed, streamed_calls = tools.ToolStream(req), "", {}
        for end in list(range(step, len(text), step)) + [len(text)]:
            for d in stream.feed(text[:end], done=end == len(text)):
                streamed += d.get("content", "")
                for tc in d.get("tool_calls", []):
                    entry = streamed_calls.setdefault(tc["index"], ["", ""])
                    entry[0] = tc.get("function", {}).get("name") or entry[0]
                    entry[1] += tc["function"].get("arguments", "")
        assert streamed == (content or "")
        assert [tuple(streamed_calls[i]) for i in sorted(streamed_calls)] == calls


def test_required_array_scanner_on_partial_text():
    text = '[{"name":"search","arguments":{"q":"a}]\\"b","top":3}},{"name":"get_weather","arguments":{"city":"x'
    assert tools.scan_call_array(text) == [("search", '{"q":"a}]\\"b","top":3}', True),
                                           ("get_weather", '{"city":"x', False)]
    assert tools.scan_call_array('[{"name":"sea') == [] and tools.scan_call_array("") == []
    content, calls = tools.extract(_req("required"), text + '","unit":"celsius"}}]')
    assert content is None and [c.name for c in calls] == ["search", "get_weather"]
    assert json.loads(calls[0].arguments) == {"q": 'a}]"b', "top": 3}


def test_tools_reach_the_template_as_sent():
    req = protocol.parse_chat({"messages": ASK, "tools": TOOLS}, 10000)
    assert req.template_kwargs["tools"] == TOOLS and req.tools.choice == "auto" and req.constraint is None
    text = ChatTemplate(HERMES, "<s>", "</s>", origin="t").render(req.messages, True, **req.template_kwargs)
    assert json.dumps(WEATHER, ensure_ascii=False) in text and text.endswith("<|im_start|>assistant\n")
    req = protocol.parse_chat({"messages": ASK, "tools": TOOLS, "tool_choice": "required",
                               "parallel_tool_calls": False}, 10000)
    so = req.params.structured_outputs
    assert so.kind == "json" and so.json["maxItems"] == 1 and so.json["minItems"] == 1


def test_logprobs_of_forbidden_tokens_are_sent_as_minus_9999(client):
    """Fewer tokens allowed than top_logprobs asks for: the rest are -inf, sent as -9999.0 (JSON has no
    -Infinity); the chosen token's logprob is finite."""
    r = client.chat.completions.create(model="rand", messages=ASK, max_tokens=10, logprobs=True, top_logprobs=5,
                                       extra_body={"guided_choice": ["Z"]})
    c = r.choices[0]
    assert c.message.content == "Z" and c.finish_reason == "stop"
    first = c.logprobs.content[0]
    assert -9999.0 < first.logprob <= 0
    assert [t.logprob for t in first.top_logprobs].count(-9999.0) >= 3
