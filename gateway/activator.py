"""The activator: per-function state, holding requests while a function is cold, and scaling.

A request asks `acquire(name)` for an instance of the function's serving revision. It gets the least
loaded instance that has room under `target_concurrency` (a READY one, or one still restoring that
already takes requests); when every instance is full and more are starting, it is held (not failed)
until one has room, and with no instance at all until one can take it or the revision's
`request_timeout_s` passes (503 + Retry-After). At max_instances the target is soft: the least
loaded READY instance takes the request and the runtime queues it. Every acquire re-evaluates how
many instances the revision needs, Knative-style: ceil((in flight + waiting) / target_concurrency),
between min_instances and max_instances, and starts only the missing ones (counted synchronously, so
a burst at a cold function starts as many instances as its concurrency needs, not one per request).
A background task stops instances idle for `idle_timeout_s` (the runtime drains on SIGTERM), down to
min_instances (0: scale to zero) but never below what the function's load and backlog need.
Invocations are recorded off the critical path by a queue drained in batches.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics
from redis.exceptions import RedisError

from kold.gateway.capacity import Footprint, NodeCapacity, total
from kold.gateway.pool import Instance, InstancePool, InstanceState
from kold.gateway.registry import Invocation, Registry, Revision, RuntimeSpec
from kold.gateway.startfailures import RevisionFailure, StartFailures
from kold.runtime.protocol import ModelNotFoundError, UnavailableError

log = logging.getLogger("kold.gateway.activator")

SERVING_CACHE_S = 1.0
REGISTRY_PROBE_S = 0.5  # while Redis is unreachable, how often the gateway asks again
REAP_INTERVAL_S = 0.25
RECORD_BATCH = 500
# How long the recorder waits after a record for others to share its Redis round trip. The controller
# reads demand over windows of seconds, so 0.1 s of delay costs it nothing, while writing each record
# of a busy function on its own cost a thread hop and a round trip per request (bench/gateway.py).
RECORD_LINGER_S = 0.1
RECORD_QUEUE_MAX = 10_000
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

    waiting: int = 0  # requests held for want of a READY instance
    pending: dict[str, int] = field(default_factory=dict)  # revision id -> starts not yet spawned
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    def notify(self) -> None:
        self.changed.set()
        self.changed = asyncio.Event()


Controller = Callable[["Gateway", float], Awaitable[None]]


class Gateway:
    """Per-function state over a registry and an instance pool."""

    def __init__(
        self,
        registry: Registry,
        pool: InstancePool,
        *,
        metrics: CollectorRegistry | None = None,
        controller: Controller | None = None,
        controller_tick_s: float = 1.0,
        capacity: NodeCapacity | None = None,
    ) -> None:
        self.registry = registry
        self.pool = pool
        # the node's resources; None: unbounded (instances start as the load asks, up to max_instances)
        self.capacity = capacity
        self._no_room: dict[str, str] = {}  # function -> what its last wanted start was short of
        # the pre-warm controller's hook: called every tick with the gateway (its actuator: prewarm)
        # and the time; the policies that decide come with the controller (controller/)
        self.controller = controller
        self.controller_tick_s = controller_tick_s
        if pool.on_failure is None:
            pool.on_failure = self._on_failure
        self.functions: dict[str, FunctionState] = {}
        self._revisions: dict[str, Revision] = {}  # immutable: cached for good
        self._serving: dict[str, tuple[float, Revision]] = {}  # name -> (fresh until, revision)
        self._refreshing: set[str] = set()  # functions whose serving revision is being re-read
        # instance id -> monotonic time it last became idle (no request in flight); only live instances
        self._idle_since: dict[str, float] = {}
        self.start_failures = StartFailures()
        self._request_labels: dict[str, set[tuple[str, str]]] = {}  # function -> (cold, status) it was counted with
        self._queue: asyncio.Queue[Invocation] | None = None
        self._in_hand: list[Invocation] = []  # records taken off the queue, not written yet
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
            "kold_gateway_invocation_records_dropped", "Invocation records not written", registry=self.metrics
        )
        self.m_starts = Counter(
            "kold_gateway_instance_starts", "Instances started", ["function"], registry=self.metrics
        )
        self.m_stops = Counter(
            "kold_gateway_instance_stops", "Instances scaled in", ["function"], registry=self.metrics
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

    # -- lifecycle ---------------------------------------------------------------------------------

    async def start(self) -> None:
        self._queue = asyncio.Queue(RECORD_QUEUE_MAX)
        self._tasks = [
            asyncio.create_task(self._record_loop(), name="kold-gateway-records"),
            asyncio.create_task(self._reap_loop(), name="kold-gateway-reaper"),
        ]
        if self.controller is not None:
            self._tasks.append(asyncio.create_task(self._controller_loop(), name="kold-gateway-controller"))

    async def close(self, drain_timeout_s: float = 5.0) -> None:
        probe = [self._probe] if self._probe is not None else []
        for t in [*self._tasks, *self._starts, *probe]:
            t.cancel()
        await asyncio.gather(*self._tasks, *self._starts, *probe, return_exceptions=True)
        await self._flush()
        await self.pool.close(drain_timeout_s)

    def state(self, name: str) -> FunctionState:
        st = self.functions.get(name)
        if st is None:
            st = self.functions[name] = FunctionState()
        return st

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
            if cached[0] <= time.monotonic() and not self.registry_down:
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
        self._serving[name] = (time.monotonic() + SERVING_CACHE_S, rev)
        return rev

    def _refresh_serving(self, name: str) -> None:
        """One background refresh of a function's serving revision at a time."""
        if name in self._refreshing:
            return

        async def refresh() -> None:
            try:
                await self._read_serving(name)
            except RedisError as exc:
                self.redis_unreachable(exc)
            except ModelNotFoundError:
                pass  # removed: the next request finds no cached revision and gets 404
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

    def invalidate(self, name: str) -> None:
        self._serving.pop(name, None)

    # -- acquiring and releasing instances ----------------------------------------------------------

    def _live(self, rev_id: str) -> list[Instance]:
        return [i for i in self.pool.instances(rev_id) if i.state in (InstanceState.STARTING, InstanceState.READY)]

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

    def ensure_capacity(self, rev: Revision, extra: int = 0) -> int:
        """Start the instances `rev` is missing for its load; no await: the count cannot race. Returns starts."""
        st = self.state(rev.function)
        sc = rev.scaling
        load = sum(i.in_flight for i in self._live(rev.revision_id)) + st.waiting + extra
        want = min(sc.max_instances, max(sc.min_instances, math.ceil(load / sc.target_concurrency)))
        have = len(self._live(rev.revision_id)) + st.pending.get(rev.revision_id, 0)
        return self._start(rev, want, have)

    def _start(self, rev: Revision, want: int, have: int) -> int:
        """Spawn want - have instances; while the revision's starts are failing, one at a time and only
        once its back-off has passed."""
        if self.start_failures.get(rev.revision_id) is not None:
            if not self.start_failures.may_start(rev.revision_id, time.monotonic()):
                return 0
            want = min(want, 1)
        started = 0
        for _ in range(want - have):
            short = self._shortfall(rev)
            if short is not None:
                if self._no_room.get(rev.function) != short:
                    log.warning("no room on this node for another instance of %s: needs %s", rev.function, short)
                self._no_room[rev.function] = short
                break
            self._no_room.pop(rev.function, None)
            self._spawn(rev)
            started += 1
        return started

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

    async def prewarm(self, name: str, instances: int = 1) -> int:
        """The controller's actuator: have `instances` of the serving revision up or starting (capped at
        max_instances) before demand arrives. Returns how many it started; idle ones scale in as usual."""
        rev = await self.serving_revision(name)
        want = min(rev.scaling.max_instances, instances)
        have = len(self._live(rev.revision_id)) + self.state(name).pending.get(rev.revision_id, 0)
        return self._start(rev, want, have)

    async def _controller_loop(self) -> None:
        assert self.controller is not None
        while True:
            try:
                await self.controller(self, time.time())
            except Exception:  # a failing policy must never take the gateway down
                log.exception("the pre-warm controller failed; trying again next tick")
            await asyncio.sleep(self.controller_tick_s)

    def _spawn(self, rev: Revision) -> None:
        st = self.state(rev.function)
        st.pending[rev.revision_id] = st.pending.get(rev.revision_id, 0) + 1
        task = asyncio.create_task(self._start_instance(rev), name=f"kold-start-{rev.revision_id}")
        self._starts.add(task)
        task.add_done_callback(self._starts.discard)

    async def _start_instance(self, rev: Revision) -> None:
        st = self.state(rev.function)
        counted = True
        try:
            inst = await self.pool.start(rev)
            st.pending[rev.revision_id] -= 1  # from now on pool.instances() counts it
            counted = False
            self.m_starts.labels(rev.function).inc()
            if await self.pool.wait_ready(inst, rev.scaling.request_timeout_s, on_accepting=lambda _: st.notify()):
                self._idle_since[inst.id] = time.monotonic()
                self.start_failures.succeeded(rev.revision_id)
            else:
                await self.pool.stop(inst, 1.0)
                cause = inst.failure or {
                    "code": "start_timeout",
                    "error": f"not ready within the request timeout ({rev.scaling.request_timeout_s:g} s)",
                }
                failure = self.start_failures.record(
                    rev.revision_id, cause["code"], cause["error"], now=time.monotonic(), wall=time.time()
                )
                log.warning(
                    "instance %s did not become ready (%s: %s); next start of %s in %.0f s%s",
                    inst.id,
                    failure.code,
                    failure.error,
                    rev.revision_id,
                    failure.retry_at - time.monotonic(),
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
        await asyncio.sleep(max(0.0, failure.retry_at - time.monotonic()))
        self.state(rev.function).notify()

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

    async def acquire(self, name: str, exclude: Instance | None = None) -> tuple[Instance, Revision, bool, float]:
        """An instance for one request (its in_flight counted), the revision, whether it was cold, the wait.

        Cancelling the wait (the client left) uncounts the request at once, so it neither holds a slot
        nor keeps asking for capacity."""
        t0 = time.monotonic()
        rev = await self.serving_revision(name)
        st = self.state(name)
        deadline = t0 + rev.scaling.request_timeout_s
        cold = False
        st.waiting += 1  # counted as load from the start, so capacity is planned for it
        self.m_waiting.inc()
        try:
            while True:
                self.ensure_capacity(rev)
                inst = self._pick(rev, exclude)
                if inst is not None:
                    break
                failure = self.start_failures.get(rev.revision_id)
                if failure is not None and failure.failed:
                    raise RevisionFailedError(rev.revision_id, failure, time.monotonic())
                cold = cold or not self._ready(rev.revision_id, exclude)
                changed = st.changed
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    short = self._no_room.get(name)
                    why = f": no room on this node for another instance (needs {short})" if short else ""
                    raise ColdStartTimeoutError(
                        f"the function {name!r} did not become ready within {rev.scaling.request_timeout_s}s{why}"
                    )
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(changed.wait(), min(remaining, 1.0))
        finally:
            st.waiting -= 1
            self.m_waiting.dec()
        cold = cold or inst.state is InstanceState.STARTING  # still restoring: this request pays its cold start
        inst.in_flight += 1
        self._idle_since.pop(inst.id, None)
        self.m_wait.labels(name, "1" if cold else "0").observe(time.monotonic() - t0)
        return inst, rev, cold, time.monotonic() - t0

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
        if inst.in_flight == 0:
            self._idle_since[inst.id] = time.monotonic()
        rev = self._revisions.get(inst.revision_id)
        if rev is not None:
            st = self.functions.get(rev.function)
            if st is not None and st.waiting:
                st.notify()  # a slot came free: a held request may take it

    def _on_failure(self, inst: Instance) -> None:
        """A crashed instance: FAILED already, so routing skips it; wake waiters so they re-plan."""
        rev = self._revisions.get(inst.revision_id)
        if rev is not None:
            self.m_failures.labels(rev.function).inc()
            self.state(rev.function).notify()
        self._room_freed()

    # -- scale in ----------------------------------------------------------------------------------

    async def _reap_loop(self) -> None:
        while True:
            await asyncio.sleep(REAP_INTERVAL_S)
            try:
                await self.reap_once()
            except Exception:
                log.exception("scale-in pass failed")

    async def reap_once(self) -> None:
        """Scale in: stop READY instances idle for idle_timeout_s, keeping min_instances of the serving
        revision and as many as the function's current load needs (in flight + held requests over
        target_concurrency). An instance is not idle while its function has a backlog."""
        now = time.monotonic()
        serving = {name: rev.revision_id for name, (_, rev) in self._serving.items()}
        by_rev: dict[str, list[Instance]] = {}
        for inst in self.pool.instances():
            if inst.state is InstanceState.READY:
                by_rev.setdefault(inst.revision_id, []).append(inst)
        for rev_id, instances in by_rev.items():
            rev = self._revisions.get(rev_id)
            if rev is None:
                continue
            floor = rev.scaling.min_instances if serving.get(rev.function, rev_id) == rev_id else 0
            st = self.functions.get(rev.function)
            waiting = st.waiting if st is not None and serving.get(rev.function) == rev_id else 0
            load = sum(i.in_flight for i in self._live(rev_id)) + waiting
            keep = max(floor, math.ceil(load / rev.scaling.target_concurrency))
            idle = [
                i
                for i in instances
                if i.in_flight == 0 and now - self._idle_since.get(i.id, now) >= rev.scaling.idle_timeout_s
            ]
            for inst in idle[: max(0, len(instances) - keep)]:
                log.info("scaling in %s (idle %.1fs)", inst.id, now - self._idle_since.get(inst.id, now))
                self.m_stops.labels(rev.function).inc()
                self.run_background(self._stop(inst))
                inst.state = InstanceState.DRAINING  # out of routing at once
        for inst_id in [i for i in self._idle_since if not self._is_alive(i)]:
            del self._idle_since[inst_id]  # stopped or failed: never idle again
        for _, rev in list(self._serving.values()):
            if rev.scaling.min_instances:
                self.ensure_capacity(rev)

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
        cold-start measurement needs between requests; min_instances > 0 brings instances back at the
        next scaling pass). Returns how many were stopped."""
        insts = [i for r in rev_ids for i in self.pool.instances(r) if i.alive]
        for inst in insts:
            inst.state = InstanceState.DRAINING  # out of routing at once
        await asyncio.gather(*(self._stop(i) for i in insts), return_exceptions=True)
        for inst in insts:
            self._idle_since.pop(inst.id, None)
            self.m_stops.labels(name).inc()
        return len(insts)

    async def stop_function(self, name: str, rev_ids: list[str]) -> None:
        """Drain and stop the function's instances, then forget everything the gateway kept for it."""
        insts = [i for r in rev_ids for i in self.pool.instances(r) if i.alive]
        await asyncio.gather(*(self.pool.stop(i, DRAIN_TIMEOUT_S) for i in insts), return_exceptions=True)
        self.invalidate(name)
        self._no_room.pop(name, None)
        self._room_freed()
        for inst in insts:
            self._idle_since.pop(inst.id, None)
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
        for family in (self.m_starts, self.m_stops, self.m_failures, self.m_streams_cut):
            with contextlib.suppress(KeyError):
                family.remove(name)

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
        deadline = time.monotonic() + rev.scaling.request_timeout_s
        st = self.state(rev.function)
        while time.monotonic() < deadline:
            if self._ready(rev_id):
                await asyncio.to_thread(self.registry.set_traffic, rev.function, rev_id)
                self.invalidate(rev.function)
                return True
            failure = self.start_failures.get(rev_id)
            if failure is not None and failure.failed:
                raise RevisionFailedError(rev_id, failure, time.monotonic())
            changed = st.changed
            self.ensure_capacity(rev, extra=1)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(changed.wait(), 1.0)
        return False

    # -- invocation records ------------------------------------------------------------------------

    def record(self, name: str, arrival: float, cold: bool, wait_s: float) -> None:
        if self._queue is None:
            return
        try:
            self._queue.put_nowait(Invocation(name, arrival, cold, wait_s))
        except asyncio.QueueFull:
            self.m_dropped.inc()

    async def _record_loop(self) -> None:
        assert self._queue is not None
        while True:
            # held in `_in_hand` while lingering, so a close() during the wait still flushes them
            self._in_hand = [await self._queue.get()]
            await asyncio.sleep(RECORD_LINGER_S)
            batch, self._in_hand = self._in_hand, []
            while len(batch) < RECORD_BATCH and not self._queue.empty():
                batch.append(self._queue.get_nowait())
            await self._write(batch)

    async def _flush(self) -> None:
        if self._queue is None:
            return
        batch, self._in_hand = self._in_hand, []
        while not self._queue.empty():
            batch.append(self._queue.get_nowait())
        if batch:
            await self._write(batch)

    async def _write(self, batch: list[Invocation]) -> None:
        try:
            await asyncio.to_thread(self.registry.record_invocations, batch)
            self._redis_down_logged = False
        except Exception as exc:
            self.m_dropped.inc(len(batch))
            if not self._redis_down_logged:
                log.warning("cannot record invocations (%s): dropping them until Redis is back", exc)
                self._redis_down_logged = True
