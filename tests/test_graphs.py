"""Graph-ready decode (issue 13): persistent buffers, batch buckets with padding rows, CUDA graph
capture and replay, and the launches a decode step costs.

Under the host emulator (tests/cuda_emulator.py) a stream capture records the step's device work and
Graph.launch replays it on whatever the buffers hold then, with every host value frozen at capture,
and a host<->device transfer during capture raises as on a device. So a replayed step that equals an
eager one here shows the step reads nothing per-step from the host, and padding rows change nothing.
On the CPU the same persistent-buffer, padded step runs eagerly (DecodeGraphs.attach).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import cuda_emulator
from cuda_emulator import CXX, install, uninstall_caches
from rawpaged import LLM, SamplingParams
from rawpaged.sequence import ScheduledSeq, Sequence
from rawpaged.worker.graph_runner import DecodeGraphs, batch_buckets, bucket_for, is_pure_decode
from rawpaged.worker.model_runner import prepare_inputs

FIXTURES = Path(__file__).parent / "fixtures"
needs_cxx = pytest.mark.skipif(CXX is None, reason="no C++ compiler (g++) to build the host emulation")
GREEDY = dict(temperature=0.0, ignore_eos=True)


@pytest.fixture()
def emu(monkeypatch):
    yield install(monkeypatch)
    uninstall_caches()


# --------------------------------------------------------------------------------------------
# Buckets
# --------------------------------------------------------------------------------------------
def test_buckets_are_powers_of_two_up_to_max_num_seqs_capped_at_256():
    assert batch_buckets(256) == (1, 2, 4, 8, 16, 32, 64, 128, 256)
    assert batch_buckets(6) == (1, 2, 4, 6)
    assert batch_buckets(1) == (1,)
    assert batch_buckets(1000)[-1] == 256
    b = batch_buckets(6)
    assert [bucket_for(n, b) for n in (1, 2, 3, 4, 5, 6, 7)] == [1, 2, 4, 4, 6, 6, None]


# --------------------------------------------------------------------------------------------
# Helpers: a prefill, then a decode batch of n sequences on the worker's own cache
# --------------------------------------------------------------------------------------------
def _worker(llm):
    return llm.engine.executor.worker


def _decode_inputs(worker, prompts, first_block=1):
    """Prefill `prompts` (eager path) into distinct blocks, then the decode step of each: its
    next token is 3 + its index. Returns (the decode batch's BatchInputs, the sequences, tables)."""
    bs = worker.config.block_size
    cache = worker.cache.device_cache
    seqs, tables, nxt = [], [], first_block
    for i, p in enumerate(prompts):
        n_blocks = -(-(len(p) + 4) // bs)
        tables.append(list(range(nxt, nxt + n_blocks)))
        nxt += n_blocks
        seqs.append(Sequence(100 + i, list(p)))
    worker.runner.execute([ScheduledSeq(s, len(p), t, sample=True) for s, p, t in zip(seqs, prompts, tables)], cache)
    return _advance(worker, seqs, tables, [3 + i for i in range(len(seqs))]), seqs, tables


def _advance(worker, seqs, tables, tokens):
    for s, tok in zip(seqs, tokens):
        s.num_computed_tokens = s.num_tokens
        s.output_token_ids.append(tok)
    return prepare_inputs([ScheduledSeq(s, 1, t, sample=True) for s, t in zip(seqs, tables)], worker.config.block_size)


def _host(a):
    return a.get() if hasattr(a, "get") else np.asarray(a)


PROMPTS = [[1, 5, 9, 14, 22], [1, 7, 3], [1, 30, 31, 32, 33, 34, 35, 36, 37, 38, 39, 40, 41, 42, 43, 44, 45, 46]]


# --------------------------------------------------------------------------------------------
# CPU: the same padded, persistent-buffer step, eagerly
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["llama-gqa", "opt-preln", "gpt-neox"])
def test_cpu_padded_persistent_step_equals_the_eager_step(name):
    llm = LLM(FIXTURES / name, device="cpu", kv_cache_memory=1 << 20, max_num_seqs=8)
    w = _worker(llm)
    # no CUDA graphs on the CPU; LLaMA's decode steps take the fused stack instead (tests/test_fused_decode.py)
    assert w.graphs is None and (w.runner.graphs is None) == (name != "llama-gqa")
    inputs, _, _ = _decode_inputs(w, PROMPTS)
    assert is_pure_decode(inputs)
    cache = w.cache.device_cache
    want, _ = w.runner.run(inputs, cache)
    g = DecodeGraphs(w.model, w.backend, w.config.block_size, 8, 64)
    g.attach(cache)
    assert g.can_run(inputs, cache)
    got, prompt = g.run(inputs, cache)                           # 3 rows padded to the bucket of 4
    assert prompt == [None] * 3 and got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    # the padding row's inputs: token 0 at position 0, slot -1, a sequence of q_len 0 and context 0
    ids, pos, meta = g.buffers.inputs(4, 64)
    assert (ids[3], pos[3], meta.slot_mapping[3], meta.seq_lens[3]) == (0, 0, -1, 0)
    assert meta.query_start_loc.tolist() == [0, 1, 2, 3, 3]


def test_only_pure_decode_batches_take_the_graph_path():
    llm = LLM(FIXTURES / "llama-gqa", device="cpu", kv_cache_memory=1 << 20, max_num_seqs=4)
    w = _worker(llm)
    g = DecodeGraphs(w.model, w.backend, w.config.block_size, 4, 64)
    g.attach(w.cache.device_cache)
    prefill = prepare_inputs([ScheduledSeq(Sequence(1, [1, 2, 3]), 3, [1], sample=True)], w.config.block_size)
    assert not g.can_run(prefill, w.cache.device_cache)
    inputs, _, _ = _decode_inputs(w, PROMPTS)
    assert g.can_run(inputs, w.cache.device_cache)
    assert not g.can_run(inputs, w.cache.device_cache.copy())     # another cache: not what was captured
    five, _, _ = _decode_inputs(w, PROMPTS + PROMPTS[:2], first_block=20)
    assert not g.can_run(five, w.cache.device_cache)              # wider than the largest bucket (4)


# --------------------------------------------------------------------------------------------
# Emulated CUDA: capture, replay == eager, padding stores nothing
# --------------------------------------------------------------------------------------------
def _cuda_llm(name, dtype="float32", **kw):
    return LLM(FIXTURES / name, device="cuda", dtype=dtype, kv_cache_memory=1 << 20, swap_space=0.001,
               max_num_seqs=4, **kw)


@needs_cxx
@pytest.mark.parametrize("split_k", ["never", "always"])
@pytest.mark.parametrize("name,dtype", [("llama-gqa", "float32"), ("llama-gqa", "float16"), ("opt-preln", "float16"),
                                        ("gpt-neox", "float32")])
def test_replayed_decode_step_equals_the_eager_step(emu, monkeypatch, name, dtype, split_k):
    monkeypatch.setattr(emu, "split_k_policy", split_k)
    monkeypatch.setattr(emu, "PARTITION_SIZE", 16)
    llm = _cuda_llm(name, dtype)
    w = _worker(llm)
    g = w.runner.graphs
    assert g is not None and sorted(g.graphs) == [1, 2, 4]         # captured at start-up, one per bucket
    assert all(len(graph.ops) > 0 for graph in g.graphs.values())
    cache = w.cache.device_cache
    inputs, seqs, tables = _decode_inputs(w, PROMPTS)
    for step in range(2):                                          # the same graph follows new inputs
        before = _host(cache).copy()
        replays = g.graphs[4].launches
        cuda_emulator.LAUNCHES.launches = 0
        got, _ = w.runner.run(inputs, cache)                       # 3 rows: bucket 4, one padding row
        got = _host(got)
        assert g.graphs[4].launches == replays + 1
        # the step's device work: two uploads (int64, int32 staging) and the graph: nothing else
        assert cuda_emulator.LAUNCHES.launches == 3
        after = _host(cache).copy()
        # the padding row stored nothing: only the 3 real tokens' slots changed (every layer, K and V)
        changed = np.argwhere(np.any(np.isnan(before) != np.isnan(after), axis=(1, 3, 5)) |
                              np.any(np.nan_to_num(before) != np.nan_to_num(after), axis=(1, 3, 5)))
        slots = {(int(b), int(o)) for b, _, o in changed}
        want_slots = {(int(s) // w.config.block_size, int(s) % w.config.block_size) for s in inputs.meta.slot_mapping}
        assert slots <= want_slots
        # the same step eagerly on the same persistent buffers: bit for bit what the graph computed
        eager_on_buffers = _host(g.step(4, cache))[:3]
        np.testing.assert_array_equal(got, eager_on_buffers)
        # and the plain eager path (unpadded, fresh arrays, attention planned for the real context)
        saved, w.runner.graphs = w.runner.graphs, None
        plain = _host(w.runner.run(inputs, cache)[0])
        w.runner.graphs = saved
        tol = 1e-5 if dtype == "float32" else 2e-2
        np.testing.assert_allclose(got, plain, rtol=tol, atol=tol)
        inputs = _advance(w, seqs, tables, [int(np.argmax(r)) for r in got])


@needs_cxx
def test_each_bucket_replays_with_its_own_padding(emu):
    w = _worker(_cuda_llm("llama-gqa"))
    g = w.runner.graphs
    cache = w.cache.device_cache
    for n in (1, 2, 3, 4):
        inputs, _, _ = _decode_inputs(w, [[1, 2 + n, 9]] * n)     # blocks 1..n (the cache holds 33)
        got = _host(w.runner.run(inputs, cache)[0])
        B = bucket_for(n, g.buckets)
        assert g.graphs[B].launches >= 1
        np.testing.assert_array_equal(got, _host(g.step(B, cache))[:n])
        saved, w.runner.graphs = w.runner.graphs, None
        np.testing.assert_allclose(got, _host(w.runner.run(inputs, cache)[0]), rtol=1e-5, atol=1e-5)
        w.runner.graphs = saved


@needs_cxx
def test_enforce_eager_captures_nothing(emu):
    w = _worker(_cuda_llm("llama-gqa", enforce_eager=True))
    assert w.graphs is None and w.runner.graphs is None


@needs_cxx
def test_no_graphs_when_every_launch_synchronises(emu, monkeypatch):
    """RAWPAGED_CUDA_SYNC=1 synchronises after each launch, which a capturing stream cannot do."""
    monkeypatch.setattr(emu.launch, "SYNC", True)
    assert _worker(_cuda_llm("llama-gqa")).graphs is None


@needs_cxx
def test_the_emulated_capture_refuses_what_a_device_refuses(emu):
    """A step that read a device value on the host, or uploaded host data, could not be captured on a
    GPU: the emulator raises in both cases (so the replay tests above are meaningful)."""
    w = _worker(_cuda_llm("llama-gqa"))
    cp = emu.cupy
    stream = cp.cuda.Stream(non_blocking=True)
    x = cp.asarray(np.arange(4, dtype=np.float32))
    q, tables = cp.asarray(np.ones((1, 8, 8), np.float32)), cp.asarray(np.zeros((1, 1), np.int32))
    seq_lens, qsl = cp.asarray(np.ones(1, np.int32)), cp.asarray(np.array([0, 1], np.int32))
    with stream:
        stream.begin_capture()
        try:
            with pytest.raises(RuntimeError, match="during stream capture"):
                int(x.sum())
            with pytest.raises(RuntimeError, match="during stream capture"):
                cp.asarray(np.ones(3, np.float32))
            with pytest.raises(RuntimeError, match="during stream capture"):   # no hints: reads seq_lens back
                w.backend.paged_attention(q, w.cache.device_cache, 0, tables, seq_lens, qsl, 0.3)
            w.backend.paged_attention(q, w.cache.device_cache, 0, tables, seq_lens, qsl, 0.3,
                                      max_query_len=1, max_seq_len=8)         # with them: captured
        finally:
            graph = stream.end_capture()
    assert len(graph.ops) >= 1 and not stream.is_capturing()


@needs_cxx
def test_graph_memory_is_reserved_in_the_kv_sizing_and_logged(emu, caplog):
    """Without kv_cache_memory the profiling pass sizes the cache; it measures the largest bucket's
    step and leaves that (plus every bucket's logits) to the graphs."""
    import logging
    with caplog.at_level(logging.INFO, logger="rawpaged"):
        llm = LLM(FIXTURES / "llama-gqa", device="cuda", dtype="float32", swap_space=0.001, max_num_seqs=4,
                  gpu_memory_utilization=0.5)
    w = _worker(llm)
    assert w.graph_reserve >= w.graphs.outputs_bytes(w.model_config.vocab_size) > 0
    assert "for the CUDA graphs" in llm.engine.cache_size.why
    line = [r.getMessage() for r in caplog.records if "CUDA graphs:" in r.getMessage()]
    assert line and "1, 2, 4" in line[0] and "reserved for them" in line[0]
    # NOTE: not pool_bytes() <= graph_reserve: the emulator keeps every buffer a graph recorded (no
    # address reuse between captures), so its pool over-counts; tests/gpu/test_graphs_gpu.py checks it.
    assert w.graphs.pool_bytes() > 0


# --------------------------------------------------------------------------------------------
# End to end: transformers' greedy tokens with graphs and with --enforce-eager
# --------------------------------------------------------------------------------------------
def _fixture(name):
    ref = np.load(FIXTURES / name / "reference.npz")
    off = ref["prompt_offsets"]
    return [ref["prompt_ids_flat"][off[i]:off[i + 1]].tolist() for i in range(len(off) - 1)], ref["greedy_ids"]


@needs_cxx
@pytest.mark.parametrize("enforce_eager", [False, True])
@pytest.mark.parametrize("name", ["llama-gqa", "opt-preln", "gpt2", "gpt-neox"])
def test_fixture_greedy_equals_transformers_with_and_without_graphs(emu, name, enforce_eager):
    prompts, greedy = _fixture(name)
    llm = _cuda_llm(name, enforce_eager=enforce_eager)
    g = _worker(llm).runner.graphs
    outs = llm.generate(prompt_token_ids=prompts, sampling_params=SamplingParams(max_tokens=16, **GREEDY))
    assert [o.outputs[0].token_ids for o in outs] == greedy.tolist()
    replays = 0 if g is None else sum(graph.launches for graph in g.graphs.values())
    assert (replays > 0) != enforce_eager                          # graphs ran every decode step, or none


def test_enforce_eager_is_a_cli_flag():
    from rawpaged.cli import build_parser
    from rawpaged.engine.config import EngineConfig
    args = build_parser().parse_args(["generate", "--enforce-eager", "hi"])
    assert EngineConfig.from_cli_args(args).enforce_eager is True
    assert EngineConfig.from_cli_args(build_parser().parse_args(["generate", "hi"])).enforce_eager is False
