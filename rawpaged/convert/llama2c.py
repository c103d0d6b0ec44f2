"""llama2.c checkpoints (and their tokenizer.bin) -> a Hugging Face LlamaForCausalLM directory.

    python -m rawpaged.convert.llama2c stories260K.bin tok512.bin out_dir [--force]

Checkpoint formats (llama2.c's export.py):
  v0 "legacy": 7 int32 (dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, seq_len),
      vocab_size < 0 means an untied classifier. Then float32:
      token_embedding, rms_att[L], wq[L], wk[L], wv[L], wo[L], rms_ffn[L], w1[L], w2[L], w3[L],
      rms_final, freq_cis_real[seq_len, hs/2], freq_cis_imag[seq_len, hs/2], (wcls if untied).
  v1: uint32 magic 0x616b3432 ("ak42"), int32 version = 1, the same 7 int32, uint8 shared_classifier,
      zero padding to a 256-byte header. Then float32:
      rms_att[L], rms_ffn[L], rms_final, token_embedding, wq[L], wk[L], wv[L], wo[L],
      w1[L], w2[L], w3[L], (wcls if not shared). No freq_cis tables.
Every matrix is stored row-major as [out_features, in_features], the layout of torch.nn.Linear and
of Hugging Face checkpoints, so no transposes are needed; only wq/wk rows are permuted (see below).

tokenizer.bin: int32 max_token_length, then per piece: float32 score, int32 byte length, bytes.
Pieces use a plain space where SentencePiece writes U+2581, and pieces 1/2 are "\\n<s>\\n"/"\\n</s>\\n".
"""
from __future__ import annotations

import argparse
import bisect
import json
import math
import os
import secrets
import shutil
import struct
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from rawpaged.errors import RawpagedError

V1_MAGIC = 0x616B3432
V1_HEADER_BYTES = 256
LEGACY_HEADER_BYTES = 7 * 4
SPIECE_SPACE = "\u2581"   # SentencePiece's visible space "▁"
SHORT_PIECE = 64          # longer pieces find their merges without trying every split (sentencepiece_merges)


# ---------------------------------------------------------------------------------------------
# Checkpoint reading
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Llama2cConfig:
    dim: int
    hidden_dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    vocab_size: int
    seq_len: int
    shared_classifier: bool
    version: int           # 0 = legacy, 1 = "ak42" header

    @property
    def head_size(self) -> int:
        return self.dim // self.n_heads


