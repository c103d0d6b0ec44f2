"""The engine under memory pressure and with sharing: preemption, parallel sampling, beam search,
prefix caching, seeded sampling in a batch, stop strings, impossible requests."""
import numpy as np
import pytest

from paged_driver import PagedDriver, load_model
from rawpaged import LLM, SamplingParams
from rawpaged.worker.cache_engine import block_bytes
from rawpaged.sequence import Sequence


def kv_bytes(llm_or_dir, blocks, block_size=16):
    from rawpaged.config import ModelConfig
    cfg = ModelConfig.from_dir(llm_or_dir)
    return blocks * block_bytes(cfg, block_size, np.float32)


def prompts_for(n, vocab, seed=0, lo=8, hi=40):
    rng = np.random.default_rng(seed)
    return [[1] + rng.integers(3, vocab, rng.integers(lo, hi)).tolist() for _ in range(n)]


@pytest.fixture(scope="module")
def random_llama_dir(data_dir, tmp_path_factory):
    from rawpaged.testing import make_random_llama
    return make_random_llama(tmp_path_factory.mktemp("rl") / "m", data_dir / "tokenizers" / "llama-32k" / "tokenizer.json",
                             hidden_size=256, num_layers=2, num_heads=4, num_kv_heads=2, vocab_size=32000,
                             max_position_embeddings=256, init_std=0.05, seed=1)


def assert_all_blocks_free(llm):
    bm = llm.engine.block_manager
    assert bm.get_num_free_device_blocks() == bm.num_device_blocks
    assert bm.get_num_free_cpu_blocks() == bm.num_cpu_blocks


@pytest.mark.parametrize("model", ["stories260k", "random_llama"])
@pytest.mark.parametrize("mode", ["recompute", "swap"])
def test_preemption_changes_nothing(model, mode, request):
    path = request.getfixturevalue("stories260k_dir" if model == "stories260k" else "random_llama_dir")
    vocab = 512 if model == "stories260k" else 32000
    prompts = prompts_for(64, vocab, seed=5)
    sp = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    free = LLM(path, device="cpu", kv_cache_memory=kv_bytes(path, 2048))
    expect = [o.outputs[0].token_ids for o in free.generate(None, sp, prompt_token_ids=prompts)]
    assert free.get_stats()["num_preemptions_recompute"] + free.get_stats()["num_preemptions_swap"] == 0
    tight = LLM(path, device="cpu", kv_cache_memory=kv_bytes(path, 40), preemption_mode=mode, swap_space=0.01)
    got = [o.outputs[0].token_ids for o in tight.generate(None, sp, prompt_token_ids=prompts)]
    stats = tight.get_stats()
    assert stats[f"num_preemptions_{mode}"] >= 50, stats
    assert got == expect
    assert_all_blocks_free(tight)


def test_parallel_sampling_shares_prompt_blocks(stories260k_dir):
    llm = LLM(stories260k_dir, device="cpu", kv_cache_memory=kv_bytes(stories260k_dir, 256), enable_prefix_caching=False)
    eng, bm = llm.engine, llm.engine.block_manager
    prompt = [1] + list(range(300, 340))                     # 41 tokens: 2 full blocks + 9 in the third
    eng.add_request("r", None, SamplingParams(n=4, temperature=1.0, seed=3, max_tokens=20, ignore_eos=True),
                    prompt_token_ids=prompt)
    eng.step()                                               # prefill, then fork into 4 sequences
    group = eng.groups["r"]
    assert len(group.seqs) == 4
    tables = [bm.get_block_table(s) for s in group.seqs]
    assert all(t == tables[0] for t in tables)               # one set of prompt blocks, shared
    assert bm.num_device_blocks - bm.get_num_free_device_blocks() == 3
    eng.step()                                               # first decode: last block copied on write
    tables = [bm.get_block_table(s) for s in group.seqs]
    assert all(t[:2] == tables[0][:2] for t in tables)       # full prompt blocks still shared
    assert len({t[2] for t in tables}) == 4                  # the partial block: one per sample (CoW)
    assert bm.num_device_blocks - bm.get_num_free_device_blocks() == 2 + 4
    # Waste: each sample holds 43 tokens in 3 blocks (48 slots); the shared full blocks are counted once.
    assert eng.stats.memory_waste_slots == 4 * (48 - 43)
    while eng.has_unfinished_requests():
        outs = eng.step()
    (out,) = outs
    assert len(out.outputs) == 4 and all(len(o.token_ids) == 20 for o in out.outputs)
    assert len({tuple(o.token_ids) for o in out.outputs}) > 1
    assert_all_blocks_free(llm)


