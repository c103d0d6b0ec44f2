"""Multi-step scheduling (EngineConfig.num_scheduler_steps): while every running request is plain
greedy, one call of the CPU's fused decode step runs several decode steps, each row feeding back its
own argmax (backend/cpu/decode_step.py's greedy phase), and the engine pays its per-step work once.

Checked against single steps of the same engine (num_scheduler_steps=1, itself checked against the
per-op path and Hugging Face elsewhere): the same tokens, logprobs, texts and finish reasons, with
stops inside a burst (stop token, stop string, max_tokens), requests arriving while others run, a
request that is not plain greedy in the batch (single steps then), prefix caching, a tight KV pool;
every block back in the pool at the end; and the kernel's multi-step call against its own single
steps with its scratch poisoned."""
import numpy as np
import pytest

from rawpaged import LLM, SamplingParams
from rawpaged.backend import cpu
from rawpaged.backend.cpu import decode_step, lowp
from rawpaged.errors import RawpagedError
from rawpaged.sequence import Sequence
from rawpaged.worker.model_runner import prepare_inputs

from test_fused_decode import BLOCK, Paths, load, model_dir  # noqa: F401 (model_dir: the fixture)


def llm(path, steps, dtype="float32", **kw):
    kw.setdefault("kv_cache_memory", 4 << 20)
    return LLM(str(path), device="cpu", dtype=dtype, num_scheduler_steps=steps, **kw)


def summary(outs):
    return [(o.outputs[0].token_ids, o.outputs[0].text, o.outputs[0].finish_reason, o.outputs[0].stop_reason)
            for o in outs]


def logprobs(outs):
    return [o.outputs[0].cumulative_logprob for o in outs]


def assert_pool_empty(engine):
    bm = engine.block_manager
    assert not engine.has_unfinished_requests()
    assert bm.get_num_free_device_blocks() == bm.num_device_blocks, "blocks left allocated after every request ended"


PROMPTS = [[5, 6, 7, 8], [9, 10], list(range(20, 60)), [77] * 17, list(range(100, 133))]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("steps", [2, 5, 8])
def test_same_outputs_as_single_steps_in_fewer_steps(model_dir, dtype, steps):
    # max_tokens of every size around the burst: caps inside, at and across a burst's end
    params = [SamplingParams(temperature=0, max_tokens=m, ignore_eos=True) for m in (13, 30, 7, 1, 21)]
    ref, multi = llm(model_dir, 1, dtype), llm(model_dir, steps, dtype)
    want = ref.generate(sampling_params=params, prompt_token_ids=PROMPTS)
    got = multi.generate(sampling_params=params, prompt_token_ids=PROMPTS)
    assert summary(got) == summary(want)
    np.testing.assert_allclose(logprobs(got), logprobs(want), rtol=1e-6)
    assert [len(o.outputs[0].token_ids) for o in got] == [13, 30, 7, 1, 21]
    assert multi.engine.stats.num_steps < ref.engine.stats.num_steps, "no step ran several decode steps"
    assert_pool_empty(multi.engine)


def test_batch_of_one_runs_bursts_of_the_configured_size(model_dir):
    multi = llm(model_dir, 4)
    sched = multi.engine.scheduler
    schedule, seen = sched.schedule, []

    def spy():                        # no burst computes past its sequence's last token
        out = schedule()
        for s in out.batch:
            seen.append(s.lookahead)
            assert len(s.seq.output_token_ids) + 1 + s.lookahead <= 15, "a burst past max_tokens"
        return out
    sched.schedule = spy
    out = multi.generate(sampling_params=SamplingParams(temperature=0, max_tokens=15, ignore_eos=True),
                         prompt_token_ids=[[3, 4, 5]])
    assert len(out[0].outputs[0].token_ids) == 15
    # the prefill step (1 token), bursts of 4, and a last one of the 2 tokens left: 15 tokens in 5 steps
    assert seen == [0, 3, 3, 3, 1] and multi.engine.stats.num_steps == 5


