"""The pre-warm controller's loop on a fake timeline against a real redis-server: demand goes in through
DemandStore as the gateway writes it, the controller ticks at fake times, and an actuator that records
what it is sent stands in for the gateway (it holds the last floor per function, as the gateway does)."""

from __future__ import annotations

import asyncio
import copy
import logging
import os
import signal
import time
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from kold.controller.demand import DemandStore
from kold.controller.history import DemandHistory
from kold.controller.lease import Lease
from kold.controller.loop import (
    CLEAR,
    FORGET,
    REFRESH,
    SET,
    Action,
    Controller,
    FunctionView,
    OneLineError,
    RegistrySource,
)
from kold.controller.metrics import ControllerMetrics
from kold.controller.policies.base import Plan
from kold.controller.records import Invocation
from kold.controller.scaling import Floor
from kold.gateway.registry import Registry, ScalingSpec
from kold.localredis import LocalRedis

from .redis_restart import Gate, is_down, supervised_redis, wait_until

pytestmark = pytest.mark.redis

T = TypeVar("T")
T0 = 1_700_000_040.0  # a fake Unix time on a minute boundary
SPEC = ScalingSpec()


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


@dataclass
class Recorder:
    """The actuator: every call, and the floor each function holds now (what the gateway would hold)."""

    calls: list[tuple[str, Floor | None]] = field(default_factory=list)
    floors: dict[str, Floor | None] = field(default_factory=dict)
    fail_next: int = 0  # this many calls from now do not arrive

    async def set_floor(self, function: str, floor: Floor | None) -> bool:
        self.calls.append((function, floor))
        if self.fail_next:
            self.fail_next -= 1
            return False
        self.floors[function] = floor
        return True

    def warm_at(self, function: str, t: float) -> bool:
        """Whether the floor in force at `t` keeps an instance."""
        floor = self.floors.get(function)
        return floor is not None and floor.holds(t) and floor.instances >= 1


@dataclass
class Functions:
    """The function source: names with their policy text (the registry's part, without a gateway)."""

    policies: dict[str, str]

    def list(self) -> list[FunctionView]:
        return [FunctionView(name, SPEC, policy) for name, policy in sorted(self.policies.items())]


def make_controller(
    client: redis.Redis, prefix: str, policies: dict[str, str], *, holder: str = "a", **kw: Any
) -> tuple[Controller, Recorder, DemandStore]:
    store = DemandStore(client, prefix)
    actuator = Recorder()
    lease = Lease(client, f"{prefix}controller:lease", holder, kw.pop("lease_s", 10.0))
    controller = Controller(store, Functions(policies), actuator, lease, tick_s=kw.pop("tick_s", 10.0), **kw)
    return controller, actuator, store


def arrive(store: DemandStore, function: str, t: float) -> None:
    store.record_invocations([Invocation(function, t, cold=False, wait_s=0.0)])


# -- a strictly periodic function, and one that stops being called ----------------------------------


@dataclass(frozen=True)
class Case:
    name: str
    policy: str
    period_s: float
    calls: int
    warm_from: int  # the first arrival (0-based) that must find an instance pre-warmed
    cold_within_s: float  # after the last arrival, no instance is held from then on
    prewarms: bool  # the floor goes to 0 between arrivals and back up before the next


PERIODIC = [
    Case(
        "hybrid-histogram unloads after each call of a 5-minute timer and pre-warms before the next",
        "hybrid-histogram", 300, 16, 1, 400, prewarms=True,
    ),
    Case(
        "forecast pre-warms a 10-minute timer before each call once it has seen ten gaps",
        "forecast", 600, 16, 11, 900, prewarms=True,
    ),
    Case(
        "fixed-keepalive keeps a 2-minute timer warm across its gaps and lets it go 5 minutes after the last call",
        "fixed-keepalive:minutes=5", 120, 12, 1, 300, prewarms=False,
    ),
    Case(
        "knative-default keeps a 1-minute timer warm for 90 s after each call",
        "knative-default", 60, 12, 1, 90, prewarms=False,
    ),
]  # fmt: skip


