"""Tokenizer wrapper and incremental detokenization.

References nobody here wrote: llama.cpp's 46 SentencePiece golden tokenizations (llama-spm.*),
the shared LLaMA tokenizer.json (built from tokenizer.model by transformers' converter), and OPT's
documented encoding of "Today is a beautiful day and I want".
"""
from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest

from rawpaged.convert.llama2c import llama2c_tokenizer_json, tokenizer_config
from rawpaged.errors import RawpagedError
from rawpaged.tokenizer import IncrementalDetokenizer, Tokenizer

GOLDEN_SEPARATOR = "\n__ggml_vocab_test__\n"

# Multi-byte text: accents (2 bytes), CJK (3 bytes), emoji (4 bytes, and modifier sequences).
# Characters missing from the LLaMA vocabulary fall back to byte pieces, GPT-2 splits them anywhere.
MULTIBYTE_TEXTS = [
    "Héllo wörld 🦙 你好世界 naïve café 😀👍🏽",
    "Ünïcödé — “quotes” 日本語のテキスト 🎉",
    "🦙🦙🦙 emoji at the start, at the end: 🐍",
    "Ελληνικά, русский, עברית, हिन्दी, 한국어 ✓ ∑ ∞ 龘 🌍",
]


# -- fixtures --------------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def llama_json_dir(data_dir: Path) -> Path:
    return data_dir / "tokenizers" / "llama-32k"


@pytest.fixture(scope="session")
def llama_bin_dir(data_dir: Path, tmp_path_factory) -> Path:
    """A tokenizer directory built by our converter from llama2.c's tokenizer.bin."""
    out = tmp_path_factory.mktemp("llama32k_from_bin")
    tok = llama2c_tokenizer_json(data_dir / "tokenizers" / "llama-32k" / "tokenizer.bin")
    (out / "tokenizer.json").write_text(json.dumps(tok, ensure_ascii=False), encoding="utf-8")
    (out / "tokenizer_config.json").write_text(json.dumps(tokenizer_config(4096)), encoding="utf-8")
    return out


@pytest.fixture(scope="session")
def llama_tok(llama_json_dir) -> Tokenizer:
    return Tokenizer.from_dir(llama_json_dir)


@pytest.fixture(scope="session")
def opt_tok(data_dir: Path) -> Tokenizer:
    return Tokenizer.from_dir(data_dir / "tokenizers" / "opt-gpt2")


@pytest.fixture(scope="session")
def golden(data_dir: Path) -> list[tuple[str, list[int]]]:
    inp = (data_dir / "tokenizers" / "golden" / "llama-spm.inp").read_text(encoding="utf-8")
    out = (data_dir / "tokenizers" / "golden" / "llama-spm.out").read_text(encoding="utf-8")
    # NOTE: every input, the last one included, is followed by the separator; every id line by "\n".
    assert inp.endswith(GOLDEN_SEPARATOR) and out.endswith("\n")
    texts = inp[:-len(GOLDEN_SEPARATOR)].split(GOLDEN_SEPARATOR)
    ids = [[int(x) for x in line.split()] for line in out[:-1].split("\n")]
    assert len(texts) == len(ids) == 46
    return list(zip(texts, ids))


def _write_tokenizer_dir(dst: Path, src: Path, tokenizer_json=None, **configs) -> Path:
    """A tokenizer directory with src's tokenizer.json (optionally edited) and the given configs."""
    dst.mkdir(parents=True, exist_ok=True)
    if tokenizer_json is None:
        shutil.copyfile(src / "tokenizer.json", dst / "tokenizer.json")
    else:
        (dst / "tokenizer.json").write_text(json.dumps(tokenizer_json), encoding="utf-8")
    for name, obj in configs.items():
        (dst / f"{name}.json").write_text(json.dumps(obj), encoding="utf-8")
    return dst


# -- golden tokenizations --------------------------------------------------------------------------

