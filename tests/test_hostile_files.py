"""Hostile model files (issue 17): the converter, the loader and config.json hold up.

Each attack here is a small file that once cost gigabytes of memory or disk, a traceback, or a
peek at a file outside the model directory. The memory attacks run in a child process under an
address-space limit (and a file-size limit, so a regression cannot fill the disk): the child must
print one `rawpaged: error:` line and leave nothing behind.
"""
from __future__ import annotations

import json
import os
import pickle
import resource  # noqa: F401  (the child uses it; fail early where it does not exist)
import shutil
import struct
import subprocess
import sys
import zlib
from functools import lru_cache
from pathlib import Path

import numpy as np
import pytest
from safetensors import safe_open

from rawpaged.config import ModelConfig
from rawpaged.convert.hf import SafetensorsFile, convert_hf, parse_max_expansion
from rawpaged.convert.torch_pickle import TorchArchive, _PickleWriter, view_chunks
from rawpaged.errors import RawpagedError
from rawpaged.loader import iter_tensors

REPO_ROOT = Path(__file__).resolve().parent.parent
MEMORY_LIMIT = 768 << 20        # address space of the child: a conversion of a real small model fits
FILE_LIMIT = 64 << 20

CHILD = """
import resource, signal, sys
limit = int(sys.argv[1])
resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)       # a too-large write fails instead of killing
resource.setrlimit(resource.RLIMIT_FSIZE, (int(sys.argv[2]), int(sys.argv[2])))
from rawpaged.cli import main
sys.exit(main(sys.argv[3:]))
"""


def run_limited(*args, memory: int = MEMORY_LIMIT) -> subprocess.CompletedProcess:
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1", NUMBA_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])))
    return subprocess.run([sys.executable, "-c", CHILD, str(memory), str(FILE_LIMIT), *map(str, args)],
                          capture_output=True, text=True, timeout=300, env=env)


def assert_one_line_error(r: subprocess.CompletedProcess, *needles: str) -> str:
    assert r.returncode == 1, (r.returncode, r.stderr[-2000:])
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("rawpaged: error:"), r.stderr[-2000:]
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


# ---- zip archives with entries that inflate to gigabytes --------------------------------------------

@lru_cache(maxsize=1)
def _zero_deflate_block() -> tuple[bytes, bytes]:
    """Raw deflate of 1 MiB of zeros ending in a full flush (so copies of it concatenate), and the end."""
    c = zlib.compressobj(9, zlib.DEFLATED, -15)
    block = c.compress(bytes(1 << 20)) + c.flush(zlib.Z_FULL_FLUSH)
    return block, c.flush()


@lru_cache(maxsize=4)
def deflated_zeros(mib: int) -> tuple[bytes, int]:
    """(raw deflate stream, CRC-32) of `mib` MiB of zeros: ~1 KB per MiB."""
    block, end = _zero_deflate_block()
    crc, zeros = 0, bytes(1 << 20)
    for _ in range(mib):
        crc = zlib.crc32(zeros, crc)
    return block * mib + end, crc


def stored(name: str, data: bytes) -> tuple:
    return name, 0, data, zlib.crc32(data), len(data)


def zero_bomb(name: str, mib: int) -> tuple:
    raw, crc = deflated_zeros(mib)
    return name, 8, raw, crc, mib << 20


def write_zip(path: Path, entries: list[tuple]) -> Path:
    """A zip archive of (name, method, raw bytes, crc, uncompressed size) entries, written by hand
    (zipfile cannot take already-deflated data)."""
    body, central = bytearray(), bytearray()
    for name, method, raw, crc, size in entries:
        n, offset = name.encode(), len(body)
        body += struct.pack("<IHHHHHIIIHH", 0x04034B50, 20, 0, method, 0, 0x21, crc, len(raw), size, len(n), 0)
        body += n + raw
        central += struct.pack("<IHHHHHHIIIHHHHHII", 0x02014B50, 20, 20, 0, method, 0, 0x21, crc, len(raw), size,
                               len(n), 0, 0, 0, 0, 0, offset) + n
    end = struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, len(entries), len(entries), len(central), len(body), 0)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(bytes(body + central + end))
    return path


