"""Tool calling for /v1/chat/completions: OpenAI's `tools`, `tool_choice`, `parallel_tool_calls`.

    req = parse_tools(body)                -> ToolsRequest | None (400 naming the field)
    so = constraint(req)                   -> what the output must match (required, named) or None
    content, calls = extract(req, text)    -> the answer's text and its tool calls
    stream = ToolStream(req); stream.feed(text, done) -> the chat deltas text up to here adds

tool_choice
  "none"       the model answers in text (the tools still reach the chat template, as vLLM does)
  "auto"       (the default with tools) free text; tool calls are parsed out of it, in these formats
               (the text around them is the content, stripped of surrounding whitespace):
                 Hermes / Qwen:  <tool_call>{"name": "f", "arguments": {...}}</tool_call>  (any number)
                 Llama 3.x JSON: the whole answer is one {"name": "f", "arguments"|"parameters": {...}}
               Needs a chat template that takes `tools` (it renders them, as transformers'
               apply_chat_template does). Not parsed: Mistral's [TOOL_CALLS] (a special token, which
               the detokenizer skips), pythonic calls.
  "required"   the output is CONSTRAINED to a JSON array of calls
                 [{"name": "f", "arguments": {...f's parameters...}}, ...]
               (at least one; exactly one with parallel_tool_calls false)
  {"type": "function", "function": {"name": "f"}}
               the output is CONSTRAINED to f's parameters schema: it is the call's arguments
A function's `strict: true` gives its objects no extra properties (OpenAI's strict mode).

The answer carries `tool_calls` ({"id", "type": "function", "function": {"name", "arguments": JSON
text}}), `content` null when only calls were made (or the text around them), and `finish_reason`
"tool_calls" when the sequence stopped (a cut-off one stays "length"). Streamed, each call is a delta
with its index, id and name (arguments ""), then deltas with argument fragments as they are generated
(under auto, a call's arguments come whole, once its block closed).
"""
from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass

from rawpaged.sampling_params import StructuredOutputsParams
from rawpaged.server.api_error import _shown, bad_request
from rawpaged.structured_output import GrammarError, compile_grammar, no_extra_properties

NAME = re.compile(r"[a-zA-Z0-9_-]{1,64}")        # OpenAI's rule for function names
MAX_TOOLS = 128
CHOICES = ("none", "auto", "required")
EMPTY_PARAMETERS = {"type": "object", "properties": {}}


@dataclass
class Tool:
    name: str
    parameters: dict
    strict: bool
    where: str                                   # "tools[i].function", for messages


@dataclass
class ToolsRequest:
    tools: list[dict]                            # as sent: what the chat template gets
    functions: dict[str, Tool]
    choice: str                                  # "none", "auto", "required" or "named"
    named: str | None = None                     # the function tool_choice names
    parallel: bool = True

    @property
    def constrained(self) -> bool:
        return self.choice in ("required", "named")


@dataclass
class ToolCall:
    name: str
    arguments: str                               # JSON text
    id: str = ""

    def __post_init__(self):
        self.id = self.id or new_call_id()

    def as_dict(self) -> dict:
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


# -- the request ------------------------------------------------------------------------------
def parse_tools(body: dict) -> ToolsRequest | None:
    tools, choice = body.get("tools"), body.get("tool_choice")
    parallel = body.get("parallel_tool_calls")
    if parallel is not None and not isinstance(parallel, bool):
        raise bad_request(f"parallel_tool_calls must be true or false, got {_shown(parallel)}", "parallel_tool_calls")
    if tools is None or tools == []:
        if choice not in (None, "none"):
            raise bad_request("tool_choice needs tools", "tool_choice")
        return None
    if not isinstance(tools, list) or len(tools) > MAX_TOOLS:
        raise bad_request(f"tools must be an array of at most {MAX_TOOLS} tools", "tools")
    functions: dict[str, Tool] = {}
    for i, t in enumerate(tools):
        tool = _tool(t, f"tools[{i}]")
        if tool.name in functions:
            raise bad_request(f"tools[{i}].function.name {tool.name!r} is given twice", f"tools[{i}].function.name")
        functions[tool.name] = tool
    kind, named = _choice(choice if choice is not None else "auto", functions)
    return ToolsRequest(tools, functions, kind, named, parallel if parallel is not None else True)


