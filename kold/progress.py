"""Progress bars for long CLI work (tqdm on a terminal, periodic lines otherwise)."""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable
from types import TracebackType
from typing import Any

from tqdm import tqdm


class ByteProgress:
    """A context manager that renders (phase, done, total) callbacks as one bar per phase."""

    def __init__(self, label: str, *, interval_s: float = 2.0) -> None:
        self.label = label
        self._bar: tqdm[Any] | None = None
        self._phase = ""
        self._interval = interval_s
        self._last_line = 0.0
        self._tty = sys.stderr.isatty()

    def __call__(self, phase: str, done: int, total: int) -> None:
        if self._tty:
            if phase != self._phase:
                self._close_bar()
                self._phase = phase
                self._bar = tqdm(total=total, unit="B", unit_scale=True, desc=f"{self.label}: {phase}", leave=False)
            assert self._bar is not None
            self._bar.update(done - self._bar.n)
        else:
            now = time.monotonic()
            if phase != self._phase or done >= total or now - self._last_line >= self._interval:
                self._phase = phase
                self._last_line = now
                pct = 100.0 * done / total if total else 100.0
                print(f"{self.label}: {phase} {done / 1e6:,.1f}/{total / 1e6:,.1f} MB ({pct:.0f}%)", file=sys.stderr)

    def _close_bar(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> ByteProgress:
        return self

    def __exit__(self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self._close_bar()


def chunk_counter(progress: ByteProgress, phase: str, total: int) -> Callable[[object], None]:
    """An `on_chunk` callback for restores that feeds a ByteProgress."""
    done = [0]
    lock = threading.Lock()  # reader threads call this concurrently

    def on_chunk(chunk: object) -> None:
        with lock:
            done[0] += int(getattr(chunk, "size", 0))
            progress(phase, done[0], total)

    return on_chunk
