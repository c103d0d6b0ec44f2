"""GPT-2: learned absolute positions, pre-LayerNorm blocks, gelu_new MLP, tied LM head.

The checkpoint stores its projections as `Conv1D` weights, [in, out] (y = x @ W + b), the transpose
of nn.Linear's [out, in]: they are transposed once at load time, so the layer runs the same
`linear` as every other family. `c_attn` [H, 3H] holds q, k and v side by side (columns), each
[H] = heads x head_dim. Names come with the `transformer.` prefix (GPT2LMHeadModel) or without it
(the original openai-community checkpoints, which also carry `attn.bias` mask buffers: ignored).
"""
from __future__ import annotations

from model_impl.layers import WeightSet, attention, split_heads
from rawpaged.config import ModelConfig
from rawpaged.errors import RawpagedError
from rawpaged.worker.model_runner import AttentionMetadata

_ACTIVATIONS = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu_fast": "gelu_tanh",
                "gelu": "gelu", "relu": "relu"}


class GPT2LMHeadModel:
    def __init__(self, config: ModelConfig, backend, dtype):
        self.cfg = config
        self.backend = backend
        self.dtype = dtype
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
        dev = lambda n: self.backend.to_device(w[n], self.dtype)  # noqa: E731
        conv = lambda n: self.backend.to_device(w[n].T, self.dtype)  # noqa: E731  Conv1D [in, out] -> [out, in]
        t = "transformer."
        self.wte, self.wpe = dev(t + "wte.weight"), dev(t + "wpe.weight")
        self.ln_f = (dev(t + "ln_f.weight"), dev(t + "ln_f.bias"))
        self.lm_head = self.wte if self.tie or "lm_head.weight" not in w else dev("lm_head.weight")
        self.layers = []
        for i in range(self.cfg.num_layers):
            p = f"{t}h.{i}."
            self.layers.append({
                "ln_1": (dev(p + "ln_1.weight"), dev(p + "ln_1.bias")),
                "ln_2": (dev(p + "ln_2.weight"), dev(p + "ln_2.bias")),
                "qkv": conv(p + "attn.c_attn.weight"), "qkv_b": dev(p + "attn.c_attn.bias"),
                "o": conv(p + "attn.c_proj.weight"), "o_b": dev(p + "attn.c_proj.bias"),
                "fc": conv(p + "mlp.c_fc.weight"), "fc_b": dev(p + "mlp.c_fc.bias"),
                "proj": conv(p + "mlp.c_proj.weight"), "proj_b": dev(p + "mlp.c_proj.bias"),
            })

    # -- forward ------------------------------------------------------------------------------
    def forward(self, input_ids, positions, kv_cache, meta: AttentionMetadata):
        """input_ids, positions [T] -> final hidden states [T, H] (after ln_f)."""
        b, c = self.backend, self.cfg
        h = b.embedding(input_ids, self.wte) + b.embedding(positions, self.wpe)      # [T, H]
        for i, L in enumerate(self.layers):
            # h = h + c_proj(attn(ln_1(h)))
            x = b.layer_norm(h, *L["ln_1"], self.eps)
            q, k, v = split_heads(b.xp, b.linear(x, L["qkv"], L["qkv_b"]), c.num_heads, c.num_heads, c.head_dim)
            h = h + b.linear(attention(b, q, k, v, kv_cache, i, meta, self.scales[i]), L["o"], L["o_b"])
            # h = h + c_proj(act(c_fc(ln_2(h))))
            x = b.layer_norm(h, *L["ln_2"], self.eps)
            h = h + b.linear(self.act(b.linear(x, L["fc"], L["fc_b"])), L["proj"], L["proj_b"])
        return b.layer_norm(h, *self.ln_f, self.eps)

    def compute_logits(self, hidden):
        """hidden [N, H] -> logits [N, vocab] in float32."""
        return self.backend.linear(hidden, self.lm_head).astype(self.backend.xp.float32, copy=False)
