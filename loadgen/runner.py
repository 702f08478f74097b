"""Runs a plan against a target: open loop (the default) or closed loop, and watches itself.

Open loop is the default because it is how real traffic behaves: users do not wait for each other, so
each planned request goes out at its time whether or not earlier ones have finished, and a slow server
shows as growing latency instead of silently lowering the offered load. A closed loop (`concurrency`
workers, each sending its next request when its last one finished) and an open loop capped at
`max_concurrency` requests in flight are there for comparison with tools that work that way; under the
cap, waiting for a free slot shows as schedule lag, and `*_sched_s` times include it.

A load generator that falls behind its schedule measures itself, not the server, so the runner records
every request's lag, marks the run `behind_schedule` when lag p99 passes 10 ms, and reports its own CPU
cost per request. Against a kold gateway it also samples each function's instances by state every
second from the admin API (a key without admin scope simply gets no samples).
"""

from __future__ import annotations

import asyncio
import gc
import math
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx

from kold.loadgen.client import Client
from kold.loadgen.records import RequestRecord
from kold.loadgen.schedule import PlannedRequest
from kold.loadgen.target import Target

MODES = ("open", "closed")
SPIN_S = 0.001  # the last stretch before a send time is spent yielding, not sleeping (timer granularity)
LIVE_LAG_WINDOW = 1000  # the live display's lag p99 is over this many latest requests


@dataclass(frozen=True)
class RunSettings:
    """How a run drives its target; every field is written into the run's outputs."""

    mode: str = "open"  # "open" | "closed"
    concurrency: int | None = None  # closed loop: the number of workers
    max_concurrency: int | None = None  # open loop: a cap on requests in flight (None: no cap)
    timeout_s: float = 600.0  # a whole request, from its send
    stall_s: float = 60.0  # a stream with no data for this long, once its head came, is "stream_stalled"
    sample_interval_s: float = 1.0  # instance sampling period (kold targets)
    behind_lag_s: float = 0.010  # lag p99 above this marks the run behind schedule

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be 'open' or 'closed', not {self.mode!r}")
        if self.mode == "closed":
            if self.concurrency is None or self.concurrency < 1:
                raise ValueError("a closed-loop run needs concurrency >= 1")
            if self.max_concurrency is not None:
                raise ValueError("max_concurrency caps an open-loop run; a closed loop has concurrency instead")
        else:
            if self.concurrency is not None:
                raise ValueError(
                    "concurrency sets a closed-loop run (mode 'closed'); cap an open loop with max_concurrency"
                )
            if self.max_concurrency is not None and self.max_concurrency < 1:
                raise ValueError("max_concurrency must be >= 1")
        for name in ("timeout_s", "stall_s", "sample_interval_s"):
            value = getattr(self, name)
            if not (value > 0 and math.isfinite(value)):
                raise ValueError(f"{name} must be a positive number, not {value!r}")

    @property
    def label(self) -> str:
        """How the traffic was driven, in words, for every output."""
        if self.mode == "closed":
            return f"closed loop, concurrency {self.concurrency}"
        if self.max_concurrency is not None:
            return f"open loop, at most {self.max_concurrency} in flight"
        return "open loop"


@dataclass
class LiveCounts:
    """Running counts, updated as requests go and come, for a live display."""

    planned: int = 0
    sent: int = 0
    done: int = 0
    errors: int = 0
    cold: int = 0
    started: float | None = None  # perf_counter at the run's start
    lags: deque[float] = field(default_factory=lambda: deque(maxlen=LIVE_LAG_WINDOW))

    @property
    def in_flight(self) -> int:
        return self.sent - self.done

    def lag_p99(self) -> float | None:
        """Lag p99 over the latest requests (a window, so that the display stays cheap on long runs)."""
        return p99(list(self.lags))


@dataclass
class RunResult:
    """A finished run: its records (in completion order) and what the runner saw of itself and the target."""

    records: list[RequestRecord]
    started_at: float  # unix time of the run's start
    duration_s: float  # from the start to the last request's end
    behind_schedule: bool  # lag p99 over settings.behind_lag_s
    overhead: dict[str, float]  # the generator's own cost: cpu_s, cpu_s_per_request, cpu_share
    instances: list[dict[str, Any]]  # kold targets: {"t_s", "function", "starting", "ready", "draining"}
    lag_p99_s: float | None = None
    warnings: list[str] = field(default_factory=list)  # for people: behind schedule, sampling off


