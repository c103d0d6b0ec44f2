"""A `tokenizers` object for a model directory: its tokenizer.json, or one built from the files a
slow tokenizer ships instead, the way transformers' slow->fast conversion builds it:

  tokenizer.model          SentencePiece BPE (LlamaTokenizer: LLaMA, Mistral) -> LlamaConverter's pipeline
  vocab.json + merges.txt  GPT-2 style byte-level BPE (GPT2Tokenizer: GPT-2, OPT) -> GPT2Converter's pipeline

tokenizer_config.json and special_tokens_map.json name the special tokens and add_bos_token /
add_eos_token / add_prefix_space / legacy; when they say nothing, the tokenizer class's defaults apply.
`write_tokenizer_json` writes the result out as a tokenizer.json.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import tokenizers

from rawpaged.convert.llama2c import SPIECE_SPACE, sentencepiece_merges
from rawpaged.errors import RawpagedError
from rawpaged.sentencepiece_model import (SPM_BPE, SPM_BYTE, SPM_CHAR, SPM_CONTROL, SPM_UNIGRAM, SPM_UNKNOWN,
                                          SPM_USER_DEFINED, SPM_WORD, read_sentencepiece_model)


def one_line(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    return lines[0] if lines else type(err).__name__


def read_json(path: Path) -> dict | None:
    """Read an optional JSON file: None when absent, RawpagedError when unreadable."""
    if not path.is_file():
        return None
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise RawpagedError(f"{path}: not valid JSON: {one_line(err)}") from None
    if not isinstance(obj, dict):
        raise RawpagedError(f"{path}: expected a JSON object, found {type(obj).__name__}")
    return obj


def token_content(value) -> str | None:
    """tokenizer_config.json writes special tokens as a string or as {"content": ...}."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


# The special-token keys of tokenizer_config.json / special_tokens_map.json.
_SPECIAL_KEYS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
# NOTE: tokenizer classes whose conversion is reproduced here; None is a directory that names none.
_BYTE_BPE_CLASSES = {None, "GPT2Tokenizer", "GPT2TokenizerFast"}
_SPM_CLASSES = {None, "LlamaTokenizer", "LlamaTokenizerFast"}
# What GPT2Tokenizer / LlamaTokenizer assume when tokenizer_config.json says nothing.
_BYTE_BPE_DEFAULTS = {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
                      "add_bos_token": False, "add_prefix_space": False}
_SPM_DEFAULTS = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
                 "add_bos_token": True, "add_eos_token": False}


def read_tokenizer_config(path: Path) -> dict:
    """tokenizer_config.json with special_tokens_map.json's tokens over it (transformers lets the map win)."""
    tcfg = dict(read_json(path / "tokenizer_config.json") or {})
    special_map = read_json(path / "special_tokens_map.json") or {}
    tcfg.update({k: v for k, v in special_map.items() if k in _SPECIAL_KEYS or k == "additional_special_tokens"})
    return tcfg


def load_backend(path: Path) -> tuple[tokenizers.Tokenizer, dict]:
    """(the `tokenizers` object, the tokenizer config with the tokenizer class's defaults filled in)."""
    tcfg = read_tokenizer_config(path)
    tok_file = path / "tokenizer.json"
    if tok_file.is_file():
        try:
            return tokenizers.Tokenizer.from_file(str(tok_file)), tcfg
        except Exception as err:   # NOTE: `tokenizers` raises a bare Exception on a bad file
            raise RawpagedError(f"{tok_file}: cannot load: {one_line(err)}") from None
    tok_json, tcfg = build_tokenizer_json(path, tcfg)
    try:
        backend = tokenizers.Tokenizer.from_str(json.dumps(tok_json))
    except Exception as err:
        raise RawpagedError(f"{path}: the tokenizer built from its files does not load: {one_line(err)}") from None
    for tok in tok_json["added_tokens"]:
        # NOTE: `tokenizers` numbers added tokens itself (vocab first, then in order); ids that a config
        # pins elsewhere cannot be honoured, say so instead of shifting them silently.
        if backend.token_to_id(tok["content"]) != tok["id"]:
            raise RawpagedError(f"{path}: added token {tok['content']!r} should have id {tok['id']}, which "
                                f"does not follow the {len(tok_json['model']['vocab'])}-piece vocabulary")
    return backend, tcfg


