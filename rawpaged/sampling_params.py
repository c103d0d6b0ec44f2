"""SamplingParams: how one request turns logits into tokens, and when it stops.

`SamplingParams.__post_init__` runs the ONE validator of sampling fields: the offline API
(`LLM.generate`) and the OpenAI server both build SamplingParams from what the user gave, so
both refuse the same values with the same one-line message. The server passes the JSON values
through untouched (a JSON `"n": "2"` reaches this validator as the string "2"), which is why the
validator checks types too, not only ranges.

Every refusal is a SamplingParamsError (a ValueError) whose `param` names the field; its message
begins with that name ("temperature must be a finite number, got nan").

`structured_outputs` constrains what may be generated (a JSON schema, any JSON object, a regex, one
of several strings, or a grammar); see StructuredOutputsParams. It is compiled here, once, by the
grammar engine (rawpaged/structured_output.py), so a bad schema, regex or grammar is refused with
the others, in one line that names it.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

MAX_N = 128                 # n and best_of (a request of 10^6 samples is a mistake, not a workload)
MAX_LOGPROBS = 20           # logprobs / prompt_logprobs, as vLLM's default max_logprobs
MAX_LOGIT_BIAS = 100.0      # OpenAI: bias values in [-100, 100]
MAX_SEED = 2**64 - 1        # NumPy's SeedSequence takes non-negative integers; we keep them 64-bit
MAX_STOP_STRINGS = 64       # every stop string is searched for after every token
_MAX_SHOWN = 40             # characters of a refused value quoted in a message
GREEDY_TEMPERATURE = 1e-5   # temperatures below this are greedy (vLLM's threshold)


@dataclass
class StructuredOutputsParams:
    """What the generated text must match (vLLM's StructuredOutputsParams). Exactly one of json,
    json_object, regex, choice, grammar.

    json                a JSON schema (an object, or its JSON text)
    json_object         any JSON object
    regex               a regular expression (Rust `regex` syntax) the whole output matches
    choice              one of these strings, exactly
    grammar             a context-free grammar: Lark (llguidance's dialect) or GBNF (llama.cpp's)
    whitespace_pattern  JSON only: a regex for the whitespace allowed between tokens; default none
                        (compact JSON: `{"a":1,"b":[2,3]}`)
    strict              JSON only: objects with no `additionalProperties` get none (OpenAI's strict
                        mode), rather than JSON Schema's default of any
    """
    json: dict | bool | str | None = None
    json_object: bool = False
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    whitespace_pattern: str | None = None
    strict: bool = False
    # The grammar engine's text for the constraint, set by validate() (compiled once per request).
    compiled: str | None = field(default=None, repr=False, compare=False)

    @property
    def kind(self) -> str:
        """Which constraint: "json", "json_object", "regex", "choice" or "grammar"."""
        return next(k for k in _STRUCTURED_KINDS if _given(self, k))


_STRUCTURED_KINDS = ("json", "json_object", "regex", "choice", "grammar")


def _given(so: StructuredOutputsParams, kind: str) -> bool:
    v = getattr(so, kind)
    return v is True if kind == "json_object" else v is not None


class SamplingParamsError(ValueError):
    """A refused sampling field; `param` is its name (the server's error `param`)."""

    def __init__(self, param: str, message: str):
        super().__init__(message)
        self.param = param


@dataclass
class SamplingParams:
    n: int = 1                          # sequences returned
    best_of: int | None = None          # sequences generated (>= n); beam width with beam search
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    temperature: float = 1.0            # 0 means greedy
    top_p: float = 1.0
    top_k: int = -1                     # -1 (or 0) disables
    min_p: float = 0.0
    seed: int | None = None
    use_beam_search: bool = False
    length_penalty: float = 1.0
    early_stopping: bool | str = False
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    max_tokens: int | None = 16         # None: up to the model's maximum length
    logprobs: int | None = None         # top-N logprobs per generated token
    prompt_logprobs: int | None = None  # top-N logprobs per prompt token
    skip_special_tokens: bool = True
    logit_bias: dict[int, float] | None = None
    structured_outputs: StructuredOutputsParams | dict | None = None   # a dict: its fields

    def __post_init__(self):
        validate(self)

    def is_greedy(self) -> bool:
        """Temperature below GREEDY_TEMPERATURE: the argmax (vLLM's threshold)."""
        return self.temperature < GREEDY_TEMPERATURE

    def is_plain_greedy(self) -> bool:
        """One greedy sequence, and nothing that reads or changes the logits but their argmax and its
        logprob (no penalties, bias, grammar, top-N logprobs, beams or parallel samples): what a
        multi-step decode call samples by itself (EngineConfig.num_scheduler_steps)."""
        return (self.is_greedy() and self.best_of == 1 and not self.use_beam_search and self.logprobs is None
                and not self.logit_bias and self.structured_outputs is None and self.presence_penalty == 0
                and self.frequency_penalty == 0 and self.repetition_penalty == 1)


# -- the validator ----------------------------------------------------------------------------
def validate(p: SamplingParams) -> None:
    """Check every field and normalize it in place (2.0 -> 2 for counts, 1 -> 1.0 for floats, a
    stop string -> [it], logit_bias keys "5" -> 5); SamplingParamsError on the first bad one."""
    p.n = _int("n", p.n, lo=1, hi=MAX_N)
    p.best_of = p.n if p.best_of is None else _int("best_of", p.best_of, lo=1, hi=MAX_N)
    if p.best_of < p.n:
        raise SamplingParamsError("best_of", f"best_of must be >= n, got best_of={p.best_of} n={p.n}")
    p.presence_penalty = _float("presence_penalty", p.presence_penalty, lo=-2.0, hi=2.0)
    p.frequency_penalty = _float("frequency_penalty", p.frequency_penalty, lo=-2.0, hi=2.0)
    p.repetition_penalty = _float("repetition_penalty", p.repetition_penalty)
    if p.repetition_penalty <= 0:
        raise SamplingParamsError("repetition_penalty", f"repetition_penalty must be > 0, got {p.repetition_penalty}")
    p.temperature = _float("temperature", p.temperature, lo=0.0)
    p.top_p = _float("top_p", p.top_p)
    if not 0.0 < p.top_p <= 1.0:
        raise SamplingParamsError("top_p", f"top_p must be in (0, 1], got {p.top_p}")
    p.top_k = _int("top_k", p.top_k)
    if p.top_k < -1:
        raise SamplingParamsError("top_k", f"top_k must be -1 or 0 (disabled) or >= 1, got {_shown(p.top_k)}")
    p.min_p = _float("min_p", p.min_p, lo=0.0, hi=1.0)
    p.seed = None if p.seed is None else _int("seed", p.seed, lo=0, hi=MAX_SEED)
    p.use_beam_search = _bool("use_beam_search", p.use_beam_search)
    p.length_penalty = _float("length_penalty", p.length_penalty)
    if not (isinstance(p.early_stopping, bool) or p.early_stopping == "never"):
        raise SamplingParamsError("early_stopping", f"early_stopping must be true, false or 'never', "
                                                    f"got {_shown(p.early_stopping)}")
    p.stop = _stop_strings(p.stop)
    p.stop_token_ids = _token_ids("stop_token_ids", p.stop_token_ids)
    p.include_stop_str_in_output = _bool("include_stop_str_in_output", p.include_stop_str_in_output)
    p.ignore_eos = _bool("ignore_eos", p.ignore_eos)
    p.max_tokens = None if p.max_tokens is None else _int("max_tokens", p.max_tokens, lo=1)
    p.logprobs = None if p.logprobs is None else _int("logprobs", p.logprobs, lo=0, hi=MAX_LOGPROBS)
    p.prompt_logprobs = None if p.prompt_logprobs is None else \
        _int("prompt_logprobs", p.prompt_logprobs, lo=0, hi=MAX_LOGPROBS)
    p.skip_special_tokens = _bool("skip_special_tokens", p.skip_special_tokens)
    p.logit_bias = _logit_bias(p.logit_bias)
    p.structured_outputs = _structured_outputs(p.structured_outputs)
    if p.use_beam_search:
        if p.best_of < 2:
            raise SamplingParamsError("best_of", "beam search needs best_of (beam width) >= 2")
        if p.temperature > 0:
            raise SamplingParamsError("temperature", "beam search needs temperature=0")


def _shown(value) -> str:
    """A refused value as quoted in a message: its repr, cut short (a 4000-digit int stays one line)."""
    r = repr(value)
    return r if len(r) <= _MAX_SHOWN else r[:_MAX_SHOWN - 3] + "..."


def _wrong(name: str, want: str, value) -> SamplingParamsError:
    return SamplingParamsError(name, f"{name} must be {want}, got {_shown(value)}")


def _range(name: str, v, lo, hi) -> None:
    if lo is not None and v < lo:
        raise SamplingParamsError(name, f"{name} must be >= {lo}, got {_shown(v)}")
    if hi is not None and v > hi:
        raise SamplingParamsError(name, f"{name} must be <= {hi}, got {_shown(v)}")


def _int(name: str, v, lo: int | None = None, hi: int | None = None) -> int:
    # NOTE: bool is a subclass of int in Python, but `true` is not a count; 2.0 is (JSON writers
    # in some languages cannot tell 2 from 2.0).
    if isinstance(v, float) and v.is_integer():
        v = int(v)
    if isinstance(v, bool) or not isinstance(v, int):
        raise _wrong(name, "an integer", v)
    _range(name, v, lo, hi)
    return int(v)


def _float(name: str, v, lo: float | None = None, hi: float | None = None) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise _wrong(name, "a finite number", v)
    try:
        v = float(v)
    except OverflowError:            # an int beyond the float range
        raise _wrong(name, "a finite number", v) from None
    if not math.isfinite(v):
        raise _wrong(name, "a finite number", v)
    _range(name, v, lo, hi)
    return v


def _bool(name: str, v) -> bool:
    if not isinstance(v, bool):
        raise _wrong(name, "true or false", v)
    return v


def _stop_strings(stop) -> list[str]:
    items = [stop] if isinstance(stop, str) else stop
    if items is None:
        return []
    if not isinstance(items, (list, tuple)) or not all(isinstance(s, str) for s in items):
        raise _wrong("stop", "a string or a list of strings", stop)
    if any(s == "" for s in items):
        # NOTE: an empty stop string matches at once: the request would stop after one token.
        raise SamplingParamsError("stop", "stop strings must not be empty")
    if len(items) > MAX_STOP_STRINGS:
        raise SamplingParamsError("stop", f"stop must have at most {MAX_STOP_STRINGS} strings, got {len(items)}")
    return list(items)


def _token_ids(name: str, ids) -> list[int]:
    if ids is None:
        return []
    if not isinstance(ids, (list, tuple)):
        raise _wrong(name, "a list of token ids", ids)
    out = []
    for t in ids:
        if isinstance(t, bool) or not isinstance(t, int) or t < 0:
            raise _wrong(name, "a list of token ids (integers >= 0)", ids)
        out.append(int(t))
    return out


_DECIMAL = re.compile(r"-?[0-9]{1,20}")


def _logit_bias(bias) -> dict[int, float] | None:
    """{token id (an int, or its decimal string as JSON keys are): bias in [-100, 100]}; {} is None."""
    if bias is None:
        return None
    if not isinstance(bias, dict):
        raise _wrong("logit_bias", "an object mapping token ids to biases", bias)
    out = {}
    for key, value in bias.items():
        tid = int(key) if isinstance(key, str) and _DECIMAL.fullmatch(key) else key
        if isinstance(tid, bool) or not isinstance(tid, int):
            raise SamplingParamsError("logit_bias", f"logit_bias keys must be token ids, got {_shown(key)}")
        where = f"logit_bias[{_shown(key)}]"
        try:
            v = _float(where, value)
        except SamplingParamsError as e:
            raise SamplingParamsError("logit_bias", str(e)) from None
        if not -MAX_LOGIT_BIAS <= v <= MAX_LOGIT_BIAS:
            raise SamplingParamsError("logit_bias", f"{where} must be in [-100, 100], got {_shown(value)}")
        out[tid] = v
    return out or None


# -- structured outputs -----------------------------------------------------------------------
_SO = "structured_outputs"


def _structured_outputs(so) -> StructuredOutputsParams | None:
    """Check the constraint's fields and compile it (the grammar engine's own checks included).
    Every refusal's `param` is "structured_outputs"; the message names the sub-field."""
    if so is None:
        return None
    try:
        return _check_structured(so)
    except SamplingParamsError as e:
        raise SamplingParamsError(_SO, str(e)) from None


def _check_structured(so) -> StructuredOutputsParams:
    if isinstance(so, dict):
        unknown = sorted(set(so) - {f for f in StructuredOutputsParams.__dataclass_fields__ if f != "compiled"})
        if unknown:
            raise SamplingParamsError(_SO, f"{_SO} has unknown field(s) {', '.join(map(_shown, unknown))}")
        so = StructuredOutputsParams(**so)
    if not isinstance(so, StructuredOutputsParams):
        raise _wrong(_SO, "a StructuredOutputsParams or a dict of its fields", so)
    kinds = [k for k in _STRUCTURED_KINDS if _given(so, k)]
    if len(kinds) != 1:
        raise SamplingParamsError(_SO, f"{_SO} needs exactly one of {', '.join(_STRUCTURED_KINDS)}, got "
                                       f"{', '.join(kinds) if kinds else 'none'}")
    so.json_object = _bool(f"{_SO}.json_object", so.json_object)
    so.strict = _bool(f"{_SO}.strict", so.strict)
    if so.json is not None and not isinstance(so.json, (dict, bool, str)):
        raise _wrong(f"{_SO}.json", "a JSON schema (an object or its JSON text)", so.json)
    for name in ("regex", "grammar", "whitespace_pattern"):
        v = getattr(so, name)
        if v is not None and not isinstance(v, str):
            raise _wrong(f"{_SO}.{name}", "a string", v)
    if so.choice is not None:
        if not isinstance(so.choice, (list, tuple)) or not so.choice or not all(isinstance(c, str) for c in so.choice):
            raise _wrong(f"{_SO}.choice", "a non-empty list of strings", so.choice)
        so.choice = list(so.choice)
    # NOTE: imported here: the grammar engine loads only for requests that use it.
    from rawpaged.structured_output import GrammarError, compile_grammar
    try:
        so.compiled = compile_grammar(so)
    except GrammarError as e:
        raise SamplingParamsError(_SO, f"{_SO}.{so.kind} {e}") from None
    return so
