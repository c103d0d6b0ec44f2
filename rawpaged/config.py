"""ModelConfig: what the engine needs to know about a Hugging Face model directory's config.json.

config.json is untrusted input: the models size arrays from it in their constructors (the RoPE
table, before a single weight is read), so `from_dir` validates it first (`validate_config`):
types, ranges and divisibility of every field rawpaged reads, then the sizes the config implies
against the weight files on disk and the machine's memory. Every refusal is one line naming the
field and the file.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

from rawpaged.convert.paths import check_model_files, model_file
from rawpaged.errors import RawpagedError

# Hugging Face architecture name -> model family implemented in model_impl/ (one file per family).
# NOTE: the one table of what rawpaged runs: ModelConfig resolves against it and `rawpaged convert hf`
# refuses anything else.
ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    "GemmaForCausalLM": "gemma",
    "Phi3ForCausalLM": "phi3",
    "GPT2LMHeadModel": "gpt2",
    "GPTNeoXForCausalLM": "gpt_neox",
    "OPTForCausalLM": "opt",
}

# config.json's `model_type` -> the architecture, for a config without `architectures`.
MODEL_TYPES = {
    "llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM", "gemma": "GemmaForCausalLM", "phi3": "Phi3ForCausalLM",
    "gpt2": "GPT2LMHeadModel", "gpt_neox": "GPTNeoXForCausalLM", "opt": "OPTForCausalLM",
}

# Families whose attention rotates q and k (RoPE; the table of model_impl/rope.py).
ROTARY_FAMILIES = ("llama", "qwen2", "qwen3", "gemma", "phi3", "gpt_neox")
# Families with a gated MLP of `intermediate_size` (gate and up projections).
GATED_FAMILIES = ("llama", "qwen2", "qwen3", "gemma", "phi3")

# Older spellings of the fields rawpaged reads, per family: config.json's name -> the name used here.
# NOTE: GPT-2's files say n_embd/n_layer/...; transformers maps them with `attribute_map`, we rename
# them once when the file is read, so the checks and the models see one vocabulary.
FIELD_ALIASES = {
    "gpt2": {"n_embd": "hidden_size", "n_layer": "num_hidden_layers", "n_head": "num_attention_heads",
             "n_positions": "max_position_embeddings", "n_inner": "intermediate_size",
             "layer_norm_epsilon": "layer_norm_eps"},
    "gpt_neox": {"rotary_pct": "partial_rotary_factor", "rotary_emb_base": "rope_theta"},
}


def resolve_architecture(hf: dict, cfg_file: Path) -> tuple[str, str]:
    """(architecture, family) of a config.json: from `architectures`, else from `model_type`."""
    archs = hf.get("architectures") or []
    if not isinstance(archs, list) or not all(isinstance(a, str) for a in archs):
        raise RawpagedError(f"{cfg_file}: architectures must be a list of names, got {archs!r:.60}")
    model_type = hf.get("model_type")
    arch = next((a for a in archs if a in ARCHITECTURES), None)
    if arch is None and not archs and isinstance(model_type, str):
        arch = MODEL_TYPES.get(model_type)
    if arch is None:
        named = f"architectures {archs}" if archs else f"model_type {model_type!r}" if model_type else \
            "no architectures or model_type"
        raise RawpagedError(f"unknown architecture ({named}) in {cfg_file}: supported are "
                            f"{', '.join(ARCHITECTURES)} (model_type {', '.join(MODEL_TYPES)})")
    return arch, ARCHITECTURES[arch]


def normalize_fields(hf: dict, family: str) -> dict:
    """A copy of config.json with the family's older field names renamed (FIELD_ALIASES)."""
    out = dict(hf)
    for old, new in FIELD_ALIASES.get(family, {}).items():
        if old in out and out.get(new) is None:
            out[new] = out.pop(old)
    if family == "gpt_neox" and "partial_rotary_factor" not in out \
            and "partial_rotary_factor" not in (out.get("rope_parameters") or {}):
        out["partial_rotary_factor"] = 0.25          # GPTNeoXConfig's default rotary_pct
    return out


# Files of a model directory the engine reads besides the weights (config, tokenizer, templates);
# each must stay inside the directory (see rawpaged/convert/paths.py).
MODEL_DIR_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                   "special_tokens_map.json", "chat_template.jinja", "chat_template.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "added_tokens.json")


