"""The baseline pre-warm policies and the registry, as sentence-labelled tables. Histories are built the
way the controller and the simulator build them: by calling DemandHistory.observe on arrivals."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import pytest

from kold.controller.history import DemandHistory
from kold.controller.policies.base import Policy
from kold.controller.policies.fixed_keepalive import FixedKeepalive
from kold.controller.policies.hybrid_histogram import HybridHistogram
from kold.controller.policies.knative_default import KnativeDefault
from kold.controller.policies.registry import (
    DEFAULT_POLICY,
    POLICIES,
    make_policy,
    parameters,
    parse_policy,
    policy_spec,
)


@dataclass(frozen=True)
class Spec:
    min_instances: int = 0
    max_instances: int = 10
    target_concurrency: int = 1
    idle_timeout_s: float = 60.0


T0 = 1_700_000_000.0  # a Unix time: the policies see wall time live


def history(gaps: Sequence[float], start: float = T0) -> DemandHistory:
    """A history whose arrivals are `start`, then one after each gap (seconds)."""
    hist = DemandHistory()
    t = start
    hist.observe(t)
    for gap in gaps:
        t += gap
        hist.observe(t)
    return hist


def last(hist: DemandHistory) -> float:
    assert hist.last_arrival is not None
    return hist.last_arrival


@dataclass(frozen=True)
class Case:
    name: str
    policy: Policy
    gaps: Sequence[float] | None  # None: no arrival yet
    after: float  # now = the last arrival + after (T0 + after with no arrival)
    instances: int
    until_after: float | None  # floor.until - last arrival; None: the floor ends now (holds nothing)
    recheck_after: float | None = None  # recheck_at - last arrival
    idle_timeout_s: float | None = None
    reason: Sequence[str] = field(default_factory=tuple)  # parts the floor's reason must contain


PERIODIC_10MIN = [600.0] * 19  # a timer: 19 idle times, all in bin 10
CHATTY = [30.0] * 19  # 19 idle times under a minute (bin 0)
MIXED = [30.0] * 95 + [1200.0] * 5  # mostly chatty, now and then a 20-minute gap

CASES = [
    # knative-default
    Case(
        "knative-default holds nothing before the first request",
        KnativeDefault(),
        None,
        0,
        0,
        None,
        reason=["no request yet"],
    ),
    Case(
        "knative-default keeps the last instance 90 s after the last request, extras after the 60 s stable window",
        KnativeDefault(),
        [5.0],
        1,
        1,
        90,
        recheck_after=90,
        idle_timeout_s=60,
        reason=["knative-default: 90 s after the last request"],
    ),
    Case(
        "knative-default lets the last instance go at 90 s",
        KnativeDefault(),
        [5.0],
        90,
        0,
        None,
        reason=["past the 90 s grace"],
    ),
    Case(
        "knative-default's grace is its knob",
        KnativeDefault(grace=300),
        [],
        200,
        1,
        300,
        recheck_after=300,
        idle_timeout_s=60,
    ),
    # fixed-keepalive
    Case("fixed-keepalive holds nothing before the first request", FixedKeepalive(), None, 0, 0, None),
    Case(
        "fixed-keepalive keeps an instance 10 minutes after the last request by default",
        FixedKeepalive(),
        [100.0, 3000.0],
        0,
        1,
        600,
        recheck_after=600,
        idle_timeout_s=600,
        reason=["fixed-keepalive: 10 min after the last request"],
    ),
    Case(
        "fixed-keepalive counts from the last request, not the first",
        FixedKeepalive(minutes=1),
        [50.0],
        55,
        1,
        60,
        recheck_after=60,
        idle_timeout_s=60,
    ),
    Case(
        "fixed-keepalive lets the instance go once the keep-alive is over",
        FixedKeepalive(minutes=5),
        [10.0],
        300,
        0,
        None,
        reason=["past the 5 min keep-alive"],
    ),
    # hybrid-histogram
    Case("hybrid-histogram holds nothing before the first request", HybridHistogram(), None, 0, 0, None),
    Case(
        "hybrid-histogram keeps 4 hours with fewer than 10 idle times",
        HybridHistogram(),
        [600.0] * 9,
        1,
        1,
        4 * 3600,
        recheck_after=4 * 3600,
        reason=["4 h keep-alive", "9 idle times, fewer than 10"],
    ),
    Case(
        "hybrid-histogram keeps 4 hours when more idle times are beyond 4 hours than inside",
        HybridHistogram(),
        [5 * 3600.0] * 6 + [600.0] * 5,
        1,
        1,
        4 * 3600,
        recheck_after=4 * 3600,
        reason=["6 of 11 idle times beyond 4 h"],
    ),
    Case(
        "hybrid-histogram's 4-hour fallback ends too",
        HybridHistogram(),
        [600.0] * 3,
        4 * 3600,
        0,
        None,
    ),
    Case(
        "hybrid-histogram uses the histogram when only a few idle times are beyond 4 hours",
        HybridHistogram(),
        [5 * 3600.0] * 3 + [600.0] * 8,
        1,
        0,
        540,
        recheck_after=540,
        idle_timeout_s=1,
    ),
    Case(
        "hybrid-histogram unloads a periodic function right after its request until the pre-warm (head 10 min less 10%)",
        HybridHistogram(),
        PERIODIC_10MIN,
        1,
        0,
        540,
        recheck_after=540,
        idle_timeout_s=1,
        reason=["unloaded", "pre-warm 9 min after the last request (p5 of 19 idle times)", "keep until 12.1 min"],
    ),
    Case(
        "hybrid-histogram pre-warms a periodic function at the head and keeps it to the tail's upper edge plus 10%",
        HybridHistogram(),
        PERIODIC_10MIN,
        540,
        1,
        726,
        recheck_after=726,
        reason=["pre-warm 9 min", "keep until 12.1 min (p99 of 19 idle times)"],
    ),
    Case(
        "hybrid-histogram releases a periodic function after the tail", HybridHistogram(), PERIODIC_10MIN, 726, 0, None
    ),
    Case(
        "hybrid-histogram keeps a chatty function alive with no unloading when the head is 0",
        HybridHistogram(),
        CHATTY,
        0,
        1,
        66,
        recheck_after=66,
        reason=["keep 66 s after the last request", "no pre-warm"],
    ),
    Case(
        "hybrid-histogram keeps until the p99 when rare long gaps are in the tail",
        HybridHistogram(),
        MIXED,
        1,
        1,
        21 * 66,
        recheck_after=21 * 66,
        reason=["keep 23.1 min", "p99 of 100 idle times"],
    ),
    Case(
        "hybrid-histogram's tail knob trades those rare gaps for less idle time",
        HybridHistogram(tail=90),
        MIXED,
        1,
        1,
        66,
        recheck_after=66,
        reason=["p90 of 100 idle times"],
    ),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_policy_plan(case: Case) -> None:
    hist = DemandHistory() if case.gaps is None else history(case.gaps)
    base = T0 if case.gaps is None else last(hist)
    now = base + case.after
    plan = case.policy.plan("fn", hist, Spec(), now)
    floor = plan.floor
    assert floor.instances == case.instances
    if case.until_after is None:
        assert floor.until == now
        assert not floor.holds(now)
        assert plan.recheck_at is None
    else:
        assert floor.until == pytest.approx(base + case.until_after)
        assert floor.holds(now)
    expected_recheck = None if case.recheck_after is None else pytest.approx(base + case.recheck_after)
    assert plan.recheck_at == expected_recheck
    assert floor.idle_timeout_s == case.idle_timeout_s
    assert floor.reason.startswith(case.policy.name + ":")
    for part in case.reason:
        assert part in floor.reason


def test_a_policy_answers_from_its_arguments_only() -> None:
    """The same history and time give the same plan, whichever came before (the simulator relies on it)."""
    policy = HybridHistogram()
    periodic, chatty = history(PERIODIC_10MIN), history(CHATTY)
    first = policy.plan("a", periodic, Spec(), last(periodic) + 1)
    policy.plan("a", chatty, Spec(), last(chatty) + 1)
    assert policy.plan("a", periodic, Spec(), last(periodic) + 1) == first


# -- the registry --


@dataclass(frozen=True)
class SpecCase:
    name: str
    text: str
    parsed: tuple[str, dict[str, float]] | None = None  # None: refused
    error: Sequence[str] = field(default_factory=tuple)  # parts the error must contain


SPEC_CASES = [
    SpecCase("a bare name takes the defaults", "fixed-keepalive", ("fixed-keepalive", {})),
    SpecCase("a knob is name:knob=value", "fixed-keepalive:minutes=5", ("fixed-keepalive", {"minutes": 5.0})),
    SpecCase(
        "spaces around the parts are ignored", " knative-default : grace = 120 ", ("knative-default", {"grace": 120.0})
    ),
    SpecCase("a fractional value is kept", "hybrid-histogram:tail=99.5", ("hybrid-histogram", {"tail": 99.5})),
    SpecCase("the default policy is registered", DEFAULT_POLICY, (DEFAULT_POLICY, {})),
    SpecCase("an empty spec is refused", "", error=["unknown prewarm policy ''", "fixed-keepalive", "forecast"]),
    SpecCase(
        "an unknown policy is refused, listing the known ones",
        "lambda:minutes=5",
        error=["unknown prewarm policy 'lambda'", "forecast, hybrid-histogram, knative-default"],
    ),
    SpecCase(
        "an unknown knob is refused, listing the policy's parameters",
        "fixed-keepalive:seconds=5",
        error=["no parameter 'seconds'", "it takes: minutes"],
    ),
    SpecCase(
        "a knob of another policy is refused", "knative-default:minutes=5", error=["no parameter 'minutes'", "grace"]
    ),
    SpecCase(
        "a value that is not a number is refused",
        "fixed-keepalive:minutes=ten",
        error=["minutes='ten' is not a number"],
    ),
    SpecCase("an empty value is refused", "fixed-keepalive:minutes=", error=["is not a number"]),
    SpecCase("NaN is refused", "fixed-keepalive:minutes=nan", error=["not a finite number"]),
    SpecCase("infinity is refused", "knative-default:grace=inf", error=["not a finite number"]),
    SpecCase("a negative value is refused", "fixed-keepalive:minutes=-1", error=["minutes must not be negative"]),
    SpecCase("a knob without a value is refused", "fixed-keepalive:minutes", error=["'minutes' is not knob=value"]),
    SpecCase("a colon with nothing after it is refused", "fixed-keepalive:", error=["nothing after ':'"]),
    SpecCase(
        "a knob given twice is refused", "fixed-keepalive:minutes=1,minutes=2", error=["'minutes' is given twice"]
    ),
    SpecCase(
        "a value the policy itself refuses is refused",
        "hybrid-histogram:tail=3",
        error=["tail must be a percentile above 5"],
    ),
    SpecCase("a percentile above 100 is refused", "hybrid-histogram:tail=101", error=["at most 100"]),
]


@pytest.mark.parametrize("case", SPEC_CASES, ids=lambda c: c.name)
def test_parse_policy(case: SpecCase) -> None:
    if case.parsed is not None:
        assert parse_policy(case.text) == case.parsed
        return
    with pytest.raises(ValueError) as info:
        parse_policy(case.text)
    for part in case.error:
        assert part in str(info.value)
    with pytest.raises(ValueError):
        make_policy(case.text)


def test_make_policy_sets_the_knob() -> None:
    policy = make_policy("fixed-keepalive:minutes=5")
    assert isinstance(policy, FixedKeepalive)
    hist = history([])
    assert policy.plan("fn", hist, Spec(), last(hist)).floor.until == last(hist) + 300


@pytest.mark.parametrize(
    ("name", "params", "text"),
    [
        ("fixed-keepalive", {"minutes": 5}, "fixed-keepalive:minutes=5"),
        ("fixed-keepalive", {"minutes": 5.0}, "fixed-keepalive:minutes=5"),
        ("hybrid-histogram", {"tail": 99.5}, "hybrid-histogram:tail=99.5"),
        ("knative-default", {"grace": 0.1}, "knative-default:grace=0.1"),
        ("forecast", {}, "forecast"),
    ],
)
def test_policy_spec_is_parse_policys_inverse(name: str, params: dict[str, Any], text: str) -> None:
    assert policy_spec(name, **params) == text
    assert parse_policy(text) == (name, {k: float(v) for k, v in params.items()})


@pytest.mark.parametrize(
    ("name", "params"),
    [
        ("lambda", {}),
        ("fixed-keepalive", {"seconds": 5}),
        ("fixed-keepalive", {"minutes": -1}),
        ("fixed-keepalive", {"minutes": float("inf")}),
    ],
)
def test_policy_spec_refuses_what_parse_refuses(name: str, params: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        policy_spec(name, **params)


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_every_policy_sweeps_its_knob(name: str) -> None:
    """What `kold sim --pareto` does: each knob value becomes a spec that makes a policy of that name."""
    cls = POLICIES[name]
    assert cls.name == name
    assert cls.knob in parameters(cls)
    assert len(cls.knob_values) >= 3
    for value in cls.knob_values:
        policy = make_policy(policy_spec(name, **{cls.knob: value}))
        assert type(policy) is cls
        assert getattr(policy, cls.knob) == value