def state_dict_pickle(tensors: list[tuple]) -> bytes:
    """data.pkl of {name: tensor}; tensors are (name, storage key, storage numel, shape, stride[, offset])."""
    w = _PickleWriter()
    w.empty_ordered_dict()
    w.op(pickle.MARK)
    for name, key, numel, shape, stride, *offset in tensors:
        w.str_(name)
        w.tensor(key, "FloatStorage", numel, shape, stride=stride, offset=offset[0] if offset else 0)
    w.op(pickle.SETITEMS)
    w.op(pickle.STOP)
    return w.out.getvalue()


def bin_model_dir(root: Path, entries: list[tuple]) -> Path:
    src = root / "src"
    write_zip(src / "pytorch_model.bin", entries)
    (src / "config.json").write_text(json.dumps({"model_type": "llama"}))
    return src


BOMB_MIB = 1536      # 1.5 GiB inflated, from ~1.6 MB of deflate


def _bomb_entries(case: str) -> list[tuple]:
    numel = (BOMB_MIB << 20) // 4
    rows = 1 << 14
    # a transposed [rows, numel / rows] view: not contiguous, so the old reader inflated it whole
    transposed = state_dict_pickle([("w", "0", numel, (rows, numel // rows), (1, rows))])
    if case == "storage":
        return [stored("archive/data.pkl", transposed), stored("archive/byteorder", b"little"),
                zero_bomb("archive/data/0", BOMB_MIB)]
    small = state_dict_pickle([("w", "0", 4, (4,), (1,))])
    if case == "data.pkl":
        return [zero_bomb("archive/data.pkl", BOMB_MIB), stored("archive/data/0", bytes(16))]
    if case == "byteorder":
        return [stored("archive/data.pkl", small), zero_bomb("archive/byteorder", BOMB_MIB),
                stored("archive/data/0", bytes(16))]
    raise AssertionError(case)


@pytest.mark.parametrize("case", ["storage", "data.pkl", "byteorder"])
def test_zip_bomb_is_refused_before_inflating(tmp_path, case):
    src = bin_model_dir(tmp_path, _bomb_entries(case))
    assert (src / "pytorch_model.bin").stat().st_size < 2 << 20
    r = run_limited("convert", "hf", src, "-o", tmp_path / "out", "--quiet")
    assert_one_line_error(r, "pytorch_model.bin", "declare", "uncompressed", "--max-expansion")
    assert sorted(os.listdir(tmp_path)) == ["src"]


@pytest.mark.parametrize("case", ["memo", "bytes8"])
def test_pickle_that_makes_the_unpickler_allocate_is_refused(tmp_path, case):
    """18 bytes of pickle: the C unpickler sizes its memo by the largest PUT index (3.2 GB here), and
    allocates a BINBYTES8 of its declared length before reading it."""
    if case == "memo":
        pkl = pickle.PROTO + b"\x02" + pickle.EMPTY_DICT + pickle.LONG_BINPUT + struct.pack("<I", 200_000_000) \
            + pickle.STOP
        needle = "memo index 200000000"
    else:
        pkl = pickle.PROTO + b"\x04" + pickle.BINBYTES8 + struct.pack("<Q", 3 << 30) + b"x"
        needle = "malformed pickle"
    src = bin_model_dir(tmp_path, [stored("archive/data.pkl", pkl), stored("archive/byteorder", b"little")])
    r = run_limited("convert", "hf", src, "-o", tmp_path / "out", "--quiet")
    msg = assert_one_line_error(r, needle, "data.pkl")
    assert "MemoryError" not in msg
    assert sorted(os.listdir(tmp_path)) == ["src"]


def test_expanded_views_are_refused_before_writing(tmp_path):
    """Three stride-0 views of three floats: ~1 KB of input describing 3 GiB of output."""
    side = 1 << 14                                   # each view: 2^28 floats = 1 GiB
    pkl = state_dict_pickle([(f"w{i}", "0", 3, (side, side), (0, 0), i) for i in range(3)])
    src = bin_model_dir(tmp_path, [stored("archive/data.pkl", pkl), stored("archive/byteorder", b"little"),
                                   stored("archive/data/0", np.arange(3, dtype=np.float32).tobytes())])
    assert (src / "pytorch_model.bin").stat().st_size < 2000
    r = run_limited("convert", "hf", src, "-o", tmp_path / "out", "--quiet")
    assert_one_line_error(r, f"{3 << 30} bytes", "times the", "--max-expansion")
    assert sorted(os.listdir(tmp_path)) == ["src"]


def test_max_expansion_lets_a_wanted_expansion_through(tmp_path, capsys):
    """A modest expanded view (64 KiB from ~1 KB) is refused by default, written with the flag, and
    the values are the view's (rows of the stored vector repeated)."""
    from rawpaged.cli import main
    row = np.arange(64, dtype=np.float32)
    pkl = state_dict_pickle([("w", "0", 64, (256, 64), (0, 1))])
    src = bin_model_dir(tmp_path, [stored("archive/data.pkl", pkl), stored("archive/byteorder", b"little"),
                                   stored("archive/data/0", row.tobytes())])
    assert main(["convert", "hf", str(src), "-o", str(tmp_path / "out"), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "limit: 4x" in err and not (tmp_path / "out").exists()
    assert main(["convert", "hf", str(src), "-o", str(tmp_path / "out"), "--quiet", "--max-expansion", "1000"]) == 0
    got = SafetensorsFile(tmp_path / "out" / "model.safetensors").get("w")
    assert np.array_equal(got, np.broadcast_to(row, (256, 64)))


def test_entry_bounds_hold_even_with_a_raised_expansion_limit(tmp_path):
    """With --max-expansion out of the way, an entry is still refused by its own declared size."""
    small = state_dict_pickle([("w", "0", 4, (4,), (1,))])
    path = write_zip(tmp_path / "x.bin", [stored("archive/data.pkl", small), zero_bomb("archive/byteorder", 1),
                                          stored("archive/data/0", bytes(16))])
    with pytest.raises(RawpagedError, match=r"'archive/byteorder' declares 1048576 bytes, more than the 16"):
        TorchArchive(path, max_expansion=1e6)
    with pytest.raises(RawpagedError, match="zip bomb"):
        TorchArchive(path)


def test_view_chunks_copy_at_most_a_chunk():
    rng = np.random.default_rng(0)
    base = rng.standard_normal(4096).astype(np.float32)
    for _ in range(300):
        ndim = int(rng.integers(0, 4))
        shape = tuple(int(n) for n in rng.integers(0, 9, ndim))
        strides = tuple(int(s) for s in rng.integers(0, 5, ndim))   # zero strides included
        view = np.lib.stride_tricks.as_strided(base, shape, [s * 4 for s in strides], writeable=False)
        step = int(rng.integers(1, 40))
        chunks = list(view_chunks(view, step))
        assert all(c.ndim == 1 and c.size <= step and c.flags.c_contiguous for c in chunks)
        flat = np.concatenate(chunks) if chunks else np.empty(0, np.float32)
        assert np.array_equal(flat, np.ascontiguousarray(view).reshape(-1))


def test_bad_max_expansion_values():
    assert parse_max_expansion(None) == 4.0 and parse_max_expansion("10") == 10.0
    for bad in (0, -1, "x", float("inf"), float("nan"), True):
        with pytest.raises(RawpagedError, match="bad max expansion"):
            parse_max_expansion(bad)


# ---- paths that leave the model directory --------------------------------------------------------------

SECRET = b"root:x:0:0:SECRET-CONTENT:/root:/bin/bash\n" * 4


@pytest.fixture
def secret(tmp_path) -> Path:
    path = tmp_path / "outside" / "passwd"
    path.parent.mkdir()
    path.write_bytes(SECRET)
    return path


def assert_no_content(msg: str) -> None:
    assert "SECRET" not in msg and "root:x" not in msg
    assert str(int.from_bytes(SECRET[:8], "little")) not in msg      # the first 8 bytes, read as a length


@pytest.fixture
def model_copy(stories260k_dir, tmp_path) -> Path:
    dst = tmp_path / "model"
    shutil.copytree(stories260k_dir, dst)
    return dst


@pytest.mark.parametrize("name", ["tokenizer.json", "model.safetensors", "config.json"])
def test_converter_refuses_a_symlink_out_of_the_source(model_copy, secret, tmp_path, name):
    (model_copy / name).unlink()
    (model_copy / name).symlink_to(secret)
    before = sorted(os.listdir(tmp_path))
    with pytest.raises(RawpagedError) as info:
        convert_hf(model_copy, tmp_path / "out", progress=False)
    msg = str(info.value)
    assert "\n" not in msg and f"'{name}'" in msg and "outside the model directory" in msg
    assert_no_content(msg)
    assert sorted(os.listdir(tmp_path)) == before


@pytest.mark.parametrize("where", ["absolute", "dotdot"])
def test_loader_refuses_index_entries_out_of_the_model_dir(model_copy, secret, where):
    shard = str(secret) if where == "absolute" else "../outside/passwd"
    names = list(SafetensorsFile(model_copy / "model.safetensors").keys())
    index = {"metadata": {}, "weight_map": {**{n: "model.safetensors" for n in names[1:]}, names[0]: shard}}
    (model_copy / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(RawpagedError) as info:
        list(iter_tensors(model_copy))
    msg = str(info.value)
    assert "\n" not in msg and repr(shard) in msg and ("absolute" in msg or "outside the model directory" in msg)
    assert_no_content(msg)


@pytest.mark.parametrize("name", ["model.safetensors", "config.json", "tokenizer.json"])
def test_engine_refuses_a_symlink_out_of_the_model_dir(model_copy, secret, name):
    from rawpaged import LLM
    (model_copy / name).unlink()
    (model_copy / name).symlink_to(secret)
    with pytest.raises(RawpagedError) as info:
        LLM(model_copy, device="cpu", kv_cache_memory=1 << 24, swap_space=0)
    msg = str(info.value)
    assert "\n" not in msg and f"'{name}'" in msg and "outside the model directory" in msg
    assert_no_content(msg)


def test_a_header_that_is_not_safetensors_is_not_quoted(tmp_path):
    path = tmp_path / "model.safetensors"
    path.write_bytes(SECRET)
    with pytest.raises(RawpagedError) as info:
        SafetensorsFile(path)
    assert_no_content(str(info.value))
    bad_json = b'{"a": {"dtype": "F32", "shape": "SECRET-CONTENT", "data_offsets": [0, 0]}}'
    path.write_bytes(len(bad_json).to_bytes(8, "little") + bad_json)
    with pytest.raises(RawpagedError) as info:
        SafetensorsFile(path)
    assert_no_content(str(info.value))


def test_symlinks_inside_the_dir_and_the_hub_cache_layout_are_fine(stories260k_dir, tmp_path):
    """huggingface_hub's snapshot dirs link every file to ../../blobs/<hash>: accepted (only there)."""
    repo = tmp_path / "models--rawpaged--stories260K"
    snap = repo / "snapshots" / "0123abc"
    (repo / "blobs").mkdir(parents=True)
    snap.mkdir(parents=True)
    for f in stories260k_dir.iterdir():
        shutil.copyfile(f, repo / "blobs" / f"blob-{f.name}")
        (snap / f.name).symlink_to(Path("..") / ".." / "blobs" / f"blob-{f.name}")
    want = dict(iter_tensors(stories260k_dir))
    got = dict(iter_tensors(snap))
    assert want.keys() == got.keys() and all(np.array_equal(want[k], got[k]) for k in want)
    assert ModelConfig.from_dir(snap).vocab_size == 512
    out = convert_hf(snap, tmp_path / "out", progress=False)
    assert (out / "tokenizer.json").read_bytes() == (stories260k_dir / "tokenizer.json").read_bytes()
    # a link inside a plain model dir is fine; the same link name reaching a sibling's file is not
    inner = tmp_path / "inner"
    shutil.copytree(stories260k_dir, inner / "real")
    (inner / "model.safetensors").symlink_to(Path("real") / "model.safetensors")
    assert len(list(iter_tensors(inner))) == len(want)
    sibling = tmp_path / "sibling-link"
    sibling.mkdir()
    (sibling / "model.safetensors").symlink_to(stories260k_dir / "model.safetensors")
    with pytest.raises(RawpagedError, match="outside the model directory"):
        list(iter_tensors(sibling))


# ---- safetensors headers whose tensors share bytes -----------------------------------------------------

def _safetensors(path: Path, header: bytes | dict, data: bytes) -> Path:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(len(raw).to_bytes(8, "little") + raw + data)
    return path


def _t(begin: int, end: int) -> dict:
    return {"dtype": "F32", "shape": [(end - begin) // 4], "data_offsets": [begin, end]}


BAD_LAYOUTS = {
    # name: (header, data bytes, what the one-line error says, does the official parser refuse it too)
    "overlap": ({"a": _t(0, 8), "b": _t(4, 12)}, 12, "tensors 'a' and 'b' overlap", True),
    "same range": ({"a": _t(0, 8), "b": _t(0, 8)}, 8, "tensors 'a' and 'b' overlap", True),
    "duplicate name": (b'{"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}, '
                       b'"a": {"dtype": "F32", "shape": [2], "data_offsets": [8, 16]}}', 16, "'a' appears twice", True),
    "identical duplicate": (b'{"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}, '
                            b'"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}', 8, "'a' appears twice",
                            False),
    "gap": ({"a": _t(0, 4), "b": _t(8, 12)}, 12, "4 bytes before tensor 'b' belong to no tensor", True),
    "trailing bytes": ({"a": _t(0, 8)}, 12, "its last 4 bytes belong to no tensor", True),
}


@pytest.mark.parametrize("case", list(BAD_LAYOUTS))
def test_converter_and_loader_refuse_shared_bytes_alike(tmp_path, case):
    header, size, needle, official_refuses = BAD_LAYOUTS[case]
    src = tmp_path / "src"
    path = _safetensors(src / "model.safetensors", header, np.arange(size // 4, dtype=np.float32).tobytes())
    (src / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(RawpagedError) as converting:
        convert_hf(src, tmp_path / "out", progress=False)
    with pytest.raises(RawpagedError) as loading:
        list(iter_tensors(src))
    assert str(converting.value) == str(loading.value)
    assert needle in str(converting.value) and "\n" not in str(converting.value)
    assert sorted(os.listdir(tmp_path)) == ["src"]
    # the official parser agrees, except that it lets an exact duplicate through (the last copy wins)
    try:
        with safe_open(str(path), framework="numpy") as f:
            list(f.keys())
        refused = False
    except Exception:
        refused = True
    assert refused == official_refuses


def test_too_many_dimensions_are_refused(tmp_path):
    """numpy stops at 64 dimensions (a traceback where a reader builds the array): 32 at most."""
    shape = [1] * 40
    path = _safetensors(tmp_path / "a" / "model.safetensors",
                        {"w": {"dtype": "BF16", "shape": shape, "data_offsets": [0, 2]}}, bytes(2))
    with pytest.raises(RawpagedError, match="corrupt header entry for tensor 'w'"):
        SafetensorsFile(path)
    pkl = state_dict_pickle([("w", "0", 1, tuple(shape), tuple(shape))])
    src = bin_model_dir(tmp_path / "b", [stored("archive/data.pkl", pkl), stored("archive/data/0", bytes(4))])
    with pytest.raises(RawpagedError, match="malformed tensor record"):
        convert_hf(src, tmp_path / "b" / "out", progress=False)


# ---- config.json ------------------------------------------------------------------------------------

def _edit_config(model_dir: Path, **changes) -> None:
    path = model_dir / "config.json"
    cfg = json.loads(path.read_text())
    for key, value in changes.items():
        if value is _DELETE:
            cfg.pop(key, None)
        else:
            cfg[key] = value
    path.write_text(json.dumps(cfg))


_DELETE = object()

CONFIG_CASES = [
    # (changes, words the one-line error must contain)
    ({"max_position_embeddings": 300_000_000}, ["max_position_embeddings=300000000", "RoPE table"]),
    ({"head_dim": 1e9}, ["head_dim must be a positive integer", "1000000000.0 (a number)"]),
    ({"head_dim": 10**9}, ["imply at least", "memory"]),
    ({"vocab_size": "512"}, ["vocab_size must be a positive integer", '"512" (a string)']),
    ({"hidden_size": 64.0}, ["hidden_size must be a positive integer", "(a number)"]),
    ({"num_hidden_layers": 0}, ["num_hidden_layers must be a positive integer"]),
    ({"num_attention_heads": -8}, ["num_attention_heads must be a positive integer"]),
    ({"num_key_value_heads": True}, ["num_key_value_heads must be a positive integer", "(a boolean)"]),
    ({"num_attention_heads": 6, "num_key_value_heads": 3}, ["hidden_size=64 is not a multiple of num_attention_heads=6"]),
    ({"num_key_value_heads": 3}, ["num_attention_heads=8 is not a multiple of num_key_value_heads=3"]),
    ({"intermediate_size": _DELETE}, ["lacks required field 'intermediate_size'"]),
    ({"vocab_size": 51200}, ["imply at least", "weight files hold only"]),
    ({"tie_word_embeddings": "false"}, ["tie_word_embeddings must be true or false"]),
    ({"rope_scaling": [1, 2]}, ["rope_scaling must be a JSON object"]),
    ({"rope_parameters": {"rope_theta": "1e4"}}, ["rope_parameters.rope_theta must be a finite number > 0"]),
    ({"rope_theta": 0}, ["rope_theta must be a finite number > 0"]),
    ({"rms_norm_eps": -1}, ["rms_norm_eps must be a finite number >= 0"]),
    ({"partial_rotary_factor": 2}, ["partial_rotary_factor must be a finite number > 0 and <= 1"]),
    ({"partial_rotary_factor": 0.4}, ["gives 3 rotary dimensions: must be even"]),
    ({"eos_token_id": "2"}, ["eos_token_id must be a token id"]),
    ({"architectures": "LlamaForCausalLM"}, ["architectures must be a list of names"]),
]


@pytest.mark.parametrize("changes,needles", CONFIG_CASES, ids=[str(c[0])[:60] for c in CONFIG_CASES])
def test_bad_config_is_refused_before_anything_is_built(model_copy, changes, needles):
    _edit_config(model_copy, **changes)
    with pytest.raises(RawpagedError) as info:
        ModelConfig.from_dir(model_copy)
    msg = str(info.value)
    assert "\n" not in msg and "config.json" in msg
    for needle in needles:
        assert needle in msg, msg


def test_config_json_that_is_not_an_object(model_copy):
    (model_copy / "config.json").write_text("[1, 2]")
    with pytest.raises(RawpagedError, match="not a JSON object"):
        ModelConfig.from_dir(model_copy)
    (model_copy / "config.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(RawpagedError, match="not valid JSON"):
        ModelConfig.from_dir(model_copy)


def test_weights_beyond_the_machine_are_refused(model_copy, monkeypatch):
    import rawpaged.config
    cfg = ModelConfig.from_dir(model_copy)                       # fine on this machine
    params = rawpaged.config.implied_parameters(cfg)
    assert 200_000 < params <= (model_copy / "model.safetensors").stat().st_size
    monkeypatch.setattr(rawpaged.config, "physical_memory", lambda: 2 * params - 1)
    with pytest.raises(RawpagedError, match=f"imply at least {params} parameters.*more than this machine"):
        ModelConfig.from_dir(model_copy)


@pytest.mark.parametrize("changes,needle", [({"max_position_embeddings": 300_000_000}, "RoPE table"),
                                            ({"head_dim": 1e9}, "head_dim must be a positive integer")])
def test_config_bombs_under_a_memory_limit(model_copy, changes, needle):
    """Through the CLI, as a user would run it: one line, no traceback, no 2.5 GB RoPE table."""
    _edit_config(model_copy, **changes)
    r = run_limited("generate", "--model", model_copy, "--device", "cpu", "--kv-cache-memory", 1 << 24,
                    "--swap-space", 0, "--max-tokens", 2, "hi", memory=1 << 30)
    assert_one_line_error(r, needle, "config.json")


def test_tokenizer_alone_refuses_a_file_linked_out_of_the_model(tmp_path):
    """Tokenizer.from_dir (used without ModelConfig) checks containment too."""
    from rawpaged.tokenizer import Tokenizer
    outside = tmp_path / "outside.json"
    outside.write_text("{}")
    model = tmp_path / "m"
    model.mkdir()
    (model / "tokenizer.json").symlink_to(outside)
    with pytest.raises(RawpagedError, match="outside the model directory"):
        Tokenizer.from_dir(model)
