"""How far a long operation is, on one terminal line redrawn in place.

    bar = ProgressLine("creating VFs")
    for i in range(n):
        ...
        bar.update(i + 1, n)          # "creating VFs: 120/504 (23%)"
    bar.close()

On a stream that is not a terminal it writes nothing at all: a log file or
a pipe gets the operation's result, not its progress.
"""
from __future__ import annotations

import sys
from typing import TextIO


class ProgressLine:
    def __init__(self, label: str, stream: TextIO | None = None):
        self.label = label
        self.stream = sys.stderr if stream is None else stream
        self.active = bool(getattr(self.stream, "isatty", lambda: False)())
        self._width = 0               # of the text drawn last, to blank what a shorter one leaves

    def _draw(self, text: str) -> None:
        if not self.active:
            return
        line = f"{self.label}: {text}"
        self.stream.write("\r" + line.ljust(self._width))
        self.stream.flush()
        self._width = len(line)

    def update(self, done: int, total: int) -> None:
        pct = f" ({100 * done // total}%)" if total else ""
        self._draw(f"{done}/{total}{pct}")

    def step(self, text: str) -> None:
        """A phase of an operation that has no count."""
        self._draw(text)

    def close(self) -> None:
        """End the line (if one was drawn), so what follows starts clean."""
        if self.active and self._width:
            self.stream.write("\r" + " " * self._width + "\r")
            self.stream.flush()
        self._width = 0
