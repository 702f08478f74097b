"""Writing demand records off the request path: the one batching writer the gateway and the runtime share.

Whoever serves requests (the local gateway, or on Knative each runtime instance) queues its
`records.Invocation` and `records.ColdStart` without waiting; a task on its event loop writes them in
batches through a `DemandWriter` (controller/demand.py's `DemandStore`), one thread hop and one
pipelined Redis round trip per batch and kind, a batch's invocations in arrival order. When Redis is
away, or the queue is full, records are dropped and counted on the caller's Prometheus counter:
demand tracking must never slow or fail a request.

Imports only the standard library, prometheus_client and `records`, so the gateway and the runtime
use it without importing the rest of the controller (or redis: the writer is passed in).
"""

from __future__ import annotations

import asyncio
import logging
import math
from typing import Any, Protocol

from prometheus_client import Counter

from kold.controller.records import ColdStart, Invocation

log = logging.getLogger("kold.controller.recorder")

RECORD_BATCH = 500
# How long the writer waits after a record for others to share its Redis round trip. The controller
# reads demand over windows of seconds, so 0.1 s of delay costs it nothing, while writing each record
# of a busy function on its own cost a thread hop and a round trip per request (bench/gateway.py).
RECORD_LINGER_S = 0.1
RECORD_QUEUE_MAX = 10_000

Record = Invocation | ColdStart


class DemandWriter(Protocol):
    """What the recorder needs of `kold.controller.demand.DemandStore` (called from a worker thread)."""

    def record_invocations(self, records: list[Invocation]) -> None: ...
    def record_cold_starts(self, reports: list[ColdStart]) -> None: ...


def cold_start_record(
    function: str, revision: str, at: float, total_s: float, report: dict[str, Any] | None, start_method: str | None
) -> ColdStart:
    """A ColdStart from the runtime's cold-start report (its `startup` event, which its ready /readyz
    answer carries as `cold_start`), read defensively: a field missing or of the wrong type is left
    out, never a guess. The gateway reads the report over HTTP, the runtime hands over its own."""
    restore = report.get("restore") if isinstance(report, dict) else None
    restore = restore if isinstance(restore, dict) else {}
    total_ms = _number(restore.get("total_ms"))
    fetch_ms = _number(restore.get("fetch_ms"))
    size = restore.get("bytes")
    tier = restore.get("source_tier")
    tiers: dict[str, float] = {}
    read_ms = fetch_ms if fetch_ms is not None else total_ms
    if isinstance(tier, str) and tier and read_ms is not None:
        tiers[tier] = read_ms / 1000
    return ColdStart(
        function=function,
        revision=revision,
        at=at,
        total_s=max(0.0, total_s),
        restore_s=total_ms / 1000 if total_ms is not None else None,
        snapshot_bytes=size if isinstance(size, int) and not isinstance(size, bool) and size >= 0 else None,
        tiers=tiers,
        start_method=start_method,
    )


def _number(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
        return None
    return float(value)


class Recorder:
    """A bounded queue of records and the task that writes them in batches; `demand` None: none kept.

    `start()` and `add()` on the event loop; `add` never waits. `close()` writes what is left, within
    `timeout_s` when given (what does not make it is counted as dropped)."""

    def __init__(self, demand: DemandWriter | None, dropped: Counter, *, name: str = "kold-demand-records") -> None:
        self.demand = demand
        self.dropped = dropped
        self.name = name
        self._queue: asyncio.Queue[Record] | None = None
        self._in_hand: list[Record] = []  # records taken off the queue, not written yet
        self._task: asyncio.Task[None] | None = None
        self._failing = False

    def start(self) -> None:
        if self.demand is None:
            return
        self._queue = asyncio.Queue(RECORD_QUEUE_MAX)
        self._task = asyncio.create_task(self._loop(), name=self.name)

    async def close(self, timeout_s: float | None = None) -> None:
        """Stop the writer and write what is queued (a last round trip; dropped if Redis is away, or
        if it takes longer than `timeout_s`)."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        if self._queue is None:
            return
        batch, self._in_hand = self._in_hand, []
        while not self._queue.empty():
            batch.append(self._queue.get_nowait())
        if not batch:
            return
        try:
            # the write's thread may outlive the wait (it may still land); the client's own timeouts end it
            await asyncio.wait_for(self._write(batch), timeout_s)
        except TimeoutError:
            self.dropped.inc(len(batch))
            log.warning(
                "demand records not written within %g s of stopping: %d counted as dropped", timeout_s, len(batch)
            )

    def add(self, record: Record) -> None:
        """Queue one record; never waits (a full queue drops it, counted)."""
        if self._queue is None:
            return
        try:
            self._queue.put_nowait(record)
        except asyncio.QueueFull:
            self.dropped.inc()

    async def _loop(self) -> None:
        assert self._queue is not None
        while True:
            # held in `_in_hand` while lingering, so a close() during the wait still writes them
            self._in_hand = [await self._queue.get()]
            await asyncio.sleep(RECORD_LINGER_S)
            batch, self._in_hand = self._in_hand, []
            while len(batch) < RECORD_BATCH and not self._queue.empty():
                batch.append(self._queue.get_nowait())
            await self._write(batch)

    async def _write(self, batch: list[Record]) -> None:
        assert self.demand is not None
        # made as requests finish, so in finish order; written in arrival order, since the demand
        # history drops an arrival older than the last it saw (history.observe)
        invocations = sorted((r for r in batch if isinstance(r, Invocation)), key=lambda r: r.arrival)
        cold_starts = [r for r in batch if isinstance(r, ColdStart)]
        try:
            await asyncio.to_thread(self._write_sync, invocations, cold_starts)
        except Exception as exc:
            self.dropped.inc(len(batch))
            if not self._failing:
                log.warning("cannot record demand (%s): dropping records until Redis is back", exc)
                self._failing = True
            return
        if self._failing:
            log.warning("recording demand again")
            self._failing = False

    def _write_sync(self, invocations: list[Invocation], cold_starts: list[ColdStart]) -> None:
        assert self.demand is not None
        if invocations:
            self.demand.record_invocations(invocations)
        if cold_starts:
            self.demand.record_cold_starts(cold_starts)