@pytest.mark.parametrize("case", PERIODIC, ids=lambda c: c.name)
def test_a_periodic_function_is_warm_at_each_arrival_and_stops_costing_when_calls_stop(
    case: Case, redis_client: redis.Redis, redis_prefix: str
) -> None:
    controller, actuator, store = make_controller(redis_client, redis_prefix, {"timer": case.policy})
    step = 10.0
    arrivals = [T0 + 30 + k * case.period_s for k in range(case.calls)]
    end = arrivals[-1] + case.cold_within_s + 1800
    found_warm: list[bool] = []
    unloaded_between = 0

    async def timeline() -> None:
        nonlocal unloaded_between
        pending = list(arrivals)
        now = T0
        while now <= end:
            while pending and pending[0] <= now:
                t = pending.pop(0)
                found_warm.append(actuator.warm_at("timer", t))
                arrive(store, "timer", t)
            await controller.tick_once(now)
            if pending and len(found_warm) > case.warm_from and not actuator.warm_at("timer", now):
                unloaded_between += 1
            if now > arrivals[-1] + case.cold_within_s:
                assert not actuator.warm_at("timer", now), f"still holding an instance at last + {now - arrivals[-1]} s"
            now = _next_tick(controller, now, step)

    run(timeline())
    cold = [k for k, warm in enumerate(found_warm) if k >= case.warm_from and not warm]
    assert not cold, f"arrivals {cold} found no instance held"
    assert (unloaded_between > 0) == case.prewarms
    assert controller.metrics.lease_held._value.get() == 1


def _next_tick(controller: Controller, now: float, step: float) -> float:
    """When `run` would tick next: after `step`, or sooner when a plan asked to be rechecked."""
    recheck = controller.recheck_at
    return min(now + step, recheck) if recheck is not None and recheck > now else now + step


# -- what is sent, and when -------------------------------------------------------------------------


class Scripted:
    """A policy whose floor the test sets (the controller's own rules are what is tested here)."""

    name: ClassVar[str] = "scripted"
    knob: ClassVar[str] = "x"
    knob_values: ClassVar[tuple[float, ...]] = (1.0,)

    def __init__(self) -> None:
        self.floor = Floor(0, 0.0, "nothing")
        self.seen: list[DemandHistory] = []

    def plan(self, function: str, history: DemandHistory, spec: Any, now: float) -> Plan:
        self.seen.append(copy.deepcopy(history))  # as it was at this plan
        return Plan(self.floor)


def test_a_floor_is_sent_when_it_changes_refreshed_before_it_runs_out_and_cleared(
    redis_client: redis.Redis, redis_prefix: str
) -> None:
    policy = Scripted()
    controller, actuator, _ = make_controller(
        redis_client, redis_prefix, {"fn": "scripted"}, make_policy=lambda text: policy, reassert_s=1000.0
    )

    def tick(now: float) -> list[tuple[str, int | None]]:
        return [(a.kind, None if a.floor is None else a.floor.instances) for a in run(controller.tick_once(now))]

    assert tick(T0) == [(CLEAR, None)], "the first pass clears what a previous lease holder may have left"
    assert tick(T0 + 1) == [], "then: nothing held, nothing sent"
    policy.floor = Floor(1, T0 + 100, "hold")
    assert tick(T0) == [(SET, 1)]
    assert tick(T0 + 10) == [], "the same floor is not sent again"
    policy.floor = Floor(1, T0 + 100.5, "hold, a hair longer")
    assert tick(T0 + 20) == [], "an end that moved by less than a tick is the same floor"
    policy.floor = Floor(1, T0 + 200, "hold longer")
    assert tick(T0 + 30) == [], "extended: sent once the one the gateway holds is about to run out"
    assert tick(T0 + 81) == [(REFRESH, 1)] and actuator.floors["fn"] == Floor(1, T0 + 200, "hold longer")
    policy.floor = Floor(2, T0 + 200, "two")
    assert tick(T0 + 90) == [(SET, 2)]
    policy.floor = Floor(2, T0 + 150, "two, ending sooner")
    assert tick(T0 + 100) == [(SET, 2)]
    policy.floor = Floor(0, T0 + 110, "nothing now")
    assert tick(T0 + 110) == [(CLEAR, None)] and actuator.floors["fn"] is None
    policy.floor = Floor(0, T0 + 300, "unload at once", idle_timeout_s=1.0)
    assert tick(T0 + 120) == [(SET, 0)], "a floor of 0 that shortens the keep-alive is sent"
    policy.floor = Floor(1, T0 + 200, "gone by itself")
    actuator.floors.clear()
    assert tick(T0 + 130) == [(SET, 1)]
    assert tick(T0 + 201) == [], "a floor that ran out at the gateway is not cleared again"
    decisions = controller.metrics.decisions.labels("fn", "scripted")._value.get()
    assert decisions == 6 and controller.metrics.prewarms.labels("fn")._value.get() == 3