def test_stops_inside_a_burst(stories260k_dir):
    """A stop token id and a stop string met in the middle of a burst: the tokens after them are
    dropped, as single steps never made them (stories260K: real text to cut)."""
    ref, multi = llm(stories260k_dir, 1), llm(stories260k_dir, 8)
    prompt = "Once upon a time, there was a little"
    free = ref.generate(prompt, SamplingParams(temperature=0, max_tokens=40))[0].outputs[0]
    assert len(free.token_ids) >= 20, "the reference stopped too early to place stops inside it"
    stop_id = free.token_ids[11]
    stop_str = free.text[len(free.text) // 2:len(free.text) // 2 + 4]
    for sp in (SamplingParams(temperature=0, max_tokens=40, stop_token_ids=[stop_id]),
               SamplingParams(temperature=0, max_tokens=40, stop=[stop_str]),
               SamplingParams(temperature=0, max_tokens=40, stop=[stop_str], include_stop_str_in_output=True),
               SamplingParams(temperature=0, max_tokens=40)):          # EOS, if the story ends
        want, got = ref.generate(prompt, sp), multi.generate(prompt, sp)
        assert summary(got) == summary(want), sp
        np.testing.assert_allclose(logprobs(got), logprobs(want), rtol=1e-6)
    stopped = multi.generate(prompt, SamplingParams(temperature=0, max_tokens=40, stop_token_ids=[stop_id]))
    assert summary(stopped)[0][2:] == ("stop", stop_id)
    assert_pool_empty(multi.engine)


def test_arrivals_and_other_sampling_fall_back_to_single_steps(model_dir):
    """A request arriving while others run is admitted at the next schedule; a request that is not
    plain greedy (sampled, top-N logprobs, a penalty) keeps the whole batch on single steps; the
    greedy requests' outputs stay the same."""
    greedy = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    others = [SamplingParams(temperature=0.8, seed=7, max_tokens=8, ignore_eos=True),
              SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, logprobs=2),
              SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, repetition_penalty=1.3)]
    runs = {}
    for steps in (1, 6):
        engine = llm(model_dir, steps).engine
        engine.add_request("a", None, greedy, prompt_token_ids=PROMPTS[0])
        for _ in range(3):
            engine.step()
        engine.add_request("b", None, greedy, prompt_token_ids=PROMPTS[2])   # arrives mid-run
        engine.add_request("c", None, others[0], prompt_token_ids=PROMPTS[1])
        done, sizes = {}, []
        while engine.has_unfinished_requests():
            before = engine.stats.generation_tokens
            for o in engine.step():
                if o.finished:
                    done[o.request_id] = o
            sizes.append(engine.stats.generation_tokens - before)
        runs[steps] = done, sizes
        assert_pool_empty(engine)
    (want, _), (got, sizes) = runs[1], runs[6]
    for rid in "abc":
        assert summary([got[rid]]) == summary([want[rid]]), rid
    # "c" (sampled) kept every step single until it finished, then "b" ran bursts
    assert max(sizes) > 2, "no burst ran after the sampled request finished"
    for sp in others[1:]:                         # logprobs / a penalty: single steps from start to end
        engine = llm(model_dir, 6).engine
        engine.add_request("x", None, greedy, prompt_token_ids=PROMPTS[0])
        engine.add_request("y", None, sp, prompt_token_ids=PROMPTS[1])
        while engine.has_unfinished_requests():
            before = engine.stats.generation_tokens
            engine.step()
            assert engine.stats.generation_tokens - before <= 2, f"a burst ran beside {sp}"


