"""Launch every kernel of the table once, on small inputs, through the backend's ops (step 3 of
tools/gpu_check.sh runs this under compute-sanitizer's memcheck, racecheck, synccheck and initcheck).

    PYTHONPATH=. python tools/gpu_launch_all.py [--no-pool] [--dtypes f16,bf16,f32]

Each kernel is reached from its template arguments (a family without a launcher here is reported,
not skipped silently): decode on CUDA cores for every (dtype, head size, group tile) and on tensor
cores for every head size, with split-K off, the split-K reduce, the tensor-core prefill for every
head size, the varlen kernel, the cache writes and block copies, the norms, rotary (both cos/sin
dtypes) and activations; the attention kernels once more with a sliding window. Inputs are random
and fully initialised (initcheck then reports reads of memory nobody wrote: scratch a kernel reads
before writing it, say); outputs start as NaN and must come back finite. Sizes are small: the
sanitizers run kernels 10-100x slower.

--no-pool: plain cudaMalloc per array instead of CuPy's pool, so memcheck sees each array's end
(inside one pool chunk an out-of-bounds access is invisible to it).

Exit status 1 when a kernel of the table was not launched or an output was not finite.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))
from gpu_common import import_cupy  # noqa: E402

TAG_NAMES = {"f16": "float16", "bf16": "bfloat16", "f32": "float32"}


class Launcher:
    def __init__(self, cp, cuda, seed=0):
        self.cp, self.cuda = cp, cuda
        self.rng = np.random.default_rng(seed)
        self.bad: list[str] = []

    def dt(self, tag):
        return self.cuda.resolve_dtype(TAG_NAMES[tag])

    def dev(self, a, tag=None):
        return self.cuda.to_device(np.asarray(a, np.float32) if tag else a, self.dt(tag) if tag else None)

    def randn(self, shape, tag):
        return self.dev(self.rng.standard_normal(shape).astype(np.float32), tag)

    def finite(self, what, arr):
        host = np.asarray(self.cuda.to_host(arr)).astype(np.float32)
        if not np.isfinite(host).all():
            self.bad.append(what)

    # -- attention ---------------------------------------------------------------------------
    def attention(self, tag, head_dim, group, ctx, q_lens, block_size=16, kv_heads=2, what=""):
        """Once over the whole context, once with a sliding window of 8 (Mistral-style)."""
        for window in (None, 8):
            self._attention(tag, head_dim, group, ctx, q_lens, block_size, kv_heads, what, window)

    def _attention(self, tag, head_dim, group, ctx, q_lens, block_size, kv_heads, what, window):
        cp, cuda = self.cp, self.cuda
        blocks = [-(-c // block_size) for c in ctx]
        num_blocks = sum(blocks) + 1
        kv = self.randn((num_blocks, 2, 2, kv_heads, block_size, head_dim), tag)
        tables = np.zeros((len(ctx), max(blocks)), np.int32)        # unused entries: a valid block
        perm = self.rng.permutation(num_blocks)
        k = 0
        for s, n in enumerate(blocks):
            tables[s, :n] = perm[k:k + n]
            k += n
        qsl = np.concatenate([[0], np.cumsum(q_lens)]).astype(np.int32)
        q = self.randn((int(qsl[-1]), kv_heads * group, head_dim), tag)
        out = cp.full(q.shape, np.nan, dtype=q.dtype)
        cuda.paged_attention(q, kv, 1, cp.asarray(tables), cp.asarray(np.asarray(ctx, np.int32)), cp.asarray(qsl),
                             head_dim ** -0.5, out=out, max_query_len=max(q_lens), max_seq_len=max(ctx),
                             sliding_window=window)
        self.finite((what or f"attention {tag} hd{head_dim} g{group}") + (f" window {window}" if window else ""), out)

    def paged_decode(self, k):
        hd = k.template_args["HD"] or 72              # 72: a head size without its own instantiation
        self.cuda.split_k_policy, self.cuda.decode_policy = "never", "simt"
        try:
            self.attention(k.template_args["T"], hd, k.template_args["GT"], [1, 19, 40], [1, 1, 1], what=k.name)
        finally:
            self.cuda.decode_policy = "auto"

    def paged_decode_mma(self, k):
        # group 5: a head tile of 16 rows with 11 masked; contexts past the 4 warps' first chunks
        self.cuda.split_k_policy, self.cuda.decode_policy = "never", "mma"
        try:
            self.attention(k.template_args["T"], k.template_args["HD"], 5, [1, 19, 140], [1, 1, 1], what=k.name)
        finally:
            self.cuda.decode_policy = "auto"

    def paged_decode_reduce(self, k):
        size = self.cuda.PARTITION_SIZE
        self.cuda.split_k_policy, self.cuda.PARTITION_SIZE = "always", 16
        try:
            self.attention(k.template_args["T"], 64, 2, [1, 19, 40], [1, 1, 1], what=k.name)
        finally:
            self.cuda.split_k_policy, self.cuda.PARTITION_SIZE = "never", size

    def paged_prefill(self, k):
        self.cuda.prefill_policy = "mma"
        # a fresh prompt longer than one 64-row tile, and a chunk on a cached prefix
        self.attention(k.template_args["T"], k.template_args["HD"], 2, [70, 40], [70, 5], what=k.name)
        self.cuda.prefill_policy = "auto"

    def paged_varlen(self, k):
        self.cuda.prefill_policy = "varlen"
        self.attention(k.template_args["T"], 72, 2, [37, 20], [37, 3], what=k.name)
        self.cuda.prefill_policy = "auto"

    # -- cache ops ---------------------------------------------------------------------------
    def reshape_and_cache(self, k):
        cp, tag = self.cp, k.template_args["T"]
        cache = self.randn((6, 2, 2, 2, 16, 128), tag)
        slots = self.rng.permutation(6 * 16)[:20].astype(np.int64)
        slots[::7] = -1
        self.cuda.reshape_and_cache(self.randn((20, 2, 128), tag), self.randn((20, 2, 128), tag), cache, 1, cp.asarray(slots))
        self.finite(k.name, cache)

    def copy_blocks(self, k):
        cache = self.randn((8, 2, 2, 2, 16, 128), "f16")
        self.cuda.copy_blocks(cache, [(0, 5), (3, 6), (2, 7)])
        self.finite(k.name, cache)

    # -- norms, rotary, activations ----------------------------------------------------------
    def rms_norm(self, k):
        tag = k.template_args["T"]
        self.finite(k.name, self.cuda.rms_norm(self.randn((5, 4096), tag), self.randn((4096,), tag), 1e-6))

    def fused_add_rms_norm(self, k):
        tag = k.template_args["T"]
        x, res = self.randn((5, 4096), tag), self.randn((5, 4096), tag)
        self.cuda.fused_add_rms_norm(x, res, self.randn((4096,), tag), 1e-6)
        self.finite(k.name, x)

    def layer_norm(self, k):
        tag = k.template_args["T"]
        self.finite(k.name, self.cuda.layer_norm(self.randn((5, 768), tag), self.randn((768,), tag),
                                                 self.randn((768,), tag), 1e-5))

    def rotary(self, k):
        tag, ctag = k.template_args["T"], k.template_args["C"]
        inv = 10000.0 ** (-np.arange(0, 128, 2) / 128)
        ang = np.arange(64)[:, None] * inv[None, :]
        cos_sin = self.dev(np.concatenate([np.cos(ang), np.sin(ang)], axis=1), ctag)
        q, key = self.randn((9, 4, 128), tag), self.randn((9, 2, 128), tag)
        self.cuda.rotary_embedding(self.cp.asarray(self.rng.integers(0, 64, 9).astype(np.int64)), q, key, cos_sin, True)
        self.finite(k.name, q)

    # -- fused ops (kernels_cuda/fused_ops.cu) ------------------------------------------------
    def rotary_cache(self, k):
        cp, tag, ctag = self.cp, k.template_args["T"], k.template_args["C"]
        inv = 10000.0 ** (-np.arange(0, 128, 2) / 128)
        ang = np.arange(64)[:, None] * inv[None, :]
        cos_sin = self.dev(np.concatenate([np.cos(ang), np.sin(ang)], axis=1), ctag)
        qkv = self.randn((9, 8 * 128), tag)                  # q, k, v as views of a fused projection
        q, key, v = qkv[:, :512].reshape(9, 4, 128), qkv[:, 512:768].reshape(9, 2, 128), qkv[:, 768:].reshape(9, 2, 128)
        cache = self.randn((6, 2, 2, 2, 16, 128), tag)
        slots = self.rng.permutation(6 * 16)[:9].astype(np.int64)
        slots[::4] = -1
        self.cuda.rotary_and_cache(cp.asarray(self.rng.integers(0, 64, 9).astype(np.int64)), q, key, v, cache, 1,
                                   cp.asarray(slots), cos_sin, True)
        self.finite(k.name, cache)

    def fused_add_layer_norm(self, k):
        tag = k.template_args["T"]
        x, res = self.randn((5, 768), tag), self.randn((5, 768), tag)
        self.cuda.fused_add_layer_norm(x, res, self.randn((768,), tag), self.randn((768,), tag), 1e-5)
        self.finite(k.name, x)

    def silu_and_mul(self, k):
        self.finite(k.name, self.cuda.silu_and_mul(self.randn((7, 2 * 688), k.template_args["T"])))

    def gelu_tanh_and_mul(self, k):
        self.finite(k.name, self.cuda.gelu_tanh_and_mul(self.randn((7, 2 * 688), k.template_args["T"])))

    def unary(self, k):
        self.finite(k.name, self.cuda.gelu(self.randn((7, 688), k.template_args["T"])))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--no-pool", action="store_true", help="cudaMalloc per array (for memcheck)")
    ap.add_argument("--dtypes", default="f16,bf16,f32")
    args = ap.parse_args(argv)
    cp = import_cupy()
    if args.no_pool:
        cp.cuda.set_allocator(None)
        cp.cuda.set_pinned_memory_allocator(None)
    from rawpaged.backend import cuda
    from rawpaged.backend.cuda import kernels
    tags = [t for t in args.dtypes.split(",") if t != "bf16" or cuda.bfloat16_supported()]
    launched: list[str] = []
    real = cuda.launch.launch

    def recording(k, *a, **kw):
        launched.append(k.name)
        return real(k, *a, **kw)
    cuda.launch.launch = recording
    run = Launcher(cp, cuda)
    t = time.perf_counter()
    no_launcher, failed = set(), []
    for name, k in kernels.KERNELS.items():
        if name in launched or k.dtypes().get("T", "f16") not in tags:
            continue
        handler = getattr(run, k.family.name, None)
        if handler is None:
            no_launcher.add(k.family.name)
            continue
        try:
            handler(k)
        except Exception as err:                     # go on: one failure must not hide the others
            failed.append(f"{name}: {type(err).__name__}: {str(err).splitlines()[0][:200]}")
    cuda.synchronize()
    wanted = {n for n, k in kernels.KERNELS.items() if k.dtypes().get("T", "f16") in tags}
    missing = sorted(wanted - set(launched))
    print(f"launched {len(set(launched))} of {len(wanted)} kernels ({len(launched)} launches) for dtypes "
          f"{','.join(tags)} in {time.perf_counter() - t:.1f} s")
    for line in failed:
        print(f"FAILED {line}")
    if no_launcher:
        print(f"NO LAUNCHER for families: {', '.join(sorted(no_launcher))} (add one to tools/gpu_launch_all.py)")
    if missing:
        print(f"NOT LAUNCHED: {', '.join(missing)}")
    if run.bad:
        print(f"NOT FINITE: {', '.join(run.bad)}")
    ok = not (failed or missing or run.bad)
    print("launch-all: ok" if ok else "launch-all: FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