def build_tokenizer_json(path: Path, tcfg: dict) -> tuple[dict, dict]:
    """A tokenizer.json (as a dict) for a directory without one, and the config with class defaults.

    tokenizer.model (SentencePiece BPE, LlamaTokenizer) or vocab.json + merges.txt (GPT2Tokenizer);
    tokenizer_config.json's tokenizer_class picks when both are present.
    """
    cls = tcfg.get("tokenizer_class")
    has_spm = (path / "tokenizer.model").is_file()
    has_bpe = (path / "vocab.json").is_file() and (path / "merges.txt").is_file()
    if has_spm and (cls in _SPM_CLASSES - {None} or not has_bpe):
        _check_class(path, cls, _SPM_CLASSES, "tokenizer.model")
        return sentencepiece_tokenizer_json(path / "tokenizer.model", tcfg, path)
    if has_bpe:
        _check_class(path, cls, _BYTE_BPE_CLASSES, "vocab.json + merges.txt")
        return byte_level_bpe_tokenizer_json(path / "vocab.json", path / "merges.txt", tcfg, path)
    raise RawpagedError(f"{path / 'tokenizer.json'}: missing, and no tokenizer.model or vocab.json + "
                        "merges.txt to build it from")


def _with_defaults(tcfg: dict, defaults: dict, vocab: dict[str, int]) -> dict:
    """The config with the tokenizer class's defaults where it is silent (default tokens only if they exist)."""
    out = dict(tcfg)
    for key, value in defaults.items():
        if key not in out and (key not in _SPECIAL_KEYS or value in vocab):
            out[key] = value
    return out


def _check_class(path: Path, cls, supported: set, files: str) -> None:
    if cls not in supported:
        raise RawpagedError(f"{path}: tokenizer_class {cls!r} has no tokenizer.json and rawpaged builds one from "
                            f"{files} only for {', '.join(sorted(c for c in supported if c))}: save the "
                            "tokenizer with transformers (save_pretrained) to get a tokenizer.json")


def write_tokenizer_json(model_dir: str | Path, out_file: str | Path) -> Path:
    """Write the tokenizer `Tokenizer.from_dir(model_dir)` uses as a tokenizer.json file.

    The file is written next to its final name and renamed into place: never half-written.
    """
    backend, _ = load_backend(Path(model_dir))
    out_file = Path(out_file)
    tmp = out_file.with_name(f".{out_file.name}.tmp-{os.getpid()}")
    try:
        backend.save(str(tmp))
        os.replace(tmp, out_file)
    except Exception as err:
        tmp.unlink(missing_ok=True)
        raise RawpagedError(f"cannot write {out_file}: {one_line(err)}") from None
    return out_file


# -- pieces of tokenizer.json ---------------------------------------------------------------------

def _added_token(tid: int, content: str, special: bool, entry: dict | None = None) -> dict:
    entry = entry if isinstance(entry, dict) else {}
    return {"id": tid, "content": content, "single_word": bool(entry.get("single_word", False)),
            "lstrip": bool(entry.get("lstrip", False)), "rstrip": bool(entry.get("rstrip", False)),
            "normalized": bool(entry.get("normalized", False)), "special": special}


def _named_special_tokens(tcfg: dict) -> list[str]:
    """The contents of the special tokens a tokenizer config names (bos, eos, unk, pad, additional...)."""
    names = [token_content(tcfg.get(k)) for k in _SPECIAL_KEYS]
    names += [token_content(t) for t in tcfg.get("additional_special_tokens") or []]
    return list(dict.fromkeys(n for n in names if n))


def _added_tokens(vocab: dict[str, int], tcfg: dict, path: Path,
                  extra: list[tuple[int, str, bool]] = ()) -> list[dict]:
    """tokenizer.json's added_tokens: the config's special tokens, added_tokens_decoder, added_tokens.json.

    A token already in the vocabulary keeps its id; others take the id their config gives.
    """
    out: dict[str, dict] = {}
    for tid, content, special in extra:
        out[content] = _added_token(tid, content, special)
    decoder = tcfg.get("added_tokens_decoder") or {}
    for tid, entry in (decoder.items() if isinstance(decoder, dict) else []):
        content = token_content(entry)
        if content is not None and str(tid).isdigit():
            out[content] = _added_token(vocab.get(content, int(tid)), content, bool(entry.get("special")), entry)
    for content, tid in (read_json(path / "added_tokens.json") or {}).items():
        if isinstance(tid, int) and content not in out:
            out[content] = _added_token(vocab.get(content, tid), content, False)
    for content in _named_special_tokens(tcfg):
        if content in out:
            out[content]["special"] = True
        elif content in vocab:
            out[content] = _added_token(vocab[content], content, True)
        else:
            raise RawpagedError(f"{path}: special token {content!r} named by the tokenizer config is not in the "
                                "vocabulary and has no id")
    return sorted(out.values(), key=lambda t: t["id"])


