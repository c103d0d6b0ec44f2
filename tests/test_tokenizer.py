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


# -- tokenizers built without a tokenizer.json -----------------------------------------------------
# The shared data's files, copied under the names a Hugging Face model directory uses.

OPT_GOLDEN_TEXT = "Today is a beautiful day and I want"
OPT_GOLDEN_IDS = [2, 5625, 16, 10, 2721, 183, 8, 38, 236]
# OPT's tokenizer_config.json / special_tokens_map.json (facebook/opt-*): </s> is bos, eos and unk.
OPT_TOKENIZER_CONFIG = {"errors": "replace", "add_bos_token": True, "add_prefix_space": False,
                        "bos_token": {"content": "</s>", "lstrip": False, "normalized": True, "rstrip": False,
                                      "single_word": False, "__type": "AddedToken"},
                        "eos_token": {"content": "</s>", "__type": "AddedToken"},
                        "unk_token": {"content": "</s>", "__type": "AddedToken"},
                        "pad_token": {"content": "<pad>", "__type": "AddedToken"}}
OPT_SPECIAL_TOKENS_MAP = {"bos_token": "</s>", "eos_token": "</s>", "unk_token": "</s>", "pad_token": "<pad>"}


def _write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, ensure_ascii=False), encoding="utf-8")


def _opt_vocab(opt_dir: Path) -> dict[str, int]:
    """OPT's vocab.json: GPT-2's encoder.json renumbered by fairseq's dict.txt (OPT id = 4 + line)."""
    gpt2 = json.loads((opt_dir / "encoder.json").read_text(encoding="utf-8"))
    token_of = {i: t for t, i in gpt2.items()}
    vocab = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3}
    for line_no, line in enumerate((opt_dir / "dict.txt").read_text(encoding="utf-8").splitlines()):
        word = line.split()[0]
        if word.isdigit():
            vocab[token_of[int(word)]] = 4 + line_no
    return vocab


@pytest.fixture(scope="session")
def spm_dir(llama_json_dir, tmp_path_factory) -> Path:
    """LLaMA as a slow-tokenizer directory: tokenizer.model only."""
    out = tmp_path_factory.mktemp("llama_spm")
    shutil.copyfile(llama_json_dir / "tokenizer.model", out / "tokenizer.model")
    return out


@pytest.fixture(scope="session")
def opt_files_dir(data_dir, tmp_path_factory) -> Path:
    """OPT as facebook/opt-* ships it without tokenizer.json: vocab.json, merges.txt and the two configs."""
    src = data_dir / "tokenizers" / "opt-gpt2"
    out = tmp_path_factory.mktemp("opt_files")
    _write_json(out / "vocab.json", _opt_vocab(src))
    shutil.copyfile(src / "vocab.bpe", out / "merges.txt")
    _write_json(out / "tokenizer_config.json", OPT_TOKENIZER_CONFIG)
    _write_json(out / "special_tokens_map.json", OPT_SPECIAL_TOKENS_MAP)
    return out


@pytest.fixture(scope="session")
def gpt2_files_dir(data_dir, tmp_path_factory) -> Path:
    """GPT-2 itself: OpenAI's encoder.json / vocab.bpe as vocab.json / merges.txt, no config at all."""
    src = data_dir / "tokenizers" / "opt-gpt2"
    out = tmp_path_factory.mktemp("gpt2_files")
    shutil.copyfile(src / "encoder.json", out / "vocab.json")
    shutil.copyfile(src / "vocab.bpe", out / "merges.txt")
    return out


def test_sentencepiece_model_reader_agrees_with_tokenizer_bin(llama_json_dir):
    """Our protobuf reader vs llama2.c's tokenizer.bin, exported from the same model by sentencepiece."""
    from rawpaged.convert.llama2c import read_llama2c_tokenizer
    from rawpaged.sentencepiece_model import SPM_BPE, SPM_BYTE, SPM_CONTROL, SPM_NORMAL, SPM_UNKNOWN, \
        read_sentencepiece_model

    spm = read_sentencepiece_model(llama_json_dir / "tokenizer.model")
    pieces, scores = read_llama2c_tokenizer(llama_json_dir / "tokenizer.bin")
    assert spm.pieces == pieces
    assert spm.scores == scores               # both float32, exactly
    assert spm.types[:3] == [SPM_UNKNOWN, SPM_CONTROL, SPM_CONTROL]
    assert set(spm.types[3:259]) == {SPM_BYTE} and set(spm.types[259:]) == {SPM_NORMAL}
    assert (spm.model_type, spm.byte_fallback, spm.unk_piece) == (SPM_BPE, True, "<unk>")


