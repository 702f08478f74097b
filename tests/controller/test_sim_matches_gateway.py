"""The simulator and the live gateway make the same decisions on the same short timeline (fake clock).

One function, a handful of arrivals, a fixed instance start time and service time, and one policy, run
twice: through `kold sim`'s engine (controller/sim/engine.py), and through the gateway's `Gateway`
(gateway/activator.py) on a fake timeline, with a controller that plans from the gateway's own
invocation records (arrival in Unix time and concurrency, as `DemandStore.fold` observes them) and
hands each plan's floor to `Gateway.set_floor`, as `LocalActuator` does. Both sides must start as many
instances, keep them as long (instance-seconds, idle instance-seconds), and have the same requests
wait, for as long, and count as cold.

The gateway's side is driven as its outer loops would be, at the timeline's events only: requests
arrive (`acquire`) and end (`release`) at their times, instances become READY `start_s` after the
pool was asked for them (`TimedPool`), the controller plans at each arrival and at its plan's
`recheck_at` (the earliest asked for and not yet due, as the controller's `decide_now` keeps it; and
once at 0, as the simulator and the controller's first tick do) and hands every plan's floor on at once,
and a scale pass (`scale_once`) runs at every such moment, at every reaper tick (REAP_INTERVAL_S), and
when the decider says its answer changes by itself (`Decision.next_at`: an idle timeout or a floor
falling due). What falls due at a moment is handled before a request arriving at that moment, as the
simulator orders its events (the live system races them; the timelines avoid such ties anyway).

The simulator reports per-function totals, not its instances one by one, so starts are compared by
count and stops through the instance-seconds they bound; the gateway's side is kept as a per-instance
log (`Life`), which the assertion message prints when the two disagree. A case with a `gap` is a known
difference, expected to fail (strictly) until one side is changed.
"""

from __future__ import annotations

import asyncio
import heapq
import math
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis

from kold.controller.history import DemandHistory
from kold.controller.policies.base import Policy
from kold.controller.policies.registry import make_policy
from kold.controller.records import Arrival
from kold.controller.scaling import Decision, Spec, decide
from kold.controller.sim.engine import simulate
from kold.controller.sim.model import CostModel, ServiceModel, SimConfig, SimSpec
from kold.gateway.activator import REAP_INTERVAL_S, Gateway
from kold.gateway.pool import Instance, InstancePool, InstanceState, RevisionLike
from kold.gateway.recorder import Call
from kold.gateway.registry import Registry, Revision, RuntimeSpec, ScalingSpec

pytestmark = pytest.mark.redis

FN = "fn"
URI = "file:///x/snapshots/" + "5" * 32
# Unix time at the timeline's 0: a whole number of days, so minutes and days begin where the
# simulator's (which counts from 0) do, and the policies' per-minute views agree
EPOCH = 19675 * 86400.0
TOL_S = 1e-3  # Unix times near 1.7e9 carry ~2e-7 s of rounding


@dataclass(frozen=True)
class Case:
    name: str
    policy: str
    arrivals: tuple[float, ...]
    end_s: float
    idle_timeout_s: float = 30.0
    target_concurrency: int = 1
    max_instances: int = 4
    start_s: float = 2.0
    service_s: float = 1.0
    prewarms: bool = False  # the policy's floor starts instances ahead of a request (checked on the gateway)
    gap: str = ""  # a known difference between the two sides: the case is expected to fail until it is fixed


def every(period: float, n: int, first: float = 10.0) -> tuple[float, ...]:
    return tuple(first + k * period for k in range(n))