@dataclass(frozen=True)
class Field:
    """What one config.json field must be. kind: int | number | bool | str | object | token_ids."""
    kind: str
    required: bool = False
    low: float | None = None           # smallest allowed value (int, number)
    above: float | None = None         # the value must be greater than this (number)
    high: float | None = None          # largest allowed value (number)
    families: tuple[str, ...] = ()     # () = every family


# Every config.json field rawpaged reads. NOTE: a new field (or a new family's field) joins here and
# is then checked before anything is built from it. null counts as absent for optional fields
# (Hugging Face writes `"head_dim": null`).
CONFIG_FIELDS: dict[str, Field] = {
    "vocab_size": Field("int", required=True, low=1),
    "hidden_size": Field("int", required=True, low=1),
    "num_hidden_layers": Field("int", required=True, low=1),
    "num_attention_heads": Field("int", required=True, low=1),
    "num_key_value_heads": Field("int", low=1),
    "head_dim": Field("int", low=1),
    "max_position_embeddings": Field("int", required=True, low=1),
    "intermediate_size": Field("int", required=True, low=1, families=GATED_FAMILIES + ("gpt_neox",)),
    "ffn_dim": Field("int", required=True, low=1, families=("opt",)),
    "word_embed_proj_dim": Field("int", low=1, families=("opt",)),
    "rms_norm_eps": Field("number", low=0),
    "layer_norm_eps": Field("number", low=0),
    "rope_theta": Field("number", above=0),
    "partial_rotary_factor": Field("number", above=0, high=1),
    "rope_scaling": Field("object"),
    "rope_parameters": Field("object"),
    "tie_word_embeddings": Field("bool"),
    "attention_bias": Field("bool"),
    "mlp_bias": Field("bool"),
    "enable_bias": Field("bool"),
    "do_layer_norm_before": Field("bool"),
    "layer_norm_elementwise_affine": Field("bool"),
    "_remove_final_layer_norm": Field("bool"),
    "hidden_act": Field("str"),
    "activation_function": Field("str"),
    "torch_dtype": Field("str"),
    "dtype": Field("str"),
    "bos_token_id": Field("token_ids"),
    "eos_token_id": Field("token_ids"),
    # sliding-window attention (Mistral, Phi-3; Qwen2/3 per layer)
    "sliding_window": Field("int", low=1),
    "use_sliding_window": Field("bool"),
    "max_window_layers": Field("int", low=0),
    "layer_types": Field("str_list"),
    # GPT-2 (after FIELD_ALIASES) and GPT-NeoX
    "scale_attn_weights": Field("bool", families=("gpt2",)),
    "scale_attn_by_inverse_layer_idx": Field("bool", families=("gpt2",)),
    "use_parallel_residual": Field("bool", families=("gpt_neox",)),
    "original_max_position_embeddings": Field("int", low=1),
}

# Fields read inside "rope_parameters" / "rope_scaling" (model_impl/rope.py; the types it lacks are
# refused by rope_spec below).
ROPE_FIELDS: dict[str, Field] = {
    "rope_theta": Field("number", above=0),
    "rope_type": Field("str"),
    "type": Field("str"),
    "partial_rotary_factor": Field("number", above=0, high=1),
    "factor": Field("number", above=0),
    "original_max_position_embeddings": Field("int", low=1),
    "low_freq_factor": Field("number", above=0),
    "high_freq_factor": Field("number", above=0),
    "attention_factor": Field("number", above=0),
    "beta_fast": Field("number", above=0),
    "beta_slow": Field("number", above=0),
    "mscale": Field("number"),
    "mscale_all_dim": Field("number"),
    "truncate": Field("bool"),
}

# RoPE scaling rawpaged implements (model_impl/rope.py follows transformers' modeling_rope_utils.py).
ROPE_TYPES = ("default", "linear", "dynamic", "yarn", "llama3")


@dataclass(frozen=True)
class RopeSpec:
    """What the rotary table needs, read from config.json's top level and rope_parameters/rope_scaling."""
    rope_type: str
    theta: float
    rot_dim: int
    partial: float          # partial_rotary_factor: the fraction of head_dim that rotates
    params: dict            # the merged rope dict (factor, original_max_position_embeddings, ...)


