"""OpenAI requests in, typed requests with SamplingParams out; errors in OpenAI's shape.

Validation is by hand (no pydantic). The sampling fields go to SamplingParams untouched: its one
validator (rawpaged/sampling_params.py) checks types and ranges for the server and the offline API
alike, and its error names the field, which becomes the error's `param`. The other fields are read
here with their JSON types; every mistake is ApiError(400) naming the field.

Every field a client may send has one documented behaviour (docs/server.md, "Request fields"):
used; accepted with no effect (IGNORED, logged at debug level); or refused with a 400 naming it
unless it holds its neutral value (REFUSED). Fields nobody knows are ignored like OpenAI does,
logged at debug level. A field sent as null means "not given" (OpenAI's clients send nulls).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field

from rawpaged.sampling_params import MAX_LOGPROBS, SamplingParams, SamplingParamsError
from rawpaged.server import structured, tools
from rawpaged.server.api_error import ApiError, _shown, bad_request  # noqa: F401  (re-exported)
from rawpaged.server.structured import Constraint
from rawpaged.server.tools import ToolsRequest

MAX_JSON_DEPTH = 64         # nesting of the request body (a chat request needs about 6)
MAX_PROMPTS = 256           # prompts in one /v1/completions request (each is an engine request)


# -- the body: JSON that cannot hurt us ---------------------------------------------------------
def parse_json_body(body: bytes) -> dict:
    """Bytes -> the request's JSON object; 400 for anything a client got wrong.

    Python's json module refuses integers over 4300 digits (ValueError) and nesting deeper than
    its recursion limit (RecursionError); both are the client's mistake. Strings must be valid
    Unicode: JSON's "\\ud800" escape decodes to a lone surrogate that no tokenizer, template or
    UTF-8 encoder accepts, so it is refused here, naming where it is.
    """
    try:
        obj = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise bad_request(f"the request body is not valid JSON: {e}") from None
    except RecursionError:
        raise bad_request(f"the request body is nested too deeply (at most {MAX_JSON_DEPTH} levels)") from None
    except ValueError as e:                       # "Exceeds the limit (4300 digits) for integer ..."
        detail = str(e).split(";")[0]
        raise bad_request(f"the request body holds a number too long to read: {detail}") from None
    if not isinstance(obj, dict):
        raise bad_request(f"the request body must be a JSON object, got {type(obj).__name__}")
    check_json_values(obj)
    return obj


def check_json_values(obj) -> None:
    """Walk the JSON value (iteratively): nesting depth and Unicode validity of every string."""
    stack = [(obj, "", 1)]
    while stack:
        value, path, depth = stack.pop()
        if depth > MAX_JSON_DEPTH:
            raise bad_request(f"the request body is nested too deeply (at most {MAX_JSON_DEPTH} levels)",
                              path or None)
        if isinstance(value, dict):
            for k, v in value.items():
                _check_text(k, f"{path}.{k}" if path else "a key")
                stack.append((v, f"{path}.{k}" if path else str(k), depth + 1))
        elif isinstance(value, list):
            # NOTE: numbers need no check; a list of a million token ids costs one pass here.
            stack.extend((v, f"{path}[{i}]", depth + 1) for i, v in enumerate(value)
                         if isinstance(v, (dict, list, str)))
        elif isinstance(value, str):
            _check_text(value, path)


def _check_text(s: str, where: str) -> None:
    try:
        s.encode("utf-8")
    except UnicodeEncodeError as e:
        bad = s[e.start]
        raise bad_request(f"{where} holds a lone surrogate (\\u{ord(bad):04x}) at character {e.start}: "
                          "strings must be valid Unicode", where) from None


# -- typed field access -----------------------------------------------------------------------
_TYPE_NAMES = {int: "an integer", bool: "true or false", str: "a string", list: "an array", dict: "an object"}


class Fields:
    """Typed reads from a request's JSON object; every mistake is a 400 naming the field."""

    def __init__(self, body: dict, prefix: str = ""):
        self.body = body
        self.prefix = prefix

    def wrong(self, name: str, want: str) -> ApiError:
        return bad_request(f"{self.prefix}{name} must be {want}, got {_shown(self.body.get(name))}",
                           self.prefix + name)

    def int(self, name: str, default=None, lo: int | None = None, hi: int | None = None):
        v = self.body.get(name)
        if v is None:
            return default
        if isinstance(v, float) and v.is_integer():
            v = int(v)
        if isinstance(v, bool) or not isinstance(v, int):
            raise self.wrong(name, _TYPE_NAMES[int])
        if lo is not None and v < lo:
            raise bad_request(f"{self.prefix}{name} must be >= {lo}, got {_shown(v)}", self.prefix + name)
        if hi is not None and v > hi:
            raise bad_request(f"{self.prefix}{name} must be <= {hi}, got {_shown(v)}", self.prefix + name)
        return v

    def _typed(self, name: str, kind: type, default):
        v = self.body.get(name)
        if v is None:
            return default
        if not isinstance(v, kind):
            raise self.wrong(name, _TYPE_NAMES[kind])
        return v

    def bool(self, name: str, default=None):
        return self._typed(name, bool, default)

    def str(self, name: str, default=None):
        return self._typed(name, str, default)

    def obj(self, name: str) -> dict | None:
        return self._typed(name, dict, None)


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