def test_an_unchanged_floor_is_reasserted_every_reassert_s(redis_client: redis.Redis, redis_prefix: str) -> None:
    """A gateway that restarted, or a floor that did not arrive, gets it again."""
    policy = Scripted()
    policy.floor = Floor(1, T0 + 3600, "hold")
    controller, actuator, _ = make_controller(
        redis_client, redis_prefix, {"fn": "scripted"}, make_policy=lambda text: policy, reassert_s=30.0
    )
    kinds = [[a.kind for a in run(controller.tick_once(T0 + t))] for t in range(0, 70, 10)]
    assert kinds == [[SET], [], [], [REFRESH], [], [], [REFRESH]]
    assert actuator.calls == [("fn", policy.floor)] * 3


def test_a_floor_that_did_not_arrive_is_sent_again_next_tick(redis_client: redis.Redis, redis_prefix: str) -> None:
    policy = Scripted()
    controller, actuator, _ = make_controller(
        redis_client, redis_prefix, {"fn": "scripted"}, make_policy=lambda text: policy, reassert_s=1000.0
    )
    run(controller.tick_once(T0))
    policy.floor = Floor(1, T0 + 600, "hold")
    actuator.fail_next = 1
    assert run(controller.tick_once(T0 + 10)) == [], "not delivered: nothing was done"
    assert [a.kind for a in run(controller.tick_once(T0 + 20))] == [SET], "retried at the next tick"
    assert actuator.floors["fn"] == policy.floor
    policy.floor = Floor(0, T0 + 600, "nothing now")
    actuator.fail_next = 1
    assert run(controller.tick_once(T0 + 30)) == []
    assert [a.kind for a in run(controller.tick_once(T0 + 40))] == [CLEAR], "a clear that failed is retried too"
    assert actuator.floors["fn"] is None and run(controller.tick_once(T0 + 50)) == []
    assert controller.metrics.decisions.labels("fn", "scripted")._value.get() == 2, "delivered decisions only"


def _calls(client: redis.Redis, command: str) -> int:
    """How many times the server ran `command` (the test server is this session's alone)."""
    return int(client.info("commandstats").get(f"cmdstat_{command}", {}).get("calls", 0))


def test_a_tick_with_nothing_new_neither_reads_nor_writes_a_stored_history(
    redis_client: redis.Redis, redis_prefix: str
) -> None:
    """A history is read from Redis when the lease is taken, then kept: a quiet tick reads only the
    streams. A new holder reads what the last one wrote and counts each call once."""
    policies = {"a": "knative-default", "b": "knative-default"}
    controller, _, store = make_controller(redis_client, redis_prefix, policies, clock=lambda: T0 + 13)
    for name in ("a", "b"):
        arrive(store, name, T0)
    run(controller.tick_once(T0 + 1))
    run(controller.tick_once(T0 + 1.5))  # the lease's first renewal loads its script
    counts = ("get", "set", "evalsha")
    before = [_calls(redis_client, c) for c in counts]
    for t in range(2, 12):
        run(controller.tick_once(T0 + t))
    gets, sets, renewals = (_calls(redis_client, c) - n for c, n in zip(counts, before, strict=True))
    assert renewals == 10 and (gets - renewals, sets) == (0, 0), "the lease's renew script GETs its key once"
    arrive(store, "a", T0 + 12)
    run(controller.tick_once(T0 + 12))
    history = store.history("a")
    assert history is not None and history.arrivals == 2, "new records are written back"
    arrive(store, "a", T0 + 13)
    run(controller.tick_once(T0 + 13))
    assert store.history("a").arrivals == 2, "within the few seconds between writes"  # type: ignore[union-attr]
    run(controller._give_up_lease())  # as `run` ends: what is unwritten is written, then the lease goes
    assert store.history("a").arrivals == 3  # type: ignore[union-attr]
    successor, _, _ = make_controller(redis_client, redis_prefix, {"a": "knative-default"}, holder="b")
    arrive(store, "a", T0 + 14)
    run(successor.tick_once(T0 + 14))
    history = store.history("a")
    assert history is not None and history.arrivals == 4 and history.last_arrival == T0 + 14