# NOTE: a RoPE table up to this size is always accepted; beyond it, it may not exceed the weight
# files (a real model's table is a small fraction of its weights: 64 MiB for 8B LLaMA-3.1's
# 131072 positions, 5 GB for a 10M-context model of 200+ GB).
ROPE_TABLE_FLOOR = 64 << 20
ROPE_BUILD_FACTOR = 6   # float64 angles, cos, sin and their concatenation while the table is built


@dataclass
class ModelConfig:
    path: Path
    architecture: str          # HF name, e.g. "LlamaForCausalLM"
    family: str                # model_impl's family: a value of ARCHITECTURES
    hf: dict = field(repr=False)   # config.json, older field names renamed (normalize_fields)
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
        check_model_files(path, MODEL_DIR_FILES)
        cfg_file = path / "config.json"
        if not cfg_file.is_file():
            raise RawpagedError(f"no config.json in model directory {path}")
        raw = _read_json_object(cfg_file)
        arch, family = resolve_architecture(raw, cfg_file)
        hf = normalize_fields(raw, family)
        validate_config(hf, family, cfg_file)
        cfg = cls(path=path, architecture=arch, family=family, hf=hf)
        cfg._read_common()
        check_sizes(cfg)
        return cfg

    def get(self, key: str, default=None):
        return self.hf.get(key, default)

    def require(self, key: str):
        if key not in self.hf:
            raise RawpagedError(f"config.json in {self.path} lacks required field {key!r}")
        return self.hf[key]

    def _read_common(self) -> None:
        hf = self.hf
        self.vocab_size = hf["vocab_size"]
        self.hidden_size = hf["hidden_size"]
        self.num_layers = hf["num_hidden_layers"]
        self.num_heads = hf["num_attention_heads"]
        self.num_kv_heads = hf.get("num_key_value_heads") or self.num_heads
        self.head_dim = hf.get("head_dim") or self.hidden_size // self.num_heads
        self.max_model_len = derived_max_len(hf, self.family)
        self.torch_dtype = str(hf.get("torch_dtype") or hf.get("dtype") or "float32")
        self.bos_token_id = hf.get("bos_token_id")
        self.eos_token_ids = _token_ids(hf.get("eos_token_id"))
        gen = self.path / "generation_config.json"
        if gen.is_file():
            g = _read_json_object(gen)
            for key in ("bos_token_id", "eos_token_id"):
                _check_field(g, key, CONFIG_FIELDS[key], gen)
            eos = g.get("eos_token_id")
            if eos is not None:
                self.eos_token_ids = _token_ids(eos)
            self.bos_token_id = g.get("bos_token_id", self.bos_token_id)

    @property
    def rope(self) -> RopeSpec:
        return rope_spec(self.hf, self.path / "config.json")

    @property
    def layer_windows(self) -> tuple[int, ...]:
        """Sliding window of each layer (0: full causal attention)."""
        return layer_windows(self.hf, self.architecture)

    def kv_bytes_per_token(self, dtype_size: int) -> int:
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * dtype_size


# ---------------------------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------------------------

def validate_config(hf: dict, family: str, cfg_file: Path) -> None:
    """Types, ranges and relations of every field in CONFIG_FIELDS; one-line errors naming the field."""
    for name, spec in CONFIG_FIELDS.items():
        if not spec.families or family in spec.families:
            _check_field(hf, name, spec, cfg_file)
    for key in ("rope_parameters", "rope_scaling"):
        for name, spec in ROPE_FIELDS.items():
            _check_field(hf.get(key) or {}, name, spec, cfg_file, label=f"{key}.{name}")
    heads = hf["num_attention_heads"]
    kv_heads = hf.get("num_key_value_heads") or heads
    if heads % kv_heads:
        raise RawpagedError(f"num_attention_heads={heads} is not a multiple of "
                            f"num_key_value_heads={kv_heads} in {cfg_file}")
    if (hf.get("head_dim") is None or family == "opt") and hf["hidden_size"] % heads:
        raise RawpagedError(f"{cfg_file}: hidden_size={hf['hidden_size']} is not a multiple of "
                            f"num_attention_heads={heads} (and no head_dim is given)")
    if family in ROTARY_FAMILIES:
        spec = rope_spec(hf, cfg_file)
        if spec.rot_dim < 2 or spec.rot_dim % 2:
            raise RawpagedError(f"{cfg_file}: head_dim={_head_dim(hf)} times partial_rotary_factor="
                                f"{spec.partial:g} gives {spec.rot_dim} rotary dimensions: "
                                f"must be even and at least 2")
    types = hf.get("layer_types")
    if types is not None and (len(types) != hf["num_hidden_layers"]
                              or not set(types) <= {"full_attention", "sliding_attention"}):
        raise RawpagedError(f"{cfg_file}: layer_types must list 'full_attention' or 'sliding_attention' "
                            f"for each of the {hf['num_hidden_layers']} layers, got {_show(types)}")