@pytest.mark.parametrize("which", ["shared_json", "from_tokenizer_bin"])
def test_llama_golden_46(which, golden, llama_json_dir, llama_bin_dir):
    tok = Tokenizer.from_dir(llama_json_dir if which == "shared_json" else llama_bin_dir)
    failures = []
    for text, expected in golden:
        got = tok.encode(text, add_special_tokens=False)
        if got != expected:
            failures.append((text, got, expected))
        assert tok.encode(text) == [1] + expected          # BOS exactly once
    assert not failures, failures[:3]


def test_tokenizer_bin_conversion_equals_shared_tokenizer_json(llama_json_dir, llama_bin_dir):
    """Same vocabulary, same merges (order matters for BPE), same pipeline as transformers' converter."""
    ours = json.loads((llama_bin_dir / "tokenizer.json").read_text(encoding="utf-8"))
    ref = json.loads((llama_json_dir / "tokenizer.json").read_text(encoding="utf-8"))
    for key in ("normalizer", "pre_tokenizer", "post_processor", "decoder", "added_tokens"):
        assert ours[key] == ref[key], key
    assert ours["model"]["vocab"] == ref["model"]["vocab"]
    assert ours["model"]["merges"] == ref["model"]["merges"]


def test_llama_special_tokens(llama_tok, llama_bin_dir):
    for tok in (llama_tok, Tokenizer.from_dir(llama_bin_dir)):
        assert tok.bos_token_id == 1 and tok.eos_token_id == 2 and tok.eos_token_ids == {2}
        assert tok.vocab_size == 32000
        assert tok.all_special_ids == [0, 1, 2]
        assert tok.convert_ids_to_tokens([1, 2, 3, 15043]) == ["<s>", "</s>", "<0x00>", "▁Hello"]
    # The shared dir has no tokenizer_config.json: the chat template is simply absent.
    assert llama_tok.chat_template is None


def test_llama_decode(llama_tok):
    ids = llama_tok.encode("Hello world")
    assert ids == [1, 15043, 3186]
    assert llama_tok.decode(ids) == "Hello world"
    assert llama_tok.decode(ids, skip_special_tokens=False) == "<s> Hello world"


# -- OPT (GPT-2 byte-level BPE whose post-processor prepends </s>) ---------------------------------

def test_opt_encode(opt_tok):
    ids = opt_tok.encode("Today is a beautiful day and I want")
    assert ids == [2, 5625, 16, 10, 2721, 183, 8, 38, 236]
    assert opt_tok.encode("Today is a beautiful day and I want", add_special_tokens=False) == ids[1:]
    assert opt_tok.bos_token_id == 2 and opt_tok.eos_token_id == 2
    assert opt_tok.decode(ids) == "Today is a beautiful day and I want"
    assert opt_tok.vocab_size == 51200


# -- special-token configuration -------------------------------------------------------------------

def test_bos_not_doubled_when_text_starts_with_bos(llama_tok, opt_tok):
    assert llama_tok.encode("<s>Hello") == llama_tok.encode("Hello") == [1, 15043]
    assert opt_tok.encode("</s>Today") == [2, 5625]


def test_add_bos_token_flag_overrides_post_processor(tmp_path, llama_json_dir):
    off = Tokenizer.from_dir(_write_tokenizer_dir(
        tmp_path / "off", llama_json_dir, tokenizer_config={"bos_token": "<s>", "add_bos_token": False}))
    assert off.encode("Hello world") == [15043, 3186]
    # A tokenizer.json without a post-processor: add_bos_token adds the BOS, exactly once.
    tj = json.loads((llama_json_dir / "tokenizer.json").read_text(encoding="utf-8"))
    tj["post_processor"] = None
    on = Tokenizer.from_dir(_write_tokenizer_dir(
        tmp_path / "on", llama_json_dir, tokenizer_json=tj,
        tokenizer_config={"bos_token": {"content": "<s>"}, "eos_token": "</s>", "add_bos_token": True,
                          "add_eos_token": True, "chat_template": "{{ messages }}"}))
    assert on.encode("Hello world") == [1, 15043, 3186, 2]
    assert on.encode("Hello world", add_special_tokens=False) == [15043, 3186]
    assert on.chat_template == "{{ messages }}"


