"""Write the small PyTorch `.bin` fixtures of tests/test_convert_hf.py (developers only: needs torch).

    python tools/make_bin_fixtures.py            # torch, transformers, safetensors, numpy

Everything under tests/fixtures/bin/ is written by torch itself, so the converter is tested against
real `torch.save` output, not against our own idea of it:
  opt-preln/   the tests/fixtures/opt-preln model as facebook/opt-* publish it: one pytorch_model.bin
               saved from the bare OPTModel (names `decoder.*`, no lm_head).
  llama-gqa/   the tests/fixtures/llama-gqa model as transformers' sharded .bin save lays it out:
               model.state_dict() (tied weights share storage) plus the `rotary_emb.inv_freq`
               buffers old LLaMA checkpoints carry, split into 2 shards + pytorch_model.bin.index.json.
  views/       one archive with the awkward cases (transposed / strided / offset / expanded views,
               an aliased lm_head, bf16, fp16 Parameter, f64, int64, bool, 0-d, empty, special
               values) and reference.npz: torch's own values, and torch's `.to(dtype)` of each
               float tensor (bf16 as uint16 bit patterns), the reference for --dtype conversions.
  legacy/      a pytorch_model.bin in the pre-1.6 (non-zip) format, which must be refused.
Only config.json and the weights are stored here (tokenizer files stay in the safetensors
fixture directories; tests copy them), keeping tests/fixtures/bin under 1 MB.
Finally it checks that torch.load reads an archive written by our torch-free `write_torch_zip`.
"""

from __future__ import annotations

import collections
import json
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures"
OUT = FIXTURES / "bin"
sys.path.insert(0, str(ROOT))


def read_safetensors_dir(src: Path) -> dict[str, torch.Tensor]:
    index = src / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() else ["model.safetensors"]
    tensors = {}
    for f in files:
        tensors.update(load_file(str(src / f)))
    return tensors


def hf_state_dict(src: Path) -> collections.OrderedDict:
    """model.state_dict() of the fixture loaded by transformers: HF's own names, order and tying."""
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    return collections.OrderedDict(model.state_dict())


def make_opt(name: str) -> None:
    src, out = FIXTURES / name, OUT / name
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    sd = hf_state_dict(src)
    # NOTE: facebook/opt-* .bin files come from the bare OPTModel: no `model.` prefix, no lm_head.
    bare = collections.OrderedDict((k.removeprefix("model."), v) for k, v in sd.items() if k != "lm_head.weight")
    torch.save(bare, out / "pytorch_model.bin")
    shutil.copyfile(src / "config.json", out / "config.json")


