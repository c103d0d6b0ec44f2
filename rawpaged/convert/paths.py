"""Files of a model directory, resolved inside it: a symlink or an index entry cannot read elsewhere.

A model directory is untrusted input (downloaded, unpacked from someone's archive): a symlink named
`tokenizer.json` pointing at `~/.ssh/id_rsa`, or an index whose `weight_map` says `/etc/passwd` or
`../../secret`, must not make the converter copy that file into its output or the loader print a
piece of it in an error. Every file rawpaged reads from a model directory goes through `model_file`:
symlinks are resolved first, then the result must lie inside the (resolved) directory.

NOTE: one layout with symlinks leaving the directory is accepted on purpose: the Hugging Face hub
cache, `models--org--name/snapshots/<revision>/<file> -> ../../blobs/<sha256>`, the layout
`huggingface_hub.snapshot_download` returns. A snapshot directory may reach the files directly in
the `blobs/` folder of its own repository cache, nothing else.
"""
from __future__ import annotations

from pathlib import Path

from rawpaged.errors import RawpagedError


def _inside(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


def _roots(model_dir: Path) -> tuple[Path, ...]:
    root = model_dir.resolve()
    if root.parent.name == "snapshots":                       # the HF hub cache layout (see NOTE)
        return root, root.parent.parent / "blobs"
    return (root,)


def model_file(model_dir: str | Path, name: str | Path) -> Path:
    """`model_dir / name`, refused (by name) when it or its symlink target leaves model_dir.

    Returns the unresolved path, so error messages keep naming the file the user knows; a
    missing file is returned too (callers report it as missing).
    """
    model_dir = Path(model_dir)
    if Path(name).is_absolute():
        raise RawpagedError(f"{model_dir}: refusing file {str(name)!r}: an absolute path leaves the model directory")
    path = model_dir / name
    target = path.resolve()
    roots = _roots(model_dir)
    if _inside(target, roots[0]) or (len(roots) > 1 and target.parent == roots[1]):
        return path
    raise RawpagedError(f"{model_dir}: refusing file {str(name)!r}: it resolves to {target}, "
                        f"outside the model directory")


def check_model_files(model_dir: str | Path, names) -> None:
    """model_file() for each of `names` that exists (or is a dangling link)."""
    for name in names:
        path = Path(model_dir) / name
        if path.exists() or path.is_symlink():
            model_file(model_dir, name)
