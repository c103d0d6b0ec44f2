"""Paging is invisible: block size and the choice of physical blocks do not change the logits."""
import numpy as np
import pytest

from model_impl.llama import LlamaForCausalLM
from rawpaged.backend import cpu
from rawpaged.cache_engine import CacheEngine
from rawpaged.model_runner import ScheduledSeq, prepare_inputs
from rawpaged.sequence import Sequence


@pytest.fixture(scope="module")
def model(stories260k_dir):
    from rawpaged.config import ModelConfig
    from rawpaged.loader import iter_tensors
    cfg = ModelConfig.from_dir(stories260k_dir)
    m = LlamaForCausalLM(cfg, cpu, np.float32)
    m.load_weights(iter_tensors(stories260k_dir))
    return m


def run(model, prompts, block_size, shuffle_seed=None, decode_steps=6):
    """Prefill a batch, then greedy-decode; returns the logits of every step, concatenated."""
    num_blocks = 64
    cache = CacheEngine(model.cfg, cpu, np.float32, block_size, num_blocks, 0)
    order = np.arange(num_blocks)
    if shuffle_seed is not None:
        order = np.random.default_rng(shuffle_seed).permutation(num_blocks)
    free = list(order)
    seqs = [Sequence(i, list(p)) for i, p in enumerate(prompts)]
    tables = {s.seq_id: [] for s in seqs}

    def ensure(seq, n):
        while len(tables[seq.seq_id]) * block_size < n:
            tables[seq.seq_id].append(int(free.pop(0)))

    all_logits = []
    news = [s.num_tokens for s in seqs]
    for step in range(decode_steps + 1):
        for s, n in zip(seqs, news):
            ensure(s, s.num_computed_tokens + n)
        batch = [ScheduledSeq(s, n, tables[s.seq_id], sample=True) for s, n in zip(seqs, news)]
        inp = prepare_inputs(batch, block_size)
        hidden = model.forward(inp.input_ids, inp.positions, cache.device_cache, inp.meta)
        logits = model.compute_logits(hidden)
        all_logits.append(logits)
        for s, n, row in zip(seqs, news, logits):
            s.num_computed_tokens += n
            s.append_token(int(np.argmax(row)), 0.0)
        news = [1] * len(seqs)
    return np.concatenate(all_logits)


def test_block_size_and_shuffled_blocks_change_nothing(model):
    rng = np.random.default_rng(0)
    prompts = [rng.integers(3, 512, n).tolist() for n in (5, 19, 33, 8)]
    base = run(model, prompts, 16)
    for bs in (8, 16, 32):
        for shuffle in (None, 1, 2):
            got = run(model, prompts, bs, shuffle)
            np.testing.assert_allclose(got, base, rtol=1e-5, atol=1e-5, err_msg=f"block_size={bs} shuffle={shuffle}")
