"""The engine's seams: one config path to the CLI, admission that never hangs, a step in phases."""
from __future__ import annotations

import argparse
import dataclasses
import inspect
import threading

import numpy as np
import pytest

from rawpaged import LLM, SamplingParams
from rawpaged.cli import build_parser
from rawpaged.engine import EngineConfig, LLMEngine
from rawpaged.engine.config import parse_size
from rawpaged.errors import RawpagedError
from rawpaged.worker.cache_engine import block_bytes


def _within(seconds, fn):
    """Run fn on a thread; fail (instead of hanging the suite) if it does not return in time."""
    box = {}

    def run():
        try:
            box["value"] = fn()
        except BaseException as e:      # noqa: BLE001 - handed back to the test
            box["error"] = e

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(seconds)
    assert not t.is_alive(), f"did not return within {seconds} s (hang)"
    if "error" in box:
        raise box["error"]
    return box["value"]


def _kv(path, blocks):
    from rawpaged.config import ModelConfig
    return blocks * block_bytes(ModelConfig.from_dir(path), 16, np.float32)


# -- one config path --------------------------------------------------------------------------
def test_every_engine_option_is_a_flag_and_round_trips():
    parser = argparse.ArgumentParser()
    EngineConfig.add_cli_args(parser)
    args = parser.parse_args(["--model", "m", "--block-size", "32", "--kv-cache-memory", "3MiB",
                              "--no-enable-prefix-caching", "--preemption-mode", "swap", "--max-num-seqs", "7"])
    cfg = EngineConfig.from_cli_args(args)
    assert (cfg.model, cfg.block_size, cfg.kv_cache_memory) == ("m", 32, 3 << 20)
    assert cfg.enable_prefix_caching is False and cfg.enable_chunked_prefill is True
    assert (cfg.preemption_mode, cfg.max_num_seqs) == ("swap", 7)
    defaults = EngineConfig.from_cli_args(parser.parse_args([]))
    assert defaults == EngineConfig()
    flags = {a.dest for a in parser._actions}
    assert {f.name for f in dataclasses.fields(EngineConfig)} <= flags


def test_a_new_field_becomes_a_flag_with_no_other_change():
    @dataclasses.dataclass
    class Grown(EngineConfig):
        enforce_eager: bool = dataclasses.field(default=False, metadata={"help": "no graphs"})

    parser = argparse.ArgumentParser()
    Grown.add_cli_args(parser)
    assert Grown.from_cli_args(parser.parse_args(["--enforce-eager"])).enforce_eager is True


@pytest.mark.parametrize("text, want", [("4GB", 4 * 10**9), ("4GiB", 4 << 30), ("512m", 512 * 10**6),
                                        ("1.5KiB", 1536), ("1048576", 1 << 20), (" 2 g ", 2 * 10**9)])
def test_parse_size(text, want):
    assert parse_size(text) == want


def test_bad_size_and_unknown_option_are_one_line_errors(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["generate", "--kv-cache-memory", "lots"])
    assert "not a size: 'lots'" in capsys.readouterr().err
    with pytest.raises(RawpagedError, match="unknown engine option 'blocksize'"):
        EngineConfig.from_kwargs(model="m", blocksize=16)


def test_version_and_serve_positional_model(capsys):
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.startswith("rawpaged ")
    args = build_parser().parse_args(["serve", "some/model", "--port", "0"])
    assert args.model_tag == "some/model"


def test_cli_and_server_do_not_import_each_other():
    import rawpaged.cli as cli
    import rawpaged.server.app as app
    assert "rawpaged.server" not in inspect.getsource(cli).split("def cmd_serve")[0]
    assert "rawpaged.cli" not in inspect.getsource(app)


# -- admission: every request is schedulable or refused ----------------------------------------
def test_request_wider_than_max_num_seqs_is_refused_not_hung(stories260k_dir):
    llm = LLM(stories260k_dir, device="cpu", kv_cache_memory=_kv(stories260k_dir, 256), max_num_seqs=16)
    with pytest.raises(RawpagedError, match=r"n=32 is more than max_num_seqs=16"):
        _within(60, lambda: llm.generate("hi", SamplingParams(n=32, max_tokens=2)))
    with pytest.raises(RawpagedError, match=r"beam width=20 is more than max_num_seqs=16"):
        _within(60, lambda: llm.generate("hi", SamplingParams(n=2, best_of=20, use_beam_search=True,
                                                              temperature=0, max_tokens=2)))
    assert not llm.engine.has_unfinished_requests()
    out = _within(60, lambda: llm.generate("hi", SamplingParams(n=16, max_tokens=2)))
    assert len(out[0].outputs) == 16


