"""The paper's baselines inside the engine: the config path, static batching at the scheduler, and
end to end on the CPU (the same greedy tokens under the paged manager, each Orca manager and static
batching; parallel samples and beams under Orca; every slot free afterwards; the slot accounting)."""
from __future__ import annotations

import argparse

import pytest

from rawpaged import LLM, SamplingParams
from rawpaged.core.block_manager import BlockSpaceManager
from rawpaged.core.contiguous import Run
from rawpaged.core.kv_managers import make_kv_manager
from rawpaged.core.orca import OrcaManager
from rawpaged.core.scheduler import Scheduler
from rawpaged.engine import EngineConfig
from rawpaged.errors import RawpagedError
from rawpaged.hub import DEMO_MODEL
from rawpaged.sequence import Sequence, SequenceGroup, SequenceStatus, next_seq_id

ORCA = ["orca-max", "orca-pow2", "orca-oracle"]
BLOCK_BYTES = 5 * 2 * 4 * 16 * 8 * 4        # stories260K: layers x K/V x KV heads x 16 slots x head_dim x fp32


# -- one config path --------------------------------------------------------------------------
def test_config_options_and_their_flags():
    parser = argparse.ArgumentParser()
    EngineConfig.add_cli_args(parser)
    cfg = EngineConfig.from_cli_args(parser.parse_args(["--kv-manager", "orca-pow2", "--batching", "static",
                                                        "--orca-granularity", "32", "--orca-allocator", "first-fit"]))
    assert (cfg.kv_manager, cfg.batching, cfg.orca_granularity) == ("orca-pow2", "static", 32)
    assert cfg.orca_allocator == "first-fit" and EngineConfig().orca_allocator is None
    assert cfg.enable_prefix_caching is False                    # no sharing under Orca: off by default
    assert EngineConfig().enable_prefix_caching is True and EngineConfig().kv_manager == "paged"
    with pytest.raises(SystemExit):
        parser.parse_args(["--kv-manager", "orca"])


@pytest.mark.parametrize("kwargs, match", [
    ({"kv_manager": "orca-max", "enable_prefix_caching": True}, "prefix caching needs the paged manager"),
    ({"kv_manager": "orca-oracle", "preemption_mode": "swap"}, "never preempts and cannot swap"),
    ({"orca_granularity": 1}, "orca-\\* KV managers only"),
    ({"kv_manager": "orca-max", "orca_granularity": 0}, "at least 1 token"),
    ({"kv_manager": "buddy"}, "kv_manager must be one of paged, orca-max"),
    ({"orca_allocator": "buddy"}, "orca_allocator applies to the orca-\\* KV managers only"),
    ({"kv_manager": "orca-max", "orca_allocator": "slab"}, "orca_allocator must be one of buddy, first-fit"),
    ({"batching": "dynamic"}, "batching must be continuous or static"),
])
def test_combinations_that_make_no_sense_are_one_line_errors(kwargs, match):
    with pytest.raises(RawpagedError, match=match) as e:
        EngineConfig(**kwargs)
    assert "\n" not in str(e.value)


def test_the_factory_builds_each_manager():
    paged = make_kv_manager(EngineConfig(), 64, 8, 512)
    assert isinstance(paged, BlockSpaceManager) and paged.enable_prefix_caching and paged.num_cpu_blocks == 8
    for name, policy in zip(ORCA, ("max", "pow2", "oracle")):
        bm = make_kv_manager(EngineConfig(kv_manager=name), 64, 8, 512)
        assert isinstance(bm, OrcaManager) and bm.policy == policy and bm.allocator == "buddy"   # the paper's
        assert (bm.block_size, bm.num_device_blocks, bm.num_cpu_blocks) == (16, 64, 0)
    ff = make_kv_manager(EngineConfig(kv_manager="orca-oracle", orca_allocator="first-fit"), 64, 8, 512)
    assert ff.allocator == "first-fit" and ff.alloc.free_runs() == [Run(0, 64)]
    coarse = make_kv_manager(EngineConfig(kv_manager="orca-max", orca_granularity=48), 64, 0, 512)
    assert (coarse.block_size, coarse.num_device_blocks) == (16, 63)              # 21 units of 3 blocks
    with pytest.raises(RawpagedError, match="not a multiple of block_size=16"):
        make_kv_manager(EngineConfig(kv_manager="orca-oracle", orca_granularity=1), 64, 0, 512)
    tokens = make_kv_manager(EngineConfig(kv_manager="orca-oracle", orca_granularity=1), 64, 0, 512,
                             reads_block_tables=False)                            # the simulator's case
    assert (tokens.granularity, tokens.block_size, tokens.num_device_blocks) == (1, 1, 1024)