# -- which field does what --------------------------------------------------------------------
# Accepted, with no effect here (OpenAI bookkeeping, or meaningful only with features refused
# below); logged at debug level.
IGNORED = {"user", "metadata", "store", "service_tier", "prompt_cache_key", "safety_identifier",
           "request_id"}
# Refused with a 400 naming the field unless it holds one of these neutral values (null is always
# neutral).
_REFUSED_COMMON = {
    "min_tokens": (0,), "truncate_prompt_tokens": (), "allowed_token_ids": (), "bad_words": ([],),
    "prompt_logprobs": (), "return_tokens_as_token_ids": (False,), "return_token_ids": (False,),
    "logits_processors": (), "vllm_xargs": (), "kv_transfer_params": (), "cache_salt": (),
    "priority": (0,), "spaces_between_special_tokens": (True,), "mm_processor_kwargs": (),
}
REFUSED_COMPLETION = {**_REFUSED_COMMON, "suffix": ("",)}
REFUSED_CHAT = {
    **_REFUSED_COMMON, "functions": ([],), "function_call": ("none",),
    "echo": (False,), "continue_final_message": (False,), "chat_template": (), "audio": (),
    "modalities": (["text"],), "prediction": (), "web_search_options": (), "reasoning_effort": (),
}
_WHY = {
    "prompt_logprobs": "use echo with logprobs to get the prompt's logprobs",
    "chat_template": "start the server with --chat-template FILE",
    "echo": "chat echo is not implemented",
    "functions": "use tools (functions is OpenAI's deprecated form)",
    "function_call": "use tool_choice (function_call is OpenAI's deprecated form)",
    "modalities": "this server answers in text only",
}
# Structured output (rawpaged/server/structured.py), both endpoints.
STRUCTURED_FIELDS = {"response_format", "guided_json", "guided_regex", "guided_choice", "guided_grammar",
                     "guided_whitespace_pattern", "guided_decoding_backend", "structured_outputs"}
SAMPLING_FIELDS = ("n", "best_of", "presence_penalty", "frequency_penalty", "repetition_penalty", "temperature",
                   "top_p", "top_k", "min_p", "seed", "use_beam_search", "length_penalty", "early_stopping",
                   "stop", "stop_token_ids", "include_stop_str_in_output", "ignore_eos", "skip_special_tokens",
                   "logit_bias")
_COMMON_USED = {"model", "stream", "stream_options", "max_tokens", "logprobs", "add_special_tokens",
                *SAMPLING_FIELDS, *STRUCTURED_FIELDS}
USED_COMPLETION = _COMMON_USED | {"prompt", "echo"}
USED_CHAT = _COMMON_USED | {"messages", "max_completion_tokens", "top_logprobs", "add_generation_prompt",
                            "chat_template_kwargs", "documents", "tools", "tool_choice", "parallel_tool_calls"}


def _screen(body: dict, used: set, refused: dict) -> list[str]:
    """400 for a refused field holding a non-neutral value; the names of fields with no effect."""
    for name, neutral in refused.items():
        v = body.get(name)
        if v is not None and not any(v == n and type(v) is type(n) for n in neutral):
            why = f" ({_WHY[name]})" if name in _WHY else " by this server"
            raise bad_request(f"{name} is not supported{why}", name)
    return sorted(k for k in body if k not in used and k not in refused and body[k] is not None)


# -- requests ---------------------------------------------------------------------------------
@dataclass
class CompletionRequest:
    model: str | None
    prompts: list[str | list[int]]          # each a text or a list of token ids
    params: SamplingParams
    stream: bool = False
    include_usage: bool = False
    echo: bool = False
    logprobs: int | None = None
    prompt_only: bool = False               # echo with max_tokens 0: the prompt (and its logprobs) only
    add_special_tokens: bool = True
    ignored: list[str] = field(default_factory=list)
    constraint: Constraint | None = None