# ---------------------------------------------------------------------------------------------
# RoPE parameters, sliding windows, the context length
# ---------------------------------------------------------------------------------------------

def rope_spec(hf: dict, cfg_file: Path) -> RopeSpec:
    """The rotary parameters of a config, from rope_parameters / rope_scaling over the top level
    (transformers' standardize_rope_params: the rope dict wins, top-level fields fill it in)."""
    scaling = hf.get("rope_scaling") or {}
    rope = {**(hf.get("rope_parameters") or {}), **scaling}
    # NOTE: a legacy rope_scaling names its type "type"; it overrides a rope_parameters' "rope_type".
    rope_type = scaling.get("rope_type") or scaling.get("type") or rope.get("rope_type") or rope.get("type") or "default"
    where = f"{cfg_file} (rope_scaling / rope_parameters)"
    if rope_type in ("longrope", "su"):
        raise RawpagedError(f"rope type {rope_type!r} (Phi-3's LongRoPE long-context scaling) in {where} is not "
                            f"supported: supported are {', '.join(ROPE_TYPES)}")
    if rope_type not in ROPE_TYPES:
        raise RawpagedError(f"rope type {rope_type!r} in {where} is not supported: supported are {', '.join(ROPE_TYPES)}")
    theta = rope.get("rope_theta") or hf.get("rope_theta") or 10000.0
    factor = rope.get("partial_rotary_factor") or hf.get("partial_rotary_factor") or 1.0
    if rope_type != "default":
        params = dict(rope)
        # NOTE: Phi-3 keeps original_max_position_embeddings at the top level, and there it wins
        # (standardize_rope_params' exception); elsewhere it defaults to max_position_embeddings.
        if rope_type in ("yarn", "llama3"):
            top = hf.get("original_max_position_embeddings")
            params["original_max_position_embeddings"] = top if top is not None and hf.get("model_type") == "phi3" \
                else params.get("original_max_position_embeddings") or hf["max_position_embeddings"]
        needed = {"linear": ("factor",), "dynamic": ("factor",), "yarn": (),
                  "llama3": ("factor", "low_freq_factor", "high_freq_factor")}[rope_type]
        missing = [k for k in needed if params.get(k) is None]
        if missing:
            raise RawpagedError(f"rope type {rope_type!r} in {where} needs {', '.join(missing)}")
        if rope_type == "dynamic" and int(_head_dim(hf) * float(factor)) <= 2:
            raise RawpagedError(f"rope type 'dynamic' in {where} needs more than 2 rotary dimensions")
        if rope_type == "llama3" and params["high_freq_factor"] <= params["low_freq_factor"]:
            raise RawpagedError(f"{where}: llama3 high_freq_factor must exceed low_freq_factor")
        rope = params
    return RopeSpec(rope_type, float(theta), int(_head_dim(hf) * float(factor)), float(factor), rope)


def derived_max_len(hf: dict, family: str) -> int:
    """The longest context the model serves: max_position_embeddings, stretched by the RoPE
    scaling factor for linear / dynamic (x factor) and yarn (original_max_position_embeddings x
    factor), as vLLM derives it; llama3 configs already give the stretched length."""
    base = hf["max_position_embeddings"]
    if family not in ROTARY_FAMILIES:
        return base
    spec = rope_spec(hf, Path("config.json"))
    if spec.rope_type in ("linear", "dynamic"):
        return int(base * spec.params["factor"])
    if spec.rope_type == "yarn":
        orig = spec.params["original_max_position_embeddings"]
        return int(orig * (spec.params.get("factor") or base / orig))
    return base