def p99(values: Sequence[float]) -> float | None:
    """The 99th percentile (linear interpolation between closest ranks); None when empty."""
    if not values:
        return None
    ordered = sorted(values)
    pos = 0.99 * (len(ordered) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


async def sleep_until(at: float) -> None:
    """Sleep until perf_counter() reaches `at`: the event loop's timers for most of it, then yield in a loop
    for the last millisecond, which the timers cannot resolve."""
    delay = at - time.perf_counter()
    if delay > SPIN_S:
        await asyncio.sleep(delay - SPIN_S)
    while time.perf_counter() < at:
        await asyncio.sleep(0)


async def run(
    plan: Sequence[PlannedRequest],
    target: Target,
    settings: RunSettings,
    prompts: Callable[[PlannedRequest], str],
    on_record: Callable[[RequestRecord], None] | None = None,
    *,
    live: LiveCounts | None = None,
) -> RunResult:
    """Send `plan` to `target` as `settings` say; `prompts` makes each request's prompt (called ahead of its
    send time, while the runner would otherwise wait); `on_record` sees each request as it finishes;
    `live` is kept current for a progress display."""
    counts = live if live is not None else LiveCounts()
    counts.planned = len(plan)
    records: list[RequestRecord] = []

    def finished(record: RequestRecord) -> None:
        records.append(record)
        counts.done += 1
        counts.errors += record.error is not None
        counts.cold += record.cold is True
        if on_record is not None:
            on_record(record)

    pool = settings.concurrency if settings.mode == "closed" else settings.max_concurrency
    warnings: list[str] = []
    # The plan (and whatever the caller built) lives through the run: moved out of the collector's view, so
    # that the full collections the growing record list triggers do not scan it each time. They paused the
    # send loop for 10-70 ms at a few thousand requests/s (bench/loadgen.py). Only when nobody froze before.
    freeze = gc.get_freeze_count() == 0
    if freeze:
        gc.collect()
        gc.freeze()
    try:
        return await _run(plan, target, settings, prompts, counts, finished, records, pool, warnings)
    finally:
        if freeze:
            gc.unfreeze()


async def _run(
    plan: Sequence[PlannedRequest],
    target: Target,
    settings: RunSettings,
    prompts: Callable[[PlannedRequest], str],
    counts: LiveCounts,
    finished: Callable[[RequestRecord], None],
    records: list[RequestRecord],
    pool: int | None,
    warnings: list[str],
) -> RunResult:
    cpu0 = time.process_time()
    async with Client(target, max_connections=pool, timeout_s=settings.timeout_s, stall_s=settings.stall_s) as client:
        sampler = InstanceSampler(target, plan, settings.sample_interval_s, warnings)
        # the clock starts once the clients exist (making one costs tens of ms: it would be the first lag)
        started_at = time.time()
        origin = time.perf_counter()
        counts.started = origin
        sampling = asyncio.create_task(sampler.loop(origin))
        try:
            if settings.mode == "closed":
                await _closed(plan, client, settings, prompts, origin, counts, finished)
            else:
                await _open(plan, client, settings, prompts, origin, counts, finished)
        finally:
            sampling.cancel()
            await asyncio.gather(sampling, return_exceptions=True)
            await sampler.aclose()
        end = time.perf_counter()
    cpu = time.process_time() - cpu0
    duration = end - origin
    lag = p99([r.lag_s for r in records])
    behind = False
    if lag is not None and lag > settings.behind_lag_s:
        behind = True
        why = " (waiting for the max-concurrency cap counts as lag)" if settings.max_concurrency else ""
        warnings.insert(
            0,
            f"behind schedule: lag p99 {lag * 1000:.1f} ms > {settings.behind_lag_s * 1000:g} ms{why}; "
            "latencies from the scheduled time include the client's delay",
        )
    overhead = {
        "cpu_s": cpu,
        "cpu_s_per_request": cpu / len(records) if records else 0.0,
        "cpu_share": cpu / duration if duration > 0 else 0.0,  # near 1: the client's one core is saturated
    }
    return RunResult(
        records=records,
        started_at=started_at,
        duration_s=duration,
        behind_schedule=behind,
        overhead=overhead,
        instances=sampler.samples,
        lag_p99_s=lag,
        warnings=warnings,
    )


async def _send(
    client: Client,
    planned: PlannedRequest,
    prompt: str,
    origin: float,
    scheduled: float,
    counts: LiveCounts,
    finished: Callable[[RequestRecord], None],
) -> None:
    counts.sent += 1
    record = await client.send(planned, prompt, origin=origin, scheduled=scheduled)
    counts.lags.append(record.lag_s)
    finished(record)


async def _open(
    plan: Sequence[PlannedRequest],
    client: Client,
    settings: RunSettings,
    prompts: Callable[[PlannedRequest], str],
    origin: float,
    counts: LiveCounts,
    finished: Callable[[RequestRecord], None],
) -> None:
    """Each request at its time, in its own task; under a cap, a task waits for a slot (that wait is lag)."""
    cap = asyncio.Semaphore(settings.max_concurrency) if settings.max_concurrency is not None else None
    tasks: set[asyncio.Task[None]] = set()
    failures: list[BaseException] = []

    async def one(planned: PlannedRequest, prompt: str, scheduled: float) -> None:
        if cap is None:
            await _send(client, planned, prompt, origin, scheduled, counts, finished)
            return
        async with cap:
            await _send(client, planned, prompt, origin, scheduled, counts, finished)

    def done(task: asyncio.Task[None]) -> None:
        tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            failures.append(task.exception())  # type: ignore[arg-type]

    try:
        for planned in plan:
            prompt = prompts(planned)  # made while waiting for the send time
            scheduled = origin + planned.at_s
            await sleep_until(scheduled)
            task = asyncio.create_task(one(planned, prompt, scheduled))
            tasks.add(task)
            task.add_done_callback(done)
            if failures:
                raise failures[0]
        while tasks:
            await asyncio.wait(set(tasks))
        if failures:
            raise failures[0]  # on_record raised: a bug in the caller, not a server error
    finally:
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)


