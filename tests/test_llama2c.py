"""llama2.c checkpoint import (stories260K: a real pretrained checkpoint in the legacy format).

The raw weights are read here with a few lines of struct/NumPy written from llama2.c's run.c layout,
independently of the converter, and the RoPE check uses the cos/sin tables stored in the legacy
file itself (llama2.c's own RoPE) against a rotate_half RoPE computed from config.json.
"""
from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from rawpaged.convert.llama2c import convert_llama2c, main
from rawpaged.errors import RawpagedError
from rawpaged.tokenizer import Tokenizer

# stories260K, as ORIGIN.md describes it.
DIM, HIDDEN, LAYERS, HEADS, KV_HEADS, VOCAB, SEQ = 64, 172, 5, 8, 4, 512, 512
HEAD = DIM // HEADS
N_PARAMS = 260_032


# -- an independent reader of the legacy file -----------------------------------------------------

def _read_legacy(path: Path) -> tuple[tuple[int, ...], dict[str, np.ndarray]]:
    """run.c's memory_map_weights, in NumPy: {name: array} with per-layer tensors stacked."""
    data = path.read_bytes()
    header = struct.unpack("<7i", data[:28])
    dim, hidden, layers, heads, kv_heads, vocab, seq = header
    vocab, hs = abs(vocab), dim // heads
    floats = np.frombuffer(data, dtype="<f4", offset=28)
    shapes = [("emb", (vocab, dim)), ("rms_att", (layers, dim)), ("wq", (layers, heads * hs, dim)),
              ("wk", (layers, kv_heads * hs, dim)), ("wv", (layers, kv_heads * hs, dim)),
              ("wo", (layers, dim, heads * hs)), ("rms_ffn", (layers, dim)), ("w1", (layers, hidden, dim)),
              ("w2", (layers, dim, hidden)), ("w3", (layers, hidden, dim)), ("rms_final", (dim,)),
              ("cos", (seq, hs // 2)), ("sin", (seq, hs // 2))]
    if header[5] < 0:
        shapes.append(("wcls", (vocab, dim)))
    out, pos = {}, 0
    for name, shape in shapes:
        n = int(np.prod(shape))
        out[name] = floats[pos:pos + n].reshape(shape)
        pos += n
    assert pos == floats.size
    return header, out


def _write_legacy(path: Path, header, w: dict, wcls: np.ndarray | None) -> None:
    dim, hidden, layers, heads, kv_heads, vocab, seq = header
    vocab = -abs(vocab) if wcls is not None else abs(vocab)
    parts = [struct.pack("<7i", dim, hidden, layers, heads, kv_heads, vocab, seq)]
    for name in ("emb", "rms_att", "wq", "wk", "wv", "wo", "rms_ffn", "w1", "w2", "w3", "rms_final",
                 "cos", "sin"):
        parts.append(np.ascontiguousarray(w[name], dtype="<f4").tobytes())
    if wcls is not None:
        parts.append(np.ascontiguousarray(wcls, dtype="<f4").tobytes())
    path.write_bytes(b"".join(parts))


def _write_v1(path: Path, header, w: dict, wcls: np.ndarray | None) -> None:
    """llama2.c export.py version1_export: 256-byte header, norms first, no freq_cis."""
    dim, hidden, layers, heads, kv_heads, vocab, seq = header
    head = struct.pack("<Ii7iB", 0x616B3432, 1, dim, hidden, layers, heads, kv_heads, abs(vocab), seq,
                       int(wcls is None))
    parts = [head + b"\0" * (256 - len(head))]
    for name in ("rms_att", "rms_ffn", "rms_final", "emb", "wq", "wk", "wv", "wo", "w1", "w2", "w3"):
        parts.append(np.ascontiguousarray(w[name], dtype="<f4").tobytes())
    if wcls is not None:
        parts.append(np.ascontiguousarray(wcls, dtype="<f4").tobytes())
    path.write_bytes(b"".join(parts))


# -- fixtures -------------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def src(data_dir: Path) -> Path:
    path = data_dir / "models" / "stories260K"
    if not (path / "stories260K.bin").is_file():
        pytest.skip(f"stories260K not found in {path}")
    return path


@pytest.fixture(scope="session")
def raw(src):
    return _read_legacy(src / "stories260K.bin")


@pytest.fixture(scope="session")
def converted(stories260k_dir):
    return load_file(str(stories260k_dir / "model.safetensors"))


def _siblings(path: Path) -> set[str]:
    return {p.name for p in path.parent.iterdir()}


# -- config and tensors ---------------------------------------------------------------------------

def test_config(stories260k_dir):
    cfg = json.loads((stories260k_dir / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["model_type"] == "llama"
    assert (cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"],
            cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["vocab_size"],
            cfg["max_position_embeddings"]) == (DIM, HIDDEN, LAYERS, HEADS, KV_HEADS, VOCAB, SEQ)
    assert cfg["rms_norm_eps"] == 1e-5 and cfg["rope_theta"] == 10000.0
    assert cfg["tie_word_embeddings"] is True and cfg["hidden_act"] == "silu"
    assert cfg["bos_token_id"] == 1 and cfg["eos_token_id"] == 2 and cfg["torch_dtype"] == "float32"
    gen = json.loads((stories260k_dir / "generation_config.json").read_text())
    assert gen == {"bos_token_id": 1, "eos_token_id": 2}
    tcfg = json.loads((stories260k_dir / "tokenizer_config.json").read_text())
    assert (tcfg["bos_token"], tcfg["eos_token"], tcfg["add_bos_token"], tcfg["add_eos_token"]) == \
        ("<s>", "</s>", True, False)


def test_tensor_names_and_shapes(converted):
    expected = {"model.embed_tokens.weight": (VOCAB, DIM), "model.norm.weight": (DIM,)}
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        expected.update({
            p + "self_attn.q_proj.weight": (HEADS * HEAD, DIM),
            p + "self_attn.k_proj.weight": (KV_HEADS * HEAD, DIM),
            p + "self_attn.v_proj.weight": (KV_HEADS * HEAD, DIM),
            p + "self_attn.o_proj.weight": (DIM, HEADS * HEAD),
            p + "mlp.gate_proj.weight": (HIDDEN, DIM),
            p + "mlp.up_proj.weight": (HIDDEN, DIM),
            p + "mlp.down_proj.weight": (DIM, HIDDEN),
            p + "input_layernorm.weight": (DIM,),
            p + "post_attention_layernorm.weight": (DIM,),
        })
    assert {k: v.shape for k, v in converted.items()} == expected     # no lm_head: tied
    assert all(v.dtype == np.float32 for v in converted.values())
    assert sum(v.size for v in converted.values()) == N_PARAMS


def test_unpermuted_tensors_are_the_raw_ones(converted, raw):
    _, w = raw
    np.testing.assert_array_equal(converted["model.embed_tokens.weight"], w["emb"])
    np.testing.assert_array_equal(converted["model.norm.weight"], w["rms_final"])
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        np.testing.assert_array_equal(converted[p + "input_layernorm.weight"], w["rms_att"][i])
        np.testing.assert_array_equal(converted[p + "post_attention_layernorm.weight"], w["rms_ffn"][i])
        np.testing.assert_array_equal(converted[p + "self_attn.v_proj.weight"], w["wv"][i])
        np.testing.assert_array_equal(converted[p + "self_attn.o_proj.weight"], w["wo"][i])
        np.testing.assert_array_equal(converted[p + "mlp.gate_proj.weight"], w["w1"][i])
        np.testing.assert_array_equal(converted[p + "mlp.down_proj.weight"], w["w2"][i])
        np.testing.assert_array_equal(converted[p + "mlp.up_proj.weight"], w["w3"][i])
        # The q/k rows are the raw rows, reordered inside each head.
        for name, raw_name in (("q_proj", "wq"), ("k_proj", "wk")):
            got = converted[p + f"self_attn.{name}.weight"].reshape(-1, HEAD, DIM)
            ref = w[raw_name][i].reshape(-1, HEAD, DIM)
            np.testing.assert_array_equal(np.sort(got, axis=1), np.sort(ref, axis=1))


# -- the q/k permutation: rotate_half RoPE on converted weights == interleaved RoPE on raw ones -----

def _rope_interleaved(x, pos, cos, sin):
    """llama2.c run.c: rotate adjacent pairs (2j, 2j+1) of each head. x: [T, heads, hs]."""
    c, s = cos[pos][:, None, :], sin[pos][:, None, :]      # [T, 1, hs/2] from the file's tables
    x0, x1 = x[..., 0::2], x[..., 1::2]                    # [T, heads, hs/2]
    out = np.empty_like(x)
    out[..., 0::2] = x0 * c - x1 * s
    out[..., 1::2] = x0 * s + x1 * c
    return out


def _rope_rotate_half(x, pos, theta):
    """Hugging Face LLaMA: x * cos + rotate_half(x) * sin, frequencies repeated over two halves."""
    hs = x.shape[-1]
    inv_freq = 1.0 / theta ** (np.arange(0, hs, 2, dtype=np.float64) / hs)   # [hs/2]
    ang = pos[:, None].astype(np.float64) * inv_freq                          # [T, hs/2]
    ang = np.concatenate([ang, ang], axis=-1)[:, None, :]                     # [T, 1, hs]
    rotated = np.concatenate([-x[..., hs // 2:], x[..., :hs // 2]], axis=-1)  # rotate_half
    return x * np.cos(ang) + rotated * np.sin(ang)


def _scores(q, k):
    """q [T, heads, hs], k [T, kv_heads, hs] -> [heads, T, T] with grouped-query sharing."""
    k = np.repeat(k, q.shape[1] // k.shape[1], axis=1)
    return np.einsum("thd,shd->hts", q, k)


@pytest.mark.parametrize("layer", [0, LAYERS - 1])
def test_permutation_matches_interleaved_rope(layer, converted, raw, stories260k_dir):
    _, w = raw
    theta = json.loads((stories260k_dir / "config.json").read_text())["rope_theta"]
    rng = np.random.default_rng(layer)
    x = rng.standard_normal((12, DIM))
    pos = rng.choice(SEQ, size=12, replace=False)
    p = f"model.layers.{layer}.self_attn."

    q_c = _rope_interleaved((x @ w["wq"][layer].T).reshape(12, HEADS, HEAD), pos, w["cos"], w["sin"])
    k_c = _rope_interleaved((x @ w["wk"][layer].T).reshape(12, KV_HEADS, HEAD), pos, w["cos"], w["sin"])
    q_h = _rope_rotate_half((x @ converted[p + "q_proj.weight"].T).reshape(12, HEADS, HEAD), pos, theta)
    k_h = _rope_rotate_half((x @ converted[p + "k_proj.weight"].T).reshape(12, KV_HEADS, HEAD), pos, theta)

    ref = _scores(q_c, k_c)
    np.testing.assert_allclose(_scores(q_h, k_h), ref, rtol=1e-4, atol=1e-4)
    # Each rotated head is the same vector with its components reordered (2j -> j, 2j+1 -> j + hs/2).
    order = np.concatenate([np.arange(0, HEAD, 2), np.arange(1, HEAD, 2)])
    np.testing.assert_allclose(q_h, q_c[..., order], rtol=1e-4, atol=1e-4)
    # Without the permutation the scores differ: the test can tell.
    q_bad = _rope_rotate_half((x @ w["wq"][layer].T).reshape(12, HEADS, HEAD), pos, theta)
    k_bad = _rope_rotate_half((x @ w["wk"][layer].T).reshape(12, KV_HEADS, HEAD), pos, theta)
    assert not np.allclose(_scores(q_bad, k_bad), ref, rtol=1e-2, atol=1e-2)


# -- other layouts ---------------------------------------------------------------------------------

@pytest.mark.parametrize("untied", [False, True])
def test_version1_and_untied_checkpoints(untied, tmp_path, src, raw, converted):
    header, w = raw
    wcls = (w["emb"][::-1] * 0.5).astype(np.float32) if untied else None
    legacy, v1 = tmp_path / "legacy.bin", tmp_path / "v1.bin"
    _write_legacy(legacy, header, w, wcls)
    _write_v1(v1, header, w, wcls)
    assert v1.stat().st_size == 256 + 4 * (N_PARAMS + (VOCAB * DIM if untied else 0))
    outs = [convert_llama2c(f, src / "tok512.bin", tmp_path / f"hf_{f.stem}") for f in (legacy, v1)]
    tensors = [load_file(str(o / "model.safetensors")) for o in outs]
    configs = [json.loads((o / "config.json").read_text()) for o in outs]
    assert configs[0] == configs[1] and configs[0]["tie_word_embeddings"] is (not untied)
    assert tensors[0].keys() == tensors[1].keys()
    for name in tensors[0]:
        np.testing.assert_array_equal(tensors[0][name], tensors[1][name])
    for name, ref in converted.items():
        np.testing.assert_array_equal(tensors[1][name], ref)
    if untied:
        np.testing.assert_array_equal(tensors[1]["lm_head.weight"], wcls)
    else:
        assert "lm_head.weight" not in tensors[1]


# -- errors and atomicity --------------------------------------------------------------------------

@pytest.mark.parametrize("delta", [-100, +8])
def test_wrong_size_checkpoint_is_an_error_and_leaves_nothing(delta, tmp_path, src):
    data = (src / "stories260K.bin").read_bytes()
    bad = tmp_path / "bad.bin"
    bad.write_bytes(data[:delta] if delta < 0 else data + b"\0" * delta)
    out = tmp_path / "out" / "model"
    out.parent.mkdir()
    with pytest.raises(RawpagedError) as err:
        convert_llama2c(bad, src / "tok512.bin", out)
    msg = str(err.value)
    assert "\n" not in msg and str(bad) in msg
    assert ("truncated" if delta < 0 else "oversized") in msg
    assert f"expected {len(data)} bytes" in msg and f"found {len(data) + delta}" in msg
    assert not out.exists() and list(out.parent.iterdir()) == []


def test_bad_headers(tmp_path, src):
    tok = src / "tok512.bin"
    tiny = tmp_path / "tiny.bin"
    tiny.write_bytes(b"\1\0\0\0")
    with pytest.raises(RawpagedError, match="truncated llama2.c header"):
        convert_llama2c(tiny, tok, tmp_path / "o1")
    zeros = tmp_path / "zeros.bin"
    zeros.write_bytes(b"\0" * 1000)
    with pytest.raises(RawpagedError, match="dim=0"):
        convert_llama2c(zeros, tok, tmp_path / "o2")
    v2 = tmp_path / "v2.bin"
    v2.write_bytes(struct.pack("<Ii", 0x616B3432, 2) + b"\0" * 300)
    with pytest.raises(RawpagedError, match="version 2 is not supported"):
        convert_llama2c(v2, tok, tmp_path / "o3")
    with pytest.raises(RawpagedError, match="not found"):
        convert_llama2c(tmp_path / "missing.bin", tok, tmp_path / "o4")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny.bin", "v2.bin", "zeros.bin"]


def test_tokenizer_vocab_mismatch(tmp_path, src, data_dir):
    with pytest.raises(RawpagedError, match="32000 pieces but .* vocab_size=512"):
        convert_llama2c(src / "stories260K.bin", data_dir / "tokenizers/llama-32k/tokenizer.bin",
                        tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_failure_while_writing_removes_temp_dir(tmp_path, src, monkeypatch):
    import safetensors.numpy

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.numpy, "save_file", boom)
    with pytest.raises(RawpagedError, match="disk full"):
        convert_llama2c(src / "stories260K.bin", src / "tok512.bin", tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_existing_out_dir_needs_force(tmp_path, src):
    out = tmp_path / "model"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(RawpagedError, match="already exists"):
        convert_llama2c(src / "stories260K.bin", src / "tok512.bin", out)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    convert_llama2c(src / "stories260K.bin", src / "tok512.bin", out, force=True)
    assert sorted(p.name for p in out.iterdir()) == [
        "config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
        "tokenizer_config.json"]
    assert [p.name for p in tmp_path.iterdir()] == ["model"]       # no temp or old dirs left


def test_cli(tmp_path, src, capsys):
    out = tmp_path / "cli"
    assert main([str(src / "stories260K.bin"), str(src / "tok512.bin"), str(out)]) == 0
    assert (out / "model.safetensors").is_file()
    assert main([str(src / "stories260K.bin"), str(src / "tok512.bin"), str(out)]) == 1
    assert "already exists" in capsys.readouterr().err


# -- the tok512 tokenizer ---------------------------------------------------------------------------

def test_tok512_encodes_and_decodes(stories260k_dir, src):
    tok = Tokenizer.from_dir(stories260k_dir)
    assert tok.vocab_size == VOCAB and tok.bos_token_id == 1 and tok.eos_token_ids == {2}
    ids = tok.encode("Once upon a time")
    assert ids[0] == 1 and ids.count(1) == 1
    assert all(i >= 259 for i in ids[1:])      # whole-word pieces, no byte fallback
    assert tok.convert_ids_to_tokens(ids[1:]) == ["▁Once", "▁upon", "▁a", "▁time"]
    assert tok.decode(ids) == "Once upon a time"
    # The reference greedy continuation decodes to the story ORIGIN.md / DESIGN.md quote.
    greedy = json.loads((src / "greedy_reference.json").read_text())["greedy_next_token_ids_64"]
    assert tok.decode(greedy).startswith("Once upon a time, there was a little girl named Lily")
    assert tok.encode("Once upon a time", add_special_tokens=False) == greedy[:4]
    # Text outside the 512-piece vocabulary round-trips through the byte pieces.
    odd = "Zoë ate 🍰!"
    assert tok.decode(tok.encode(odd)) == odd


# -- merges: linear in the length of a piece ---------------------------------------------------------

def _merges_by_trying_every_split(pieces, scores):
    """The definition (HF's SentencePieceExtractor): every split whose halves are both pieces."""
    vocab = {p: i for i, p in enumerate(pieces)}
    merges = sorted((-s, vocab[p[:k]], vocab[p[k:]], p[:k], p[k:]) for p, s in zip(pieces, scores)
                    for k in range(1, len(p)) if p[:k] in vocab and p[k:] in vocab)
    return [[m[3], m[4]] for m in merges]


@pytest.mark.parametrize("short_piece", [0, 2, 64])
def test_merges_match_trying_every_split(monkeypatch, short_piece):
    """Random small vocabularies, through the slicing path, the vocabulary walk, and both mixed."""
    import random

    import rawpaged.convert.llama2c as l2c
    monkeypatch.setattr(l2c, "SHORT_PIECE", short_piece)
    rng = random.Random(short_piece)
    for _ in range(200):
        alphabet = "ab▁é"[:rng.randint(1, 4)]
        pieces = sorted({"".join(rng.choice(alphabet) for _ in range(rng.randint(0, 8)))
                         for _ in range(rng.randint(1, 60))})
        rng.shuffle(pieces)
        scores = [float(rng.randint(-3, 3)) for _ in pieces]
        assert l2c.sentencepiece_merges(pieces, scores) == _merges_by_trying_every_split(pieces, scores)


class _CountingStr(str):
    """A str that counts the characters read out of it by indexing and slicing."""
    reads = 0

    def __getitem__(self, key):
        out = str.__getitem__(self, key)
        _CountingStr.reads += len(out)
        return out


def test_merges_read_a_long_piece_a_linear_number_of_times():
    """The work on one piece grows linearly with its length: trying every split of an n-character
    piece reads n^2 characters (n = 20000: 4 * 10^8); the vocabulary walk reads each character of
    the piece a few times (two reversed copies, then per character the piece's own character and
    one or two bisection probes of the vocabulary entries still in range, here the piece itself)."""
    from rawpaged.convert.llama2c import sentencepiece_merges
    base = ["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(256)]
    runs = ["a" * k for k in (1, 2, 3, 5, 8)] + ["b", "ab", "ba", "a" * 7 + "b"]
    reads = {}
    for n in (5_000, 20_000):
        long = _CountingStr("a" * (n - 1) + "b")
        pieces = base + runs + [long]
        scores = [0.0] * len(pieces)
        _CountingStr.reads = 0
        merges = sentencepiece_merges(pieces, scores)
        reads[n] = _CountingStr.reads
        assert merges == _merges_by_trying_every_split([str(p) for p in pieces], scores)
        assert ["a", "b"] in merges and ["aaa", "aaaaa"] in merges
        # the long piece would split as a^(n-1-j) + a^j b, with a^j b in {b, ab, a^7 b}: no such run
        assert not any("".join(m) == long for m in merges)
    assert reads[20_000] <= 6 * 20_000, reads
    assert reads[20_000] <= 4.2 * reads[5_000], reads        # 4x the length, ~4x the reads (not 16x)


def test_a_tokenizer_with_a_long_piece_converts(tmp_path, src):
    """A 200000-character piece (quadratic: ~4 * 10^10 character copies) converts, merges intact."""
    from rawpaged.convert.llama2c import llama2c_tokenizer_json, read_llama2c_tokenizer
    pieces, scores = read_llama2c_tokenizer(src / "tok512.bin")
    long = "▁" + "a" * 199_999
    pieces[-1] = long
    path = tmp_path / "tok.bin"
    with open(path, "wb") as f:
        f.write(struct.pack("<i", len(long)))
        for i, (p, s) in enumerate(zip(pieces, scores)):
            raw = {0: "<unk>", 1: "\n<s>\n", 2: "\n</s>\n"}.get(i, p.replace("▁", " ")).encode()
            f.write(struct.pack("<fi", s, len(raw)) + raw)
    tok = llama2c_tokenizer_json(path)
    assert tok["model"]["vocab"][long] == len(pieces) - 1
    assert not any("".join(m) == long for m in tok["model"]["merges"])    # no half "a" * 199999