# Defaults transformers gives `sliding_window` when config.json leaves it out.
_DEFAULT_WINDOW = {"MistralForCausalLM": 4096, "Qwen2ForCausalLM": 4096, "Qwen3ForCausalLM": 4096}


def layer_windows(hf: dict, architecture: str) -> tuple[int, ...]:
    """Sliding window per layer, 0 for full attention, as transformers masks it: Mistral and Phi-3
    window every layer when `sliding_window` is set; Qwen2/Qwen3 only with `use_sliding_window`, and
    then the layers `layer_types` names (default: those from `max_window_layers` on)."""
    n = hf["num_hidden_layers"]
    window = hf.get("sliding_window", _DEFAULT_WINDOW.get(architecture))
    if architecture in ("MistralForCausalLM", "Phi3ForCausalLM"):
        return (window or 0,) * n
    if architecture in ("Qwen2ForCausalLM", "Qwen3ForCausalLM") and hf.get("use_sliding_window") and window:
        types = hf.get("layer_types") or ["sliding_attention" if i >= hf.get("max_window_layers", 28)
                                          else "full_attention" for i in range(n)]
        return tuple(window if t == "sliding_attention" else 0 for t in types)
    return (0,) * n


def _check_field(hf: dict, name: str, spec: Field, cfg_file: Path, label: str | None = None) -> None:
    value = hf.get(name)
    if value is None:
        if spec.required:
            raise RawpagedError(f"{cfg_file.name} in {cfg_file.parent} lacks required field {name!r}")
        return
    what = _field_problem(value, spec)
    if what:
        raise RawpagedError(f"{cfg_file}: {label or name} must be {what}, got {_show(value)}")


def _field_problem(value, spec: Field) -> str | None:
    """What the value should have been, or None when it is fine. NOTE: bool is not an int here."""
    if spec.kind == "int":
        ok = type(value) is int and (spec.low is None or value >= spec.low)
        return None if ok else ("a positive integer" if spec.low == 1 else f"an integer >= {spec.low}")
    if spec.kind == "number":
        ok = type(value) in (int, float) and math.isfinite(value) \
            and (spec.low is None or value >= spec.low) and (spec.above is None or value > spec.above) \
            and (spec.high is None or value <= spec.high)
        if ok:
            return None
        bounds = [f">= {spec.low}" if spec.low is not None else "", f"> {spec.above}" if spec.above is not None else "",
                  f"<= {spec.high}" if spec.high is not None else ""]
        return "a finite number " + " and ".join(b for b in bounds if b)
    if spec.kind == "bool":
        return None if type(value) is bool else "true or false"
    if spec.kind == "str":
        return None if isinstance(value, str) else "a string"
    if spec.kind == "object":
        return None if isinstance(value, dict) else "a JSON object"
    if spec.kind == "str_list":
        return None if isinstance(value, list) and all(isinstance(v, str) for v in value) else "a list of strings"
    if spec.kind == "token_ids":
        ids = value if isinstance(value, list) else [value]
        return None if all(type(t) is int and t >= 0 for t in ids) else "a token id (integer >= 0) or a list of them"
    raise AssertionError(f"unknown field kind {spec.kind}")


def _show(value) -> str:
    kind = {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "a list",
            dict: "an object"}.get(type(value), type(value).__name__)
    text = json.dumps(value)
    return f"{text[:40]}{'...' if len(text) > 40 else ''} ({kind})"


def _head_dim(hf: dict) -> int:
    return hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"]


def _rotary_dim(hf: dict) -> int:
    return rope_spec(hf, Path("config.json")).rot_dim


# ---------------------------------------------------------------------------------------------
# Sizes: what the config makes the engine allocate, against the files and the machine
# ---------------------------------------------------------------------------------------------

