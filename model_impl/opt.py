"""OPT family: learned positions (offset 2), pre- or post-LayerNorm, ReLU FFN, tied head,
optional project_in/project_out when word_embed_proj_dim != hidden_size."""
from __future__ import annotations

import numpy as np

from model_impl.layers import WeightSet, attention, split_heads
from model_impl.parallel import SINGLE, TensorParallel, cols, rank0_only, rows, vocab_table
from rawpaged.worker.model_runner import AttentionMetadata
from rawpaged.config import ModelConfig
from rawpaged.errors import RawpagedError

POSITION_OFFSET = 2   # OPT's learned position table starts at index 2 (fairseq's padding legacy)


class OPTForCausalLM:
    def __init__(self, config: ModelConfig, backend, dtype, tp: TensorParallel = SINGLE):
        self.cfg = config
        self.backend = backend
        self.dtype = dtype
        self.tp = tp
        hf = config.hf
        self.pre_ln = bool(hf.get("do_layer_norm_before", True))
        self.final_ln = self.pre_ln and not hf.get("_remove_final_layer_norm", False)
        self.proj_dim = int(hf.get("word_embed_proj_dim") or config.hidden_size)
        self.ffn_dim = int(config.require("ffn_dim"))
        self.bias = bool(hf.get("enable_bias", True))
        self.ln_affine = bool(hf.get("layer_norm_elementwise_affine", True))
        self.eps = 1e-5
        act = hf.get("activation_function", "relu")
        acts = {"relu": backend.relu, "gelu": backend.gelu, "gelu_new": backend.gelu_tanh}
        if act not in acts:
            raise RawpagedError(f"activation_function {act!r} is not supported for OPT (relu, gelu, gelu_new)")
        self.act = acts[act]
        self.scale = config.head_dim ** -0.5
        self.heads = tp.heads(config.num_heads, config.num_heads)
        self.mlp_part = tp.part(self.ffn_dim)
        self.layers: list[dict] = []

    # -- weights ------------------------------------------------------------------------------
    def expected_weights(self) -> tuple[dict, set]:
        c = self.cfg
        H, V, F, P = c.hidden_size, c.vocab_size, self.ffn_dim, self.proj_dim
        d = "model.decoder."
        shapes = {d + "embed_tokens.weight": (V, P),
                  d + "embed_positions.weight": (c.max_model_len + POSITION_OFFSET, H),
                  "lm_head.weight": (V, P)}
        optional = {"lm_head.weight"}
        if P != H:
            shapes[d + "project_in.weight"] = (H, P)
            shapes[d + "project_out.weight"] = (P, H)
        ln = lambda name: {name + ".weight": (H,), name + ".bias": (H,)} if self.ln_affine else {}  # noqa: E731
        if self.final_ln:
            shapes.update(ln(d + "final_layer_norm"))
        for i in range(c.num_layers):
            p = f"{d}layers.{i}."
            for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
                shapes[p + f"self_attn.{proj}.weight"] = (H, H)
                if self.bias:
                    shapes[p + f"self_attn.{proj}.bias"] = (H,)
            shapes[p + "fc1.weight"] = (F, H)
            shapes[p + "fc2.weight"] = (H, F)
            if self.bias:
                shapes[p + "fc1.bias"] = (F,)
                shapes[p + "fc2.bias"] = (H,)
            shapes.update(ln(p + "self_attn_layer_norm"))
            shapes.update(ln(p + "final_layer_norm"))
        return shapes, optional

    def load_weights(self, named_tensors, where: str = "checkpoint") -> None:
        shapes, optional = self.expected_weights()
        ws = WeightSet(shapes, optional, where)
        for name, array in named_tensors:
            if name.startswith("decoder."):              # facebook/opt-* checkpoints drop "model."
                name = "model." + name
            ws.add(name, array)
        w = ws.finish()
        tp, D = self.tp, self.cfg.head_dim
        put = lambda a: None if a is None else self.backend.to_device(a, self.dtype)  # noqa: E731
        dev = lambda n: put(w[n]) if n in w else None  # noqa: E731
        q0, q1 = self.heads.q_start * D, (self.heads.q_start + self.heads.num_q) * D
        i0, i1 = self.mlp_part
        heads = lambda *ns: put(np.concatenate([rows(w, n, q0, q1) for n in ns]))  # noqa: E731  its heads' rows
        d = "model.decoder."
        # NOTE: the LM head is tied: compute_logits reads the embedding without its zero row.
        self.embed = put(vocab_table(tp, w, d + "embed_tokens.weight", self.cfg.vocab_size, zero_row=True))
        self.pos_embed = dev(d + "embed_positions.weight")
        self.project_in = dev(d + "project_in.weight")
        self.project_out = dev(d + "project_out.weight")
        self.final_norm = (dev(d + "final_layer_norm.weight"), dev(d + "final_layer_norm.bias"))
        self.layers = []
        for i in range(self.cfg.num_layers):
            p = f"{d}layers.{i}."
            a = p + "self_attn."
            bias = lambda n: put(rank0_only(tp, w[n])) if n in w else None  # noqa: E731  row-parallel
            self.layers.append({
                "qkv": heads(a + "q_proj.weight", a + "k_proj.weight", a + "v_proj.weight"),
                "qkv_b": heads(a + "q_proj.bias", a + "k_proj.bias", a + "v_proj.bias") if self.bias else None,
                "o": put(cols(w, a + "out_proj.weight", q0, q1)), "o_b": bias(a + "out_proj.bias"),
                "fc1": put(rows(w, p + "fc1.weight", i0, i1)),
                "fc1_b": put(rows(w, p + "fc1.bias", i0, i1)) if self.bias else None,
                "fc2": put(cols(w, p + "fc2.weight", i0, i1)), "fc2_b": bias(p + "fc2.bias"),
                "attn_ln": (dev(p + "self_attn_layer_norm.weight"), dev(p + "self_attn_layer_norm.bias")),
                "ffn_ln": (dev(p + "final_layer_norm.weight"), dev(p + "final_layer_norm.bias")),
            })

    # -- forward ------------------------------------------------------------------------------
    def _ln(self, x, wb):
        return self.backend.layer_norm(x, wb[0], wb[1], self.eps)

    def _add_ln(self, delta, residual, wb):
        """residual += delta; delta = LN(residual) (in place) -> (normalised, residual)."""
        return self.backend.fused_add_layer_norm(delta, residual, wb[0], wb[1], self.eps)

    def _attention(self, x, L, kv_cache, i, meta, nq, D):
        """out_proj(attn(q, k, v)) of this rank's heads, summed over ranks; q/k/v views of the fused qkv."""
        b = self.backend
        q, k, v = split_heads(b.xp, b.linear(x, L["qkv"], L["qkv_b"]), nq, nq, D)     # [T, 3 nq D] -> views
        return self.tp.all_reduce(b.linear(attention(b, q, k, v, kv_cache, i, meta, self.scale), L["o"], L["o_b"]))

    def forward(self, input_ids, positions, kv_cache, meta: AttentionMetadata):
        """input_ids, positions [T] -> final hidden states [T, word_embed_proj_dim].

        NOTE: each block's output (delta) is added to the residual by the LayerNorm after it
        (fused_add_layer_norm: one launch for the add and the norm). Pre-LN: that norm is the next
        block's input norm; post-LN: the block's own, whose output is the next residual."""
        b, c, tp = self.backend, self.cfg, self.tp
        nq, D = self.heads.num_q, c.head_dim                          # this rank's heads
        x = tp.embed(b, input_ids, self.embed, c.vocab_size)          # [T, P]
        if self.project_in is not None:
            x = b.linear(x, self.project_in)                          # [T, H]
        residual = x + b.embedding(positions + POSITION_OFFSET, self.pos_embed)
        delta = None
        for i, L in enumerate(self.layers):
            # Attention block
            if not self.pre_ln:
                x = residual
            elif delta is None:
                x = self._ln(residual, L["attn_ln"])
            else:
                x, residual = self._add_ln(delta, residual, L["attn_ln"])     # residual += ffn of layer i-1
            delta = self._attention(x, L, kv_cache, i, meta, nq, D)
            if self.pre_ln:
                x, residual = self._add_ln(delta, residual, L["ffn_ln"])
            else:
                residual, _ = self._add_ln(delta, residual, L["attn_ln"])   # h = LN(h + attn)
                x = residual
            # Feed-forward block: fc2(act(fc1(x)))
            delta = tp.all_reduce(b.linear(self.act(b.linear(x, L["fc1"], L["fc1_b"])), L["fc2"], L["fc2_b"]))
            if not self.pre_ln:
                residual, _ = self._add_ln(delta, residual, L["ffn_ln"])   # h = LN(h + ffn)
                delta = None
        if delta is None:
            h = self._ln(residual, self.final_norm) if self.final_ln else residual
        elif self.final_ln:
            h, _ = self._add_ln(delta, residual, self.final_norm)
        else:
            h = residual + delta
        if self.project_out is not None:
            h = b.linear(h, self.project_out)                         # [T, P]
        return h

    def compute_logits(self, hidden):
        """hidden [N, P] -> logits [N, vocab] in float32 (head tied to the token embedding;
        tensor-parallel: on rank 0, None elsewhere)."""
        tp, V = self.tp, self.cfg.vocab_size
        head = self.embed[:tp.vocab(V).rows] if tp.enabled else self.embed
        return tp.logits(self.backend, hidden, head, V)
