"""Structured outputs: the grammar engine behind SamplingParams.structured_outputs.

    compile_grammar(so) -> str                  SamplingParams' validator: llguidance's grammar text
    grammars = Grammars(tokenizer, vocab_size, eos_ids)        one per engine
    grammars.prepare(so)                        build (and cache) the request's matcher; GrammarError
    state = grammars.new_state(so)              per sequence: a GrammarState (Sequence.constraint)
    state.copy() / state.accept(token_id) / state.finished
    bits = grammars.fill_bitmask(states)        host int32 [len(states), ceil(V/32)]: one call for
                                                the batch; bit t % 32 of word t // 32 = token t allowed
    future = grammars.fill_bitmask_async(states)   the same on the grammar thread, while the model runs

The sampler unpacks the bits and sets every forbidden token's logit to -inf (sampler.TokenMask).

Which engine, and why llguidance (all three are on PyPI; what each needs at run time, checked with
`pip install --dry-run` in this environment):
  - llguidance (Microsoft, Rust): no Python dependencies at all; builds its tokenizer view from a
    Hugging Face tokenizer.json string (what rawpaged's `tokenizers` backend holds) or from a plain
    list of token bytes; JSON schema, regex, a choice, and context-free grammars (Lark, and GBNF
    converted to Lark); no per-grammar precomputation over the vocabulary (an Earley parser with a
    lazy derivative-based lexer walks a token trie per step: ~50 us per mask), so a new schema costs
    a few ms, not seconds; resource limits for hostile grammars (parser items, lexer states, grammar
    size); a batch mask fill in Rust (threads, GIL released) into a packed bitmask; used by vLLM
    and SGLang.
  - outlines-core (Rust): no Python dependencies either, but it compiles a regex (a JSON schema is
    turned into one first) into an index over the whole vocabulary up front: seconds for large
    schemas or vocabularies, and no context-free grammars (recursive schemas, Lark/GBNF) at all.
  - xgrammar (MLC): needs torch, transformers and triton at run time (its tokenizer adapter reads a
    transformers tokenizer; its mask kernels are torch's), which rawpaged never installs.

Decisions:
  - JSON is compact by default (no whitespace between tokens): a small model given any whitespace
    pads with it forever; `whitespace_pattern` allows some.
  - `strict` (OpenAI's strict mode): objects that do not say `additionalProperties` get none.
  - EOS is allowed only where the grammar accepts (llguidance sets the EOS bits then, and only then);
    a sequence whose grammar cannot go on (`finished`) stops at once, without spending a step on EOS.
  - A matcher in an error state (which the mask should make impossible) allows only EOS.
  - Preemption needs no rollback: rawpaged never drops an accepted token (recompute keeps the output
    tokens and recomputes their KV; swap moves the KV), so the matcher already holds the state of
    the tokens the sequence has.
"""
from __future__ import annotations

import json
import re
import threading
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from rawpaged.errors import RawpagedError

_MAX_MESSAGE = 300          # characters of a grammar engine error kept in our one-line message
_CACHED_MATCHERS = 64       # fresh matchers kept per engine, keyed by grammar text


class GrammarError(RawpagedError):
    """A schema, regex or grammar the engine refuses (one line)."""


def _llg():
    import llguidance          # NOTE: loaded on first use: unconstrained runs never import it
    return llguidance


def _one_line(message: str) -> str:
    """The grammar engine's (multi-line, caret-drawing) error as one short line."""
    lines = [ln.strip() for ln in str(message).splitlines()]
    keep = [ln for ln in lines if ln and not set(ln) <= set("^ ") and not re.match(r"^\d+ \|", ln)
            and not ln.startswith("<")]
    text = " ".join(" ".join(keep).split())
    return text if len(text) <= _MAX_MESSAGE else text[:_MAX_MESSAGE - 3] + "..."


# -- compiling: SamplingParams' validator calls this ------------------------------------------
_SCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")
_SCHEMA_LISTS = ("anyOf", "allOf", "oneOf", "prefixItems")
_SCHEMA_ONE = ("items", "additionalItems", "contains", "not", "if", "then", "else", "propertyNames",
               "unevaluatedProperties", "unevaluatedItems")


def no_extra_properties(schema):
    """OpenAI's strict mode: a copy of the schema where every object schema that says nothing about
    additionalProperties gets `false` (walking the keywords that hold subschemas)."""
    if not isinstance(schema, dict):
        return schema
    out = dict(schema)
    for k in _SCHEMA_MAPS:
        if isinstance(out.get(k), dict):
            out[k] = {name: no_extra_properties(sub) for name, sub in out[k].items()}
    for k in _SCHEMA_LISTS:
        if isinstance(out.get(k), list):
            out[k] = [no_extra_properties(sub) for sub in out[k]]
    for k in _SCHEMA_ONE + ("additionalProperties",):
        if isinstance(out.get(k), dict):
            out[k] = no_extra_properties(out[k])
    if (out.get("type") == "object" or "properties" in out) and "additionalProperties" not in out:
        out["additionalProperties"] = False
    return out


def _json_schema(so) -> dict | bool:
    schema = so.json
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except ValueError as e:
            raise GrammarError(f"is not valid JSON: {e}") from None
    if not isinstance(schema, (dict, bool)):
        raise GrammarError(f"must be a JSON schema (an object), got {type(schema).__name__}")
    return no_extra_properties(schema) if so.strict else schema


def _json_options(so) -> dict:
    if so.whitespace_pattern is None:
        return {"whitespace_flexible": False}
    return {"whitespace_flexible": False, "whitespace_pattern": so.whitespace_pattern}


