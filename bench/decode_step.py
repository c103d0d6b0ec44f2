"""Where a decode step of a 32-layer LLaMA-7B-shaped model goes (step 6 of tools/gpu_check.sh).

    PYTHONPATH=. python bench/decode_step.py [--md FILE] [--batches 1,16,64] [--context 1024] [--smoke]

The model is rawpaged's own LlamaForCausalLM (fp16) loaded through its load_weights from random
weights made on the device (cupy.random: 13.5 GB never touches the host), with a paged KV cache of
random values. One decode step = what the engine's executor runs: ModelRunner.execute (flatten the
batch, upload its metadata, 32 layers, lm_head) plus a greedy argmax, for `batch` sequences of
`context` tokens each. Per batch size, medians of 10 steps after 3 warm-up ones:
  - host ms: Python's time to queue the step (until execute and argmax return, before any sync);
  - GPU ms: CUDA events at the step's start and end (includes idle gaps while the GPU waits for
    Python; when GPU ms ~ host ms the step is launch-bound);
  - wall ms: until the argmax is on the host;
  - launches: rawpaged's kernels (launch.launch calls) and GEMMs (linear calls) counted in Python,
    and, where torch's profiler works (CUPTI sees every kernel in the process, CuPy's own included),
    all kernels of one step with their summed GPU time by kind;
  - floor: the bytes a step must read (weights once + the batch's KV) over the memcpy bandwidth.
Each batch size runs twice: eagerly (`eager`: every op launched from Python, as --enforce-eager),
and replayed from a CUDA graph (`graph`: rawpaged/worker/graph_runner.py, one graph per batch
bucket captured after the eager runs, the batch padded to its bucket); "eager / graph" is the
ratio of their wall times, measured side by side in one process.
torch is imported here only for its profiler, never by rawpaged.
"""
from __future__ import annotations

import argparse
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_common import Markdown, copy_bandwidth, device_name, fill_random, import_cupy  # noqa: E402

LLAMA_7B = dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
                intermediate_size=11008, vocab_size=32000, max_position_embeddings=4096)
SMOKE = dict(hidden_size=256, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             intermediate_size=512, vocab_size=512, max_position_embeddings=256)


def model_config(shape: dict):
    from rawpaged.config import ModelConfig
    hf = dict(architectures=["LlamaForCausalLM"], model_type="llama", rms_norm_eps=1e-5, rope_theta=10000.0,
              tie_word_embeddings=False, hidden_act="silu", torch_dtype="float16", bos_token_id=1, eos_token_id=2,
              **shape)
    cfg = ModelConfig(path=Path(tempfile.mkdtemp(prefix="rawpaged-decode-step-")), architecture="LlamaForCausalLM",
                      family="llama", hf=hf)
    cfg._read_common()
    return cfg


def device_weights(cp, model, std=0.02):
    """(name, device array) for every weight the model expects, random normal made on the device."""
    shapes, _ = model.expected_weights()
    for name, shape in shapes.items():
        a = cp.empty(shape, dtype=model.dtype)
        if name.endswith("norm.weight"):
            a[...] = 1
        else:
            fill_random(cp, a, std=std)
        yield name, a


def build(cp, shape: dict, num_blocks: int, block_size: int):
    from model_impl import get_model_class
    from rawpaged.backend import cuda
    from rawpaged.worker.cache_engine import CacheEngine
    from rawpaged.worker.model_runner import ModelRunner
    cfg = model_config(shape)
    dtype = np.dtype(np.float16)
    model = get_model_class("llama")(cfg, cuda, dtype)
    model.load_weights(device_weights(cp, model), where="random weights on the device")
    cache = CacheEngine(cfg, cuda, dtype, block_size, num_blocks, 0)
    for i in range(0, num_blocks, 64):                     # never zeros, never uninitialised bits
        fill_random(cp, cache.device_cache[i:i + 64])
    return cfg, model, ModelRunner(model, cuda, block_size), cache


