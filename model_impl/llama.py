"""LLaMA family: RMSNorm, rotary positions (rotate_half), SwiGLU MLP, grouped-query attention.
Mistral is LLaMA with sliding-window attention (`sliding_window`: every layer).

Weights keep Hugging Face's [out, in] layout; q/k/v and gate/up are fused at load time so each
layer runs 4 GEMMs: qkv, o, gate_up, down. The families built on this one (qwen.py, gemma.py,
phi3.py) change it through the small hooks below: which biases, q/k norms, the norm gain offset,
the embedding scale, the gated activation and the checkpoint's weight names.
"""
from __future__ import annotations

import numpy as np

from model_impl.layers import WeightSet, rope_attention, split_heads
from model_impl.parallel import SINGLE, TensorParallel, cols, rank0_only, rows, vocab_table
from model_impl.rope import cos_sin_cache
from rawpaged.config import ModelConfig
from rawpaged.errors import RawpagedError
from rawpaged.worker.model_runner import AttentionMetadata


class LlamaForCausalLM:
    activations = ("silu",)          # hidden_act values this family accepts
    norm_offset = 0.0                # Gemma stores RMSNorm gains as (weight - 1)

    def __init__(self, config: ModelConfig, backend, dtype, tp: TensorParallel = SINGLE):
        self.cfg = config
        self.backend = backend
        self.dtype = dtype
        self.tp = tp
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
        # this rank's heads and slice of the MLP (all of them without tensor parallelism)
        self.heads = tp.heads(config.num_heads, config.num_kv_heads)
        self.mlp_part = tp.part(self.intermediate)
        self._embed_scale = None         # Gemma's embedding factor as a device scalar (forward)
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

    def head_rows(self) -> tuple[tuple[int, int], tuple[int, int]]:
        """Rows of q_proj and of k_proj / v_proj this rank holds: its heads x head_dim."""
        hs, D = self.heads, self.cfg.head_dim
        return ((hs.q_start * D, (hs.q_start + hs.num_q) * D),
                (hs.kv_start * D, (hs.kv_start + hs.num_kv) * D))

    def fused_qkv(self, w, a: str, suffix: str = "weight") -> np.ndarray:
        """[(Hq + 2 Hkv) D, H]: q, k, v rows of this rank's heads stacked (the layout split_heads
        reads); suffix "bias" gives the matching [(Hq + 2 Hkv) D] bias."""
        q, kv = self.head_rows()
        return np.concatenate([rows(w, f"{a}q_proj.{suffix}", *q), rows(w, f"{a}k_proj.{suffix}", *kv),
                               rows(w, f"{a}v_proj.{suffix}", *kv)])

    def fused_gate_up(self, w, m: str, suffix: str = "weight") -> np.ndarray:
        """[2I, H]: gate rows, then up rows of this rank's slice (what silu_and_mul / gelu_tanh_and_mul take)."""
        i0, i1 = self.mlp_part
        return np.concatenate([rows(w, f"{m}gate_proj.{suffix}", i0, i1), rows(w, f"{m}up_proj.{suffix}", i0, i1)])

    def load_weights(self, named_tensors, where: str = "checkpoint") -> None:
        shapes, optional = self.expected_weights()
        ws = WeightSet(shapes, optional, where)
        for name, array in named_tensors:
            ws.add(name, array)
        w = ws.finish()
        tp, V = self.tp, self.cfg.vocab_size
        dev = lambda a: None if a is None else self.backend.to_device(a, self.dtype)  # noqa: E731
        gain = lambda n: dev(w[n] + np.float32(self.norm_offset) if self.norm_offset else w[n])  # noqa: E731
        self.embed = dev(vocab_table(tp, w, "model.embed_tokens.weight", V, zero_row=True))
        self.norm = gain("model.norm.weight")
        untied = not self.tie and "lm_head.weight" in w
        # NOTE: a tied head is the embedding without its zero row (a view: held once).
        self.lm_head = dev(vocab_table(tp, w, "lm_head.weight", V, zero_row=False)) if untied else \
            self.embed[:tp.vocab(V).rows] if tp.enabled else self.embed
        q_cols, _ = self.head_rows()
        i0, i1 = self.mlp_part
        self.layers = []
        for i in range(self.cfg.num_layers):
            p = f"model.layers.{i}."
            a, m = p + "self_attn.", p + "mlp."
            layer = {
                "in_norm": gain(p + "input_layernorm.weight"),
                "post_norm": gain(p + "post_attention_layernorm.weight"),
                "qkv": dev(self.fused_qkv(w, a)),
                "o": dev(cols(w, a + "o_proj.weight", *q_cols)),                # row-parallel: its heads' inputs
                "gate_up": dev(self.fused_gate_up(w, m)),
                "down": dev(cols(w, m + "down_proj.weight", i0, i1)),
                # NOTE: biases are always separate tensors (q_proj.bias, ...), even where the weights are fused
                "qkv_b": dev(LlamaForCausalLM.fused_qkv(self, w, a, "bias")) if self.qkv_bias else None,
                "o_b": dev(rank0_only(tp, w[a + "o_proj.bias"])) if self.o_bias else None,
                "q_norm": dev(w[a + "q_norm.weight"]) if self.has_qk_norm() else None,
                "k_norm": dev(w[a + "k_norm.weight"]) if self.has_qk_norm() else None,
                "gate_up_b": dev(LlamaForCausalLM.fused_gate_up(self, w, m, "bias")) if self.mlp_bias else None,
                "down_b": dev(rank0_only(tp, w[m + "down_proj.bias"])) if self.mlp_bias else None,
            }
            self.layers.append(layer)

    # -- forward ------------------------------------------------------------------------------
    def forward(self, input_ids, positions, kv_cache, meta: AttentionMetadata):
        """input_ids, positions [T] -> final hidden states [T, hidden] (normalised)."""
        b, c, tp = self.backend, self.cfg, self.tp
        nq, nkv = self.heads.num_q, self.heads.num_kv                 # this rank's heads
        h = tp.embed(b, input_ids, self.embed, c.vocab_size)          # [T, H]
        scale = self.embed_scale()
        if scale is not None:
            # Gemma: embedding * sqrt(H), the factor rounded to the model dtype as transformers does
            # NOTE: held on the device: an upload per step cannot be captured in a CUDA graph.
            if self._embed_scale is None:
                self._embed_scale = b.xp.asarray(scale, dtype=h.dtype)
            h = h * self._embed_scale
        residual = None
        for i, L in enumerate(self.layers):
            # Attention block: x = RMSNorm(h + residual); h = o(attn(rope(q), rope(k), v))
            if residual is None:
                residual = h
                x = b.rms_norm(h, L["in_norm"], self.eps)
            else:
                x, residual = b.fused_add_rms_norm(h, residual, L["in_norm"], self.eps)
            q, k, v = split_heads(b.xp, b.linear(x, L["qkv"], L["qkv_b"]), nq, nkv, c.head_dim)
            if L["q_norm"] is not None:                               # Qwen3: RMSNorm per head, before RoPE
                q = b.rms_norm(q.reshape(-1, c.head_dim), L["q_norm"], self.eps).reshape(q.shape)
                k = b.rms_norm(k.reshape(-1, c.head_dim), L["k_norm"], self.eps).reshape(k.shape)
            # rotate_half: q in place, k into the cache with v (one launch)
            o = rope_attention(b, positions, q, k, v, self.cos_sin, True, kv_cache, i, meta, self.scale,
                               self.windows[i])                          # [T, nq D]
            h = tp.all_reduce(b.linear(o, L["o"], L["o_b"]))          # [T, H]: summed over ranks
            # MLP block: x = RMSNorm(h + residual); h = down(act(gate(x)) * up(x))
            x, residual = b.fused_add_rms_norm(h, residual, L["post_norm"], self.eps)
            gu = b.linear(x, L["gate_up"], L["gate_up_b"])            # [T, 2I/N]
            h = tp.all_reduce(b.linear(self.act_and_mul(gu), L["down"], L["down_b"]))  # [T, H]
        x, _ = b.fused_add_rms_norm(h, residual, self.norm, self.eps)
        return x

    def fuses_decode(self) -> bool:
        """Whether `forward` is exactly the stack the CPU's fused decode step runs
        (rawpaged/backend/cpu/decode_step.py): RMSNorm, fused qkv without bias or q/k norms, rotate_half
        RoPE, SwiGLU without biases, no embedding scale, one rank. Others keep the per-op path."""
        if self.tp.enabled or self.embed_scale() is not None or self.act_and_mul != self.backend.silu_and_mul \
                or not self.layers or type(self).forward is not LlamaForCausalLM.forward:
            return False
        return all(L[n] is None for L in self.layers for n in ("qkv_b", "o_b", "q_norm", "k_norm", "gate_up_b",
                                                                  "down_b"))

    def compute_logits(self, hidden):
        """hidden [N, H] -> logits [N, vocab] in float32 (tensor-parallel: on rank 0, None elsewhere)."""
        return self.tp.logits(self.backend, hidden, self.lm_head, self.cfg.vocab_size)
