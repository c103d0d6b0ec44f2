"""`convert_hf`: PyTorch .bin / safetensors checkpoints -> rawpaged-ready safetensors, without torch.

The .bin fixtures under tests/fixtures/bin were written by torch itself (tools/make_bin_fixtures.py)
from the safetensors fixtures that transformers wrote; the references below are therefore torch's and
transformers' values, never ours.
"""
from __future__ import annotations

import builtins
import json
import os
import pickle
import shutil
import subprocess
import zipfile
from pathlib import Path

import numpy as np
import pytest

from rawpaged.convert.hf import (SafetensorsFile, bf16_to_float32, convert_hf, main, parse_size,
                                 read_safetensors_bf16_aware)
from rawpaged.convert.progress import Progress
from rawpaged.convert.torch_pickle import TorchArchive, _PickleWriter, write_torch_zip
from rawpaged.errors import RawpagedError

FIXTURES = Path(__file__).resolve().parent / "fixtures"
BIN = FIXTURES / "bin"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "generation_config.json")


# ---- helpers ------------------------------------------------------------------------------------

def need(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"fixture {path} is missing (run tools/make_bin_fixtures.py / tools/make_golden.py)")
    return path


def bin_source(tmp_path: Path, name: str) -> Path:
    """A model dir: the .bin fixture plus the tokenizer files of the matching safetensors fixture."""
    src = tmp_path / "src"
    shutil.copytree(need(BIN / name), src)
    for f in TOKENIZER_FILES:
        if (FIXTURES / name / f).is_file():
            shutil.copyfile(FIXTURES / name / f, src / f)
    return src


def read_dir(model_dir: Path, raw: bool = False) -> dict[str, np.ndarray]:
    """Every tensor of a safetensors model dir (raw: BF16 as uint16 bits)."""
    index = model_dir / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() \
        else ["model.safetensors"]
    out = {}
    for f in files:
        sf = SafetensorsFile(model_dir / f)
        out.update({k: sf.get_raw(k) if raw else sf.get(k) for k in sf.keys()})
    return out


def same_values(got: np.ndarray, want: np.ndarray) -> bool:
    """Same dtype, shape and bits, except that any NaN matches any NaN."""
    if got.dtype != want.dtype or got.shape != want.shape:
        return False
    g, w = got, want
    if got.dtype == np.uint16:  # bf16 bit patterns
        g, w = bf16_to_float32(got), bf16_to_float32(want)
    if g.dtype.kind == "f":
        nan = np.isnan(g)
        if not np.array_equal(nan, np.isnan(w)):
            return False
        g, w = g[~nan], w[~nan]
        g = g.view(np.dtype(f"u{g.dtype.itemsize}"))
        w = w.view(np.dtype(f"u{w.dtype.itemsize}"))
    return np.array_equal(g, w)


def refuses(src: Path, dst: Path, match: str, **kw) -> str:
    """convert_hf must raise a one-line RawpagedError and leave nothing next to dst."""
    before = sorted(os.listdir(dst.parent))
    with pytest.raises(RawpagedError, match=match) as info:
        convert_hf(src, dst, progress=False, **kw)
    msg = str(info.value)
    assert "\n" not in msg
    assert sorted(os.listdir(dst.parent)) == before, "a failed conversion left files behind"
    return msg