def test_generation_config_eos_ids(tmp_path, llama_json_dir):
    as_list = Tokenizer.from_dir(_write_tokenizer_dir(
        tmp_path / "list", llama_json_dir, tokenizer_config={"eos_token": "</s>"},
        generation_config={"eos_token_id": [7, 2, 13]}))
    assert as_list.eos_token_id == 2 and as_list.eos_token_ids == {2, 7, 13}
    assert {2, 7, 13} <= set(as_list.all_special_ids)
    as_int = Tokenizer.from_dir(_write_tokenizer_dir(
        tmp_path / "int", llama_json_dir, generation_config={"bos_token_id": 1, "eos_token_id": 13}))
    assert as_int.eos_token_id == 13 and as_int.eos_token_ids == {13}


def test_missing_or_corrupt_files_are_one_line_errors(tmp_path, llama_json_dir):
    with pytest.raises(RawpagedError, match="tokenizer.json: missing"):
        Tokenizer.from_dir(tmp_path)
    with pytest.raises(RawpagedError, match="not found"):
        Tokenizer.from_dir(tmp_path / "nowhere")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "tokenizer.json").write_text('{"version": "1.0", "model": {"type": "BPE", "vo', encoding="utf-8")
    with pytest.raises(RawpagedError, match="cannot load") as err:
        Tokenizer.from_dir(bad)
    assert "\n" not in str(err.value)
    cfg = _write_tokenizer_dir(tmp_path / "badcfg", llama_json_dir)
    (cfg / "tokenizer_config.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(RawpagedError, match="tokenizer_config.json: not valid JSON") as err:
        Tokenizer.from_dir(cfg)
    assert "\n" not in str(err.value)
    unknown = _write_tokenizer_dir(tmp_path / "unknown", llama_json_dir,
                                   tokenizer_config={"eos_token": "<|nope|>"})
    with pytest.raises(RawpagedError, match="not in the vocabulary"):
        Tokenizer.from_dir(unknown)


# -- incremental detokenization --------------------------------------------------------------------

def _stream(detok: IncrementalDetokenizer, ids: list[int], chunks: list[int] | None = None) -> list[str]:
    """Feed ids one at a time (or in the given chunk sizes); return the deltas."""
    chunks = chunks or [1] * len(ids)
    deltas, pos = [], 0
    for n in chunks:
        deltas.append(detok.step(ids[pos:pos + n] if n > 1 else ids[pos]))
        pos += n
    assert pos == len(ids)
    return deltas


@pytest.mark.parametrize("which", ["llama", "opt"])
@pytest.mark.parametrize("text", MULTIBYTE_TEXTS)
def test_incremental_multibyte_no_replacement_char(which, text, llama_tok, opt_tok):
    tok = llama_tok if which == "llama" else opt_tok
    out = tok.encode(text, add_special_tokens=False)
    # The test is only meaningful if some token alone is an incomplete character.
    assert any("\ufffd" in tok.decode([i]) for i in out)
    prompt = tok.encode("")    # just BOS (llama) / </s> (OPT): decodes to nothing
    deltas = _stream(IncrementalDetokenizer(tok, prompt), out)
    assert all("\ufffd" not in d for d in deltas), deltas
    assert "".join(deltas) == tok.decode(out) == text


@pytest.mark.parametrize("which", ["llama", "opt"])
def test_incremental_after_a_prompt_continues_its_text(which, llama_tok, opt_tok):
    tok = llama_tok if which == "llama" else opt_tok
    prompt = tok.encode("Translate to Japanese: the cat 🐈 says")
    out = tok.encode(" 猫は「にゃー」と言います 🐈‍⬛ and the dog says 🐕", add_special_tokens=False)
    rng = random.Random(0)
    chunks = []
    while sum(chunks) < len(out):
        chunks.append(min(rng.randint(1, 3), len(out) - sum(chunks)))
    detok = IncrementalDetokenizer(tok, prompt)
    deltas = _stream(detok, out, chunks)
    assert all("\ufffd" not in d for d in deltas)
    assert tok.decode(prompt) + "".join(deltas) + detok.flush() == tok.decode(prompt + out)
    assert deltas[0].startswith(" ") or deltas[0] == ""    # the space after the prompt is kept


@pytest.mark.parametrize("source", ["shared_json", "from_tokenizer_bin"])
def test_incremental_golden_texts(source, golden, llama_tok, llama_bin_dir):
    tok = llama_tok if source == "shared_json" else Tokenizer.from_dir(llama_bin_dir)
    for text, ids in golden:
        detok = IncrementalDetokenizer(tok, [1])
        deltas = _stream(detok, ids) if ids else []
        assert all("\ufffd" not in d for d in deltas), text
        assert "".join(deltas) + detok.flush() == tok.decode(ids), text


def test_incremental_flush_returns_incomplete_tail(llama_tok):
    ids = llama_tok.encode("ok 🦙", add_special_tokens=False)    # ... <0xF0> <0x9F> <0xA6> <0x99>
    cut = ids[:-2]                                                   # stop mid-character
    detok = IncrementalDetokenizer(llama_tok, [1])
    deltas = _stream(detok, cut)
    assert "".join(deltas) == "ok "
    tail = detok.flush()
    assert "\ufffd" in tail and "".join(deltas) + tail == llama_tok.decode(cut)
    assert detok.flush() == ""


@pytest.mark.parametrize("which", ["llama", "opt"])
def test_incremental_stop_on_special_token(which, llama_tok, opt_tok):
    tok = llama_tok if which == "llama" else opt_tok
    # NOTE: SentencePiece adds the word-initial space itself; GPT-2 byte-level needs it in the text.
    out = tok.encode("The end. 终" if which == "llama" else " The end. 终", add_special_tokens=False)
    eos = tok.eos_token_id
    skip = IncrementalDetokenizer(tok, tok.encode("Story:"))
    text = "".join(_stream(skip, out))
    assert skip.step(eos) == ""                     # EOS adds no text when special tokens are skipped
    assert text == " The end. 终"
    keep = IncrementalDetokenizer(tok, tok.encode("Story:"), skip_special_tokens=False)
    assert "".join(_stream(keep, out)) == text
    assert keep.step(eos) == "</s>"


def test_incremental_copy_forks_independently(llama_tok):
    a_ids = llama_tok.encode("Bonjour à tous 😀 et à bientôt", add_special_tokens=False)
    b_ids = llama_tok.encode("Bonjour à tous 😀 and goodbye 👋", add_special_tokens=False)
    common = 0
    while a_ids[common] == b_ids[common]:
        common += 1
    # Fork in the middle of the emoji's byte pieces, so held-back state must be copied too.
    split = next(i for i in range(len(a_ids)) if 3 <= a_ids[i] <= 258) + 2
    assert split <= common
    parent = IncrementalDetokenizer(llama_tok, [1])
    head = "".join(_stream(parent, a_ids[:split]))
    child = parent.copy()
    a_text = head + "".join(_stream(parent, a_ids[split:]))
    b_text = head + "".join(_stream(child, b_ids[split:]))
    assert a_text == llama_tok.decode(a_ids)
    assert b_text == llama_tok.decode(b_ids)


def test_incremental_window_stays_small(llama_tok):
    """Per-step work is a few-token decode, not a decode of the whole sequence."""
    ids = llama_tok.encode(" ".join(MULTIBYTE_TEXTS * 20), add_special_tokens=False)
    assert len(ids) > 500
    detok = IncrementalDetokenizer(llama_tok, llama_tok.encode("A long prompt " * 50))
    deltas = []
    for i in ids:
        deltas.append(detok.step(i))
        assert len(detok._ids) <= 16      # NOTE: private, but it is the cost being tested
    assert "".join(deltas) + detok.flush() == " " + llama_tok.decode(ids)


def test_incremental_accepts_numpy_ids(opt_tok):
    np = pytest.importorskip("numpy")
    ids = np.array(opt_tok.encode(" naïve 🦙", add_special_tokens=False), dtype=np.int64)
    detok = IncrementalDetokenizer(opt_tok, np.array([2]))
    text = "".join(detok.step(i) for i in ids[:3]) + detok.step(ids[3:])
    assert text == " naïve 🦙"
