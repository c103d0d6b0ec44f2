"""Helpers shared by the server tests: a `rawpaged serve` subprocess whose log is read on a thread,
parking the engine thread of an in-process server between steps, and polling for a condition."""
from __future__ import annotations

import re
import subprocess
import threading
import time


class ServeProcess:
    """A `rawpaged serve` subprocess (`cmd` is the whole command line); its merged stdout/stderr lines
    are collected on a thread, and its URL is read from the "running on http://..." line."""

    def __init__(self, cmd: list[str], **popen):
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **popen)
        self.lines: list[str] = []
        self.url: str | None = None
        self._ready = threading.Event()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))
            m = re.search(r"running on (http://\S+)", line)
            if m:
                self.url = m.group(1)
                self._ready.set()
        self._ready.set()

    def wait_ready(self, timeout: float = 60.0) -> str:
        assert self._ready.wait(timeout), f"server did not start: {self.lines}"
        assert self.url is not None, f"server exited: {self.lines}"
        return self.url

    def exit_status(self, timeout: float = 60.0) -> int:
        """Wait for the process to end and for its output to be read."""
        status = self.proc.wait(timeout)
        self._reader.join(10)
        return status

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


def gate(srv) -> threading.Event:
    """Park the engine thread of a BackgroundServer (between steps) until the returned event is set
    (or 20 s pass)."""
    release, parked = threading.Event(), threading.Event()

    def park(engine):
        parked.set()
        release.wait(20)

    srv.state.engine.submit(park)
    assert parked.wait(10)
    return release


def wait_for(cond, timeout=10.0, what="condition"):
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)
