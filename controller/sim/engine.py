"""The discrete-event engine: arrivals in trace order, and a heap of instance-ready, request-done and
recheck events between them.

Each function has its own DemandHistory, floor, instances and FIFO queue; the one Policy object plans for
all of them, as the live controller's does. What happens at each event:
- arrival: history.observe(t, concurrency); plan = policy.plan(...); the request goes to the least-loaded
  READY instance with room, else it waits; then decide(spec, observed, plan.floor, t) and act on it
  (started instances become READY after the cost model's start time; the listed idle ones stop);
- instance ready: history.observe_cold_start(start_s); it takes waiting requests, oldest first;
- request done: the instance takes the next waiting request, or goes idle;
- recheck: plan and decide again, at the earliest of Decision.next_at, Plan.recheck_at and an idle
  instance's timeout falling due (a function has at most one recheck that counts; later ones made stale
  by an earlier decision are skipped when they come up).

A request that finds no READY instance with room waits; it is a cold start when the instance that takes it
became READY after it arrived (it waited for an instance start), and a queued one otherwise.
Idle instance-seconds: an instance alive with nothing in flight, its start and pre-warmed time included.
"""

from __future__ import annotations

import heapq
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from kold.controller.history import DemandHistory
from kold.controller.policies.base import Policy
from kold.controller.records import Arrival
from kold.controller.scaling import READY, STARTING, Decision, Floor, InstanceView, Observed, decide
from kold.controller.sim.model import SimConfig

Progress = Callable[[int, int], None]  # (arrivals done, arrivals in all)
PROGRESS_EVERY = 1 << 14

_READY, _DONE, _RECHECK = 0, 1, 2


@dataclass(frozen=True, slots=True)
class FunctionStats:
    name: str
    invocations: int
    cold_starts: int
    instance_starts: int
    instance_seconds: float
    idle_instance_seconds: float

    def to_dict(self) -> dict[str, Any]:
        return {
            "function": self.name,
            "invocations": self.invocations,
            "cold_starts": self.cold_starts,
            "instance_starts": self.instance_starts,
            "instance_seconds": round(self.instance_seconds, 3),
            "idle_instance_seconds": round(self.idle_instance_seconds, 3),
        }


@dataclass(frozen=True, slots=True)
class SimResult:
    """One run's totals. `wall_s` is how long the simulation itself took (not part of its outcome)."""

    policy: str
    functions: int
    invocations: int
    cold_starts: int
    queued: int  # waited for room on an instance that was already READY (not a cold start)
    wait_p50_s: float
    wait_p99_s: float
    wait_max_s: float
    idle_instance_seconds: float
    instance_seconds: float
    instance_starts: int
    simulated_s: float
    wall_s: float
    per_function: tuple[FunctionStats, ...] = ()

    @property
    def cold_start_rate(self) -> float:
        return self.cold_starts / self.invocations if self.invocations else 0.0

    def to_dict(self, *, per_function: bool = False) -> dict[str, Any]:
        out: dict[str, Any] = {
            "policy": self.policy,
            "functions": self.functions,
            "invocations": self.invocations,
            "cold_starts": self.cold_starts,
            "cold_start_rate": round(self.cold_start_rate, 6),
            "queued": self.queued,
            "wait_p50_s": round(self.wait_p50_s, 6),
            "wait_p99_s": round(self.wait_p99_s, 6),
            "wait_max_s": round(self.wait_max_s, 6),
            "idle_instance_seconds": round(self.idle_instance_seconds, 3),
            "instance_seconds": round(self.instance_seconds, 3),
            "instance_starts": self.instance_starts,
            "simulated_s": round(self.simulated_s, 3),
            "wall_s": round(self.wall_s, 3),
        }
        if per_function:
            out["per_function"] = [f.to_dict() for f in self.per_function]
        return out


class _Instance:
    __slots__ = ("id", "idle_from", "idle_since", "in_flight", "ready_at", "started", "state", "view")

    def __init__(self, ident: str, now: float) -> None:
        self.id = ident
        self.state = STARTING
        self.in_flight = 0
        self.idle_since: float | None = None  # what the decider reads: None while busy or starting
        self.idle_from: float | None = now  # when its current idle stretch began (starting counts), None while busy
        self.started = now
        self.ready_at = float("inf")
        self.view: InstanceView | None = None  # what the decider is shown; None once it changed

    def observed(self) -> InstanceView:
        view = self.view
        if view is None:
            view = self.view = InstanceView(self.id, self.state, self.in_flight, self.idle_since)
        return view


