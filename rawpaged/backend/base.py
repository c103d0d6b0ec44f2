"""The backend contract: every op the model code, the cache engine and the sampler may call.

A backend is a module (`rawpaged/backend/cpu/`, `rawpaged/backend/cuda/`) defining each name
below with the same parameters in the same order; `check_backend` (run by
tests/test_backend_contract.py) names whatever one lacks or spells differently. A CUDA kernel is
tested against its CPU twin because both satisfy this contract with the same memory layouts:

  kv_cache        [num_blocks, num_layers, 2, num_kv_heads, block_size, head_dim]  block-major
  q               [T, num_heads, head_dim]     T = tokens of the flattened batch (no padding)
  k, v            [T, num_kv_heads, head_dim]  (a strided view of a fused qkv row is allowed)
  block_tables    int32 [S, max_blocks]        S = sequences in the batch
  seq_lens        int32 [S]     context length of each sequence INCLUDING this step's tokens
  query_start_loc int32 [S+1]   tokens of sequence s are rows query_start_loc[s]:query_start_loc[s+1]
  slot_mapping    int64 [T]     physical slot = block * block_size + offset (< 0: skip the token)
  cos_sin_cache   [max_pos, rot_dim]  cos in the first rot_dim/2 columns, sin in the rest
  weights         [out, in] (Hugging Face's layout); activations [T, features]

Index arrays may arrive as host (NumPy) arrays on either backend; the ops upload them.
"""
from __future__ import annotations

import inspect
from types import ModuleType
from typing import Any, Protocol, runtime_checkable


@runtime_checkable
class Backend(Protocol):
    name: str                 # "cpu" | "cuda"
    xp: Any                   # the array module: numpy or cupy
    float_dtypes: tuple       # dtypes the kernels take

    # -- attention and the paged cache ---------------------------------------------------------
    def paged_attention(self, q, kv_cache, layer, block_tables, seq_lens, query_start_loc, scale,
                        out=None, max_query_len=None, max_seq_len=None, sliding_window=None):
        """[T, Hq, D] -> [T, Hq, D]: each query token of sequence s at position p attends to positions
        0..p of s, read through s's block table (causal varlen: prefill, chunks and decode alike);
        with sliding_window W (a positive int) to positions max(0, p-W+1)..p only.
        max_query_len / max_seq_len are host-side launch hints."""

    def reshape_and_cache(self, k, v, kv_cache, layer, slot_mapping):
        """Write k, v [T, Hkv, D] of this step's tokens into their slots of `layer`."""

    def rotary_and_cache(self, positions, q, k, v, kv_cache, layer, slot_mapping, cos_sin_cache, is_neox):
        """rotary_embedding of q (in place, returned) and of k, whose rotated copy is written with v
        into `layer`'s slots (reshape_and_cache) in one pass; k itself is left as it was. Padding
        tokens (slot < 0) store nothing; their positions must still index cos_sin_cache."""

    def copy_blocks(self, kv_cache, pairs):
        """Copy-on-write: kv_cache[dst] = kv_cache[src] for each (src, dst), every layer at once."""

    def swap_blocks(self, src, dst, pairs, stream=None):
        """dst[d] = src[s] for each (s, d) between the device pool and the host swap pool."""

    # -- swap pool memory and ordering ---------------------------------------------------------
    def alloc_pinned(self, shape, dtype):
        """A host array for the swap pool (page-locked on the GPU so copies are asynchronous)."""

    def swap_stream(self):
        """The stream swaps run on (None where everything is synchronous)."""

    def record_event(self, stream):
        """An event marking the work queued so far on `stream` (None where synchronous)."""

    def wait_event(self, event):
        """The compute stream waits for `event` before the work queued after this call."""

    # -- norms, rotary embedding, activations --------------------------------------------------
    def rms_norm(self, x, weight, eps):
        """x / sqrt(mean(x^2) + eps) * weight over the last axis (fp32 statistics)."""

    def fused_add_rms_norm(self, x, residual, weight, eps):
        """residual += x; x = rms_norm(residual): both in place; returns (x, residual)."""

    def fused_add_layer_norm(self, x, residual, weight, bias, eps):
        """residual += x; x = layer_norm(residual, weight, bias): both in place; returns (x, residual)."""

    def layer_norm(self, x, weight, bias, eps):
        """(x - mean) / sqrt(var + eps) * weight + bias over the last axis (weight/bias may be None)."""

    def rotary_embedding(self, positions, q, k, cos_sin_cache, is_neox):
        """Rotate the first rot_dim features of q and k in place (is_neox: halves, else pairs)."""

    def silu_and_mul(self, x):
        """[T, 2I] -> silu(x[:, :I]) * x[:, I:]."""

    def gelu_tanh_and_mul(self, x):
        """[T, 2I] -> gelu_tanh(x[:, :I]) * x[:, I:] (GeGLU)."""

    def gelu(self, x):
        """Exact GELU."""

    def gelu_tanh(self, x):
        """GELU, tanh approximation."""

    def relu(self, x):
        """max(x, 0)."""

    # -- dense ops -----------------------------------------------------------------------------
    def linear(self, x, weight, bias=None):
        """x [..., in] @ weight[out, in]^T (+ bias), fp32 accumulation."""

    def embedding(self, token_ids, table):
        """table[token_ids]."""

    # -- memory and dtypes ---------------------------------------------------------------------
    def to_device(self, array, dtype=None):
        """Host or device array -> contiguous backend array of `dtype`."""

    def to_host(self, array):
        """Backend array -> NumPy array."""

    def synchronize(self):
        """Wait for all queued work."""

    def resolve_dtype(self, dtype, torch_dtype=None):
        """'auto' or a dtype name -> the NumPy dtype this backend computes in."""

    def free_device_memory(self):
        """Bytes the device (or the host, for the CPU backend) has free."""

    def total_device_memory(self):
        """Bytes of device (or host) memory in all."""


_ATTRIBUTES = ("name", "xp", "float_dtypes")


def check_window(sliding_window) -> int:
    """paged_attention's sliding_window, checked: None -> 0 (no window), a positive int -> itself."""
    if sliding_window is None:
        return 0
    if isinstance(sliding_window, bool) or not float(sliding_window).is_integer() or sliding_window < 1:
        raise ValueError(f"paged_attention: sliding_window must be None or a positive integer, got {sliding_window!r}")
    return int(sliding_window)


def contract_ops() -> dict[str, inspect.Signature]:
    """op name -> its signature without `self`."""
    ops = {}
    for op, fn in vars(Backend).items():
        if callable(fn) and not op.startswith("_"):
            sig = inspect.signature(fn)
            ops[op] = sig.replace(parameters=list(sig.parameters.values())[1:])
    return ops


def check_backend(module: ModuleType) -> list[str]:
    """What `module` lacks or defines differently from the contract (empty: it satisfies it)."""
    problems = [f"missing attribute {a!r}" for a in _ATTRIBUTES if not hasattr(module, a)]
    for op, want in contract_ops().items():
        fn = getattr(module, op, None)
        if fn is None or not callable(fn):
            problems.append(f"missing op {op}{want}")
            continue
        got = inspect.signature(fn)
        if [(p.name, p.default) for p in got.parameters.values()] != \
                [(p.name, p.default) for p in want.parameters.values()]:
            problems.append(f"op {op}{got} differs from the contract {op}{want}")
    return problems
