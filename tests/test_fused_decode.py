"""The CPU's fused decode step (backend/cpu/decode_step.py through worker/fused_decode.py) against the
per-op path: the same logits (its LM head runs inside the step), greedy tokens and KV cache over
several decode steps of a random LLaMA with grouped-query attention, growing contexts across blocks,
batch 1 and batch > 1, float32 and bfloat16, teams of 1-3 threads, its scratch poisoned (NaN) before
every step and the caches' unwritten slots too."""
import json

import numpy as np
import pytest

from rawpaged.backend import cpu
from rawpaged.backend.cpu import decode_step, lowp
from rawpaged.config import ModelConfig
from rawpaged.loader import iter_tensors
from rawpaged.sequence import ScheduledSeq, Sequence
from rawpaged.testing import make_random_llama
from rawpaged.worker.cache_engine import CacheEngine
from rawpaged.worker.fused_decode import FusedDecode
from rawpaged.worker.model_runner import ModelRunner, prepare_inputs
from model_impl import get_model_class

BLOCK = 16
# NOTE: the fused step runs the per-op path's kernels (the same sums in the same order): measured,
# its logits equal the per-op path's bit for bit in every comparison here. The tolerance leaves room
# only for LLVM ordering a fast-math reduction differently in another compilation: 1e-5 of the
# largest |logit| in float32; 1e-2 in bfloat16, where the activations are rounded to bfloat16 for
# each GEMM and a last-bit difference in one of them moves its products by up to 2^-8.
TOL = {"float32": 1e-5, "bfloat16": 1e-2}


@pytest.fixture(scope="module")
def model_dir(data_dir, tmp_path_factory):
    # head_dim 32 (whole blocks take simd.py's 16-key path; the newest block the plain loops),
    # 4 query heads on 2 KV heads, intermediate 344 (K % 32 != 0: the bfloat16 GEMM's tail columns)
    return make_random_llama(tmp_path_factory.mktemp("fused") / "m",
                             data_dir / "tokenizers" / "llama-32k" / "tokenizer.json", hidden_size=128,
                             num_layers=3, num_heads=4, num_kv_heads=2, vocab_size=512, intermediate_size=344,
                             init_std=0.08, seed=3)


def load(path, dtype):
    cfg = ModelConfig.from_dir(path)
    model = get_model_class(cfg.family)(cfg, cpu, dtype)
    model.load_weights(iter_tensors(path), where=str(path))
    return model


class Paths:
    """The same model behind two runners (per-op, fused), each with its own KV cache poisoned with NaN."""

    def __init__(self, model, dtype, num_blocks=64):
        self.model = model
        self.caches = [CacheEngine(model.cfg, cpu, dtype, BLOCK, num_blocks, 0) for _ in range(2)]
        for c in self.caches:
            lowp.bits(c.device_cache)[...] = lowp.bits(np.full(1, np.nan, c.device_cache.dtype))[0]
        self.fused = FusedDecode(model, cpu)
        self.fused.attach(self.caches[1].device_cache)
        self.runners = [ModelRunner(model, cpu, BLOCK), ModelRunner(model, cpu, BLOCK, graphs=self.fused)]
        self.order = list(np.random.default_rng(0).permutation(num_blocks))   # scattered blocks
        self.tables: dict[int, list[int]] = {}

    def batch(self, seqs, n_new):
        out = []
        for s, n in zip(seqs, n_new):
            table = self.tables.setdefault(s.seq_id, [])
            while len(table) * BLOCK < s.num_computed_tokens + n:
                table.append(int(self.order.pop()))
            out.append(ScheduledSeq(s, n, list(table), sample=True))
        return out

    def step(self, seqs, n_new, poison=True):
        """Both paths' sampled logits for one step; advances the sequences."""
        if poison and self.fused.fbuf is not None:
            self.fused.fbuf[...] = np.nan
            self.fused.xbuf[...] = 0xFFFF                # a bfloat16 NaN
        batch = self.batch(seqs, n_new)
        per_op, _ = self.runners[0].execute(batch, self.caches[0].device_cache)
        fused, _ = self.runners[1].execute(batch, self.caches[1].device_cache)
        for s, n in zip(seqs, n_new):
            s.num_computed_tokens += n
        return np.asarray(per_op), np.asarray(fused)


def check_close(a, b, tol, what) -> int:
    """Logits within tol of the largest |logit|; greedy tokens equal wherever the per-op path's
    top-2 gap exceeds twice that. Returns how many rows had such a gap."""
    assert np.isfinite(b).all(), f"{what}: the fused step's logits hold NaN/inf"
    err = np.abs(a - b).max() / np.abs(a).max()
    print(f"{what}: max |per-op - fused| / max |logit| = {err:.2e}")
    assert err <= tol, f"{what}: max |per-op - fused| = {err:.2e} of max |logit| > {tol}"
    top2 = np.sort(a, axis=1)[:, -2:]
    clear = (top2[:, 1] - top2[:, 0]) > 2 * tol * np.abs(a).max()
    assert (a.argmax(1) == b.argmax(1))[clear].all(), f"{what}: greedy tokens differ"
    return int(clear.sum())


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
# batch 4: the GEMMs' few-row path (one weight row at a time); batch 10: their 4 x 4 tiles
@pytest.mark.parametrize("prompts", [[21], [5, 30, 16, 1], [3, 17, 40, 1, 9, 16, 33, 2, 25, 12]],
                         ids=["batch1", "batch4", "batch10"])
