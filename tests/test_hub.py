"""Models by name (rawpaged.hub), fully offline: each test lays out a Hugging Face cache of its own
(models--org--name/{blobs, snapshots/<commit>, refs/<branch>}, as huggingface_hub writes it) and
points HF_HUB_CACHE at it. "The network" is an endpoint on a closed local port: a test that reaches
for it fails with a connection error instead of downloading anything."""
from __future__ import annotations

import hashlib
import json
import socket
from pathlib import Path

import pytest

from rawpaged import hub
from rawpaged.engine import EngineConfig, LLMEngine
from rawpaged.errors import RawpagedError
from rawpaged.hub import DEMO_MODEL, resolve_model, select_files
from rawpaged.sampling_params import SamplingParams

MAIN = "a" * 40
DEV = "b" * 40
REPO = "acme/tiny-stories"


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    """An empty Hugging Face cache, online mode, and a Hub endpoint nobody listens on."""
    root = tmp_path / "hf_cache"
    root.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(root))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{_closed_port()}")
    return root


@pytest.fixture
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def lay_out(cache: Path, repo_id: str, commit: str, files: dict[str, bytes], refs: tuple[str, ...] = ("main",)) -> Path:
    """Write a snapshot the way huggingface_hub does: content in blobs/, relative symlinks in snapshots/."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snap = repo / "snapshots" / commit
    for name, data in files.items():
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = snap / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(Path("../" * (len(Path(name).parts) + 1)) / "blobs" / blob.name)
    for ref in refs:
        (repo / "refs" / ref).parent.mkdir(parents=True, exist_ok=True)
        (repo / "refs" / ref).write_text(commit)
    return snap


def demo_files(**drop_or_replace) -> dict[str, bytes]:
    """The packaged demo model's files (config, weights, tokenizer), optionally edited."""
    files = {p.name: p.read_bytes() for p in DEMO_MODEL.iterdir() if p.suffix in (".json", ".safetensors")}
    for name, data in drop_or_replace.items():
        name = name.replace("__", ".")
        if data is None:
            del files[name]
        else:
            files[name] = data
    return files


def one_line_error(*args, **kwargs) -> str:
    with pytest.raises(RawpagedError) as err:
        resolve_model(*args, **kwargs)
    msg = str(err.value)
    assert "\n" not in msg
    return msg


# -- local paths and the demo model ----------------------------------------------------------------

def test_local_paths_are_used_as_is(tmp_path, cache):
    assert resolve_model(tmp_path) == tmp_path
    assert resolve_model(str(tmp_path)) == tmp_path
    assert resolve_model(None) == DEMO_MODEL
    # Not repo ids: reported by ModelConfig as a missing path, the network is never asked.
    for name in ("stories-hf", "./org/name", str(tmp_path / "org" / "name"), "a/b/c"):
        assert resolve_model(name) == Path(name)
    with pytest.raises(RawpagedError, match="does not exist"):
        LLMEngine(EngineConfig(model="stories-hf", device="cpu"))


def test_repo_id_rule():
    assert hub.is_repo_id("facebook/opt-125m") and hub.is_repo_id("TinyLlama/TinyLlama-1.1B-Chat-v1.0")
    for name in ("opt-125m", "/abs/path", "./rel/x", "a/b/c", "a/../b", "org/", "org/name.", "~user/x"):
        assert not hub.is_repo_id(name), name


# -- cache hits ------------------------------------------------------------------------------------

def test_cache_hit_needs_no_network_and_serves(cache):
    snap = lay_out(cache, REPO, MAIN, demo_files())
    assert resolve_model(REPO) == snap            # online mode, but the Hub endpoint is a closed port
    engine = LLMEngine(EngineConfig(model=REPO, device="cpu", kv_cache_memory=4 << 20))
    demo = LLMEngine(EngineConfig(model=None, device="cpu", kv_cache_memory=4 << 20))
    assert engine.model_config.path == snap and demo.model_config.path == DEMO_MODEL
    outs = []
    for eng in (engine, demo):
        eng.add_request("r", "Once upon a time", SamplingParams(temperature=0, max_tokens=12))
        while eng.has_unfinished_requests():
            done = [o for o in eng.step() if o.finished]
        outs.append(done[0].outputs[0].token_ids)
    assert outs[0] == outs[1] and len(outs[0]) > 0