def test_tokenizer_model_golden_46(spm_dir, golden):
    tok = Tokenizer.from_dir(spm_dir)
    failures = [(text, ids) for text, ids in golden if tok.encode(text, add_special_tokens=False) != ids]
    assert not failures, failures[:3]
    assert tok.encode(golden[5][0]) == [1] + golden[5][1]
    assert (tok.bos_token_id, tok.eos_token_id, tok.vocab_size) == (1, 2, 32000)
    assert tok.all_special_ids == [0, 1, 2]
    for text in MULTIBYTE_TEXTS:
        assert tok.decode(tok.encode(text)) == text


def test_tokenizer_model_builds_what_transformers_built(spm_dir, llama_json_dir):
    """The shared tokenizer.json was built from this tokenizer.model by transformers' LlamaConverter."""
    from rawpaged.tokenizer_build import load_backend

    backend, _ = load_backend(spm_dir)
    ours = json.loads(backend.to_str())
    ref = json.loads((llama_json_dir / "tokenizer.json").read_text(encoding="utf-8"))
    for key in ("normalizer", "pre_tokenizer", "post_processor", "decoder", "added_tokens"):
        assert ours[key] == ref[key], key
    for key in ("vocab", "merges", "unk_token", "byte_fallback", "fuse_unk"):
        assert ours["model"][key] == ref["model"][key], key


def test_tokenizer_model_legacy_false_prefixes_only_the_start(spm_dir, tmp_path, golden):
    """legacy=False (Metaspace pre-tokenizer): no "▁" after a special token; plain text unchanged.

    NOTE: like transformers' non-legacy fast tokenizer, Metaspace prepends no "▁" to text that already
    starts with a space, so golden inputs with leading spaces differ from SentencePiece by design.
    """
    d = tmp_path / "nonlegacy"
    d.mkdir()
    shutil.copyfile(spm_dir / "tokenizer.model", d / "tokenizer.model")
    _write_json(d / "tokenizer_config.json", {"legacy": False, "add_bos_token": True})
    new, old = Tokenizer.from_dir(d), Tokenizer.from_dir(spm_dir)
    plain = [(t, ids) for t, ids in golden if not t.startswith(" ")]
    assert len(plain) >= 25
    assert all(new.encode(t, add_special_tokens=False) == ids for t, ids in plain)
    assert new.encode(" Hello", add_special_tokens=False) == [15043]          # old: [29871, 15043]
    hello, world = old.encode("Hello", add_special_tokens=False), old.encode("world", add_special_tokens=False)
    assert old.encode("Hello</s>world", add_special_tokens=False) == hello + [2] + world       # "▁world"
    assert new.encode("Hello</s>world", add_special_tokens=False) == hello + [2] + [old.token_to_id("world")]


def test_opt_from_vocab_and_merges(opt_files_dir, opt_tok):
    tok = Tokenizer.from_dir(opt_files_dir)
    assert tok.encode(OPT_GOLDEN_TEXT) == OPT_GOLDEN_IDS
    assert tok.encode(OPT_GOLDEN_TEXT, add_special_tokens=False) == OPT_GOLDEN_IDS[1:]
    assert (tok.bos_token_id, tok.eos_token_id) == (2, 2)
    assert tok.decode(OPT_GOLDEN_IDS) == OPT_GOLDEN_TEXT
    assert 1 in tok.all_special_ids and 2 in tok.all_special_ids      # <pad>, </s>
    # the same ids as the shared OPT tokenizer.json on text of every kind
    for text in MULTIBYTE_TEXTS + [OPT_GOLDEN_TEXT, "  two  spaces\tand\nnewlines  ", "</s>Today"]:
        assert tok.encode(text) == opt_tok.encode(text), text
        assert tok.decode(tok.encode(text)) == opt_tok.decode(opt_tok.encode(text))


def test_gpt2_from_vocab_and_merges(gpt2_files_dir, data_dir):
    tok = Tokenizer.from_dir(gpt2_files_dir)
    assert tok.encode("Hello world") == [15496, 995]           # GPT-2's best-known encoding; no BOS
    # OPT's golden ids mapped back to GPT-2 ids through fairseq's dict.txt (OPT id = 4 + line)
    lines = (data_dir / "tokenizers" / "opt-gpt2" / "dict.txt").read_text(encoding="utf-8").splitlines()
    assert tok.encode(OPT_GOLDEN_TEXT) == [int(lines[i - 4].split()[0]) for i in OPT_GOLDEN_IDS[1:]]
    eot = 50256
    assert (tok.bos_token_id, tok.eos_token_id, tok.all_special_ids) == (eot, eot, [eot])
    assert tok.encode("<|endoftext|>Hi") == [eot, 17250]
    assert tok.decode([eot, 17250]) == "Hi"