def _template(single: list[str], pair: list[str], ids: dict[str, int]) -> dict | None:
    """A TemplateProcessing post-processor: special tokens by content, "A"/"B" for the sequences."""
    def piece(p):
        return {"Sequence": {"id": p, "type_id": 0}} if p in ("A", "B") else {"SpecialToken": {"id": p, "type_id": 0}}
    return {"type": "TemplateProcessing", "single": [piece(p) for p in single], "pair": [piece(p) for p in pair],
            "special_tokens": {t: {"id": t, "ids": [ids[t]], "tokens": [t]} for t in dict.fromkeys(single + pair)
                               if t not in ("A", "B")}}


def _bos_eos_template(tcfg: dict, vocab: dict[str, int]) -> dict | None:
    """<bos> A <eos> per add_bos_token / add_eos_token, as LlamaTokenizerFast and GPT2Converter set up."""
    bos, eos = token_content(tcfg.get("bos_token")), token_content(tcfg.get("eos_token"))
    head = [bos] if tcfg.get("add_bos_token") and bos in vocab else []
    tail = [eos] if tcfg.get("add_eos_token") and eos in vocab else []
    if not head and not tail:
        return None
    return _template(head + ["A"] + tail, head + ["A"] + tail + head + ["B"] + tail, vocab)


def _bpe_model(vocab: dict[str, int], merges: list[list[str]], *, unk: str | None, byte_fallback: bool) -> dict:
    return {"type": "BPE", "dropout": None, "unk_token": unk, "continuing_subword_prefix": None,
            "end_of_word_suffix": None, "fuse_unk": byte_fallback, "byte_fallback": byte_fallback,
            "ignore_merges": False, "vocab": vocab, "merges": merges}


def _tokenizer_json(model: dict, added: list[dict], normalizer, pre_tokenizer, post_processor, decoder) -> dict:
    return {"version": "1.0", "truncation": None, "padding": None, "added_tokens": added,
            "normalizer": normalizer, "pre_tokenizer": pre_tokenizer, "post_processor": post_processor,
            "decoder": decoder, "model": model}


# -- GPT-2 style byte-level BPE: vocab.json + merges.txt ------------------------------------------

def read_merges(path: Path) -> list[list[str]]:
    """merges.txt: an optional "#version" line, then one "left right" pair per line, best first."""
    try:
        lines = path.read_text(encoding="utf-8").split("\n")
    except (OSError, UnicodeDecodeError) as err:
        raise RawpagedError(f"{path}: cannot read: {one_line(err)}") from None
    if lines and lines[0].startswith("#version"):
        lines = lines[1:]
    merges = []
    for n, line in enumerate(lines, 1):
        if not line:
            continue
        pair = line.split(" ")
        if len(pair) != 2 or not all(pair):
            raise RawpagedError(f"{path}: line {n} is not a merge of two tokens: {line[:40]!r}")
        merges.append(pair)
    return merges