def make_llama_sharded(name: str, n_shards: int = 2) -> None:
    src, out = FIXTURES / name, OUT / name
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    sd = hf_state_dict(src)
    config = json.loads((src / "config.json").read_text())
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    theta = config.get("rope_theta") or (config.get("rope_parameters") or {}).get("rope_theta", 10000.0)
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2).float() / head_dim))
    with_buffers = collections.OrderedDict()
    for k, v in sd.items():
        with_buffers[k] = v
        if k.endswith("self_attn.o_proj.weight"):  # where old LlamaAttention registered the buffer
            with_buffers[k.replace("o_proj.weight", "rotary_emb.inv_freq")] = inv_freq.clone()
    names = list(with_buffers)
    per = -(-len(names) // n_shards)
    weight_map = {}
    for i in range(n_shards):
        fname = f"pytorch_model-{i + 1:05d}-of-{n_shards:05d}.bin"
        shard = collections.OrderedDict((k, with_buffers[k]) for k in names[i * per:(i + 1) * per])
        torch.save(shard, out / fname)
        weight_map.update({k: fname for k in shard})
    total = sum(v.numel() * v.element_size() for v in with_buffers.values())
    (out / "pytorch_model.bin.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n")
    shutil.copyfile(src / "config.json", out / "config.json")


def bits(t: torch.Tensor) -> np.ndarray:
    return t.view(torch.int16).numpy().view(np.uint16) if t.dtype == torch.bfloat16 else t.numpy()


def make_views() -> None:
    out = OUT / "views"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    g = torch.Generator().manual_seed(0)
    base = torch.randn(6, 5, generator=g)
    embed = torch.randn(7, 4, generator=g)
    specials = torch.tensor([1.0 + 2**-8, 1.0 + 3 * 2**-8, 1.0 + 2**-11, 1.0 + 3 * 2**-11, 65504.0, 65520.0, 1e-8,
                             -0.0, float("inf"), float("-inf"), float("nan"), 3.4e38, 2**-130, -2.5e-3])
    sd = collections.OrderedDict()
    sd["lm_head.weight"] = embed                      # aliased: same storage as the embedding below
    sd["model.embed_tokens.weight"] = embed
    sd["base"] = base
    sd["transposed"] = base.t()                       # non-contiguous: strides (1, 5)
    sd["rows"] = base[2:5]                            # contiguous, storage offset 10
    sd["column"] = base[:, 3]                         # strided: offset 3, stride 5
    sd["expanded"] = torch.arange(3.0).expand(4, 3)   # stride 0
    sd["bf16"] = torch.randn(4, 6, generator=g).to(torch.bfloat16)
    sd["bf16_t"] = sd["bf16"].t()
    sd["fp16_param"] = torch.nn.Parameter(torch.randn(3, 2, generator=g).half())
    sd["f64"] = torch.randn(5, generator=g, dtype=torch.float64)
    sd["int64"] = torch.arange(12).reshape(3, 4)
    sd["int32"] = torch.arange(-3, 3, dtype=torch.int32)
    sd["bool"] = torch.tensor([True, False, True])
    sd["uint8"] = torch.arange(250, 256, dtype=torch.uint8)
    sd["scalar"] = torch.tensor(3.25)
    sd["empty"] = torch.zeros(0, 4)
    sd["specials"] = specials
    sd["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.tensor([1.0, 0.1])
    torch.save(sd, out / "pytorch_model.bin")
    (out / "config.json").write_text(json.dumps({"model_type": "llama", "torch_dtype": "float32"}, indent=2) + "\n")
    ref = {}
    for k, v in sd.items():
        v = v.detach()
        ref[k] = bits(v.contiguous())
        if v.is_floating_point():  # torch's own casts: the reference for --dtype
            ref[k + "|BF16"] = bits(v.to(torch.bfloat16).contiguous())
            ref[k + "|F16"] = bits(v.to(torch.float16).contiguous())
            ref[k + "|F32"] = bits(v.to(torch.float32).contiguous())
    np.savez_compressed(out / "reference.npz", **ref)


def make_legacy() -> None:
    out = OUT / "legacy"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    torch.save({"w": torch.ones(2, 2)}, out / "pytorch_model.bin", _use_new_zipfile_serialization=False)
    (out / "config.json").write_text(json.dumps({"model_type": "llama"}) + "\n")


def check_torch_reads_our_writer() -> None:
    from rawpaged.convert.torch_pickle import write_torch_zip
    arrays = {"a": np.random.default_rng(0).standard_normal((3, 4), dtype=np.float32),
              "b": np.arange(6, dtype=np.uint16).reshape(2, 3) + 16256, "c": np.arange(5, dtype=np.int64),
              "d": np.array(2.5, dtype=np.float16)}
    with tempfile.TemporaryDirectory() as tmp:
        write_torch_zip(Path(tmp) / "x.bin", arrays.items(), bf16={"b"})
        back = torch.load(Path(tmp) / "x.bin", weights_only=True)
    assert list(back) == list(arrays) and back["b"].dtype == torch.bfloat16
    for k, a in arrays.items():
        assert np.array_equal(bits(back[k]), a) and back[k].shape == a.shape, k
    print("torch.load reads write_torch_zip output: ok")


def main() -> None:
    make_views()
    make_legacy()
    make_opt("opt-preln")
    make_llama_sharded("llama-gqa")
    check_torch_reads_our_writer()
    total = sum(f.stat().st_size for f in OUT.rglob("*") if f.is_file())
    print(f"wrote {OUT} ({total / 1e3:.0f} kB)")


if __name__ == "__main__":
    main()