def _tensor_shapes(cfg: Llama2cConfig) -> dict[str, tuple[int, ...]]:
    """llama2.c name -> shape of one tensor (per-layer tensors are stacked on axis 0 by _layout)."""
    d, h, hs = cfg.dim, cfg.hidden_dim, cfg.head_size
    return {
        "token_embedding": (cfg.vocab_size, d),
        "rms_att": (d,), "rms_ffn": (d,), "rms_final": (d,),
        "wq": (cfg.n_heads * hs, d), "wk": (cfg.n_kv_heads * hs, d),
        "wv": (cfg.n_kv_heads * hs, d), "wo": (d, cfg.n_heads * hs),
        "w1": (h, d), "w2": (d, h), "w3": (h, d),
        "freq_cis_real": (cfg.seq_len, hs // 2), "freq_cis_imag": (cfg.seq_len, hs // 2),
        "wcls": (cfg.vocab_size, d),
    }


_PER_LAYER = {"rms_att", "rms_ffn", "wq", "wk", "wv", "wo", "w1", "w2", "w3"}


def _layout(cfg: Llama2cConfig) -> list[tuple[str, tuple[int, ...]]]:
    """The tensors of the file in storage order, with their full (layer-stacked) shapes."""
    if cfg.version == 0:
        order = ["token_embedding", "rms_att", "wq", "wk", "wv", "wo", "rms_ffn", "w1", "w2", "w3",
                 "rms_final", "freq_cis_real", "freq_cis_imag"]
    else:
        order = ["rms_att", "rms_ffn", "rms_final", "token_embedding",
                 "wq", "wk", "wv", "wo", "w1", "w2", "w3"]
    if not cfg.shared_classifier:
        order.append("wcls")
    shapes = _tensor_shapes(cfg)
    return [(name, (cfg.n_layers, *shapes[name]) if name in _PER_LAYER else shapes[name])
            for name in order]


def _read_header(path: Path, head: bytes) -> tuple[Llama2cConfig, int]:
    """Parse either header; return the config and the byte offset where the weights start."""
    if len(head) >= 4 and struct.unpack_from("<I", head, 0)[0] == V1_MAGIC:
        if len(head) < V1_HEADER_BYTES:
            raise RawpagedError(f"{path}: truncated llama2.c v1 header: expected {V1_HEADER_BYTES} "
                                f"bytes, found {len(head)}")
        version = struct.unpack_from("<i", head, 4)[0]
        if version != 1:
            raise RawpagedError(f"{path}: llama2.c checkpoint version {version} is not supported "
                                "(only float32 v0 legacy and v1)")
        params = struct.unpack_from("<7i", head, 8)
        shared = bool(head[8 + 28])
        vocab = params[5]
        offset = V1_HEADER_BYTES
    else:
        if len(head) < LEGACY_HEADER_BYTES:
            raise RawpagedError(f"{path}: truncated llama2.c header: expected {LEGACY_HEADER_BYTES} "
                                f"bytes, found {len(head)}")
        version = 0
        params = struct.unpack_from("<7i", head, 0)
        # NOTE: the legacy format flags an untied classifier with a negative vocab_size.
        shared = params[5] > 0
        vocab = abs(params[5])
        offset = LEGACY_HEADER_BYTES
    dim, hidden_dim, n_layers, n_heads, n_kv_heads, _, seq_len = params
    cfg = Llama2cConfig(dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab, seq_len, shared,
                        version)
    _check_config(path, cfg)
    return cfg, offset


def _check_config(path: Path, cfg: Llama2cConfig) -> None:
    for field in ("dim", "hidden_dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "seq_len"):
        if getattr(cfg, field) <= 0:
            raise RawpagedError(f"{path}: bad llama2.c header: {field}={getattr(cfg, field)} "
                                "(not a llama2.c checkpoint?)")
    if cfg.dim % cfg.n_heads or cfg.head_size % 2:
        raise RawpagedError(f"{path}: bad llama2.c header: dim={cfg.dim} is not n_heads={cfg.n_heads} "
                            "times an even head size")
    if cfg.n_heads % cfg.n_kv_heads:
        raise RawpagedError(f"{path}: bad llama2.c header: n_heads={cfg.n_heads} is not a multiple "
                            f"of n_kv_heads={cfg.n_kv_heads}")


def read_llama2c_checkpoint(path: str | Path) -> tuple[Llama2cConfig, dict[str, np.ndarray]]:
    """Read a v0/v1 float32 llama2.c checkpoint into {llama2.c name: float32 array}.

    Arrays are read-only views of a memory map (no copy of the file in RAM).
    """
    path = Path(path)
    if not path.is_file():
        raise RawpagedError(f"llama2.c checkpoint not found: {path}")
    actual = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(V1_HEADER_BYTES)
    cfg, offset = _read_header(path, head)
    layout = _layout(cfg)
    expected = offset + 4 * sum(math.prod(shape) for _, shape in layout)
    if actual != expected:
        kind = "truncated" if actual < expected else "oversized"
        raise RawpagedError(f"{path}: {kind} llama2.c v{cfg.version} checkpoint: expected {expected} "
                            f"bytes for dim={cfg.dim} n_layers={cfg.n_layers} "
                            f"vocab_size={cfg.vocab_size}, found {actual}")
    flat = np.memmap(path, dtype="<f4", mode="r", offset=offset)
    weights, pos = {}, 0
    for name, shape in layout:
        n = math.prod(shape)
        weights[name] = flat[pos:pos + n].reshape(shape)
        pos += n
    return cfg, weights


# ---------------------------------------------------------------------------------------------
# Weight mapping
# ---------------------------------------------------------------------------------------------

def permute_rotary(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Reorder the rows of a q/k projection from interleaved RoPE to rotate_half RoPE.

    llama2.c rotates adjacent pairs (2j, 2j+1) of each head by angle pos * theta^(-2j/hs);
    Hugging Face rotates (j, j + hs/2) by the same angle. Moving row 2j to j and row 2j+1 to
    j + hs/2 in every head makes the two formulations produce the same attention scores.
    This is Hugging Face's convert_llama_weights_to_hf `permute`, in NumPy.
    """
    rows, cols = w.shape                                      # [n_heads * hs, dim]
    hs = rows // n_heads
    w = w.reshape(n_heads, hs // 2, 2, cols)                  # [h, j, pair member, dim]
    return np.ascontiguousarray(w.transpose(0, 2, 1, 3).reshape(rows, cols))   # [h, member, j, dim]


def hf_state_dict(cfg: Llama2cConfig, w: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """llama2.c tensors -> Hugging Face LlamaForCausalLM tensor names (float32, contiguous)."""
    def arr(a):
        return np.ascontiguousarray(a, dtype=np.float32)

    out = {"model.embed_tokens.weight": arr(w["token_embedding"])}
    for i in range(cfg.n_layers):
        p = f"model.layers.{i}."
        out[p + "input_layernorm.weight"] = arr(w["rms_att"][i])
        out[p + "self_attn.q_proj.weight"] = permute_rotary(arr(w["wq"][i]), cfg.n_heads)
        out[p + "self_attn.k_proj.weight"] = permute_rotary(arr(w["wk"][i]), cfg.n_kv_heads)
        out[p + "self_attn.v_proj.weight"] = arr(w["wv"][i])
        out[p + "self_attn.o_proj.weight"] = arr(w["wo"][i])
        out[p + "post_attention_layernorm.weight"] = arr(w["rms_ffn"][i])
        out[p + "mlp.gate_proj.weight"] = arr(w["w1"][i])
        out[p + "mlp.up_proj.weight"] = arr(w["w3"][i])
        out[p + "mlp.down_proj.weight"] = arr(w["w2"][i])
    out["model.norm.weight"] = arr(w["rms_final"])
    if not cfg.shared_classifier:
        out["lm_head.weight"] = arr(w["wcls"])
    return out


def hf_config(cfg: Llama2cConfig) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": cfg.dim,
        "intermediate_size": cfg.hidden_dim,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads,
        "vocab_size": cfg.vocab_size,
        "max_position_embeddings": cfg.seq_len,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "tie_word_embeddings": cfg.shared_classifier,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "torch_dtype": "float32",
    }


# ---------------------------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------------------------

def read_llama2c_tokenizer(path: str | Path) -> tuple[list[str], list[float]]:
    """Read tokenizer.bin -> (SentencePiece-style pieces, scores), id = list index."""
    path = Path(path)
    if not path.is_file():
        raise RawpagedError(f"llama2.c tokenizer not found: {path}")
    data = path.read_bytes()
    if len(data) < 4:
        raise RawpagedError(f"{path}: truncated llama2.c tokenizer: no header")
    pieces, scores, pos = [], [], 4
    while pos < len(data):
        if pos + 8 > len(data):
            raise RawpagedError(f"{path}: truncated llama2.c tokenizer at piece {len(pieces)} "
                                f"(byte {pos} of {len(data)})")
        score, n = struct.unpack_from("<fi", data, pos)
        if n < 0 or pos + 8 + n > len(data):
            raise RawpagedError(f"{path}: truncated llama2.c tokenizer at piece {len(pieces)} "
                                f"(length {n} at byte {pos} of {len(data)})")
        try:
            text = data[pos + 8:pos + 8 + n].decode("utf-8")
        except UnicodeDecodeError:
            raise RawpagedError(f"{path}: piece {len(pieces)} is not valid UTF-8") from None
        # NOTE: llama2.c's tokenizer.py wrote " " for SentencePiece's "▁"; undo it.
        pieces.append(text.replace(" ", SPIECE_SPACE))
        scores.append(float(score))
        pos += 8 + n
    if len(pieces) < 3 + 256:
        raise RawpagedError(f"{path}: {len(pieces)} pieces; a llama2.c tokenizer has <unk>, <s>, "
                            "</s> and 256 byte pieces at least")
    # NOTE: tokenizer.py wrote BOS/EOS as "\n<s>\n" / "\n</s>\n" for printing; restore the real pieces.
    pieces[0], pieces[1], pieces[2] = "<unk>", "<s>", "</s>"
    bad = [i for i in range(256) if pieces[3 + i] != f"<0x{i:02X}>"]
    if bad:
        raise RawpagedError(f"{path}: piece {3 + bad[0]} is {pieces[3 + bad[0]]!r}, expected the "
                            f"byte piece <0x{bad[0]:02X}> (ids 3..258 must be the byte fallback)")
    if len(set(pieces)) != len(pieces):
        raise RawpagedError(f"{path}: duplicate pieces in the vocabulary")
    return pieces, scores


def sentencepiece_merges(pieces: list[str], scores: list[float]) -> list[list[str]]:
    """BPE merges recovered from a SentencePiece vocabulary, the way HF's SentencePieceExtractor does.

    A piece p can be built by merging any split (p[:k], p[k:]) whose halves are both pieces. SentencePiece
    BPE applies the highest-scoring merge first, so merges are ordered by the merged piece's score
    (descending), ties broken by the ids of the left and then the right half.

    NOTE: trying every split by slicing costs O(len(p)^2) per piece: fine for real pieces (a few
    dozen characters), minutes for a hostile 1 MB one. Pieces longer than SHORT_PIECE find their
    halves by walking the sorted vocabulary one character at a time instead (`_vocab_prefixes`),
    forwards for the left halves and over the reversed pieces for the right halves: O(len(p) log V)
    character reads, no string built but the vocabulary's own. Either way the work is linear in the
    total length of the pieces (at most SHORT_PIECE or log V reads per character).
    """
    vocab = {p: i for i, p in enumerate(pieces)}
    walk = None                                    # sorted (key, piece) lists, built on first need
    merges = []
    for piece, score in zip(pieces, scores):
        if len(piece) <= SHORT_PIECE:
            splits = [(piece[:k], piece[k:]) for k in range(1, len(piece))]
            splits = [(a, b) for a, b in splits if a in vocab and b in vocab]
        else:
            walk = walk or _walk_lists(vocab)
            splits = _long_piece_splits(piece, *walk)
        merges.extend((-score, vocab[left], vocab[right], left, right) for left, right in splits)
    merges.sort(key=lambda m: m[:3])
    return [[m[3], m[4]] for m in merges]



def _walk_lists(vocab: dict[str, int]) -> tuple[list, list]:
    return [(p, p) for p in sorted(vocab)], sorted((p[::-1], p) for p in vocab)


def _long_piece_splits(piece: str, forward: list, backward: list) -> list[tuple[str, str]]:
    """(left, right) vocabulary pieces with left + right == piece, without slicing piece."""
    lefts = dict(_vocab_prefixes(piece, forward))                  # k -> the piece equal to piece[:k]
    splits = []
    for m, right in _vocab_prefixes(piece[::-1], backward):        # m -> the piece equal to piece[-m:]
        left = lefts.get(len(piece) - m)
        if left is not None:
            splits.append((left, right))
    return splits


def _vocab_prefixes(text: str, ordered: list[tuple[str, str]]):
    """(k, entry[1]) for each 1 <= k < len(text) with text[:k] == entry[0] for an entry of `ordered`
    (sorted by entry[0], all distinct): an implicit trie over the sorted keys.

    Invariant: at depth d, ordered[lo:hi] are the keys starting with text[:d]; the key equal to
    text[:d], if any, sorts first, the others are ordered by their character d.
    """
    lo, hi = 0, len(ordered)
    for d in range(len(text) - 1):          # NOTE: k < len(text): text itself is no half of a split
        if lo < hi and len(ordered[lo][0]) == d:
            lo += 1
        c = text[d]
        lo = bisect.bisect_left(ordered, c, lo, hi, key=lambda e: e[0][d])
        hi = bisect.bisect_right(ordered, c, lo, hi, key=lambda e: e[0][d])
        if lo == hi:
            return
        if len(ordered[lo][0]) == d + 1:
            yield d + 1, ordered[lo][1]


def llama2c_tokenizer_json(path: str | Path) -> dict:
    """tokenizer.bin -> a `tokenizers` tokenizer.json dict (BPE with byte fallback, LLaMA-style).

    Mirrors the LLaMA tokenizer.json that transformers' LlamaConverter writes: normalizer prepends
    "▁" and maps " " to "▁" (SentencePiece's add_dummy_prefix), no pre-tokenizer, BOS added by the
    post-processor, decoder maps "▁" back to " ", joins byte pieces, and strips the dummy prefix.
    """
    pieces, scores = read_llama2c_tokenizer(path)
    special = [{"id": i, "content": pieces[i], "single_word": False, "lstrip": False, "rstrip": False,
                "normalized": False, "special": True} for i in range(3)]
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": special,
        "normalizer": {"type": "Sequence", "normalizers": [
            {"type": "Prepend", "prepend": SPIECE_SPACE},
            {"type": "Replace", "pattern": {"String": " "}, "content": SPIECE_SPACE},
        ]},
        "pre_tokenizer": None,
        "post_processor": {
            "type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}},
                       {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"SpecialToken": {"id": "<s>", "type_id": 0}},
                     {"Sequence": {"id": "A", "type_id": 0}},
                     {"SpecialToken": {"id": "<s>", "type_id": 0}},
                     {"Sequence": {"id": "B", "type_id": 0}}],
            "special_tokens": {"<s>": {"id": "<s>", "ids": [1], "tokens": ["<s>"]}},
        },
        "decoder": {"type": "Sequence", "decoders": [
            {"type": "Replace", "pattern": {"String": SPIECE_SPACE}, "content": " "},
            {"type": "ByteFallback"},
            {"type": "Fuse"},
            {"type": "Strip", "content": " ", "start": 1, "stop": 0},
        ]},
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": "<unk>",
            "continuing_subword_prefix": None,
            "end_of_word_suffix": None,
            "fuse_unk": True,
            "byte_fallback": True,
            "ignore_merges": False,
            "vocab": {p: i for i, p in enumerate(pieces)},
            "merges": sentencepiece_merges(pieces, scores),
        },
    }


def tokenizer_config(seq_len: int) -> dict:
    return {
        "tokenizer_class": "LlamaTokenizerFast",
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "add_bos_token": True,
        "add_eos_token": False,
        "model_max_length": seq_len,
        "clean_up_tokenization_spaces": False,
    }


# ---------------------------------------------------------------------------------------------
# The conversion
# ---------------------------------------------------------------------------------------------

def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()


def convert_llama2c(checkpoint: str | Path, tokenizer: str | Path, out_dir: str | Path,
                    force: bool = False) -> Path:
    """Convert a llama2.c checkpoint + tokenizer.bin into a Hugging Face LlamaForCausalLM directory.

    Writes config.json, model.safetensors, tokenizer.json, tokenizer_config.json and
    generation_config.json. Everything is written into a temporary directory next to `out_dir` and
    renamed into place at the end, so a failure never leaves a half-written model behind.
    An existing `out_dir` is an error unless `force`, which replaces it.
    """
    from safetensors.numpy import save_file

    checkpoint, tokenizer, out_dir = Path(checkpoint), Path(tokenizer), Path(out_dir)
    if out_dir.exists() and not force:
        raise RawpagedError(f"output directory already exists: {out_dir} (use force to replace it)")
    # Read and validate everything before touching the file system.
    cfg, weights = read_llama2c_checkpoint(checkpoint)
    tok_json = llama2c_tokenizer_json(tokenizer)
    n_pieces = len(tok_json["model"]["vocab"])
    if n_pieces != cfg.vocab_size:
        raise RawpagedError(f"{tokenizer}: {n_pieces} pieces but {checkpoint} has "
                            f"vocab_size={cfg.vocab_size}")

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = _sibling(out_dir, "tmp")
    tmp.mkdir()   # NOTE: not tempfile.mkdtemp: its 0700 mode would stick to the final directory
    try:
        _write_json(tmp / "config.json", hf_config(cfg))
        save_file(hf_state_dict(cfg, weights), str(tmp / "model.safetensors"),
                  metadata={"format": "pt"})
        _write_json(tmp / "tokenizer.json", tok_json)
        _write_json(tmp / "tokenizer_config.json", tokenizer_config(cfg.seq_len))
        _write_json(tmp / "generation_config.json", {"bos_token_id": 1, "eos_token_id": 2})
        _move_into_place(tmp, out_dir, force)
    except BaseException as err:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(err, OSError):
            raise RawpagedError(f"cannot write {out_dir}: {err}") from err
        raise
    return out_dir


def _sibling(out_dir: Path, tag: str) -> Path:
    """A fresh hidden name next to out_dir (same file system, so renames are atomic)."""
    return out_dir.parent / f".{out_dir.name}.{tag}-{os.getpid()}-{secrets.token_hex(4)}"


def _move_into_place(tmp: Path, out_dir: Path, force: bool) -> None:
    if not out_dir.exists() and not out_dir.is_symlink():
        os.rename(tmp, out_dir)
        return
    if not force:   # NOTE: someone created it while we were converting
        raise RawpagedError(f"output directory already exists: {out_dir} (use force to replace it)")
    # NOTE: rename the old directory aside first, so out_dir is missing only between two renames.
    old = _sibling(out_dir, "old")
    os.rename(out_dir, old)
    os.rename(tmp, out_dir)
    _remove(old)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m rawpaged.convert.llama2c",
                                 description="Convert a llama2.c checkpoint to a Hugging Face directory.")
    ap.add_argument("checkpoint", help="llama2.c .bin checkpoint (legacy v0 or v1, float32)")
    ap.add_argument("tokenizer", help="llama2.c tokenizer.bin")
    ap.add_argument("out_dir", help="output directory (must not exist unless --force)")
    ap.add_argument("--force", action="store_true", help="replace out_dir if it exists")
    args = ap.parse_args(argv)
    try:
        out = convert_llama2c(args.checkpoint, args.tokenizer, args.out_dir, force=args.force)
    except RawpagedError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
