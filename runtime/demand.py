"""The instance's own demand records, for the pre-warm controller where no kold gateway is in the path.

On Knative, requests reach an instance through the activator and the queue-proxy, so no kold gateway
sees them; the instance reports them itself. Each inference request it serves (`/v1/completions`,
`/v1/chat/completions`) becomes a `records.Invocation`, and its own start, once ready, one
`records.ColdStart`. They go through the gateway's batching writer (`kold.controller.recorder`):
queued without waiting, written in batches from a task on the event loop through a thread, dropped
and counted (`kold_runtime_demand_records_dropped_total`) when Redis is away or the queue is full, and
flushed within `STOP_FLUSH_S` when the instance drains. No request waits for a record.

Not demand, so not recorded: health and metrics endpoints, `/v1/models`, requests refused because the
instance is draining (the platform retries them elsewhere, where they count), and the controller's
warm-up (`x-kold-warmup: 1`, which it sends through the Knative activator to wake a revision).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter

from kold.controller import records
from kold.controller.recorder import DemandWriter, Recorder, cold_start_record
from kold.controller.records import ColdStart, Invocation
from kold.runtime.protocol import QueueTimeoutError

if TYPE_CHECKING:
    from starlette.types import Scope

    from kold.runtime.lifecycle import Lifecycle

WARMUP_HEADER = b"x-kold-warmup"
# A drain flushes what is queued within this; the Redis client's own timeouts (set by the CLI) end the
# write's thread soon after, so a Redis that is away never holds the instance's exit.
STOP_FLUSH_S = 2.0


@dataclass(frozen=True)
class DemandReporting:
    """As what and where an instance reports (the CLI builds it from settings).

    `function` is the Knative Service's name (K_SERVICE) or the served model name; `revision` the
    Knative revision (K_REVISION) or the snapshot id. `connect` makes the writer (a `DemandStore` over
    a Redis client with short timeouts): called in the writer's thread on the first write, so neither
    importing redis nor connecting is on the start path."""

    function: str
    revision: str
    connect: Callable[[], DemandWriter]


@dataclass(frozen=True, slots=True)
class Call:
    """One request as it arrived: when (Unix time), whether the model was not ready yet, and how many
    inference requests were in flight here then, itself included."""

    arrival: float
    cold: bool
    concurrency: int


class DemandReporter:
    """Makes the records from the server's requests and its start, and keeps the writer."""

    def __init__(self, reporting: DemandReporting, lifecycle: Lifecycle, registry: CollectorRegistry) -> None:
        self.function = reporting.function
        self.revision = reporting.revision
        self.lifecycle = lifecycle
        dropped = Counter(
            "kold_runtime_demand_records_dropped",
            "Demand records (invocations, the cold start) not written to Redis (away, or the queue full)",
            registry=registry,
        )
        self.recorder = Recorder(_Connecting(reporting.connect), dropped, name="kold-runtime-demand")

    def start(self) -> None:
        """On the event loop, once the server listens."""
        self.recorder.start()

    async def close(self) -> None:
        """Flush what is queued, bounded (the drain's last step)."""
        await self.recorder.close(STOP_FLUSH_S)

    def arrived(self, scope: Scope) -> Call | None:
        """A request counted in flight has arrived; None when it is no demand (a warm-up)."""
        warmup = next((v for k, v in scope.get("headers", ()) if k.lower() == WARMUP_HEADER), None)
        if warmup is not None and warmup.strip() == b"1":
            return None
        lifecycle = self.lifecycle
        return Call(time.time(), not lifecycle.ready, max(1, lifecycle.in_flight))

    def finished(
        self, call: Call, status: str, error: BaseException | None, tokens_in: int | None, tokens_out: int | None
    ) -> None:
        """The request is answered (`status` as the server logs it) or its client left: queue its record."""
        self.recorder.add(
            Invocation(
                function=self.function,
                arrival=call.arrival,
                cold=call.cold,
                wait_s=self._wait_s(call),
                outcome=outcome(status, error),
                tokens_in=tokens_in,
                tokens_out=tokens_out,
                concurrency=call.concurrency,
            )
        )

    def _wait_s(self, call: Call) -> float:
        """How long the request waited for the model: until it could run (ready, or serving behind
        the restore), or until it ended if it never could (timed out, the load failed, the client left)."""
        if not call.cold:
            return 0.0
        cold_start = self.lifecycle.cold_start
        now = time.time()
        opened = cold_start.serving if cold_start.serving is not None else cold_start.ready
        return max(0.0, (now if opened is None else min(opened, now)) - call.arrival)

    def ready(self, startup: dict[str, Any]) -> None:
        """The instance is ready: queue its cold start, from its `startup` report (what /readyz carries).

        `total_s` runs from the process's start: what came before it (scheduling, pulling the image,
        creating the container) the instance cannot see."""
        cold_start = self.lifecycle.cold_start
        at = cold_start.ready if cold_start.ready is not None else time.time()
        self.recorder.add(
            cold_start_record(self.function, self.revision, at, at - cold_start.process_start, startup, None)
        )


def outcome(status: str, error: BaseException | None) -> str:
    """A request's outcome as the gateway names them: timed out waiting for the model, cancelled by its
    client (499, or a stream it left), failed (5xx), else answered."""
    if isinstance(error, QueueTimeoutError):
        return records.TIMED_OUT
    if status in ("disconnected", "499"):
        return records.CANCELLED
    if status.isdigit() and int(status) >= 500:
        return records.FAILED
    return records.OK


class _Connecting:
    """A DemandWriter made on its first use, in the writer's thread (a failed attempt is tried again
    on the next batch; the batch it was for is dropped and counted)."""

    def __init__(self, connect: Callable[[], DemandWriter]) -> None:
        self._connect = connect
        self._writer: DemandWriter | None = None
        self._lock = threading.Lock()  # a drain's last write may overlap a cancelled write's thread

    def _get(self) -> DemandWriter:
        with self._lock:
            if self._writer is None:
                self._writer = self._connect()
            return self._writer

    def record_invocations(self, records: list[Invocation]) -> None:
        self._get().record_invocations(records)

    def record_cold_starts(self, reports: list[ColdStart]) -> None:
        self._get().record_cold_starts(reports)
