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

from model_impl.layers import WeightSet, rope_attention, split_heads
from model_impl.parallel import SINGLE, TensorParallel, cols, rank0_only, rows, vocab_table
from model_impl.rope import cos_sin_cache
from rawpaged.config import ModelConfig
from rawpaged.errors import RawpagedError
from rawpaged.worker.model_runner import AttentionMetadata

_ACTIVATIONS = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu_fast": "gelu_tanh",
                "relu": "relu"}


class GPTNeoXForCausalLM:
    def __init__(self, config: ModelConfig, backend, dtype, tp: TensorParallel = SINGLE):
        self.cfg = config
        self.backend = backend
        self.dtype = dtype
        self.tp = tp
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
        self.heads = tp.heads(config.num_heads, config.num_heads)
        self.mlp_part = tp.part(self.intermediate)
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
        """[(heads, 3, D), ...] rows -> [(3, heads, D), ...]: q of every head, then k, then v
        (of this rank's heads: its rows of query_key_value are one contiguous run)."""
        return a.reshape(self.heads.num_q, 3, self.cfg.head_dim, *a.shape[1:]).swapaxes(0, 1).reshape(a.shape)

    def load_weights(self, named_tensors, where: str = "checkpoint") -> None:
        shapes, optional = self.expected_weights()
        ws = WeightSet(shapes, optional, where)
        for name, array in named_tensors:
            ws.add(name, array)
        w = ws.finish()
        tp, V, D = self.tp, self.cfg.vocab_size, self.cfg.head_dim
        dev = lambda a: None if a is None else self.backend.to_device(a, self.dtype)  # noqa: E731
        ln = lambda n: (dev(w[n + ".weight"]), dev(w[n + ".bias"]))  # noqa: E731
        g = "gpt_neox."
        self.embed = dev(vocab_table(tp, w, g + "embed_in.weight", V, zero_row=True))
        self.final_ln = ln(g + "final_layer_norm")
        untied = not self.tie and "embed_out.weight" in w
        self.head = dev(vocab_table(tp, w, "embed_out.weight", V, zero_row=False)) if untied else \
            self.embed[:tp.vocab(V).rows] if tp.enabled else self.embed
        q0, q1 = self.heads.q_start * D, (self.heads.q_start + self.heads.num_q) * D    # of dense's inputs
        i0, i1 = self.mlp_part
        qkv = lambda n: self._uninterleave(rows(w, n, 3 * q0, 3 * q1))  # noqa: E731  its heads' [q, k, v] rows
        self.layers = []
        for i in range(self.cfg.num_layers):
            p = f"{g}layers.{i}."
            a, m = p + "attention.", p + "mlp."
            self.layers.append({
                "ln_1": ln(p + "input_layernorm"), "ln_2": ln(p + "post_attention_layernorm"),
                "qkv": dev(qkv(a + "query_key_value.weight")),
                "qkv_b": dev(qkv(a + "query_key_value.bias")) if self.bias else None,
                "o": dev(cols(w, a + "dense.weight", q0, q1)),
                "o_b": dev(rank0_only(tp, w[a + "dense.bias"])) if self.bias else None,
                "fc": dev(rows(w, m + "dense_h_to_4h.weight", i0, i1)), "fc_b": dev(rows(w, m + "dense_h_to_4h.bias", i0, i1)),
                "proj": dev(cols(w, m + "dense_4h_to_h.weight", i0, i1)),
                "proj_b": dev(rank0_only(tp, w[m + "dense_4h_to_h.bias"])),
            })

    # -- forward ------------------------------------------------------------------------------
    def _mlp(self, x, L):
        b = self.backend
        return self.tp.all_reduce(b.linear(self.act(b.linear(x, L["fc"], L["fc_b"])), L["proj"], L["proj_b"]))

    def forward(self, input_ids, positions, kv_cache, meta: AttentionMetadata):
        """input_ids, positions [T] -> final hidden states [T, H] (after final_layer_norm).

        NOTE: the residual stream is carried as (delta, residual): the next LayerNorm adds delta to
        the residual itself (fused_add_layer_norm). Parallel residual: delta = attn + mlp, summed in
        transformers' order ((mlp + attn) + h; the adds commute)."""
        b, c, tp = self.backend, self.cfg, self.tp
        nq = self.heads.num_q                                         # this rank's heads
        residual = tp.embed(b, input_ids, self.embed, c.vocab_size)   # [T, H]
        delta = None
        for i, L in enumerate(self.layers):
            if delta is None:
                x = b.layer_norm(residual, *L["ln_1"], self.eps)
            else:
                x, residual = b.fused_add_layer_norm(delta, residual, *L["ln_1"], self.eps)
            q, k, v = split_heads(b.xp, b.linear(x, L["qkv"], L["qkv_b"]), nq, nq, c.head_dim)   # views
            # the first rot_dim dims, rotate_half: q in place, k into the cache with v
            o = rope_attention(b, positions, q, k, v, self.cos_sin, True, kv_cache, i, meta, self.scale)
            attn = tp.all_reduce(b.linear(o, L["o"], L["o_b"]))
            if self.parallel:
                delta = attn + self._mlp(b.layer_norm(residual, *L["ln_2"], self.eps), L)
            else:
                x, residual = b.fused_add_layer_norm(attn, residual, *L["ln_2"], self.eps)
                delta = self._mlp(x, L)
        if delta is None:
            return b.layer_norm(residual, *self.final_ln, self.eps)
        x, _ = b.fused_add_layer_norm(delta, residual, *self.final_ln, self.eps)
        return x

    def compute_logits(self, hidden):
        """hidden [N, H] -> logits [N, vocab] in float32 (tensor-parallel: on rank 0, None elsewhere)."""
        return self.tp.logits(self.backend, hidden, self.head, self.cfg.vocab_size)