@dataclass
class ChatRequest:
    model: str | None
    messages: list[dict]
    params: SamplingParams
    add_generation_prompt: bool = True
    stream: bool = False
    include_usage: bool = False
    logprobs: bool = False
    top_logprobs: int = 0
    add_special_tokens: bool = False
    template_kwargs: dict = field(default_factory=dict)
    ignored: list[str] = field(default_factory=list)
    tools: ToolsRequest | None = None          # the request's tools, if any
    constraint: Constraint | None = None       # structured output, asked for or implied by tool_choice

    @property
    def tool_calling(self) -> ToolsRequest | None:
        """The tools request when the answer is read for tool calls (tool_choice other than none)."""
        return self.tools if self.tools is not None and self.tools.choice != "none" else None


def parse_completion(body: dict, max_prompt_chars: int) -> CompletionRequest:
    f = Fields(body)
    ignored = _screen(body, USED_COMPLETION, REFUSED_COMPLETION)
    prompts = _prompts(body.get("prompt"), max_prompt_chars)
    stream, include_usage = _stream_fields(f)
    echo = f.bool("echo", False)
    logprobs = body.get("logprobs")
    max_tokens = body.get("max_tokens", 16)
    if max_tokens is None:
        max_tokens = 16
    # NOTE: echo with max_tokens 0 scores the prompt (vLLM accepts it). The engine always samples
    # at least one token, so it runs with max_tokens 1 and the token is dropped from the answer.
    prompt_only = echo and isinstance(max_tokens, (int, float)) and not isinstance(max_tokens, bool) \
        and max_tokens == 0
    constraint = structured.from_body(body)
    params = sampling_params(body, max_tokens=1 if prompt_only else max_tokens, logprobs=logprobs,
                             prompt_logprobs=logprobs if echo else None, stream=stream, constraint=constraint)
    return CompletionRequest(model=f.str("model"), prompts=prompts, params=params, stream=stream,
                             include_usage=include_usage, echo=echo, logprobs=params.logprobs,
                             prompt_only=prompt_only, add_special_tokens=f.bool("add_special_tokens", True),
                             ignored=ignored, constraint=constraint)


def parse_chat(body: dict, max_prompt_chars: int) -> ChatRequest:
    f = Fields(body)
    ignored = _screen(body, USED_CHAT, REFUSED_CHAT)
    tool_req = tools.parse_tools(body)
    constraint = _chat_constraint(structured.from_body(body), tool_req)
    messages = _messages(body.get("messages"), max_prompt_chars)
    stream, include_usage = _stream_fields(f)
    logprobs = f.bool("logprobs", False)
    top_logprobs = f.int("top_logprobs", None, lo=0, hi=MAX_LOGPROBS)
    if top_logprobs is not None and not logprobs:
        raise bad_request("top_logprobs needs logprobs=true", "top_logprobs")
    top_logprobs = top_logprobs or 0
    # NOTE: OpenAI renamed max_tokens to max_completion_tokens for chat; both are accepted.
    max_tokens = f.int("max_completion_tokens", None, lo=1)
    if max_tokens is None:
        max_tokens = body.get("max_tokens")
    params = sampling_params(body, max_tokens=max_tokens, logprobs=top_logprobs if logprobs else None,
                             stream=stream, constraint=constraint)
    kwargs = _template_kwargs(f)
    if tool_req is not None:
        kwargs["tools"] = tool_req.tools          # NOTE: as transformers' apply_chat_template(tools=...)
    return ChatRequest(model=f.str("model"), messages=messages, params=params,
                       add_generation_prompt=f.bool("add_generation_prompt", True), stream=stream,
                       include_usage=include_usage, logprobs=logprobs, top_logprobs=top_logprobs,
                       add_special_tokens=f.bool("add_special_tokens", False),
                       template_kwargs=kwargs, ignored=ignored, tools=tool_req, constraint=constraint)


def _chat_constraint(asked: Constraint | None, tool_req: ToolsRequest | None) -> Constraint | None:
    """The output's constraint: the structured output asked for, or the one tool_choice implies."""
    if tool_req is None or tool_req.choice == "none":
        return asked
    if asked is not None:
        raise bad_request(f"{asked.param} cannot be combined with tool_choice {tool_req.choice!r} "
                          "(the answer is tool calls, or structured output, not both)", asked.param)
    implied = tools.constraint(tool_req)
    if implied is None:
        return None
    so, blame = implied
    return Constraint(so, blame, blame)


