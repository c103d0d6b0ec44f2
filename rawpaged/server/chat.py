"""Chat templates: a model's Jinja template turns `messages` into the prompt text.

Rendered the way Hugging Face transformers' `apply_chat_template` does, so a template written for
the Hub behaves the same here: a sandboxed, immutable Jinja environment with trim_blocks and
lstrip_blocks, the loopcontrols extension, `raise_exception(msg)` and `strftime_now(fmt)` as
globals, a `tojson` filter that keeps non-ASCII text, and the variables `messages`,
`add_generation_prompt`, `bos_token`, `eos_token`, and `tools` (the request's tools, as OpenAI sends
them: [{"type": "function", "function": {...}}], or None).

The rendered text is tokenized WITHOUT adding special tokens: templates write their own BOS
(transformers' apply_chat_template(tokenize=True) does the same).

A render is bounded, so that no template and no chat can stall a worker or eat the memory: the
sandbox's range() stops at 100,000 items, recursion stops at Python's limit, `*` and `**` refuse
results that would be huge, every call, attribute or item access checks a deadline, and the output
stops at a length limit. Each of these is the chat's (or the template's) fault: a 400 with the reason.
"""
from __future__ import annotations

import json
import math
import operator
import threading
import time
from datetime import datetime
from pathlib import Path

import jinja2
import jinja2.ext
import jinja2.meta
from jinja2.sandbox import ImmutableSandboxedEnvironment

from rawpaged.errors import RawpagedError
from rawpaged.server.protocol import ApiError, bad_request


class TemplateRaised(Exception):
    """raise_exception() called by a template: the chat is wrong, not the server."""


def _raise_exception(message):
    raise TemplateRaised(str(message))


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


class RenderLimit(Exception):
    """A render went past its time, size or arithmetic bound."""


MAX_SEQUENCE_PRODUCT = 1 << 20          # items in a string or list made by `*`
MAX_POWER_BITS = 1 << 16                # bits in an integer made by `**`


class BoundedSandbox(ImmutableSandboxedEnvironment):
    """Transformers' sandbox plus bounds: a deadline checked on every call, attribute and item
    access (a thread-local, set per render), and `*` / `**` that cannot build huge values."""

    intercepted_binops = frozenset({"*", "**"})
    _render = threading.local()

    def tick(self) -> None:
        deadline = getattr(self._render, "deadline", None)
        if deadline is not None and time.monotonic() > deadline:
            raise RenderLimit(f"rendering took longer than {self._render.budget:g} s")

    def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805 - jinja2's signature
        __self.tick()
        return super().call(__context, __obj, *args, **kwargs)

    def getattr(self, obj, attribute):
        self.tick()
        return super().getattr(obj, attribute)

    def getitem(self, obj, argument):
        self.tick()
        return super().getitem(obj, argument)

    def call_binop(self, context, op, left, right):
        self.tick()
        if op == "*":
            for seq, times in ((left, right), (right, left)):
                if isinstance(seq, (str, list, tuple)) and isinstance(times, int) \
                        and len(seq) * times > MAX_SEQUENCE_PRODUCT:
                    raise RenderLimit(f"a '*' would build {len(seq) * times} items (at most {MAX_SEQUENCE_PRODUCT})")
            return operator.mul(left, right)
        if isinstance(left, int) and isinstance(right, int) and right > 0 and abs(left) > 1 \
                and right * math.log2(abs(left)) > MAX_POWER_BITS:
            raise RenderLimit(f"a '**' would build an integer of over {MAX_POWER_BITS} bits")
        return operator.pow(left, right)


