"""The live display shows the runner's counts, and starts and stops around a run."""

from __future__ import annotations

import io
import time

from rich.console import Console

from kold.loadgen.progress import Progress
from kold.loadgen.runner import LiveCounts


def counts() -> LiveCounts:
    live = LiveCounts(planned=50, sent=42, done=37, errors=3, cold=2, started=time.perf_counter() - 3.0)
    live.lags.extend([0.001] * 99 + [0.5])
    return live


def test_render_shows_every_count() -> None:
    out = io.StringIO()
    console = Console(file=out, width=150, color_system=None)
    console.print(Progress(counts(), label="open loop -> http://gw/v1", console=console).render())
    text = out.getvalue()
    assert "open loop -> http://gw/v1" in text
    for name in ("sent", "done", "errors", "in flight", "cold starts", "lag p99"):
        assert name in text
    row = text.splitlines()[-1].split()
    assert row[0].startswith("3.") and row[1] == "s"  # elapsed
    assert row[2:7] == ["42/50", "37", "3", "5", "2"]  # sent/planned, done, errors, in flight, cold starts
    assert row[7:] == ["6.0", "ms"]  # p99 of 99 x 1 ms and one 500 ms: 1 + 499 x 0.01


def test_start_and_stop_leave_the_last_state_on_screen() -> None:
    out = io.StringIO()
    live = counts()
    with Progress(live, console=Console(file=out, width=150, color_system=None, force_terminal=True)):
        live.done = 42
    last_frame = out.getvalue().rsplit("42/50", 1)[1]
    assert last_frame.split()[0] == "42"  # done, as it was at stop (37 when started)


def test_no_lag_yet() -> None:
    out = io.StringIO()
    console = Console(file=out, width=150, color_system=None)
    console.print(Progress(LiveCounts(planned=5), console=console).render())
    assert "-" in out.getvalue().splitlines()[-1] and "0/5" in out.getvalue()
