"""Random models for tests and benchmarks: a Hugging Face directory written with NumPy only.

    make_random_llama(out_dir, tokenizer_json, hidden_size=512, num_layers=8, ...)

The weights are random normal (std `init_std`), the tokenizer is copied from a given tokenizer.json.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file


def make_random_llama(out_dir: str | Path, tokenizer_json: str | Path, *, hidden_size: int = 512,
                      num_layers: int = 8, num_heads: int = 8, num_kv_heads: int = 4,
                      vocab_size: int = 32000, intermediate_size: int | None = None,
                      max_position_embeddings: int = 2048, init_std: float = 0.02, seed: int = 0,
                      tie_word_embeddings: bool = False, dtype: str = "float32") -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    H, D = hidden_size, hidden_size // num_heads
    inter = intermediate_size or 4 * H * 2 // 3 // 32 * 32
    rand = lambda *shape: (rng.standard_normal(shape, dtype=np.float32) * init_std).astype(dtype)  # noqa: E731
    ones = lambda n: np.ones(n, dtype)  # noqa: E731
    w = {"model.embed_tokens.weight": rand(vocab_size, H), "model.norm.weight": ones(H)}
    if not tie_word_embeddings:
        w["lm_head.weight"] = rand(vocab_size, H)
    for i in range(num_layers):
        p = f"model.layers.{i}."
        w.update({
            p + "input_layernorm.weight": ones(H),
            p + "post_attention_layernorm.weight": ones(H),
            p + "self_attn.q_proj.weight": rand(num_heads * D, H),
            p + "self_attn.k_proj.weight": rand(num_kv_heads * D, H),
            p + "self_attn.v_proj.weight": rand(num_kv_heads * D, H),
            p + "self_attn.o_proj.weight": rand(H, num_heads * D),
            p + "mlp.gate_proj.weight": rand(inter, H),
            p + "mlp.up_proj.weight": rand(inter, H),
            p + "mlp.down_proj.weight": rand(H, inter),
        })
    save_file(w, str(out / "model.safetensors"))
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": H,
        "intermediate_size": inter, "num_hidden_layers": num_layers, "num_attention_heads": num_heads,
        "num_key_value_heads": num_kv_heads, "vocab_size": vocab_size,
        "max_position_embeddings": max_position_embeddings, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
        "tie_word_embeddings": tie_word_embeddings, "bos_token_id": 1, "eos_token_id": 2,
        "hidden_act": "silu", "torch_dtype": dtype,
    }
    (out / "config.json").write_text(json.dumps(config, indent=2))
    shutil.copyfile(tokenizer_json, out / "tokenizer.json")
    (out / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "</s>", "add_bos_token": True, "add_eos_token": False}))
    return out
