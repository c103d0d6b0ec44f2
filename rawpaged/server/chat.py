"""Chat templates: a model's Jinja template turns `messages` into the prompt text.

Rendered the way Hugging Face transformers' `apply_chat_template` does, so a template written for
the Hub behaves the same here: a sandboxed, immutable Jinja environment with trim_blocks and
lstrip_blocks, the loopcontrols extension, `raise_exception(msg)` and `strftime_now(fmt)` as
globals, a `tojson` filter that keeps non-ASCII text, and the variables `messages`,
`add_generation_prompt`, `bos_token`, `eos_token` (plus `tools=None`).

The rendered text is tokenized WITHOUT adding special tokens: templates write their own BOS
(transformers' apply_chat_template(tokenize=True) does the same).
"""
from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

import jinja2
import jinja2.ext
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


def _environment() -> jinja2.Environment:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


class ChatTemplate:
    def __init__(self, source: str, bos_token: str | None, eos_token: str | None, origin: str):
        self.source = source
        self.origin = origin
        self.bos_token = bos_token or ""
        self.eos_token = eos_token or ""
        try:
            self._template = _environment().from_string(source)
        except jinja2.TemplateSyntaxError as e:
            raise RawpagedError(f"chat template from {origin} does not compile: line {e.lineno}: "
                                f"{e.message}") from None

    def render(self, messages: list[dict], add_generation_prompt: bool = True, **kwargs) -> str:
        """The prompt text; a template that refuses the chat (raise_exception) gives a 400."""
        variables = {"tools": None, "documents": None, **kwargs, "messages": messages,
                     "add_generation_prompt": add_generation_prompt,
                     "bos_token": self.bos_token, "eos_token": self.eos_token}
        try:
            return self._template.render(**variables)
        except TemplateRaised as e:
            raise bad_request(f"the chat template refused the messages: {e}", "messages") from None
        except jinja2.TemplateError as e:
            # NOTE: an undefined attribute or a type error inside the template usually means the
            # messages lack something the template expects: the client can fix it.
            raise bad_request(f"the chat template could not render the messages: {e}", "messages") from None
        except (TypeError, ValueError, KeyError, IndexError, AttributeError) as e:
            raise bad_request(f"the chat template could not render the messages: {type(e).__name__}: {e}",
                              "messages") from None


def read_template_file(path: str) -> str:
    p = Path(path)
    if not p.is_file():
        raise RawpagedError(f"chat template file not found: {path}")
    try:
        return p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise RawpagedError(f"chat template file {path} cannot be read: {e}") from None


def load_chat_template(tokenizer, override_file: str | None) -> ChatTemplate | None:
    """--chat-template FILE, else the model's own template (tokenizer_config.json), else None."""
    def token_text(tid):
        return tokenizer.convert_ids_to_tokens([tid])[0] if tid is not None else None

    bos, eos = token_text(tokenizer.bos_token_id), token_text(tokenizer.eos_token_id)
    if override_file is not None:
        return ChatTemplate(read_template_file(override_file), bos, eos, origin=override_file)
    if tokenizer.chat_template:
        return ChatTemplate(tokenizer.chat_template, bos, eos, origin=f"{tokenizer.source}/tokenizer_config.json")
    return None


def no_template_error(model: str) -> ApiError:
    return bad_request(f"model {model!r} has no chat template (none in its tokenizer_config.json); "
                       "start the server with --chat-template FILE, or use /v1/completions", "messages")