def test_cache_branches_and_commits(cache, offline):
    main = lay_out(cache, REPO, MAIN, demo_files(), refs=("main",))
    dev = lay_out(cache, REPO, DEV, demo_files(generation_config__json=b'{"eos_token_id": 7}'), refs=("dev",))
    assert resolve_model(REPO) == main
    assert resolve_model(REPO, revision="dev") == dev
    assert resolve_model(REPO, revision=DEV) == dev
    assert resolve_model(REPO, revision="main", token="hf_unused") == main


def test_sharded_safetensors_cache_hit(cache, offline):
    files = demo_files(model__safetensors=None)
    weights = (DEMO_MODEL / "model.safetensors").read_bytes()
    files["model-00001-of-00001.safetensors"] = weights
    files["model.safetensors.index.json"] = json.dumps(
        {"weight_map": {"model.embed_tokens.weight": "model-00001-of-00001.safetensors"}}).encode()
    snap = lay_out(cache, REPO, MAIN, files)
    assert resolve_model(REPO) == snap


# -- misses -------------------------------------------------------------------------------------------

def test_offline_miss(cache, offline):
    msg = one_line_error(REPO)
    assert msg == (f"model '{REPO}' is not in the Hugging Face cache ({cache}) and HF_HUB_OFFLINE=1: "
                   f"run 'hf download {REPO}' on a machine with network, or pass a local directory")


def test_offline_wrong_revision_names_the_cached_ones(cache, offline):
    lay_out(cache, REPO, MAIN, demo_files(), refs=("main",))
    lay_out(cache, REPO, DEV, demo_files(), refs=("dev",))
    msg = one_line_error(REPO, revision="v2")
    assert f"model '{REPO}' revision 'v2' is not in the Hugging Face cache" in msg
    assert "cached: dev, main" in msg and "HF_HUB_OFFLINE=1" in msg
    assert f"'hf download {REPO} --revision v2'" in msg
    assert "revision '" + "c" * 40 + "'" in one_line_error(REPO, revision="c" * 40)


@pytest.mark.parametrize("dropped, named", [
    ("model.safetensors", "lacks model.safetensors"),
    ("config.json", "lacks config.json"),
    ("tokenizer.json", "lacks tokenizer.json (or tokenizer.model, or vocab.json + merges.txt)"),
])
def test_offline_missing_file(cache, offline, dropped, named):
    snap = lay_out(cache, REPO, MAIN, demo_files(**{dropped.replace(".", "__"): None}))
    msg = one_line_error(REPO)
    assert named in msg and str(snap) in msg and "HF_HUB_OFFLINE=1" in msg and f"hf download {REPO}" in msg