def test_special_tokens_map_wins_over_tokenizer_config(opt_files_dir, tmp_path):
    d = tmp_path / "opt"
    shutil.copytree(opt_files_dir, d)
    _write_json(d / "tokenizer_config.json", {**OPT_TOKENIZER_CONFIG, "eos_token": "<unk>"})
    assert Tokenizer.from_dir(d).eos_token_id == 2                  # the map says </s>
    (d / "special_tokens_map.json").unlink()
    assert Tokenizer.from_dir(d).eos_token_id == 3


@pytest.mark.parametrize("which", ["spm", "opt"])
def test_write_tokenizer_json_round_trip(which, spm_dir, opt_files_dir, tmp_path, golden):
    from rawpaged.tokenizer import write_tokenizer_json

    src = spm_dir if which == "spm" else opt_files_dir
    out = tmp_path / "with_json"
    out.mkdir()
    assert write_tokenizer_json(src, out / "tokenizer.json") == out / "tokenizer.json"
    for cfg in ("tokenizer_config.json", "special_tokens_map.json"):
        if (src / cfg).is_file():
            shutil.copyfile(src / cfg, out / cfg)
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["tokenizer.json"] + [c for c in ("tokenizer_config.json", "special_tokens_map.json") if (src / c).is_file()])
    built, saved = Tokenizer.from_dir(src), Tokenizer.from_dir(out)
    for text in [t for t, _ in golden] + MULTIBYTE_TEXTS:
        assert saved.encode(text) == built.encode(text), text
    assert (saved.bos_token_id, saved.eos_token_ids, saved.all_special_ids) == \
        (built.bos_token_id, built.eos_token_ids, built.all_special_ids)


def _proto_field(num: int, payload) -> bytes:
    """One protobuf field: a varint (int) or a length-delimited payload (bytes)."""
    def varint(v):
        out = b""
        while True:
            out += bytes([(v & 0x7F) | (0x80 if v > 0x7F else 0)])
            v >>= 7
            if not v:
                return out
    if isinstance(payload, int):
        return varint(num << 3) + varint(payload)
    return varint(num << 3 | 2) + varint(len(payload)) + payload


def test_slow_tokenizer_files_errors_are_one_line(tmp_path, spm_dir, opt_files_dir, llama_json_dir):
    def fails(d: Path, *needles: str):
        with pytest.raises(RawpagedError) as err:
            Tokenizer.from_dir(d)
        assert "\n" not in str(err.value)
        for n in needles:
            assert n in str(err.value), str(err.value)

    def model_dir(name: str, data: bytes) -> Path:
        d = tmp_path / name
        d.mkdir()
        (d / "tokenizer.model").write_bytes(data)
        return d

    full = (llama_json_dir / "tokenizer.model").read_bytes()
    fails(model_dir("truncated", full[:len(full) // 2]), "not a SentencePiece model", "past the end")
    fails(model_dir("text", b"this is not a protobuf file at all\n"), "not a SentencePiece model")
    piece = _proto_field(1, _proto_field(1, b"<unk>") + _proto_field(3, 2))
    unigram = piece + _proto_field(2, _proto_field(3, 1))            # trainer_spec.model_type = UNIGRAM
    fails(model_dir("unigram", unigram), "unigram", "tokenizer.json")

    t5 = tmp_path / "t5"
    shutil.copytree(spm_dir, t5)
    _write_json(t5 / "tokenizer_config.json", {"tokenizer_class": "T5Tokenizer"})
    fails(t5, "'T5Tokenizer'", "LlamaTokenizer")

    mixed = tmp_path / "mixed"
    shutil.copytree(opt_files_dir, mixed)
    (mixed / "merges.txt").write_text("#version: 0.2\nĠ t\nq z\n", encoding="utf-8")
    fails(mixed, "merges.txt", "'q z'")
    (mixed / "merges.txt").write_text("#version: 0.2\nĠ t\nthree tokens here\n", encoding="utf-8")
    fails(mixed, "line 2")
    shutil.copyfile(opt_files_dir / "merges.txt", mixed / "merges.txt")
    _write_json(mixed / "special_tokens_map.json", {"eos_token": "<|im_end|>"})
    fails(mixed, "'<|im_end|>'", "not in the vocabulary")