class _Function:
    __slots__ = (
        "cold",
        "floor",
        "history",
        "idle_s",
        "instance_s",
        "instances",
        "invocations",
        "load",
        "name",
        "queue",
        "recheck_at",
        "starts",
    )

    def __init__(self, name: str) -> None:
        self.name = name
        self.history = DemandHistory()
        self.instances: list[_Instance] = []
        self.queue: deque[tuple[float, float]] = deque()  # (arrival, service seconds), oldest first
        self.floor: Floor | None = None
        self.recheck_at: float | None = None  # the recheck that counts; others in the heap are stale
        self.load = 0  # requests in flight
        self.invocations = 0
        self.cold = 0
        self.starts = 0
        self.instance_s = 0.0
        self.idle_s = 0.0


class _Sim:
    def __init__(self, policy: Policy, config: SimConfig) -> None:
        self.policy = policy
        self.spec = config.spec
        self.start_s = config.costs.start_s
        self.service = config.service
        self.conc = config.instance_concurrency
        self.functions: dict[str, _Function] = {}
        self.heap: list[tuple[float, int, int, _Function, _Instance | None]] = []
        self.seq = 0
        self.waits: list[float] = []  # the waits above 0 (most are 0: counted, not stored)
        self.cold = 0
        self.queued = 0
        self.outstanding = 0  # requests not done yet
        self.next_id = 0

    # -- events --

    def push(self, t: float, kind: int, fn: _Function, inst: _Instance | None) -> None:
        self.seq += 1
        heapq.heappush(self.heap, (t, self.seq, kind, fn, inst))

    def arrive(self, a: Arrival) -> None:
        t = a.t
        fn = self.functions[a.function]
        fn.invocations += 1
        self.outstanding += 1
        fn.history.observe(t, fn.load + len(fn.queue) + 1)
        plan = self.policy.plan(fn.name, fn.history, self.spec, t)
        fn.floor = plan.floor
        service = self.service.of(a)
        best: _Instance | None = None
        for inst in fn.instances:
            if inst.state == READY and inst.in_flight < self.conc and (best is None or inst.in_flight < best.in_flight):
                best = inst
                if not inst.in_flight:
                    break
        if best is not None:
            self.serve(fn, best, t, t, service)
        else:
            fn.queue.append((t, service))
        self.decide(fn, t, plan.recheck_at)

    def serve(self, fn: _Function, inst: _Instance, now: float, arrival: float, service: float) -> None:
        if inst.idle_from is not None:
            fn.idle_s += now - inst.idle_from
            inst.idle_from = None
            inst.idle_since = None
        inst.in_flight += 1
        inst.view = None
        fn.load += 1
        if now > arrival:
            self.waits.append(now - arrival)
            if inst.ready_at > arrival:
                self.cold += 1
                fn.cold += 1
            else:
                self.queued += 1
        self.push(now + service, _DONE, fn, inst)

    def done(self, fn: _Function, inst: _Instance, now: float) -> None:
        inst.in_flight -= 1
        inst.view = None
        fn.load -= 1
        self.outstanding -= 1
        if fn.queue:
            arrival, service = fn.queue.popleft()
            self.serve(fn, inst, now, arrival, service)
        elif not inst.in_flight:
            inst.idle_since = inst.idle_from = now
            self.recheck_later(fn, now)

    def ready(self, fn: _Function, inst: _Instance, now: float) -> None:
        inst.state = READY
        inst.ready_at = now
        inst.view = None
        fn.history.observe_cold_start(self.start_s)
        queue = fn.queue
        while queue and inst.in_flight < self.conc:
            arrival, service = queue.popleft()
            self.serve(fn, inst, now, arrival, service)
        if not inst.in_flight:
            inst.idle_since = now
            inst.view = None
            self.recheck_later(fn, now)

    def recheck(self, fn: _Function, now: float) -> None:
        if fn.recheck_at != now:
            return  # superseded by a later decision
        fn.recheck_at = None
        plan = self.policy.plan(fn.name, fn.history, self.spec, now)
        fn.floor = plan.floor
        self.decide(fn, now, plan.recheck_at)

    def recheck_at_start(self, fn: _Function) -> None:
        plan = self.policy.plan(fn.name, fn.history, self.spec, 0.0)
        fn.floor = plan.floor
        self.decide(fn, 0.0, plan.recheck_at)

    def recheck_later(self, fn: _Function, now: float) -> None:
        """An instance went idle: the answer may change when its idle timeout falls due."""
        timeout = self.spec.idle_timeout_s
        floor = fn.floor
        if floor is not None and floor.idle_timeout_s is not None and floor.holds(now):
            timeout = min(timeout, floor.idle_timeout_s)
        self.schedule(fn, now + timeout)

    def schedule(self, fn: _Function, at: float) -> None:
        if fn.recheck_at is None or at < fn.recheck_at:
            fn.recheck_at = at
            self.push(at, _RECHECK, fn, None)

    # -- the decider, and acting on it --

    def decide(self, fn: _Function, now: float, recheck_at: float | None) -> None:
        views = [i.view or i.observed() for i in fn.instances]
        decision = decide(self.spec, Observed(views, len(fn.queue), 0), fn.floor, now)
        assert isinstance(decision, Decision)  # an observation is always there
        for _ in range(decision.start):
            self.next_id += 1
            inst = _Instance(str(self.next_id), now)
            fn.instances.append(inst)
            fn.starts += 1
            self.push(now + self.start_s, _READY, fn, inst)
        if decision.stop:
            for ident in decision.stop:
                self.stop(fn, ident, now)
        nxt = decision.next_at
        if recheck_at is not None and recheck_at > now and (nxt is None or recheck_at < nxt):
            nxt = recheck_at
        if nxt is not None and nxt > now:
            self.schedule(fn, nxt)

    def stop(self, fn: _Function, ident: str, now: float) -> None:
        for k, inst in enumerate(fn.instances):
            if inst.id == ident:
                del fn.instances[k]
                self.close(fn, inst, now)
                return

    @staticmethod
    def close(fn: _Function, inst: _Instance, now: float) -> None:
        fn.instance_s += now - inst.started
        if inst.idle_from is not None:
            fn.idle_s += now - inst.idle_from
            inst.idle_from = None

    def event(self, ev: tuple[float, int, int, _Function, _Instance | None]) -> None:
        t, _, kind, fn, inst = ev
        if kind == _DONE:
            assert inst is not None
            self.done(fn, inst, t)
        elif kind == _READY:
            assert inst is not None
            self.ready(fn, inst, t)
        else:
            self.recheck(fn, t)