def test_offline_missing_shard_is_named(cache, offline):
    files = demo_files(model__safetensors=None)
    files["model.safetensors.index.json"] = json.dumps({"weight_map": {
        "a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}).encode()
    files["model-00001-of-00002.safetensors"] = (DEMO_MODEL / "model.safetensors").read_bytes()
    lay_out(cache, REPO, MAIN, files)
    assert "lacks model-00002-of-00002.safetensors and" in one_line_error(REPO)


def test_dangling_blob_counts_as_missing(cache, offline):
    snap = lay_out(cache, REPO, MAIN, demo_files())
    (snap / "model.safetensors").resolve().unlink()          # an interrupted download
    assert "lacks model.safetensors" in one_line_error(REPO)


def test_bin_only_model_says_convert(cache, offline):
    snap = lay_out(cache, REPO, MAIN, demo_files(model__safetensors=None, pytorch_model__bin=b"not read"))
    msg = one_line_error(REPO)
    assert "only PyTorch .bin weights" in msg and f"rawpaged convert hf {snap} -o DIR" in msg


def test_incomplete_cache_goes_to_the_hub_when_online(cache):
    lay_out(cache, REPO, MAIN, demo_files(model__safetensors=None))
    msg = one_line_error(REPO)                   # the endpoint is a closed port: a download was attempted
    assert msg.startswith(f"cannot download model '{REPO}' from the Hugging Face Hub (")
    assert msg.endswith(f"run 'hf download {REPO}' on a machine with network, or pass a local directory")


def test_unreachable_hub(cache):
    assert "cannot download model 'acme/nothing-here'" in one_line_error("acme/nothing-here")


def test_online_download_fetches_only_what_rawpaged_reads(cache, monkeypatch):
    """The download path with huggingface_hub's two network calls replaced by a fake Hub: what is asked
    for (the index before its shards; no consolidated copy, no .bin, no subfolder) and what comes back."""
    import huggingface_hub
    from huggingface_hub.hf_api import ModelInfo

    weights = (DEMO_MODEL / "model.safetensors").read_bytes()
    remote = {**demo_files(model__safetensors=None), "README.md": b"# card",
              "model-00001-of-00002.safetensors": weights, "model-00002-of-00002.safetensors": weights,
              "model.safetensors.index.json": json.dumps({"weight_map": {
                  "x": "model-00001-of-00002.safetensors", "y": "model-00002-of-00002.safetensors"}}).encode(),
              "consolidated.safetensors": weights, "pytorch_model.bin": b"", "original/consolidated.00.pth": b""}
    asked = []

    def model_info(self, repo_id, revision=None, files_metadata=False, **kw):
        asked.append(("info", repo_id, revision))
        return ModelInfo(id=repo_id, sha=MAIN, siblings=[{"rfilename": f, "size": len(d)} for f, d in remote.items()])

    real_snapshot_download = huggingface_hub.snapshot_download

    def snapshot_download(repo_id, revision=None, cache_dir=None, token=None, allow_patterns=None, **kw):
        if kw.get("local_files_only"):          # the cache look-up: the real one (the cache is empty)
            return real_snapshot_download(repo_id, revision=revision, cache_dir=cache_dir,
                                          allow_patterns=allow_patterns, **kw)
        asked.append(("download", repo_id, revision, token, sorted(allow_patterns)))
        snap = Path(cache_dir) / "models--acme--tiny-stories" / "snapshots" / MAIN
        new = {f: remote[f] for f in allow_patterns if not (snap / f).exists()}
        return str(lay_out(Path(cache_dir), repo_id, MAIN, new))

    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", model_info)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    snap = resolve_model(REPO, revision="main", token="hf_x")
    assert snap == cache / "models--acme--tiny-stories" / "snapshots" / MAIN
    index, shards = "model.safetensors.index.json", ["model-00001-of-00002.safetensors",
                                                     "model-00002-of-00002.safetensors"]
    assert asked == [("info", REPO, "main"),
                     ("download", REPO, "main", "hf_x", [index]),
                     ("download", REPO, "main", "hf_x", sorted(["config.json", "generation_config.json", index,
                                                                "tokenizer.json", "tokenizer_config.json"] + shards))]
    assert sorted(p.name for p in snap.iterdir()) == sorted(["config.json", "generation_config.json", index,
                                                              "tokenizer.json", "tokenizer_config.json"] + shards)
    assert resolve_model(REPO) == snap and len(asked) == 3            # cached now: the Hub is not asked again


def test_select_files():
    tok = ["tokenizer.model", "tokenizer_config.json", "special_tokens_map.json"]
    index = "model.safetensors.index.json"
    assert select_files(["config.json", "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
                         index, "consolidated.safetensors", "pytorch_model.bin", "README.md", ".gitattributes",
                         "original/model.safetensors"] + tok) == ["config.json"] + tok + [index]
    assert select_files(["config.json", "model.safetensors", "consolidated.safetensors"]) == \
        ["config.json", "model.safetensors"]
    assert select_files(["config.json", "weights.safetensors"]) == ["config.json", "weights.safetensors"]
    # no safetensors: the .bin weights (to convert), never other checkpoints
    assert select_files(["config.json", "vocab.json", "merges.txt", "pytorch_model.bin", "tf_model.h5",
                         "flax_model.msgpack"]) == ["config.json", "vocab.json", "merges.txt", "pytorch_model.bin"]
    assert select_files(["config.json", "pytorch_model.bin.index.json", "pytorch_model-00001-of-00002.bin"]) == \
        ["config.json", "pytorch_model.bin.index.json"]
    assert select_files(["README.md"]) == []