def test_the_engine_refuses_token_granularity_for_its_kernels():
    with pytest.raises(RawpagedError, match="orca_granularity=1 is not a multiple"):
        LLM(DEMO_MODEL, device="cpu", kv_cache_memory=64 * BLOCK_BYTES, kv_manager="orca-max", orca_granularity=1)


# -- static batching at the scheduler -----------------------------------------------------------
def drive(scheduler: Scheduler, groups: list[SequenceGroup], max_steps=200) -> dict[str, tuple[int, int]]:
    """Run the scheduler as the engine does (no model: every sampled token is 7); returns each
    request's (first step it computed in, step it finished in)."""
    for g in groups:
        scheduler.add_group(g)
    life: dict[str, list[int]] = {}
    for step in range(max_steps):
        if not scheduler.has_unfinished():
            return {k: tuple(v) for k, v in life.items()}
        out = scheduler.schedule()
        scheduler.on_step_done(out)
        for sg in out.scheduled:
            life.setdefault(sg.group.request_id, [step, None])
        for s in out.batch:
            if s.sample:
                s.seq.append_token(7, 0.0)
                if s.seq.num_output_tokens == s.group.sampling_params.max_tokens:
                    s.seq.status = SequenceStatus.FINISHED_LENGTH
                    scheduler.free_seq(s.seq)
                    life[s.group.request_id][1] = step
        scheduler.free_finished()
    raise AssertionError("the scheduler did not finish")


def make_groups(specs) -> list[SequenceGroup]:
    return [SequenceGroup(f"r{i}", [Sequence(next_seq_id(), list(range(3, 3 + p)))],
                          SamplingParams(max_tokens=m, ignore_eos=True), float(i)) for i, (p, m) in enumerate(specs)]


def scheduler_for(batching, kv_manager="paged", blocks=4, **cfg):
    """A scheduler over a pool of `blocks` blocks of 16 slots (max_model_len 64)."""
    cfg.setdefault("max_num_batched_tokens", 64)
    config = EngineConfig(batching=batching, kv_manager=kv_manager, max_model_len=64, **cfg)
    return Scheduler(config, make_kv_manager(config, blocks, 0, 64))


@pytest.mark.parametrize("kv_manager", ["paged", "orca-oracle"])
def test_static_batching_admits_nothing_until_the_batch_drains(kv_manager):
    specs = [(5, 2), (6, 8), (4, 2), (7, 3), (5, 1)]
    static = drive(scheduler_for("static", kv_manager, max_num_seqs=2), make_groups(specs))
    # Batches of two: r0 + r1, then r2 + r3 only after r1 (8 tokens) finished, then r4.
    assert static["r2"][0] == static["r3"][0] > static["r1"][1] > static["r0"][1]
    assert static["r4"][0] > max(static["r2"][1], static["r3"][1])
    for a, (start_a, end_a) in static.items():            # no request starts while an older one runs
        for b, (start_b, _) in static.items():
            assert start_b <= start_a or start_b > end_a, (a, b)
    # Continuous batching lets r2 in as soon as r0 leaves.
    continuous = drive(scheduler_for("continuous", kv_manager, max_num_seqs=2), make_groups(specs))
    assert continuous["r2"][0] == continuous["r0"][1] + 1 < continuous["r1"][1]


