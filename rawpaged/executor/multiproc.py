"""MultiprocExecutor (`--distributed-executor-backend mp`): one process per rank on this node.

Processes are spawned (CUDA cannot be forked), rank r on GPU r. The driver talks to each over a
pipe: a call is pickled once and written to every rank's pipe; every rank answers (rank 0 with
the logits, the others with None), so the driver sees each rank finish its step.

Workers die with the driver: they are daemon processes (stopped when it exits), a closed pipe ends
their loop, and a rank waiting in a collective checks that its parent still lives. A rank that
dies (its sentinel fires) or raises is an error naming it, never a hang: the driver waits on the
pipes and the process sentinels together.
"""
from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import pickle
import sys
import traceback
import weakref
from multiprocessing.connection import wait

from rawpaged.executor.distributed import DistributedExecutor, RankHost, worker_config

# Threads of NumPy's BLAS, Numba and OpenMP in each CPU rank (unless the user set them): N ranks
# share the node's cores instead of each starting one thread per core.
THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS")


def _rank_main(rank: int, size: int, conn, parent_pid: int) -> None:
    """A rank's loop: (method, args) in, ("ok", result) or ("error", message) out."""
    host = RankHost(rank, size, parent_pid)
    while True:
        try:
            while not conn.poll(0.5):
                if not host.alive():
                    os._exit(0)                    # the driver is gone
            method, args = pickle.loads(conn.recv_bytes())
        except (EOFError, OSError):
            os._exit(0)                            # the pipe closed: the driver is gone
        if method == "stop":
            conn.send(("ok", None))
            os._exit(0)
        try:
            result = getattr(host, method)(*args)
        except BaseException as e:                 # noqa: BLE001 - reported to the driver
            host.abort()
            detail = "".join(traceback.format_exception_only(type(e), e)).strip()
            conn.send(("error", f"{detail}\n{traceback.format_exc(limit=6)}"))
            continue
        conn.send(("ok", result))


class MultiprocExecutor(DistributedExecutor):
    kind = "mp"

    def _start(self) -> None:
        config = worker_config(self.config)
        ctx = mp.get_context("spawn")
        self.conns, self.procs = [], []
        env = _thread_env(config.device, self.size)
        saved = {k: os.environ.get(k) for k in env}
        os.environ.update(env)               # NOTE: a spawned child reads its environment at start
        try:
            for rank in range(self.size):
                parent, child = ctx.Pipe()
                proc = ctx.Process(target=_rank_main, args=(rank, self.size, child, os.getpid()),
                                   name=f"rawpaged-tp{rank}", daemon=True)
                with _no_main_reimport():
                    proc.start()
                child.close()
                self.conns.append(parent)
                self.procs.append(proc)
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
        self._force = [False]                # set on a failure: no graceful stop (ranks may be stuck)
        self._finalizer = weakref.finalize(self, _stop_processes, self.procs, self.conns, self._force)
        self.device_of_rank = config.device
        self._start_ranks(self.comm_kind(config.device), config, self.model_config)

    def _device_index(self, rank: int) -> int | None:
        return rank if self.device_of_rank == "cuda" else None

    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    # -- calls ---------------------------------------------------------------------------------
    def _call_all_per_rank(self, method: str, args_of) -> list:
        self._check_usable()
        # NOTE: the same args (a step's inputs) are pickled once; the dict keeps them alive (ids stay unique)
        payloads: dict[int, tuple] = {}
        for rank in range(self.size):
            args = args_of(rank)
            if id(args) not in payloads:
                payloads[id(args)] = (args, pickle.dumps((method, args)))
            self._send(rank, payloads[id(args)][1])
        return self._collect(range(self.size))

    def _call_one(self, rank: int, method: str, *args):
        self._check_usable()
        self._send(rank, pickle.dumps((method, args)))
        return self._collect([rank])[0]

    def _send(self, rank: int, payload: bytes) -> None:
        try:
            self.conns[rank].send_bytes(payload)
        except (BrokenPipeError, OSError):
            self._fail(self._died(rank))

    def _collect(self, ranks) -> list:
        """Every rank's answer, in rank order; a rank that dies or raises stops them all."""
        pending = {self.conns[r]: r for r in ranks}
        sentinels = {self.procs[r].sentinel: r for r in ranks}
        results = {}
        while pending:
            for ready in wait(list(pending) + list(sentinels)):
                if ready in pending:
                    rank = pending.pop(ready)
                    del sentinels[self.procs[rank].sentinel]
                    try:
                        status, value = ready.recv()
                    except (EOFError, OSError):
                        self._fail(self._died(rank))
                    if status == "error":
                        self._fail(f"tensor-parallel worker rank {rank} failed: {value}")
                    results[rank] = value
                elif ready in sentinels:
                    rank = sentinels[ready]
                    if self.conns[rank] in pending and self.conns[rank].poll():
                        continue                  # its answer is in the pipe: read it first
                    self._fail(self._died(rank))
        return [results[r] for r in sorted(results)]

    def _died(self, rank: int) -> str:
        proc = self.procs[rank]
        proc.join(1.0)
        return (f"tensor-parallel worker rank {rank} (pid {proc.pid}) died unexpectedly "
                f"(exit code {proc.exitcode}: {_exit_reason(proc.exitcode)})")

    def _stop(self) -> None:
        finalizer = getattr(self, "_finalizer", None)
        if finalizer is not None:
            self._force[0] = self.failure is not None
            finalizer()


def _stop_processes(procs, conns, force) -> None:
    """Ask every live rank to stop, then terminate what is left (runs once: weakref.finalize).
    After a failure (force[0]) the ranks are terminated at once: some may wait in a collective."""
    for proc, conn in zip(procs, conns):
        if proc.is_alive() and not force[0]:
            try:
                conn.send_bytes(pickle.dumps(("stop", ())))
            except (BrokenPipeError, OSError):
                pass
    for proc in procs:
        proc.join(0 if force[0] else 5.0)
        if proc.is_alive():
            proc.terminate()
            proc.join(5.0)
        if proc.is_alive():
            proc.kill()
    for conn in conns:
        conn.close()


@contextlib.contextmanager
def _no_main_reimport():
    """Spawn without re-running the caller's script in the child.

    NOTE: multiprocessing's spawn re-imports `__main__` in every child (by path or module name), so
    a script that builds an LLM at module level without an `if __name__ == "__main__":` guard would
    start workers recursively. The rank's code lives in this package and needs nothing from
    `__main__`, so the main module is hidden from spawn while the child starts."""
    main = sys.modules.get("__main__")
    saved = {k: main.__dict__[k] for k in ("__spec__", "__file__") if main is not None and k in main.__dict__}
    try:
        if main is not None:
            main.__dict__.pop("__file__", None)
            main.__spec__ = None
        yield
    finally:
        if main is not None:
            main.__dict__.pop("__spec__", None)
            main.__dict__.update(saved)


def _thread_env(device: str, size: int) -> dict:
    if device != "cpu":
        return {}
    threads = str(max(1, (os.cpu_count() or 1) // size))
    return {k: threads for k in THREAD_VARS if k not in os.environ}


def _exit_reason(code: int | None) -> str:
    if code is None:
        return "still running"
    if code < 0:
        import signal
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return "exited"