def _tool(t, where: str) -> Tool:
    if not isinstance(t, dict) or t.get("type") != "function" or not isinstance(t.get("function"), dict):
        raise bad_request(f"{where} must be {{\"type\": \"function\", \"function\": {{\"name\", \"parameters\"}}}}",
                          where)
    fn = t["function"]
    name = fn.get("name")
    if not isinstance(name, str) or not NAME.fullmatch(name):
        raise bad_request(f"{where}.function.name must be 1 to 64 of a-z, A-Z, 0-9, _ and -, got {_shown(name)}",
                          f"{where}.function.name")
    params = fn.get("parameters")
    if params is None:
        params = EMPTY_PARAMETERS
    if not isinstance(params, dict):
        raise bad_request(f"{where}.function.parameters must be a JSON schema (an object), got {_shown(params)}",
                          f"{where}.function.parameters")
    strict = fn.get("strict")
    if strict is not None and not isinstance(strict, bool):
        raise bad_request(f"{where}.function.strict must be true or false, got {_shown(strict)}",
                          f"{where}.function.strict")
    return Tool(name, params, bool(strict), f"{where}.function")


def _choice(choice, functions: dict[str, Tool]) -> tuple[str, str | None]:
    if isinstance(choice, str):
        if choice not in CHOICES:
            raise bad_request(f"tool_choice must be 'none', 'auto', 'required' or a function, got {_shown(choice)}",
                              "tool_choice")
        return choice, None
    fn = choice.get("function") if isinstance(choice, dict) and choice.get("type") == "function" else None
    name = fn.get("name") if isinstance(fn, dict) else None
    if not isinstance(name, str):
        raise bad_request("tool_choice must be 'none', 'auto', 'required' or "
                          "{\"type\": \"function\", \"function\": {\"name\": ...}}", "tool_choice")
    if name not in functions:
        raise bad_request(f"tool_choice names the function {_shown(name)}, which is not among the tools",
                          "tool_choice")
    return "named", name


# -- the constraint (required, named) ---------------------------------------------------------
def _arguments_schema(tool: Tool) -> dict:
    return no_extra_properties(tool.parameters) if tool.strict else tool.parameters


def constraint(req: ToolsRequest) -> tuple[StructuredOutputsParams, str] | None:
    """(what the output must match, the field a bad schema is blamed on), or None (none, auto)."""
    if req.choice == "named":
        tool = req.functions[req.named]
        return StructuredOutputsParams(json=_arguments_schema(tool)), f"{tool.where}.parameters"
    if req.choice != "required":
        return None
    for t in req.functions.values():                     # NOTE: so that a bad schema is named
        check_schema(_arguments_schema(t), f"{t.where}.parameters")
    items = [{"type": "object", "properties": {"name": {"const": t.name}, "arguments": _arguments_schema(t)},
              "required": ["name", "arguments"], "additionalProperties": False} for t in req.functions.values()]
    schema = {"type": "array", "minItems": 1, "items": items[0] if len(items) == 1 else {"anyOf": items}}
    if not req.parallel:
        schema["maxItems"] = 1
    return StructuredOutputsParams(json=schema), "tools"


def check_schema(schema: dict, where: str) -> None:
    """400 naming `where` if the grammar engine refuses the schema."""
    try:
        compile_grammar(StructuredOutputsParams(json=schema))
    except GrammarError as e:
        raise bad_request(f"{where} {e}", where) from None


# -- reading the answer -----------------------------------------------------------------------
def extract(req: ToolsRequest, text: str) -> tuple[str | None, list[ToolCall]]:
    """The answer's content and tool calls (non-streamed; ToolStream says the same, in pieces)."""
    if req.choice == "named":
        return None, [ToolCall(req.named, text)]
    if req.choice == "required":
        calls = [ToolCall(name, args) for name, args, _ in scan_call_array(text)]
        return (None, calls) if calls else (text, [])
    if req.choice == "auto":
        events = _auto_events(text, done=True)
        calls = [e for e in events if isinstance(e, ToolCall)]
        content = "".join(e for e in events if isinstance(e, str)).strip()
        return content or (None if calls else ""), calls
    return text, []


def scan_call_array(text: str) -> list[tuple[str, str, bool]]:
    """The calls in a (possibly unfinished) array the `required` constraint made:
    `[{"name":"f","arguments":{...}},...]` (compact, keys in this order: the grammar's) ->
    [(name, arguments text so far, arguments complete)]."""
    calls, pos = [], 1
    head, lead = '{"name":"', '","arguments":'
    if not text.startswith("["):
        return calls
    while text.startswith(head, pos):
        end = text.find('"', pos + len(head))             # NOTE: names have no quotes or escapes
        if end < 0 or not text.startswith(lead, end):
            break
        name, start = text[pos + len(head):end], end + len(lead)
        stop = _value_end(text, start)
        if stop is None:
            if start < len(text):
                calls.append((name, text[start:], False))
            break
        calls.append((name, text[start:stop], True))
        pos = stop + 1                                     # past the call's "}"
        if not text.startswith(",", pos):
            break
        pos += 1
    return calls