def compile_grammar(so) -> str:
    """StructuredOutputsParams -> llguidance's grammar text, checked (GrammarError: why, one line)."""
    llg = _llg()
    M = llg.LLMatcher
    kind = so.kind
    try:
        if kind == "json":
            text = M.grammar_from_json_schema(_json_schema(so), defaults=_json_options(so))
        elif kind == "json_object":
            text = M.grammar_from_json_schema({"type": "object"}, defaults=_json_options(so))
        elif kind == "regex":
            text = M.grammar_from_regex(so.regex)
        elif kind == "choice":
            text = M.grammar_from_lark("start: " + " | ".join(json.dumps(c) for c in so.choice))
        else:
            text = llg.grammar_from("grammar", so.grammar)     # Lark, or GBNF converted to Lark
    except (ValueError, TypeError) as e:
        raise GrammarError(f"is not valid: {_one_line(e)}") from None
    error = M.validate_grammar(text)
    if error:
        raise GrammarError(f"is not valid: {_one_line(error)}")
    return text


# -- per sequence ------------------------------------------------------------------------------
class GrammarState:
    """One sequence's place in its grammar (an llguidance matcher over the tokens it accepted)."""

    __slots__ = ("matcher",)

    def __init__(self, matcher):
        self.matcher = matcher

    def copy(self) -> "GrammarState":
        """An independent copy: a parallel sample or a beam continues from here on its own."""
        return GrammarState(self.matcher.deep_copy())

    def accept(self, token_id: int) -> bool:
        """Advance over a sampled token; False if the grammar refused it (the matcher then allows
        only EOS)."""
        return self.matcher.consume_token(int(token_id))

    @property
    def finished(self) -> bool:
        """The grammar can take no more tokens (EOS aside): the sequence is complete."""
        return self.matcher.is_stopped()

    @property
    def error(self) -> str | None:
        return _one_line(self.matcher.get_error()) if self.matcher.is_error() else None


# -- per engine --------------------------------------------------------------------------------
class Grammars:
    """The engine's grammar side: llguidance's view of the tokenizer (built on first use: ~0.5 s for
    a 32000-token vocabulary), a cache of fresh matchers by grammar text, and the batch mask fill.
    Thread-safe where the server needs it (prepare() runs on its worker threads)."""

    def __init__(self, tokenizer, vocab_size: int, eos_ids: set[int]):
        self.tokenizer = tokenizer
        # NOTE: the mask covers the model's logits; a model may have more rows than its tokenizer
        # has tokens (padding), or, rarely, fewer: the sampler cuts the mask to the logits' width.
        self.vocab_size = max(vocab_size, tokenizer.vocab_size)
        self.words = (self.vocab_size + 31) // 32
        self.eos_ids = sorted(eos_ids)
        self._lock = threading.Lock()
        self._ll_tokenizer = None
        self._executor = None
        self._fresh: OrderedDict[str, object] = OrderedDict()
        self._pool: ThreadPoolExecutor | None = None      # the prefetch thread, started on first use
        self._eos_row = np.zeros(self.words, dtype=np.uint32)
        for t in self.eos_ids:
            self._eos_row[t // 32] |= np.uint32(1) << np.uint32(t % 32)
        self._eos_row = self._eos_row.view(np.int32)

    def _tokenizer(self):
        if self._ll_tokenizer is None:
            with self._lock:                   # NOTE: built once, whichever thread comes first
                if self._ll_tokenizer is None:
                    llg = _llg()
                    self._executor = llg.LLExecutor()
                    self._ll_tokenizer = llg.LLTokenizer(self.tokenizer.backend.to_str(),
                                                         n_vocab=self.vocab_size, eos_token=self.eos_ids or None)
        return self._ll_tokenizer

    def prepare(self, so) -> None:
        """Build the request's matcher now (GrammarError if this tokenizer cannot run it); cached."""
        self._fresh_matcher(so)

    def _fresh_matcher(self, so):
        text = so.compiled
        with self._lock:
            matcher = self._fresh.get(text)
            if matcher is not None:
                self._fresh.move_to_end(text)
                return matcher
        # NOTE: built outside the lock (llguidance lets the GIL go meanwhile): a worker thread
        # compiling a big grammar never holds up the engine thread's cache hits.
        matcher = _llg().LLMatcher(self._tokenizer(), text, log_level=0)
        if matcher.is_error():
            raise GrammarError(f"structured_outputs.{so.kind} is not valid: {_one_line(matcher.get_error())}")
        with self._lock:
            self._fresh[text] = matcher
            if len(self._fresh) > _CACHED_MATCHERS:
                self._fresh.popitem(last=False)
        return matcher

    def new_state(self, so) -> GrammarState:
        """A sequence's grammar state at the start of its output."""
        return GrammarState(self._fresh_matcher(so).deep_copy())

    def fill_bitmask_async(self, states: list[GrammarState]):
        """fill_bitmask on the grammar engine's own thread -> a Future. The caller must not touch
        the states until it is done (the engine runs the model meanwhile)."""
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rawpaged-grammar")
        return self._pool.submit(self.fill_bitmask, states)

    def fill_bitmask(self, states: list[GrammarState]) -> np.ndarray:
        """The allowed tokens of each state -> host int32 [len(states), words], in one call (Rust
        threads, GIL released). A row with nothing allowed (a matcher in error) allows EOS."""
        bits = np.zeros((len(states), self.words), dtype=np.int32)
        self._tokenizer()
        self._executor.unsafe_compute_mask_ptr([(s.matcher, i) for i, s in enumerate(states)],
                                               bits.ctypes.data, self.words * 4, len(states))
        empty = ~bits.any(axis=1)                                      # [S]
        if empty.any():
            bits[empty] = self._eos_row
        return bits