def test_request_that_cannot_grow_in_the_cache_is_refused(stories260k_dir):
    llm = LLM(stories260k_dir, device="cpu", kv_cache_memory=_kv(stories260k_dir, 24), max_model_len=256)
    # 100 sequences can never each own a block in a 24-block cache: refused at once, nothing queued.
    with pytest.raises(RawpagedError, match=r"100 sequences of up to .* need up to \d+ KV blocks"):
        _within(60, lambda: llm.generate("x", SamplingParams(n=100, max_tokens=8)))
    # n=4 up to the model length (256 tokens = 16 blocks each) cannot all grow in 24 blocks either.
    with pytest.raises(RawpagedError, match="lower n/best_of or max_tokens"):
        llm.generate("x", SamplingParams(n=4, max_tokens=None))
    out = _within(120, lambda: llm.generate("x", SamplingParams(n=4, max_tokens=16, temperature=1.0, seed=3)))
    assert [len(o.token_ids) > 0 for o in out[0].outputs] == [True] * 4


def test_a_bad_request_in_a_batch_queues_none(stories260k_dir):
    llm = LLM(stories260k_dir, device="cpu", kv_cache_memory=_kv(stories260k_dir, 64), max_num_seqs=4)
    with pytest.raises(RawpagedError):
        llm.generate(["a", "b"], [SamplingParams(max_tokens=2), SamplingParams(n=8, max_tokens=2)])
    assert not llm.engine.has_unfinished_requests() and not llm.engine.groups
    assert llm.get_stats()["num_requests"] == 0


# -- the step ---------------------------------------------------------------------------------
def test_step_reads_as_its_phases():
    body = inspect.getsource(LLMEngine.step).strip().splitlines()[1:]
    assert len(body) <= 10
    src = "\n".join(body)
    for phase in ("scheduler.schedule()", "executor.execute_model(", "scheduler.on_step_done(",
                  "output_processor.process("):
        assert phase in src
    engine_src = inspect.getsource(LLMEngine)
    assert "_group_of" not in engine_src and "_generators" not in engine_src


def test_outputs_free_through_the_scheduler(stories260k_dir):
    """Parallel samples and beams finish with every block back in the pool and no group left."""
    llm = LLM(stories260k_dir, device="cpu", kv_cache_memory=_kv(stories260k_dir, 128),
              enable_prefix_caching=False)
    llm.generate(["Once upon", "The cat"], [SamplingParams(n=3, temperature=1.0, seed=1, max_tokens=10),
                                            SamplingParams(n=2, best_of=3, use_beam_search=True,
                                                           temperature=0, max_tokens=10)])
    bm = llm.engine.block_manager
    assert not llm.engine.groups
    assert bm.get_num_free_device_blocks() == bm.num_device_blocks


def test_recomputed_group_larger_than_the_token_budget_resumes_in_chunks(stories260k_dir):
    """A preempted n=3 group recomputes prompt + outputs of every sample: more tokens than one step
    takes. It resumes in chunks (no sample reaches its last token before all do) instead of waiting
    forever, and samples exactly what an unconstrained run samples."""
    params = SamplingParams(n=3, temperature=0.8, seed=7, max_tokens=40, ignore_eos=True)
    prompts = ["Once upon a time there was a little girl who lived in a small house near the big forest",
               "The cat sat on the mat and looked at the bird in the tree and the bird sang a song",
               "Tom and his dog went to the park to play with a red ball on a sunny day",
               "Lily wanted to bake a cake for her mom so she went to the kitchen"]
    free = LLM(stories260k_dir, device="cpu", kv_cache_memory=_kv(stories260k_dir, 512))
    want = [[o.token_ids for o in r.outputs] for r in free.generate(prompts, params)]
    tight = LLM(stories260k_dir, device="cpu", kv_cache_memory=_kv(stories260k_dir, 24),
                preemption_mode="recompute", max_num_batched_tokens=48, enable_prefix_caching=False)
    got = _within(300, lambda: tight.generate(prompts, params))
    assert tight.get_stats()["num_preemptions_recompute"] > 0
    assert [[o.token_ids for o in r.outputs] for r in got] == want
    bm = tight.engine.block_manager
    assert bm.get_num_free_device_blocks() == bm.num_device_blocks


def test_a_request_that_cannot_start_ends_with_an_error_not_empty_steps(stories260k_dir, monkeypatch):
    """Safety net: if the block manager never says OK while nothing runs, the head request is refused
    instead of the engine spinning on empty steps."""
    from rawpaged.core.block_manager import AllocStatus
    llm = LLM(stories260k_dir, device="cpu", kv_cache_memory=_kv(stories260k_dir, 64))
    monkeypatch.setattr(llm.engine.block_manager, "can_allocate", lambda group: AllocStatus.LATER)
    out = _within(60, lambda: llm.generate(["a", "b"], SamplingParams(max_tokens=2)))
    assert [o.error for o in out] == ["the scheduler could not place this request in the KV cache"] * 2
    assert llm.get_stats()["num_steps"] == 2
