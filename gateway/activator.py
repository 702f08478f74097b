"""The activator: per-function state, holding requests while a function is cold, and scaling.

A request asks `acquire(name)` for an instance of the function's serving revision. It gets the least
loaded instance that has room under `target_concurrency` (a READY one, or one still restoring that
already takes requests); when every instance is full and more are starting, it is held (not failed)
until one has room, and with no instance at all until one can take it or the revision's
`request_timeout_s` passes (503 + Retry-After). At max_instances the target is soft: the least
loaded READY instance takes the request and the runtime queues it.

Scaling is split as Knative's autoscaler is: collect -> decide -> act. `observed(rev)` collects what
the pool shows (instances by state, in flight, idle since; held requests; starts not spawned yet);
`kold.controller.scaling.decide` (pure, shared with the controller and the simulator) decides how
many instances to run and which idle ones to stop; the gateway acts (spawns the missing starts,
drains the stops). Two callers ask: the request path (`ensure_capacity` at every acquire: it only
starts, so a burst at a cold function starts as many instances as its concurrency needs, counted
synchronously) and the scale pass (`scale_once`, every REAP_INTERVAL_S, and at once after a floor
changes: starts and stops). Floors are what the pre-warm controller holds per function
(`set_floor`, Unix time in, the gateway's clock inside): the scale pass keeps what a floor holds.
Only the outer loops read the clock (`clock`, injected; `wall` for Unix times), so the same code runs
under a test's fake clock. Revisions that no longer serve are decided with no minimum and no floor.

Every request and every instance start is recorded for the controller (gateway/recorder.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics
from redis.exceptions import RedisError

from kold.controller import scaling
from kold.controller.scaling import Decision, Floor, InstanceView, Observed, Spec, decide
from kold.gateway.capacity import Footprint, NodeCapacity, total
from kold.gateway.floors import MAX_FLOOR_INSTANCES, FloorTable
from kold.gateway.names import validate_function_name
from kold.gateway.pool import Instance, InstancePool, InstanceState
from kold.gateway.recorder import Call, DemandWriter, Recorder, cold_start_record
from kold.gateway.registry import Registry, Revision, RuntimeSpec, ScalingSpec
from kold.gateway.startfailures import RevisionFailure, StartFailures
from kold.runtime.protocol import ModelNotFoundError, UnavailableError

log = logging.getLogger("kold.gateway.activator")

SERVING_CACHE_S = 1.0
REGISTRY_PROBE_S = 0.5  # while Redis is unreachable, how often the gateway asks again
REAP_INTERVAL_S = 0.25
MISSING_REREAD_S = 1.0  # how often a floor's function that the registry says does not exist is read again
DRAIN_TIMEOUT_S = 30.0


class RegistryUnavailableError(UnavailableError):
    """Redis cannot be reached and the gateway has nothing cached to go on."""

    code = "registry_unavailable"


class RevisionFailedError(UnavailableError):
    """The serving revision's instances keep failing to start; `code` is their cause."""

    def __init__(self, rev_id: str, failure: RevisionFailure, now: float) -> None:
        retry = max(1, math.ceil(failure.retry_at - now))
        super().__init__(
            f"revision {rev_id} cannot start: {failure.error} ({failure.count} failed starts; the next in {retry} s; "
            f"roll back or deploy a fixed revision)",
            code=failure.code,
        )
        self.retry_after = retry


class ColdStartTimeoutError(UnavailableError):
    code = "cold_start_timeout"
    retry_after = 5


@dataclass
class FunctionState:
    """What the activator tracks per function (all touched from the event loop only)."""

    waiting: int = 0  # requests held for want of an instance with room
    active: int = 0  # requests acquired and not released yet (on any revision)
    pending: dict[str, int] = field(default_factory=dict)  # revision id -> starts not yet spawned
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    def notify(self) -> None:
        self.changed.set()
        self.changed = asyncio.Event()


@dataclass(frozen=True, slots=True)
class _Retiring:
    """What `decide` reads of a revision that no longer serves: its spec with no minimum, so its
    instances go once idle (and its in-flight requests keep what they need meanwhile)."""

    max_instances: int
    target_concurrency: int
    idle_timeout_s: float
    min_instances: int = 0

    @classmethod
    def of(cls, spec: ScalingSpec) -> _Retiring:
        return cls(spec.max_instances, spec.target_concurrency, spec.idle_timeout_s)