def _value_end(text: str, start: int) -> int | None:
    """Index just past the JSON object or array starting at `start`, or None if it is unfinished."""
    depth, in_string, escaped = 0, False, False
    for i in range(start, len(text)):
        ch = text[i]
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "{[":
            depth += 1
        elif ch in "}]":
            depth -= 1
            if depth == 0:
                return i + 1
    return None


_BLOCK = re.compile(r"<tool_call>(.*?)</tool_call>", re.S)
_OPEN = "<tool_call>"


def _call_object(text: str) -> ToolCall | None:
    """{"name": ..., "arguments" (or "parameters"): {...} or JSON text} -> a ToolCall, else None."""
    try:
        obj = json.loads(text)
    except ValueError:
        return None
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    args = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(args, str):
        return ToolCall(obj["name"], args)
    return ToolCall(obj["name"], json.dumps(args, ensure_ascii=False))


def _partial_open_len(text: str) -> int:
    """Length of the longest tail of text that could still grow into "<tool_call>"."""
    return next((n for n in range(min(len(_OPEN) - 1, len(text)), 0, -1) if text.endswith(_OPEN[:n])), 0)


def _auto_events(text: str, done: bool) -> list:
    """The settled part of an auto answer, in order: content strings and ToolCalls. Until `done`, an
    open <tool_call> block (or a tail that may become one) and an answer that may be a whole JSON
    call are held back."""
    if text.lstrip().startswith("{") or (not done and not text.strip()):
        call = _call_object(text) if done else None
        return [call] if call is not None else ([text] if done else [])
    events, pos = [], 0
    for m in _BLOCK.finditer(text):
        call = _call_object(m.group(1).strip())
        if call is None:
            continue                                      # not a call: it stays text
        events.append(text[pos:m.start()])
        events.append(call)
        pos = m.end()
    tail = text[pos:]
    if not done:
        at = tail.find(_OPEN)
        tail = tail[:at] if at >= 0 else tail[:len(tail) - _partial_open_len(tail)]
    events.append(tail)
    return [e for e in events if not isinstance(e, str) or e]


# -- streaming --------------------------------------------------------------------------------
class ToolStream:
    """One choice's chat deltas under tools: feed it the choice's whole text so far, each step."""

    def __init__(self, req: ToolsRequest):
        self.req = req
        self.ids: list[str] = []                 # id of each call announced
        self.args_sent: list[int] = []           # characters of each call's arguments sent
        self.content_sent = 0                    # characters of (stripped) content sent
        self.events_seen = 0

    @property
    def called(self) -> bool:
        return bool(self.ids)

    def feed(self, text: str, done: bool) -> list[dict]:
        if self.req.choice == "named":
            return self._calls([(self.req.named, text)])
        if self.req.choice == "required":
            return self._calls([(name, args) for name, args, _ in scan_call_array(text)])
        if self.req.choice == "auto":
            return self._auto(text, done)
        return self._content(text)

    def _calls(self, calls: list[tuple[str, str]]) -> list[dict]:
        deltas = []
        for i, (name, args) in enumerate(calls):
            if i == len(self.ids):
                self.ids.append(new_call_id())
                self.args_sent.append(0)
                deltas.append({"tool_calls": [{"index": i, "id": self.ids[i], "type": "function",
                                               "function": {"name": name, "arguments": ""}}]})
            if len(args) > self.args_sent[i]:
                deltas.append({"tool_calls": [{"index": i, "function": {"arguments": args[self.args_sent[i]:]}}]})
                self.args_sent[i] = len(args)
        return deltas

    def _content(self, content: str) -> list[dict]:
        if len(content) > self.content_sent:
            new = content[self.content_sent:]
            self.content_sent = len(content)
            return [{"content": new}]
        return []

    def _auto(self, text: str, done: bool) -> list[dict]:
        events = _auto_events(text, done)
        calls = [(e.name, e.arguments) for e in events if isinstance(e, ToolCall)]
        # NOTE: content is sent stripped, as extract() returns it: leading whitespace never, trailing
        # whitespace only once more text follows it (the stripped text only ever grows at its end).
        content = "".join(e for e in events if isinstance(e, str)).strip()
        return self._content(content) + self._calls(calls)
