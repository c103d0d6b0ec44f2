"""OpenAI requests in, SamplingParams out; errors in OpenAI's shape.

Validation is by hand (no pydantic): each field is read with its JSON type, and a mistake becomes
ApiError(400) naming the field in `param`, so a client sees which field to fix. A field sent as
null means "not given" (OpenAI's clients send nulls). Unknown fields are ignored, as OpenAI does
for fields it does not know yet; fields we know but cannot honour (`suffix`, `tools`) are refused.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from rawpaged.sampling_params import SamplingParams

MAX_N = 128                 # n and best_of (a request of 10^6 samples is a mistake, not a workload)
MAX_LOGPROBS = 20           # logprobs / top_logprobs, as vLLM
MAX_LOGIT_BIAS = 100.0      # OpenAI: bias values in [-100, 100]


class ApiError(Exception):
    """An error the client receives as {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad_request(message: str, param: str | None = None) -> ApiError:
    return ApiError(400, message, param=param)


# -- typed field access -----------------------------------------------------------------------
_TYPE_NAMES = {int: "an integer", float: "a number", bool: "a boolean", str: "a string",
               list: "an array", dict: "an object"}


class Fields:
    """Typed reads from a request's JSON object; every mistake is a 400 naming the field."""

    def __init__(self, body: dict, prefix: str = ""):
        self.body = body
        self.prefix = prefix

    def _raw(self, name: str):
        return self.body.get(name)

    def _wrong(self, name: str, want: str) -> ApiError:
        value = self.body.get(name)
        shown = repr(value) if len(repr(value)) <= 40 else repr(value)[:37] + "..."
        return bad_request(f"{self.prefix}{name} must be {want}, got {shown}", self.prefix + name)

    def int(self, name: str, default=None, lo: int | None = None, hi: int | None = None):
        v = self._raw(name)
        if v is None:
            return default
        # NOTE: bool is a subclass of int in Python, but `true` is not a number in JSON.
        if isinstance(v, float) and v.is_integer():
            v = int(v)
        if isinstance(v, bool) or not isinstance(v, int):
            raise self._wrong(name, _TYPE_NAMES[int])
        self._range(name, v, lo, hi)
        return v

    def number(self, name: str, default=None, lo: float | None = None, hi: float | None = None):
        v = self._raw(name)
        if v is None:
            return default
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise self._wrong(name, "a finite number")
        self._range(name, v, lo, hi)
        return float(v)

    def bool(self, name: str, default=None):
        v = self._raw(name)
        if v is None:
            return default
        if not isinstance(v, bool):
            raise self._wrong(name, _TYPE_NAMES[bool])
        return v

    def str(self, name: str, default=None):
        v = self._raw(name)
        if v is None:
            return default
        if not isinstance(v, str):
            raise self._wrong(name, _TYPE_NAMES[str])
        return v

    def obj(self, name: str) -> dict | None:
        v = self._raw(name)
        if v is None:
            return None
        if not isinstance(v, dict):
            raise self._wrong(name, _TYPE_NAMES[dict])
        return v

    def str_list(self, name: str) -> list[str]:
        """A string or an array of strings (OpenAI's `stop`)."""
        v = self._raw(name)
        if v is None:
            return []
        items = [v] if isinstance(v, str) else v
        if not isinstance(items, list) or not all(isinstance(s, str) for s in items):
            raise self._wrong(name, "a string or an array of strings")
        return items

    def int_list(self, name: str) -> list[int]:
        v = self._raw(name)
        if v is None:
            return []
        if not isinstance(v, list) or not all(_is_int(t) for t in v):
            raise self._wrong(name, "an array of integers")
        return [int(t) for t in v]

    def _range(self, name: str, v, lo, hi) -> None:
        if lo is not None and v < lo:
            raise bad_request(f"{self.prefix}{name} must be >= {lo}, got {v}", self.prefix + name)
        if hi is not None and v > hi:
            raise bad_request(f"{self.prefix}{name} must be <= {hi}, got {v}", self.prefix + name)


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


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
    extra_template_kwargs: dict = field(default_factory=dict)


def parse_completion(body: dict) -> CompletionRequest:
    f = Fields(body)
    _refuse_unsupported(f, ("suffix",))
    prompts = _prompts(body.get("prompt"))
    stream, include_usage = _stream_fields(f)
    logprobs = f.int("logprobs", None, lo=0, hi=MAX_LOGPROBS)
    echo = f.bool("echo", False)
    # NOTE: echo with logprobs reports the prompt's logprobs too, so the engine computes them.
    params = sampling_params(f, default_max_tokens=16, logprobs=logprobs,
                             prompt_logprobs=logprobs if echo else None, stream=stream)
    return CompletionRequest(model=f.str("model"), prompts=prompts, params=params, stream=stream,
                             include_usage=include_usage, echo=echo, logprobs=logprobs)


def parse_chat(body: dict) -> ChatRequest:
    f = Fields(body)
    _refuse_unsupported(f, ("tools", "functions"))
    tool_choice = body.get("tool_choice")
    if tool_choice not in (None, "none"):
        raise bad_request("tool_choice is not supported (this server has no tool calling)", "tool_choice")
    fmt = f.obj("response_format")
    if fmt is not None and fmt.get("type") not in (None, "text"):
        raise bad_request(f"response_format type {fmt.get('type')!r} is not supported (only 'text')",
                          "response_format")
    messages = _messages(body.get("messages"))
    stream, include_usage = _stream_fields(f)
    logprobs = f.bool("logprobs", False)
    top_logprobs = f.int("top_logprobs", None, lo=0, hi=MAX_LOGPROBS)
    if top_logprobs is not None and not logprobs:
        raise bad_request("top_logprobs needs logprobs=true", "top_logprobs")
    top_logprobs = top_logprobs or 0
    # NOTE: OpenAI renamed max_tokens to max_completion_tokens for chat; both are accepted.
    max_tokens = f.int("max_completion_tokens", None, lo=1)
    params = sampling_params(f, default_max_tokens=None, logprobs=top_logprobs if logprobs else None,
                             max_tokens_override=max_tokens, stream=stream)
    kwargs = f.obj("chat_template_kwargs") or {}
    return ChatRequest(model=f.str("model"), messages=messages, params=params,
                       add_generation_prompt=f.bool("add_generation_prompt", True), stream=stream,
                       include_usage=include_usage, logprobs=logprobs, top_logprobs=top_logprobs,
                       extra_template_kwargs=kwargs)


def _refuse_unsupported(f: Fields, names: tuple[str, ...]) -> None:
    for name in names:
        v = f.body.get(name)
        if v not in (None, "", [], {}):
            raise bad_request(f"{name} is not supported by this server", name)


def _stream_fields(f: Fields) -> tuple[bool, bool]:
    stream = f.bool("stream", False)
    opts = f.obj("stream_options")
    if opts is not None and not stream:
        raise bad_request("stream_options is only allowed with stream=true", "stream_options")
    include_usage = Fields(opts, "stream_options.").bool("include_usage", False) if opts else False
    return stream, include_usage


def _prompts(prompt) -> list[str | list[int]]:
    """OpenAI's four prompt forms: text, [text...], [id...], [[id...]...]."""
    def wrong(why: str) -> ApiError:
        return bad_request(f"prompt {why}: it must be a string, an array of strings, an array of token ids, "
                           "or an array of arrays of token ids", "prompt")

    if prompt is None:
        raise bad_request("prompt is required", "prompt")
    if isinstance(prompt, str):
        return [prompt]
    if not isinstance(prompt, list) or not prompt:
        raise wrong("is empty" if isinstance(prompt, list) else f"has type {type(prompt).__name__}")
    if all(isinstance(p, str) for p in prompt):
        return list(prompt)
    if all(_is_int(t) for t in prompt):
        return [list(prompt)]
    if all(isinstance(p, list) and p and all(_is_int(t) for t in p) for p in prompt):
        return [list(p) for p in prompt]
    raise wrong("has a wrong element")


def _messages(messages) -> list[dict]:
    """Chat messages with text content; content parts of type text are joined by newlines."""
    if not isinstance(messages, list) or not messages:
        raise bad_request("messages must be a non-empty array of message objects", "messages")
    out = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise bad_request(f"{where} must be an object", where)
        role = m.get("role")
        if not isinstance(role, str) or not role:
            raise bad_request(f"{where}.role must be a non-empty string", f"{where}.role")
        msg = dict(m)
        msg["content"] = _content(m.get("content"), f"{where}.content")
        out.append(msg)
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
# SamplingParams' messages begin with the field's name: that name becomes the error's `param`.
_SAMPLING_FIELDS = {"n", "best_of", "temperature", "top_p", "top_k", "min_p", "presence_penalty",
                    "frequency_penalty", "repetition_penalty", "max_tokens", "logprobs", "prompt_logprobs",
                    "early_stopping"}


def sampling_params(f: Fields, *, default_max_tokens: int | None, logprobs: int | None,
                    prompt_logprobs: int | None = None, max_tokens_override: int | None = None,
                    stream: bool = False) -> SamplingParams:
    use_beam_search = f.bool("use_beam_search", False)
    n = f.int("n", 1, lo=1, hi=MAX_N)
    best_of = f.int("best_of", None, lo=1, hi=MAX_N)
    max_tokens = f.int("max_tokens", default_max_tokens, lo=1)
    if max_tokens_override is not None:
        max_tokens = max_tokens_override
    stop = f.str_list("stop")
    if any(s == "" for s in stop):
        raise bad_request("stop strings must not be empty", "stop")
    seed = f.int("seed", None)
    if seed is not None:
        # NOTE: OpenAI takes any 64-bit seed; NumPy seeds must be >= 0, so negatives wrap around.
        seed %= 1 << 64
    if stream and best_of is not None and best_of > n:
        raise bad_request("best_of > n cannot be streamed (the best sequences are known only at the end)",
                          "best_of")
    if use_beam_search and stream:
        raise bad_request("use_beam_search cannot be streamed (beams are decoded once, at the end)", "stream")
    if use_beam_search and (logprobs is not None or prompt_logprobs is not None):
        raise bad_request("logprobs are not reported with use_beam_search", "logprobs")
    try:
        return SamplingParams(
            n=n, best_of=best_of,
            presence_penalty=f.number("presence_penalty", 0.0),
            frequency_penalty=f.number("frequency_penalty", 0.0),
            repetition_penalty=f.number("repetition_penalty", 1.0),
            # NOTE: beam search is deterministic; its default temperature is 0, not OpenAI's 1.
            temperature=f.number("temperature", 0.0 if use_beam_search else 1.0),
            top_p=f.number("top_p", 1.0),
            top_k=f.int("top_k", -1),
            min_p=f.number("min_p", 0.0),
            seed=seed,
            use_beam_search=use_beam_search,
            length_penalty=f.number("length_penalty", 1.0),
            early_stopping=_early_stopping(f),
            stop=stop,
            stop_token_ids=f.int_list("stop_token_ids"),
            include_stop_str_in_output=f.bool("include_stop_str_in_output", False),
            ignore_eos=f.bool("ignore_eos", False),
            max_tokens=max_tokens,
            logprobs=logprobs,
            prompt_logprobs=prompt_logprobs,
            skip_special_tokens=f.bool("skip_special_tokens", True),
            logit_bias=_logit_bias(f),
        )
    except ValueError as e:
        msg = str(e).splitlines()[0] if str(e) else "invalid sampling parameters"
        name = msg.split(" ", 1)[0]
        raise bad_request(msg, name if name in _SAMPLING_FIELDS else None) from None


def _early_stopping(f: Fields):
    v = f.body.get("early_stopping")
    if v is None:
        return False
    if isinstance(v, bool) or v == "never":
        return v
    raise f._wrong("early_stopping", "true, false or \"never\"")


def _logit_bias(f: Fields) -> dict[int, float] | None:
    """OpenAI's logit_bias: {"token id as a string": bias in [-100, 100]}; {} means none."""
    raw = f.obj("logit_bias")
    if not raw:
        return None
    bias = {}
    for key, value in raw.items():
        try:
            tid = int(key)
        except (TypeError, ValueError):
            raise bad_request(f"logit_bias keys must be token ids, got {key!r}", "logit_bias") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise bad_request(f"logit_bias[{key!r}] must be a number, got {value!r}", "logit_bias")
        if not -MAX_LOGIT_BIAS <= value <= MAX_LOGIT_BIAS:
            raise bad_request(f"logit_bias[{key!r}] must be in [-100, 100], got {value}", "logit_bias")
        bias[tid] = float(value)
    return bias


def check_token_ids(ids: list[int], vocab_size: int, param: str) -> None:
    bad = next((t for t in ids if not 0 <= t < vocab_size), None)
    if bad is not None:
        raise bad_request(f"{param} has token id {bad}, outside the vocabulary [0, {vocab_size})", param)


def check_length(num_prompt_tokens: int, max_tokens: int | None, max_model_len: int, what: str = "prompt") -> None:
    """OpenAI's rule: the prompt plus the tokens asked for must fit the model's context."""
    if num_prompt_tokens == 0:
        raise bad_request(f"the {what} is empty (no tokens)", "prompt" if what == "prompt" else "messages")
    wanted = num_prompt_tokens + (max_tokens or 1)
    if num_prompt_tokens >= max_model_len or wanted > max_model_len:
        detail = f"{num_prompt_tokens} in the {what}" + (f", {max_tokens} in the completion" if max_tokens else "")
        raise ApiError(400, f"This model's maximum context length is {max_model_len} tokens, but "
                            f"{wanted} were requested ({detail})",
                       param="max_tokens" if num_prompt_tokens < max_model_len else
                       ("prompt" if what == "prompt" else "messages"),
                       code="context_length_exceeded")


def check_vocab(params: SamplingParams, vocab_size: int) -> None:
    """Token ids inside the sampling fields must exist (the engine would refuse them, less clearly)."""
    if params.logit_bias:
        check_token_ids(list(params.logit_bias), vocab_size, "logit_bias")
    check_token_ids(params.stop_token_ids, vocab_size, "stop_token_ids")
