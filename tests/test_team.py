"""backend/cpu/team.py: a team of threads through phases of claimed chunks.

A chain of phases where every chunk of phase p reads ALL of phase p-1's results: a worker that went
ahead before the phase before it was finished, a chunk run twice or never, shows as a wrong value.
Teams larger and smaller than Numba's thread count (1 or 2 threads): with one thread the workers run
one after the other, which a barrier-based team would deadlock on. Each run is in a daemon thread
joined with a timeout, so a deadlock fails the test instead of hanging the suite.
"""
import threading

import numba
import numpy as np
import pytest
from numba import njit, prange

from rawpaged.backend.cpu import team

MOD = 1_000_003


@njit(parallel=True, nogil=True)
def _chain(a, sync, workers, done_by, busy):
    """a [P, n] int64, row 0 given: a[p, c] = (sum(a[p - 1]) * (c + 1) + p) % MOD; done_by[p, c]
    counts how often chunk (p, c) ran; busy [workers]: work that makes chunks uneven."""
    P, n = a.shape
    for wk in prange(workers):
        for p in range(1, P):
            while True:
                c = team.claim(sync, p, n)
                if c < 0:
                    break
                s = 0
                for j in range(n):          # every chunk of the phase before
                    s += a[p - 1, j]
                b = busy[wk]
                for _ in range(20000 * (c % 3)):  # uneven chunks: workers drift apart
                    b = (b * 3 + 1) % MOD
                busy[wk] = b
                a[p, c] = (s * (c + 1) + p) % MOD
                done_by[p, c] += 1
                team.finish(sync, p)
            team.wait(sync, p, n)


def _expected(a0, P):
    a = np.zeros((P, a0.size), np.int64)
    a[0] = a0
    for p in range(1, P):
        s = int(a[p - 1].sum())
        a[p] = [(s * (c + 1) + p) % MOD for c in range(a0.size)]
    return a


@pytest.mark.parametrize("threads,workers", [(1, 1), (1, 3), (2, 1), (2, 2), (2, 5)])
def test_team_chain(threads, workers):
    if threads > numba.config.NUMBA_NUM_THREADS:
        pytest.skip(f"Numba has {numba.config.NUMBA_NUM_THREADS} thread(s)")
    P, n = 40, 13
    rng = np.random.default_rng(threads * 10 + workers)
    a = np.zeros((P, n), np.int64)
    a[0] = rng.integers(0, MOD, n)
    done_by = np.zeros((P, n), np.int64)
    sync = team.new_sync(P)
    result = {}

    def run():
        numba.set_num_threads(threads)      # per calling thread
        for _ in range(3):                  # the same team, called again: fresh counters each time
            sync[:] = 0
            done_by[:] = 0
            _chain(a, sync, workers, done_by, np.zeros(workers, np.int64))
        result["ok"] = True

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(timeout=180)
    assert not t.is_alive(), f"the team of {workers} on {threads} thread(s) did not finish: deadlock"
    assert result.get("ok")
    np.testing.assert_array_equal(a, _expected(a[0], P))
    assert (done_by[1:] == 1).all(), "a chunk ran twice or never"
    pairs = sync.reshape(P, 2)[1:]
    assert (pairs[:, 1] == n).all()
    assert (pairs[:, 0] == n + workers).all(), "each worker ends each phase with one failed claim"


def test_claim_finish_wait_counts():
    @njit
    def claims(sync, n):
        got = []
        for _ in range(n + 2):
            got.append(team.claim(sync, 1, n))
        for _ in range(n):
            team.finish(sync, 1)
        team.wait(sync, 1, n)               # returns at once: all n finished
        return got

    sync = team.new_sync(2)
    assert claims(sync, 3) == [0, 1, 2, -1, -1]
    assert list(sync) == [0, 0, 5, 3]
