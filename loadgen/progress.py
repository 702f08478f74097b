"""The live progress display of a run (rich): sent, done, errors, in flight, cold starts, lag.

It reads the runner's LiveCounts from rich's refresh thread a couple of times a second and does nothing
per request, so that watching a run does not slow it: the lag p99 shown is over the latest requests
only (sorting every lag twice a second would cost the event loop its time on a long run).
"""

from __future__ import annotations

import time
from types import TracebackType

from rich.console import Console
from rich.live import Live
from rich.table import Table

from kold.loadgen.runner import LIVE_LAG_WINDOW, LiveCounts


class Progress:
    """`with Progress(counts): await run(..., live=counts)`, or start()/stop() around it."""

    def __init__(
        self, counts: LiveCounts, *, label: str = "", console: Console | None = None, refresh_per_second: float = 2
    ) -> None:
        self.counts = counts
        self.label = label  # e.g. the target and the run's mode
        self._live = Live(
            console=console,
            get_renderable=self.render,
            refresh_per_second=refresh_per_second,
            transient=False,
        )

    def render(self) -> Table:
        """The current counts as one table row."""
        c = self.counts
        table = Table(title=self.label or None, title_justify="left", box=None, pad_edge=False)
        for name in (
            "elapsed",
            "sent",
            "done",
            "errors",
            "in flight",
            "cold starts",
            f"lag p99 (last {LIVE_LAG_WINDOW})",
        ):
            table.add_column(name, justify="right")
        elapsed = time.perf_counter() - c.started if c.started is not None else 0.0
        lag = c.lag_p99()
        table.add_row(
            f"{elapsed:.1f} s",
            f"{c.sent}/{c.planned}",
            str(c.done),
            f"[red]{c.errors}[/red]" if c.errors else "0",
            str(c.in_flight),
            str(c.cold),
            "-" if lag is None else f"{lag * 1000:.1f} ms",
        )
        return table

    def start(self) -> None:
        self._live.start()

    def stop(self) -> None:
        """Stop, leaving the last display on screen."""
        self._live.refresh()
        self._live.stop()

    def __enter__(self) -> Progress:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
