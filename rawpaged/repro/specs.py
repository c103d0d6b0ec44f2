"""Model specs and hardware profiles: the data the simulator's cost model reads.

    spec = MODELS["opt-13b"]                 # shapes only: no weights, no files
    hw = HARDWARE["a100-40gb"]               # datasheet peaks + achieved fractions + overheads
    hw = HardwareProfile.from_json(path)     # or figures measured on a device (calibrate.py writes these)

A `ModelSpec` knows what the cost model needs: parameters per layer, weight bytes, KV bytes per token.
A `HardwareProfile` is one accelerator: memory, peak HBM bandwidth and FLOP/s, link bandwidths, and
the fractions of peak the kernels reach plus the per-step CPU overheads (the constants calibration
fits). NOTE: no GPU was measured here, so the GPU profiles' fractions of peak are stated assumptions,
typical of 2023 kernels (cuBLAS streaming weights at ~80% of HBM, the paged decode kernel at ~60%).
Their CPU overheads are MEASURED: rawpaged's own host time per step and per batched sequence
(scheduling, KV bookkeeping, input preparation, sampling's per-row logic, detokenizing, outputs),
which `rawpaged repro calibrate` measures on the simulator's engine (hostcost.py) and reports beside
the committed values below. Kernel launches are assumed hidden behind the GPU's work (no term).
The A100 profiles model the paper's systems in two more ways: vLLM 0.1 (and its Orca) ran prompts
in steps of their own (`prefill_alone`), and paid vLLM 0.1's host time per batched sequence, which
is not published: one constant fitted to one number of the paper (VLLM01_SEQ_S, hostfit.py). `repro calibrate` also fits every constant of a CPU profile
to real runs of the CPU backend.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

from rawpaged.errors import RawpagedError

GiB = 1 << 30

# rawpaged's host time, measured by `rawpaged repro calibrate` (hostcost.measure_host_cost: 10,557
# steps of OPT-13B / ShareGPT on the simulator's engine, this thread's CPU time, least squares) on the
# development machine (x86_64, 2 shared CPUs, Python 3.11, 2026-12-01): 0.139 ms a step + 0.0303 ms
# per sequence in the batch. NOTE: the paper's vLLM 0.1 measured its own on its machine; not
# published (see VLLM01_SEQ_S): these are the only host costs this project has measured.
HOST_STEP_S = 1.39e-4
HOST_SEQ_S = 3.03e-5
# The paper's vLLM 0.1 host time per batched sequence (its sampler ran request by request), fitted to
# ONE number of the paper, Fig. 13b's 132.44 requests (Alpaca, 30 req/s), by `rawpaged repro hostfit`
# (hostfit.py, which reports the fit beside this value); Fig. 13a and every other figure are held out.
# The A100 profiles (the paper's systems) carry it; H100/H200 (rawpaged's kernels) carry HOST_SEQ_S.
VLLM01_SEQ_S = 2.67e-4


@dataclass(frozen=True)
class ModelSpec:
    name: str
    family: str                 # "opt" | "llama"
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    ffn: int
    vocab: int
    max_len: int                # max_position_embeddings
    dtype_bytes: int = 2        # fp16 weights and KV cache

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def layer_params(self) -> int:
        """Weights of one decoder layer's GEMMs (q, k, v, o and the FFN; norms and biases left out)."""
        kv = self.kv_heads * self.head_dim
        attn = self.hidden * (2 * self.hidden + 2 * kv)
        mats = 3 if self.family == "llama" else 2            # SwiGLU has gate, up, down
        return attn + mats * self.hidden * self.ffn

    @property
    def gemm_params(self) -> int:
        """Weights every computed token multiplies through (all layers; the LM head is separate)."""
        return self.layers * self.layer_params

    @property
    def params(self) -> int:
        head = 0 if self.family == "opt" else self.vocab * self.hidden     # OPT ties its LM head
        pos = (self.max_len + 2) * self.hidden if self.family == "opt" else 0
        return self.gemm_params + self.vocab * self.hidden + head + pos

    @property
    def weight_bytes(self) -> int:
        return self.params * self.dtype_bytes

    @property
    def kv_bytes_per_token(self) -> int:
        """K and V of every layer for one token (OPT-13B: 800 KiB, the paper's figure)."""
        return 2 * self.layers * self.kv_heads * self.head_dim * self.dtype_bytes

    @classmethod
    def from_hf_config(cls, name: str, hf: dict, dtype_bytes: int) -> "ModelSpec":
        """The spec of a real model directory's config.json (calibration's small models)."""
        family = "opt" if "OPT" in (hf.get("architectures") or [""])[0] else "llama"
        heads = hf["num_attention_heads"]
        return cls(name=name, family=family, hidden=hf["hidden_size"], layers=hf["num_hidden_layers"],
                   heads=heads, kv_heads=hf.get("num_key_value_heads") or heads,
                   ffn=hf.get("ffn_dim") or hf.get("intermediate_size"), vocab=hf["vocab_size"],
                   max_len=hf["max_position_embeddings"], dtype_bytes=dtype_bytes)