def naive_beam_search(model, prompt, width, max_tokens, eos, length_penalty=1.0):
    """Hugging Face's beam search without paging tricks: each beam's logits recomputed from scratch."""
    def logprobs(tokens):
        drv = PagedDriver(model, block_size=16, num_blocks=32)
        last, _ = drv.step([Sequence(0, list(tokens))], [len(tokens)])
        row = last[0].astype(np.float64)
        return row - (np.log(np.exp(row - row.max()).sum()) + row.max())

    beams = [([], 0.0)]
    finished = []                                            # (score, tokens)
    for step in range(max_tokens):
        cands = []
        for out, cum in beams:
            lp = logprobs(prompt + out)
            for t in np.argsort(-lp, kind="stable")[:2 * width]:
                cands.append((cum + lp[t], out, int(t)))
        cands.sort(key=lambda c: -c[0])
        new = []
        for rank, (cum, out, t) in enumerate(cands):
            if t in eos:
                if rank < width:
                    finished.append((cum / (len(out) + 1) ** length_penalty, out + [t]))
                continue
            new.append((out + [t], cum))
            if len(new) == width:
                break
        beams = new
        finished = sorted(finished, key=lambda f: -f[0])[:width]
        if len(finished) == width:
            best_running = max(c for _, c in beams) / (len(beams[0][0]) ** length_penalty)
            if best_running <= finished[-1][0]:
                break
    else:
        finished += [(c / len(o) ** length_penalty, o) for o, c in beams]
    return max(finished, key=lambda f: f[0])[1]


def test_beam_search_matches_naive(stories260k_dir):
    model = load_model(stories260k_dir)
    llm = LLM(stories260k_dir, device="cpu", kv_cache_memory=kv_bytes(stories260k_dir, 256))
    for prompt in ([1, 403, 407, 261], [1, 300, 301, 302, 303, 304]):
        sp = SamplingParams(use_beam_search=True, best_of=4, n=1, temperature=0, max_tokens=12)
        out = llm.generate(None, sp, prompt_token_ids=[prompt])[0]
        assert out.outputs[0].token_ids == naive_beam_search(model, prompt, 4, 12, llm.engine.output_processor.eos_ids)
    assert_all_blocks_free(llm)
    bm = llm.engine.block_manager                                  # no bookkeeping left behind
    assert not llm.engine.groups and bm.get_num_free_device_blocks() == bm.num_device_blocks


def test_beam_search_forks_share_blocks(stories260k_dir):
    llm = LLM(stories260k_dir, device="cpu", kv_cache_memory=kv_bytes(stories260k_dir, 256), enable_prefix_caching=False)
    eng, bm = llm.engine, llm.engine.block_manager
    eng.add_request("b", None, SamplingParams(use_beam_search=True, best_of=4, temperature=0, max_tokens=30,
                                              ignore_eos=True), prompt_token_ids=[1] + list(range(300, 347)))
    for _ in range(3):
        eng.step()
    beams = eng.groups["b"].get_unfinished_seqs()
    assert len(beams) == 4
    tables = [bm.get_block_table(s) for s in beams]
    used = bm.num_device_blocks - bm.get_num_free_device_blocks()
    assert used < sum(len(t) for t in tables)                # beams share their prompt blocks
    assert all(t[:2] == tables[0][:2] for t in tables)


def test_prefix_caching_reuses_blocks_and_changes_nothing(random_llama_dir):
    rng = np.random.default_rng(7)
    prefix = [1] + rng.integers(3, 32000, 199).tolist()      # 200 tokens: 12 full blocks of 16 + 8
    prompts = [prefix + rng.integers(3, 32000, rng.integers(5, 30)).tolist() for _ in range(32)]
    sp = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    results = {}
    for caching in (False, True):
        llm = LLM(random_llama_dir, device="cpu", kv_cache_memory=kv_bytes(random_llama_dir, 2048),
                  enable_prefix_caching=caching)
        first = llm.generate(None, sp, prompt_token_ids=prompts[:1])           # warm the cache
        rest = llm.generate(None, sp, prompt_token_ids=prompts[1:])
        results[caching] = ([o.outputs[0].token_ids for o in first + rest], llm.get_stats())
    (off, s_off), (on, s_on) = results[False], results[True]
    assert on == off
    total_prompt = sum(len(p) for p in prompts)
    assert s_off["prompt_tokens"] == total_prompt
    # With caching the 12 full prefix blocks are computed once: 31 requests skip 192 tokens each.
    assert s_on["prompt_tokens"] == total_prompt - 31 * 192
    assert s_on["prefix_cache_hits"] == 31 * 12


