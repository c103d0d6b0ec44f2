"""Paging is invisible: block size and the choice of physical blocks do not change the logits."""
import numpy as np
import pytest

from paged_driver import PagedDriver, load_model
from rawpaged.sequence import Sequence


@pytest.fixture(scope="module")
def model(stories260k_dir):
    return load_model(stories260k_dir)


def run(model, prompts, block_size, shuffle_seed=None, decode_steps=6):
    """Prefill a batch, then greedy-decode; the logits of every step, concatenated."""
    drv = PagedDriver(model, block_size=block_size, num_blocks=64, shuffle_seed=shuffle_seed)
    seqs = [Sequence(i, list(p)) for i, p in enumerate(prompts)]
    news = [s.num_tokens for s in seqs]
    all_logits = []
    for _ in range(decode_steps + 1):
        logits, _ = drv.step(seqs, news)
        all_logits.append(logits)
        for s, row in zip(seqs, logits):
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