def simulate(
    arrivals: Sequence[Arrival],
    policy: Policy,
    config: SimConfig | None = None,
    *,
    label: str | None = None,
    progress: Progress | None = None,
) -> SimResult:
    """Run `arrivals` (sorted by `t`, from 0) through `policy` and the decider; the totals, under `label`
    (default: the policy's name). Every function is planned for and decided on at 0 too, so min_instances
    and a policy's first pre-warm hold from the start, as they do on the platform. ValueError when the
    arrivals go backwards in time."""
    config = config or SimConfig()
    began = time.perf_counter()
    sim = _Sim(policy, config)
    for name in dict.fromkeys(a.function for a in arrivals):
        fn = sim.functions[name] = _Function(name)
        sim.recheck_at_start(fn)
    heap = sim.heap
    pop = heapq.heappop
    event = sim.event
    last = float("-inf")
    total = len(arrivals)
    for n, a in enumerate(arrivals):
        t = a.t
        if t < last:
            raise ValueError(f"arrivals must be sorted by time: arrival {n} at {t} s comes after {last} s")
        last = t
        while heap and heap[0][0] <= t:
            event(pop(heap))
        sim.arrive(a)
        if progress is not None and not n % PROGRESS_EVERY:
            progress(n, total)
    horizon = max(config.end_s or 0.0, last if total else 0.0)
    now = horizon
    while heap:
        if heap[0][0] > horizon and not sim.outstanding:
            break
        ev = pop(heap)
        now = max(now, ev[0])
        event(ev)
    end = max(horizon, now)
    for fn in sim.functions.values():
        for inst in fn.instances:
            sim.close(fn, inst, end)
    if progress is not None:
        progress(total, total)
    return _result(sim, label or policy.name, total, end, time.perf_counter() - began)


def _result(sim: _Sim, label: str, total: int, end: float, wall_s: float) -> SimResult:
    waits = sorted(sim.waits)
    zeros = total - len(waits)
    stats = tuple(
        FunctionStats(fn.name, fn.invocations, fn.cold, fn.starts, fn.instance_s, fn.idle_s)
        for fn in sim.functions.values()
    )
    return SimResult(
        policy=label,
        functions=len(sim.functions),
        invocations=total,
        cold_starts=sim.cold,
        queued=sim.queued,
        wait_p50_s=_percentile(waits, zeros, 50),
        wait_p99_s=_percentile(waits, zeros, 99),
        wait_max_s=waits[-1] if waits else 0.0,
        idle_instance_seconds=sum(f.idle_instance_seconds for f in stats),
        instance_seconds=sum(f.instance_seconds for f in stats),
        instance_starts=sum(f.instance_starts for f in stats),
        simulated_s=end,
        wall_s=wall_s,
        per_function=stats,
    )


def _percentile(nonzero_sorted: list[float], zeros: int, q: float) -> float:
    """Percentile q (linear between ranks, as numpy's default) of `zeros` zeros and the sorted rest."""
    n = zeros + len(nonzero_sorted)
    if n == 0:
        return 0.0
    rank = q / 100 * (n - 1)
    low = int(rank)
    high = min(low + 1, n - 1)

    def at(i: int) -> float:
        return 0.0 if i < zeros else nonzero_sorted[i - zeros]

    return at(low) + (at(high) - at(low)) * (rank - low)
