"""SimulatedExecutor: the paper-scale simulator. No model runs; a cost model advances a clock.

    engine = build_sim_engine(paper_setup("opt-13b"), EngineConfig(block_size=16, ...))
    engine.add_request(..., SamplingParams(ignore_eos=True, max_tokens=out_len), prompt_token_ids=...)
    engine.step(); engine.executor.last_step_time       # seconds this step took on the profile

The REAL scheduler, KV manager and output processor run unchanged; only the executor differs:
  - each step's SchedulerOutput becomes a StepShape and the cost model's time for it
    (rawpaged/repro/costmodel.py); `clock` is the sum, `last_step_time` the latest;
  - it returns seeded random logits over a tiny fake vocabulary (SIM_VOCAB ids), so sampling,
    parallel-sampling forks and beam search run as on a real model. Requests run with
    `ignore_eos=True, max_tokens=<output length>`, so each produces exactly its workload length;
  - the tokenizer is SimTokenizer: one letter per id, nothing to detokenize (build_sim_engine takes
    another, e.g. a real one when the engine's host time is measured: rawpaged/repro/hostcost.py).
With `prepare_inputs=True` it also builds the batch's input arrays as the real executor does
(worker/model_runner.prepare_inputs: ids, positions, slot mapping, block tables) and times that in
`last_prepare_cpu`: the host work of a real step that the simulator otherwise skips.
The KV pool holds the setup's slots (e.g. the paper's 15.7K for OPT-13B on one A100-40GB).
"""
from __future__ import annotations

import dataclasses
import functools
import time
from pathlib import Path

import numpy as np

from rawpaged.config import ModelConfig
from rawpaged.engine.config import BLOCK_SIZES, EngineConfig
from rawpaged.errors import RawpagedError
from rawpaged.executor import CacheSize, ModelOutput
from rawpaged.repro.costmodel import CostModel, StepCost, StepShape
from rawpaged.repro.specs import GiB, SimSetup
from rawpaged.worker.model_runner import prepare_inputs

SIM_VOCAB = 32      # fake vocabulary: prompts use ids below it; beam search needs 2 * width <= SIM_VOCAB


class SimTokenizer:
    """The tokenizer a simulated engine carries: id i is the letter 'a' + i % 26."""
    bos_token_id = None
    eos_token_id = None
    eos_token_ids: set = set()
    all_special_ids: list = []
    chat_template = None
    vocab_size = SIM_VOCAB

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return [(ord(c) - 97) % SIM_VOCAB for c in text]

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return "".join(chr(97 + int(i) % 26) for i in ids)


def sim_model_config(setup: SimSetup) -> ModelConfig:
    """A ModelConfig for the engine from a model spec: the spec's shapes, the fake vocabulary."""
    m = setup.model
    arch = "OPTForCausalLM" if m.family == "opt" else "LlamaForCausalLM"
    return ModelConfig(path=Path(f"<simulated {m.name}>"), architecture=arch, family=m.family, hf={},
                       vocab_size=SIM_VOCAB, hidden_size=m.hidden, num_layers=m.layers, num_heads=m.heads,
                       num_kv_heads=m.kv_heads, head_dim=m.head_dim, max_model_len=m.max_len,
                       torch_dtype="float16")


class SimulatedExecutor:
    xp = np
    device = "sim"
    dtype = np.float16
    reads_block_tables = False      # no kernel reads the cache: Orca managers may use 1-token units

    def __init__(self, config, model_config: ModelConfig, *, setup: SimSetup, cost_model: CostModel | None = None,
                 prepare_inputs: bool = False):
        self.config = config
        self.measure_inputs = prepare_inputs
        self.last_prepare_cpu = 0.0
        self.model_config = model_config
        self.setup = setup
        self.cost_model = cost_model or CostModel(setup, config.block_size)
        self.rng = np.random.default_rng([config.seed, 0x5EED])
        self.clock = 0.0
        self.last_step_time = 0.0
        self.last_shape = StepShape()
        self.last_cost = StepCost()
        self.num_device_blocks = 0

    def determine_cache_size(self, max_batched_tokens: int, max_model_len: int) -> CacheSize:
        bs = self.config.block_size
        slots = self.setup.kv_slots()
        per_block = self.setup.model.kv_bytes_per_token * bs
        num_device = slots // bs
        if num_device < 1:
            raise RawpagedError(f"{slots} KV slots hold no block of {bs} tokens")
        num_cpu = int(self.config.swap_space * GiB * self.setup.num_gpus // per_block)
        return CacheSize(num_device, num_cpu, f"{slots} KV slots of {self.setup.model.name} "
                                              f"on {self.setup.num_gpus} x {self.setup.hardware.name}")

    def init_cache(self, num_device_blocks: int, num_cpu_blocks: int) -> None:
        self.num_device_blocks = num_device_blocks      # nothing to allocate: no arrays

    def execute_model(self, out) -> ModelOutput | None:
        self.last_shape = StepShape.of(out, self.config.block_size)
        self.last_cost = self.cost_model.step(self.last_shape)
        self.last_step_time = self.last_cost.total
        self.clock += self.last_step_time
        if not out.batch:
            return None
        if any(s.prompt_logits for s in out.batch):
            raise RawpagedError("the simulator returns no prompt logprobs")
        if self.measure_inputs:
            start = time.thread_time()
            prepare_inputs(out.batch, self.config.block_size)
            self.last_prepare_cpu = time.thread_time() - start
        rows = self.last_shape.num_sampled
        logits = self.rng.standard_normal((rows, SIM_VOCAB), dtype=np.float32)
        return ModelOutput(sample_logits=logits, prompt_logits=[None] * len(out.batch))


@dataclasses.dataclass
class SimEngineConfig(EngineConfig):
    """EngineConfig that accepts any block size >= 1. NOTE: EngineConfig allows 8/16/32, the sizes the
    kernels are built for; no kernel runs in a simulation (the paper's block-size sweep goes 1..256).
    The engine copies its config (dataclasses.replace), so the copies keep this check too."""

    def verify(self) -> None:
        size = self.block_size
        if size < 1:
            raise RawpagedError(f"block_size must be >= 1, got {size}")
        self.block_size = BLOCK_SIZES[0] if size not in BLOCK_SIZES else size
        try:
            super().verify()
        finally:
            self.block_size = size


def build_sim_engine(setup: SimSetup, config, cost_model: CostModel | None = None, block_size: int | None = None,
                     tokenizer=None, prepare_inputs: bool = False):
    """An LLMEngine whose executor is the simulator (the engine seam: model_config + tokenizer).

    `block_size` overrides config.block_size with any size >= 1 (SimEngineConfig); `tokenizer`
    replaces SimTokenizer; `prepare_inputs` makes the executor build (and time) the real inputs.
    """
    from rawpaged.engine.llm_engine import LLMEngine

    values = {f.name: getattr(config, f.name) for f in dataclasses.fields(EngineConfig)}
    if block_size is not None:
        values["block_size"] = block_size
    config = SimEngineConfig(**values)
    executor = functools.partial(SimulatedExecutor, setup=setup, cost_model=cost_model, prepare_inputs=prepare_inputs)
    return LLMEngine(config, executor, model_config=sim_model_config(setup), tokenizer=tokenizer or SimTokenizer())
