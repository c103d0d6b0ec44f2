"""LLaMA family: RMSNorm, rotary positions (rotate_half), SwiGLU MLP, grouped-query attention.
Mistral is LLaMA with sliding-window attention (`sliding_window`: every layer).

Weights keep Hugging Face's [out, in] layout; q/k/v and gate/up are fused at load time so each
layer runs 4 GEMMs: qkv, o, gate_up, down. The families built on this one (qwen.py, gemma.py,
phi3.py) change it through the small hooks below: which biases, q/k norms, the norm gain offset,
the embedding scale, the gated activation and the checkpoint's weight names.
"""
from __future__ import annotations

import numpy as np

from model_impl.layers import WeightSet, attention, split_heads
from model_impl.rope import cos_sin_cache
from rawpaged.config import ModelConfig
from rawpaged.errors import RawpagedError
from rawpaged.worker.model_runner import AttentionMetadata


class LlamaForCausalLM:
    activations = ("silu",)          # hidden_act values this family accepts
    norm_offset = 0.0                # Gemma stores RMSNorm gains as (weight - 1)

    def __init__(self, config: ModelConfig, backend, dtype):
        self.cfg = config
        self.backend = backend
        self.dtype = dtype
        hf = config.hf
        self.eps = float(hf.get("rms_norm_eps", 1e-6))
        self.tie = bool(hf.get("tie_word_embeddings", self.default_tie()))
        self.qkv_bias, self.o_bias = self.attention_biases()
        self.mlp_bias = bool(hf.get("mlp_bias", False))
        self.intermediate = int(config.require("intermediate_size"))
        act = self.hidden_act()
        if act not in self.activations:
            raise RawpagedError(f"hidden_act {act!r} is not supported for {config.architecture} "
                                f"(supported: {', '.join(self.activations)})")
        self.act_and_mul = backend.silu_and_mul if act == "silu" else backend.gelu_tanh_and_mul
        spec = config.rope
        self.cos_sin = backend.to_device(cos_sin_cache(spec, config.max_model_len, hf["max_position_embeddings"]))
        self.windows = config.layer_windows
        self.scale = config.head_dim ** -0.5
        self.layers: list[dict] = []

    # -- the hooks the families built on LLaMA change -------------------------------------------
    def default_tie(self) -> bool:
        return False

    def hidden_act(self) -> str:
        return self.cfg.hf.get("hidden_act", "silu")

    def attention_biases(self) -> tuple[bool, bool]:
        """(bias on q/k/v, bias on o). LLaMA: `attention_bias` for all four; Mistral: none."""
        if self.cfg.architecture == "MistralForCausalLM":
            return False, False
        bias = bool(self.cfg.hf.get("attention_bias", False))
        return bias, bias

    def has_qk_norm(self) -> bool:
        return False

    def embed_scale(self) -> float | None:
        return None

    # -- weights ------------------------------------------------------------------------------
    def expected_weights(self) -> tuple[dict, set]:
        c = self.cfg
        H, V = c.hidden_size, c.vocab_size
        shapes = {"model.embed_tokens.weight": (V, H), "model.norm.weight": (H,), "lm_head.weight": (V, H)}
        optional = {"lm_head.weight"} if self.tie else set()
        for i in range(c.num_layers):
            shapes.update(self.layer_shapes(f"model.layers.{i}."))
        return shapes, optional

    def layer_shapes(self, p: str) -> dict:
        c = self.cfg
        H, D, I = c.hidden_size, c.head_dim, self.intermediate
        q_out, kv_out = c.num_heads * D, c.num_kv_heads * D
        a, m = p + "self_attn.", p + "mlp."
        shapes = {p + "input_layernorm.weight": (H,), p + "post_attention_layernorm.weight": (H,),
                  a + "o_proj.weight": (H, q_out), m + "down_proj.weight": (H, I)}
        shapes.update(self.qkv_shapes(a, q_out, kv_out))
        shapes.update(self.gate_up_shapes(m))
        if self.qkv_bias:
            shapes.update({a + "q_proj.bias": (q_out,), a + "k_proj.bias": (kv_out,), a + "v_proj.bias": (kv_out,)})
        if self.o_bias:
            shapes[a + "o_proj.bias"] = (H,)
        if self.has_qk_norm():
            shapes.update({a + "q_norm.weight": (D,), a + "k_norm.weight": (D,)})
        if self.mlp_bias:
            shapes.update({m + "gate_proj.bias": (I,), m + "up_proj.bias": (I,), m + "down_proj.bias": (H,)})
        return shapes

    def qkv_shapes(self, a: str, q_out: int, kv_out: int) -> dict:
        H = self.cfg.hidden_size
        return {a + "q_proj.weight": (q_out, H), a + "k_proj.weight": (kv_out, H), a + "v_proj.weight": (kv_out, H)}

    def gate_up_shapes(self, m: str) -> dict:
        H, I = self.cfg.hidden_size, self.intermediate
        return {m + "gate_proj.weight": (I, H), m + "up_proj.weight": (I, H)}

    def fused_qkv(self, w: dict, a: str) -> np.ndarray:
        """[(Hq + 2 Hkv) D, H]: q, k, v rows stacked (the layout split_heads reads)."""
        return np.concatenate([w[a + "q_proj.weight"], w[a + "k_proj.weight"], w[a + "v_proj.weight"]])

    def fused_gate_up(self, w: dict, m: str) -> np.ndarray:
        """[2I, H]: gate rows, then up rows (what silu_and_mul / gelu_tanh_and_mul take)."""
        return np.concatenate([w[m + "gate_proj.weight"], w[m + "up_proj.weight"]])

    def load_weights(self, named_tensors, where: str = "checkpoint") -> None:
        shapes, optional = self.expected_weights()
        ws = WeightSet(shapes, optional, where)
        for name, array in named_tensors:
            ws.add(name, array)
        w = ws.finish()
        dev = lambda a: self.backend.to_device(a, self.dtype)  # noqa: E731
        cat = lambda *names: np.concatenate([w[n] for n in names], axis=0)  # noqa: E731
        gain = lambda n: dev(w[n] + np.float32(self.norm_offset) if self.norm_offset else w[n])  # noqa: E731
        self.embed = dev(w["model.embed_tokens.weight"])
        self.norm = gain("model.norm.weight")
        self.lm_head = self.embed if self.tie or "lm_head.weight" not in w else dev(w["lm_head.weight"])
        self.layers = []
        for i in range(self.cfg.num_layers):
            p = f"model.layers.{i}."
            a, m = p + "self_attn.", p + "mlp."
            layer = {
                "in_norm": gain(p + "input_layernorm.weight"),
                "post_norm": gain(p + "post_attention_layernorm.weight"),
                "qkv": dev(self.fused_qkv(w, a)),
                "o": dev(w[a + "o_proj.weight"]),
                "gate_up": dev(self.fused_gate_up(w, m)),
                "down": dev(w[m + "down_proj.weight"]),
                "qkv_b": dev(cat(a + "q_proj.bias", a + "k_proj.bias", a + "v_proj.bias")) if self.qkv_bias else None,
                "o_b": dev(w[a + "o_proj.bias"]) if self.o_bias else None,
                "q_norm": dev(w[a + "q_norm.weight"]) if self.has_qk_norm() else None,
                "k_norm": dev(w[a + "k_norm.weight"]) if self.has_qk_norm() else None,
                "gate_up_b": dev(cat(m + "gate_proj.bias", m + "up_proj.bias")) if self.mlp_bias else None,
                "down_b": dev(w[m + "down_proj.bias"]) if self.mlp_bias else None,
            }
            self.layers.append(layer)

    # -- forward ------------------------------------------------------------------------------
    def forward(self, input_ids, positions, kv_cache, meta: AttentionMetadata):
        """input_ids, positions [T] -> final hidden states [T, hidden] (normalised)."""
        b, c = self.backend, self.cfg
        h = b.embedding(input_ids, self.embed)                        # [T, H]
        scale = self.embed_scale()
        if scale is not None:
            h = h * b.xp.asarray(scale, dtype=h.dtype)                # Gemma: embedding * sqrt(H)
        residual = None
        for i, L in enumerate(self.layers):
            # Attention block: x = RMSNorm(h + residual); h = o(attn(rope(q), rope(k), v))
            if residual is None:
                residual = h
                x = b.rms_norm(h, L["in_norm"], self.eps)
            else:
                x, residual = b.fused_add_rms_norm(h, residual, L["in_norm"], self.eps)
            q, k, v = split_heads(b.xp, b.linear(x, L["qkv"], L["qkv_b"]), c.num_heads, c.num_kv_heads, c.head_dim)
            if L["q_norm"] is not None:                               # Qwen3: RMSNorm per head, before RoPE
                q = b.rms_norm(q.reshape(-1, c.head_dim), L["q_norm"], self.eps).reshape(q.shape)
                k = b.rms_norm(k.reshape(-1, c.head_dim), L["k_norm"], self.eps).reshape(k.shape)
            b.rotary_embedding(positions, q, k, self.cos_sin, True)  # rotate_half, in place
            o = attention(b, q, k, v, kv_cache, i, meta, self.scale, self.windows[i])   # [T, Hq D]
            h = b.linear(o, L["o"], L["o_b"])                         # [T, H]
            # MLP block: x = RMSNorm(h + residual); h = down(act(gate(x)) * up(x))
            x, residual = b.fused_add_rms_norm(h, residual, L["post_norm"], self.eps)
            gu = b.linear(x, L["gate_up"], L["gate_up_b"])            # [T, 2I]
            h = b.linear(self.act_and_mul(gu), L["down"], L["down_b"])  # [T, H]
        x, _ = b.fused_add_rms_norm(h, residual, self.norm, self.eps)
        return x

    def compute_logits(self, hidden):
        """hidden [N, H] -> logits [N, vocab] in float32."""
        return self.backend.linear(hidden, self.lm_head).astype(self.backend.xp.float32, copy=False)
