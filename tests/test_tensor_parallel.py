"""Tensor parallelism on the CPU backend: the `mp` executor (one process per rank, the shared-memory
collective of rawpaged/distributed/shm.py).

- tensor-parallel 2 gives transformers' greedy tokens (the fixtures' references) for the LLaMA GQA
  and OPT fixtures, also when the KV cache is so small that requests are preempted (swap and
  recompute), and for every other family;
- each rank holds about half of the weights and reads about half of the checkpoint (measured: the
  bytes of the arrays it holds, the bytes its sliced reads asked for);
- one rank (a communicator of size 1: every collective runs) equals the single-process engine;
- degrees that do not divide what must be divided are one-line errors before any process starts;
- a worker that dies is an error naming it (never a hang), and workers die with their driver;
- the shared-memory collective itself: sums in rank order (the same bits on every rank), chunked
  past its slot size, gathers, and an aborting rank releases the others.
"""
from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from model_impl.parallel import check_tensor_parallel
from rawpaged import LLM, SamplingParams
from rawpaged.config import ModelConfig
from rawpaged.distributed import CommAborted, connect, create_comm_spec
from rawpaged.distributed import shm
from rawpaged.errors import RawpagedError
from rawpaged.worker.cache_engine import block_bytes

FIXTURES = Path(__file__).parent / "fixtures"
REPO = Path(__file__).resolve().parent.parent
GREEDY = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)


def reference(name: str):
    ref = np.load(FIXTURES / name / "reference.npz")
    off = ref["prompt_offsets"]
    prompts = [ref["prompt_ids_flat"][off[i]:off[i + 1]].tolist() for i in range(len(off) - 1)]
    return prompts, ref["greedy_ids"].tolist()


def greedy_ids(llm, prompts, params=GREEDY):
    return [o.outputs[0].token_ids for o in llm.generate(None, params, prompt_token_ids=prompts)]


def within(seconds: float, fn):
    """fn() on a thread; fails (instead of hanging the suite) if it has not returned in `seconds`."""
    box = {}

    def run():
        try:
            box["value"] = fn()
        except BaseException as e:       # noqa: BLE001 - re-raised below
            box["error"] = e
    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(seconds)
    assert not t.is_alive(), f"still running after {seconds} s: a hang"
    if "error" in box:
        raise box["error"]
    return box["value"]


@pytest.fixture(scope="module", params=["llama-gqa", "opt-preln"])
def tp2(request):
    name = request.param
    llm = LLM(FIXTURES / name, device="cpu", kv_cache_memory=4 << 20, block_size=8, tensor_parallel_size=2)
    yield name, llm
    llm.engine.shutdown()


def test_tp2_greedy_equals_transformers(tp2):
    name, llm = tp2
    prompts, want = reference(name)
    assert greedy_ids(llm, prompts) == want
    assert type(llm.engine.executor).__name__ == "MultiprocExecutor"


def test_tp2_holds_and_reads_half_of_the_weights(tp2):
    name, llm = tp2
    single = LLM(FIXTURES / name, device="cpu", kv_cache_memory=4 << 20, block_size=8)
    whole_held, whole_read = single.engine.executor.worker.weight_bytes, single.engine.executor.worker.bytes_read
    ex = llm.engine.executor
    print(f"{name}: one process holds {whole_held} bytes (read {whole_read}); ranks hold {ex.weight_bytes} "
          f"(read {ex.bytes_read})")
    for held, read in zip(ex.weight_bytes, ex.bytes_read):
        # NOTE: norms, biases and positions are replicated: a little over half (2-6% on these tiny models)
        assert 0.5 * whole_held <= held <= 0.56 * whole_held
        assert 0.5 * whole_read <= read <= 0.56 * whole_read
    # the KV cache: each rank holds half of the KV heads, so a block is half the bytes
    assert llm.engine.cache_size.num_device_blocks == 2 * single.engine.cache_size.num_device_blocks


@pytest.mark.parametrize("name,mode", [("llama-gqa", "swap"), ("opt-preln", "recompute")])
def test_tp2_under_preemption_gives_the_same_tokens(name, mode):
    prompts, want = reference(name)
    cfg = ModelConfig.from_dir(FIXTURES / name)
    per_rank_block = block_bytes(cfg, 8, np.float32) // 2
    # 8 blocks of 8 tokens for 4 sequences reaching 19..33 tokens (15 blocks): preemptions
    llm = LLM(FIXTURES / name, device="cpu", block_size=8, tensor_parallel_size=2, kv_cache_memory=8 * per_rank_block,
              swap_space=64 * per_rank_block / (1 << 30), preemption_mode=mode)
    try:
        assert within(120, lambda: greedy_ids(llm, prompts)) == want
        stats = llm.get_stats()
        assert stats[f"num_preemptions_{mode}"] > 0, stats
    finally:
        llm.engine.shutdown()


