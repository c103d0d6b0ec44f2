"""EngineConfig: every engine option in one dataclass; the CLI, the server and LLM(...) read it.

Each field carries its command-line help in its metadata, so `add_cli_args` writes the flags
(`--block-size`, `--enable-prefix-caching/--no-enable-prefix-caching`, ...) and `from_cli_args`
reads them back: a new option is one field here (as vLLM's EngineArgs.add_cli_args/from_cli_args).
"""
from __future__ import annotations

import argparse
import re
import typing
from dataclasses import dataclass, field, fields

from rawpaged.core.kv_managers import KV_MANAGERS, ORCA_ALLOCATORS
from rawpaged.errors import RawpagedError

BLOCK_SIZES = (8, 16, 32)
BATCHING = ("continuous", "static")
DISTRIBUTED_BACKENDS = ("mp", "ray")


def parse_size(text) -> int:
    """'4GB' (10^9), '4GiB' (2^30), '512M', '1.5g', '1048576' -> bytes."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kmgt]?)(i?)b?\s*", str(text), re.IGNORECASE)
    if not m:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 4GB, 512MiB, 1073741824)")
    number, unit, binary = float(m.group(1)), m.group(2).lower(), m.group(3)
    power = "kmgt".index(unit) + 1 if unit else 0
    return int(number * ((1024 if binary or not unit else 1000) ** power))


def _opt(default, help: str, **cli):
    """A field with its command-line help (and choices / type / flag name / aliases)."""
    return field(default=default, metadata={"help": help, **cli})


@dataclass
class EngineConfig:
    model: str | None = _opt(None, "Hugging Face model directory, or a hub name such as "
                                   "facebook/opt-125m (default: the demo model shipped with rawpaged)")
    revision: str | None = _opt(None, "hub revision (branch, tag or commit) of --model")
    hf_token: str | None = _opt(None, "Hugging Face token for gated or private models (default: HF_TOKEN)")
    device: str = _opt("auto", "where the model runs", choices=("auto", "cpu", "cuda"))
    dtype: str = _opt("auto", "weights and KV cache dtype (auto: the checkpoint's on the GPU, float32 on "
                              "the CPU, where 16-bit types are storage and the arithmetic is float32)",
                      choices=("auto", "float32", "float16", "bfloat16"))
    block_size: int = _opt(16, "tokens per KV cache block", choices=BLOCK_SIZES)
    kv_cache_memory: int | None = _opt(None, "bytes for the KV cache pool, e.g. 4GB or 512MiB "
                                             "(default: 1 GiB on the CPU; GPU: gpu_memory_utilization)",
                                       type=parse_size)
    gpu_memory_utilization: float = _opt(0.90, "fraction of GPU memory for weights, activations and KV cache")
    swap_space: float = _opt(1.0, "GiB of CPU memory for swapped-out KV blocks")
    max_num_seqs: int = _opt(256, "sequences a step may run at once")
    max_num_batched_tokens: int | None = _opt(None, "tokens a step may compute (default: "
                                                    "max(2048, max_model_len without chunked prefill))")
    max_model_len: int | None = _opt(None, "longest prompt + output (default: the model's, capped to the cache)")
    preemption_mode: str = _opt("auto", "how to preempt when blocks run out (auto: recompute single "
                                        "sequences, swap groups)", choices=("auto", "recompute", "swap"))
    enable_prefix_caching: bool | None = _opt(None, "reuse the KV blocks of prompts' shared prefixes "
                                                    "(default: on with the paged KV manager)")
    enable_chunked_prefill: bool = _opt(True, "split long prompts across steps")
    watermark: float = _opt(0.01, "fraction of KV blocks kept free when admitting requests")
    seed: int = _opt(0, "random seed (generate: also the requests' sampling seed)")
    kv_manager: str = _opt("paged", "KV cache manager: paged (PagedAttention), or a baseline of the paper: "
                                    "Orca's one contiguous range per sequence of max_model_len tokens "
                                    "(orca-max), of prompt + the next power of two of max_tokens "
                                    "(orca-pow2), of exactly prompt + max_tokens (orca-oracle)",
                           choices=KV_MANAGERS)
    orca_granularity: int | None = _opt(None, "tokens per allocation unit of the orca-* managers "
                                              "(default: block_size; 1, Orca's own, only for an executor "
                                              "that reads no KV cache, the simulator)")
    orca_allocator: str | None = _opt(None, "how the orca-* managers place their ranges (default: buddy, "
                                            "the paper's: power-of-two blocks; first-fit: exact ranges)",
                                      choices=ORCA_ALLOCATORS)
    batching: str = _opt("continuous", "continuous (iteration-level) or static (request-level, "
                                       "FasterTransformer's: a batch starts when the last one has "
                                       "finished)", choices=BATCHING)
    num_scheduler_steps: int = _opt(1, "decode steps per scheduling while every running request is plain greedy "
                                       "(multi-step scheduling: the CPU's fused decode step runs them in one call "
                                       "and the engine's per-step work is paid once; tokens stream in bursts of up "
                                       "to this many). CPU backend, LLaMA family, paged KV manager")
    enforce_eager: bool = _opt(False, "run every step eagerly, op by op: no CUDA graphs for decode steps on the "
                                      "GPU, no fused decoder stack (one compiled call) on the CPU")
    tensor_parallel_size: int = _opt(1, "ranks the model is split across (Megatron-style: heads and the "
                                        "MLP; one GPU each, NCCL between them; CPU ranks share memory)",
                                     aliases=["-tp"])
    distributed_executor_backend: str | None = _opt(
        None, "how the ranks run: mp (one process per rank, this node) or ray (one Ray actor per GPU in a "
              "placement group, across nodes). Default: mp when tensor_parallel_size > 1, else this process",
        choices=DISTRIBUTED_BACKENDS)

    def __post_init__(self):
        if self.enable_prefix_caching is None:
            self.enable_prefix_caching = self.kv_manager == "paged"
        self.verify()

    def verify(self) -> None:
        def bad(msg: str):
            raise RawpagedError(msg)

        if self.block_size not in BLOCK_SIZES:
            bad(f"block_size must be one of {BLOCK_SIZES}, got {self.block_size}")
        if self.preemption_mode not in ("auto", "recompute", "swap"):
            bad(f"preemption_mode must be auto, recompute or swap, got {self.preemption_mode!r}")
        if self.max_num_seqs < 1:
            bad(f"max_num_seqs must be at least 1, got {self.max_num_seqs}")
        if self.max_num_batched_tokens is not None and self.max_num_batched_tokens < 1:
            bad(f"max_num_batched_tokens must be at least 1, got {self.max_num_batched_tokens}")
        if self.max_model_len is not None and self.max_model_len < 1:
            bad(f"max_model_len must be at least 1, got {self.max_model_len}")
        if self.kv_cache_memory is not None and self.kv_cache_memory <= 0:
            bad(f"kv_cache_memory must be a positive number of bytes, got {self.kv_cache_memory}")
        if self.swap_space < 0:
            bad(f"swap_space must be >= 0 GiB, got {self.swap_space}")
        if not 0 < self.gpu_memory_utilization <= 1:
            bad(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        if not 0.0 <= self.watermark < 1.0:
            bad(f"watermark must be in [0, 1), got {self.watermark}")
        if isinstance(self.num_scheduler_steps, bool) or not isinstance(self.num_scheduler_steps, int) \
                or not 1 <= self.num_scheduler_steps <= 64:
            bad(f"num_scheduler_steps must be an integer from 1 to 64, got {self.num_scheduler_steps!r}")
        if self.num_scheduler_steps > 1 and self.kv_manager != "paged":
            bad(f"num_scheduler_steps > 1 needs the paged KV manager (kv_manager is {self.kv_manager})")
        if self.kv_manager not in KV_MANAGERS:
            bad(f"kv_manager must be one of {', '.join(KV_MANAGERS)}, got {self.kv_manager!r}")
        if self.batching not in BATCHING:
            bad(f"batching must be continuous or static, got {self.batching!r}")
        if isinstance(self.tensor_parallel_size, bool) or not isinstance(self.tensor_parallel_size, int) \
                or self.tensor_parallel_size < 1:
            bad(f"tensor_parallel_size must be a positive integer, got {self.tensor_parallel_size!r}")
        if self.distributed_executor_backend not in (None, *DISTRIBUTED_BACKENDS):
            bad(f"distributed_executor_backend must be mp or ray, got {self.distributed_executor_backend!r}")
        if self.kv_manager == "paged":
            if self.orca_granularity is not None:
                bad("orca_granularity applies to the orca-* KV managers only (kv_manager is paged)")
            if self.orca_allocator is not None:
                bad("orca_allocator applies to the orca-* KV managers only (kv_manager is paged)")
        else:
            if self.orca_allocator is not None and self.orca_allocator not in ORCA_ALLOCATORS:
                bad(f"orca_allocator must be one of {', '.join(ORCA_ALLOCATORS)}, got {self.orca_allocator!r}")
            if self.orca_granularity is not None and self.orca_granularity < 1:
                bad(f"orca_granularity must be at least 1 token, got {self.orca_granularity}")
            if self.enable_prefix_caching:
                bad(f"kv_manager={self.kv_manager} shares nothing: prefix caching needs the paged manager")
            if self.preemption_mode == "swap":
                bad(f"kv_manager={self.kv_manager} never preempts and cannot swap: "
                    f"preemption_mode=swap needs the paged manager")

    # -- the command line --------------------------------------------------------------------------
    @classmethod
    def add_cli_args(cls, parser: argparse.ArgumentParser, skip: tuple[str, ...] = ()) -> None:
        group = parser.add_argument_group("engine")
        hints = typing.get_type_hints(cls)
        for f in fields(cls):
            if f.name in skip:
                continue
            meta = dict(f.metadata)
            flags = ["--" + f.name.replace("_", "-"), *meta.pop("aliases", ())]
            kwargs = {"default": f.default, "help": meta.pop("help"), "dest": f.name}
            kind = _base_type(hints[f.name])
            if kind is bool:
                kwargs["action"] = argparse.BooleanOptionalAction
            else:
                kwargs["type"] = meta.pop("type", kind)
                kwargs.update(meta)
            group.add_argument(*flags, **kwargs)

    @classmethod
    def from_cli_args(cls, args: argparse.Namespace, **overrides) -> "EngineConfig":
        values = {f.name: getattr(args, f.name) for f in fields(cls) if hasattr(args, f.name)}
        values.update(overrides)
        return cls(**values)

    @classmethod
    def from_kwargs(cls, **kwargs) -> "EngineConfig":
        """LLM(model, **kwargs): an unknown option is a one-line error naming it."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise RawpagedError(f"unknown engine option {unknown[0]!r}: choose from {', '.join(sorted(known))}")
        return cls(**kwargs)


def _base_type(hint):
    """int | None -> int."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return args[0] if args else hint