# the team of threads that runs the step (backend/cpu/team.py): one worker (the serial loop), two,
# and three, more than this machine's threads (a worker then starts after the others are done)
@pytest.mark.parametrize("workers", [1, 2, 3], ids=["team1", "team2", "team3"])
def test_fused_decode_equals_per_op(model_dir, dtype, prompts, workers, monkeypatch):
    monkeypatch.setattr(decode_step, "team_size", lambda: workers)
    np_dtype = cpu.resolve_dtype(dtype)
    p = Paths(load(model_dir, np_dtype), np_dtype)
    rng = np.random.default_rng(len(prompts))
    seqs = [Sequence(i, rng.integers(3, 512, n).tolist()) for i, n in enumerate(prompts)]
    a, b = p.step(seqs, prompts)                         # prefill: the per-op path in both
    np.testing.assert_array_equal(a, b)
    assert p.fused.fbuf is None, "a prefill step took the fused path"
    compared = 0
    for step in range(20):                               # contexts grow across block boundaries
        tokens = b.argmax(1)
        for s, t in zip(seqs, tokens):
            s.append_token(int(t), 0.0)
        a, b = p.step(seqs, [1] * len(seqs))
        assert p.fused.rows == len(seqs) and p.fused.workers == workers, "the decode step did not take the fused path"
        compared += check_close(a, b, TOL[dtype], f"{dtype} step {step}")
    assert compared >= 5, "hardly a row without a near-tie: the greedy check compared nothing"
    # every slot the steps wrote holds the same K/V in both caches (unwritten ones: NaN in both)
    c0, c1 = (lowp.bits(c.device_cache).view(np.uint16 if np_dtype != np.float32 else np.float32)
              for c in p.caches)
    k0, k1 = (c.astype(np.float32) if np_dtype == np.float32 else
              (c.astype(np.uint32) << 16).view(np.float32) for c in (c0, c1))
    np.testing.assert_array_equal(np.isnan(k0), np.isnan(k1))
    fin = ~np.isnan(k0)
    assert fin.sum() > 0
    np.testing.assert_allclose(k1[fin], k0[fin], rtol=TOL[dtype], atol=TOL[dtype] * np.abs(k0[fin]).max())


def test_sliding_window_and_eager_switch(model_dir, tmp_path):
    """Mistral's window (every layer) through the fused step, and which models / settings take it."""
    win = tmp_path / "mistral"
    win.mkdir()
    for f in model_dir.iterdir():
        (win / f.name).write_bytes(f.read_bytes())
    cfg = json.loads((win / "config.json").read_text())
    cfg.update(architectures=["MistralForCausalLM"], model_type="mistral", sliding_window=7)
    (win / "config.json").write_text(json.dumps(cfg))
    model = load(win, np.float32)
    assert model.fuses_decode()
    assert list(FusedDecode(model, cpu).stack.windows) == [7] * model.cfg.num_layers
    p = Paths(model, np.float32)
    seqs = [Sequence(0, list(range(3, 12))), Sequence(1, list(range(20, 45)))]
    a, b = p.step(seqs, [9, 25])
    compared = 0
    for step in range(12):
        for s, t in zip(seqs, b.argmax(1)):
            s.append_token(int(t), 0.0)
        a, b = p.step(seqs, [1, 1])
        compared += check_close(a, b, TOL["float32"], f"window step {step}")
    assert compared >= 5


def test_engine_takes_fused_step_unless_eager(model_dir):
    from rawpaged import LLM
    from rawpaged.sampling_params import SamplingParams
    sp = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    outs = {}
    for eager in (False, True):
        llm = LLM(str(model_dir), device="cpu", kv_cache_memory=4 << 20, enforce_eager=eager)
        graphs = llm.engine.executor.worker.runner.graphs
        outs[eager] = [o.outputs[0].token_ids for o in llm.generate(sampling_params=sp,
                                                                    prompt_token_ids=[[5, 6, 7, 8], [9, 10]])]
        assert isinstance(graphs, FusedDecode) != eager
    assert outs[False] == outs[True]


def test_lm_head_stored_unlike_the_layers_falls_back(model_dir, monkeypatch):
    """An LM head whose storage differs from the layers' is not read by the step (its kernel widens
    one storage kind): the step returns no logits and the runner computes them with compute_logits,
    equal to the in-step head's on the same rows."""
    monkeypatch.setattr(decode_step, "team_size", lambda: 2)
    np_dtype = cpu.resolve_dtype("bfloat16")
    model = load(model_dir, np_dtype)
    p = Paths(model, np_dtype)
    seqs = [Sequence(0, list(range(3, 20))), Sequence(1, list(range(40, 49)))]
    p.step(seqs, [17, 9])
    for s in seqs:
        s.append_token(7, 0.0)
    inputs = prepare_inputs(p.batch(seqs, [1, 1]), BLOCK)
    cache = p.caches[1].device_cache
    snapshot = cache.copy()
    rows, logits = p.fused.hidden(inputs, cache, model.lm_head)
    rows, logits = rows.copy(), logits.copy()
    cache[...] = snapshot                                # the same step again, from the same cache
    rows_f32_head, none = p.fused.hidden(inputs, cache, model.lm_head.astype(np.float32))
    assert none is None, "an LM head stored unlike the layers was read by the step"
    np.testing.assert_array_equal(rows_f32_head, rows)
    np.testing.assert_allclose(model.compute_logits(rows_f32_head), logits, rtol=0, atol=1e-5 * np.abs(logits).max())