# The paper's models (Table 1: OPT-13B/66B/175B, LLaMA-13B for the shared-prefix workload), and OPT-125M.
MODELS: dict[str, ModelSpec] = {m.name: m for m in (
    ModelSpec("opt-125m", "opt", 768, 12, 12, 12, 3072, 50272, 2048),
    ModelSpec("opt-13b", "opt", 5120, 40, 40, 40, 20480, 50272, 2048),
    ModelSpec("opt-66b", "opt", 9216, 64, 72, 72, 36864, 50272, 2048),
    ModelSpec("opt-175b", "opt", 12288, 96, 96, 96, 49152, 50272, 2048),
    ModelSpec("llama-13b", "llama", 5120, 40, 40, 40, 13824, 32000, 2048),
)}


@dataclass(frozen=True)
class HardwareProfile:
    name: str
    memory_bytes: int           # per device
    hbm_bw: float               # peak bytes/s
    flops: float                # peak dense fp16/bf16 FLOP/s
    link_bw: float              # GPU-GPU bytes/s per direction (NVLink), for all-reduce
    pcie_bw: float              # host link bytes/s (swap)
    # achieved fractions of peak (what calibration fits)
    mem_eff: float = 0.8        # weight streaming (GEMMs at small batch)
    gemm_eff: float = 0.6       # GEMM FLOP/s (large batch, prefill)
    attn_eff: float = 0.6       # decode attention: KV bytes over HBM peak
    attn_flop_eff: float = 0.4  # prefill attention FLOP/s
    # overheads, seconds
    step_overhead: float = HOST_STEP_S    # per step: the engine's host time (measured, see above)
    seq_overhead: float = HOST_SEQ_S      # per sequence in the batch: bookkeeping, sampling, detokenizing
    allreduce_latency: float = 2.5e-5
    transfer_latency: float = 1e-5   # per swapped or copied block (one contiguous copy each)
    prefill_alone: bool = False      # prompts run in steps of their own (vLLM 0.1): see costmodel.py
    # the paper's decode kernel waits once per KV block it reads (costmodel.py, "Small blocks"); 0: no term
    block_latency: float = 0.0       # seconds a warp waits per block: block-table load, then the rows
    sms: int = 0                     # streaming multiprocessors
    warps_per_sm: int = 16           # warps of the decode kernel resident per SM
    # GEMMs of few rows on a kernel with a matrix-vector path (costmodel.py, "Few-row GEMMs"); 0: no term
    few_rows: int = 0                # rows of x up to which the kernel takes that path
    few_row_time: float = 0.0        # seconds each of those rows costs beyond the GEMM FLOP term

    def to_json(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(asdict(self), indent=2) + "\n")

    @classmethod
    def from_json(cls, path: str | Path) -> "HardwareProfile":
        p = Path(path)
        if not p.is_file():
            raise RawpagedError(f"hardware profile not found: {p}")
        try:
            data = json.loads(p.read_text())
        except (OSError, ValueError) as e:
            raise RawpagedError(f"hardware profile {p} is not valid JSON: {e}") from None
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if not isinstance(data, dict) or unknown:
            raise RawpagedError(f"hardware profile {p}: unknown field {unknown[0] if unknown else '?'!r}")
        try:
            return cls(**data)
        except TypeError as e:
            raise RawpagedError(f"hardware profile {p}: {e}") from None

    def with_fit(self, **values) -> "HardwareProfile":
        return replace(self, **values)