@pytest.mark.parametrize("name", ["llama-mqa-tied", "opt-postln-proj", "gpt2", "gpt-neox", "qwen3", "phi3", "gemma",
                                  "mistral-swa"])
def test_every_family_splits(name):
    """Tied heads, MQA (one KV head replicated on both ranks), project_in/out, Conv1D, the NeoX
    interleave, q/k norms, fused qkv_proj/gate_up_proj, GeGLU, windows."""
    prompts, want = reference(name)
    llm = LLM(FIXTURES / name, device="cpu", kv_cache_memory=4 << 20, tensor_parallel_size=2)
    try:
        assert greedy_ids(llm, prompts) == want
    finally:
        llm.engine.shutdown()


def test_one_rank_runs_every_collective_and_equals_one_process():
    """mp with one worker: the vocab-parallel lookup, the all-reduces and the gather of a
    communicator of size 1 all run, and change nothing (also prompt logprobs)."""
    prompts, want = reference("llama-gqa")
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, logprobs=3, prompt_logprobs=2)
    one = LLM(FIXTURES / "llama-gqa", device="cpu", kv_cache_memory=4 << 20, distributed_executor_backend="mp")
    single = LLM(FIXTURES / "llama-gqa", device="cpu", kv_cache_memory=4 << 20)
    try:
        assert one.engine.executor.size == 1 and type(one.engine.executor).__name__ == "MultiprocExecutor"
        got, exp = one.generate(None, params, prompt_token_ids=prompts), single.generate(None, params,
                                                                                         prompt_token_ids=prompts)
        for g, e, w in zip(got, exp, want):
            assert g.outputs[0].token_ids == e.outputs[0].token_ids == w[:8]
            for a, b in zip(g.outputs[0].logprobs, e.outputs[0].logprobs):
                assert a.keys() == b.keys() and all(abs(a[k] - b[k]) < 1e-5 for k in a)
            assert len(g.prompt_logprobs) == len(e.prompt_logprobs)
    finally:
        one.engine.shutdown()


# -- refusals --------------------------------------------------------------------------------------
def test_degrees_that_do_not_divide_are_one_line_errors():
    cfg = ModelConfig.from_dir(FIXTURES / "llama-gqa")          # 8 heads, 2 KV heads, intermediate 80
    check_tensor_parallel(cfg, 4)                               # KV heads replicated: fine
    with pytest.raises(RawpagedError, match=r"tensor_parallel_size=3 does not divide num_attention_heads=8") as e:
        check_tensor_parallel(cfg, 3)
    assert "\n" not in str(e.value)
    odd_kv = dataclasses.replace(cfg, num_heads=12, num_kv_heads=3)
    with pytest.raises(RawpagedError, match=r"tensor_parallel_size=2 and num_key_value_heads=3"):
        check_tensor_parallel(odd_kv, 2)
    odd_mlp = dataclasses.replace(cfg, hf={**cfg.hf, "intermediate_size": 90})
    with pytest.raises(RawpagedError, match=r"tensor_parallel_size=4 does not divide intermediate_size=90"):
        check_tensor_parallel(odd_mlp, 4)
    opt = ModelConfig.from_dir(FIXTURES / "opt-preln")          # ffn_dim 80
    with pytest.raises(RawpagedError, match=r"does not divide num_attention_heads=4"):
        check_tensor_parallel(opt, 8)
    with pytest.raises(RawpagedError, match="tensor_parallel_size must be a positive integer"):
        LLM(FIXTURES / "llama-gqa", device="cpu", tensor_parallel_size=0)
    with pytest.raises(RawpagedError, match="distributed_executor_backend must be mp or ray"):
        LLM(FIXTURES / "llama-gqa", device="cpu", distributed_executor_backend="mpi")


def test_the_engine_refuses_before_starting_any_process(monkeypatch):
    import multiprocessing.context
    started = []
    monkeypatch.setattr(multiprocessing.context.SpawnProcess, "start", lambda self: started.append(self))
    with pytest.raises(RawpagedError, match="tensor_parallel_size=3 does not divide"):
        LLM(FIXTURES / "llama-gqa", device="cpu", tensor_parallel_size=3)
    assert started == []