def test_a_reason_longer_than_the_gateway_takes_is_cut(redis_client: redis.Redis, redis_prefix: str) -> None:
    policy = Scripted()
    policy.floor = Floor(1, T0 + 60, "why " * 100)
    controller, actuator, _ = make_controller(redis_client, redis_prefix, {"fn": "x"}, make_policy=lambda t: policy)
    run(controller.tick_once(T0))
    sent = actuator.floors["fn"]
    assert sent is not None and len(sent.reason) == 200 and sent.reason.endswith("…")


def test_a_broken_or_unknown_policy_does_not_stop_the_others(
    redis_client: redis.Redis, redis_prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    class Broken(Scripted):
        def plan(self, function: str, history: DemandHistory, spec: Any, now: float) -> Plan:
            raise ZeroDivisionError("a bug")

    good = Scripted()
    good.floor = Floor(1, T0 + 600, "hold")
    made = {"broken": Broken(), "good": good}

    def make(text: str) -> Any:
        if text not in made:
            raise ValueError(f"unknown prewarm policy {text!r}")
        return made[text]

    controller, actuator, _ = make_controller(
        redis_client,
        redis_prefix,
        {"a-broken": "broken", "b-unknown": "nope", "c-good": "good"},
        make_policy=make,
        default_policy="good",
    )
    with caplog.at_level(logging.WARNING, logger="kold.controller"):
        for t in (0, 10, 20):
            run(controller.tick_once(T0 + t))
    assert set(actuator.floors) == {"b-unknown", "c-good"}, "the unknown policy's function got the default"
    assert sum("failed for a-broken" in r.getMessage() for r in caplog.records) == 1
    assert sum("'nope'" in r.getMessage() for r in caplog.records) == 1


# -- two controllers ----------------------------------------------------------------------------------


def test_two_controllers_never_both_act(redis_client: redis.Redis, redis_prefix: str) -> None:
    """`a` takes the lease and acts; `b` waits. `a` stalls (stops ticking): once its lease runs out `b`
    takes over, and when `a` comes back it finds the lease gone and does nothing."""
    policies = {"fn": "fixed-keepalive:minutes=1"}
    a, act_a, store = make_controller(redis_client, redis_prefix, policies, holder="a", lease_s=0.5)
    b, act_b, _ = make_controller(redis_client, redis_prefix, policies, holder="b", lease_s=0.5)
    acting: list[tuple[float, str]] = []

    async def step(now: float, *controllers: tuple[str, Controller]) -> None:
        arrive(store, "fn", now)  # a call each step: a floor to set or extend every time
        for name, c in controllers:
            if await c.tick_once(now) or c.lease.held(now):
                acting.append((now, name))
        if len(controllers) == 2:
            assert a.metrics.lease_held._value.get() + b.metrics.lease_held._value.get() == 1

    async def timeline() -> None:
        now = T0
        for _ in range(20):
            await step(now, ("a", a), ("b", b))
            now += 65  # the 1-minute keep-alive is always about to run out: a refresh every step
        stalled_at = now
        deadline = time.monotonic() + 10
        while not b.metrics.lease_held._value.get():  # `b` takes over once `a`'s lease expires in Redis
            assert time.monotonic() < deadline, "b never took over"
            await asyncio.sleep(0.05)
            await step(now, ("b", b))
            now += 1
        for _ in range(5):
            await step(now, ("a", a), ("b", b))
            now += 65
        assert not a.lease.held(now)
        assert stalled_at < now

    run(timeline())
    by_a = [t for t, who in acting if who == "a"]
    by_b = [t for t, who in acting if who == "b"]
    assert by_a and by_b and max(by_a) < min(by_b), "they acted at overlapping times"
    assert len({t for t, _ in acting}) == len(acting), "both acted at one time"
    assert act_a.calls and act_b.calls
    assert act_b.calls[0][1] is not None, "the new holder sends its floor at once, not only on a change"


def test_a_new_lease_holder_clears_the_floors_the_last_one_left(redis_client: redis.Redis, redis_prefix: str) -> None:
    """`a` set a floor and went away without clearing it; `b` takes the lease, its policy holds
    nothing: it sends one clear (it cannot know what the gateway holds), then nothing more. The same
    when a controller loses the lease and takes it back."""
    hold, nothing = Scripted(), Scripted()
    hold.floor = Floor(1, T0 + 3600, "hold")
    a, gateway, _ = make_controller(
        redis_client, redis_prefix, {"fn": "x"}, holder="a", make_policy=lambda t: hold, lease_s=5.0
    )
    b, _, _ = make_controller(
        redis_client, redis_prefix, {"fn": "x"}, holder="b", make_policy=lambda t: nothing, lease_s=5.0
    )
    b.actuator = a.actuator  # one gateway
    assert [x.kind for x in run(a.tick_once(T0))] == [SET] and gateway.warm_at("fn", T0 + 60)
    a.lease.release()  # gone without a word to the gateway
    assert [x.kind for x in run(b.tick_once(T0 + 10))] == [CLEAR]
    assert gateway.floors["fn"] is None and run(b.tick_once(T0 + 11)) == []
    redis_client.set(b.lease.key, "c", px=60_000)  # `c` took the lease from `b` (a stall)...
    assert run(b.tick_once(T0 + 20)) == [] and not b.lease.held(T0 + 20)
    gateway.floors["fn"] = hold.floor  # ...set a floor, and went away
    redis_client.delete(b.lease.key)
    assert [x.kind for x in run(b.tick_once(T0 + 30))] == [CLEAR] and gateway.floors["fn"] is None


# -- Redis going away ---------------------------------------------------------------------------------


@pytest.fixture
def restartable(tmp_path: Path) -> Iterator[tuple[LocalRedis, Gate, redis.Redis]]:
    """A private redis-server with its append-only file, supervised as `kold up` runs it."""
    with supervised_redis(tmp_path / "redis", persist=True) as started:
        yield started


def test_a_redis_restart_loses_only_the_window_in_flight_and_the_controller_recovers(
    restartable: tuple[LocalRedis, Gate, redis.Redis], caplog: pytest.LogCaptureFixture
) -> None:
    """Redis is killed mid-run and its supervisor brings it back with its append-only file: the calls
    made while it was down are lost (the gateway could not record them), the ticks meanwhile do nothing
    and raise nothing, and afterwards the controller goes on from the history Redis kept."""
    server, gate, client = restartable
    controller, actuator, store = make_controller(client, "kold:", {"timer": "hybrid-histogram"})
    period = 300.0
    arrivals = [T0 + 30 + k * period for k in range(30)]
    cut_at, back_at = arrivals[14] + 100, arrivals[16] + 100  # calls 15 and 16 fall in the outage
    warm: dict[int, bool] = {}

    async def timeline() -> None:
        pending = list(enumerate(arrivals))
        now = T0
        while pending:
            if cut_at <= now < back_at:
                if server.pid is not None:
                    os.kill(server.pid, signal.SIGKILL)
                    await asyncio.to_thread(wait_until, lambda: is_down(client), "the server is down")
                    sent = len(actuator.calls)
                while pending and pending[0][1] <= now:
                    pending.pop(0)
                assert await controller.tick_once(now) == []
                assert len(actuator.calls) == sent, "nothing is sent, nor any floor cleared, for want of Redis"
            else:
                if now >= back_at and not gate.open.is_set():
                    gate.open.set()
                    await asyncio.to_thread(wait_until, lambda: not is_down(client), "the server is back")
                while pending and pending[0][1] <= now:
                    k, t = pending.pop(0)
                    warm[k] = actuator.warm_at("timer", t)
                    arrive(store, "timer", t)
                await controller.tick_once(now)
            now += 10

    with caplog.at_level(logging.INFO, logger="kold.controller"):
        run(timeline())
    messages = [r.getMessage() for r in caplog.records]
    assert sum("cannot reach Redis" in m for m in messages) == 1, "the outage is logged once, not every tick"
    assert sum("reaches Redis again" in m for m in messages) == 1
    assert server.restarts == 1
    history = store.history("timer")
    assert history is not None and history.arrivals == 28, "every call but the two in the outage was kept"
    assert all(warm[k] for k in range(1, 15)), "pre-warmed before the outage"
    assert all(warm[k] for k in range(18, 30)), "and again after it"


# -- the running loop: pokes, and the lease given up at the end ---------------------------------------


def test_a_poke_decides_at_once_without_waiting_for_the_tick(redis_client: redis.Redis, redis_prefix: str) -> None:
    """The tick is a minute; a request that finds the function cold pokes the controller with its
    arrival, and the controller sets the function's floor within moments, though the gateway writes
    the request's record only once it finishes. Cancelled, it gives the lease up."""
    clock = [T0]
    controller, actuator, store = make_controller(
        redis_client, redis_prefix, {"fn": "fixed-keepalive:minutes=1"}, tick_s=60.0, clock=lambda: clock[0]
    )

    async def scenario() -> None:
        task = asyncio.create_task(controller.run())
        await _until(lambda: actuator.calls, "the first tick's clear")
        assert actuator.calls == [("fn", None)], "nothing held: whatever a previous holder left is cleared"
        clock[0] = T0 + 5
        started = time.monotonic()
        controller.poke("fn", T0 + 5, 1)  # no record yet: the request is still being served
        await _until(lambda: actuator.floors["fn"], "a floor after the poke")
        assert time.monotonic() - started < 5, "the poke waited for the tick"
        assert actuator.calls[1:] == [("fn", actuator.floors["fn"])] and actuator.warm_at("fn", T0 + 60)
        controller.poke("not-a-function")  # unknown names are ignored
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    run(scenario())
    assert controller.lease.holder() is None and controller.metrics.lease_held._value.get() == 0
    stored = store.history("fn")
    assert stored is None or stored.arrivals == 0, "the poked arrival was planned with, never stored"


async def _until(cond: Callable[[], object], what: str) -> None:
    deadline = time.monotonic() + 10
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.01)


