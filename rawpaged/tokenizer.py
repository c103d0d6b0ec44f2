"""Tokenizers: a thin wrapper over Hugging Face `tokenizers`, and incremental detokenization.

`Tokenizer.from_dir(model_dir)` reads what a Hugging Face model directory says about tokenization:
  tokenizer.json          the tokenizer itself; without it, the tokenizer is built (as transformers'
                          slow->fast conversion does) from
    tokenizer.model         a SentencePiece BPE model (LLaMA/Mistral: byte fallback, "▁" for spaces), or
    vocab.json, merges.txt  a GPT-2 style byte-level BPE (GPT-2, OPT)
  tokenizer_config.json   bos/eos tokens, add_bos_token / add_eos_token, chat_template (optional)
  special_tokens_map.json bos/eos/unk/pad tokens; like transformers, they win over tokenizer_config.json
  generation_config.json  extra end-of-sequence ids, an int or a list (optional)
  config.json             bos/eos ids, used only when generation_config.json is absent (optional)
  chat_template.jinja     the chat template, when tokenizer_config.json does not hold one (optional)

`write_tokenizer_json(model_dir, out_file)` writes the tokenizer a directory loads as tokenizer.json
(the building is in tokenizer_build.py, the .model reader in sentencepiece_model.py).
`IncrementalDetokenizer` turns the tokens a sequence generates into text deltas for streaming.
"""
from __future__ import annotations

import numbers
from pathlib import Path
from typing import Iterable, Sequence

import tokenizers

from rawpaged.config import MODEL_DIR_FILES
from rawpaged.convert.paths import check_model_files
from rawpaged.errors import RawpagedError
from rawpaged.tokenizer_build import load_backend, read_json, token_content
from rawpaged.tokenizer_build import write_tokenizer_json  # noqa: F401  (re-exported)

# Token strings tried, in order, when no config file names the end-of-sequence token.
_EOS_GUESSES = ("</s>", "<|endoftext|>", "<|end_of_text|>", "<eos>")


def _as_id_list(value) -> list[int]:
    if isinstance(value, bool) or value is None:
        return []
    if isinstance(value, int):
        return [value]
    if isinstance(value, (list, tuple)):
        return [v for v in value if isinstance(v, int) and not isinstance(v, bool)]
    return []


