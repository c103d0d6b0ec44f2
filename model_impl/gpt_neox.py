"""GPT-NeoX / Pythia: LayerNorm blocks, partial rotary, parallel residual, fused query_key_value.

- `attention.query_key_value` [3H, H] interleaves per head: rows h*3D .. h*3D+3D of head h are its
  q, k, v (D each). It is reordered once at load time into [q of every head; k; v], the layout
  split_heads reads (bias likewise).
- Rotary over the first `rotary_pct` (transformers 5: `partial_rotary_factor`, default 0.25) of
  each head, rotate_half within those dims; `rotary_emb_base` is rope_theta.
- use_parallel_residual (default true): h = h + attn(ln_1(h)) + mlp(ln_2(h)); otherwise
  h = h + attn(ln_1(h)); h = h + mlp(ln_2(h)).
- Untied `embed_out` head unless tie_word_embeddings.
"""
from __future__ import annotations

import numpy as np

from model_impl.layers import WeightSet, attention, split_heads
from model_impl.rope import cos_sin_cache
from rawpaged.config import ModelConfig
from rawpaged.errors import RawpagedError
from rawpaged.worker.model_runner import AttentionMetadata

_ACTIVATIONS = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu_fast": "gelu_tanh",
                "relu": "relu"}


class GPTNeoXForCausalLM:
    def __init__(self, config: ModelConfig, backend, dtype):
        self.cfg = config
        self.backend = backend
        self.dtype = dtype
        hf = config.hf
        self.eps = float(hf.get("layer_norm_eps", 1e-5))
        self.intermediate = int(config.require("intermediate_size"))
        self.parallel = bool(hf.get("use_parallel_residual", True))
        self.bias = bool(hf.get("attention_bias", True))
        self.tie = bool(hf.get("tie_word_embeddings", False))
        act = hf.get("hidden_act", "gelu")
        if act not in _ACTIVATIONS:
            raise RawpagedError(f"hidden_act {act!r} is not supported for GPT-NeoX ({', '.join(_ACTIVATIONS)})")
        self.act = getattr(backend, _ACTIVATIONS[act])
        self.cos_sin = backend.to_device(cos_sin_cache(config.rope, config.max_model_len, hf["max_position_embeddings"]))
        self.scale = config.head_dim ** -0.5
        self.layers: list[dict] = []

    # -- weights ------------------------------------------------------------------------------
    def expected_weights(self) -> tuple[dict, set]:
        c = self.cfg
        H, V, I = c.hidden_size, c.vocab_size, self.intermediate
        g = "gpt_neox."
        shapes = {g + "embed_in.weight": (V, H), g + "final_layer_norm.weight": (H,),
                  g + "final_layer_norm.bias": (H,), "embed_out.weight": (V, H)}
        for i in range(c.num_layers):
            p = f"{g}layers.{i}."
            shapes.update({
                p + "input_layernorm.weight": (H,), p + "input_layernorm.bias": (H,),
                p + "post_attention_layernorm.weight": (H,), p + "post_attention_layernorm.bias": (H,),
                p + "attention.query_key_value.weight": (3 * H, H), p + "attention.dense.weight": (H, H),
                p + "mlp.dense_h_to_4h.weight": (I, H), p + "mlp.dense_h_to_4h.bias": (I,),
                p + "mlp.dense_4h_to_h.weight": (H, I), p + "mlp.dense_4h_to_h.bias": (H,),
            })
            if self.bias:
                shapes.update({p + "attention.query_key_value.bias": (3 * H,), p + "attention.dense.bias": (H,)})
        return shapes, {"embed_out.weight"} if self.tie else set()

    def _uninterleave(self, a: np.ndarray) -> np.ndarray:
        """[(heads, 3, D), ...] rows -> [(3, heads, D), ...]: q of every head, then k, then v."""
        c = self.cfg
        return a.reshape(c.num_heads, 3, c.head_dim, *a.shape[1:]).swapaxes(0, 1).reshape(a.shape)

    def load_weights(self, named_tensors, where: str = "checkpoint") -> None:
        shapes, optional = self.expected_weights()
        ws = WeightSet(shapes, optional, where)
        for name, array in named_tensors:
            ws.add(name, array)
        w = ws.finish()
        dev = lambda a: self.backend.to_device(a, self.dtype)  # noqa: E731
        ln = lambda n: (dev(w[n + ".weight"]), dev(w[n + ".bias"]))  # noqa: E731
        g = "gpt_neox."
        self.embed = dev(w[g + "embed_in.weight"])
        self.final_ln = ln(g + "final_layer_norm")
        self.head = self.embed if self.tie or "embed_out.weight" not in w else dev(w["embed_out.weight"])
        self.layers = []
        for i in range(self.cfg.num_layers):
            p = f"{g}layers.{i}."
            a, m = p + "attention.", p + "mlp."
            self.layers.append({
                "ln_1": ln(p + "input_layernorm"), "ln_2": ln(p + "post_attention_layernorm"),
                "qkv": dev(self._uninterleave(w[a + "query_key_value.weight"])),
                "qkv_b": dev(self._uninterleave(w[a + "query_key_value.bias"])) if self.bias else None,
                "o": dev(w[a + "dense.weight"]), "o_b": dev(w[a + "dense.bias"]) if self.bias else None,
                "fc": dev(w[m + "dense_h_to_4h.weight"]), "fc_b": dev(w[m + "dense_h_to_4h.bias"]),
                "proj": dev(w[m + "dense_4h_to_h.weight"]), "proj_b": dev(w[m + "dense_4h_to_h.bias"]),
            })

    # -- forward ------------------------------------------------------------------------------
    def _mlp(self, x, L):
        b = self.backend
        return b.linear(self.act(b.linear(x, L["fc"], L["fc_b"])), L["proj"], L["proj_b"])

    def forward(self, input_ids, positions, kv_cache, meta: AttentionMetadata):
        """input_ids, positions [T] -> final hidden states [T, H] (after final_layer_norm)."""
        b, c = self.backend, self.cfg
        h = b.embedding(input_ids, self.embed)                        # [T, H]
        for i, L in enumerate(self.layers):
            x = b.layer_norm(h, *L["ln_1"], self.eps)
            q, k, v = split_heads(b.xp, b.linear(x, L["qkv"], L["qkv_b"]), c.num_heads, c.num_heads, c.head_dim)
            b.rotary_embedding(positions, q, k, self.cos_sin, True)  # the first rot_dim dims, rotate_half
            attn = b.linear(attention(b, q, k, v, kv_cache, i, meta, self.scale), L["o"], L["o_b"])
            if self.parallel:
                h = h + attn + self._mlp(b.layer_norm(h, *L["ln_2"], self.eps), L)
            else:
                h = h + attn
                h = h + self._mlp(b.layer_norm(h, *L["ln_2"], self.eps), L)
        return b.layer_norm(h, *self.final_ln, self.eps)

    def compute_logits(self, hidden):
        """hidden [N, H] -> logits [N, vocab] in float32."""
        return self.backend.linear(hidden, self.head).astype(self.backend.xp.float32, copy=False)
