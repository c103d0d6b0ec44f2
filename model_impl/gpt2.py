"""GPT-2: learned absolute positions, pre-LayerNorm blocks, gelu_new MLP, tied LM head.

The checkpoint stores its projections as `Conv1D` weights, [in, out] (y = x @ W + b), the transpose
of nn.Linear's [out, in]: they are transposed once at load time, so the layer runs the same
`linear` as every other family. `c_attn` [H, 3H] holds q, k and v side by side (columns), each
[H] = heads x head_dim. Names come with the `transformer.` prefix (GPT2LMHeadModel) or without it
(the original openai-community checkpoints, which also carry `attn.bias` mask buffers: ignored).
"""
from __future__ import annotations

import numpy as np

from model_impl.layers import WeightSet, attention, split_heads
from model_impl.parallel import SINGLE, TensorParallel, cols, rank0_only, rows, vocab_table
from rawpaged.config import ModelConfig
from rawpaged.errors import RawpagedError
from rawpaged.worker.model_runner import AttentionMetadata

_ACTIVATIONS = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu_fast": "gelu_tanh",
                "gelu": "gelu", "relu": "relu"}


class GPT2LMHeadModel:
    def __init__(self, config: ModelConfig, backend, dtype, tp: TensorParallel = SINGLE):
        self.cfg = config
        self.backend = backend
        self.dtype = dtype
        self.tp = tp
        hf = config.hf
        self.eps = float(hf.get("layer_norm_eps", 1e-5))
        self.inner = int(hf.get("intermediate_size") or 4 * config.hidden_size)
        self.tie = bool(hf.get("tie_word_embeddings", True))
        act = hf.get("activation_function", "gelu_new")
        if act not in _ACTIVATIONS:
            raise RawpagedError(f"activation_function {act!r} is not supported for GPT-2 ({', '.join(_ACTIVATIONS)})")
        self.act = getattr(backend, _ACTIVATIONS[act])
        scale = config.head_dim ** -0.5 if hf.get("scale_attn_weights", True) else 1.0
        # NOTE: scale_attn_by_inverse_layer_idx (Mistral's GPT-2 runs) divides layer i's scores by i + 1.
        by_layer = bool(hf.get("scale_attn_by_inverse_layer_idx", False))
        self.scales = [scale / (i + 1) if by_layer else scale for i in range(config.num_layers)]
        self.heads = tp.heads(config.num_heads, config.num_heads)
        self.mlp_part = tp.part(self.inner)
        self.layers: list[dict] = []

    # -- weights ------------------------------------------------------------------------------
    def expected_weights(self) -> tuple[dict, set]:
        c = self.cfg
        H, V, I = c.hidden_size, c.vocab_size, self.inner
        t = "transformer."
        shapes = {t + "wte.weight": (V, H), t + "wpe.weight": (c.hf["max_position_embeddings"], H),
                  t + "ln_f.weight": (H,), t + "ln_f.bias": (H,), "lm_head.weight": (V, H)}
        for i in range(c.num_layers):
            p = f"{t}h.{i}."
            shapes.update({
                p + "ln_1.weight": (H,), p + "ln_1.bias": (H,), p + "ln_2.weight": (H,), p + "ln_2.bias": (H,),
                p + "attn.c_attn.weight": (H, 3 * H), p + "attn.c_attn.bias": (3 * H,),
                p + "attn.c_proj.weight": (H, H), p + "attn.c_proj.bias": (H,),
                p + "mlp.c_fc.weight": (H, I), p + "mlp.c_fc.bias": (I,),
                p + "mlp.c_proj.weight": (I, H), p + "mlp.c_proj.bias": (H,),
            })
        return shapes, {"lm_head.weight"} if self.tie else set()

    def load_weights(self, named_tensors, where: str = "checkpoint") -> None:
        shapes, optional = self.expected_weights()
        ws = WeightSet(shapes, optional, where)
        for name, array in named_tensors:
            if not name.startswith(("transformer.", "lm_head.")):
                name = "transformer." + name            # openai-community/gpt2 names
            ws.add(name, array)
        w = ws.finish()
        tp, V, H, D = self.tp, self.cfg.vocab_size, self.cfg.hidden_size, self.cfg.head_dim
        put = lambda a: None if a is None else self.backend.to_device(a, self.dtype)  # noqa: E731
        dev = lambda n: put(w[n])  # noqa: E731
        t = "transformer."
        self.wte = put(vocab_table(tp, w, t + "wte.weight", V, zero_row=True))
        self.wpe = dev(t + "wpe.weight")
        self.ln_f = (dev(t + "ln_f.weight"), dev(t + "ln_f.bias"))
        untied = not self.tie and "lm_head.weight" in w
        self.lm_head = put(vocab_table(tp, w, "lm_head.weight", V, zero_row=False)) if untied else \
            self.wte[:tp.vocab(V).rows] if tp.enabled else self.wte
        # Conv1D weights are [in, out]: column-parallel layers take output columns, row-parallel
        # ones input rows; each is transposed to [out, in] after its slice is read.
        q0, q1 = self.heads.q_start * D, (self.heads.q_start + self.heads.num_q) * D
        i0, i1 = self.mlp_part
        qkv_cols = lambda n: np.concatenate([cols(w, n, j * H + q0, j * H + q1) for j in range(3)], axis=1)  # noqa: E731
        qkv_bias = lambda n: np.concatenate([rows(w, n, j * H + q0, j * H + q1) for j in range(3)])  # noqa: E731
        self.layers = []
        for i in range(self.cfg.num_layers):
            p = f"{t}h.{i}."
            self.layers.append({
                "ln_1": (dev(p + "ln_1.weight"), dev(p + "ln_1.bias")),
                "ln_2": (dev(p + "ln_2.weight"), dev(p + "ln_2.bias")),
                "qkv": put(qkv_cols(p + "attn.c_attn.weight").T), "qkv_b": put(qkv_bias(p + "attn.c_attn.bias")),
                "o": put(rows(w, p + "attn.c_proj.weight", q0, q1).T),
                "o_b": put(rank0_only(tp, w[p + "attn.c_proj.bias"])),
                "fc": put(cols(w, p + "mlp.c_fc.weight", i0, i1).T), "fc_b": put(rows(w, p + "mlp.c_fc.bias", i0, i1)),
                "proj": put(rows(w, p + "mlp.c_proj.weight", i0, i1).T),
                "proj_b": put(rank0_only(tp, w[p + "mlp.c_proj.bias"])),
            })

    # -- forward ------------------------------------------------------------------------------
    def forward(self, input_ids, positions, kv_cache, meta: AttentionMetadata):
        """input_ids, positions [T] -> final hidden states [T, H] (after ln_f).

        NOTE: the residual stream is carried as (delta, residual): each block's output is added to the
        residual by the next LayerNorm itself (fused_add_layer_norm), one launch instead of two."""
        b, c, tp = self.backend, self.cfg, self.tp
        nq = self.heads.num_q                                         # this rank's heads
        residual = tp.embed(b, input_ids, self.wte, c.vocab_size) + b.embedding(positions, self.wpe)   # [T, H]
        delta = None
        for i, L in enumerate(self.layers):
            # residual += delta; x = ln_1(residual); delta = c_proj(attn(x))
            if delta is None:
                x = b.layer_norm(residual, *L["ln_1"], self.eps)
            else:
                x, residual = b.fused_add_layer_norm(delta, residual, *L["ln_1"], self.eps)
            q, k, v = split_heads(b.xp, b.linear(x, L["qkv"], L["qkv_b"]), nq, nq, c.head_dim)   # views
            delta = tp.all_reduce(b.linear(attention(b, q, k, v, kv_cache, i, meta, self.scales[i]), L["o"], L["o_b"]))
            # residual += delta; x = ln_2(residual); delta = c_proj(act(c_fc(x)))
            x, residual = b.fused_add_layer_norm(delta, residual, *L["ln_2"], self.eps)
            delta = tp.all_reduce(b.linear(self.act(b.linear(x, L["fc"], L["fc_b"])), L["proj"], L["proj_b"]))
        if delta is None:
            return b.layer_norm(residual, *self.ln_f, self.eps)
        x, _ = b.fused_add_layer_norm(delta, residual, *self.ln_f, self.eps)
        return x

    def compute_logits(self, hidden):
        """hidden [N, H] -> logits [N, vocab] in float32 (tensor-parallel: on rank 0, None elsewhere)."""
        return self.tp.logits(self.backend, hidden, self.lm_head, self.cfg.vocab_size)
