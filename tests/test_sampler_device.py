"""The sampler on the device array module (the emulated CuPy of tests/cuda_emulator.py): the same
tokens as on NumPy, and the host round trips of issue 13 counted. A batch of greedy rows uploads
nothing and downloads once; sampled rows add one upload (their params and uniforms packed); mixed
paths add their row indices. The host waits for the device once per step (the download)."""
from __future__ import annotations

import numpy as np
import pytest

from cuda_emulator import EmuArray, fake_cupy, install, uninstall_caches
from rawpaged.sampler import Sampler, SamplingRow
from rawpaged.sampling_params import SamplingParams


@pytest.fixture()
def emu(monkeypatch):
    install(monkeypatch)
    counts = {"up": 0, "down": 0}
    real_get, real_asarray = EmuArray.get, fake_cupy.asarray

    def get(self, *a, **kw):
        counts["down"] += 1
        return real_get(self, *a, **kw)

    def asarray(a, *args, **kw):
        if not isinstance(a, EmuArray):
            counts["up"] += 1
        return real_asarray(a, *args, **kw)
    monkeypatch.setattr(EmuArray, "get", get)
    monkeypatch.setattr(fake_cupy, "asarray", asarray)
    yield counts
    uninstall_caches()


def _rows(kinds, seed=0):
    out = []
    for i, kind in enumerate(kinds):
        params = {"greedy": dict(temperature=0.0), "temp": dict(temperature=0.8),
                  "topk": dict(temperature=0.9, top_k=5, top_p=0.9)}[kind]
        out.append(SamplingRow(SamplingParams(seed=seed + i, **params), [1, 2], [3],
                               np.random.default_rng(seed + i)))
    return out


@pytest.mark.parametrize("kinds,uploads", [
    (["greedy"] * 4, 0),                       # the common path: nothing goes up
    (["temp"] * 4, 1),                         # params + uniforms: one packed upload
    (["topk"] * 4, 1),
    (["greedy", "temp", "topk", "greedy"], 3 + 2),   # mixed: each path its row indices, each sampling path its params
])
def test_device_sampling_equals_numpy_with_one_download(emu, kinds, uploads):
    rng = np.random.default_rng(1)
    logits = (rng.standard_normal((len(kinds), 50)) * 2).astype(np.float32)
    want = Sampler(np, seed=3)(logits, _rows(kinds))
    dev = fake_cupy.asarray(logits)
    emu["up"] = 0
    got = Sampler(fake_cupy, seed=3)(dev, _rows(kinds))
    assert [r.token_id for r in got] == [r.token_id for r in want]
    np.testing.assert_allclose([r.logprob for r in got], [r.logprob for r in want], rtol=1e-6)
    assert emu["down"] == 1                    # ids and logprobs come back in one copy
    assert emu["up"] == uploads
