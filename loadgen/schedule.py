"""Synthetic traffic: when each request of a run is sent, to which function, and how big it is.

A plan is computed in full before the run starts (`plan`), so the send loop only sleeps until each
`at_s`: the schedule cannot bend to the server's speed (open loop), and the same seed gives the same
plan. The arrival processes:

- `constant`: one request every 1/rate s, the first at 0.
- `poisson`: exponential gaps of mean 1/rate (a Poisson process started at 0: the first request comes
  one random gap in, not at 0).
- `gamma`: gamma-distributed gaps, as vLLM's `--burstiness`: shape = burstiness, scale = 1/(rate *
  burstiness), so the mean rate stays `rate` and the gaps' coefficient of variation is 1/sqrt(burstiness):
  1 is Poisson, below 1 burstier, above 1 more regular.
- `onoff`: Poisson at `rate` during bursts of `on_s` seconds, silence for `off_s` seconds between them
  (a burst first).
- `diurnal`: a Poisson process whose rate is rate * (1 + amplitude * sin(2 pi t / period_s)), drawn by
  thinning a Poisson process at the peak rate.
- `ramp`: a Poisson process whose rate goes linearly from `rate` at 0 to `rate_to` at `duration_s`
  (thinning again).
- `sweep`: stages back to back, stage i a Poisson process (gamma with `burstiness`) at `rates[i]` for
  `stage_s` seconds, its requests tagged `stage=i`. The runner decides when the target has saturated
  and stops there; the plan holds every stage.

Every pattern but `sweep` is bounded by `duration_s` (requests sent before it), `count` (that many
requests) or both (whichever comes first); `ramp` needs `duration_s`, which sets its slope.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, fields

from kold.controller.records import Arrival

from .shapes import Shape

PATTERNS = ("constant", "poisson", "gamma", "onoff", "diurnal", "ramp", "sweep")

# A typo in a rate or a duration must not fill memory: a plan is a list held for the whole run
# (5 M requests is over four hours at 300 req/s).
MAX_REQUESTS = 5_000_000

DEFAULT_AMPLITUDE = 0.5  # diurnal: the rate swings from half to one and a half times `rate`

# The fields each pattern reads; setting another one is a mistake worth an error (a `--rate-to` given to
# `poisson` would otherwise be silently ignored).
_OWN_FIELDS = {
    "constant": {"rate"},
    "poisson": {"rate"},
    "gamma": {"rate", "burstiness"},
    "onoff": {"rate", "on_s", "off_s"},
    "diurnal": {"rate", "period_s", "amplitude"},
    "ramp": {"rate", "rate_to"},
    "sweep": {"rates", "stage_s", "burstiness"},
}
_BOUNDS = {"duration_s", "count"}


@dataclass(frozen=True)
class PlannedRequest:
    at_s: float  # when to send, seconds from the run's start
    function: str  # target function/model name ("" when the target has one model)
    prompt_tokens: int  # target prompt length in tokens
    max_tokens: int
    ignore_eos: bool = False  # True for trace replay (output lengths reproduced)
    stage: int = 0  # sweep stage index (0 otherwise)

    def arrival(self, sized: bool = True) -> Arrival:
        """This request as the shared record type the simulator replays (`sized`: with its token counts)."""
        if sized:
            return Arrival(self.function, self.at_s, self.prompt_tokens, self.max_tokens)
        return Arrival(self.function, self.at_s)


@dataclass(frozen=True)
class PatternSpec:
    """A synthetic arrival pattern (see the module docstring); checked when built, ValueError naming the field."""

    pattern: str
    rate: float | None = None  # requests/s (the mean, the burst rate for onoff, the start for ramp)
    duration_s: float | None = None
    count: int | None = None  # number of requests
    burstiness: float | None = None  # gamma and sweep; None = 1 (Poisson)
    on_s: float | None = None  # onoff
    off_s: float | None = None  # onoff
    period_s: float | None = None  # diurnal
    amplitude: float | None = None  # diurnal, 0..1 of rate; None = DEFAULT_AMPLITUDE
    rate_to: float | None = None  # ramp: the rate at duration_s
    rates: Sequence[float] = ()  # sweep: requests/s of each stage (kept as a tuple: the spec stays hashable)
    stage_s: float | None = None  # sweep: how long each stage lasts

    def __post_init__(self) -> None:
        object.__setattr__(self, "rates", tuple(self.rates))  # a caller's list would make the spec unhashable
        self._validate()

    def _validate(self) -> None:
        if self.pattern not in PATTERNS:
            raise ValueError(f"pattern: unknown pattern {self.pattern!r} (one of {', '.join(PATTERNS)})")
        own = _OWN_FIELDS[self.pattern] | (set() if self.pattern == "sweep" else _BOUNDS)
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name != "pattern" and f.name not in own and value not in (None, ()):
                raise ValueError(f"{f.name}: does not apply to the {self.pattern} pattern")
        for name in (
            "rate",
            "duration_s",
            "burstiness",
            "on_s",
            "off_s",
            "period_s",
            "amplitude",
            "rate_to",
            "stage_s",
        ):
            _check_number(name, getattr(self, name))
        for rate in self.rates:
            _check_number("rates", rate)

        if self.pattern == "sweep":
            if not self.rates:
                raise ValueError("rates: sweep needs at least one rate")
            if any(r <= 0 for r in self.rates):
                raise ValueError(f"rates: every rate must be above 0 (got {list(self.rates)})")
            _require_positive("stage_s", self.stage_s, "sweep")
        else:
            if self.pattern == "ramp":
                start = _require("rate", self.rate, "ramp")
                end = _require("rate_to", self.rate_to, "ramp")
                if start < 0 or end < 0 or max(start, end) <= 0:
                    raise ValueError(f"rate, rate_to: must not be negative, nor both 0 (got {start}, {end})")
                if self.duration_s is None:
                    raise ValueError("duration_s: ramp needs a duration (it sets the slope from rate to rate_to)")
            else:
                _require_positive("rate", self.rate, self.pattern)
            if self.duration_s is None and self.count is None:
                raise ValueError(f"duration_s, count: {self.pattern} needs a duration or a request count")
            if self.duration_s is not None and self.duration_s <= 0:
                raise ValueError(f"duration_s: must be above 0 (got {self.duration_s})")
            if self.count is not None and (isinstance(self.count, bool) or not isinstance(self.count, int)):
                raise ValueError(f"count: must be a whole number (got {self.count!r})")
            if self.count is not None and self.count < 1:
                raise ValueError(f"count: must be at least 1 (got {self.count})")
        if self.burstiness is not None and self.burstiness <= 0:
            raise ValueError(f"burstiness: must be above 0 (got {self.burstiness})")
        if self.pattern == "onoff":
            _require_positive("on_s", self.on_s, "onoff")
            if _require("off_s", self.off_s, "onoff") < 0:
                raise ValueError(f"off_s: must not be negative (got {self.off_s})")
        if self.pattern == "diurnal":
            _require_positive("period_s", self.period_s, "diurnal")
            if self.amplitude is not None and not 0 <= self.amplitude <= 1:
                raise ValueError(f"amplitude: must be between 0 and 1 (got {self.amplitude})")
        expected = self.expected_requests()
        if expected > MAX_REQUESTS:
            raise ValueError(
                f"duration_s, count: this plan would hold about {expected:.3g} requests, more than {MAX_REQUESTS:,}"
            )

    def expected_requests(self) -> float:
        """About how many requests the plan will hold (the mean for the random patterns)."""
        if self.pattern == "sweep":
            return sum(self.rates) * (self.stage_s or 0)
        by_time = math.inf
        if self.duration_s is not None:
            rate = self.rate or 0
            if self.pattern == "ramp":
                rate = (rate + (self.rate_to or 0)) / 2
            elif self.pattern == "onoff":
                rate = rate * (self.on_s or 0) / ((self.on_s or 0) + (self.off_s or 0))
            by_time = rate * self.duration_s
        return min(by_time, math.inf if self.count is None else self.count)


def _check_number(name: str, value: object) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"{name}: must be a finite number (got {value!r})")


def _require(name: str, value: float | None, pattern: str) -> float:
    if value is None:
        raise ValueError(f"{name}: the {pattern} pattern needs it")
    return value


def _require_positive(name: str, value: float | None, pattern: str) -> None:
    if _require(name, value, pattern) <= 0:
        raise ValueError(f"{name}: must be above 0 (got {value})")


# -- arrival processes: each yields (time, stage) in increasing time, without end --------------------


def _renewal(rng: random.Random, rate: float, burstiness: float) -> Iterator[float]:
    """Arrival times of a renewal process of mean rate `rate`: exponential gaps at burstiness 1, else gamma."""
    t = 0.0
    while True:
        if burstiness == 1.0:
            t += rng.expovariate(rate)
        else:
            t += rng.gammavariate(burstiness, 1.0 / (rate * burstiness))
        yield t


def _thinned(rng: random.Random, peak: float, rate_at: Callable[[float], float], end: float) -> Iterator[float]:
    """An inhomogeneous Poisson process of rate rate_at(t) <= peak on [0, end) (Lewis and Shedler's thinning):
    candidates at the peak rate, each kept with probability rate_at(t) / peak. It stops at `end` rather than
    wait for an acceptance that a rate of 0 (a ramp down to 0) would never give."""
    for t in _renewal(rng, peak, 1.0):
        if t >= end:
            return
        if rng.random() * peak < rate_at(t):
            yield t


def _arrivals(spec: PatternSpec, rng: random.Random) -> Iterator[tuple[float, int]]:
    rate = spec.rate or 0.0
    burstiness = 1.0 if spec.burstiness is None else spec.burstiness
    if spec.pattern == "constant":
        k = 0
        while True:
            yield k / rate, 0
            k += 1
    elif spec.pattern in ("poisson", "gamma"):
        for t in _renewal(rng, rate, burstiness if spec.pattern == "gamma" else 1.0):
            yield t, 0
    elif spec.pattern == "onoff":
        on, off = spec.on_s or 0.0, spec.off_s or 0.0
        for t_on in _renewal(rng, rate, 1.0):  # time counted only while a burst is on, then laid out
            burst = math.floor(t_on / on)
            yield burst * (on + off) + (t_on - burst * on), 0
    elif spec.pattern == "diurnal":
        amplitude = DEFAULT_AMPLITUDE if spec.amplitude is None else spec.amplitude
        period = spec.period_s or 1.0
        until = math.inf if spec.duration_s is None else spec.duration_s
        for t in _thinned(
            rng, rate * (1 + amplitude), lambda t: rate * (1 + amplitude * math.sin(2 * math.pi * t / period)), until
        ):
            yield t, 0
    elif spec.pattern == "ramp":
        rate_to, duration = spec.rate_to or 0.0, spec.duration_s or 1.0
        for t in _thinned(rng, max(rate, rate_to), lambda t: rate + (rate_to - rate) * t / duration, duration):
            yield t, 0
    elif spec.pattern == "sweep":
        stage_s = spec.stage_s or 0.0
        for stage, stage_rate in enumerate(spec.rates):
            begin = stage * stage_s
            for t in _renewal(rng, stage_rate, burstiness):
                if t >= stage_s:
                    break
                yield begin + t, stage
    else:  # pragma: no cover - _validate rejects unknown patterns
        raise ValueError(f"pattern: unknown pattern {spec.pattern!r}")


def plan(spec: PatternSpec, functions: Sequence[str], prompt: Shape, output: Shape, seed: int) -> list[PlannedRequest]:
    """Every request of a synthetic run, sorted by `at_s`, functions dealt round-robin in that order ("" when
    `functions` is empty). Arrival times, prompt lengths and output lengths each come from their own rng
    derived from `seed`, so changing a shape does not move the arrivals."""
    names = list(functions) or [""]
    arrivals_rng = random.Random(f"{seed}/arrivals")
    prompt_rng = random.Random(f"{seed}/prompt")
    output_rng = random.Random(f"{seed}/output")
    duration = math.inf if spec.duration_s is None else spec.duration_s
    count = spec.count if spec.count is not None else MAX_REQUESTS
    out: list[PlannedRequest] = []
    for at_s, stage in _arrivals(spec, arrivals_rng):
        if at_s >= duration or len(out) >= count:
            break
        out.append(
            PlannedRequest(
                at_s=at_s,
                function=names[len(out) % len(names)],
                prompt_tokens=prompt.draw(prompt_rng),
                max_tokens=output.draw(output_rng),
                stage=stage,
            )
        )
    return out
