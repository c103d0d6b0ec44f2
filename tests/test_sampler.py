"""Sampler tests on the numpy backend, against naive per-row references written here in float64."""
import numpy as np
import pytest

from rawpaged.errors import RawpagedError
from rawpaged.sampler import Sampler, SamplingRow, process_logits, verify_for_vocab
from rawpaged.sampling_params import SamplingParams


def row(prompt=(1, 2, 3), output=(), generator=None, num_logprobs=None, **params):
    params = SamplingParams(**params)
    return SamplingRow(params, list(prompt), list(output), generator, num_logprobs)


def log_softmax64(x):
    x = np.asarray(x, dtype=np.float64)
    z = x - x.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def softmax64(x):
    return np.exp(log_softmax64(x))


def random_logits(rng, b, v, scale=2.0):
    return (rng.standard_normal((b, v)) * scale).astype(np.float32)


# -- naive references --------------------------------------------------------------------------

def ref_process(logits, r: SamplingRow):
    """One row, token by token: logit_bias, repetition (prompt + output), frequency and presence
    (output only)."""
    x = np.asarray(logits, dtype=np.float64).copy()
    p = r.params
    for tok, bias in (p.logit_bias or {}).items():
        x[tok] += bias
    for tok in set(r.prompt_token_ids) | set(r.output_token_ids):
        x[tok] = x[tok] / p.repetition_penalty if x[tok] > 0 else x[tok] * p.repetition_penalty
    for tok in set(r.output_token_ids):
        count = r.output_token_ids.count(tok)
        x[tok] -= p.frequency_penalty * count + p.presence_penalty
    return x


def ref_kept(logits, p: SamplingParams):
    """The tokens top_k, then top_p (renormalized over top-k), then min_p keep, with their probs."""
    z = np.asarray(logits, dtype=np.float64) / p.temperature
    order = sorted(range(len(z)), key=lambda t: (-z[t], t))
    kept = list(order)
    if p.top_k > 0:
        kth = z[order[min(p.top_k, len(z)) - 1]]
        kept = [t for t in kept if z[t] >= kth]
    probs = {t: np.exp(z[t] - z[order[0]]) for t in kept}
    total = sum(probs.values())
    mass, top_p_kept = 0.0, []
    for t in kept:
        if mass >= p.top_p:
            break
        top_p_kept.append(t)
        mass += probs[t] / total
    kept = top_p_kept
    kept = [t for t in kept if probs[t] >= p.min_p * probs[order[0]]]
    total = sum(probs[t] for t in kept)
    return {t: probs[t] / total for t in kept}


def chi_square(counts, expected_probs, n):
    exp = np.asarray(expected_probs) * n
    return float(((np.asarray(counts) - exp) ** 2 / exp).sum())


# -- tests -------------------------------------------------------------------------------------

def test_greedy_is_argmax_lowest_id_on_ties():
    rng = np.random.default_rng(0)
    logits = random_logits(rng, 5, 50)
    logits[3, [7, 20]] = logits[3].max() + 1.0            # a tie: the lower id wins
    rows = [row(temperature=0.0), row(temperature=0.0, top_k=2, top_p=0.1, min_p=0.9),
            row(temperature=0.0), row(temperature=0.0), row(temperature=0.0)]
    out = Sampler(np, seed=0)(logits, rows)
    assert [r.token_id for r in out] == [int(np.argmax(x)) for x in logits]
    assert out[3].token_id == 7
    ref = log_softmax64(logits)
    for i, r in enumerate(out):
        assert r.logprob == pytest.approx(ref[i, r.token_id], abs=1e-5)
        assert r.top_logprobs is None


def test_all_greedy_shortcut_equals_the_general_path():
    """Plain greedy rows without top-N take a shortcut; one row asking for top-0 sends the same
    batch down the general path: every token and logprob must be the same, bit for bit."""
    rng = np.random.default_rng(3)
    logits = random_logits(rng, 7, 1000, scale=4.0)
    shortcut = Sampler(np)(logits, [row(temperature=0.0) for _ in range(7)])
    general = Sampler(np)(logits, [row(temperature=0.0, num_logprobs=0)] + [row(temperature=0.0)] * 6)
    assert [(r.token_id, r.logprob) for r in shortcut] == [(r.token_id, r.logprob) for r in general]
    assert all(isinstance(r.token_id, int) and isinstance(r.logprob, float) for r in shortcut)
    assert general[0].top_logprobs == {general[0].token_id: general[0].logprob}
    assert [r.top_logprobs for r in shortcut] == [None] * 7


