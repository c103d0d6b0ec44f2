"""A one-line stderr progress bar (the converter, weight loading): tensors done and bytes."""

from __future__ import annotations

import sys
import time


def _unit(total: int) -> tuple[float, str]:
    return (1e9, "GB") if total >= 1e9 else (1e6, "MB")


class Progress:
    """`update(nbytes)` per chunk written, `tensor_done()` per tensor, `close()` at the end.

    NOTE: redraws at most every `interval` seconds (and on tensor boundaries at the end), so a
    conversion of thousands of tensors does not spend its time writing to a terminal or a log file.
    """

    def __init__(self, total_tensors: int, total_bytes: int, enabled: bool = True,
                 stream=None, width: int = 30, interval: float = 0.2, label: str = "converting"):
        self.total_tensors, self.total_bytes, self.label = total_tensors, total_bytes, label
        self.tensors = self.bytes = 0
        self.enabled, self.stream, self.width, self.interval = enabled, stream or sys.stderr, width, interval
        self.last_draw = 0.0
        self.drawn = False

    def update(self, nbytes: int) -> None:
        self.bytes += nbytes
        self._maybe_draw()

    def tensor_done(self) -> None:
        self.tensors += 1
        self._maybe_draw()

    def close(self) -> None:
        if self.enabled and self.drawn:
            self._draw()
            self.stream.write("\n")
            self.stream.flush()

    def _maybe_draw(self) -> None:
        now = time.monotonic()
        if self.enabled and (now - self.last_draw >= self.interval or not self.drawn):
            self.last_draw = now
            self._draw()

    def _draw(self) -> None:
        done = self.bytes / self.total_bytes if self.total_bytes else 1.0
        filled = int(round(done * self.width))
        bar = "#" * filled + "." * (self.width - filled)
        scale, unit = _unit(self.total_bytes)
        self.stream.write(f"\r{self.label} [{bar}] {self.tensors}/{self.total_tensors} tensors "
                          f"{self.bytes / scale:.2f}/{self.total_bytes / scale:.2f} {unit}")
        self.stream.flush()
        self.drawn = True