async def _closed(
    plan: Sequence[PlannedRequest],
    client: Client,
    settings: RunSettings,
    prompts: Callable[[PlannedRequest], str],
    origin: float,
    counts: LiveCounts,
    finished: Callable[[RequestRecord], None],
) -> None:
    """`concurrency` workers share the plan in order; each request is scheduled when its worker is free."""
    queue: Iterator[PlannedRequest] = iter(plan)

    async def worker() -> None:
        for planned in queue:  # one shared iterator: each request goes to exactly one worker
            prompt = prompts(planned)
            await _send(client, planned, prompt, origin, time.perf_counter(), counts, finished)

    assert settings.concurrency is not None
    workers = [asyncio.create_task(worker()) for _ in range(settings.concurrency)]
    try:
        await asyncio.gather(*workers)
    finally:
        for w in workers:
            w.cancel()
        await asyncio.gather(*workers, return_exceptions=True)


class InstanceSampler:
    """Samples a kold gateway's instances by state for each function in the plan, every `interval_s`.

    Only for kold targets; a function the admin API refuses (401/403: not an admin key) or does not know
    (404) is not sampled again, and a failed sample is skipped: sampling never stops the run.
    """

    def __init__(self, target: Target, plan: Sequence[PlannedRequest], interval_s: float, warnings: list[str]) -> None:
        self.samples: list[dict[str, Any]] = []
        self._origin = 0.0  # the run's start (perf_counter), given to loop()
        self._interval = interval_s
        self._warnings = warnings
        self._functions = sorted({p.function for p in plan if p.function}) if target.kold_gateway else []
        # a thread's client, not one on the event loop: an httpx request costs milliseconds of CPU, and
        # taken on the loop it made the requests due at that moment late by 13-17 ms
        self._http: httpx.Client | None = None
        if self._functions and target.kold_gateway:
            self._http = httpx.Client(
                base_url=target.kold_gateway.rstrip("/"), headers=target.headers(), timeout=2.0, trust_env=False
            )

    async def loop(self, origin: float) -> None:
        """Sample until cancelled; sample times count from `origin`."""
        self._origin = origin
        if self._http is None:
            return
        # the first sample half an interval in, away from the run's first requests
        next_at = time.perf_counter() + self._interval / 2
        while self._functions:
            await asyncio.sleep(max(0.0, next_at - time.perf_counter()))
            await self.sample()
            next_at += self._interval

    async def sample(self) -> None:
        """One sample of every function still sampled."""
        if self._http is None:
            return
        for name in list(self._functions):
            t_s = time.perf_counter() - self._origin
            try:
                resp = await asyncio.to_thread(self._http.get, f"/admin/functions/{name}")
            except httpx.HTTPError:
                continue  # the gateway is busy or away: this sample is missing, the next may come
            if resp.status_code in (401, 403, 404):
                self._functions.remove(name)
                why = {401: "no valid key", 403: "the key has no admin scope", 404: "no such function"}
                self._warnings.append(
                    f"instances of {name!r} not sampled: the admin API answered {resp.status_code} "
                    f"({why[resp.status_code]})"
                )
                continue
            if resp.status_code != 200:
                continue
            try:
                instances = resp.json().get("instances") or []
                states = [str(i.get("state")) for i in instances]
            except (ValueError, AttributeError):
                continue
            self.samples.append(
                {
                    "t_s": t_s,
                    "function": name,
                    "starting": states.count("starting"),
                    "ready": states.count("ready"),
                    "draining": states.count("draining"),
                }
            )

    async def aclose(self) -> None:
        if self._http is not None:
            self._http.close()
