"""Which models rawpaged runs, as a new user meets them: the architecture table (shared by
ModelConfig and `rawpaged convert hf`), model_type fallback, RoPE and sliding-window configs,
refusals, and the converter writing tokenizer.json for directories with only slow-tokenizer files."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from model_impl import MODEL_REGISTRY
from rawpaged import LLM, SamplingParams
from rawpaged.config import ARCHITECTURES, MODEL_TYPES, ModelConfig
from rawpaged.convert.hf import convert_hf
from rawpaged.errors import RawpagedError
from rawpaged.tokenizer import Tokenizer

FIXTURES = Path(__file__).parent / "fixtures"


def _copy(name: str, tmp_path: Path, **changes) -> Path:
    d = shutil.copytree(FIXTURES / name, tmp_path / name)
    cfg = json.loads((d / "config.json").read_text())
    for k, v in changes.items():
        if v is None:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    (d / "config.json").write_text(json.dumps(cfg))
    return d


def test_every_architecture_has_a_model_and_a_model_type():
    assert set(ARCHITECTURES.values()) == set(MODEL_REGISTRY)
    assert set(MODEL_TYPES.values()) == set(ARCHITECTURES)


@pytest.mark.parametrize("name,arch", [("llama-gqa", "LlamaForCausalLM"), ("gpt2", "GPT2LMHeadModel"),
                                       ("mistral-swa", "MistralForCausalLM")])
def test_a_config_without_architectures_resolves_by_model_type(tmp_path, name, arch):
    d = _copy(name, tmp_path, architectures=None)
    assert ModelConfig.from_dir(d).architecture == arch


def test_unknown_architecture_names_the_supported_ones(tmp_path):
    d = _copy("llama-gqa", tmp_path, architectures=["FalconForCausalLM"], model_type="falcon")
    with pytest.raises(RawpagedError) as e:
        ModelConfig.from_dir(d)
    msg = str(e.value)
    assert "\n" not in msg and "FalconForCausalLM" in msg
    for arch in ARCHITECTURES:
        assert arch in msg
    d2 = _copy("gpt2", tmp_path / "b", architectures=None, model_type="bloom")
    with pytest.raises(RawpagedError, match="unknown architecture \\(model_type 'bloom'\\).*GPT2LMHeadModel"):
        ModelConfig.from_dir(d2)


@pytest.mark.parametrize("scaling,needle", [
    ({"rope_type": "longrope", "short_factor": [1.0], "long_factor": [1.0]}, "rope type 'longrope' (Phi-3's LongRoPE"),
    ({"type": "su", "short_factor": [1.0], "long_factor": [1.0]}, "rope type 'su'"),
    ({"rope_type": "mrope"}, "rope type 'mrope'"),
    ({"rope_type": "linear"}, "rope type 'linear' in"),
    ({"rope_type": "llama3", "factor": 8.0}, "needs low_freq_factor, high_freq_factor"),
    ({"rope_type": "yarn", "factor": -1}, "rope_scaling.factor must be a finite number > 0"),
])
def test_rope_scalings_rawpaged_lacks_are_refused_in_one_line(tmp_path, scaling, needle):
    d = _copy("phi3", tmp_path, rope_scaling=scaling)
    with pytest.raises(RawpagedError) as e:
        ModelConfig.from_dir(d)
    assert "\n" not in str(e.value) and needle in str(e.value), str(e.value)
    if "longrope" in needle:
        assert "supported are default, linear, dynamic, yarn, llama3" in str(e.value)


def test_context_length_follows_the_rope_scaling():
    """vLLM's rule: linear/dynamic x factor, yarn original x factor, llama3 as given."""
    assert ModelConfig.from_dir(FIXTURES / "llama-rope-linear").max_model_len == 64 * 2
    assert ModelConfig.from_dir(FIXTURES / "llama-rope-dynamic").max_model_len == 16 * 4
    assert ModelConfig.from_dir(FIXTURES / "llama-rope-yarn").max_model_len == 32 * 4
    assert ModelConfig.from_dir(FIXTURES / "llama-rope-llama3").max_model_len == 128