def decode_batch(batch: int, context: int, block_size: int, vocab: int):
    from rawpaged.sequence import ScheduledSeq, Sequence
    rng = np.random.default_rng(batch)
    per_seq = math.ceil(context / block_size)
    perm = rng.permutation(batch * per_seq)
    out = []
    for s in range(batch):
        seq = Sequence(s, rng.integers(3, vocab, context).tolist())
        seq.num_computed_tokens = context - 1
        out.append(ScheduledSeq(seq, 1, perm[s * per_seq:(s + 1) * per_seq].tolist(), sample=True))
    return out


class Counter:
    """Counts rawpaged's kernel launches and GEMMs while installed."""

    def __init__(self, cuda):
        self.cuda, self.kernels, self.gemms = cuda, 0, 0
        self._launch, self._linear = cuda.launch.launch, cuda.linear

    def __enter__(self):
        def launch(*a, **kw):
            self.kernels += 1
            return self._launch(*a, **kw)

        def linear(*a, **kw):
            self.gemms += 1
            return self._linear(*a, **kw)
        self.cuda.launch.launch = launch
        self.cuda.linear = linear
        return self

    def __exit__(self, *exc):
        self.cuda.launch.launch, self.cuda.linear = self._launch, self._linear


def step(cp, runner, cache, batch):
    logits, _ = runner.execute(batch, cache.device_cache)
    return cp.argmax(logits, axis=-1)


def measure(cp, cuda, runner, cache, batch, reps=10, warmup=3) -> dict:
    for _ in range(warmup):
        step(cp, runner, cache, batch).get()
    with Counter(cuda) as counts:
        step(cp, runner, cache, batch).get()
    host, gpu, wall = [], [], []
    stream = cp.cuda.get_current_stream()
    for _ in range(reps):
        cuda.synchronize()
        start, end = cp.cuda.Event(), cp.cuda.Event()
        t = time.perf_counter()
        start.record(stream)
        tokens = step(cp, runner, cache, batch)
        end.record(stream)
        host.append(time.perf_counter() - t)
        tokens.get()
        wall.append(time.perf_counter() - t)
        gpu.append(cp.cuda.get_elapsed_time(start, end))
    return dict(host=statistics.median(host) * 1e3, gpu=statistics.median(gpu), wall=statistics.median(wall) * 1e3,
                kernels=counts.kernels, gemms=counts.gemms)


def capture_graphs(cp, model, runner, cache, block_size: int, max_batch: int, context: int):
    """The engine's decode graphs over this cache (buckets up to max_batch), installed in the runner:
    its pure decode batches replay them from now on."""
    from rawpaged.backend import cuda
    from rawpaged.worker.graph_runner import DecodeGraphs
    graphs = DecodeGraphs(model, cuda, block_size, max_batch, context)
    graphs.capture(cache.device_cache)
    runner.graphs = graphs
    return graphs


def kind(name: str, table: set) -> str:
    if name in table:
        return name.split("_f16")[0].split("_bf16")[0].split("_f32")[0]
    low = name.lower()
    if any(w in low for w in ("gemm", "gemv", "cutlass", "xmma", "sm90", "sm80", "cublas", "splitk")):
        return "cuBLAS"
    return "CuPy elementwise / other"