def implied_parameters(cfg: ModelConfig) -> int:
    """A lower bound on the parameter count the config implies (what the weight files must hold).

    Embedding, q/k/v/o projections and two MLP matrices per layer; an untied head, norms and biases
    are left out, so a real checkpoint always holds at least this many.
    """
    hf, H = cfg.hf, cfg.hidden_size
    embed_dim = hf.get("word_embed_proj_dim") or H
    mlp_dim = hf.get("intermediate_size") or hf.get("ffn_dim") or (4 * H if cfg.family == "gpt2" else 0)
    attention = H * cfg.head_dim * (2 * cfg.num_heads + 2 * cfg.num_kv_heads)
    params = cfg.vocab_size * embed_dim + cfg.num_layers * (attention + 2 * H * mlp_dim)
    if cfg.family in ("opt", "gpt2"):                # learned positions are weights too
        params += hf["max_position_embeddings"] * H
    return params


def rope_table_bytes(cfg: ModelConfig) -> int:
    """The float32 cos/sin table a rotary family builds: [max context, rotary dims]."""
    return cfg.max_model_len * _rotary_dim(cfg.hf) * 4 if cfg.family in ROTARY_FAMILIES else 0


def physical_memory() -> int | None:
    """Bytes of RAM on this machine, or None where the OS does not say."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def check_sizes(cfg: ModelConfig) -> None:
    """Refuse a config whose sizes could not be real before the model allocates anything from it.

    - the implied parameters must fit the weight files at 1 byte each (the smallest dtype) and the
      machine's memory at 2 bytes each (the weights are held in host memory while loading);
    - the RoPE table may not exceed the weight files (or ROPE_TABLE_FLOOR) nor, while built, memory.
    """
    from rawpaged.loader import weight_files   # NOTE: late: the loader imports the converter's reader

    cfg_file = cfg.path / "config.json"
    hf = cfg.hf
    fields = (f"vocab_size={cfg.vocab_size}, hidden_size={cfg.hidden_size}, num_hidden_layers={cfg.num_layers}, "
              f"num_attention_heads={cfg.num_heads}, head_dim={cfg.head_dim}, "
              f"intermediate_size/ffn_dim={hf.get('intermediate_size') or hf.get('ffn_dim')}")
    params, memory = implied_parameters(cfg), physical_memory()
    if memory is not None and 2 * params > memory:
        raise RawpagedError(f"{cfg_file}: the sizes it gives ({fields}) imply at least {params} parameters, "
                            f"{2 * params / 1e9:.1f} GB in 16-bit: more than this machine's {memory / 1e9:.1f} GB of memory")
    on_disk = sum(f.stat().st_size for f in weight_files(cfg.path))
    if params > on_disk:
        raise RawpagedError(f"{cfg_file}: the sizes it gives ({fields}) imply at least {params} parameters, "
                            f"but the weight files hold only {on_disk} bytes")
    rope = rope_table_bytes(cfg)
    table = f"max_position_embeddings={cfg.hf['max_position_embeddings']} needs a {rope / 1e6:.0f} MB RoPE table " \
            f"({cfg.max_model_len} positions x {_rotary_dim(cfg.hf)} rotary dims)"
    if rope > max(on_disk, ROPE_TABLE_FLOOR):
        raise RawpagedError(f"{cfg_file}: {table}, more than the {on_disk / 1e6:.0f} MB of weight files: "
                            f"is max_position_embeddings right?")
    if memory is not None and ROPE_BUILD_FACTOR * rope > memory:
        raise RawpagedError(f"{cfg_file}: {table}, and ~{ROPE_BUILD_FACTOR}x that while it is built: "
                            f"more than this machine's {memory / 1e9:.1f} GB of memory")


def _read_json_object(path: Path) -> dict:
    try:
        obj = json.loads(model_file(path.parent, path.name).read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise RawpagedError(f"{path.name} in {path.parent} is not valid JSON: {e}") from None
    except (ValueError, RecursionError):
        raise RawpagedError(f"{path.name} in {path.parent} is not valid JSON (not UTF-8 or nested too deep)") from None
    except OSError as e:
        raise RawpagedError(f"{path}: cannot read: {e.strerror or type(e).__name__}") from None
    if not isinstance(obj, dict):
        raise RawpagedError(f"{path.name} in {path.parent} is not a JSON object")
    return obj


def _token_ids(value) -> tuple[int, ...]:
    if value is None:
        return ()
    return tuple(value) if isinstance(value, list) else (value,)