def test_prefix_caching_and_a_tight_pool(model_dir, monkeypatch):
    """Prefix caching on: a second round of the same prompts hits the cache and outputs the same.
    A pool of exactly the blocks the requests end with: bursts, no preemption, the same outputs.
    Blocks short for a burst: single steps (never a preemption for a burst)."""
    params = [SamplingParams(temperature=0, max_tokens=m, ignore_eos=True) for m in (13, 30, 7, 1, 21)]
    ref = llm(model_dir, 1, enable_prefix_caching=True)
    multi = llm(model_dir, 8, enable_prefix_caching=True)
    want = ref.generate(sampling_params=params, prompt_token_ids=PROMPTS)
    for _ in range(2):
        assert summary(multi.generate(sampling_params=params, prompt_token_ids=PROMPTS)) == summary(want)
    assert multi.engine.block_manager.prefix_cache_hits > 0
    assert_pool_empty(multi.engine)
    short = [p[:12] for p in PROMPTS]
    params = [SamplingParams(temperature=0, max_tokens=m, ignore_eos=True) for m in (20, 30, 9, 3, 25)]
    blocks = sum(-(-(12 + m) // BLOCK) for m in (20, 30, 9, 3, 25))            # 11: their final tables
    block_bytes = 2 * 3 * 2 * 32 * BLOCK * 4                      # K and V, 3 layers, 2 KV heads, head 32
    runs = {}
    for steps in (1, 8):
        tight = llm(model_dir, steps, kv_cache_memory=blocks * block_bytes, max_model_len=64)
        assert tight.engine.block_manager.num_device_blocks == blocks
        runs[steps] = summary(tight.generate(sampling_params=params, prompt_token_ids=short))
        assert tight.engine.scheduler.num_preemptions == {"recompute": 0, "swap": 0}
        assert_pool_empty(tight.engine)
    assert runs[8] == runs[1]
    engine = llm(model_dir, 8).engine
    monkeypatch.setattr(engine.block_manager, "can_append_slots_all", lambda groups, k: False)
    for i, p in enumerate(short):
        engine.add_request(str(i), None, params[i], prompt_token_ids=p)
    while engine.has_unfinished_requests():
        before = engine.stats.generation_tokens
        engine.step()
        assert engine.stats.generation_tokens - before <= len(short), "a burst ran without its blocks"
    assert_pool_empty(engine)


def test_settings_it_cannot_run_with_are_refused(model_dir):
    for bad in (0, 65, 2.5, True):
        with pytest.raises(RawpagedError, match="num_scheduler_steps"):
            llm(model_dir, bad)
    with pytest.raises(RawpagedError, match="paged KV manager"):
        llm(model_dir, 4, kv_manager="orca-max", enable_prefix_caching=False)
    with pytest.raises(RawpagedError, match="fused decode step"):
        llm(model_dir, 4, enforce_eager=True)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("workers", [1, 2, 3], ids=["team1", "team2", "team3"])
def test_kernel_steps_equal_its_single_steps(model_dir, dtype, workers, monkeypatch):
    """decode_step.run_stack with steps=6 against 6 single fused steps, each followed by the
    sampler's greedy argmax: the same tokens, logprobs and K/V, the scratch poisoned (NaN) first,
    contexts crossing block boundaries, 3 rows."""
    monkeypatch.setattr(decode_step, "team_size", lambda: workers)
    np_dtype = cpu.resolve_dtype(dtype)
    p = Paths(load(model_dir, np_dtype), np_dtype)
    prompts = [14, 3, 29]
    rng = np.random.default_rng(5)
    seqs = [Sequence(i, rng.integers(3, 512, n).tolist()) for i, n in enumerate(prompts)]
    _, logits = p.step(seqs, prompts)                                # prefill, both caches
    for s, t in zip(seqs, logits.argmax(1)):
        s.append_token(int(t), 0.0)
    steps = 6
    batch = p.batch(seqs, [1] * len(seqs))
    for s in batch:                                                  # slots for the 5 tokens fed back
        while len(s.block_table) * BLOCK < s.seq.num_tokens + steps - 1:
            s.block_table.append(int(p.order.pop()))
        p.tables[s.seq.seq_id] = list(s.block_table)
        s.lookahead = steps - 1
    inputs = prepare_inputs(batch, BLOCK)
    assert inputs.num_steps == steps
    multi_cache = p.caches[1].device_cache.copy()
    single_cache = p.caches[1].device_cache
    p.fused.scratch(len(seqs))
    p.fused.fbuf[...] = np.nan
    p.fused.xbuf[...] = 0xFFFF
    tokens, lps = p.fused.run_steps(inputs, multi_cache, BLOCK)
    assert tokens.shape == lps.shape == (steps, len(seqs))
    from rawpaged.sampler import Sampler, SamplingRow
    sampler = Sampler(np)
    p.fused.attach(single_cache)
    for k in range(steps):
        one = prepare_inputs(p.batch(seqs, [1] * len(seqs)), BLOCK)
        p.fused.fbuf[...] = np.nan
        logits, _ = p.fused.run(one, single_cache)
        res = sampler(logits, [SamplingRow(SamplingParams(temperature=0), s.prompt_token_ids, s.output_token_ids)
                               for s in seqs])
        assert [r.token_id for r in res] == tokens[k].tolist(), f"step {k}: tokens differ"
        np.testing.assert_allclose([r.logprob for r in res], lps[k], rtol=1e-5, atol=1e-5)
        for s, r in zip(seqs, res):
            s.num_computed_tokens += 1
            s.append_token(r.token_id, r.logprob)
    # the K/V of every position the steps computed: the same in both caches (bit for bit: the same kernels)
    np.testing.assert_array_equal(lowp.bits(multi_cache), lowp.bits(single_cache))


def test_served_streams_the_same_text_in_bursts(stories260k_dir):
    """Through the OpenAI server: a streamed completion equals single steps' text, in fewer chunks
    than tokens (a chunk a burst), and a stop string met inside a burst is never streamed."""
    import json

    import httpx

    from rawpaged.engine import EngineConfig, LLMEngine
    from rawpaged.server.app import BackgroundServer, ServerConfig
    ref = llm(stories260k_dir, 1)
    engine = LLMEngine(EngineConfig(model=str(stories260k_dir), device="cpu", kv_cache_memory=4 << 20,
                                    num_scheduler_steps=6))
    prompt = "Once upon a time"
    with BackgroundServer(engine, ServerConfig("stories260k")) as srv, httpx.Client(base_url=srv.url, timeout=60) as c:
        for extra in ({}, {"stop": [" named Lily"]}):
            want = ref.generate(prompt, SamplingParams(temperature=0, max_tokens=40, **extra))[0].outputs[0]
            body = {"prompt": prompt, "max_tokens": 40, "temperature": 0, "stream": True, **extra}
            with c.stream("POST", "/v1/completions", json=body) as resp:
                assert resp.status_code == 200
                events = [json.loads(line[6:]) for line in resp.iter_lines()
                          if line.startswith("data: ") and line != "data: [DONE]"]
            deltas = [e["choices"][0]["text"] for e in events if e["choices"]]
            assert "".join(deltas) == want.text
            assert events[-1]["choices"][0]["finish_reason"] == want.finish_reason
            assert len(deltas) < len(want.token_ids), "one chunk per token: no burst reached the stream"
            if extra:
                assert want.finish_reason == "stop" and all("named" not in d for d in deltas)


def test_an_interrupted_burst_stops_after_its_step(model_dir):
    """interrupt_bursts (what the server calls when a request arrives): the call in flight ends after
    its current step; the slots it held for the rest stay with the sequence and are used by the next
    steps; the outputs stay those of single steps."""
    sp = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
    want = llm(model_dir, 1).generate(sampling_params=sp, prompt_token_ids=[PROMPTS[2]])
    engine = llm(model_dir, 6).engine
    engine.add_request("r", None, sp, prompt_token_ids=PROMPTS[2])
    made = []
    for interrupt in (False, True, True, False, False, False, False, False):
        engine.interrupt_bursts(interrupt)
        before = engine.stats.generation_tokens
        outs = engine.step()
        made.append(engine.stats.generation_tokens - before)
    assert made == [1, 1, 1, 6, 6, 6, 6, 3]
    assert outs[0].finished and summary(outs) == summary(want)
    assert_pool_empty(engine)


@pytest.mark.parametrize("workers", [1, 2, 3], ids=["team1", "team2", "team3"])
def test_kernel_interrupted_returns_the_steps_it_ran(model_dir, workers, monkeypatch):
    monkeypatch.setattr(decode_step, "team_size", lambda: workers)
    p = Paths(load(model_dir, np.float32), np.float32)
    seqs = [Sequence(i, list(range(3 + i, 20 + 2 * i))) for i in range(2)]
    _, logits = p.step(seqs, [s.num_tokens for s in seqs])
    for s, t in zip(seqs, logits.argmax(1)):
        s.append_token(int(t), 0.0)
    batch = p.batch(seqs, [1, 1])
    for s in batch:
        while len(s.block_table) * BLOCK < s.seq.num_tokens + 3:
            s.block_table.append(int(p.order.pop()))
        s.lookahead = 4
    one = p.fused.run(prepare_inputs(p.batch(seqs, [1, 1]), BLOCK), p.caches[0].device_cache)[0]
    p.fused.interrupt_bursts(True)
    tokens, lps = p.fused.run_steps(prepare_inputs(batch, BLOCK), p.caches[1].device_cache, BLOCK)
    assert tokens.shape == lps.shape == (1, 2), "an interrupted call ran past its first step"
    assert tokens[0].tolist() == one.argmax(1).tolist()
    p.fused.interrupt_bursts(False)
    tokens, _ = p.fused.run_steps(prepare_inputs(batch, BLOCK), p.caches[1].device_cache, BLOCK)
    assert tokens.shape == (5, 2)
