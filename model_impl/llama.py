"""LLaMA family: RMSNorm, rotary positions (rotate_half), SwiGLU MLP, grouped-query attention.

Weights keep Hugging Face's [out, in] layout; q/k/v and gate/up are fused at load time so each
layer runs 4 GEMMs: qkv, o, gate_up, down.
"""
from __future__ import annotations

import numpy as np

from model_impl.layers import WeightSet, attention, rope_cos_sin_cache
from rawpaged.worker.model_runner import AttentionMetadata
from rawpaged.config import ModelConfig
from rawpaged.errors import RawpagedError


class LlamaForCausalLM:
    def __init__(self, config: ModelConfig, backend, dtype):
        self.cfg = config
        self.backend = backend
        self.dtype = dtype
        hf = config.hf
        self.eps = float(hf.get("rms_norm_eps", 1e-6))
        self.tie = bool(hf.get("tie_word_embeddings", False))
        self.attn_bias = bool(hf.get("attention_bias", False))
        self.mlp_bias = bool(hf.get("mlp_bias", False))
        self.intermediate = int(config.require("intermediate_size"))
        act = hf.get("hidden_act", "silu")
        if act != "silu":
            raise RawpagedError(f"hidden_act {act!r} is not supported for {config.architecture} (only silu)")
        # transformers >= 5 writes "rope_parameters": {"rope_type", "rope_theta"}; older files
        # write top-level "rope_theta" and "rope_scaling".
        rope = dict(hf.get("rope_parameters") or {})
        rope.update(hf.get("rope_scaling") or {})
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type != "default":
            raise RawpagedError(f"rope type {rope_type!r} in {config.path / 'config.json'} is not supported yet")
        theta = float(hf.get("rope_theta") or rope.get("rope_theta") or 10000.0)
        rot_dim = int(config.head_dim * float(hf.get("partial_rotary_factor", 1.0)))
        self.cos_sin = backend.to_device(rope_cos_sin_cache(rot_dim, config.max_model_len, theta))
        self.scale = config.head_dim ** -0.5
        self.layers: list[dict] = []

    # -- weights ------------------------------------------------------------------------------
    def expected_weights(self) -> tuple[dict, set]:
        c = self.cfg
        H, D, V, I = c.hidden_size, c.head_dim, c.vocab_size, self.intermediate
        q_out, kv_out = c.num_heads * D, c.num_kv_heads * D
        shapes = {"model.embed_tokens.weight": (V, H), "model.norm.weight": (H,), "lm_head.weight": (V, H)}
        optional = {"lm_head.weight"} if self.tie else set()
        for i in range(c.num_layers):
            p = f"model.layers.{i}."
            shapes.update({
                p + "input_layernorm.weight": (H,),
                p + "post_attention_layernorm.weight": (H,),
                p + "self_attn.q_proj.weight": (q_out, H),
                p + "self_attn.k_proj.weight": (kv_out, H),
                p + "self_attn.v_proj.weight": (kv_out, H),
                p + "self_attn.o_proj.weight": (H, q_out),
                p + "mlp.gate_proj.weight": (I, H),
                p + "mlp.up_proj.weight": (I, H),
                p + "mlp.down_proj.weight": (H, I),
            })
            if self.attn_bias:
                shapes.update({p + "self_attn.q_proj.bias": (q_out,), p + "self_attn.k_proj.bias": (kv_out,),
                               p + "self_attn.v_proj.bias": (kv_out,), p + "self_attn.o_proj.bias": (H,)})
            if self.mlp_bias:
                shapes.update({p + "mlp.gate_proj.bias": (I,), p + "mlp.up_proj.bias": (I,),
                               p + "mlp.down_proj.bias": (H,)})
        return shapes, optional

    def load_weights(self, named_tensors, where: str = "checkpoint") -> None:
        shapes, optional = self.expected_weights()
        ws = WeightSet(shapes, optional, where)
        for name, array in named_tensors:
            ws.add(name, array)
        w = ws.finish()
        dev = lambda a: self.backend.to_device(a, self.dtype)  # noqa: E731
        cat = lambda *names: np.concatenate([w[n] for n in names], axis=0)  # noqa: E731
        self.embed = dev(w["model.embed_tokens.weight"])
        self.norm = dev(w["model.norm.weight"])
        self.lm_head = self.embed if self.tie or "lm_head.weight" not in w else dev(w["lm_head.weight"])
        self.layers = []
        for i in range(self.cfg.num_layers):
            p = f"model.layers.{i}."
            a, m = p + "self_attn.", p + "mlp."
            layer = {
                "in_norm": dev(w[p + "input_layernorm.weight"]),
                "post_norm": dev(w[p + "post_attention_layernorm.weight"]),
                "qkv": dev(cat(a + "q_proj.weight", a + "k_proj.weight", a + "v_proj.weight")),
                "o": dev(w[a + "o_proj.weight"]),
                "gate_up": dev(cat(m + "gate_proj.weight", m + "up_proj.weight")),
                "down": dev(w[m + "down_proj.weight"]),
                "qkv_b": None, "o_b": None, "gate_up_b": None, "down_b": None,
            }
            if self.attn_bias:
                layer["qkv_b"] = dev(cat(a + "q_proj.bias", a + "k_proj.bias", a + "v_proj.bias"))
                layer["o_b"] = dev(w[a + "o_proj.bias"])
            if self.mlp_bias:
                layer["gate_up_b"] = dev(cat(m + "gate_proj.bias", m + "up_proj.bias"))
                layer["down_b"] = dev(w[m + "down_proj.bias"])
            self.layers.append(layer)

    # -- forward ------------------------------------------------------------------------------
    def forward(self, input_ids, positions, kv_cache, meta: AttentionMetadata):
        """input_ids, positions [T] -> final hidden states [T, hidden] (normalised)."""
        b, c = self.backend, self.cfg
        nq, nkv, D = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim, c.head_dim
        h = b.embedding(input_ids, self.embed)                        # [T, H]
        residual = None
        for i, L in enumerate(self.layers):
            # Attention block: x = RMSNorm(h + residual); h = o(attn(rope(q), rope(k), v))
            if residual is None:
                residual = h
                x = b.rms_norm(h, L["in_norm"], self.eps)
            else:
                x, residual = b.fused_add_rms_norm(h, residual, L["in_norm"], self.eps)
            qkv = b.linear(x, L["qkv"], L["qkv_b"])                   # [T, nq + 2 nkv]
            T = qkv.shape[0]
            q = qkv[:, :nq].reshape(T, c.num_heads, D)
            k = qkv[:, nq:nq + nkv].reshape(T, c.num_kv_heads, D)
            v = qkv[:, nq + nkv:].reshape(T, c.num_kv_heads, D)
            q, k, v = (b.xp.ascontiguousarray(t) for t in (q, k, v))
            b.rotary_embedding(positions, q, k, self.cos_sin, True)  # rotate_half, in place
            o = attention(b, q, k, v, kv_cache, i, meta, self.scale)  # [T, nq]
            h = b.linear(o, L["o"], L["o_b"])                         # [T, H]
            # MLP block: x = RMSNorm(h + residual); h = down(silu(gate(x)) * up(x))
            x, residual = b.fused_add_rms_norm(h, residual, L["post_norm"], self.eps)
            gu = b.linear(x, L["gate_up"], L["gate_up_b"])            # [T, 2I]
            h = b.linear(b.silu_and_mul(gu), L["down"], L["down_b"])  # [T, H]
        x, _ = b.fused_add_rms_norm(h, residual, self.norm, self.eps)
        return x

    def compute_logits(self, hidden):
        """hidden [N, H] -> logits [N, vocab] in float32."""
        return self.backend.linear(hidden, self.lm_head).astype(self.backend.xp.float32, copy=False)