class Gateway:
    """Per-function state over a registry and an instance pool.

    `clock` (monotonic seconds) is the only clock the scaling reads, and `wall` (Unix seconds) the one
    records and floors are written in; both injected so tests run the scaler on a fake timeline.
    `demand` (kold.controller.demand.DemandStore) receives the invocation and cold-start records
    (None: none kept). `on_cold(function, arrival, concurrency)` is called on the event loop, and must
    not block, when a request arrives at a function with no READY instance (the controller's poke): it
    carries the request's Unix arrival and its concurrency at arrival, as its Invocation record will,
    so the controller plans with the request before the record is written (at the request's end)."""

    def __init__(
        self,
        registry: Registry,
        pool: InstancePool,
        *,
        metrics: CollectorRegistry | None = None,
        capacity: NodeCapacity | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
        demand: DemandWriter | None = None,
        on_cold: Callable[[str, float, int], None] | None = None,
    ) -> None:
        self.registry = registry
        self.pool = pool
        self.clock = clock
        self.wall = wall
        self.demand = demand
        self.on_cold = on_cold
        # the node's resources; None: unbounded (instances start as the load asks, up to max_instances)
        self.capacity = capacity
        self._no_room: dict[str, str] = {}  # function -> what its last wanted start was short of
        if pool.on_failure is None:
            pool.on_failure = self._on_failure
        self.functions: dict[str, FunctionState] = {}
        self.floors = FloorTable()
        self._revisions: dict[str, Revision] = {}  # immutable: cached for good
        self._serving: dict[str, tuple[float, Revision]] = {}  # name -> (fresh until, revision)
        self._refreshing: set[str] = set()  # functions whose serving revision is being re-read
        # function -> clock time the registry last said it does not exist (functions a floor names)
        self._missing: dict[str, float] = {}
        # functions whose floors are ignored: being removed (until they are gone), or scaled to zero by
        # an admin (until their next request: a cold-start measurement must find them cold)
        self._floor_paused: set[str] = set()
        # instance id -> clock time it last became idle (nothing in flight); only live READY instances:
        # what the decider's idle timeout counts from
        self._idle_since: dict[str, float] = {}
        # instance id -> clock time its idle instance-seconds are counted up to; every live instance
        # with nothing in flight, STARTING ones from when their start was asked for (the metric's)
        self._idle_from: dict[str, float] = {}
        self._ready_at: dict[str, float] = {}  # instance id -> clock time it became READY (live ones)
        self._prewarmed: set[str] = set()  # instances a floor started that have served nothing yet
        self.start_failures = StartFailures()
        self._request_labels: dict[str, set[tuple[str, str]]] = {}  # function -> (cold, status) it was counted with
        self._tasks: list[asyncio.Task[None]] = []
        self._starts: set[asyncio.Task[Any]] = set()
        self._redis_down_logged = False
        # True from a failed Redis call until the probe reaches Redis again: meanwhile the data path
        # decides from what it knows at once, instead of each request waiting out the Redis client's
        # timeouts and retries (seconds) first
        self.registry_down = False
        self._probe: asyncio.Task[None] | None = None
        self.metrics = metrics if metrics is not None else CollectorRegistry()
        disable_created_metrics()  # type: ignore[no-untyped-call]  # no `_created` series: they double every family for a value nobody reads
        self.m_requests = Counter(
            "kold_gateway_requests",
            "Requests on the data path, by function (empty: not a known function), cold start and HTTP status",
            ["function", "cold", "status"],
            registry=self.metrics,
        )
        self.m_latency = Histogram(
            "kold_gateway_request_duration_seconds",
            "From a request's arrival to the end of its answer (a stream's last byte)",
            ["function", "cold"],
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300),
            registry=self.metrics,
        )
        self.m_dropped = Counter(
            "kold_gateway_invocation_records_dropped",
            "Demand records (invocations, cold starts) not written",
            registry=self.metrics,
        )
        self.m_starts = Counter(
            "kold_gateway_instance_starts", "Instances started", ["function"], registry=self.metrics
        )
        self.m_stops = Counter(
            "kold_gateway_instance_stops", "Instances scaled in", ["function"], registry=self.metrics
        )
        self.m_prewarm_starts = Counter(
            "kold_gateway_prewarm_starts",
            "Instances started because a floor (the pre-warm controller's, or an admin pre-warm) asked for them",
            ["function"],
            registry=self.metrics,
        )
        self.m_prewarm_hits = Counter(
            "kold_gateway_prewarm_hits",
            "Pre-warmed instances that served a request before being stopped",
            ["function"],
            registry=self.metrics,
        )
        self.m_idle = Counter(
            "kold_gateway_idle_instance_seconds",
            "Instance-seconds alive with nothing in flight: READY, or STARTING from when the start was asked for "
            "(as the simulator counts them; pre-warmed time included)",
            ["function"],
            registry=self.metrics,
        )
        self.m_waiting = Gauge("kold_gateway_waiting", "Requests held for a cold function", registry=self.metrics)
        self.m_registry_down = Gauge(
            "kold_gateway_registry_unreachable", "1 while Redis (the registry) cannot be reached", registry=self.metrics
        )
        self.m_wait = Histogram(
            "kold_gateway_wait_seconds",
            "Time a request waited for a ready instance (a cold start's wait, ~0 when warm)",
            ["function", "cold"],
            buckets=(0.001, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120, 300),
            registry=self.metrics,
        )
        self.m_instances = Gauge(
            "kold_gateway_instances",
            "Live instances by function and state",
            ["function", "state"],
            registry=self.metrics,
        )
        self.m_streams_cut = Counter(
            "kold_gateway_streams_cut",
            "Streamed answers an instance broke off after bytes had gone out (ended with an SSE error event)",
            ["function"],
            registry=self.metrics,
        )
        self.m_failures = Counter(
            "kold_gateway_instance_failures", "Instances that exited unexpectedly", ["function"], registry=self.metrics
        )
        self.recorder = Recorder(demand, self.m_dropped)

    def refresh_instance_gauge(self) -> None:
        """Set `kold_gateway_instances` from the pool (called at scrape time: always current, no bookkeeping)."""
        counts: dict[tuple[str, str], int] = {}
        for inst in self.pool.instances():
            rev = self._revisions.get(inst.revision_id)
            if rev is not None and inst.alive:
                key = (rev.function, inst.state.value)
                counts[key] = counts.get(key, 0) + 1
        self.m_instances.clear()
        for fn in {f for f, _ in counts}:  # every live state of a function that has instances, zeros included
            for state in (InstanceState.STARTING, InstanceState.READY, InstanceState.DRAINING):
                self.m_instances.labels(fn, state.value).set(counts.get((fn, state.value), 0))

    def refresh_metrics(self) -> None:
        """What a scrape brings up to date: the instance gauge and the idle instance-seconds."""
        self.refresh_instance_gauge()
        self._account_idle(self.clock())

    # -- lifecycle ---------------------------------------------------------------------------------

    async def start(self) -> None:
        """Start the background work: the recorder, the scale pass loop, and, off the loop, reading every
        function's serving revision so that min_instances holds from start-up (not only after a
        function's first request); while Redis is away that is retried until it answers."""
        self.recorder.start()
        self._tasks = [
            asyncio.create_task(self._reap_loop(), name="kold-gateway-reaper"),
            asyncio.create_task(self._scale_at_start(), name="kold-gateway-startup"),
        ]
        for task in self._tasks:
            task.add_done_callback(_log_failure)

    async def close(self, drain_timeout_s: float = 5.0) -> None:
        probe = [self._probe] if self._probe is not None else []
        for t in [*self._tasks, *self._starts, *probe]:
            t.cancel()
        await asyncio.gather(*self._tasks, *self._starts, *probe, return_exceptions=True)
        await self.recorder.close()
        await self.pool.close(drain_timeout_s)

    def state(self, name: str) -> FunctionState:
        st = self.functions.get(name)
        if st is None:
            st = self.functions[name] = FunctionState()
        return st

    async def _scale_at_start(self) -> None:
        while True:
            try:
                known = await asyncio.to_thread(self._read_all_serving)
                break
            except RedisError as exc:
                self.redis_unreachable(exc)
                await asyncio.sleep(REGISTRY_PROBE_S)
        fresh_until = self.clock() + SERVING_CACHE_S
        for name, rev in known:
            self._revisions.setdefault(rev.revision_id, rev)
            self._serving.setdefault(name, (fresh_until, rev))  # a request may have read it meanwhile
        self.scale_once()

    def _read_all_serving(self) -> list[tuple[str, Revision]]:
        """Every function's serving revision (the latest where none serves yet), in one thread hop. A
        revision that cannot be read (garbled in Redis) is skipped with a warning: one function must not
        keep the others from their minimum; Redis being away is raised (the caller retries)."""
        out = []
        for fn in self.registry.list_functions():
            rev_id = fn.serving_revision or fn.latest_revision
            try:
                rev = self._revisions.get(rev_id) or self.registry.get_revision(rev_id)
            except RedisError:
                raise
            except Exception as exc:
                log.warning(
                    "cannot read revision %s of %s at start-up (%s): not scaled until it is", rev_id, fn.name, exc
                )
                continue
            if rev is not None:
                out.append((fn.name, rev))
        return out

    # -- revisions ---------------------------------------------------------------------------------

    async def revision(self, rev_id: str) -> Revision | None:
        rev = self._revisions.get(rev_id)
        if rev is None:
            rev = await asyncio.to_thread(self.registry.get_revision, rev_id)
            if rev is not None:
                self._revisions[rev_id] = rev
        return rev

    async def serving_revision(self, name: str) -> Revision:
        """The revision traffic goes to (the latest one while none is serving yet).

        Stale-while-revalidate: once a function's revision is known, requests never wait for Redis
        again; when the cached answer is older than SERVING_CACHE_S one background refresh is started
        and this request goes on with what is known. Only a function never seen waits for Redis."""
        cached = self._serving.get(name)
        if cached is not None:
            if cached[0] <= self.clock() and not self.registry_down:
                self._refresh_serving(name)
            return cached[1]
        try:
            return await self._read_serving(name)
        except RedisError as exc:
            self.redis_unreachable(exc)
            raise RegistryUnavailableError("the function registry (Redis) is unreachable") from None

    async def _read_serving(self, name: str) -> Revision:
        fn = await asyncio.to_thread(self.registry.get_function, name)
        if fn is None:
            self._serving.pop(name, None)
            raise ModelNotFoundError(f"the function {name!r} does not exist", param="model")
        rev = await self.revision(fn.serving_revision or fn.latest_revision)
        if rev is None:
            raise ModelNotFoundError(f"the function {name!r} has no revision", param="model")
        self._serving[name] = (self.clock() + SERVING_CACHE_S, rev)
        return rev

    def _refresh_serving(self, name: str) -> None:
        """One background refresh of a function's serving revision at a time; the function is scaled
        once it is known (a new serving revision, a floor set before the function was seen)."""
        if name in self._refreshing:
            return

        async def refresh() -> None:
            try:
                rev = await self._read_serving(name)
                self._missing.pop(name, None)
                self._scale(rev, self.clock(), serving=True)
            except RedisError as exc:
                self.redis_unreachable(exc)
            except ModelNotFoundError:  # removed: the next request finds no cached revision and gets 404
                self._missing[name] = self.clock()
            finally:
                self._refreshing.discard(name)

        self._refreshing.add(name)
        self.run_background(refresh())

    def redis_unreachable(self, exc: Exception) -> None:
        """A Redis call failed: say so once, and use what is known without asking Redis until it is back."""
        if not self._redis_down_logged:
            log.warning("Redis is unreachable (%s): serving from what the gateway already knows", exc)
            self._redis_down_logged = True
        self.registry_down = True
        self.m_registry_down.set(1)
        if self._probe is None or self._probe.done():
            self._probe = asyncio.get_running_loop().create_task(self._probe_registry(), name="kold-gateway-probe")

    async def _probe_registry(self) -> None:
        """Ping Redis every REGISTRY_PROBE_S until it answers (a refused connection fails at once)."""
        while True:
            try:
                await asyncio.to_thread(self.registry.ping)
            except RedisError:
                await asyncio.sleep(REGISTRY_PROBE_S)
                continue
            log.warning("Redis is reachable again")
            self.registry_down = False
            self._redis_down_logged = False
            self.m_registry_down.set(0)
            return

    def invalidate(self, name: str, *, reload: bool = True) -> None:
        """Forget the function's serving revision (traffic moved); with `reload`, read it again in the
        background so that its minimum and floor apply to the new one without waiting for a request."""
        self._serving.pop(name, None)
        if reload and _on_loop():
            self._refresh_serving(name)

    def _is_serving(self, rev: Revision) -> bool:
        """Whether `rev` is its function's serving revision (as far as the gateway knows: an unknown
        function's is taken to be)."""
        cached = self._serving.get(rev.function)
        return cached is None or cached[1].revision_id == rev.revision_id

    # -- collect -----------------------------------------------------------------------------------

    def observed(self, rev: Revision, extra: int = 0) -> Observed:
        """What the pool shows of `rev` now: its STARTING and READY instances (in flight, idle since),
        the function's held requests (when `rev` serves; `extra` more: a rollout's own) and the starts
        asked for but not spawned yet."""
        views = []
        for inst in self.pool.instances(rev.revision_id):
            if inst.state is InstanceState.READY:
                idle = None if inst.in_flight else self._idle_since.get(inst.id)
                views.append(InstanceView(inst.id, scaling.READY, inst.in_flight, idle))
            elif inst.state is InstanceState.STARTING:
                views.append(InstanceView(inst.id, scaling.STARTING, inst.in_flight))
        st = self.functions.get(rev.function)
        waiting = st.waiting if st is not None and self._is_serving(rev) else 0
        pending = st.pending.get(rev.revision_id, 0) if st is not None else 0
        return Observed(tuple(views), waiting + extra, pending)

    # -- decide and act ----------------------------------------------------------------------------

    def _decide(self, rev: Revision, observed: Observed, now: float, serving: bool) -> tuple[Decision, int]:
        """`decide` for `rev`, and how many of its starts only the floor asks for (pre-warms)."""
        spec: Spec = rev.scaling if serving else _Retiring.of(rev.scaling)
        floor = self.floors.local(rev.function, now) if serving else None
        decision = decide(spec, observed, floor, now)
        assert isinstance(decision, Decision)  # an observation was made: never NoData
        prewarm = 0
        if floor is not None and decision.start:
            without = decide(spec, observed, None, now)
            prewarm = decision.start - (without.start if isinstance(without, Decision) else 0)
        return decision, prewarm

    def ensure_capacity(self, rev: Revision, extra: int = 0) -> int:
        """The request path: start the instances `rev` is missing for its load, floor and minimum (no
        await: the count cannot race). Stopping is the scale pass's. Returns how many it started."""
        now = self.clock()
        observed = self.observed(rev, extra)
        decision, prewarm = self._decide(rev, observed, now, self._is_serving(rev))
        if not decision.start:
            return 0
        return self._start(rev, decision.start, prewarm, len(observed.instances) + observed.pending, now)

    def _scale(self, rev: Revision, now: float, *, serving: bool) -> int:
        """One revision's scale pass: decide, start what is missing, drain the idle instances to stop."""
        observed = self.observed(rev)
        idle = not (observed.instances or observed.pending or observed.waiting)
        if idle and (not serving or (not rev.scaling.min_instances and self.floors.local(rev.function, now) is None)):
            return 0  # nothing runs and nothing is wanted: skip the decision
        decision, prewarm = self._decide(rev, observed, now, serving)
        started = 0
        if decision.start:
            have = len(observed.instances) + observed.pending
            started = self._start(rev, decision.start, prewarm, have, now)
            if started:
                log.info("starting %d of %s (%s)", started, rev.revision_id, decision.reason)
        for inst_id in decision.stop:
            self._drain(rev, inst_id, now, decision.reason)
        return started

    def scale_once(self) -> None:
        """One scale pass over every function (the reaper's, and after a floor changes): each serving
        revision is decided with its spec and floor, each old revision with live instances with no
        minimum and no floor. A revision whose function's serving revision is unknown is not acted on
        (no guessing): its function is read again instead."""
        now = self.clock()
        self._account_idle(now)
        self.floors.expire(now)
        floored = self.floors.functions()
        for name in floored:
            if name not in self._serving and self._may_read(name, now):
                self._refresh_serving(name)
        if self._missing:
            self._missing = {name: at for name, at in self._missing.items() if name in floored}
        serving = set()
        for _, current in list(self._serving.values()):
            serving.add(current.revision_id)
            self._scale(current, now, serving=True)
        others = {i.revision_id for i in self.pool.instances() if i.state in _LIVE} - serving
        for rev_id in others:
            old = self._revisions.get(rev_id)
            if old is None:
                continue
            if old.function not in self._serving:
                if not self.registry_down:
                    self._refresh_serving(old.function)
                continue
            self._scale(old, now, serving=False)

    def _may_read(self, name: str, now: float) -> bool:
        """Whether to read a floor's function from the registry now: not while Redis is away, and not
        more than once every MISSING_REREAD_S while the registry says it does not exist (a floor can
        name a function deleted since, or not created yet)."""
        return not self.registry_down and now - self._missing.get(name, -math.inf) >= MISSING_REREAD_S

    def _start(self, rev: Revision, n: int, prewarm: int, have: int, now: float) -> int:
        """Spawn `n` instances (the last `prewarm` of them for a floor); while the revision's starts are
        failing, one at a time and only once its back-off has passed; none that does not fit the node."""
        if self.start_failures.get(rev.revision_id) is not None:
            if not self.start_failures.may_start(rev.revision_id, now):
                return 0
            n = min(n, max(0, 1 - have))
        started = 0
        for k in range(n):
            short = self._shortfall(rev)
            if short is not None:
                if self._no_room.get(rev.function) != short:
                    log.warning("no room on this node for another instance of %s: needs %s", rev.function, short)
                self._no_room[rev.function] = short
                break
            self._no_room.pop(rev.function, None)
            self._spawn(rev, prewarm=k >= n - prewarm, now=now)
            started += 1
        return started

    def _drain(self, rev: Revision, inst_id: str, now: float, reason: str) -> None:
        """Take an idle instance out of routing at once and stop it (the runtime drains on SIGTERM)."""
        inst = self.pool.get(inst_id)
        if inst is None or inst.state is not InstanceState.READY or inst.in_flight:
            return
        self._count_idle(inst.id, rev.function, now)
        idle = now - self._idle_since.get(inst.id, now)
        self._forget_instance(inst.id)
        log.info("scaling in %s (idle %.1fs; %s)", inst.id, idle, reason)
        self.m_stops.labels(rev.function).inc()
        inst.state = InstanceState.DRAINING
        self.run_background(self._stop(inst))

    @staticmethod
    def footprint_of(spec: RuntimeSpec) -> Footprint:
        return Footprint(spec.cpus, spec.memory_bytes, spec.gpu_count)

    @classmethod
    def footprint(cls, rev: Revision) -> Footprint:
        return cls.footprint_of(rev.runtime)

    def _shortfall(self, rev: Revision) -> str | None:
        """What another instance of `rev` is short of on this node (None: it fits, or no capacity is set).
        Instances count until their process is gone (a draining one still holds its memory), and so do
        starts not spawned yet."""
        if self.capacity is None:
            return None
        held = [
            self.footprint(r)
            for i in self.pool.instances()
            if i.alive and (r := self._revisions.get(i.revision_id)) is not None
        ]
        for st in self.functions.values():
            for rev_id, n in st.pending.items():
                if n > 0 and (r := self._revisions.get(rev_id)) is not None:
                    held.append(self.footprint(r) * n)
        return self.capacity.shortfall(total(held), self.footprint(rev))

    def _room_freed(self) -> None:
        """An instance's resources came back: wake the functions whose starts were waiting for room."""
        for name in list(self._no_room):
            st = self.functions.get(name)
            if st is not None:
                st.notify()

    async def _stop(self, inst: Instance) -> None:
        await self.pool.stop(inst, DRAIN_TIMEOUT_S)
        self._room_freed()

    # -- floors: the pre-warm controller's actuator ------------------------------------------------

    def set_floor(self, function: str, floor: Floor | None) -> None:
        """Hold `floor` for the function (its `until` in Unix time; None clears it), replacing the last
        one, and apply it at once with a scale pass of the function. ValueError (InvalidNameError for a
        bad name) names what is wrong. Called on the gateway's event loop."""
        validate_function_name(function)
        if function in self._floor_paused:
            return
        now = self.clock()
        self.floors.set(function, floor, now=now, wall=self.wall())
        cached = self._serving.get(function)
        if cached is not None:
            self._scale(cached[1], now, serving=True)
        elif floor is not None and self._may_read(function, now):
            self._refresh_serving(function)  # scaled once its serving revision is known

    def floor(self, function: str) -> Floor | None:
        """The function's floor as set (Unix `until`); None when unset or expired."""
        return self.floors.unix(function, self.clock())

    async def prewarm(self, name: str, instances: int = 1) -> int:
        """Have `instances` of the serving revision up or starting (capped at max_instances and at the
        floor limit) before demand arrives: a floor for the revision's idle timeout, so the pre-warmed
        instances are held by it and then scale in as idle ones do (a controller's next floor replaces
        it). Returns how many instances it started."""
        rev = await self.serving_revision(name)
        want = min(rev.scaling.max_instances, instances, MAX_FLOOR_INSTANCES)
        until = self.wall() + rev.scaling.idle_timeout_s
        self.floors.set(name, Floor(want, until, "pre-warmed by an admin"), now=self.clock(), wall=self.wall())
        return self._scale(rev, self.clock(), serving=self._is_serving(rev))

    # -- starting instances ------------------------------------------------------------------------

    def _spawn(self, rev: Revision, *, prewarm: bool, now: float) -> None:
        st = self.state(rev.function)
        st.pending[rev.revision_id] = st.pending.get(rev.revision_id, 0) + 1
        task = asyncio.create_task(self._start_instance(rev, prewarm, now), name=f"kold-start-{rev.revision_id}")
        self._starts.add(task)
        task.add_done_callback(self._starts.discard)

    async def _start_instance(self, rev: Revision, prewarm: bool, asked_at: float) -> None:
        st = self.state(rev.function)
        counted = True
        try:
            inst = await self.pool.start(rev)
            st.pending[rev.revision_id] -= 1  # from now on pool.instances() counts it
            counted = False
            if not inst.in_flight:  # idle from when its start was asked for, as the simulator counts it
                self._idle_from[inst.id] = asked_at
            self.m_starts.labels(rev.function).inc()
            if prewarm:
                self._prewarmed.add(inst.id)
                self.m_prewarm_starts.labels(rev.function).inc()
            if await self.pool.wait_ready(inst, rev.scaling.request_timeout_s, on_accepting=lambda _: st.notify()):
                now = self.clock()
                self._ready_at[inst.id] = now
                if not inst.in_flight:  # a request taken while it restored still runs
                    self._idle_since[inst.id] = now
                self.start_failures.succeeded(rev.revision_id)
                self.recorder.add(
                    cold_start_record(
                        rev.function, rev.revision_id, self.wall(), now - asked_at, inst.cold_start, inst.start_method
                    )
                )
            else:
                self._count_idle(inst.id, rev.function, self.clock())
                self._forget_instance(inst.id)
                await self.pool.stop(inst, 1.0)
                cause = inst.failure or {
                    "code": "start_timeout",
                    "error": f"not ready within the request timeout ({rev.scaling.request_timeout_s:g} s)",
                }
                now = self.clock()
                failure = self.start_failures.record(
                    rev.revision_id, cause["code"], cause["error"], now=now, wall=self.wall()
                )
                log.warning(
                    "instance %s did not become ready (%s: %s); next start of %s in %.0f s%s",
                    inst.id,
                    failure.code,
                    failure.error,
                    rev.revision_id,
                    failure.retry_at - now,
                    "; the revision is marked failed" if failure.failed else "",
                )
                self.run_background(self._retry_after_backoff(rev, failure))
        except Exception:
            log.exception("starting an instance of %s failed", rev.revision_id)
        finally:
            if counted:
                st.pending[rev.revision_id] -= 1
            st.notify()

    async def _retry_after_backoff(self, rev: Revision, failure: RevisionFailure) -> None:
        """Wake the function's held requests once the back-off has passed, so that one of them starts
        the next instance (nothing else would: no instance will change state meanwhile)."""
        await asyncio.sleep(max(0.0, failure.retry_at - self.clock()))
        self.state(rev.function).notify()

    # -- acquiring and releasing instances ----------------------------------------------------------

    def _live(self, rev_id: str) -> list[Instance]:
        return [i for i in self.pool.instances(rev_id) if i.state in _LIVE]

    def _ready(self, rev_id: str, exclude: Instance | None = None) -> list[Instance]:
        return [i for i in self.pool.instances(rev_id) if i.state is InstanceState.READY and i is not exclude]

    def _accepting(self, rev: Revision, exclude: Instance | None = None) -> list[Instance]:
        """Starting instances that already take requests (they run them behind their restore), while
        they have room: the request that woke an instance goes there at once instead of waiting."""
        limit = rev.scaling.target_concurrency
        return [
            i
            for i in self.pool.instances(rev.revision_id)
            if i.state is InstanceState.STARTING and i.accepting and i.in_flight < limit and i is not exclude
        ]

    def _pick(self, rev: Revision, exclude: Instance | None) -> Instance | None:
        """The least busy instance with room under target_concurrency: a READY one, or a STARTING one
        that already takes requests (the request then runs behind its restore). None when all are full
        and more capacity is on its way: the request waits for room, as Knative's activator holds
        requests while pods start, instead of piling onto the first instance to come up. With no more
        capacity coming (at max_instances), the least busy READY instance takes it anyway: the target is
        soft and the runtime queues."""
        limit = rev.scaling.target_concurrency
        ready = self._ready(rev.revision_id, exclude)
        roomy = [i for i in ready if i.in_flight < limit] or self._accepting(rev, exclude)
        if roomy:
            return min(roomy, key=lambda i: i.in_flight)
        if not ready:
            return None
        starting = any(i.state is InstanceState.STARTING for i in self.pool.instances(rev.revision_id))
        if starting or self.state(rev.function).pending.get(rev.revision_id, 0):
            return None
        return min(ready, key=lambda i: i.in_flight)

    def begin(self, name: str) -> Call:
        """A request's record, started at its arrival (finished by `finish`)."""
        return Call(name, self.wall())

    async def acquire(
        self, name: str, exclude: Instance | None = None, call: Call | None = None
    ) -> tuple[Instance, Revision, bool, float]:
        """An instance for one request (its in_flight counted), the revision, whether it was cold, the wait.

        `call`, the request's record, gets its concurrency at arrival, and its cold flag and wait added.
        Cancelling the wait (the client left) uncounts the request at once, so it neither holds a slot
        nor keeps asking for capacity."""
        t0 = self.clock()
        rev = await self.serving_revision(name)
        self._floor_paused.discard(name)
        st = self.state(name)
        deadline = t0 + rev.scaling.request_timeout_s
        cold = False
        st.waiting += 1  # counted as load from the start, so capacity is planned for it
        self.m_waiting.inc()
        if call is not None and not call.known:
            call.known = True
            call.concurrency = st.active + st.waiting
        if exclude is None and self.on_cold is not None and not self._has_ready(rev.revision_id):
            if call is not None:
                self._poke(name, call.arrival, call.concurrency)
            else:
                self._poke(name, self.wall(), st.active + st.waiting)
        try:
            while True:
                self.ensure_capacity(rev)
                inst = self._pick(rev, exclude)
                if inst is not None:
                    break
                failure = self.start_failures.get(rev.revision_id)
                if failure is not None and failure.failed:
                    raise RevisionFailedError(rev.revision_id, failure, self.clock())
                cold = cold or not self._ready(rev.revision_id, exclude)
                changed = st.changed
                remaining = deadline - self.clock()
                if remaining <= 0:
                    short = self._no_room.get(name)
                    why = f": no room on this node for another instance (needs {short})" if short else ""
                    raise ColdStartTimeoutError(
                        f"the function {name!r} did not become ready within {rev.scaling.request_timeout_s}s{why}"
                    )
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(changed.wait(), min(remaining, 1.0))
        except BaseException:  # timed out, failed or cancelled while held: the record says how long, and cold
            if call is not None:
                call.cold = call.cold or cold
                call.wait_s += self.clock() - t0
            raise
        finally:
            st.waiting -= 1
            self.m_waiting.dec()
        # cold as the simulator counts it: the request waited for a start (the instance that took it is
        # still restoring, or became READY after the request arrived), whatever else was READY meanwhile
        cold = cold or inst.state is InstanceState.STARTING or self._ready_at.get(inst.id, -math.inf) > t0
        now = self.clock()
        if inst.id in self._idle_from:  # idle until now
            self._count_idle(inst.id, name, now)
            del self._idle_from[inst.id]
        self._idle_since.pop(inst.id, None)
        if self._prewarmed and inst.id in self._prewarmed:
            self._prewarmed.discard(inst.id)
            self.m_prewarm_hits.labels(name).inc()
        inst.in_flight += 1
        st.active += 1
        wait_s = now - t0
        self.m_wait.labels(name, "1" if cold else "0").observe(wait_s)
        if call is not None:
            call.cold = call.cold or cold
            call.wait_s += wait_s
        return inst, rev, cold, wait_s

    def _has_ready(self, rev_id: str) -> bool:
        return any(i.state is InstanceState.READY for i in self.pool.instances(rev_id))

    def _poke(self, name: str, arrival: float, concurrency: int) -> None:
        assert self.on_cold is not None
        try:
            self.on_cold(name, arrival, max(1, concurrency))
        except Exception:  # the controller's trouble must not fail the request
            log.exception("on_cold(%s) failed", name)

    def finish(self, call: Call, outcome: str, tokens_in: int | None = None, tokens_out: int | None = None) -> None:
        """Record the request (once; a request for no known function is not recorded)."""
        if call.finished or not call.known:
            return
        call.finished = True
        self.recorder.add(call.invocation(outcome, tokens_in, tokens_out))

    def observe(self, name: str | None, cold: bool, status: int, seconds: float) -> None:
        """Count one data-path request once its answer is over (or failed). Names the gateway does not
        know as functions are counted under "", so a client cannot grow the label set at will."""
        function = name if name is not None and name in self.functions else ""
        flag = "1" if cold else "0"
        self._request_labels.setdefault(function, set()).add((flag, str(status)))
        self.m_requests.labels(function, flag, str(status)).inc()
        self.m_latency.labels(function, flag).observe(seconds)

    def stream_cut(self, name: str) -> None:
        self.m_streams_cut.labels(name).inc()

    def release(self, inst: Instance) -> None:
        inst.in_flight = max(0, inst.in_flight - 1)
        if inst.in_flight == 0 and inst.state in _LIVE:
            now = self.clock()
            self._idle_from[inst.id] = now
            if inst.state is InstanceState.READY:
                self._idle_since[inst.id] = now
        rev = self._revisions.get(inst.revision_id)
        if rev is not None:
            st = self.functions.get(rev.function)
            if st is not None:
                st.active = max(0, st.active - 1)
                if st.waiting:
                    st.notify()  # a slot came free: a held request may take it

    def _on_failure(self, inst: Instance) -> None:
        """A crashed instance: FAILED already, so routing skips it; wake waiters so they re-plan."""
        rev = self._revisions.get(inst.revision_id)
        if rev is not None:
            self.m_failures.labels(rev.function).inc()
            self.state(rev.function).notify()
        self._room_freed()

    # -- idle instance-seconds ---------------------------------------------------------------------

    def _count_idle(self, inst_id: str, function: str, now: float) -> None:
        """Add the instance's idle seconds not counted yet (since it became idle or was last counted)."""
        since = self._idle_from.get(inst_id)
        if since is None:
            return
        if now > since:
            self.m_idle.labels(function).inc(now - since)
            self._idle_from[inst_id] = now

    def _forget_instance(self, inst_id: str) -> None:
        """Drop what the gateway kept of an instance that is stopping or gone."""
        self._idle_since.pop(inst_id, None)
        self._idle_from.pop(inst_id, None)
        self._ready_at.pop(inst_id, None)
        self._prewarmed.discard(inst_id)

    def _account_idle(self, now: float) -> None:
        """Bring the idle instance-seconds up to `now` (scale passes, scrapes), and forget instances
        that are gone: O(idle and READY instances), no work per request."""
        for inst_id in [*self._idle_from, *self._ready_at]:
            inst = self.pool.get(inst_id)
            rev = self._revisions.get(inst.revision_id) if inst is not None else None
            if inst is None or rev is None or not inst.alive:
                self._forget_instance(inst_id)
            elif inst.state in _LIVE and not inst.in_flight:  # a draining one was counted as it began
                self._count_idle(inst_id, rev.function, now)
        if self._prewarmed:
            self._prewarmed = {i for i in self._prewarmed if self._is_alive(i)}

    # -- scale in ----------------------------------------------------------------------------------

    async def _reap_loop(self) -> None:
        while True:
            await asyncio.sleep(REAP_INTERVAL_S)
            try:
                self.scale_once()
            except Exception:
                log.exception("scale pass failed")

    def _is_alive(self, instance_id: str) -> bool:
        found = self.pool.get(instance_id)
        return found is not None and found.alive

    def run_background(self, work: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        """Run `work` as a task the gateway owns: kept referenced, cancelled by close()."""
        task = asyncio.create_task(work)
        self._starts.add(task)
        task.add_done_callback(self._background_done)
        return task

    def _background_done(self, task: asyncio.Task[Any]) -> None:
        self._starts.discard(task)
        if not task.cancelled() and (exc := task.exception()) is not None:
            log.warning("%s failed: %s", task.get_name(), exc)

    async def scale_to_zero(self, name: str, rev_ids: list[str]) -> int:
        """Drain and stop every live instance of the function now, whatever its idle timeout (what a
        cold-start measurement needs between requests; min_instances > 0 or a floor brings instances
        back at the next scale pass; a floor only after the function's next request). Returns how many
        were stopped."""
        self._floor_paused.add(name)
        self.floors.forget(name)
        insts = [i for r in rev_ids for i in self.pool.instances(r) if i.alive]
        now = self.clock()
        for inst in insts:
            self._count_idle(inst.id, name, now)
            inst.state = InstanceState.DRAINING  # out of routing at once
        await asyncio.gather(*(self._stop(i) for i in insts), return_exceptions=True)
        for inst in insts:
            self._forget_instance(inst.id)
            self.m_stops.labels(name).inc()
        return len(insts)

    async def stop_function(self, name: str, rev_ids: list[str]) -> None:
        """Drain and stop the function's instances, then forget everything the gateway kept for it
        (its floor and its demand records included). Its floor goes first, so no scale pass starts an
        instance while the others drain; one started just before is stopped too."""
        self._floor_paused.add(name)
        self.floors.forget(name)
        self.invalidate(name, reload=False)
        insts: list[Instance] = []
        for _ in range(3):  # a start already under way when the floor went shows up after the first round
            fresh = [i for r in rev_ids for i in self.pool.instances(r) if i.alive and all(i is not j for j in insts)]
            if not fresh:
                break
            insts += fresh
            await asyncio.gather(*(self.pool.stop(i, DRAIN_TIMEOUT_S) for i in fresh), return_exceptions=True)
        self._floor_paused.discard(name)
        self._missing.pop(name, None)
        self._no_room.pop(name, None)
        self._room_freed()
        for inst in insts:
            self._forget_instance(inst.id)
        st = self.functions.get(name)
        if st is not None and not st.waiting:
            del self.functions[name]
        for rev_id in rev_ids:
            self._revisions.pop(rev_id, None)
            self.pool.forget_revision(rev_id)
            self.start_failures.forget(rev_id)
        for histogram in (self.m_latency, self.m_wait):
            for cold in ("0", "1"):
                with contextlib.suppress(KeyError):
                    histogram.remove(name, cold)
        for flag, status in self._request_labels.pop(name, set()):
            self.m_requests.remove(name, flag, status)
        families = (self.m_starts, self.m_stops, self.m_failures, self.m_streams_cut)
        for family in (*families, self.m_prewarm_starts, self.m_prewarm_hits, self.m_idle):
            with contextlib.suppress(KeyError):
                family.remove(name)
        if self.demand is not None:
            try:
                await asyncio.to_thread(self.demand.forget, name)
            except RedisError as exc:  # they expire on their own (the store's TTL)
                log.warning("could not remove the demand records of %s: %s", name, exc)

    # -- revisions: deploying ----------------------------------------------------------------------

    def add_revision(self, rev: Revision) -> None:
        """A revision just created through this gateway (saves reading it back from Redis)."""
        self._revisions[rev.revision_id] = rev

    async def roll_out(self, rev_id: str) -> bool:
        """Start an instance of the new revision; move traffic to it once one is READY (False: none
        became READY within the revision's request timeout; traffic stays where it was). Raises
        RevisionFailedError, with the cause, once its starts have failed FAILED_AFTER times."""
        rev = await self.revision(rev_id)
        if rev is None:
            return False
        deadline = self.clock() + rev.scaling.request_timeout_s
        st = self.state(rev.function)
        while self.clock() < deadline:
            if self._ready(rev_id):
                await asyncio.to_thread(self.registry.set_traffic, rev.function, rev_id)
                self.invalidate(rev.function)
                return True
            failure = self.start_failures.get(rev_id)
            if failure is not None and failure.failed:
                raise RevisionFailedError(rev_id, failure, self.clock())
            changed = st.changed
            self.ensure_capacity(rev, extra=1)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(changed.wait(), 1.0)
        return False


_LIVE = (InstanceState.STARTING, InstanceState.READY)


def _log_failure(task: asyncio.Task[Any]) -> None:
    """Retrieve a background task's exception and log it (never left for the loop to report at exit)."""
    if not task.cancelled() and (exc := task.exception()) is not None:
        log.error("%s failed: %r", task.get_name(), exc)


def _on_loop() -> bool:
    """Whether this runs on an event loop (tests call some methods from another thread)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True