def test_greedy_uses_processed_logits():
    logits = np.array([[3.0, 2.9, 0.5, -1.0]], dtype=np.float32)
    out = Sampler(np)(logits, [row(temperature=0.0, logit_bias={2: 5.0})])
    assert out[0].token_id == 2


def test_temperature_distribution_matches_softmax():
    rng = np.random.default_rng(1)
    v, n, temp = 8, 20000, 0.7
    logits = random_logits(rng, 1, v, scale=1.0)
    out = Sampler(np, seed=123)(np.repeat(logits, n, axis=0), [row(temperature=temp)] * n)
    counts = np.bincount([r.token_id for r in out], minlength=v)
    want = softmax64(logits[0] / temp)
    assert want.min() * n > 50                              # every cell well populated
    # chi-square with 7 degrees of freedom: 30 is beyond its 99.99% quantile (seeded: cannot flake)
    assert chi_square(counts, want, n) < 30
    assert chi_square(counts, softmax64(logits[0]), n) > 100   # T=1 would not pass


@pytest.mark.parametrize("params", [
    dict(temperature=1.0, top_k=3),
    dict(temperature=1.0, top_p=0.6),
    dict(temperature=1.0, min_p=0.1),
    dict(temperature=0.8, top_k=7, top_p=0.85, min_p=0.05),
    dict(temperature=1.5, top_k=10, top_p=0.7),
])
def test_filters_keep_exactly_the_reference_tokens(params):
    rng = np.random.default_rng(2)
    v, n = 16, 6000
    logits = random_logits(rng, 1, v, scale=1.5)
    p = SamplingParams(**params)
    want = ref_kept(logits[0], p)
    assert 1 < len(want) < v and min(want.values()) * n > 40   # a test that can tell
    out = Sampler(np, seed=7)(np.repeat(logits, n, axis=0), [row(**params)] * n)
    ids = np.array([r.token_id for r in out])
    assert set(ids.tolist()) == set(want)
    toks = sorted(want)
    counts = [(ids == t).sum() for t in toks]
    assert chi_square(counts, [want[t] for t in toks], n) < 40   # and in the right proportions


def test_process_logits_matches_reference():
    rng = np.random.default_rng(3)
    v = 40
    logits = random_logits(rng, 5, v)
    before = logits.copy()
    rows = [
        row(),                                                          # untouched
        row(prompt=[1, 5, 5, 9], output=[9, 9, 2], repetition_penalty=1.3),
        row(prompt=[4], output=[3, 3, 3, 8, 0], frequency_penalty=0.7, presence_penalty=-0.4),
        row(prompt=[6, 7], output=[7, 11, 11], repetition_penalty=0.8, frequency_penalty=-1.1,
            presence_penalty=1.5, logit_bias={11: 2.0, 0: -3.5, 39: 1.25}),
        row(prompt=[1], output=[], logit_bias={5: 10.0}, presence_penalty=2.0),
    ]
    got = process_logits(np, logits, rows)
    np.testing.assert_array_equal(logits, before)                       # input untouched
    for i, r in enumerate(rows):
        np.testing.assert_allclose(got[i], ref_process(logits[i], r), rtol=1e-6, atol=1e-5)
    assert not np.allclose(got[1:], logits[1:])


@pytest.mark.parametrize("params", [dict(temperature=0.9, seed=1234),                 # no sort
                                    dict(temperature=0.9, top_p=0.95, seed=1234)])   # sorted
def test_seeded_row_same_tokens_alone_and_in_batch(params):
    v, steps = 30, 12
    data = np.random.default_rng(4)
    step_logits = [random_logits(data, 1, v, scale=0.5) for _ in range(steps)]

    def run(batch: bool, sampler_seed: int):
        sampler = Sampler(np, seed=sampler_seed)
        gen = np.random.default_rng(1234)
        mine = row(generator=gen, **params)
        others = [row(temperature=1.0), row(temperature=0.0), row(temperature=0.5, top_k=4),
                  row(temperature=1.2, min_p=0.2, repetition_penalty=1.2), row(temperature=0.7)]
        noise = np.random.default_rng(sampler_seed)
        for t in range(steps):
            rows = others[:2] + [mine] + others[2:] if batch else [mine]
            logits = step_logits[t]
            if batch:
                logits = np.concatenate([random_logits(noise, 2, v), logits,
                                         random_logits(noise, 3, v)])
            res = sampler(logits, rows)[2 if batch else 0]
            mine.output_token_ids.append(res.token_id)
        return mine.output_token_ids

    alone = run(False, sampler_seed=0)
    assert run(True, sampler_seed=99) == alone
    assert len(set(alone)) > 3                                # it really samples


