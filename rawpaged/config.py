"""ModelConfig: what the engine needs to know about a Hugging Face model directory's config.json."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from rawpaged.errors import RawpagedError

# Hugging Face architecture name -> model family implemented in model_impl/.
ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "llama",
    "OPTForCausalLM": "opt",
}


@dataclass
class ModelConfig:
    path: Path
    architecture: str          # HF name, e.g. "LlamaForCausalLM"
    family: str                # "llama" or "opt"
    hf: dict = field(repr=False)
    vocab_size: int = 0
    hidden_size: int = 0
    num_layers: int = 0
    num_heads: int = 0
    num_kv_heads: int = 0
    head_dim: int = 0
    max_model_len: int = 0
    torch_dtype: str = "float32"
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()

    @classmethod
    def from_dir(cls, path: str | Path) -> "ModelConfig":
        path = Path(path)
        if not path.exists():
            raise RawpagedError(f"model path does not exist: {path}")
        if not path.is_dir():
            raise RawpagedError(f"model path is not a directory: {path}")
        cfg_file = path / "config.json"
        if not cfg_file.is_file():
            raise RawpagedError(f"no config.json in model directory {path}")
        try:
            hf = json.loads(cfg_file.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise RawpagedError(f"config.json in {path} is not valid JSON: {e}") from None
        archs = hf.get("architectures") or []
        arch = next((a for a in archs if a in ARCHITECTURES), None)
        if arch is None:
            raise RawpagedError(
                f"unknown architecture {archs or hf.get('model_type')!r} in {cfg_file}: "
                f"supported are {', '.join(ARCHITECTURES)}")
        cfg = cls(path=path, architecture=arch, family=ARCHITECTURES[arch], hf=hf)
        cfg._read_common()
        return cfg

    def get(self, key: str, default=None):
        return self.hf.get(key, default)

    def require(self, key: str):
        if key not in self.hf:
            raise RawpagedError(f"config.json in {self.path} lacks required field {key!r}")
        return self.hf[key]

    def _read_common(self) -> None:
        hf = self.hf
        self.vocab_size = int(self.require("vocab_size"))
        self.hidden_size = int(self.require("hidden_size"))
        self.num_layers = int(self.require("num_hidden_layers"))
        self.num_heads = int(self.require("num_attention_heads"))
        self.num_kv_heads = int(hf.get("num_key_value_heads") or self.num_heads)
        self.head_dim = int(hf.get("head_dim") or self.hidden_size // self.num_heads)
        self.max_model_len = int(self.require("max_position_embeddings"))
        self.torch_dtype = str(hf.get("torch_dtype") or hf.get("dtype") or "float32")
        self.bos_token_id = hf.get("bos_token_id")
        eos = hf.get("eos_token_id")
        self.eos_token_ids = tuple(eos) if isinstance(eos, list) else ((eos,) if eos is not None else ())
        if self.num_heads % self.num_kv_heads:
            raise RawpagedError(f"num_attention_heads={self.num_heads} is not a multiple of "
                                f"num_key_value_heads={self.num_kv_heads} in {self.path / 'config.json'}")
        gen = self.path / "generation_config.json"
        if gen.is_file():
            try:
                g = json.loads(gen.read_text())
            except json.JSONDecodeError as e:
                raise RawpagedError(f"generation_config.json in {self.path} is not valid JSON: {e}") from None
            eos = g.get("eos_token_id")
            if eos is not None:
                self.eos_token_ids = tuple(eos) if isinstance(eos, list) else (eos,)
            self.bos_token_id = g.get("bos_token_id", self.bos_token_id)

    def kv_bytes_per_token(self, dtype_size: int) -> int:
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * dtype_size
