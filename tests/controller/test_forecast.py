"""The forecast policy, case by case: each case is a history, a moment and what must be held then."""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

import pytest

from kold.controller.history import DemandHistory
from kold.controller.policies.forecast import Forecast
from kold.controller.scaling import Floor


@dataclass(frozen=True)
class Spec:
    min_instances: int = 0
    max_instances: int = 8
    target_concurrency: int = 4
    idle_timeout_s: float = 60.0


DAY = 86400.0


def history(times: list[float], cold_start_s: float | None = 2.0, concurrency: int = 1, rise: int = 0) -> DemandHistory:
    """Arrivals at `times`, each seeing `concurrency` requests, `rise` fewer before the last minute."""
    h = DemandHistory()
    last_minute = int(times[-1] // 60) if times else 0
    for t in times:
        h.observe(t, concurrency if int(t // 60) == last_minute else max(1, concurrency - rise))
    if cold_start_s is not None:
        h.observe_cold_start(cold_start_s)
    return h


def periodic(period: float, n: int, start: float = 10_000.0) -> list[float]:
    return [start + i * period for i in range(n)]


def poisson(rate: float, start: float, end: float, seed: int = 1) -> list[float]:
    rng = random.Random(seed)
    t, out = start, []
    while True:
        t += rng.expovariate(rate)
        if t >= end:
            return out
        out.append(t)


@dataclass(frozen=True)
class Case:
    name: str
    times: Callable[[], list[float]]
    at: Callable[[list[float]], float]  # the moment, from the arrivals
    instances: int  # the floor's instances then
    check: Callable[[Floor, float | None, list[float]], bool] = lambda f, r, t: True
    budget: float = 120.0
    concurrency: int = 1
    rise: int = 0  # how much lower the concurrency was before the last minute


CASES = [
    Case(
        "a new function is held the budget after each call while it learns",
        lambda: [1000.0, 1400.0, 2500.0],
        lambda t: t[-1] + 100,
        1,
        lambda f, r, t: f.until == t[-1] + 120,
    ),
    Case(
        "a new function is released once the budget after its last call has passed",
        lambda: [1000.0, 1400.0, 2500.0],
        lambda t: t[-1] + 121,
        0,
    ),
    Case(
        "a strictly periodic function is released between calls and the next pre-warm is due before the call",
        lambda: periodic(300, 20),
        lambda t: t[-1] + 5,
        0,
        lambda f, r, t: r is not None and t[-1] + 290 < r < t[-1] + 300 and f.idle_timeout_s is not None,
    ),
    Case(
        "a strictly periodic function is pre-warmed before each arrival, early enough for its cold start",
        lambda: periodic(300, 20),
        lambda t: t[-1] + 300 - 3.0,  # lead: 1.2 x the 2 s cold start + 1 s
        1,
        lambda f, r, t: f.until > t[-1] + 300,
    ),
    Case(
        "a timer whose calls spread over their minute is held through the firing",
        lambda: sorted(x for i in range(20) for x in (10_000 + i * 600 + 5, 10_000 + i * 600 + 40)),
        lambda t: t[-1] - 30,  # between the firing's two calls (history holds both; moment before the last)
        1,
    ),
    Case(
        "a function that stops being called stops costing instances",
        lambda: periodic(300, 20),
        lambda t: t[-1] + 3600,
        0,
    ),
    Case(
        "a steady stream expected within the budget keeps an instance",
        lambda: poisson(1 / 20, 0, 3600),
        lambda t: t[-1] + 1,
        1,
    ),
    Case(
        "a busy function keeps its instance from its first minute on",
        lambda: poisson(2, 1000, 1030),
        lambda t: t[-1] + 0.5,
        1,
        budget=30.0,
    ),
    Case(
        "calls a second apart are worth a short keep-alive even on a small budget",
        lambda: [1000.0 + 1.5 * i for i in range(12)] + [5000.0 + 1.5 * i for i in range(12)],
        lambda t: t[-1] + 0.5,
        1,
        budget=10.0,
    ),
    Case(
        "a rare irregular function is released right after its call",
        lambda: poisson(1 / 3000, 0, 100_000, seed=3),
        lambda t: t[-1] + 5,
        0,
        lambda f, r, t: f.idle_timeout_s is not None and f.idle_timeout_s < 60,
    ),
    Case(
        "a larger budget keeps the same irregular function warm",
        lambda: poisson(1 / 300, 0, 50_000, seed=4),
        lambda t: t[-1] + 5,
        1,
        budget=2400.0,
    ),
    Case(
        "yesterday's busy hour is pre-warmed before its first call today",
        lambda: poisson(1 / 10, 9 * 3600, 10 * 3600) + poisson(1 / 4000, 10 * 3600, DAY + 8 * 3600, seed=2),
        lambda t: DAY + 9 * 3600 - 60,
        1,
    ),
    Case(
        "a rising concurrency starts the next instance a request ahead of demand",
        lambda: poisson(1, 0, 600),
        lambda t: t[-1] + 1,
        3,  # this minute's peak (10, against the last minute's 9) + 1 = 11 requests: 3 instances of 4
        concurrency=10,
        rise=1,
    ),
    Case(
        "a flat concurrency leaves scale-out to the reactive rule",
        lambda: poisson(1, 0, 600),
        lambda t: t[-1] + 1,
        1,
        concurrency=9,
    ),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_forecast(case: Case) -> None:
    times = case.times()
    at = case.at(times)
    h = history([t for t in times if t <= at], concurrency=case.concurrency, rise=case.rise)
    plan = Forecast(budget=case.budget).plan("f", h, Spec(), at)
    floor = plan.floor
    held = floor.instances if floor.holds(at) else 0
    assert held == case.instances, floor.reason
    assert floor.reason.startswith("forecast: ")
    assert case.check(floor, plan.recheck_at, [t for t in times if t <= at]), (floor, plan.recheck_at)


def test_the_same_history_gives_the_same_plan() -> None:
    times = poisson(1 / 200, 0, 40_000)
    plans = [Forecast().plan("f", history(times), Spec(), times[-1] + 7) for _ in range(2)]
    assert plans[0] == plans[1]


@pytest.mark.parametrize("bad", [{"budget": 0}, {"budget": -1}, {"default_cold_start_s": -1}])
def test_bad_knobs_are_refused(bad: dict[str, float]) -> None:
    with pytest.raises(ValueError, match=next(iter(bad))):
        Forecast(**bad)


def test_the_first_call_after_a_quiet_minute_is_not_a_rise_in_concurrency() -> None:
    """At one request per instance, a call in a new minute after a silent one must not hold a second instance."""
    times = [60.0 * m + 5 for m in range(0, 40, 2)]  # a call every other minute, alone
    h = history(times, concurrency=1)
    plan = Forecast().plan("f", h, Spec(target_concurrency=1), times[-1] + 1)
    assert plan.floor.instances <= 1, plan.floor.reason