# Datasheet peaks (dense fp16/bf16 tensor FLOP/s, HBM bandwidth, NVLink per direction). The H200's
# bandwidth is its measured device-to-device copy (about 4.3 TB/s, of 4.8 peak: DESIGN.md).
#
# The A100 profiles' per-block wait (the paper's kernel, costmodel.py "Small blocks"), stated
# assumptions, not fits: 108 SMs (datasheet); 0.5 us a block, a dependent pair of loads at ~1.41 GHz
# (an L2 hit for the block-table entry, ~200 cycles, then the rows from DRAM, ~500 cycles: the
# range microbenchmarks of Volta/Ampere report); 16 resident warps a SM (vLLM 0.1's kernel runs 128
# threads a thread block; at ~128 registers a thread the SM's 65,536 registers hold 512 threads).
# For OPT-13B that is 0.53 KV tokens' worth of bandwidth time per block: +26% attention time at
# blocks of 2, +3% at 16.
PAPER_KERNEL = dict(block_latency=5e-7, sms=108, warps_per_sm=16)
HARDWARE: dict[str, HardwareProfile] = {h.name: h for h in (
    HardwareProfile("a100-40gb", 40 * GiB, 1.555e12, 312e12, 300e9, 25e9, prefill_alone=True,
                    seq_overhead=VLLM01_SEQ_S, **PAPER_KERNEL),
    HardwareProfile("a100-80gb", 80 * GiB, 2.039e12, 312e12, 300e9, 25e9, prefill_alone=True,
                    seq_overhead=VLLM01_SEQ_S, **PAPER_KERNEL),
    HardwareProfile("h100-80gb", 80 * GiB, 3.35e12, 989e12, 450e9, 50e9, mem_eff=0.85, attn_eff=0.85),
    HardwareProfile("h200-141gb", 141 * 10**9, 4.3e12, 790e12, 450e9, 50e9, mem_eff=0.9, gemm_eff=0.8,
                    attn_eff=0.85),
)}


@dataclass(frozen=True)
class SimSetup:
    """A model on `num_gpus` devices of one profile (tensor parallel), with its KV budget."""
    model: ModelSpec
    hardware: HardwareProfile
    num_gpus: int = 1
    kv_memory: int | None = None     # bytes of KV cache over all ranks (None: what memory leaves)
    gpu_memory_utilization: float = 0.9

    def __post_init__(self):
        if self.model.heads % self.num_gpus or self.model.kv_heads % self.num_gpus:
            raise RawpagedError(f"{self.model.name} has {self.model.heads} heads: not divisible over "
                                f"{self.num_gpus} GPUs")

    def kv_bytes(self) -> int:
        """KV cache bytes over all ranks; a model whose weights do not fit is a one-line error."""
        total = self.hardware.memory_bytes * self.num_gpus * self.gpu_memory_utilization
        weights = self.model.weight_bytes
        left = total - weights
        if left <= 0:
            raise RawpagedError(
                f"{self.model.name} needs {weights / GiB:.1f} GiB of weights, more than "
                f"{self.gpu_memory_utilization:.0%} of {self.num_gpus} x {self.hardware.name} "
                f"({total / GiB:.1f} GiB)")
        if self.kv_memory is not None:
            if self.kv_memory > left:
                raise RawpagedError(f"kv_memory of {self.kv_memory / GiB:.1f} GiB does not fit beside "
                                    f"{self.model.name}'s weights on {self.num_gpus} x {self.hardware.name}")
            return self.kv_memory
        return int(left)

    def kv_slots(self) -> int:
        return self.kv_bytes() // self.model.kv_bytes_per_token


# The paper's Table 1: the GPUs of each model and the KV cache slots it reports (15.7K = 12 GiB of
# OPT-13B's 800 KiB tokens). NOTE: 0.96 of memory: Table 1's weights + KV fill 92% of 8 x 80 GB.
PAPER_SETUPS = {
    "opt-13b": dict(hardware="a100-40gb", num_gpus=1, kv_slots=15_728),
    "opt-66b": dict(hardware="a100-40gb", num_gpus=4, kv_slots=9_700),
    "opt-175b": dict(hardware="a100-80gb", num_gpus=8, kv_slots=60_100),
    "llama-13b": dict(hardware="a100-40gb", num_gpus=1, kv_slots=15_728),
}
PAPER_MEMORY_UTILIZATION = 0.96


def paper_setup(model: str, hardware: str | HardwareProfile | None = None) -> SimSetup:
    """The paper's configuration of a model (Table 1), optionally on other hardware."""
    if model not in PAPER_SETUPS:
        raise RawpagedError(f"unknown model {model!r}: choose from {', '.join(PAPER_SETUPS)}")
    cfg = dict(PAPER_SETUPS[model])
    hw, slots = cfg.pop("hardware"), cfg.pop("kv_slots")
    if isinstance(hardware, HardwareProfile):
        profile = hardware
    else:
        name = hardware or hw
        if name not in HARDWARE:
            raise RawpagedError(f"unknown hardware profile {name!r}: choose from {', '.join(HARDWARE)}")
        profile = HARDWARE[name]
    spec = MODELS[model]
    setup = SimSetup(spec, profile, kv_memory=slots * spec.kv_bytes_per_token,
                     gpu_memory_utilization=PAPER_MEMORY_UTILIZATION, **cfg)
    setup.kv_bytes()        # a model that does not fit is refused here, in one line
    return setup