def _environment() -> jinja2.Environment:
    env = BoundedSandbox(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


class ChatTemplate:
    def __init__(self, source: str, bos_token: str | None, eos_token: str | None, origin: str,
                 render_timeout_s: float = 5.0):
        self.source = source
        self.origin = origin
        self.render_timeout_s = render_timeout_s
        self.bos_token = bos_token or ""
        self.eos_token = eos_token or ""
        try:
            env = _environment()
            self._template = env.from_string(source)
            # NOTE: a template that reads `tools` renders them for the model (tool_choice "auto").
            self.takes_tools = "tools" in jinja2.meta.find_undeclared_variables(env.parse(source))
        except jinja2.TemplateSyntaxError as e:
            raise RawpagedError(f"chat template from {origin} does not compile: line {e.lineno}: "
                                f"{e.message}") from None

    def render(self, messages: list[dict], add_generation_prompt: bool = True, max_chars: int | None = None,
               **kwargs) -> str:
        """The prompt text (at most max_chars); a template that refuses the chat (raise_exception), or
        a render past its bounds, gives a 400. Thread-safe: the server renders on worker threads."""
        variables = {"tools": None, "documents": None, **kwargs, "messages": messages,
                     "add_generation_prompt": add_generation_prompt,
                     "bos_token": self.bos_token, "eos_token": self.eos_token}
        bounds = BoundedSandbox._render
        bounds.budget, bounds.deadline = self.render_timeout_s, time.monotonic() + self.render_timeout_s
        try:
            return self._bounded_render(variables, max_chars)
        except TemplateRaised as e:
            raise bad_request(f"the chat template refused the messages: {e}", "messages") from None
        except jinja2.TemplateError as e:
            # NOTE: an undefined attribute or a type error inside the template usually means the
            # messages lack something the template expects: the client can fix it.
            raise bad_request(f"the chat template could not render the messages: {e}", "messages") from None
        except RenderLimit as e:
            raise bad_request(f"the chat template was stopped: {e}", "messages") from None
        except RecursionError:
            raise bad_request("the chat template was stopped: it recursed too deeply", "messages") from None
        except MemoryError:
            raise bad_request("the chat template was stopped: out of memory", "messages") from None
        except (TypeError, ValueError, KeyError, IndexError, AttributeError, OverflowError, ArithmeticError) as e:
            raise bad_request(f"the chat template could not render the messages: {type(e).__name__}: {e}",
                              "messages") from None
        finally:
            bounds.deadline = None

    def _bounded_render(self, variables: dict, max_chars: int | None) -> str:
        parts, size = [], 0
        for piece in self._template.generate(**variables):
            size += len(piece)
            if max_chars is not None and size > max_chars:
                raise RenderLimit(f"the rendered chat exceeds {max_chars} characters (see --max-prompt-chars)")
            self._template.environment.tick()
            parts.append(piece)
        return "".join(parts)


def read_template_file(path: str) -> str:
    p = Path(path)
    if not p.is_file():
        raise RawpagedError(f"chat template file not found: {path}")
    try:
        return p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise RawpagedError(f"chat template file {path} cannot be read: {e}") from None


def is_inline_template(arg: str) -> bool:
    """--chat-template takes a file or the template itself (as vLLM's does): text with Jinja
    delimiters that names no existing file is the template."""
    return not Path(arg).is_file() and ("{{" in arg or "{%" in arg)


def load_chat_template(tokenizer, override: str | None) -> ChatTemplate | None:
    """--chat-template FILE or TEMPLATE, else the model's own template (tokenizer_config.json), else None."""
    def token_text(tid):
        return tokenizer.convert_ids_to_tokens([tid])[0] if tid is not None else None

    bos, eos = token_text(tokenizer.bos_token_id), token_text(tokenizer.eos_token_id)
    if override is not None:
        if is_inline_template(override):
            return ChatTemplate(override, bos, eos, origin="--chat-template")
        return ChatTemplate(read_template_file(override), bos, eos, origin=override)
    if tokenizer.chat_template:
        return ChatTemplate(tokenizer.chat_template, bos, eos, origin=f"{tokenizer.source}/tokenizer_config.json")
    return None


def no_template_error(model: str) -> ApiError:
    return bad_request(f"model {model!r} has no chat template (none in its tokenizer_config.json); "
                       "start the server with --chat-template FILE, or use /v1/completions", "messages")
