"""Phi-3: the LLaMA family with fused checkpoint weights and sliding-window attention.

- `self_attn.qkv_proj` [(Hq + 2 Hkv) D, H] is already the fused q/k/v layout rawpaged runs, and
  `mlp.gate_up_proj` [2I, H] the fused gate/up one (gate rows first, as transformers' chunk(2) reads);
- `sliding_window` (Phi-3-mini: 2047) windows every layer; partial rotary through
  `partial_rotary_factor`; no biases.
- LongRoPE (`rope_scaling` type "longrope" / "su", the 128k variants) is refused by config.rope_spec.
"""
from __future__ import annotations

import numpy as np

from model_impl.llama import LlamaForCausalLM


class Phi3ForCausalLM(LlamaForCausalLM):
    def attention_biases(self) -> tuple[bool, bool]:
        return False, False

    def qkv_shapes(self, a: str, q_out: int, kv_out: int) -> dict:
        return {a + "qkv_proj.weight": (q_out + 2 * kv_out, self.cfg.hidden_size)}

    def gate_up_shapes(self, m: str) -> dict:
        return {m + "gate_up_proj.weight": (2 * self.intermediate, self.cfg.hidden_size)}

    def fused_qkv(self, w: dict, a: str) -> np.ndarray:
        return w[a + "qkv_proj.weight"]

    def fused_gate_up(self, w: dict, m: str) -> np.ndarray:
        return w[m + "gate_up_proj.weight"]