def test_cli_flags(tmp_path):
    from rawpaged.cli import build_parser
    from rawpaged.engine.config import EngineConfig
    args = build_parser().parse_args(["generate", "-tp", "2", "--distributed-executor-backend", "ray", "hi"])
    cfg = EngineConfig.from_cli_args(args)
    assert (cfg.tensor_parallel_size, cfg.distributed_executor_backend) == (2, "ray")
    r = subprocess.run([sys.executable, "-m", "rawpaged.cli", "generate", "--device", "cpu", "--tensor-parallel-size",
                        "2", "--max-tokens", "8", "--json", "Once upon a time"], capture_output=True, text=True,
                       timeout=300, cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert r.returncode == 0, r.stderr[-2000:]
    one = subprocess.run([sys.executable, "-m", "rawpaged.cli", "generate", "--device", "cpu", "--max-tokens", "8",
                          "--json", "Once upon a time"], capture_output=True, text=True, timeout=300, cwd=tmp_path,
                         env={**os.environ, "PYTHONPATH": str(REPO)})
    assert one.returncode == 0 and r.stdout == one.stdout and '"token_ids"' in r.stdout


# -- failures --------------------------------------------------------------------------------------
def test_a_dead_worker_is_an_error_naming_it_not_a_hang():
    prompts, _ = reference("llama-gqa")
    llm = LLM(FIXTURES / "llama-gqa", device="cpu", kv_cache_memory=4 << 20, tensor_parallel_size=2)
    pids = llm.engine.executor.pids()
    os.kill(pids[1], signal.SIGKILL)
    with pytest.raises(RawpagedError, match=r"worker rank 1 \(pid \d+\) died unexpectedly .*SIGKILL"):
        within(120, lambda: greedy_ids(llm, prompts))
    with pytest.raises(RawpagedError, match="workers were stopped after a failure: .*rank 1"):
        greedy_ids(llm, prompts)
    for pid in pids:                                            # rank 0 was stopped too
        assert not _alive(pid)


def test_workers_die_with_their_driver(tmp_path):
    script = tmp_path / "driver.py"
    script.write_text(textwrap.dedent(f"""
        import sys, time
        from rawpaged import LLM
        llm = LLM({str(FIXTURES / "llama-gqa")!r}, device="cpu", kv_cache_memory=4 << 20, tensor_parallel_size=2)
        print(*llm.engine.executor.pids(), flush=True)
        time.sleep(600)
    """))
    driver = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        pids = [int(p) for p in driver.stdout.readline().split()]
        assert len(pids) == 2 and all(_alive(p) for p in pids)
    finally:
        driver.kill()
        driver.wait()
    deadline = time.monotonic() + 60
    while any(_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not any(_alive(p) for p in pids), "a worker outlived its driver"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:                                                        # a zombie (not yet reaped) counts as gone
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[-1][0] != "Z"
    except OSError:
        return False


# -- the shared-memory collective ------------------------------------------------------------------
def _run_ranks(size: int, fn):
    """fn(comm) on `size` threads, one per rank; returns their results in rank order."""
    spec = create_comm_spec("shm", size)
    results, errors = [None] * size, []

    def rank_main(rank):
        try:
            comm = connect(spec, rank)
            results[rank] = fn(comm)
        except BaseException as e:       # noqa: BLE001
            errors.append(e)
    threads = [threading.Thread(target=rank_main, args=(r,), daemon=True) for r in range(size)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not any(t.is_alive() for t in threads), "a rank hung"
    assert not os.path.exists(spec.address), "the shared-memory file outlived the setup"
    return results, errors


def test_shm_all_reduce_and_gather_across_chunks():
    rng = np.random.default_rng(0)
    n = shm.SLOT // 4 * 2 + 123                                 # three rounds of one slot each
    data = [rng.standard_normal((n,)).astype(np.float32) for _ in range(3)]

    def work(comm):
        x = data[comm.rank].reshape(-1, 1)
        return comm.all_reduce(x), comm.gather(x[:1000]), comm.all_reduce(x[:7])

    results, errors = _run_ranks(3, work)
    assert not errors, errors
    want = (data[0] + data[1]) + data[2]                        # the order every rank sums in
    for rank, (summed, gathered, small) in enumerate(results):
        assert summed.shape == (n, 1) and np.array_equal(summed[:, 0], want)     # the same bits everywhere
        assert np.array_equal(small[:, 0], want[:7])
        if rank == 0:
            assert gathered.shape == (3, 1000, 1)
            assert all(np.array_equal(gathered[r, :, 0], data[r][:1000]) for r in range(3))
        else:
            assert gathered is None


def test_shm_a_failing_rank_releases_the_others():
    def work(comm):
        if comm.rank == 1:
            comm.abort()                                        # rank 1 failed before its all-reduce
            return "aborted"
        return comm.all_reduce(np.ones(4, np.float32))

    results, errors = _run_ranks(2, work)
    assert results[1] == "aborted"
    assert len(errors) == 1 and isinstance(errors[0], CommAborted)
    assert "another rank failed" in str(errors[0])
