"""Phi-3: the LLaMA family with fused checkpoint weights and sliding-window attention.

- `self_attn.qkv_proj` [(Hq + 2 Hkv) D, H] is already the fused q/k/v layout rawpaged runs, and
  `mlp.gate_up_proj` [2I, H] the fused gate/up one (gate rows first, as transformers' chunk(2) reads);
  a tensor-parallel rank reads its heads' rows of each part (three slices, two for gate/up);
- `sliding_window` (Phi-3-mini: 2047) windows every layer; partial rotary through
  `partial_rotary_factor`; no biases.
- LongRoPE (`rope_scaling` type "longrope" / "su", the 128k variants) is refused by config.rope_spec.
"""
from __future__ import annotations

import numpy as np

from model_impl.llama import LlamaForCausalLM
from model_impl.parallel import rows


class Phi3ForCausalLM(LlamaForCausalLM):
    def attention_biases(self) -> tuple[bool, bool]:
        return False, False

    def qkv_shapes(self, a: str, q_out: int, kv_out: int) -> dict:
        return {a + "qkv_proj.weight": (q_out + 2 * kv_out, self.cfg.hidden_size)}

    def gate_up_shapes(self, m: str) -> dict:
        return {m + "gate_up_proj.weight": (2 * self.intermediate, self.cfg.hidden_size)}

    def fused_qkv(self, w, a: str, suffix: str = "weight") -> np.ndarray:
        """This rank's q rows, then k, then v, out of the fused [q; k; v] rows."""
        (q0, q1), (k0, k1) = self.head_rows()
        q_out, kv_out = self.cfg.num_heads * self.cfg.head_dim, self.cfg.num_kv_heads * self.cfg.head_dim
        name = f"{a}qkv_proj.{suffix}"
        return np.concatenate([rows(w, name, q0, q1), rows(w, name, q_out + k0, q_out + k1),
                               rows(w, name, q_out + kv_out + k0, q_out + kv_out + k1)])

    def fused_gate_up(self, w, m: str, suffix: str = "weight") -> np.ndarray:
        """This rank's gate rows, then its up rows, out of the fused [gate; up] rows."""
        i0, i1 = self.mlp_part
        name = f"{m}gate_up_proj.{suffix}"
        return np.concatenate([rows(w, name, i0, i1), rows(w, name, self.intermediate + i0, self.intermediate + i1)])
