"""The pure parts of bench/vs_llamacpp.py (the benchmark itself is never run by the tests)."""
import importlib.util
import json
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"


@pytest.fixture(scope="module")
def vs():
    spec = importlib.util.spec_from_file_location("vs_llamacpp", BENCH / "vs_llamacpp.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_batched_bench_row_is_parsed_as_generated_tokens_over_total_time(vs):
    out = """main: n_kv_max = 13000, n_batch = 2048
|    PP |     TG |    B |   N_KV |   T_PP s | S_PP t/s |   T_TG s | S_TG t/s |      T s |    S t/s |
|-------|--------|------|--------|----------|----------|----------|----------|----------|----------|
|   128 |    128 |   48 |  12288 |    2.888 |  2127.61 |    6.815 |   901.55 |    9.703 |  1266.45 |
"""
    assert vs.parse_batched_bench(out) == pytest.approx(128 * 48 / 9.703)
    with pytest.raises(ValueError):
        vs.parse_batched_bench("no table here")


def test_agreement_is_the_common_prefix(vs):
    assert vs.agreement([1, 2, 3, 4], [1, 2, 9, 4]) == 2
    assert vs.agreement([5, 6], [5, 6, 7]) == 2
    assert vs.agreement([], [1]) == 0


def test_decode_weight_bytes_counts_every_matrix_but_the_embedding(vs, tmp_path):
    cfg = {"hidden_size": 512, "num_hidden_layers": 8, "vocab_size": 32000, "intermediate_size": 1344,
           "num_attention_heads": 8, "num_key_value_heads": 4}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    per_layer = 512 * (512 + 2 * 256) + 512 * 512 + 2 * 1344 * 512 + 1344 * 512
    assert vs.decode_weight_bytes(tmp_path, 2) == (8 * per_layer + 32000 * 512) * 2
    assert vs.decode_weight_bytes(tmp_path, 4) == 2 * vs.decode_weight_bytes(tmp_path, 2)


def test_best_llama_precision_takes_the_highest_median(vs):
    R = {"llama.cpp f32 x": [1.0, 2.0], "llama.cpp f16 x": [5.0], "llama.cpp bf16 x": [3.0, 4.0, 100.0]}
    assert vs.best_llama(R, "x") == "f16"
    assert vs.best_llama({}, "x") is None
