"""A function's demand history: the compact aggregates the pre-warm policies decide from.

Pure and bounded: the live controller folds Redis's invocation records into it (controller/demand.py)
and the simulator folds its arrivals into the same class, so a policy sees the same history either way.
- per-minute arrival counts and concurrency peaks, for the last RING_MINUTES minutes (sparse: a rarely
  called function costs a few entries, not a day of zeros);
- the idle-time histogram: gaps between arrivals in 1-minute bins up to 4 hours, and a count of the
  longer ones ("Serverless in the Wild", ATC'20);
- the last RECENT arrival times exactly, for periods shorter than a minute's resolution can show;
- the measured cost of a cold start (an exponentially weighted mean of the starts seen).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any

RING_MINUTES = 3 * 1440  # three days: enough to see yesterday's same hour twice
IDLE_BINS = 240  # 1-minute bins: 4 hours, as ATC'20's histogram
RECENT = 64
COLD_START_ALPHA = 0.3  # a new measurement's weight: follows a tier change within a few starts


@dataclass
class DemandHistory:
    """Aggregates of one function's arrivals (Unix seconds, or simulated seconds: only differences and
    minute boundaries matter)."""

    counts: dict[int, int] = field(default_factory=dict)  # minute index (t // 60) -> arrivals
    peaks: dict[int, int] = field(default_factory=dict)  # minute index -> highest concurrency seen
    idle_bins: list[int] = field(default_factory=lambda: [0] * IDLE_BINS)
    idle_over: int = 0  # idle times of 4 hours or more
    recent: deque[float] = field(default_factory=lambda: deque(maxlen=RECENT))
    first_arrival: float | None = None
    last_arrival: float | None = None
    arrivals: int = 0
    cold_start_s: float | None = None
    cold_starts: int = 0
    _low_minute: int = 0  # counts below this minute have been pruned

    def observe(self, arrival: float, concurrency: int = 1) -> None:
        """One arrival. Out-of-order ones (records from several gateways) count but do not make a gap."""
        last = self.last_arrival
        if last is None or arrival >= last:
            if last is not None:
                gap_bin = int((arrival - last) // 60)
                if gap_bin < IDLE_BINS:
                    self.idle_bins[gap_bin] += 1
                else:
                    self.idle_over += 1
            self.last_arrival = arrival
            self.recent.append(arrival)
        if self.first_arrival is None or arrival < self.first_arrival:
            self.first_arrival = arrival
        self.arrivals += 1
        minute = int(arrival // 60)
        if minute < self._low_minute:
            return
        self.counts[minute] = self.counts.get(minute, 0) + 1
        if concurrency > self.peaks.get(minute, 0):
            self.peaks[minute] = concurrency
        if minute - RING_MINUTES >= self._low_minute + 60:  # prune an hour at a time
            self._prune(minute - RING_MINUTES)

    def observe_cold_start(self, seconds: float) -> None:
        if seconds < 0:
            return
        self.cold_starts += 1
        prev = self.cold_start_s
        self.cold_start_s = seconds if prev is None else prev + COLD_START_ALPHA * (seconds - prev)

    def _prune(self, low: int) -> None:
        self._low_minute = low
        for table in (self.counts, self.peaks):
            for minute in [m for m in table if m < low]:
                del table[minute]

    # -- reading --

    @property
    def idle_times(self) -> int:
        return sum(self.idle_bins) + self.idle_over

    def idle_percentile(self, q: float) -> int | None:
        """The bin (whole minutes) at percentile q (0..100) of the idle times, the out-of-range ones
        counted above every bin (IDLE_BINS when q falls among them); None without idle times."""
        total = self.idle_times
        if total == 0:
            return None
        rank = q / 100 * total
        seen = 0
        for minute, n in enumerate(self.idle_bins):
            seen += n
            if seen >= rank and n:
                return minute
        return IDLE_BINS

    def count(self, minute: int) -> int:
        return self.counts.get(minute, 0)

    def peak(self, minute: int) -> int:
        return self.peaks.get(minute, 0)

    # -- storage (JSON in Redis) --

    def to_dict(self) -> dict[str, Any]:
        return {
            "counts": {str(k): v for k, v in self.counts.items()},
            "peaks": {str(k): v for k, v in self.peaks.items()},
            "idle_bins": {str(i): n for i, n in enumerate(self.idle_bins) if n},
            "idle_over": self.idle_over,
            "recent": list(self.recent),
            "first_arrival": self.first_arrival,
            "last_arrival": self.last_arrival,
            "arrivals": self.arrivals,
            "cold_start_s": self.cold_start_s,
            "cold_starts": self.cold_starts,
            "low_minute": self._low_minute,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DemandHistory:
        bins = [0] * IDLE_BINS
        for i, n in data.get("idle_bins", {}).items():
            if 0 <= int(i) < IDLE_BINS:
                bins[int(i)] = int(n)
        hist = cls(
            counts={int(k): int(v) for k, v in data.get("counts", {}).items()},
            peaks={int(k): int(v) for k, v in data.get("peaks", {}).items()},
            idle_bins=bins,
            idle_over=int(data.get("idle_over", 0)),
            recent=deque((float(t) for t in data.get("recent", [])), maxlen=RECENT),
            first_arrival=_opt_float(data.get("first_arrival")),
            last_arrival=_opt_float(data.get("last_arrival")),
            arrivals=int(data.get("arrivals", 0)),
            cold_start_s=_opt_float(data.get("cold_start_s")),
            cold_starts=int(data.get("cold_starts", 0)),
        )
        hist._low_minute = int(data.get("low_minute", 0))
        return hist


def _opt_float(value: Any) -> float | None:
    return None if value is None else float(value)