# Variables the server sets for the chat template; a client cannot override them.
TEMPLATE_RESERVED = ("messages", "add_generation_prompt", "bos_token", "eos_token")


def _template_kwargs(f: Fields) -> dict:
    kwargs = dict(f.obj("chat_template_kwargs") or {})
    for name in TEMPLATE_RESERVED:
        if name in kwargs:
            own = "the request's own field" if name in ("messages", "add_generation_prompt") else "the model's"
            raise bad_request(f"chat_template_kwargs must not set {name!r} (the template gets {own})",
                              "chat_template_kwargs")
    documents = f.body.get("documents")
    if documents is not None:
        if not isinstance(documents, list) or not all(isinstance(d, dict) for d in documents):
            raise f.wrong("documents", "an array of objects")
        kwargs["documents"] = documents
    return kwargs


def _stream_fields(f: Fields) -> tuple[bool, bool]:
    stream = f.bool("stream", False)
    opts = f.obj("stream_options")
    if opts is not None and not stream:
        raise bad_request("stream_options is only allowed with stream=true", "stream_options")
    include_usage = Fields(opts, "stream_options.").bool("include_usage", False) if opts else False
    return stream, include_usage


def _prompts(prompt, max_chars: int) -> list[str | list[int]]:
    """OpenAI's four prompt forms: text, [text...], [id...], [[id...]...]."""
    def wrong(why: str) -> ApiError:
        return bad_request(f"prompt {why}: it must be a string, an array of strings, an array of token ids, "
                           "or an array of arrays of token ids", "prompt")

    if prompt is None:
        raise bad_request("prompt is required", "prompt")
    if isinstance(prompt, str):
        prompts = [prompt]
    elif not isinstance(prompt, list) or not prompt:
        raise wrong("is empty" if isinstance(prompt, list) else f"has type {type(prompt).__name__}")
    elif all(isinstance(p, str) for p in prompt):
        prompts = list(prompt)
    elif all(_is_int(t) for t in prompt):
        prompts = [list(prompt)]
    elif all(isinstance(p, list) and p and all(_is_int(t) for t in p) for p in prompt):
        prompts = [list(p) for p in prompt]
    else:
        raise wrong("has a wrong element")
    if len(prompts) > MAX_PROMPTS:
        raise bad_request(f"prompt holds {len(prompts)} prompts; at most {MAX_PROMPTS} per request", "prompt")
    for p in prompts:
        check_chars(len(p) if isinstance(p, str) else 0, max_chars, "prompt")
    return prompts


def check_chars(n: int, max_chars: int, param: str, what: str = "the prompt") -> None:
    """Bound the text before it is tokenized (tokenizing megabytes takes seconds)."""
    if n > max_chars:
        raise ApiError(400, f"{what} is {n} characters long; this server takes at most {max_chars} "
                            "(see --max-prompt-chars)", param=param, code="context_length_exceeded")


def _messages(messages, max_chars: int) -> list[dict]:
    """Chat messages with text content; content parts of type text are joined by newlines."""
    if not isinstance(messages, list) or not messages:
        raise bad_request("messages must be a non-empty array of message objects", "messages")
    out, chars = [], 0
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise bad_request(f"{where} must be an object", where)
        role = m.get("role")
        if not isinstance(role, str) or not role:
            raise bad_request(f"{where}.role must be a non-empty string", f"{where}.role")
        msg = dict(m)
        msg["content"] = _content(m.get("content"), f"{where}.content")
        chars += len(msg["content"] or "")
        out.append(msg)
    check_chars(chars, max_chars, "messages", "the messages' content")
    return out


def _content(content, where: str) -> str | None:
    if content is None or isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise bad_request(f"{where} must be a string or an array of content parts", where)
    texts = []
    for j, part in enumerate(content):
        if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
            raise bad_request(f"{where}[{j}] must be a text part {{\"type\": \"text\", \"text\": ...}} "
                              "(this server takes text only)", f"{where}[{j}]")
        texts.append(part["text"])
    return "\n".join(texts)


