"""Peak memory of `rawpaged convert hf` on a generated ~1 GB sharded PyTorch checkpoint.

    python bench/convert_memory.py [--size-gb 1.0] [--shards 4] [--dtype bfloat16] [--workdir DIR]

The checkpoint is written WITHOUT torch by `write_torch_zip` (the same zip + pickle layout as
`torch.save`; tests check torch.load reads it), LLaMA-shaped (hidden 2048, vocab 32000, fp32), split
into `--shards` `pytorch_model-0000k-of-0000n.bin` files with an index, like HF's sharded .bin.
The conversion runs in a fresh subprocess; its peak resident set (VmHWM) is compared with the
largest input shard. The goal (issue 6) is peak < 1.5x the largest shard; it is reported, not asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from rawpaged.convert.torch_pickle import write_torch_zip  # noqa: E402

HIDDEN, INTER, VOCAB = 2048, 5504, 32000


def llama_shapes(size_bytes: int) -> list[tuple[str, tuple[int, ...]]]:
    """Tensor names and shapes of a LLaMA-like model with as many layers as fit in size_bytes (fp32)."""
    def layer(i):
        p = f"model.layers.{i}."
        return [(p + "input_layernorm.weight", (HIDDEN,)),
                *[(p + f"self_attn.{n}_proj.weight", (HIDDEN, HIDDEN)) for n in "qkvo"],
                (p + "post_attention_layernorm.weight", (HIDDEN,)),
                (p + "mlp.gate_proj.weight", (INTER, HIDDEN)), (p + "mlp.up_proj.weight", (INTER, HIDDEN)),
                (p + "mlp.down_proj.weight", (HIDDEN, INTER))]
    head = [("model.embed_tokens.weight", (VOCAB, HIDDEN))]
    tail = [("model.norm.weight", (HIDDEN,)), ("lm_head.weight", (VOCAB, HIDDEN))]
    nbytes = lambda shapes: sum(4 * int(np.prod(s)) for _, s in shapes)
    layers: list = []
    while nbytes(head + layers + layer(len(layers) // 9) + tail) <= size_bytes:
        layers += layer(len(layers) // 9)
    return head + layers + tail


def split_shards(shapes, n_shards: int) -> list[list[tuple[str, tuple[int, ...]]]]:
    total = sum(4 * int(np.prod(s)) for _, s in shapes)
    limit, shards, size = total / n_shards, [[]], 0
    for name, shape in shapes:
        nb = 4 * int(np.prod(shape))
        if shards[-1] and size + nb > limit:
            shards.append([])
            size = 0
        shards[-1].append((name, shape))
        size += nb
    return shards


def generate(src: Path, size_gb: float, n_shards: int) -> list[int]:
    """Write the sharded checkpoint; return the shard sizes in bytes."""
    src.mkdir(parents=True)
    rng = np.random.default_rng(0)
    shards = split_shards(llama_shapes(int(size_gb * 1e9)), n_shards)
    n = len(shards)
    weight_map = {}
    for k, shard in enumerate(shards, 1):
        fname = f"pytorch_model-{k:05d}-of-{n:05d}.bin"
        tensors = ((name, rng.standard_normal(shape, dtype=np.float32) * 0.02) for name, shape in shard)
        write_torch_zip(src / fname, tensors)
        weight_map.update({name: fname for name, _ in shard})
    (src / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    config = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": HIDDEN,
              "intermediate_size": INTER, "vocab_size": VOCAB, "num_hidden_layers": (len(weight_map) - 3) // 9,
              "num_attention_heads": 16, "num_key_value_heads": 16, "torch_dtype": "float32"}
    (src / "config.json").write_text(json.dumps(config))
    return [(src / f).stat().st_size for f in dict.fromkeys(weight_map.values())]


# NOTE: the peak is read from /proc/self/status VmHWM (high-water RSS of this process image), not
# from ru_maxrss: Linux carries ru_maxrss across fork+exec, so it would report the parent's size.
CHILD = """
import json, sys, time
sys.path.insert(0, sys.argv[1])
from rawpaged.convert.hf import convert_hf
def hwm_kb():
    return int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM")).split()[1])
base = hwm_kb()
t0 = time.perf_counter()
convert_hf(sys.argv[2], sys.argv[3], dtype=(sys.argv[4] or None), progress=False)
dt = time.perf_counter() - t0
print(json.dumps({"peak_kb": hwm_kb(), "base_kb": base, "seconds": dt}))
"""


def measure(src: Path, dst: Path, dtype: str | None) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, str(ROOT), str(src), str(dst), dtype or ""],
                         check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-gb", type=float, default=1.0)
    ap.add_argument("--shards", type=int, default=4)
    ap.add_argument("--dtype", default=None, help="also convert to this dtype (float16|bfloat16|float32)")
    ap.add_argument("--workdir", default=None, help="where to generate (default: a temp dir, removed after)")
    args = ap.parse_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="rawpaged-convert-bench-"))
    try:
        t0 = time.perf_counter()
        shard_sizes = generate(work / "src", args.size_gb, args.shards)
        print(f"generated {sum(shard_sizes) / 1e9:.2f} GB in {len(shard_sizes)} shards "
              f"(largest {max(shard_sizes) / 1e6:.0f} MB) in {time.perf_counter() - t0:.1f} s")
        for dtype in [None] + ([args.dtype] if args.dtype else []):
            dst = work / f"out-{dtype or 'same'}"
            r = measure(work / "src", dst, dtype)
            out_sizes = [f.stat().st_size for f in dst.glob("*.safetensors")]
            peak = r["peak_kb"] * 1024
            print(f"dtype={dtype or 'unchanged'}: peak RSS {peak / 1e6:.0f} MB (after imports {r['base_kb'] * 1024 / 1e6:.0f} MB), "
                  f"largest input shard {max(shard_sizes) / 1e6:.0f} MB -> ratio {peak / max(shard_sizes):.2f}x; "
                  f"output {len(out_sizes)} shard(s), largest {max(out_sizes) / 1e6:.0f} MB -> ratio "
                  f"{peak / max(out_sizes):.2f}x; {r['seconds']:.1f} s ({sum(shard_sizes) / 1e6 / r['seconds']:.0f} MB/s)")
            shutil.rmtree(dst)
        print(f"machine: {platform.machine()} {os.cpu_count()} CPUs, python {platform.python_version()}")
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
