"""SentencePiece tokenizer.model files, read without the `protobuf` or `sentencepiece` packages.

The file is a protobuf ModelProto (sentencepiece_model.proto). A BPE tokenizer needs six of its fields:
  ModelProto     { repeated SentencePiece pieces = 1; TrainerSpec trainer_spec = 2;
                   NormalizerSpec normalizer_spec = 3; }
  SentencePiece  { string piece = 1; float score = 2; Type type = 3 [default NORMAL]; }
  TrainerSpec    { ModelType model_type = 3 [default UNIGRAM]; bool byte_fallback = 35;
                   string unk_piece = 45 [default "<unk>"]; }
  NormalizerSpec { bool add_dummy_prefix = 3 [default true]; }
Every other field is skipped by its wire type.

NOTE: why a reader of our own: the protobuf wire format is four encodings (varint, 4 bytes, 8 bytes,
length-prefixed), so this is ~60 lines; `protobuf` is a large dependency whose generated code is
coupled to its version, and `sentencepiece` is a C++ extension whose tokenizer we would not use
(`tokenizers` runs the BPE).
"""
from __future__ import annotations

import struct
from dataclasses import dataclass, field
from pathlib import Path

from rawpaged.errors import RawpagedError

SPM_NORMAL, SPM_UNKNOWN, SPM_CONTROL, SPM_USER_DEFINED, SPM_UNUSED, SPM_BYTE = 1, 2, 3, 4, 5, 6
SPM_UNIGRAM, SPM_BPE, SPM_WORD, SPM_CHAR = 1, 2, 3, 4
_WIRE_VARINT, _WIRE_I64, _WIRE_LEN, _WIRE_I32 = 0, 1, 2, 5


class _ProtoError(ValueError):
    pass


@dataclass
class SentencePieceModel:
    pieces: list[str] = field(default_factory=list)
    scores: list[float] = field(default_factory=list)
    types: list[int] = field(default_factory=list)
    model_type: int = SPM_UNIGRAM
    byte_fallback: bool = False
    unk_piece: str = "<unk>"
    add_dummy_prefix: bool = True


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(buf):
            raise _ProtoError(f"truncated varint at byte {pos}")
        b = buf[pos]
        value |= (b & 0x7F) << shift
        pos += 1
        if b < 0x80:
            return value, pos
        shift += 7
        if shift > 63:
            raise _ProtoError(f"varint longer than 10 bytes at byte {pos}")


def _proto_fields(buf: bytes):
    """Yield (field number, wire type, value) of one message: an int, or bytes for the other wire types."""
    pos = 0
    while pos < len(buf):
        key, pos = _varint(buf, pos)
        num, wire = key >> 3, key & 7
        if wire == _WIRE_VARINT:
            value, pos = _varint(buf, pos)
        elif wire in (_WIRE_LEN, _WIRE_I64, _WIRE_I32):
            if wire == _WIRE_LEN:
                size, pos = _varint(buf, pos)
            else:
                size = 8 if wire == _WIRE_I64 else 4
            if pos + size > len(buf):
                raise _ProtoError(f"field {num} runs past the end ({pos + size} > {len(buf)} bytes)")
            value, pos = bytes(buf[pos:pos + size]), pos + size
        else:
            raise _ProtoError(f"field {num} has wire type {wire}, which SentencePiece does not use")
        if num == 0:
            raise _ProtoError("field number 0")
        yield num, wire, value


def _expect(num: int, wire: int, want: int, what: str) -> None:
    if wire != want:
        raise _ProtoError(f"{what} (field {num}) has wire type {wire}, expected {want}")


def _text(value: bytes, what: str) -> str:
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError:
        raise _ProtoError(f"{what} is not UTF-8") from None


def _parse_model_proto(buf: bytes) -> SentencePieceModel:
    m = SentencePieceModel()
    for num, wire, value in _proto_fields(buf):
        if num == 1:
            _expect(num, wire, _WIRE_LEN, "piece")
            piece, score, ptype = None, 0.0, SPM_NORMAL
            for n, w, v in _proto_fields(value):
                if n == 1:
                    _expect(n, w, _WIRE_LEN, "piece text")
                    piece = _text(v, f"piece {len(m.pieces)}")
                elif n == 2:
                    _expect(n, w, _WIRE_I32, "piece score")
                    score = struct.unpack("<f", v)[0]
                elif n == 3:
                    _expect(n, w, _WIRE_VARINT, "piece type")
                    ptype = v
            if not piece:
                raise _ProtoError(f"piece {len(m.pieces)} is empty")
            m.pieces.append(piece)
            m.scores.append(score)
            m.types.append(ptype)
        elif num == 2:
            _expect(num, wire, _WIRE_LEN, "trainer_spec")
            for n, w, v in _proto_fields(value):
                if n == 3:
                    _expect(n, w, _WIRE_VARINT, "model_type")
                    m.model_type = v
                elif n == 35:
                    _expect(n, w, _WIRE_VARINT, "byte_fallback")
                    m.byte_fallback = bool(v)
                elif n == 45:
                    _expect(n, w, _WIRE_LEN, "unk_piece")
                    m.unk_piece = _text(v, "unk_piece")
        elif num == 3:
            _expect(num, wire, _WIRE_LEN, "normalizer_spec")
            for n, w, v in _proto_fields(value):
                if n == 3:
                    _expect(n, w, _WIRE_VARINT, "add_dummy_prefix")
                    m.add_dummy_prefix = bool(v)
    return m


def read_sentencepiece_model(path: str | Path) -> SentencePieceModel:
    """Read a SentencePiece tokenizer.model: pieces, scores and types (id = index), model type, flags."""
    path = Path(path)
    try:
        buf = path.read_bytes()
    except OSError as err:
        raise RawpagedError(f"{path}: cannot read: {err.strerror or err}") from None
    try:
        m = _parse_model_proto(buf)
    except _ProtoError as err:
        raise RawpagedError(f"{path}: not a SentencePiece model: {err}") from None
    if not m.pieces:
        raise RawpagedError(f"{path}: not a SentencePiece model: no pieces")
    if len(set(m.pieces)) != len(m.pieces):
        raise RawpagedError(f"{path}: duplicate pieces in the SentencePiece model")
    return m