def profile(cp, runner, cache, batch, table: set):
    """All kernels of one step by kind (torch's profiler through CUPTI), or the reason it is unavailable."""
    try:
        import torch
        from torch.profiler import ProfilerActivity
        from torch.profiler import profile as tprofile
        if not torch.cuda.is_available():
            return None, "torch sees no GPU"
        with tprofile(activities=[ProfilerActivity.CUDA]) as prof:
            step(cp, runner, cache, batch).get()
            torch.cuda.synchronize()
        by_kind: dict[str, list] = {}
        for ev in prof.events():
            if str(getattr(ev, "device_type", "")).endswith("CUDA"):
                k = kind(ev.name, table)
                # NOTE: a device event's own duration; the *_total names differ across torch versions
                t = (getattr(ev, "device_time_total", 0) or getattr(ev, "cuda_time_total", 0)
                     or ev.time_range.elapsed_us())
                entry = by_kind.setdefault(k, [0, 0.0])
                entry[0] += 1
                entry[1] += t / 1e3
        return by_kind, ""
    except Exception as err:
        return None, f"torch profiler unavailable: {type(err).__name__}: {str(err).splitlines()[0][:200]}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--md")
    ap.add_argument("--batches", default="1,16,64")
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--smoke", action="store_true", help="a 2-layer toy shape (checks this script on the emulation)")
    args = ap.parse_args(argv)
    md = Markdown(args.md)
    cp = import_cupy()
    from rawpaged.backend import cuda
    from rawpaged.backend.cuda import kernels
    shape = SMOKE if args.smoke else LLAMA_7B
    batches = [int(b) for b in args.batches.split(",")]
    context = min(args.context, shape["max_position_embeddings"])
    block_size = 16
    t = time.perf_counter()
    cfg, model, runner, cache = build(cp, shape, max(batches) * math.ceil(context / block_size), block_size)
    cuda.synchronize()
    built = time.perf_counter() - t
    bw = copy_bandwidth(cp, (1 << 30) if not args.smoke else (1 << 20), reps=5)
    weight_bytes = sum(int(np.prod(s)) for s in model.expected_weights()[0].values()) * 2
    kv_token = cfg.kv_bytes_per_token(2)
    md(f"{device_name(cp)}: {'a toy' if args.smoke else 'LLaMA-7B'} shape ({cfg.num_layers} layers, hidden {cfg.hidden_size}, {cfg.num_heads} heads, "
       f"vocab {cfg.vocab_size}), fp16, {weight_bytes / 1e9:.1f} GB of weights made on the device and loaded in "
       f"{built:.1f} s; context {context} tokens per sequence; memcpy {bw:,.0f} GB/s", "")
    rows, table = [], set(kernels.KERNELS)
    profiles = []
    eager = {}
    for b in batches:
        batch = decode_batch(b, context, block_size, cfg.vocab_size)
        m = measure(cp, cuda, runner, cache, batch)
        eager[b] = m
        floor = (weight_bytes + b * context * kv_token) / (bw * 1e9) * 1e3
        rows.append([b, "eager", f"{m['host']:.2f}", f"{m['gpu']:.2f}", f"{m['wall']:.2f}", f"{floor:.2f}",
                     f"{floor / m['wall']:.0%}", m["kernels"], m["gemms"], f"{b / m['wall'] * 1e3:,.0f}", ""])
        profiles.append((b, *profile(cp, runner, cache, batch, table)))
    graphs = capture_graphs(cp, model, runner, cache, block_size, max(batches), context)
    md(f"CUDA graphs: buckets {', '.join(map(str, graphs.buckets))} captured in {graphs.capture_seconds:.2f} s, "
       f"their pool {graphs.pool_bytes() / 2**20:.1f} MiB (graph rows: every kernel runs inside the one graph "
       f"launch, so Python counts none)", "")
    for b in batches:
        batch = decode_batch(b, context, block_size, cfg.vocab_size)
        m = measure(cp, cuda, runner, cache, batch)
        floor = (weight_bytes + b * context * kv_token) / (bw * 1e9) * 1e3
        rows.append([b, "graph", f"{m['host']:.2f}", f"{m['gpu']:.2f}", f"{m['wall']:.2f}", f"{floor:.2f}",
                     f"{floor / m['wall']:.0%}", m["kernels"], m["gemms"], f"{b / m['wall'] * 1e3:,.0f}",
                     f"{eager[b]['wall'] / m['wall']:.2f}x"])
    md.table(["batch", "mode", "host ms", "GPU ms (events)", "wall ms", "floor ms (bytes / memcpy)", "floor / wall",
              "rawpaged kernels", "GEMMs", "tokens/s", "eager / graph (wall)"], rows)
    md("")
    for b, by_kind, why in profiles:
        if by_kind is None:
            md(f"batch {b}: no per-kernel profile ({why})")
            continue
        total = sum(n for n, _ in by_kind.values())
        if not total:
            md(f"batch {b}: the profiler saw no kernel (CUPTI may not report CuPy's launches here)")
            continue
        md(f"batch {b}: {total} kernels on the GPU in one step (torch profiler, CUPTI)", "")
        md.table(["kind", "kernels", "GPU ms"], [[k, n, f"{ms:.3f}"] for k, (n, ms) in
                                                  sorted(by_kind.items(), key=lambda kv: -kv[1][1])])
        md("")
    return 0


if __name__ == "__main__":
    sys.exit(main())