CASES = [
    Case(
        "fixed-keepalive: a burst scales out; the extra instance goes after a minute idle, the last one a minute "
        "after the last request",
        "fixed-keepalive:minutes=1",
        (5.0, 5.5, 40.0, 95.0, 170.0, 171.5, 300.0),
        end_s=420.0,
    ),
    Case(
        "knative-default: a burst scales out; the extras go after the 60 s stable window, the last instance 90 s "
        "after the last request; a request queued behind a busy READY instance is not cold",
        "knative-default",
        (3.0, 3.25, 3.5, 50.0, 130.0, 130.5, 250.0, 400.0),
        end_s=520.0,
        idle_timeout_s=20.0,
    ),
    Case(
        "a request that waits for a scale-out start while the function's only READY instance is busy is cold",
        "knative-default",
        (3.0, 60.0, 60.5, 200.0),
        end_s=330.0,
        service_s=3.0,  # the new instance is READY (62.5) before the busy one is free (63)
    ),
    Case(
        "hybrid-histogram: the 4-hour fallback until 10 idle times, then unload after each call and pre-warm "
        "at the head of the idle times",
        "hybrid-histogram",
        every(150.0, 14),
        end_s=2200.0,
        prewarms=True,
    ),
    Case(
        "forecast: a young timer is held the budget after each call, then pre-warmed before each one "
        "(at target 1, a second instance is held ahead of each call's rising concurrency)",
        "forecast",
        every(150.0, 9),
        end_s=1500.0,
        prewarms=True,
    ),
]


@dataclass(frozen=True)
class Outcome:
    """What both sides are compared on (one function)."""

    starts: int
    cold: int  # requests that waited for an instance start
    waited: int  # requests that waited at all (cold, or for room on a busy READY instance)
    wait_max_s: float
    instance_s: float
    idle_s: float  # alive with nothing in flight, the start included (the simulator's definition)


# -- the simulator's side -------------------------------------------------------------------------------


def simulated(case: Case) -> Outcome:
    config = SimConfig(
        spec=SimSpec(
            min_instances=0,
            max_instances=case.max_instances,
            target_concurrency=case.target_concurrency,
            idle_timeout_s=case.idle_timeout_s,
        ),
        costs=CostModel(fixed_s=case.start_s, snapshot_gb=0.0),
        service=ServiceModel(service_s=case.service_s),
        end_s=case.end_s,
    )
    result = simulate([Arrival(FN, t) for t in case.arrivals], make_policy(case.policy), config)
    (fn,) = result.per_function
    return Outcome(
        starts=fn.instance_starts,
        cold=fn.cold_starts,
        waited=result.cold_starts + result.queued,
        wait_max_s=result.wait_max_s,
        instance_s=fn.instance_seconds,
        idle_s=fn.idle_instance_seconds,
    )


# -- the gateway's side: a fake timeline, a pool whose instances take start_s, a controller ---------------


class FakeTime:
    """The gateway's monotonic clock (`clock`: the timeline's t), its wall clock (`wall`: EPOCH + t),
    and sleeps on the timeline (`sleep_until`), woken by the test as it moves t (`wake_due`)."""

    def __init__(self) -> None:
        self.t = 0.0
        self._sleepers: list[tuple[float, int, asyncio.Future[None]]] = []
        self._seq = 0
        self.parked: set[asyncio.Task[Any]] = set()  # tasks waiting for the timeline, nothing else

    def clock(self) -> float:
        return self.t

    def wall(self) -> float:
        return EPOCH + self.t

    async def sleep_until(self, at: float) -> None:
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._seq += 1
        heapq.heappush(self._sleepers, (at, self._seq, fut))
        task = asyncio.current_task()
        assert task is not None
        self.parked.add(task)
        try:
            await fut
        finally:
            self.parked.discard(task)

    def next_wake(self) -> float | None:
        return self._sleepers[0][0] if self._sleepers else None

    def wake_due(self) -> None:
        while self._sleepers and self._sleepers[0][0] <= self.t:
            fut = heapq.heappop(self._sleepers)[2]
            if not fut.done():
                fut.set_result(None)


@dataclass
class Life:
    """One instance as the pool saw it, in timeline seconds."""

    id: str
    started: float
    ready: float | None = None
    stopped: float | None = None


