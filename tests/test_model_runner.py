"""ModelRunner's flattening of a step (worker/model_runner.py): the decode step's own path builds
exactly what the general one builds."""
from __future__ import annotations

import numpy as np
import pytest

from rawpaged.sequence import ScheduledSeq, Sequence
from rawpaged.worker import model_runner
from rawpaged.worker.model_runner import prepare_any, prepare_decode, prepare_inputs


def decode_batch(rng, n: int, block_size: int) -> list[ScheduledSeq]:
    """n sequences each computing one token: some past their prompt (generating), some at their
    prompt's last token; block tables of different widths, scattered blocks; some not sampling."""
    batch = []
    for i in range(n):
        prompt = rng.integers(3, 1000, int(rng.integers(1, 60))).tolist()
        out = rng.integers(3, 1000, int(rng.integers(0, 40))).tolist() if i % 3 else []
        seq = Sequence(i, prompt, output_token_ids=out)
        seq.num_computed_tokens = seq.num_tokens - 1
        blocks = -(-seq.num_tokens // block_size) + int(rng.integers(0, 3))      # some spare blocks
        table = rng.permutation(500)[:blocks].tolist()
        batch.append(ScheduledSeq(seq, 1, table, sample=bool(i % 4 != 1)))
    return batch


def assert_same_inputs(a, b):
    for name in ("input_ids", "positions", "sample_rows"):
        x, y = getattr(a, name), getattr(b, name)
        assert x.dtype == y.dtype and np.array_equal(x, y), name
    for name in ("slot_mapping", "block_tables", "seq_lens", "query_start_loc"):
        x, y = getattr(a.meta, name), getattr(b.meta, name)
        assert x.dtype == y.dtype and np.array_equal(x, y), name
    assert (a.meta.max_query_len, a.meta.max_seq_len) == (b.meta.max_query_len, b.meta.max_seq_len)
    assert [r is None for r in a.prompt_rows] == [r is None for r in b.prompt_rows]


@pytest.mark.parametrize("n", [1, 2, 7, 48])
@pytest.mark.parametrize("block_size", [1, 16])
def test_decode_path_equals_the_general_one(n, block_size):
    batch = decode_batch(np.random.default_rng(n * 31 + block_size), n, block_size)
    fast = prepare_decode(batch, block_size)
    assert_same_inputs(fast, prepare_any(batch, block_size))
    # the new token is the sequence's last; its slot is in the block its position falls in
    for s, tok, pos, slot in zip(batch, fast.input_ids, fast.positions, fast.meta.slot_mapping):
        assert tok == s.seq.get_last_token_id() and pos == s.seq.num_tokens - 1
        assert slot == s.block_table[pos // block_size] * block_size + pos % block_size


def test_prepare_inputs_takes_the_decode_path_only_for_one_token_steps(monkeypatch):
    calls = []
    monkeypatch.setattr(model_runner, "prepare_decode", lambda b, bs: calls.append("decode"))
    monkeypatch.setattr(model_runner, "prepare_any", lambda b, bs: calls.append("any"))
    rng = np.random.default_rng(0)
    batch = decode_batch(rng, 3, 16)
    prepare_inputs(batch, 16)
    prefill = ScheduledSeq(Sequence(9, [5, 6, 7]), 3, [4], sample=True)
    prepare_inputs(batch + [prefill], 16)
    logits = ScheduledSeq(batch[0].seq, 1, batch[0].block_table, sample=True, prompt_logits=True)
    prepare_inputs([logits], 16)
    assert calls == ["decode", "any", "any"]