def test_layer_windows_follow_transformers(tmp_path):
    assert ModelConfig.from_dir(FIXTURES / "mistral-swa").layer_windows == (8, 8)
    assert ModelConfig.from_dir(FIXTURES / "qwen2-swa").layer_windows == (0, 6)       # max_window_layers = 1
    assert ModelConfig.from_dir(FIXTURES / "phi3").layer_windows == (12, 12)
    assert ModelConfig.from_dir(FIXTURES / "llama-gqa").layer_windows == (0, 0)
    off = _copy("qwen2-swa", tmp_path, use_sliding_window=False)
    assert ModelConfig.from_dir(off).layer_windows == (0, 0)
    # Mistral without the key gets transformers' default 4096; null turns it off.
    assert ModelConfig.from_dir(_copy("mistral-swa", tmp_path / "a", sliding_window=None)).layer_windows == (4096, 4096)
    bad = _copy("qwen2-swa", tmp_path / "b", layer_types=["full_attention"])
    with pytest.raises(RawpagedError, match="layer_types must list 'full_attention' or 'sliding_attention' for each of the 2"):
        ModelConfig.from_dir(bad)


def test_gpt2_and_neox_field_names_are_read(tmp_path):
    c = ModelConfig.from_dir(FIXTURES / "gpt2")
    assert (c.hidden_size, c.num_layers, c.num_heads, c.max_model_len) == (32, 2, 4, 64)
    neox = ModelConfig.from_dir(FIXTURES / "gpt-neox")          # rotary_pct / rotary_emb_base spelling
    assert neox.rope.rot_dim == 4 and neox.rope.theta == 10000
    bad = _copy("gpt2", tmp_path, n_embd=32.5)
    with pytest.raises(RawpagedError, match="hidden_size must be a positive integer"):
        ModelConfig.from_dir(bad)


# --------------------------------------------------------------------------------------------
# rawpaged convert hf
# --------------------------------------------------------------------------------------------
def test_convert_refuses_an_architecture_rawpaged_cannot_run(tmp_path):
    src = _copy("gpt2", tmp_path, architectures=["BloomForCausalLM"], model_type="bloom")
    with pytest.raises(RawpagedError) as e:
        convert_hf(src, tmp_path / "out", progress=False)
    assert "BloomForCausalLM" in str(e.value) and "GPT2LMHeadModel" in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("name", ["gpt2", "gemma", "gpt-neox"])
def test_converted_new_families_still_match_transformers(tmp_path, name):
    import numpy as np
    out = convert_hf(FIXTURES / name, tmp_path / "out", progress=False)
    ref = np.load(FIXTURES / name / "reference.npz")
    off = ref["prompt_offsets"]
    prompts = [ref["prompt_ids_flat"][off[i]:off[i + 1]].tolist() for i in range(len(off) - 1)]
    outs = LLM(out, device="cpu", kv_cache_memory=4 << 20).generate(
        None, SamplingParams(temperature=0, max_tokens=16, ignore_eos=True), prompt_token_ids=prompts)
    assert [o.outputs[0].token_ids for o in outs] == ref["greedy_ids"].tolist()


def _without_tokenizer_json(tmp_path: Path) -> Path:
    src = _copy("llama-gqa", tmp_path)
    (src / "tokenizer.json").unlink()
    return src