def test_prefix_blocks_allocated_once_while_shared(random_llama_dir):
    rng = np.random.default_rng(8)
    prefix = [1] + rng.integers(3, 32000, 199).tolist()
    llm = LLM(random_llama_dir, device="cpu", kv_cache_memory=kv_bytes(random_llama_dir, 2048))
    eng, bm = llm.engine, llm.engine.block_manager
    sp = SamplingParams(temperature=0, max_tokens=50, ignore_eos=True)
    eng.add_request("first", None, sp, prompt_token_ids=prefix + [5, 6, 7])
    eng.step()
    for i in range(8):
        eng.add_request(f"r{i}", None, sp, prompt_token_ids=prefix + [10 + i] * 5)
    eng.step()
    tables = [bm.get_block_table(g.seqs[0]) for g in eng.groups.values()]
    assert all(t[:12] == tables[0][:12] for t in tables)     # the 12 full prefix blocks, once
    # 203..205 tokens each: 12 shared full blocks + one private partial block per request.
    assert bm.num_device_blocks - bm.get_num_free_device_blocks() == 12 + 9


def test_seeded_request_same_alone_and_in_batch(stories260k_dir):
    llm = LLM(stories260k_dir, device="cpu", kv_cache_memory=kv_bytes(stories260k_dir, 512))
    target = SamplingParams(temperature=0.9, top_p=0.9, top_k=40, seed=1234, max_tokens=30, ignore_eos=True)
    alone = llm.generate(["Once upon a time"], target)[0].outputs[0].token_ids
    others = [SamplingParams(temperature=t, top_k=k, max_tokens=25 + i % 7, presence_penalty=0.5, ignore_eos=True,
                             seed=None if i % 2 else i)
              for i, (t, k) in enumerate(zip(np.linspace(0.3, 1.5, 32), [5, -1] * 16))]
    prompts = ["The dog", "Lily had a ball", "Ben"] * 11
    batch = llm.generate(prompts[:16] + ["Once upon a time"] + prompts[16:32],
                         others[:16] + [target] + others[16:])
    assert batch[16].outputs[0].token_ids == alone
    assert len(alone) == 30


def test_stop_strings_spanning_tokens(stories260k_dir):
    llm = LLM(stories260k_dir, device="cpu", kv_cache_memory=kv_bytes(stories260k_dir, 256))
    greedy = llm.generate(None, SamplingParams(temperature=0, max_tokens=64, ignore_eos=True), prompt_token_ids=[[1]])[0]
    text = greedy.outputs[0].text                          # "Once upon a time, there was a little girl named Lily..."
    tok = llm.tokenizer
    stop = "girl named"                                     # several tokens, across token boundaries
    assert len(tok.encode(stop, add_special_tokens=False)) > 1 and stop in text
    out = llm.generate(None, SamplingParams(temperature=0, max_tokens=64, stop=[stop, "zzz"]), prompt_token_ids=[[1]])[0]
    o = out.outputs[0]
    assert o.text == text[:text.index(stop)]
    assert o.finish_reason == "stop" and o.stop_reason == stop
    inc = llm.generate(None, SamplingParams(temperature=0, max_tokens=64, stop=[stop], include_stop_str_in_output=True),
                       prompt_token_ids=[[1]])[0].outputs[0]
    assert inc.text == text[:text.index(stop) + len(stop)]
    # While running, no partial stop string is ever visible.
    eng = llm.engine
    eng.add_request("s", None, SamplingParams(temperature=0, max_tokens=64, stop=["little girl named Lily"]),
                    prompt_token_ids=[1])
    seen = []
    while eng.has_unfinished_requests():
        for r in eng.step():
            seen.append(r.outputs[0].text)
    full = "little girl named Lily"
    for t in seen:
        assert not any(t.endswith(full[:k]) for k in range(1, len(full) + 1)), t
    assert seen[-1] == text[:text.index(full)]


def test_impossible_request_errors_and_others_complete(stories260k_dir):
    llm = LLM(stories260k_dir, device="cpu", kv_cache_memory=kv_bytes(stories260k_dir, 8), max_model_len=512)
    # 8 blocks of 16 = 128 slots; the engine caps max_model_len so a sequence always fits.
    assert llm.engine.max_model_len <= 128
    sp = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    outs = llm.generate(None, sp, prompt_token_ids=[[1, 300, 301], list(range(3, 200)), [1, 310]])
    assert outs[1].error is not None and outs[1].outputs[0].finish_reason == "error"
    assert outs[0].error is None and len(outs[0].outputs[0].token_ids) == 8
    assert outs[2].error is None and len(outs[2].outputs[0].token_ids) == 8
    assert_all_blocks_free(llm)


