"""What ``r2r-rewrite`` shows while it works: on a terminal, one status line per phase on stderr with a
spinner and the seconds spent, left with the phase's time when the next begins. Nothing when stderr is not a
terminal (pipes, logs, CI) or with ``--quiet`` / ``--json``. No torch here."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any, TextIO

__all__ = ["Progress"]

_FRAMES = "|/-\\"


class Progress:
    """``phase(text)`` ends the current phase and shows the next; ``close()`` ends the last one.
    ``before_phase`` runs at every phase boundary, shown or not (the command checks for signals there)."""

    def __init__(
        self, stream: TextIO | None, interval: float = 0.2, before_phase: Callable[[], None] | None = None
    ) -> None:
        self.before_phase = before_phase
        self.stream = stream if stream is not None and _is_terminal(stream) else None
        self.interval = interval
        self.text: str | None = None
        self.start = 0.0
        self.frame = 0
        self.lock = threading.Lock()
        self.done = threading.Event()
        self.worker: threading.Thread | None = None

    def phase(self, text: str) -> None:
        if self.before_phase is not None:
            self.before_phase()
        if self.stream is None:
            return
        self.close()
        with self.lock:
            self.text, self.start, self.frame = text, time.perf_counter(), 0
            self._draw(_FRAMES[0])
        self.done = threading.Event()
        self.worker = threading.Thread(target=self._spin, args=(self.done,), name="r2r-progress", daemon=True)
        self.worker.start()

    def close(self) -> None:
        if self.worker is None:
            return
        self.done.set()
        self.worker.join()
        self.worker = None
        with self.lock:
            self._draw("done")
            self.stream.write("\n")
            self.stream.flush()

    def _spin(self, done: threading.Event) -> None:
        while not done.wait(self.interval):
            with self.lock:
                self.frame += 1
                self._draw(_FRAMES[self.frame % len(_FRAMES)])

    def _draw(self, mark: str) -> None:
        self.stream.write(f"\r\033[K{mark} {self.text} ({time.perf_counter() - self.start:.1f} s)")
        self.stream.flush()


def _is_terminal(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # closed, or not a file
        return False