class FixedUniform:
    """A stand-in generator whose one draw is chosen by the test (the ends of [0, 1))."""
    def __init__(self, u):
        self.u = u

    def random(self):
        return self.u


@pytest.mark.parametrize("params", [dict(), dict(top_p=0.99), dict(top_k=3), dict(min_p=1e-30)])
def test_extreme_uniforms_never_pick_a_zero_probability_token(params):
    # Tokens 2 and 3 have probability exactly 0 in float32 (exp(-1e4) underflows).
    logits = np.array([[5.0, 4.0, -1e4, -1e4]], dtype=np.float32)
    sampler = Sampler(np)
    low = sampler(logits, [row(generator=FixedUniform(0.0), **params)])[0].token_id
    high = sampler(logits, [row(generator=FixedUniform(1.0 - 2.0**-53), **params)])[0].token_id
    assert (low, high) == (0, 1)


def test_logprobs_are_raw_log_softmax_with_top_n():
    rng = np.random.default_rng(5)
    v = 64
    logits = random_logits(rng, 5, v)
    top1 = int(np.argmax(logits[1]))
    # NOTE: rows 1 and 2 must pick a token whose logit was processed: raw != processed shows.
    rows = [row(num_logprobs=0), row(num_logprobs=3, temperature=0.0, repetition_penalty=0.5,
                                     prompt=[top1]),
            row(num_logprobs=5, temperature=0.8, logit_bias={0: 40.0}), row(),
            row(num_logprobs=1, frequency_penalty=1.0, output=[1, 1])]
    out = Sampler(np, seed=11)(logits, rows)
    assert out[1].token_id == top1 and out[2].token_id == 0
    ref = log_softmax64(logits)                               # raw: before bias and penalties
    for i, (r, res) in enumerate(zip(rows, out)):
        assert res.logprob == pytest.approx(ref[i, res.token_id], abs=1e-5)
        if r.num_logprobs is None:
            assert res.top_logprobs is None
            continue
        best = np.argsort(-ref[i], kind="stable")[:r.num_logprobs].tolist()
        assert set(res.top_logprobs) == {res.token_id, *best}
        for tok, lp in res.top_logprobs.items():
            assert lp == pytest.approx(ref[i, tok], abs=1e-5)


def test_prompt_logprobs_match_reference():
    rng = np.random.default_rng(6)
    logits = random_logits(rng, 7, 50)
    next_ids = rng.integers(0, 50, size=7).tolist()
    lps, tops = Sampler(np).logprobs(logits, next_ids, 4)
    ref = log_softmax64(logits)
    np.testing.assert_allclose(lps, ref[np.arange(7), next_ids], atol=1e-5)
    for i, d in enumerate(tops):
        best = np.argsort(-ref[i], kind="stable")[:4].tolist()
        assert set(d) == {next_ids[i], *best}
        for tok, lp in d.items():
            assert lp == pytest.approx(ref[i, tok], abs=1e-5)


def test_topk_logprobs_for_beam_search():
    rng = np.random.default_rng(7)
    logits = random_logits(rng, 3, 100)
    vals, ids = Sampler(np).topk_logprobs(logits, 4)
    ref = log_softmax64(logits)
    want = np.argsort(-ref, axis=-1, kind="stable")[:, :4]
    np.testing.assert_array_equal(ids, want)
    np.testing.assert_allclose(vals, np.take_along_axis(ref, want, axis=-1), atol=1e-5)


def test_logit_bias_outside_vocab_is_a_user_error():
    verify_for_vocab(SamplingParams(logit_bias={0: 1.0, 99: -1.0}), 100)
    for bad in (100, -1):
        with pytest.raises(RawpagedError, match="logit_bias"):
            verify_for_vocab(SamplingParams(logit_bias={bad: 1.0}), 100)