class TimedPool(InstancePool):
    """Instances with no process that become READY `start_s` after they were started, on the timeline;
    `on_ready(seconds)` hears how long each start took (the controller's cold-start record)."""

    def __init__(self, log_dir: Path, time: FakeTime, start_s: float, on_ready: Callable[[float], None]) -> None:
        super().__init__(log_dir, start_method="spawn")
        self.time = time
        self.start_s = start_s
        self.on_ready = on_ready
        self.lives: dict[str, Life] = {}

    async def start(self, revision: RevisionLike) -> Instance:
        inst = Instance(
            id=f"{revision.revision_id}-{len(self.lives) + 1}",
            revision_id=revision.revision_id,
            port=0,
            url="http://127.0.0.1:0",
            log_path=self.log_dir / "timed.log",
        )
        self._register(inst)
        self.lives[inst.id] = Life(inst.id, self.time.t)
        return inst

    async def wait_ready(
        self, inst: Instance, timeout_s: float, on_accepting: Callable[[Instance], None] | None = None
    ) -> bool:
        life = self.lives[inst.id]
        await self.time.sleep_until(life.started + self.start_s)
        inst.state = InstanceState.READY
        life.ready = self.time.t
        self.on_ready(life.ready - life.started)
        return True

    async def stop(self, inst: Instance, drain_timeout_s: float = 30.0) -> None:
        inst.state = InstanceState.STOPPED
        self.lives[inst.id].stopped = self.time.t


class Controller:
    """The pre-warm controller reduced to what decides: the function's history, folded from the
    gateway's records as they are made, its policy, and the floor handed to the gateway at once."""

    def __init__(self, policy: Policy, spec: Spec) -> None:
        self.policy = policy
        self.spec = spec
        self.history = DemandHistory()
        self.recheck_t: float | None = None  # the plan's recheck_at, in timeline seconds

    def plan(self, gw: Gateway, t: float) -> None:
        """Plan at the timeline's `t` (EPOCH + t in Unix time) and hand the floor on. A recheck asked
        for earlier and not yet due is kept when this plan asks for a later one (as the controller's
        `decide_now` keeps the earliest)."""
        now = EPOCH + t
        plan = self.policy.plan(FN, self.history, self.spec, now)
        gw.set_floor(FN, plan.floor)
        if self.recheck_t is not None and self.recheck_t <= t:
            self.recheck_t = None  # this plan is that recheck
        if plan.recheck_at is not None and plan.recheck_at > now:
            again = plan.recheck_at - EPOCH
            self.recheck_t = again if self.recheck_t is None else min(self.recheck_t, again)


@dataclass(frozen=True)
class Served:
    arrival: float
    cold: bool
    wait_s: float
    instance: str


async def settle(gw: Gateway, time: FakeTime) -> None:
    """Let every task run until it waits for the timeline (or for a change only the timeline brings):
    the gateway's background work (starts, stops, registry reads in a thread) and the requests."""
    for _ in range(1000):
        for _ in range(12):
            await asyncio.sleep(0)
        busy = [t for t in gw._starts if not t.done() and t not in time.parked]
        if not busy:
            return
        await asyncio.wait(busy, timeout=0.005)
    raise AssertionError("the gateway's background work did not settle")


async def request(gw: Gateway, time: FakeTime, call: Call, service_s: float, served: list[Served]) -> None:
    inst, _, cold, wait_s = await gw.acquire(FN, call=call)
    served.append(Served(time.t - wait_s, cold, wait_s, inst.id))
    await time.sleep_until(time.t + service_s)
    gw.release(inst)


@dataclass(frozen=True)
class GatewayRun:
    outcome: Outcome
    lives: list[Life]
    served: list[Served]
    prewarm_hits: float


