"""Qwen2 and Qwen3: the LLaMA family with other attention details.

- Qwen2: q/k/v projections carry biases, o does not (`attention_bias` is not read).
- Qwen3: RMSNorm over each head of q and k (`q_norm`, `k_norm`, [head_dim] gains) before RoPE;
  biases on q/k/v/o only with `attention_bias`; head_dim from config.json.
Both window the layers `layer_types` marks "sliding_attention" when `use_sliding_window` is set
(default: the layers from `max_window_layers` on): `ModelConfig.layer_windows`.
"""
from __future__ import annotations

from model_impl.llama import LlamaForCausalLM


class Qwen2ForCausalLM(LlamaForCausalLM):
    def attention_biases(self) -> tuple[bool, bool]:
        return True, False


class Qwen3ForCausalLM(LlamaForCausalLM):
    def attention_biases(self) -> tuple[bool, bool]:
        bias = bool(self.cfg.hf.get("attention_bias", False))
        return bias, bias

    def has_qk_norm(self) -> bool:
        return True