def test_max_model_len_stops_generation(stories260k_dir):
    llm = LLM(stories260k_dir, device="cpu", kv_cache_memory=kv_bytes(stories260k_dir, 64), max_model_len=20)
    out = llm.generate(None, SamplingParams(temperature=0, max_tokens=100, ignore_eos=True),
                       prompt_token_ids=[[1, 300, 301, 302, 303]])[0]
    assert len(out.outputs[0].token_ids) == 15 and out.outputs[0].finish_reason == "length"


def test_logprobs_and_prompt_logprobs(stories260k_dir):
    llm = LLM(stories260k_dir, device="cpu", kv_cache_memory=kv_bytes(stories260k_dir, 64))
    model = load_model(stories260k_dir)
    prompt = [1, 403, 407, 261, 378]
    out = llm.generate(None, SamplingParams(temperature=0, max_tokens=3, logprobs=2, prompt_logprobs=1),
                       prompt_token_ids=[prompt])[0]
    drv = PagedDriver(model, block_size=16, num_blocks=8)
    _, every = drv.step([Sequence(0, prompt)], [len(prompt)], prompt_logits=True)
    lp = every[0].astype(np.float64)
    lp = lp - np.log(np.exp(lp - lp.max(1, keepdims=True)).sum(1, keepdims=True)) - lp.max(1, keepdims=True)
    assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == len(prompt)
    for i in range(1, len(prompt)):
        assert out.prompt_logprobs[i][prompt[i]] == pytest.approx(lp[i - 1, prompt[i]], abs=1e-4)
    first = out.outputs[0].logprobs[0]
    assert int(np.argmax(lp[-1])) == out.outputs[0].token_ids[0]
    assert len(first) == 2 and first[out.outputs[0].token_ids[0]] == pytest.approx(lp[-1].max(), abs=1e-4)
    # The same prompt again: its blocks are cached now, yet every prompt position keeps its logprob.
    long_prompt = [1] + list(range(300, 340))
    sp = SamplingParams(temperature=0, max_tokens=2, prompt_logprobs=0)
    a, b = (llm.generate(None, sp, prompt_token_ids=[long_prompt])[0] for _ in range(2))
    assert a.prompt_logprobs == b.prompt_logprobs
    assert b.prompt_logprobs[0] is None and all(d is not None for d in b.prompt_logprobs[1:])
    assert len(b.prompt_logprobs) == len(long_prompt)


def test_abort_frees_blocks(stories260k_dir):
    llm = LLM(stories260k_dir, device="cpu", kv_cache_memory=kv_bytes(stories260k_dir, 64))
    eng = llm.engine
    for i in range(3):
        eng.add_request(f"a{i}", None, SamplingParams(max_tokens=50, ignore_eos=True), prompt_token_ids=[1, 300 + i])
    eng.step()
    eng.step()
    assert eng.abort_request("a1")
    assert not eng.abort_request("nope")
    while eng.has_unfinished_requests():
        eng.step()
    assert llm.get_stats()["num_aborted"] == 1
    assert_all_blocks_free(llm)


def test_seeded_parallel_samples_same_alone_and_in_batch(random_llama_dir):
    """n=4 seeded: each sample keeps its (seed, index) generator through the fork, alone or batched
    with 16 other requests (the logits differ in the last bits across batches: see DESIGN.md Sampling)."""
    llm = LLM(random_llama_dir, device="cpu", kv_cache_memory=kv_bytes(random_llama_dir, 1024))
    for seed in range(2):
        target = SamplingParams(n=4, temperature=1.0, seed=seed, max_tokens=16, ignore_eos=True)
        alone = [o.token_ids for o in llm.generate(["Once upon a time"], target)[0].outputs]
        assert len({tuple(t) for t in alone}) > 1                       # the samples differ from each other
        others = [SamplingParams(temperature=0.9, seed=100 + i, max_tokens=20, ignore_eos=True) for i in range(16)]
        batch = llm.generate(["Hello there"] * 8 + ["Once upon a time"] + ["The dog ran"] * 8,
                             others[:8] + [target] + others[8:])
        assert [o.token_ids for o in batch[8].outputs] == alone
