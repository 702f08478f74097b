"""The scaling decider, as sentence-labelled tables (Knative's autoscaler_test.go style): each case is
one rule of scaling.decide, stated as the sentence its name is."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from kold.controller.scaling import (
    DRAINING,
    READY,
    STARTING,
    Decision,
    Floor,
    InstanceView,
    NoData,
    Observed,
    decide,
)


@dataclass(frozen=True)
class Spec:
    min_instances: int = 0
    max_instances: int = 10
    target_concurrency: int = 1
    idle_timeout_s: float = 60.0


def ready(id: str, idle_since: float | None = None, in_flight: int = 0) -> InstanceView:
    return InstanceView(id, READY, in_flight=in_flight, idle_since=idle_since)


def busy(id: str, in_flight: int = 1) -> InstanceView:
    return InstanceView(id, READY, in_flight=in_flight, idle_since=None)


def starting(id: str) -> InstanceView:
    return InstanceView(id, STARTING)


@dataclass(frozen=True)
class Case:
    name: str
    observed: Observed | None
    now: float
    desired: int
    start: int = 0
    stop: tuple[str, ...] = ()
    next_at: float | None = None
    spec: Spec = Spec()
    floor: Floor | None = None
    reason: str = ""  # a part the decision's reason must contain


CASES = [
    Case(
        "scales to zero after idle_timeout",
        Observed([ready("a", idle_since=0)]),
        now=60,
        desired=0,
        stop=("a",),
    ),
    Case(
        "keeps an instance idle for less than idle_timeout, and says when it expires",
        Observed([ready("a", idle_since=0)]),
        now=59,
        desired=0,
        next_at=60,
    ),
    Case(
        "does not scale to zero after idle_timeout while a floor holds it",
        Observed([ready("a", idle_since=0)]),
        now=100,
        desired=1,
        floor=Floor(1, until=200, reason="pre-warm"),
        next_at=200,
        reason="floor 1: pre-warm",
    ),
    Case(
        "a floor expires at its until and the idle instance goes",
        Observed([ready("a", idle_since=0)]),
        now=200,
        desired=0,
        floor=Floor(1, until=200, reason="pre-warm"),
        stop=("a",),
    ),
    Case(
        "a floor starts the instances it asks for from zero",
        Observed([]),
        now=0,
        desired=2,
        start=2,
        floor=Floor(2, until=300, reason="predicted burst"),
        next_at=300,
    ),
    Case(
        "a floor's idle timeout replaces the spec's while it holds",
        Observed([ready("a", idle_since=0), ready("b", idle_since=5)]),
        now=20,
        desired=1,
        floor=Floor(1, until=300, reason="keep one", idle_timeout_s=10),
        stop=("a",),
        next_at=300,
        reason="idle 10 s",
    ),
    Case(
        "a floor of zero with a short idle timeout releases an instance sooner than the spec",
        Observed([ready("a", idle_since=0)]),
        now=2,
        desired=0,
        floor=Floor(0, until=300, reason="unload", idle_timeout_s=1),
        stop=("a",),
        next_at=300,
    ),
    Case(
        "an expired floor's idle timeout no longer applies",
        Observed([ready("a", idle_since=0), ready("b", idle_since=5)]),
        now=20,
        desired=0,
        floor=Floor(1, until=15, reason="keep one", idle_timeout_s=10),
        next_at=60,
    ),
    Case(
        "a burst starts as many instances as its concurrency needs",
        Observed([], waiting=10),
        now=0,
        desired=3,
        start=3,
        spec=Spec(target_concurrency=4),
        reason="load 10 at target 4",
    ),
    Case(
        "a burst on a running instance starts only the missing ones",
        Observed([busy("a", in_flight=4)], waiting=5),
        now=0,
        desired=3,
        start=2,
        spec=Spec(target_concurrency=4),
    ),
    Case(
        "never above max_instances under load",
        Observed([], waiting=50),
        now=0,
        desired=2,
        start=2,
        spec=Spec(max_instances=2),
        reason="max_instances 2",
    ),
    Case(
        "never above max_instances even under a floor",
        Observed([ready("a", idle_since=0)]),
        now=10,
        desired=2,
        start=1,
        spec=Spec(max_instances=2),
        floor=Floor(5, until=100, reason="predicted burst"),
        next_at=100,
    ),
    Case(
        "no instance is stopped while the function has a backlog",
        Observed([busy("a"), ready("b", idle_since=0)], waiting=1),
        now=1000,
        desired=2,
    ),
    Case(
        "an idle instance above the load is stopped while another is busy",
        Observed([busy("a"), ready("b", idle_since=0)]),
        now=1000,
        desired=1,
        stop=("b",),
    ),
    Case(
        "the longest-idle instance goes first",
        Observed([ready("new", idle_since=30), ready("old", idle_since=0), ready("mid", idle_since=10)]),
        now=200,
        desired=1,
        floor=Floor(1, until=300, reason="keep one"),
        stop=("old", "mid"),
        next_at=300,
    ),
    Case(
        "instances idle since the same moment go in id order",
        Observed([ready("b", idle_since=0), ready("a", idle_since=0)]),
        now=200,
        desired=1,
        floor=Floor(1, until=300, reason="keep one"),
        stop=("a",),
        next_at=300,
    ),
    Case(
        "a starting instance is never stopped",
        Observed([starting("s")]),
        now=1000,
        desired=0,
    ),
    Case(
        "a draining instance neither counts as live nor is stopped again",
        Observed([InstanceView("d", DRAINING, idle_since=0)]),
        now=1000,
        desired=1,
        start=1,
        spec=Spec(min_instances=1),
    ),
    Case(
        "min_instances holds from the first decision",
        Observed([]),
        now=0,
        desired=1,
        start=1,
        spec=Spec(min_instances=1),
        reason="min_instances 1",
    ),
    Case(
        "min_instances keeps an idle instance past idle_timeout",
        Observed([ready("a", idle_since=0)]),
        now=1000,
        desired=1,
        spec=Spec(min_instances=1),
    ),
    Case(
        "no observation is NoData",
        None,
        now=0,
        desired=0,
    ),
    Case(
        "next_at is the floor's end when no idle instance can be freed before it",
        Observed([ready("a", idle_since=0)]),
        now=10,
        desired=1,
        floor=Floor(1, until=500, reason="keep one"),
        next_at=500,
    ),
    Case(
        "next_at is the next idle expiry that frees an instance when it comes before the floor's end",
        Observed([ready("a", idle_since=0), ready("b", idle_since=30)]),
        now=10,
        desired=1,
        floor=Floor(1, until=500, reason="keep one"),
        next_at=60,
    ),
    Case(
        "next_at ignores idle expiries that would free nothing",
        Observed([ready("a", idle_since=0)]),
        now=10,
        desired=1,
        spec=Spec(min_instances=1),
    ),
    Case(
        "next_at is None with nothing running and nothing held",
        Observed([]),
        now=10,
        desired=0,
        reason="no load",
    ),
    Case(
        "pending starts count as live",
        Observed([], waiting=3, pending=2),
        now=0,
        desired=3,
        start=1,
    ),
    Case(
        "starting instances count as live",
        Observed([starting("s")], waiting=2),
        now=0,
        desired=2,
        start=1,
    ),
    Case(
        "a busy instance is not idle, however long ago it was last idle",
        Observed([ready("a", idle_since=None, in_flight=1)]),
        now=1000,
        desired=1,
    ),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_decide(case: Case) -> None:
    got = decide(case.spec, case.observed, case.floor, case.now)
    if case.observed is None:
        assert isinstance(got, NoData)
        assert got.reason
        return
    assert isinstance(got, Decision)
    assert (got.desired, got.start, got.stop, got.next_at) == (case.desired, case.start, case.stop, case.next_at)
    assert case.reason in got.reason
