"""Models by name: a local directory, an `org/name` on the Hugging Face Hub, or the packaged demo model.

    resolve_model("path/to/dir")          -> that directory, as is
    resolve_model("facebook/opt-125m")    -> its snapshot in the Hugging Face cache (downloaded if needed)
    resolve_model(None)                   -> DEMO_MODEL, stories260K shipped inside the package

Hub models go through `huggingface_hub` (the cache layout models--org--name/{refs,snapshots}, offline
mode, tokens), cache first: a cached snapshot holding everything rawpaged reads is used without asking
the network. Otherwise only the files rawpaged reads are downloaded (configs, tokenizer files,
*.safetensors and their index; PyTorch .bin only when a repository has no safetensors, and those must
then be converted with `rawpaged convert hf`). HF_HUB_OFFLINE, HF_HOME / HF_HUB_CACHE, HF_ENDPOINT and
HF_TOKEN are read at each call, so a process (or a test) may change them.
"""
from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path

from rawpaged.errors import RawpagedError

DEMO_MODEL_NAME = "stories260K"
DEMO_MODEL = Path(__file__).resolve().parent / "demo_model" / DEMO_MODEL_NAME

# Top-level files of a repository that rawpaged reads (besides the weights).
CONFIG_FILES = ("config.json", "generation_config.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "tokenizer.model", "vocab.json", "merges.txt", "chat_template.jinja", "chat_template.json")
SAFETENSORS_INDEX = "model.safetensors.index.json"
BIN_INDEX = "pytorch_model.bin.index.json"

# NOTE: huggingface_hub's own rule for repo ids (owner/name of letters, digits, "-", "_", "."); a single
# word is never taken for a Hub model here, so a mistyped local directory is reported as missing.
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_TRUE = {"1", "ON", "YES", "TRUE"}


def resolve_model(name_or_path: str | os.PathLike | None, revision: str | None = None,
                  token: str | None = None) -> Path:
    """The local directory holding the model `name_or_path` names (see the module docstring)."""
    if name_or_path is None:
        return DEMO_MODEL
    path = Path(name_or_path).expanduser()
    name = str(name_or_path)
    if path.exists() or not is_repo_id(name):
        return path        # NOTE: a missing or broken local path is reported by ModelConfig/Tokenizer
    return _from_hub(name, revision, token)


def is_repo_id(name: str) -> bool:
    return bool(_REPO_ID.match(name)) and ".." not in name and not name.endswith((".", "-"))


def hub_offline() -> bool:
    return any(os.environ.get(v, "").upper() in _TRUE for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def hub_cache_dir() -> Path:
    """Where huggingface_hub keeps models: HF_HUB_CACHE, else $HF_HOME/hub, else ~/.cache/huggingface/hub."""
    explicit = os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE")
    if explicit:
        return Path(explicit).expanduser()
    home = os.environ.get("HF_HOME") or Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache") / "huggingface"
    return Path(home).expanduser() / "hub"


# -- what a snapshot must hold ----------------------------------------------------------------------

def missing_files(snapshot: Path) -> list[str]:
    """What rawpaged needs and the directory lacks: config.json, a tokenizer, weights (every shard)."""
    missing = [] if (snapshot / "config.json").is_file() else ["config.json"]
    if not ((snapshot / "tokenizer.json").is_file() or (snapshot / "tokenizer.model").is_file()
            or ((snapshot / "vocab.json").is_file() and (snapshot / "merges.txt").is_file())):
        missing.append("tokenizer.json (or tokenizer.model, or vocab.json + merges.txt)")
    if weights_format(snapshot) is None:
        shards = _index_shards(snapshot / SAFETENSORS_INDEX)
        absent = [s for s in shards if not (snapshot / s).is_file()]
        missing += absent or ["model.safetensors"]
    return missing


def weights_format(snapshot: Path) -> str | None:
    """"safetensors" or "bin" when the directory holds a complete set of weights, else None."""
    for index, pattern in ((SAFETENSORS_INDEX, "*.safetensors"), (BIN_INDEX, "pytorch_model*.bin")):
        shards = _index_shards(snapshot / index)
        if shards and all((snapshot / s).is_file() for s in shards):
            return "safetensors" if index == SAFETENSORS_INDEX else "bin"
        if not shards and any(p.is_file() for p in snapshot.glob(pattern)):
            return "safetensors" if index == SAFETENSORS_INDEX else "bin"
    return None


def _index_shards(index: Path) -> list[str]:
    """The shard files a *.index.json names ([] when there is no readable index)."""
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        return sorted(set(weight_map.values()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return []


def select_files(repo_files: list[str]) -> list[str]:
    """The files of a repository listing that rawpaged reads, weights last: top level only, safetensors
    over .bin. A sharded checkpoint is represented by its index; its shards are what the index names.

    NOTE: not every *.safetensors: repositories such as Mistral's also hold a consolidated copy of the
    same weights, which would double the download.
    """
    top = [f for f in repo_files if "/" not in f]
    wanted = [f for f in top if f in CONFIG_FILES or f in TOKENIZER_FILES]
    for index, single, suffix in ((SAFETENSORS_INDEX, "model.safetensors", ".safetensors"),
                                  (BIN_INDEX, "pytorch_model.bin", ".bin")):
        if index in top:
            return wanted + [index]
        if single in top:
            return wanted + [single]
        if suffix == ".safetensors" and any(f.endswith(suffix) for f in top):
            return wanted + [f for f in top if f.endswith(suffix)]
    return wanted


# -- the Hub ----------------------------------------------------------------------------------------

def _fetch_hint(repo_id: str, revision: str | None) -> str:
    rev = f" --revision {revision}" if revision else ""
    return f"run 'hf download {repo_id}{rev}' on a machine with network, or pass a local directory"


def _from_hub(repo_id: str, revision: str | None, token: str | None) -> Path:
    cache = hub_cache_dir()
    snapshot = _cached_snapshot(repo_id, revision, cache)
    missing = missing_files(snapshot) if snapshot is not None else []
    if snapshot is not None and not missing:
        return _usable(repo_id, snapshot)
    if hub_offline():
        raise RawpagedError(_offline_miss(repo_id, revision, cache, snapshot, missing))
    snapshot = _download(repo_id, revision, token, cache)
    missing = missing_files(snapshot)
    if missing:
        raise RawpagedError(f"model {repo_id!r} on the Hugging Face Hub has no {', '.join(missing)}: "
                            "rawpaged needs a Hugging Face transformers model (config.json, tokenizer, weights)")
    return _usable(repo_id, snapshot)


def _cached_snapshot(repo_id: str, revision: str | None, cache: Path) -> Path | None:
    """The cached snapshot folder for the revision (its files may be incomplete), or None."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        # NOTE: local_files_only never touches the network; the pattern keeps newer huggingface_hub
        # versions from judging completeness by files rawpaged does not read (missing_files does that).
        return Path(snapshot_download(repo_id, revision=revision, cache_dir=cache, local_files_only=True,
                                      allow_patterns=["config.json"]))
    except LocalEntryNotFoundError as err:
        partial = getattr(err, "snapshot_path", None)     # an incomplete snapshot (huggingface_hub >= 1.x)
        return Path(partial) if partial else None


def _cached_refs(repo_id: str, cache: Path) -> list[str]:
    from huggingface_hub.file_download import repo_folder_name

    refs = cache / repo_folder_name(repo_id=repo_id, repo_type="model") / "refs"
    return sorted(str(p.relative_to(refs)) for p in refs.rglob("*") if p.is_file()) if refs.is_dir() else []


def _offline_miss(repo_id: str, revision: str | None, cache: Path, snapshot: Path | None,
                  missing: list[str]) -> str:
    hint = _fetch_hint(repo_id, revision)
    if snapshot is not None:
        return (f"model {repo_id!r} in the Hugging Face cache ({snapshot}) lacks {', '.join(missing)} and "
                f"HF_HUB_OFFLINE=1: {hint}")
    refs = _cached_refs(repo_id, cache)
    if refs:
        return (f"model {repo_id!r} revision {revision or 'main'!r} is not in the Hugging Face cache ({cache}; "
                f"cached: {', '.join(refs)}) and HF_HUB_OFFLINE=1: {hint}")
    return f"model {repo_id!r} is not in the Hugging Face cache ({cache}) and HF_HUB_OFFLINE=1: {hint}"


def _download(repo_id: str, revision: str | None, token: str | None, cache: Path) -> Path:
    """Download the files rawpaged reads into the cache (progress bars from huggingface_hub)."""
    from huggingface_hub import HfApi, snapshot_download
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError

    endpoint = os.environ.get("HF_ENDPOINT") or None

    def fetch(files: list[str]) -> Path:
        return Path(snapshot_download(repo_id, revision=revision, cache_dir=cache, token=token,
                                      allow_patterns=files, endpoint=endpoint))

    try:
        info = HfApi(endpoint=endpoint, token=token).model_info(repo_id, revision=revision, files_metadata=True)
        sizes = {s.rfilename: s.size or 0 for s in info.siblings or []}
        files = select_files(list(sizes))
        if files and files[-1] in (SAFETENSORS_INDEX, BIN_INDEX):
            files += _index_shards(fetch([files[-1]]) / files[-1])     # the index first, then its shards
        megabytes = sum(sizes.get(f, 0) for f in files) / 1e6
        print(f"rawpaged: downloading {repo_id} ({len(files)} files, {megabytes:.1f} MB) into {cache}",
              file=sys.stderr)
        return fetch(files)
    except GatedRepoError:
        raise RawpagedError(f"model {repo_id!r} is gated on the Hugging Face Hub: accept its terms on "
                            f"https://huggingface.co/{repo_id}, then log in ('hf auth login') or set "
                            "HF_TOKEN") from None
    except RepositoryNotFoundError:
        raise RawpagedError(f"model {repo_id!r} is neither a local directory nor a model on the Hugging Face Hub "
                            "(a private one needs 'hf auth login' or HF_TOKEN)") from None
    except RevisionNotFoundError:
        raise RawpagedError(f"model {repo_id!r} has no revision {revision!r} on the Hugging Face Hub") from None
    except Exception as err:    # NOTE: network errors come from httpx/requests/OSError depending on versions
        reason = " ".join(str(err).split())[:200] or type(err).__name__
        raise RawpagedError(f"cannot download model {repo_id!r} from the Hugging Face Hub ({reason}): "
                            f"{_fetch_hint(repo_id, revision)}") from None


def _usable(repo_id: str, snapshot: Path) -> Path:
    if weights_format(snapshot) == "bin":
        raise RawpagedError(f"model {repo_id!r} has only PyTorch .bin weights (in {snapshot}): convert them once "
                            f"with 'rawpaged convert hf {snapshot} -o DIR' and pass --model DIR")
    return snapshot


# -- the command line -------------------------------------------------------------------------------

def use_demo_model_if_unset(args) -> None:
    """`rawpaged generate|serve` without --model: the packaged demo model, said in one line on stderr."""
    if not hasattr(args, "model") or args.model is not None:
        return
    args.model = str(DEMO_MODEL)
    if getattr(args, "served_model_name", "") is None:
        args.served_model_name = DEMO_MODEL_NAME
    print(f"rawpaged: no --model given: using the demo model {DEMO_MODEL_NAME} (a 260K-parameter TinyStories "
          f"model shipped with rawpaged, {DEMO_MODEL}); for another model pass --model org/name or "
          "--model DIRECTORY", file=sys.stderr)