def torch_zip(path: Path, pkl: bytes, storages: dict[str, bytes] | None = None, byteorder: str = "little") -> Path:
    """A torch.save-layout archive with the given data.pkl (for hostile or broken pickles)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("archive/data.pkl", pkl)
        zf.writestr("archive/byteorder", byteorder)
        for key, data in (storages or {}).items():
            zf.writestr(f"archive/data/{key}", data)
        zf.writestr("archive/version", "3\n")
    return path


def rewrite_entry(path: Path, suffix: str, fn) -> None:
    """Rewrite one zip entry (the first whose name ends with suffix) through fn(bytes) -> bytes."""
    with zipfile.ZipFile(path) as zf:
        entries = [(i.filename, zf.read(i)) for i in zf.infolist()]
    with zipfile.ZipFile(path, "w") as zf:
        done = False
        for name, data in entries:
            if not done and name.endswith(suffix):
                data, done = fn(data), True
            zf.writestr(name, data)
    assert done


def model_dir_with(tmp_path: Path, weights: Path) -> Path:
    src = tmp_path / "src"
    src.mkdir(exist_ok=True)
    (src / "config.json").write_text(json.dumps({"model_type": "llama"}))
    if weights.parent != src:
        shutil.move(weights, src / "pytorch_model.bin")
    return src


# ---- exact conversion of real torch.save output ---------------------------------------------------

@pytest.mark.parametrize("name", ["opt-preln", "llama-gqa"])
def test_bin_fixture_converts_to_the_safetensors_fixture_exactly(tmp_path, name):
    src = bin_source(tmp_path, name)
    out = convert_hf(src, tmp_path / "out", progress=False)
    got, want = read_dir(out), read_dir(need(FIXTURES / name))
    assert sorted(got) == sorted(want)        # OPT `decoder.*` renamed, inv_freq buffers dropped
    for k in want:
        assert got[k].dtype == want[k].dtype == np.float32 and np.array_equal(got[k], want[k]), k
    assert json.loads((out / "config.json").read_text()) == json.loads((src / "config.json").read_text())
    for f in TOKENIZER_FILES:
        assert (out / f).read_bytes() == (FIXTURES / name / f).read_bytes()


def test_sharded_bin_is_resharded_with_an_index(tmp_path):
    src = bin_source(tmp_path, "llama-gqa")
    out = convert_hf(src, tmp_path / "out", max_shard_size="60KB", progress=False)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    n = len(shards)
    assert n > 2 and shards == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    assert sorted(p.name for p in out.glob("*.safetensors")) == shards
    total = 0
    for s in shards:
        sf = SafetensorsFile(out / s)
        sizes = [e.nbytes for e in sf.entries.values()]
        assert sum(sizes) <= 60_000 or len(sizes) == 1
        assert all(index["weight_map"][k] == s for k in sf.keys())
        total += sum(sizes)
    assert index["metadata"]["total_size"] == total
    want = read_dir(FIXTURES / "llama-gqa")
    got = read_dir(out)
    assert sorted(got) == sorted(want) and all(np.array_equal(got[k], want[k]) for k in want)


def test_views_dtypes_and_aliases_are_read_as_torch_wrote_them(tmp_path):
    ref = np.load(need(BIN / "views" / "reference.npz"))
    out = convert_hf(bin_source(tmp_path, "views"), tmp_path / "out", progress=False)
    got = read_dir(out, raw=True)
    names = [k for k in ref.files if "|" not in k]
    # the tied lm_head (same storage as the embedding) is written once, under the embedding's name
    expected = [k for k in names if k != "lm_head.weight" and not k.endswith("inv_freq")]
    assert sorted(got) == sorted(expected)
    for k in expected:
        assert same_values(got[k], ref[k]), k
    header = SafetensorsFile(out / "model.safetensors")
    assert header.entries["bf16"].dtype == "BF16" and header.entries["f64"].dtype == "F64"
    assert header.entries["bool"].dtype == "BOOL" and header.entries["scalar"].shape == ()


@pytest.mark.parametrize("dtype,code", [("bfloat16", "BF16"), ("float16", "F16"), ("float32", "F32")])
def test_dtype_conversion_matches_torch_casts(tmp_path, dtype, code):
    ref = np.load(need(BIN / "views" / "reference.npz"))
    out = convert_hf(bin_source(tmp_path, "views"), tmp_path / "out", dtype=dtype, progress=False)
    got = read_dir(out, raw=True)
    for k in got:
        if k + "|" + code in ref.files:    # floating tensors: torch's own `.to(dtype)`
            assert same_values(got[k], ref[k + "|" + code]), (k, code)
        else:                               # integer and bool tensors keep their dtype
            assert same_values(got[k], ref[k]), k
    config = json.loads((out / "config.json").read_text())
    assert config["torch_dtype"] == dtype


def test_safetensors_source_dtype_change_and_round_trip(tmp_path):
    fixture = need(FIXTURES / "llama-gqa")
    want = read_dir(fixture)
    bf16 = convert_hf(fixture, tmp_path / "bf16", dtype="bfloat16", max_shard_size="100KB", progress=False)
    assert json.loads((bf16 / "config.json").read_text())["dtype"] == "bfloat16"
    raw = read_dir(bf16, raw=True)
    wide = read_dir(bf16)
    for k, x in want.items():
        assert raw[k].dtype == np.uint16 and wide[k].dtype == np.float32
        # round to nearest: the error is at most half a bf16 ulp, 2^-8 relative
        np.testing.assert_allclose(wide[k], x, rtol=2.0**-8, atol=0)
    # bf16 -> float32 is exact, and reading BF16 through the public helper gives the same
    back = convert_hf(bf16, tmp_path / "back", dtype="float32", progress=False)
    again = read_dir(back)
    assert all(np.array_equal(again[k], wide[k]) for k in want)
    one_file = read_safetensors_bf16_aware(sorted(bf16.glob("model-*.safetensors"))[0])
    assert all(np.array_equal(v, wide[k]) for k, v in one_file.items())
    f16 = read_dir(convert_hf(fixture, tmp_path / "f16", dtype="float16", progress=False))
    for k, x in want.items():
        assert f16[k].dtype == np.float16
        np.testing.assert_allclose(f16[k].astype(np.float32), x, rtol=2.0**-11, atol=2.0**-25)


def test_bf16_output_is_a_standard_safetensors_file(tmp_path):
    from safetensors import safe_open
    out = convert_hf(need(FIXTURES / "opt-preln"), tmp_path / "out", dtype="bfloat16", progress=False)
    with safe_open(str(out / "model.safetensors"), framework="numpy") as f:
        k = next(iter(f.keys()))
        assert f.get_slice(k).get_dtype() == "BF16"


# ---- logits through the engine's model code ---------------------------------------------------------

def prompt_logits(model_dir: Path, prompt: list[int]) -> np.ndarray:
    from model_impl import get_model_class
    from rawpaged.backend import cpu
    from rawpaged.worker.cache_engine import CacheEngine
    from rawpaged.config import ModelConfig
    from rawpaged.loader import iter_tensors
    from rawpaged.sequence import ScheduledSeq
    from rawpaged.worker.model_runner import prepare_inputs
    from rawpaged.sequence import Sequence
    cfg = ModelConfig.from_dir(model_dir)
    model = get_model_class(cfg.family)(cfg, cpu, np.float32)
    model.load_weights(iter_tensors(model_dir))
    cache = CacheEngine(cfg, cpu, np.float32, 16, 8, 0)
    seq = Sequence(0, list(prompt))
    inp = prepare_inputs([ScheduledSeq(seq, len(prompt), list(range(8)), sample=True)], 16)
    return model.compute_logits(model.forward(inp.input_ids, inp.positions, cache.device_cache, inp.meta))


@pytest.mark.parametrize("name", ["opt-preln", "llama-gqa"])
def test_converted_bin_gives_the_same_logits_as_the_safetensors_fixture(tmp_path, name):
    ref = np.load(need(FIXTURES / name / "reference.npz"))
    prompt = ref["prompt_ids_flat"][ref["prompt_offsets"][0]:ref["prompt_offsets"][1]].tolist()
    out = convert_hf(bin_source(tmp_path, name), tmp_path / "out", progress=False)
    got, want = prompt_logits(out, prompt), prompt_logits(FIXTURES / name, prompt)
    assert got.shape == (len(prompt), ref["prompt_logits"].shape[1])
    assert np.array_equal(got, want)


# ---- hostile pickles: refused, named, and nothing runs ----------------------------------------------

class _Reduce:
    """Pickles as `func(*args)`: what a malicious checkpoint would make torch.load run."""

    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


def _hostile_pickles(marker: Path):
    touch = f"touch {marker}"
    yield "os.system", pickle.dumps(_Reduce(os.system, touch), protocol=2), \
        f"{os.system.__module__}.system"
    # protocol 2 writes Python 2 names (__builtin__.exec, commands.Popen); the error names the
    # Python 3 global they resolve to, the one that would run
    yield "builtins.exec", pickle.dumps(_Reduce(builtins.exec, f"open({str(marker)!r}, 'w')"), protocol=2), \
        "builtins.exec"
    yield "subprocess.Popen", pickle.dumps(_Reduce(subprocess.Popen, ["touch", str(marker)]), protocol=2), \
        "subprocess.Popen"
    # protocol 4 (STACK_GLOBAL) with a dotted name, nested inside an otherwise plain state dict
    yield "Path.touch", pickle.dumps({"w": _Reduce(Path.touch, marker)}, protocol=4), "pathlib.Path.touch"
    # protocol 0 INST opcode: instantiate os.system directly
    yield "INST", b"(S'" + touch.encode() + b"'\nios\nsystem\n.", "os.system"
    # a hostile "storage type" inside a persistent id
    w = _PickleWriter()
    w.op(pickle.MARK)
    w.str_("storage")
    w.global_("os", "system")
    w.op(pickle.TUPLE)
    w.op(pickle.BINPERSID)
    w.op(pickle.STOP)
    yield "storage type", w.out.getvalue(), "os.system"


@pytest.mark.parametrize("case", ["os.system", "builtins.exec", "subprocess.Popen", "Path.touch", "INST",
                                  "storage type"])
def test_malicious_pickle_is_refused_and_nothing_runs(tmp_path, case):
    marker = tmp_path / "pwned"
    label, pkl, global_name = next(c for c in _hostile_pickles(marker) if c[0] == case)
    src = model_dir_with(tmp_path, torch_zip(tmp_path / "src" / "pytorch_model.bin", pkl))
    msg = refuses(src, tmp_path / "out", "refusing to load global")
    assert f"'{global_name}'" in msg and "pytorch_model.bin" in msg
    assert not marker.exists()


def test_the_hostile_pickles_would_really_run(tmp_path):
    """Guard for the test above: the same bytes do create the marker under plain pickle.loads."""
    marker = tmp_path / "pwned"
    _, pkl, _ = next(c for c in _hostile_pickles(marker) if c[0] == "Path.touch")
    pickle.loads(pkl)
    assert marker.exists()


# ---- broken or unsupported inputs: one-line errors, nothing left behind ------------------------------

def test_legacy_torch_format_is_refused(tmp_path):
    refuses(bin_source(tmp_path, "legacy"), tmp_path / "out", "legacy .*non-zip")


def test_big_endian_archive_is_refused(tmp_path):
    src = bin_source(tmp_path, "views")
    rewrite_entry(src / "pytorch_model.bin", "/byteorder", lambda _: b"big")
    refuses(src, tmp_path / "out", "big-endian")


def test_unknown_storage_type_is_refused(tmp_path):
    path = tmp_path / "src" / "pytorch_model.bin"
    path.parent.mkdir()
    write_torch_zip(path, [("w", np.ones(4, np.float32))])
    rewrite_entry(path, "/data.pkl", lambda b: b.replace(b"torch\nFloatStorage\n", b"torch\nComplexFloatStorage\n"))
    msg = refuses(model_dir_with(tmp_path, path), tmp_path / "out", "unknown storage type")
    assert "torch.ComplexFloatStorage" in msg


def test_view_reaching_past_its_storage_is_refused(tmp_path):
    w = _PickleWriter()
    w.empty_ordered_dict()
    w.op(pickle.MARK)
    w.str_("w")
    w.tensor("0", "FloatStorage", 4, (1000,))   # 1000 elements over a 4-element storage
    w.op(pickle.SETITEMS)
    w.op(pickle.STOP)
    path = torch_zip(tmp_path / "src" / "pytorch_model.bin", w.out.getvalue(), {"0": bytes(16)})
    refuses(model_dir_with(tmp_path, path), tmp_path / "out", "reaches past its storage")


def test_truncated_archive_is_refused(tmp_path):
    src = bin_source(tmp_path, "opt-preln")
    data = (src / "pytorch_model.bin").read_bytes()
    (src / "pytorch_model.bin").write_bytes(data[: len(data) // 2])
    refuses(src, tmp_path / "out", "truncated")


def test_truncated_safetensors_shard_is_refused(tmp_path):
    src = tmp_path / "src"
    shutil.copytree(need(FIXTURES / "llama-gqa"), src)
    shard = src / "model-00002-of-00002.safetensors"
    shard.write_bytes(shard.read_bytes()[:-100])
    refuses(src, tmp_path / "out", "truncated")


def test_corrupt_storage_bytes_fail_the_crc_and_leave_nothing(tmp_path):
    """The damage is only found while streaming, after the output directory was started."""
    src = bin_source(tmp_path, "opt-preln")
    path = src / "pytorch_model.bin"
    with zipfile.ZipFile(path) as zf:
        info = max(zf.infolist(), key=lambda i: i.file_size)
    data = bytearray(path.read_bytes())
    name_len, extra_len = int.from_bytes(data[info.header_offset + 26:info.header_offset + 28], "little"), \
        int.from_bytes(data[info.header_offset + 28:info.header_offset + 30], "little")
    data[info.header_offset + 30 + name_len + extra_len + 100] ^= 0xFF
    path.write_bytes(bytes(data))
    refuses(src, tmp_path / "out", "CRC")


def test_missing_shard_is_refused(tmp_path):
    src = bin_source(tmp_path, "llama-gqa")
    (src / "pytorch_model-00002-of-00002.bin").unlink()
    refuses(src, tmp_path / "out", "missing shard 'pytorch_model-00002-of-00002.bin'")


def test_index_naming_a_missing_tensor_is_refused(tmp_path):
    src = bin_source(tmp_path, "llama-gqa")
    index = json.loads((src / "pytorch_model.bin.index.json").read_text())
    index["weight_map"]["model.layers.9.mlp.up_proj.weight"] = "pytorch_model-00001-of-00002.bin"
    (src / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    refuses(src, tmp_path / "out", "names tensor 'model.layers.9.mlp.up_proj.weight'")


def test_unsupported_dtypes_are_refused(tmp_path):
    src = bin_source(tmp_path, "views")
    refuses(src, tmp_path / "out", "unsupported dtype 'int8'", dtype="int8")
    header = json.dumps({"w": {"dtype": "F8_E4M3", "shape": [2], "data_offsets": [0, 2]}}).encode()
    fp8 = tmp_path / "fp8"
    fp8.mkdir()
    (fp8 / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (fp8 / "model.safetensors").write_bytes(len(header).to_bytes(8, "little") + header + b"\x00\x00")
    refuses(fp8, tmp_path / "out", "unsupported dtype 'F8_E4M3' for tensor 'w'")


def test_existing_output_needs_force(tmp_path):
    src = bin_source(tmp_path, "opt-preln")
    dst = tmp_path / "out"
    dst.mkdir()
    (dst / "keep.txt").write_text("mine")
    refuses(src, dst, "already exists .*--force")
    assert (dst / "keep.txt").read_text() == "mine"
    convert_hf(src, dst, force=True, progress=False)
    assert not (dst / "keep.txt").exists() and (dst / "model.safetensors").is_file()
    assert sorted(os.listdir(tmp_path)) == ["out", "src"]      # no temp or trash dirs remain
    refuses(src, src, "holds the source", force=True)            # --force never deletes the source


def test_no_weights_or_no_config_are_refused(tmp_path):
    (tmp_path / "empty").mkdir()
    refuses(tmp_path / "empty", tmp_path / "out", "no config.json")
    (tmp_path / "empty" / "config.json").write_text(json.dumps({"model_type": "llama"}))
    refuses(tmp_path / "empty", tmp_path / "out", "no weights found")


# ---- small parts --------------------------------------------------------------------------------

def test_parse_size():
    assert parse_size("2GB") == 2 * 10**9
    assert parse_size("500MB") == 500 * 10**6
    assert parse_size("1GiB") == 2**30
    assert parse_size("10kb") == 10_000
    assert parse_size(" 1.5 GB ") == 1_500_000_000
    assert parse_size("4096") == 4096 and parse_size(4096) == 4096
    for bad in ("2XB", "GB", "-1GB", "0", ""):
        with pytest.raises(RawpagedError, match="bad size"):
            parse_size(bad)


def test_reader_does_not_read_storages_until_asked(tmp_path):
    path = tmp_path / "x.bin"
    arrays = {"a": np.arange(10, dtype=np.float32), "b": np.arange(6, dtype=np.int64).reshape(2, 3)}
    write_torch_zip(path, arrays.items())
    with TorchArchive(path) as ar:
        refs = ar.state_dict()
        assert {k: (r.dtype, r.shape) for k, r in refs.items()} == {"a": ("F32", (10,)), "b": ("I64", (2, 3))}
        chunks = list(ar.iter_chunks(refs["a"], chunk_bytes=16))
        assert [c.size for c in chunks] == [4, 4, 2]
        assert np.array_equal(np.concatenate(chunks), arrays["a"])


def test_progress_bar_counts_tensors_and_bytes():
    import io
    stream = io.StringIO()
    bar = Progress(2, 3_000_000, stream=stream, interval=0.0)
    bar.update(1_000_000)
    bar.tensor_done()
    bar.update(2_000_000)
    bar.tensor_done()
    bar.close()
    assert stream.getvalue().rstrip("\n").split("\r")[-1].endswith("2/2 tensors 3.00/3.00 MB")
    silent = io.StringIO()
    Progress(1, 1, enabled=False, stream=silent).close()
    assert silent.getvalue() == ""


def test_module_entry_point(tmp_path, capsys):
    src = bin_source(tmp_path, "opt-preln")
    assert main([str(src), "-o", str(tmp_path / "out"), "--dtype", "float16"]) == 0
    assert (tmp_path / "out" / "model.safetensors").is_file()
    assert main([str(src), "-o", str(tmp_path / "out")]) == 1
    assert "already exists" in capsys.readouterr().err


def _aliased_archive(path: Path, names: list[str]) -> Path:
    """A state dict whose tensors all view one storage, in the given order (a tied head in a .bin)."""
    w = _PickleWriter()
    w.empty_ordered_dict()
    w.op(pickle.MARK)
    for name in names:
        w.str_(name)
        w.tensor("0", "FloatStorage", 6, (3, 2))
    w.op(pickle.SETITEMS)
    w.op(pickle.STOP)
    return torch_zip(path, w.out.getvalue(), {"0": np.arange(6, dtype=np.float32).tobytes()})


@pytest.mark.parametrize("order", [["model.embed_tokens.weight", "lm_head.weight"],
                                   ["lm_head.weight", "model.embed_tokens.weight"]])
def test_tied_head_is_written_once_under_the_embedding_name(tmp_path, order):
    src = model_dir_with(tmp_path, _aliased_archive(tmp_path / "src" / "pytorch_model.bin", order))
    got = read_dir(convert_hf(src, tmp_path / "out", progress=False))
    assert list(got) == ["model.embed_tokens.weight"]
    assert np.array_equal(got["model.embed_tokens.weight"], np.arange(6, dtype=np.float32).reshape(3, 2))


def test_a_shard_that_reads_back_differently_is_caught(tmp_path, monkeypatch):
    """Verification re-reads each written shard: damage after writing fails the conversion cleanly."""
    import rawpaged.convert.hf as hf
    original = hf.write_shard

    def write_then_damage(path, tensors, progress):
        digests = original(path, tensors, progress)
        data = bytearray(path.read_bytes())
        data[-1] ^= 0x01
        path.write_bytes(bytes(data))
        return digests

    monkeypatch.setattr(hf, "write_shard", write_then_damage)
    refuses(bin_source(tmp_path, "opt-preln"), tmp_path / "out", "verification failed: tensor .* differs from its source")


def test_hugely_expanded_view_is_refused(tmp_path):
    """Zero strides let 4 stored floats describe 10^12 elements: refused before anything is made."""
    w = _PickleWriter()
    w.empty_ordered_dict()
    w.op(pickle.MARK)
    w.str_("w")
    w.tensor("0", "FloatStorage", 4, (10**6, 10**6), stride=(0, 0))
    w.op(pickle.SETITEMS)
    w.op(pickle.STOP)
    path = torch_zip(tmp_path / "src" / "pytorch_model.bin", w.out.getvalue(), {"0": bytes(16)})
    refuses(model_dir_with(tmp_path, path), tmp_path / "out", "repeats a storage of 4 elements")
