"""The demo model shipped inside the package (rawpaged/demo_model/stories260K): what it is made of,
that it is stories260K (golden greedy tokens, a fresh conversion), and that the CLI uses it by default."""
from __future__ import annotations

import fnmatch
import json
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

import rawpaged
from rawpaged import LLM, SamplingParams
from rawpaged.cli import build_parser, main
from rawpaged.hub import DEMO_MODEL, DEMO_MODEL_NAME, resolve_model, use_demo_model_if_unset

REPO_ROOT = Path(__file__).resolve().parent.parent
FILES = ["LICENSE", "ORIGIN.md", "config.json", "generation_config.json", "model.safetensors",
         "tokenizer.json", "tokenizer_config.json"]


@pytest.fixture(scope="module")
def demo_llm():
    return LLM(DEMO_MODEL, device="cpu", kv_cache_memory=8 << 20)


def test_packaged_files():
    assert DEMO_MODEL.parent.parent == Path(rawpaged.__file__).resolve().parent
    assert sorted(p.name for p in DEMO_MODEL.iterdir()) == FILES
    assert 0.9e6 < sum(p.stat().st_size for p in DEMO_MODEL.iterdir()) < 1.2e6
    assert "MIT License" in (DEMO_MODEL / "LICENSE").read_text()
    assert "rawpaged convert llama2c stories260K.bin --tokenizer tok512.bin" in (DEMO_MODEL / "ORIGIN.md").read_text()
    assert resolve_model(None) == DEMO_MODEL


def test_pyproject_ships_every_file():
    """A wheel carries the demo model only if package-data names it (the fresh-install test checks a real one)."""
    tomllib = pytest.importorskip("tomllib")
    data = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    pkg_root = Path(rawpaged.__file__).resolve().parent
    for f in DEMO_MODEL.iterdir():
        rel = f.relative_to(pkg_root).as_posix()
        assert any(fnmatch.fnmatch(rel, pat) for pat in data["rawpaged"]), rel


def test_loads_and_tells_a_story(demo_llm):
    """Needs nothing outside the package: no ../shared, no network."""
    assert demo_llm.engine.model_config.path == DEMO_MODEL
    out = demo_llm.generate(["Once upon a time"], SamplingParams(temperature=0, max_tokens=24))[0]
    assert out.outputs[0].text.startswith(",") and len(out.outputs[0].token_ids) == 24
    assert demo_llm.tokenizer.encode("Once upon a time")[0] == 1


def test_golden_greedy_tokens(demo_llm, data_dir):
    golden = json.loads((data_dir / "models" / "stories260K" / "greedy_reference.json").read_text())
    out = demo_llm.generate(None, SamplingParams(temperature=0, max_tokens=64, ignore_eos=True),
                            prompt_token_ids=[[golden["start_token"]]])[0]
    assert out.outputs[0].token_ids == golden["greedy_next_token_ids_64"]


def test_is_what_origin_md_says(stories260k_dir):
    """The packaged files equal a fresh `rawpaged convert llama2c` of the shared checkpoint."""
    for name in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"):
        assert json.loads((DEMO_MODEL / name).read_text()) == json.loads((stories260k_dir / name).read_text()), name
    ours = load_file(str(DEMO_MODEL / "model.safetensors"))
    fresh = load_file(str(stories260k_dir / "model.safetensors"))
    assert sorted(ours) == sorted(fresh)
    for name in ours:
        np.testing.assert_array_equal(ours[name], fresh[name], err_msg=name)


def test_cli_defaults_to_the_demo_model(capsys, demo_llm):
    assert main(["generate", "--device", "cpu", "--kv-cache-memory", str(8 << 20), "--max-tokens", "16",
                 "Once upon a time"]) == 0
    out, err = capsys.readouterr()
    want = demo_llm.generate(["Once upon a time"], SamplingParams(temperature=0, max_tokens=16))[0]
    assert out == "Once upon a time" + want.outputs[0].text + "\n"
    assert err.count("\n") == 1 and f"using the demo model {DEMO_MODEL_NAME}" in err
    assert "--model org/name" in err


def test_serve_args_default_to_the_demo_model(capsys):
    args = build_parser().parse_args(["serve", "--port", "0"])
    use_demo_model_if_unset(args)
    assert (args.model, args.served_model_name) == (str(DEMO_MODEL), DEMO_MODEL_NAME)
    named = build_parser().parse_args(["serve", "--model", "org/name", "--served-model-name", "x"])
    use_demo_model_if_unset(named)
    assert (named.model, named.served_model_name) == ("org/name", "x")
    assert capsys.readouterr().err.count("demo model") == 1
    convert = build_parser().parse_args(["convert", "hf", "src", "-o", "dst"])
    use_demo_model_if_unset(convert)
    assert not hasattr(convert, "model")