def test_a_static_batch_is_not_cut_to_one_step_token_budget():
    """The batch takes what memory and max_num_seqs allow; its prompts prefill over several steps."""
    sched = scheduler_for("static", "orca-max", max_num_seqs=8, max_num_batched_tokens=8)
    for g in make_groups([(6, 2), (6, 2), (6, 2), (6, 2), (6, 2)]):
        sched.add_group(g)
    out = sched.schedule()
    # 64 slots hold one orca-max range of 64 tokens: a batch of one, whatever the token budget.
    assert len(sched.running) == 1 and len(sched.waiting) == 4
    kv = out.kv_slots                                     # the pool as this step runs
    assert (kv.real_tokens, kv.reserved_unused, kv.internal_fragmentation, kv.free) == (6, 2, 56, 0)
    sched = scheduler_for("static", "paged", max_num_seqs=3, max_num_batched_tokens=8)
    for g in make_groups([(6, 2), (6, 2), (6, 2), (6, 2)]):
        sched.add_group(g)
    out = sched.schedule()
    assert len(sched.running) == 3 and out.num_batched_tokens == 8          # 6 + a chunk of 2
    assert [sg.group.request_id for sg in out.scheduled] == ["r0", "r1"]
    assert (out.kv_slots.real_tokens, out.kv_slots.internal_fragmentation) == (18, 3 * 10)


# -- end to end on the CPU ----------------------------------------------------------------------
PROMPTS = ["Once upon a time", "The cat", "Lily and Tom went to the park to play with a ball",
           "One day, a little bird", "Mom said", "The sun was hot and the dog wanted to swim in the lake"]
MAX_TOKENS = [30, 12, 25, 40, 8, 20]


def make_llm(kv_manager="paged", batching="continuous", blocks=64, **kw):
    return LLM(DEMO_MODEL, device="cpu", kv_cache_memory=blocks * BLOCK_BYTES, max_model_len=256,
               kv_manager=kv_manager, batching=batching, **kw)


def assert_every_slot_free(llm):
    bm = llm.engine.block_manager
    acct = bm.slot_accounting()
    assert acct.total == bm.num_device_blocks * bm.block_size and bm.usage() == 0.0
    assert acct.free + acct.external_fragmentation == acct.total and acct.allocated == 0
    if isinstance(bm, OrcaManager):
        assert not bm.seqs and not bm.reservations
        # NOTE: a buddy pool whose size is no power of two is its top blocks (96 blocks: 64 + 32); no one
        # range spans two, so the smaller ones count as external fragmentation even when all is free.
        assert bm.alloc.free_runs() == bm.alloc.top_blocks()
        assert acct.free == bm.alloc.top_blocks()[0].length * bm.granularity
    else:
        assert acct.free == acct.total and bm.get_num_free_device_blocks() == bm.num_device_blocks


@pytest.fixture(scope="module")
def paged_greedy():
    llm = make_llm()
    outs = llm.generate(PROMPTS, [SamplingParams(temperature=0, max_tokens=m, ignore_eos=True) for m in MAX_TOKENS])
    return [o.outputs[0].token_ids for o in outs]


@pytest.mark.parametrize("kv_manager, batching", [(m, b) for m in ["paged"] + ORCA for b in ("continuous", "static")
                                                  if (m, b) != ("paged", "continuous")])
def test_same_greedy_tokens_under_every_manager_and_batching(paged_greedy, kv_manager, batching):
    # 64 blocks = 1024 slots: orca-max (256 per sequence) runs 4 requests at a time; static batches
    # hold at most 4 requests, so the last two wait for the first batch's longest (40 tokens).
    llm = make_llm(kv_manager, batching, max_num_seqs=4)
    outs = llm.generate(PROMPTS, [SamplingParams(temperature=0, max_tokens=m, ignore_eos=True) for m in MAX_TOKENS])
    assert [o.outputs[0].token_ids for o in outs] == paged_greedy
    assert [len(t) for t in paged_greedy] == MAX_TOKENS
    stats = llm.get_stats()
    if batching == "static":
        assert stats["num_steps"] == max(MAX_TOKENS[:4]) + max(MAX_TOKENS[4:])
    assert stats["num_preemptions_recompute"] == stats["num_preemptions_swap"] == 0
    assert_every_slot_free(llm)