def byte_level_bpe_tokenizer_json(vocab_file: Path, merges_file: Path, tcfg: dict,
                                  path: Path) -> tuple[dict, dict]:
    """What transformers' GPT2Converter builds: byte-level pre-tokenizer and decoder, BPE without unk,
    the bos token prepended when add_bos_token (OPT) and the ByteLevel post-processor otherwise.

    Returns (tokenizer.json dict, tcfg with GPT2Tokenizer's defaults).
    """
    vocab = read_json(vocab_file)
    if vocab is None or not all(isinstance(i, int) and not isinstance(i, bool) for i in vocab.values()):
        raise RawpagedError(f"{vocab_file}: expected a JSON object of token -> integer id")
    tcfg = _with_defaults(tcfg, _BYTE_BPE_DEFAULTS, vocab)
    merges = read_merges(merges_file)
    unknown = next((m for m in merges if m[0] + m[1] not in vocab), None)
    if unknown is not None:
        raise RawpagedError(f"{merges_file}: merge {' '.join(unknown)!r} makes a token missing from "
                            f"{vocab_file.name} (vocab.json and merges.txt of different tokenizers?)")
    prefix_space = bool(tcfg.get("add_prefix_space"))
    byte_level = {"type": "ByteLevel", "add_prefix_space": prefix_space, "trim_offsets": True, "use_regex": True}
    post = _bos_eos_template(tcfg, vocab) or {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": False,
                                              "use_regex": True}
    decoder = {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True}
    return _tokenizer_json(_bpe_model(vocab, merges, unk=None, byte_fallback=False),
                           _added_tokens(vocab, tcfg, path), None, byte_level, post, decoder), tcfg


# -- SentencePiece tokenizer.model (LlamaTokenizer) ----------------------------------------------

def sentencepiece_tokenizer_json(model_file: Path, tcfg: dict, path: Path) -> tuple[dict, dict]:
    """What transformers' LlamaConverter builds from a SentencePiece BPE model (LLaMA, Mistral).

    BPE over the pieces with merges recovered from their scores, byte fallback to <0xXX> pieces;
    spaces become "▁" and one is prepended (legacy: a normalizer, so after every special token too;
    legacy=False: a Metaspace pre-tokenizer, at the start only); control and user-defined pieces
    are added tokens; the decoder undoes all of it; <s> (and </s>) per add_bos_token / add_eos_token.

    Returns (tokenizer.json dict, tcfg with LlamaTokenizer's defaults).
    """
    spm = read_sentencepiece_model(model_file)
    if spm.model_type != SPM_BPE:
        kind = {SPM_UNIGRAM: "unigram", SPM_WORD: "word", SPM_CHAR: "char"}.get(spm.model_type, str(spm.model_type))
        raise RawpagedError(f"{model_file}: a SentencePiece {kind} model; rawpaged builds a tokenizer only from "
                            "BPE models (LLaMA/Mistral style): save it with transformers to get a tokenizer.json")
    vocab = {p: i for i, p in enumerate(spm.pieces)}
    tcfg = _with_defaults(tcfg, _SPM_DEFAULTS, vocab)
    unk = next((p for p, t in zip(spm.pieces, spm.types) if t == SPM_UNKNOWN), spm.unk_piece)
    byte_fallback = spm.byte_fallback or SPM_BYTE in spm.types
    # NOTE: LlamaConverter marks control pieces special and user-defined ones special only when named.
    named = set(_named_special_tokens(tcfg))
    extra = [(i, p, t == SPM_CONTROL or p in named) for i, (p, t) in enumerate(zip(spm.pieces, spm.types))
             if t in (SPM_CONTROL, SPM_USER_DEFINED)]
    prefix = tcfg.get("add_prefix_space")
    prefix = spm.add_dummy_prefix if prefix is None else bool(prefix)
    if tcfg.get("legacy") is False:
        normalizer = None
        pre = {"type": "Metaspace", "replacement": SPIECE_SPACE, "prepend_scheme": "first" if prefix else "never",
               "split": False}
    else:
        replace = [{"type": "Replace", "pattern": {"String": " "}, "content": SPIECE_SPACE}]
        normalizer = {"type": "Sequence",
                      "normalizers": ([{"type": "Prepend", "prepend": SPIECE_SPACE}] if prefix else []) + replace}
        pre = None
    decoder = {"type": "Sequence", "decoders": [
        {"type": "Replace", "pattern": {"String": SPIECE_SPACE}, "content": " "},
        {"type": "ByteFallback"},
        {"type": "Fuse"},
    ] + ([{"type": "Strip", "content": " ", "start": 1, "stop": 0}] if prefix else [])}
    model = _bpe_model(vocab, sentencepiece_merges(spm.pieces, spm.scores), unk=unk if unk in vocab else None,
                       byte_fallback=byte_fallback)
    return _tokenizer_json(model, _added_tokens(vocab, tcfg, path, extra), normalizer, pre,
                           _bos_eos_template(tcfg, vocab), decoder), tcfg