def _pick_chat_template(value) -> str | None:
    """A template string, or the "default" one of a list of {"name", "template"} entries."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
        chosen = named.get("default", next(iter(named.values()), None))
        return chosen if isinstance(chosen, str) else None
    return None


class Tokenizer:
    """Encode/decode plus the special-token facts the engine needs.

    Attributes: bos_token_id (int | None), eos_token_id (int | None, the primary one),
    eos_token_ids (set of every id that ends a sequence), vocab_size (with added tokens),
    chat_template (str | None), all_special_ids (sorted list).
    """

    def __init__(self, backend: tokenizers.Tokenizer, *, tokenizer_config: dict | None = None,
                 generation_config: dict | None = None, model_config: dict | None = None,
                 chat_template: str | None = None, source: str = "tokenizer"):
        self.backend = backend
        self.source = source
        tcfg = tokenizer_config or {}
        self._prefix_ids, self._suffix_ids = self._post_processor_additions()
        self.bos_token_id = self._resolve_bos(tcfg, generation_config, model_config)
        eos = self._resolve_eos(tcfg, generation_config, model_config)
        self.eos_token_id = eos[0] if eos else None
        self.eos_token_ids = set(eos)
        self._apply_add_flags(tcfg)
        self.chat_template = _pick_chat_template(tcfg.get("chat_template")) or chat_template
        self.vocab_size = backend.get_vocab_size(with_added_tokens=True)
        special = {i for i, t in backend.get_added_tokens_decoder().items() if t.special}
        special |= self.eos_token_ids
        if self.bos_token_id is not None:
            special.add(self.bos_token_id)
        self.all_special_ids = sorted(special)

    # -- loading --------------------------------------------------------------------------------
    @classmethod
    def from_dir(cls, path: str | Path) -> "Tokenizer":
        path = Path(path)
        if not path.is_dir():
            raise RawpagedError(f"tokenizer directory not found: {path}")
        check_model_files(path, MODEL_DIR_FILES)     # NOTE: no symlink may lead out of the model
        backend, tokenizer_config = load_backend(path)
        template_file = path / "chat_template.jinja"
        template = template_file.read_text(encoding="utf-8") if template_file.is_file() else None
        if template is None:
            template = _pick_chat_template((read_json(path / "chat_template.json") or {})
                                           .get("chat_template"))
        generation_config = read_json(path / "generation_config.json")
        return cls(backend,
                   tokenizer_config=tokenizer_config,
                   generation_config=generation_config,
                   # NOTE: like transformers, config.json ids count only without a generation config.
                   model_config=None if generation_config is not None else read_json(path / "config.json"),
                   chat_template=template,
                   source=str(path))

    def _post_processor_additions(self) -> tuple[list[int], list[int]]:
        """The ids tokenizer.json's post-processor puts before and after a single sequence."""
        core = self.backend.encode("a", add_special_tokens=False).ids
        full = self.backend.encode("a", add_special_tokens=True).ids
        for k in range(len(full) - len(core) + 1):
            if full[k:k + len(core)] == core:
                return full[:k], full[k + len(core):]
        return [], []

    def _special_id(self, tcfg: dict, key: str) -> int | None:
        content = token_content(tcfg.get(key))
        if content is None:
            return None
        tid = self.backend.token_to_id(content)
        if tid is None:
            raise RawpagedError(f"{self.source}: tokenizer_config.json {key}={content!r} is not in the "
                                "vocabulary")
        return tid

    def _resolve_bos(self, tcfg, gen, model) -> int | None:
        bos = self._special_id(tcfg, "bos_token")
        for cfg in (gen, model):
            if bos is None and cfg:
                ids = _as_id_list(cfg.get("bos_token_id"))
                bos = ids[0] if ids else None
        if bos is None and self._prefix_ids:
            # NOTE: with no config at all, the token the post-processor prepends is the BOS
            # (OPT prepends "</s>", id 2, which is what its config.json calls bos_token_id).
            bos = self._prefix_ids[0]
        return bos

    def _resolve_eos(self, tcfg, gen, model) -> list[int]:
        eos: list[int] = []
        primary = self._special_id(tcfg, "eos_token")
        if primary is not None:
            eos.append(primary)
        for cfg in (gen, model):
            for tid in _as_id_list((cfg or {}).get("eos_token_id")):
                if tid not in eos:
                    eos.append(tid)
        if not eos:
            guess = next((t for t in map(self.backend.token_to_id, _EOS_GUESSES) if t is not None), None)
            eos = [guess] if guess is not None else []
        return eos

    def _apply_add_flags(self, tcfg: dict) -> None:
        """tokenizer_config.json's add_bos_token / add_eos_token override the post-processor."""
        bos, eos = self.bos_token_id, self.eos_token_id
        add_bos, add_eos = tcfg.get("add_bos_token"), tcfg.get("add_eos_token")
        if add_bos is True and bos is not None and self._prefix_ids[:1] != [bos]:
            self._prefix_ids = [bos] + self._prefix_ids
        if add_bos is False and self._prefix_ids[:1] == [bos]:
            self._prefix_ids = self._prefix_ids[1:]
        if add_eos is True and eos is not None and self._suffix_ids[-1:] != [eos]:
            self._suffix_ids = self._suffix_ids + [eos]
        if add_eos is False and self._suffix_ids[-1:] == [eos]:
            self._suffix_ids = self._suffix_ids[:-1]

    # -- encode / decode ------------------------------------------------------------------------
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Text -> ids; with add_special_tokens, the BOS (or whatever the post-processor adds) once.

        NOTE: text that already begins with the BOS token (a rendered chat template often does)
        does not get a second one.
        """
        # NOTE: encode_batch releases the GIL while it works (encode holds it: a 2 MB prompt froze the
        # server's event loop for 1.4 s from a worker thread); the ids are the same.
        ids = self.backend.encode_batch([text], add_special_tokens=False)[0].ids
        if not add_special_tokens:
            return ids
        prefix, suffix = self._prefix_ids, self._suffix_ids
        if prefix and ids[:len(prefix)] == prefix:
            prefix = []
        return prefix + ids + suffix

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def convert_ids_to_tokens(self, ids: Iterable[int]) -> list[str | None]:
        return [self.backend.id_to_token(i) for i in ids]

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def __repr__(self) -> str:
        return (f"Tokenizer({self.source!r}, vocab_size={self.vocab_size}, bos={self.bos_token_id}, "
                f"eos={sorted(self.eos_token_ids)})")


class IncrementalDetokenizer:
    """Streams the text of one sequence's generated tokens, a delta per step.

        detok = IncrementalDetokenizer(tokenizer, prompt_ids)
        for new_ids in ...:            # one id or a list of ids per step
            text += detok.step(new_ids)
        text += detok.flush()          # when the sequence finishes

    Algorithm (vLLM's prefix_offset / read_offset): keep a small window of ids. Tokens before
    `read` have had their text emitted already; they stay in the window only as left context,
    because a token's text depends on its neighbours (SentencePiece strips the leading space of
    the first token; byte-fallback and byte-level pieces only form characters in groups). Each step
    decodes the window with and without the unread tokens; the difference is the new text. When it
    ends in U+FFFD, a multi-byte character is still incomplete: emit nothing and keep the tokens
    unread until it completes. After an emission the window drops everything before the old `read`,
    so a step decodes a handful of tokens whatever the sequence length.

    The deltas continue the prompt: `decode(prompt) + "".join(deltas) + flush()` equals
    `decode(prompt + output)`, so with a SentencePiece tokenizer the first delta keeps the space
    before its first word, as it appears after the prompt. With a prompt that decodes to nothing
    (just BOS) the deltas join to `decode(output)`.
    """

    # NOTE: prompt tokens kept as left context, as in vLLM; enough for any leading-space or
    # multi-byte merge across the prompt/output boundary.
    CONTEXT_TOKENS = 5

    def __init__(self, tokenizer: Tokenizer, prompt_ids: Sequence[int], skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self._ids: list[int] = list(prompt_ids[-self.CONTEXT_TOKENS:])   # the window
        self._read = len(self._ids)          # window[:read] is context, window[read:] is unread
        self._context_text: str | None = None   # decode(window[:read]), cached

    def copy(self) -> "IncrementalDetokenizer":
        """An independent copy (a forked sequence continues from the same point)."""
        new = object.__new__(IncrementalDetokenizer)
        new.tokenizer = self.tokenizer
        new.skip_special_tokens = self.skip_special_tokens
        new._ids = list(self._ids)
        new._read = self._read
        new._context_text = self._context_text
        return new

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def _unread_text(self) -> str:
        """The text the unread tokens add after the context ('' when they add nothing yet)."""
        if self._context_text is None:
            self._context_text = self._decode(self._ids[:self._read])
        full = self._decode(self._ids)
        return full[len(self._context_text):] if len(full) > len(self._context_text) else ""

    def _advance(self) -> None:
        del self._ids[:self._read]       # the old context is no longer needed
        self._read = len(self._ids)      # what was unread is now context
        self._context_text = None

    def step(self, new_token_ids: int | Iterable[int]) -> str:
        """Append generated id(s); return the text they complete (possibly '')."""
        if isinstance(new_token_ids, numbers.Integral):    # NOTE: numpy ints from the sampler too
            self._ids.append(int(new_token_ids))
        else:
            self._ids.extend(new_token_ids)
        delta = self._unread_text()
        # NOTE: a trailing U+FFFD means the last character's bytes are not all here yet.
        if not delta or delta.endswith("\ufffd"):
            return ""
        self._advance()
        return delta

    def flush(self) -> str:
        """Text still held back (an incomplete character when the sequence stopped), as decoded."""
        delta = self._unread_text()
        self._advance()
        return delta