def test_orca_max_queues_what_paged_runs_at_once():
    params = [SamplingParams(temperature=0, max_tokens=m, ignore_eos=True) for m in MAX_TOKENS]
    runs = {}
    for name in ("paged", "orca-max", "orca-oracle"):
        llm = make_llm(name, blocks=32)          # 512 slots: orca-max runs 2 requests at a time
        llm.generate(PROMPTS, params)
        runs[name] = llm.get_stats()
    # Every request runs as many steps under each manager; queueing shows as more steps in all.
    assert runs["paged"]["num_steps"] == runs["orca-oracle"]["num_steps"] == max(MAX_TOKENS)
    assert runs["orca-max"]["num_steps"] > max(MAX_TOKENS)
    # Fig. 2's split: only Orca reserves; the paged manager wastes only last-block slots.
    p, m, o = runs["paged"], runs["orca-max"], runs["orca-oracle"]
    assert p["mean_kv_reserved_fraction"] == p["mean_kv_external_fraction"] == 0.0
    assert m["mean_kv_reserved_fraction"] > 0 and o["mean_kv_reserved_fraction"] > 0
    assert p["mean_kv_token_fraction"] > o["mean_kv_token_fraction"] > m["mean_kv_token_fraction"]
    assert m["mean_kv_internal_fraction"] > o["mean_kv_internal_fraction"]
    for s in runs.values():
        parts = [s[f"mean_kv_{k}_fraction"] for k in ("token", "reserved", "internal", "external")]
        assert sum(parts) == pytest.approx(1.0) and all(x >= 0 for x in parts)
        assert s["kv_free_slots"] == s["kv_total_slots"] == 512


@pytest.mark.parametrize("kv_manager", ORCA)
def test_parallel_samples_and_beams_under_orca(kv_manager):
    """Forks copy their parent's KV into their own range: the same seeded samples and the same beams
    as the paged manager, which shares blocks."""
    params = [SamplingParams(n=3, temperature=0.8, seed=11, max_tokens=16, ignore_eos=True),
              SamplingParams(n=2, best_of=3, use_beam_search=True, temperature=0, max_tokens=12),
              SamplingParams(n=2, temperature=1.0, seed=5, max_tokens=20)]      # samples may stop early
    prompts = PROMPTS[:3]

    def run(name):
        llm = make_llm(name, blocks=96)
        outs = llm.generate(prompts, params)
        assert_every_slot_free(llm)
        return [[o.token_ids for o in r.outputs] for r in outs]

    want = run("paged")
    assert len({tuple(t) for t in want[0]}) > 1                 # the samples differ: forks really happened
    assert run(kv_manager) == want


def test_orca_accounting_mid_run_adds_up():
    """Stepping the engine: every step's accounting covers the pool exactly, ranges are reserved."""
    llm = make_llm("orca-pow2", blocks=32)
    eng = llm.engine
    for i, (p, m) in enumerate(zip(PROMPTS, MAX_TOKENS)):
        eng.add_request(f"q{i}", p, SamplingParams(temperature=0, max_tokens=m, ignore_eos=True))
    seen_external = False
    while eng.has_unfinished_requests():
        eng.step()
        s = eng.get_stats()
        parts = [s[f"kv_{k}_slots"] for k in ("token", "reserved", "internal", "external", "free")]
        assert sum(parts) == s["kv_total_slots"] == 512
        running = [seq for g in eng.scheduler.running for seq in g.get_unfinished_seqs()]
        assert s["kv_token_slots"] == sum(seq.num_tokens for seq in running)
        seen_external |= s["kv_external_slots"] > 0
    assert seen_external                         # ranges freed at different times leave gaps
    assert 0 < s["mean_kv_token_fraction"] < 1 and s["mean_kv_reserved_fraction"] > 0
    assert_every_slot_free(llm)