class CountingLease(Lease):
    """The lease, counting the tick's calls to it (each is a Redis round trip)."""

    tries = 0

    def try_acquire(self, now: float) -> bool:
        self.tries += 1
        return super().try_acquire(now)


@pytest.mark.parametrize("lost", ["to another holder", "to a Redis error"])
def test_a_standby_controller_with_a_stale_recheck_waits_for_its_tick(
    lost: str, redis_client: redis.Redis, redis_prefix: str
) -> None:
    """A plan asked to be rechecked soon; then the lease went (another took it, or Redis failed). The
    recheck time is now in the past: `run` must wait for its tick, not call the lease back to back."""
    policy = Scripted()
    policy.floor = Floor(1, T0 + 600, "hold")
    recheck = Plan(policy.floor, recheck_at=T0 + 5)
    policy.plan = lambda *args: recheck  # type: ignore[method-assign]
    clock = [T0]
    store = DemandStore(redis_client, redis_prefix)
    key = f"{redis_prefix}controller:lease"
    lease = CountingLease(redis_client, key, "a", 10.0)
    controller = Controller(
        store, Functions({"fn": "x"}), Recorder(), lease, make_policy=lambda t: policy, tick_s=1.0,
        clock=lambda: clock[0],
    )  # fmt: skip
    run(controller.tick_once(T0))
    assert controller.recheck_at == T0 + 5
    clock[0] = T0 + 20  # our lease ran out by our own view; the recheck is 15 s stale
    if lost == "to another holder":
        redis_client.set(key, "b", px=60_000)
    else:
        controller.lease = lease = CountingLease(
            redis.Redis(host="127.0.0.1", port=1, socket_connect_timeout=0.2, retry=Retry(NoBackoff(), 0)),
            key, "a", 10.0,
        )  # fmt: skip

    async def scenario() -> None:
        task = asyncio.create_task(controller.run())
        await asyncio.sleep(0.5)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    lease.tries = 0
    run(scenario())
    assert 1 <= lease.tries <= 2, f"{lease.tries} lease calls in half a second with a 1 s tick"
    assert controller.recheck_at is None