def test_convert_writes_tokenizer_json_from_tokenizer_model(tmp_path, data_dir):
    spm = data_dir / "tokenizers" / "llama-32k" / "tokenizer.model"
    if not spm.is_file():
        pytest.skip(f"{spm} not found")
    src = _without_tokenizer_json(tmp_path)
    shutil.copyfile(spm, src / "tokenizer.model")
    tcfg = json.loads((src / "tokenizer_config.json").read_text())
    (src / "tokenizer_config.json").write_text(json.dumps({**tcfg, "tokenizer_class": "LlamaTokenizer"}))
    out = convert_hf(src, tmp_path / "out", progress=False)
    assert (out / "tokenizer.json").is_file() and (out / "tokenizer.model").is_file()
    text = "Hello world, the quick brown fox"
    assert Tokenizer.from_dir(out).encode(text) == Tokenizer.from_dir(src).encode(text)
    shared = Tokenizer.from_dir(data_dir / "tokenizers" / "llama-32k")     # transformers' own conversion
    assert Tokenizer.from_dir(out).encode(text) == shared.encode(text)


def test_convert_writes_tokenizer_json_from_vocab_and_merges(tmp_path, data_dir):
    gpt2 = data_dir / "tokenizers" / "opt-gpt2"
    if not (gpt2 / "encoder.json").is_file():
        pytest.skip(f"{gpt2} not found")
    src = _copy("gpt2", tmp_path)
    (src / "tokenizer.json").unlink()
    (src / "tokenizer_config.json").unlink()
    shutil.copyfile(gpt2 / "encoder.json", src / "vocab.json")
    shutil.copyfile(gpt2 / "vocab.bpe", src / "merges.txt")
    out = convert_hf(src, tmp_path / "out", progress=False)
    assert json.loads((out / "tokenizer.json").read_text())["model"]["type"] == "BPE"
    text = "Today is a beautiful day and I want"
    assert Tokenizer.from_dir(out).encode(text) == Tokenizer.from_dir(src).encode(text)


def test_convert_keeps_a_source_tokenizer_json_as_it_is(tmp_path):
    out = convert_hf(FIXTURES / "qwen3", tmp_path / "out", progress=False)
    assert (out / "tokenizer.json").read_bytes() == (FIXTURES / "qwen3" / "tokenizer.json").read_bytes()


# --------------------------------------------------------------------------------------------
# Sliding windows with the paged cache's sharing: prefix-cache hits, forks (n > 1), swaps
# --------------------------------------------------------------------------------------------
def test_sliding_window_through_prefix_cache_hits_forks_and_preemption():
    """mistral-swa (W=8, block 8): a second run of the same prompts reads its first blocks from the
    prefix cache, n=2 forks share blocks and copy on write, and a tiny cache forces preemption; the
    greedy tokens stay transformers'."""
    import numpy as np
    ref = np.load(FIXTURES / "mistral-swa" / "reference.npz")
    off = ref["prompt_offsets"]
    prompts = [ref["prompt_ids_flat"][off[i]:off[i + 1]].tolist() for i in range(len(off) - 1)]
    want = ref["greedy_ids"].tolist()
    greedy = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    llm = LLM(FIXTURES / "mistral-swa", device="cpu", kv_cache_memory=4 << 20, block_size=8)
    assert [o.outputs[0].token_ids for o in llm.generate(None, greedy, prompt_token_ids=prompts)] == want
    assert [o.outputs[0].token_ids for o in llm.generate(None, greedy, prompt_token_ids=prompts)] == want
    assert llm.get_stats()["prefix_cache_hits"] > 0
    forks = llm.generate(None, SamplingParams(temperature=0, n=2, best_of=2, max_tokens=16, ignore_eos=True),
                         prompt_token_ids=prompts)
    assert all(c.token_ids == want[i] for i, o in enumerate(forks) for c in o.outputs)
    from rawpaged.worker.cache_engine import block_bytes
    cfg = llm.engine.model_config
    tight = LLM(FIXTURES / "mistral-swa", device="cpu", block_size=8, kv_cache_memory=8 * block_bytes(cfg, 8, np.float32),
                preemption_mode="swap", swap_space=64 * block_bytes(cfg, 8, np.float32) / (1 << 30))
    assert [o.outputs[0].token_ids for o in tight.generate(None, greedy, prompt_token_ids=prompts)] == want
    assert tight.get_stats()["num_preemptions_swap"] + tight.get_stats().get("num_preemptions_recompute", 0) > 0
