"""Gemma (the first generation): the LLaMA family with

- RMSNorm gains stored as (gain - 1): y = x / rms(x) * (1 + weight); the 1 is added at load time;
- the token embedding scaled by sqrt(hidden_size) (the tied LM head uses the unscaled table);
- GeGLU: down(gelu_tanh(gate(x)) * up(x)); transformers reads hidden_act "gelu" as the tanh
  approximation for Gemma (its configs said "gelu" where "gelu_pytorch_tanh" was meant);
- head_dim from config.json (256 for Gemma-2B/7B, not hidden_size / heads); tied head by default.
"""
from __future__ import annotations

import math

from model_impl.llama import LlamaForCausalLM


class GemmaForCausalLM(LlamaForCausalLM):
    activations = ("gelu_pytorch_tanh", "gelu_new", "gelu")
    norm_offset = 1.0

    def default_tie(self) -> bool:
        return True

    def hidden_act(self) -> str:
        return self.cfg.hf.get("hidden_act", "gelu_pytorch_tanh")

    def embed_scale(self) -> float:
        return math.sqrt(self.cfg.hidden_size)