def test_a_poked_arrival_is_planned_with_until_its_record_is_folded_and_counted_once(
    redis_client: redis.Redis, redis_prefix: str
) -> None:
    policy = Scripted()
    controller, _, store = make_controller(redis_client, redis_prefix, {"fn": "x"}, make_policy=lambda t: policy)
    run(controller.tick_once(T0))
    controller.poke("fn", T0 + 5, 3)
    run(controller.decide_now(["fn"], T0 + 5.01))
    seen = policy.seen[-1]
    assert (seen.arrivals, seen.last_arrival, seen.peak(int((T0 + 5) // 60))) == (1, T0 + 5, 3)
    run(controller.tick_once(T0 + 6))
    assert policy.seen[-1].arrivals == 1, "still pending: the request has not finished"
    stored = store.history("fn")
    assert stored is None or stored.arrivals == 0, "a poked arrival is never stored"
    store.record_invocations([Invocation("fn", T0 + 5, cold=True, wait_s=2.0, concurrency=3)])
    run(controller.tick_once(T0 + 8))
    run(controller.tick_once(T0 + 9))
    assert [h.arrivals for h in policy.seen[-2:]] == [1, 1], "its record folded: counted once, not twice"
    assert store.history("fn").arrivals == 1  # type: ignore[union-attr]
    controller.poke("fn", T0 + 10)  # a request whose record never comes
    run(controller.tick_once(T0 + 20))
    run(controller.tick_once(T0 + 10 + 61))
    assert [h.arrivals for h in policy.seen[-2:]] == [2, 1], "dropped after a minute"
    with pytest.raises(ValueError, match="concurrency"):
        controller.poke("fn", T0, 0)
    with pytest.raises(ValueError, match="arrival"):
        controller.poke("fn", float("nan"))


def test_a_poke_without_the_lease_does_nothing(redis_client: redis.Redis, redis_prefix: str) -> None:
    a, act_a, store = make_controller(redis_client, redis_prefix, {"fn": "fixed-keepalive"}, holder="a")
    b, act_b, _ = make_controller(redis_client, redis_prefix, {"fn": "fixed-keepalive"}, holder="b")
    arrive(store, "fn", T0)
    run(a.tick_once(T0))
    assert run(b.tick_once(T0)) == [] and run(b.decide_now(["fn"], T0 + 1)) == []
    assert act_b.calls == [] and len(act_a.calls) == 1


# -- functions leaving the registry ---------------------------------------------------------------------


def test_a_function_removed_from_the_registry_loses_its_floor_and_its_demand_records(
    redis_client: redis.Redis, redis_prefix: str
) -> None:
    registry = Registry(redis_client, redis_prefix)
    uri = "file:///store/snapshots/" + "ab" * 16
    for name in ("keep", "drop"):
        registry.create_revision(name, uri, scaling=ScalingSpec(prewarm="fixed-keepalive:minutes=1"))
    store = DemandStore(redis_client, redis_prefix)
    actuator = Recorder()
    lease = Lease(redis_client, f"{redis_prefix}controller:lease", "a", 10.0)
    source = RegistrySource(registry)
    controller = Controller(store, source, actuator, lease, tick_s=1.0, metrics=ControllerMetrics())
    for name in ("keep", "drop"):
        arrive(store, name, T0)
    first = run(controller.tick_once(T0 + 1))
    assert sorted((a.function, a.kind, a.policy) for a in first) == [
        ("drop", SET, "fixed-keepalive"),
        ("keep", SET, "fixed-keepalive"),
    ]
    registry.delete_function("drop")
    actions = run(controller.tick_once(T0 + 2))
    assert actions == [Action("drop", FORGET, None, "")]
    assert actuator.floors["drop"] is None and actuator.warm_at("keep", T0 + 2)
    assert store.history("drop") is None and store.invocations("drop") == []
    assert store.history("keep") is not None
    assert 'function="drop"' not in _exposition(controller.metrics)


def test_a_garbled_revision_does_not_stop_the_other_functions_decisions(
    redis_client: redis.Redis, redis_prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    """`new` has only a garbled revision; `old` is redeployed with one: the others' floors are still
    decided, `old` goes on with the revision read before (it is not forgotten), and each is logged once."""
    registry = Registry(redis_client, redis_prefix)
    uri = "file:///store/snapshots/" + "ab" * 16
    spec = ScalingSpec(prewarm="fixed-keepalive:minutes=1")
    for name in ("good", "old"):
        registry.create_revision(name, uri, scaling=spec)
    store = DemandStore(redis_client, redis_prefix)
    actuator = Recorder()
    lease = Lease(redis_client, f"{redis_prefix}controller:lease", "a", 10.0)
    controller = Controller(store, RegistrySource(registry), actuator, lease, tick_s=1.0)
    for name in ("good", "old", "new"):
        arrive(store, name, T0)
    assert {a.function for a in run(controller.tick_once(T0 + 1))} == {"good", "old"}
    garbled = [registry.create_revision(name, uri, scaling=spec).revision_id for name in ("old", "new")]
    for rev_id in garbled:
        redis_client.set(f"{redis_prefix}fn:{rev_id.rsplit('-', 1)[0]}:rev:{rev_id}", "{not json")
    with caplog.at_level(logging.WARNING, logger="kold.controller"):
        for t in (2, 3, 59):  # at 59 s the first floors are about to run out: extended
            arrive(store, "good", T0 + t)
            arrive(store, "old", T0 + t)
            actions = run(controller.tick_once(T0 + t))
            assert FORGET not in {a.kind for a in actions}, "a function is not forgotten for a bad revision"
    assert actuator.warm_at("good", T0 + 100) and actuator.warm_at("old", T0 + 100), "both still decided"
    assert "new" not in actuator.floors
    warnings = [r.getMessage() for r in caplog.records]
    assert sum("old" in m and "cannot be read" in m for m in warnings) == 1, warnings
    assert sum("new" in m and "cannot be read" in m for m in warnings) == 1, warnings


def test_a_function_that_cannot_be_planned_does_not_stop_the_others(
    redis_client: redis.Redis, redis_prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A name the demand store refuses (data from elsewhere) fails that function's plan only."""
    good = Scripted()
    good.floor = Floor(1, T0 + 600, "hold")
    controller, actuator, _ = make_controller(
        redis_client, redis_prefix, {"Not_A_Name": "x", "fn": "x"}, make_policy=lambda t: good
    )
    with caplog.at_level(logging.WARNING, logger="kold.controller"):
        for t in (0, 10, 20):
            run(controller.tick_once(T0 + t))
    assert set(actuator.floors) == {"fn"}
    assert sum("Not_A_Name" in r.getMessage() for r in caplog.records) == 1


def _exposition(metrics: ControllerMetrics) -> str:
    from prometheus_client import generate_latest

    return generate_latest(metrics.registry).decode()


def test_a_pass_that_fails_is_logged_once_and_the_loop_goes_on(
    redis_client: redis.Redis, redis_prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    class Flaky(Functions):
        fails = 3

        def list(self) -> list[FunctionView]:
            if self.fails:
                self.fails -= 1
                raise RuntimeError("a garbled revision")
            return super().list()

    store = DemandStore(redis_client, redis_prefix)
    actuator = Recorder()
    lease = Lease(redis_client, f"{redis_prefix}controller:lease", "a", 10.0)
    controller = Controller(store, Flaky({"fn": "fixed-keepalive"}), actuator, lease, tick_s=0.02)
    arrive(store, "fn", time.time())

    async def scenario() -> None:
        task = asyncio.create_task(controller.run())
        await _until(lambda: actuator.calls, "a floor once the passes succeed")
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    with caplog.at_level(logging.INFO, logger="kold.controller"):
        run(scenario())
    messages = [r.getMessage() for r in caplog.records]
    assert sum("pass failed" in m for m in messages) == 1
    assert sum("succeed again" in m for m in messages) == 1


def test_a_one_line_error_from_the_function_source_is_logged_once_as_its_line(
    redis_client: redis.Redis, redis_prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    class ClusterAwayError(OneLineError):
        pass

    class Away(Functions):
        fails = 3

        def list(self) -> list[FunctionView]:
            if self.fails:
                self.fails -= 1
                raise ClusterAwayError("cannot reach the API server https://10.0.0.1:6443 (kubeconfig ~/.kube/config)")
            return super().list()

    store = DemandStore(redis_client, redis_prefix)
    actuator = Recorder()
    lease = Lease(redis_client, f"{redis_prefix}controller:lease", "a", 10.0)
    controller = Controller(store, Away({"fn": "fixed-keepalive"}), actuator, lease, tick_s=0.02)
    arrive(store, "fn", time.time())

    async def scenario() -> None:
        task = asyncio.create_task(controller.run())
        await _until(lambda: actuator.calls, "a floor once the cluster answers")
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    with caplog.at_level(logging.INFO, logger="kold.controller"):
        run(scenario())
    failed = [r for r in caplog.records if "pass failed" in r.getMessage()]
    assert len(failed) == 1 and "cannot reach the API server https://10.0.0.1:6443" in failed[0].getMessage()
    assert failed[0].levelno == logging.WARNING and not failed[0].exc_info, "no traceback below debug"
    assert sum("succeed again" in r.getMessage() for r in caplog.records) == 1
