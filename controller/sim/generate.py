"""Azure-Functions-like days, seeded: test traces for the simulator and the pre-warm policies.

The mix follows what "Serverless in the Wild" (ATC'20) reports of Azure Functions: many functions are
timers, most invocations come from a few busy HTTP functions with a daily cycle, some come in bursts,
and a large share of functions are called only a few times a day. Kinds:
- `timer`: every 1, 5, 10, 15, 30 or 60 minutes from a random phase; half of them fire with a jitter
  of up to ten seconds either way (so a call near a minute's edge can land in the next minute);
- `http`: Poisson arrivals whose rate follows a sine over the day (peak in the afternoon, give or take),
  mean rates log-uniform from 0.02 to 10 a minute;
- `bursty`: silent for tens of minutes to hours, then a burst of a few minutes at 2-60 calls a minute;
- `rare`: a handful of calls a day at random times.

The output is the azure-functions per-minute CSV (`HashOwner,HashApp,HashFunction,Trigger,1..N`), one row
a function and one column a minute; `days` > 1 adds columns (1..1440*days), which the trace reader takes
as one long trace. Function i is drawn from its own rng (seed, i): adding functions leaves the first
ones unchanged. HashFunction is readable (`timer5m-00012`, `http-00003`) so results can be grouped by kind.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

MINUTES_PER_DAY = 1440
KINDS = ("timer", "http", "bursty", "rare")
MIX = (0.35, 0.30, 0.15, 0.20)  # share of functions of each kind
TIMER_PERIODS_MIN = (1, 5, 10, 15, 30, 60)
TIMER_WEIGHTS = (0.25, 0.25, 0.15, 0.15, 0.10, 0.10)
TRIGGERS = {"timer": "timer", "http": "http", "bursty": "queue", "rare": "http"}


@dataclass(frozen=True)
class GeneratedFunction:
    """One row of the trace: `counts[m]` calls in minute m (from 0)."""

    owner: str
    app: str
    name: str
    kind: str
    counts: np.ndarray

    @property
    def trigger(self) -> str:
        return TRIGGERS[self.kind]


def generate(functions: int, seed: int = 0, days: int = 1) -> list[GeneratedFunction]:
    """`functions` functions over `days` days of minutes (see the module docstring)."""
    if isinstance(functions, bool) or not isinstance(functions, int) or functions < 1:
        raise ValueError(f"functions: must be a whole number of at least 1 (got {functions!r})")
    if isinstance(days, bool) or not isinstance(days, int) or days < 1:
        raise ValueError(f"days: must be a whole number of at least 1 (got {days!r})")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed: must be a whole number, 0 or more (got {seed!r})")
    minutes = MINUTES_PER_DAY * days
    return [_function(np.random.default_rng([seed, i]), i, minutes) for i in range(functions)]


def _function(rng: np.random.Generator, index: int, minutes: int) -> GeneratedFunction:
    kind = KINDS[int(rng.choice(len(KINDS), p=MIX))]
    owner = f"{int(rng.integers(2**62)):016x}"
    app = f"{int(rng.integers(2**62)):016x}"
    if kind == "timer":
        period = TIMER_PERIODS_MIN[int(rng.choice(len(TIMER_PERIODS_MIN), p=TIMER_WEIGHTS))]
        jitter_s = float(rng.uniform(1.0, 10.0)) if rng.random() < 0.5 else 0.0
        counts = _timer(rng, minutes, period, jitter_s)
        name = f"timer{period}m-{index:05d}"
    elif kind == "http":
        counts = _diurnal(rng, minutes)
        name = f"http-{index:05d}"
    elif kind == "bursty":
        counts = _bursty(rng, minutes)
        name = f"bursty-{index:05d}"
    else:
        counts = _rare(rng, minutes)
        name = f"rare-{index:05d}"
    return GeneratedFunction(owner, app, name, kind, counts)


def _timer(rng: np.random.Generator, minutes: int, period_min: int, jitter_s: float) -> np.ndarray:
    period_s = 60.0 * period_min
    phase = float(rng.uniform(0.0, period_s))
    times = phase + period_s * np.arange(math.ceil(minutes * 60.0 / period_s) + 1)
    if jitter_s:
        times = times + rng.uniform(-jitter_s, jitter_s, size=times.size)
    return _bin(times, minutes)


def _diurnal(rng: np.random.Generator, minutes: int) -> np.ndarray:
    mean = math.exp(rng.uniform(math.log(0.02), math.log(10.0)))  # calls a minute
    amplitude = float(rng.uniform(0.3, 0.9))
    peak_minute = float(rng.normal(14 * 60, 3 * 60))  # the busiest minute of the day
    m = np.arange(minutes, dtype=np.float64)
    rate = mean * (1.0 + amplitude * np.cos(2 * math.pi * (m - peak_minute) / MINUTES_PER_DAY))
    # day-to-day variation: each day's level moves by ~10%
    day_level = rng.lognormal(0.0, 0.1, size=minutes // MINUTES_PER_DAY + 1)
    rate = rate * day_level[(m // MINUTES_PER_DAY).astype(np.int64)]
    return rng.poisson(rate).astype(np.int64)


def _bursty(rng: np.random.Generator, minutes: int) -> np.ndarray:
    off_mean = float(rng.uniform(30.0, 360.0))
    on_mean = float(rng.uniform(1.0, 10.0))
    burst_rate = math.exp(rng.uniform(math.log(2.0), math.log(60.0)))
    counts = np.zeros(minutes, dtype=np.int64)
    m = int(rng.uniform(0.0, off_mean))  # start somewhere in a silence
    while m < minutes:
        on = max(1, round(rng.exponential(on_mean)))
        end = min(minutes, m + on)
        counts[m:end] = rng.poisson(burst_rate, size=end - m)
        m = end + max(1, round(rng.exponential(off_mean)))
    return counts


def _rare(rng: np.random.Generator, minutes: int) -> np.ndarray:
    per_day = float(rng.uniform(1.0, 6.0))
    n = int(rng.poisson(per_day * minutes / MINUTES_PER_DAY))
    return np.bincount(rng.integers(0, minutes, size=n), minlength=minutes).astype(np.int64)


def _bin(times_s: np.ndarray, minutes: int) -> np.ndarray:
    idx = np.floor(times_s / 60.0).astype(np.int64)
    idx = idx[(idx >= 0) & (idx < minutes)]
    return np.bincount(idx, minlength=minutes).astype(np.int64)


def write_csv(path: Path, functions: Sequence[GeneratedFunction]) -> None:
    """The azure-functions per-minute CSV (the trace reader's format)."""
    if not functions:
        raise ValueError("no functions to write")
    minutes = len(functions[0].counts)
    with path.open("w", encoding="utf-8", newline="") as out:
        out.write(",".join(["HashOwner", "HashApp", "HashFunction", "Trigger", *map(str, range(1, minutes + 1))]))
        out.write("\n")
        for fn in functions:
            out.write(f"{fn.owner},{fn.app},{fn.name},{fn.trigger},")
            out.write(",".join(map(str, fn.counts.tolist())))
            out.write("\n")