# -- sampling ---------------------------------------------------------------------------------
def sampling_params(body: dict, *, max_tokens, logprobs, prompt_logprobs=None, stream: bool = False,
                    constraint: Constraint | None = None) -> SamplingParams:
    """The request's sampling fields, as sent, through SamplingParams' validator; then the rules that
    only the HTTP API has (what cannot be streamed or reported)."""
    kwargs = {name: body[name] for name in SAMPLING_FIELDS if body.get(name) is not None}
    # NOTE: beam search is deterministic; its default temperature is 0, not OpenAI's 1.
    if kwargs.get("use_beam_search") is True:
        kwargs.setdefault("temperature", 0.0)
    try:
        params = SamplingParams(**kwargs, max_tokens=max_tokens, logprobs=logprobs, prompt_logprobs=prompt_logprobs,
                                structured_outputs=constraint.params if constraint is not None else None)
    except SamplingParamsError as e:
        if e.param == "structured_outputs" and constraint is not None:
            raise bad_request(constraint.rename(str(e)), constraint.param) from None
        raise bad_request(str(e), e.param) from None
    if stream and params.best_of > params.n:
        raise bad_request("best_of > n cannot be streamed (the best sequences are known only at the end)",
                          "best_of")
    if params.use_beam_search and stream:
        raise bad_request("use_beam_search cannot be streamed (beams are decoded once, at the end)", "stream")
    if params.use_beam_search and (params.logprobs is not None or params.prompt_logprobs is not None):
        raise bad_request("logprobs are not reported with use_beam_search", "logprobs")
    return params


def check_token_ids(ids: list[int], vocab_size: int, param: str) -> None:
    bad = next((t for t in ids if not 0 <= t < vocab_size), None)
    if bad is not None:
        raise bad_request(f"{param} has token id {_shown(bad)}, outside the vocabulary [0, {vocab_size})", param)


def check_length(num_prompt_tokens: int, max_tokens: int | None, max_model_len: int, what: str = "prompt") -> None:
    """OpenAI's rule: the prompt plus the tokens asked for must fit the model's context."""
    param = "prompt" if what == "prompt" else "messages"
    if num_prompt_tokens == 0:
        raise bad_request(f"the {what} is empty (no tokens)", param)
    wanted = num_prompt_tokens + (max_tokens or 1)
    if num_prompt_tokens >= max_model_len or wanted > max_model_len:
        detail = f"{num_prompt_tokens} in the {what}" + (f", {_count(max_tokens)} in the completion" if max_tokens else "")
        raise ApiError(400, f"This model's maximum context length is {max_model_len} tokens, but "
                            f"{_count(wanted)} were requested ({detail})",
                       param="max_tokens" if num_prompt_tokens < max_model_len else param,
                       code="context_length_exceeded")


def _count(n: int) -> str:
    s = str(n)
    return s if len(s) <= 20 else s[:17] + "..."


def check_vocab(params: SamplingParams, vocab_size: int) -> None:
    """Token ids inside the sampling fields must exist (the engine would refuse them, less clearly)."""
    if params.logit_bias:
        check_token_ids(list(params.logit_bias), vocab_size, "logit_bias")
    check_token_ids(params.stop_token_ids, vocab_size, "stop_token_ids")


# -- /tokenize, /detokenize (vLLM's shapes) ---------------------------------------------------
@dataclass
class TokenizeRequest:
    model: str | None
    prompt: str | None                      # the completion form ...
    messages: list[dict] | None             # ... or the chat form
    add_special_tokens: bool
    add_generation_prompt: bool = True
    return_token_strs: bool = False
    template_kwargs: dict = field(default_factory=dict)


def parse_tokenize(body: dict, max_prompt_chars: int) -> TokenizeRequest:
    f = Fields(body)
    _screen(body, set(body), {"tools": ([],), "chat_template": (), "continue_final_message": (False,),
                              "mm_processor_kwargs": ()})
    common = dict(model=f.str("model"), return_token_strs=f.bool("return_token_strs", False))
    if body.get("messages") is not None:
        return TokenizeRequest(prompt=None, messages=_messages(body["messages"], max_prompt_chars),
                               add_special_tokens=f.bool("add_special_tokens", False),
                               add_generation_prompt=f.bool("add_generation_prompt", True),
                               template_kwargs=_template_kwargs(f), **common)
    prompt = f.str("prompt")
    if prompt is None:
        raise bad_request("prompt (a string) or messages is required", "prompt")
    check_chars(len(prompt), max_prompt_chars, "prompt")
    return TokenizeRequest(prompt=prompt, messages=None, add_special_tokens=f.bool("add_special_tokens", True),
                           **common)


def parse_detokenize(body: dict, vocab_size: int) -> tuple[str | None, list[int]]:
    f = Fields(body)
    tokens = body.get("tokens")
    if not isinstance(tokens, list) or not all(_is_int(t) for t in tokens):
        raise f.wrong("tokens", "an array of token ids")
    check_token_ids(tokens, vocab_size, "tokens")
    return f.str("model"), tokens