async def on_gateway(case: Case, registry: Registry, log_dir: Path) -> GatewayRun:
    time = FakeTime()
    ctl: Controller | None = None

    def ready(seconds: float) -> None:
        assert ctl is not None
        ctl.history.observe_cold_start(seconds)

    pool = TimedPool(log_dir, time, case.start_s, ready)
    gw = Gateway(registry, pool, clock=time.clock, wall=time.wall)
    rev: Revision = await gw.serving_revision(FN)
    ctl = Controller(make_policy(case.policy), rev.scaling)
    ctl.plan(gw, time.t)
    gw.scale_once()
    await settle(gw, time)
    arrivals = deque(case.arrivals)
    served: list[Served] = []
    requests: list[asyncio.Task[None]] = []
    scale_at: float | None = None
    for _ in range(100_000):
        tick = (math.floor(time.t / REAP_INTERVAL_S) + 1) * REAP_INTERVAL_S
        due = [arrivals[0] if arrivals else None, time.next_wake(), ctl.recheck_t, scale_at, tick]
        time.t = min(t for t in due if t is not None)
        if time.t > case.end_s:
            break
        # what falls due at t comes before a request arriving at t, as in the simulator: instances
        # becoming READY and requests ending, then the controller's recheck and the scale pass
        time.wake_due()
        await settle(gw, time)
        if ctl.recheck_t is not None and ctl.recheck_t <= time.t:
            ctl.plan(gw, time.t)
        gw.scale_once()
        await settle(gw, time)
        while arrivals and arrivals[0] <= time.t:
            arrivals.popleft()
            call = gw.begin(FN)
            requests.append(asyncio.create_task(request(gw, time, call, case.service_s, served)))
            await settle(gw, time)
            assert call.known, "the request did not reach the gateway"
            ctl.history.observe(call.arrival, call.concurrency)  # what DemandStore.fold does with its record
            ctl.plan(gw, time.t)
            await settle(gw, time)
        decision = decide(rev.scaling, gw.observed(rev), gw.floors.local(FN, time.t), time.t)
        assert isinstance(decision, Decision)
        scale_at = decision.next_at
    else:
        raise AssertionError("the timeline did not reach its end")
    time.t = case.end_s
    assert all(r.done() for r in requests), "a request was still in flight at the end"
    gw.refresh_metrics()  # the idle instance-seconds, counted up to the end
    lives = list(pool.lives.values())
    assert all(life.ready is not None for life in lives), "an instance was still starting at the end"
    idle = gw.metrics.get_sample_value("kold_gateway_idle_instance_seconds_total", {"function": FN}) or 0.0
    outcome = Outcome(
        starts=len(lives),
        cold=sum(s.cold for s in served),
        waited=sum(s.wait_s > 0 for s in served),
        wait_max_s=max((s.wait_s for s in served), default=0.0),
        instance_s=sum(
            min(life.stopped if life.stopped is not None else case.end_s, case.end_s) - life.started for life in lives
        ),
        idle_s=idle,
    )
    hits = gw.metrics.get_sample_value("kold_gateway_prewarm_hits_total", {"function": FN}) or 0.0
    await gw.close()
    return GatewayRun(outcome, lives, served, hits)


# -- the test -------------------------------------------------------------------------------------------


@pytest.fixture
def registry(redis_client: redis.Redis, redis_prefix: str) -> Registry:
    return Registry(redis_client, prefix=redis_prefix)


def deploy(registry: Registry, case: Case) -> None:
    spec = ScalingSpec(
        min_instances=0,
        max_instances=case.max_instances,
        target_concurrency=case.target_concurrency,
        idle_timeout_s=case.idle_timeout_s,
        prewarm=case.policy,
    )
    rev = registry.create_revision(FN, URI, scaling=spec, runtime=RuntimeSpec())
    registry.set_traffic(FN, rev.revision_id)


@pytest.mark.parametrize(
    "case",
    [pytest.param(c, marks=pytest.mark.xfail(strict=True, reason=c.gap)) if c.gap else c for c in CASES],
    ids=lambda c: c.name,
)
def test_the_simulator_and_the_gateway_make_the_same_decisions(case: Case, registry: Registry, tmp_path: Path) -> None:
    deploy(registry, case)
    run = asyncio.run(on_gateway(case, registry, tmp_path))
    live, sim = run.outcome, simulated(case)
    timeline = (run.lives, run.served)  # the gateway's, shown when the two disagree
    assert live.starts == sim.starts, (live, sim, timeline)
    assert live.cold == sim.cold and live.waited == sim.waited, (live, sim, timeline)
    assert live.wait_max_s == pytest.approx(sim.wait_max_s, abs=TOL_S), (live, sim, timeline)
    assert live.instance_s == pytest.approx(sim.instance_s, abs=TOL_S), (live, sim, timeline)
    assert live.idle_s == pytest.approx(sim.idle_s, abs=TOL_S), (live, sim, timeline)
    # the timeline exercises what its name says: more than one start, some requests warm, and a
    # pre-warm where the policy makes one (a floor's start that a request then found READY)
    assert live.starts > 1 and live.cold < len(case.arrivals), (live, timeline)
    assert (run.prewarm_hits > 0) == case.prewarms, timeline
