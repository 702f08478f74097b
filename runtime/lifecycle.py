"""The instance's state machine and its cold-start breakdown.

    starting -> restoring -> ready -> draining -> stopped
         \\           \\-> failed -/       ^
          \\-----------------------------/   (a SIGTERM before the weights are in place)

and `ready -> failed`: the weights being served turned out corrupt after the fact (a cache tier that
a background check found bad, see kold.snapshot.verify), so the instance stops serving at once.

`Lifecycle` lives on the event loop's thread (the restore thread reports through
`loop.call_soon_threadsafe`). Requests that arrive before `ready` wait in a bounded queue
(`wait_ready`): at most `max_waiting` of them, each at most `queue_timeout` seconds, instead of being
refused. `draining` refuses new requests and lets the in-flight ones finish (`wait_idle`).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import Coroutine, Iterator
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from kold.runtime.protocol import DrainingError, NotReadyError, QueueFullError, QueueTimeoutError

_MODULE_LOADED = time.time()


def process_start_time() -> float:
    """When this process was created (epoch seconds, ~10 ms resolution on Linux).

    From /proc: the process's start in clock ticks after boot, against the uptime now. Falls back
    to the moment this module was imported.
    """
    try:
        with open("/proc/self/stat", "rb") as f:
            stat = f.read()
        with open("/proc/uptime", "rb") as f:
            uptime = float(f.read().split()[0])
        now = time.time()
        # the command name (field 2) may hold spaces and parentheses: split after its last ')'
        fields = stat[stat.rindex(b")") + 2 :].split()
        start_ticks = int(fields[19])  # field 22 of the whole line
        age = uptime - start_ticks / os.sysconf("SC_CLK_TCK")
        if 0 <= age < 86400 * 365:
            return now - age
    except (OSError, ValueError, IndexError):
        pass
    return _MODULE_LOADED


class State(StrEnum):
    STARTING = "starting"
    RESTORING = "restoring"
    READY = "ready"
    DRAINING = "draining"
    STOPPED = "stopped"
    FAILED = "failed"


TRANSITIONS: dict[State, frozenset[State]] = {
    State.STARTING: frozenset({State.RESTORING, State.DRAINING, State.FAILED}),
    State.RESTORING: frozenset({State.READY, State.FAILED, State.DRAINING}),
    State.READY: frozenset({State.DRAINING, State.FAILED}),
    State.FAILED: frozenset({State.DRAINING, State.STOPPED}),
    State.DRAINING: frozenset({State.STOPPED}),
    State.STOPPED: frozenset(),
}


class TransitionError(RuntimeError):
    pass


@dataclass
class ColdStart:
    """Where the time from process start to the first token went. Times are epoch seconds."""

    process_start: float
    imports_done: float | None = None  # the runtime's modules imported, the app built
    listening: float | None = None
    restore_started: float | None = None
    serving: float | None = None  # the model took requests before the restore ended (see serve_early)
    ready: float | None = None
    first_token: float | None = None
    phases: dict[str, float] = field(default_factory=dict)  # seconds: torch_import, restore, tokenizer, model, ...
    restore: dict[str, Any] = field(default_factory=dict)  # RestoreStats.as_dict()

    def _ms(self, t: float | None) -> float | None:
        return None if t is None else round((t - self.process_start) * 1000, 1)

    @property
    def cold_start_ms(self) -> float | None:
        return self._ms(self.ready)

    @property
    def restore_ms(self) -> float | None:
        """The restore's own work: its wall time less any wait for the concurrent torch import."""
        total = self.restore.get("total_s")
        if total is None:
            return None
        return round((float(total) - float(self.restore.get("import_wait_s", 0.0))) * 1000, 1)

    def summary(self) -> dict[str, Any]:
        """The startup log line's fields: milestones in ms after process start, phases in ms."""
        out: dict[str, Any] = {
            "process_start": round(self.process_start, 3),
            "imports_ms": self._ms(self.imports_done),
            "listening_ms": self._ms(self.listening),
            "restore_started_ms": self._ms(self.restore_started),
            "serving_early_ms": self._ms(self.serving),
            "ready_ms": self._ms(self.ready),
            "phases_ms": {k: round(v * 1000, 1) for k, v in self.phases.items()},
        }
        if self.restore:
            r = self.restore
            out["restore"] = {
                "snapshot_id": r.get("snapshot_id"),
                "source_tier": r.get("source_tier"),
                "pooled": bool(r.get("pooled")),  # into a segment of the node's pre-faulted host pool
                "device": r.get("device"),
                "bytes": r.get("data_bytes"),
                "gbps": r.get("gbps"),
                **{f"{k.removesuffix('_s')}_ms": round(float(r[k]) * 1000, 1) for k in _RESTORE_PHASES if k in r},
            }
        return out

    def headers(self) -> dict[str, str]:
        """The breakdown sent on the first response after a cold start."""
        out = {}
        if self.cold_start_ms is not None:
            out["X-Kold-Cold-Start-Ms"] = f"{self.cold_start_ms:.1f}"
        if self.restore_ms is not None:
            out["X-Kold-Restore-Ms"] = f"{self.restore_ms:.1f}"
            for key, header in (("fetch_s", "Fetch"), ("h2d_s", "H2d")):
                if key in self.restore:
                    out[f"X-Kold-Restore-{header}-Ms"] = f"{float(self.restore[key]) * 1000:.1f}"
            if self.restore.get("source_tier"):
                out["X-Kold-Restore-Source"] = str(self.restore["source_tier"])
        if "model" in self.phases:  # after the restore, on the critical path (bind + engine start)
            out["X-Kold-Model-Build-Ms"] = f"{self.phases['model'] * 1000:.1f}"
        if "prebuild" in self.phases:  # beside the restore: skeleton, KV cache, tokenizer, warm-up
            out["X-Kold-Model-Prebuild-Ms"] = f"{self.phases['prebuild'] * 1000:.1f}"
        if self.imports_done is not None:
            out["X-Kold-Imports-Ms"] = f"{self._ms(self.imports_done):.1f}"
        if self.serving is not None:  # requests ran (layer by layer) behind the restore from then on
            out["X-Kold-Serving-Early-Ms"] = f"{self._ms(self.serving):.1f}"
        return out


_RESTORE_PHASES = ("metadata_s", "fetch_s", "h2d_s", "verify_s", "views_s", "total_s")


class Lifecycle:
    """State, the bounded wait for readiness, and the count of requests in flight."""

    def __init__(self, *, max_waiting: int, queue_timeout: float, process_start: float | None = None) -> None:
        self.state = State.STARTING
        self.error: str | None = None
        self.error_code: str | None = None
        self.max_waiting = max_waiting
        self.queue_timeout = queue_timeout
        self.cold_start = ColdStart(process_start if process_start is not None else process_start_time())
        self.waiting = 0
        self.in_flight = 0
        self._settled = asyncio.Event()  # set once the state leaves starting/restoring
        # set once requests can run: READY, or still RESTORING with a model computing behind the restore
        self._open = asyncio.Event()
        self.serving_early = False
        self._idle = asyncio.Event()
        self._idle.set()
        self._cold_headers_sent = False

    # -- state ------------------------------------------------------------------------------------

    def transition(self, new: State, error: str | None = None, code: str | None = None) -> None:
        """Move to `new`; a failure keeps its message and its machine-readable `code` for the
        requests it fails (e.g. snapshot_corrupted)."""
        if new not in TRANSITIONS[self.state]:
            raise TransitionError(f"cannot go from {self.state.value} to {new.value}")
        self.state = new
        if error is not None:
            self.error = error
            self.error_code = code
        now = time.time()
        if new is State.RESTORING:
            self.cold_start.restore_started = now
        elif new is State.READY:
            self.cold_start.ready = now
        if new not in (State.STARTING, State.RESTORING):
            self._settled.set()
            self._open.set()

    def serve_early(self) -> None:
        """The model can take requests while its weights are still landing (it computes each layer
        once that layer is in place): waiting requests run now. Readiness (`/readyz`) still waits for
        the whole restore, so routers keep sending new work to instances that are fully up."""
        if self.state is State.RESTORING:
            self.serving_early = True
            self.cold_start.serving = time.time()
            self._open.set()

    @property
    def ready(self) -> bool:
        return self.state is State.READY

    @property
    def can_serve(self) -> bool:
        """Requests run now: ready, or serving early during the restore."""
        return self.state is State.READY or (self.state is State.RESTORING and self.serving_early)

    @property
    def accepting(self) -> bool:
        """Whether new requests are taken (to run now or to wait for the weights)."""
        return self.state in (State.STARTING, State.RESTORING, State.READY)

    # -- the wait for readiness -------------------------------------------------------------------

    async def wait_ready(self) -> float:
        """Wait until requests can run (ready, or serving early); the seconds waited. Raises an
        `UnavailableError` when the queue is full, the wait times out, the restore failed or the
        instance is stopping."""
        if self.can_serve:
            return 0.0
        self._raise_if_settled()
        if self.waiting >= self.max_waiting:
            raise QueueFullError(
                f"the instance is still loading its model and {self.waiting} requests are already waiting"
            )
        started = time.perf_counter()
        self.waiting += 1
        try:
            await self._bounded(self._open.wait())
        finally:
            self.waiting -= 1
        if not self.can_serve:
            self._raise_if_settled()
        return time.perf_counter() - started

    async def wait_settled(self) -> None:
        """For a request running early: wait until the restore is over. Raises like `wait_ready`
        if it failed (or the instance is stopping); bounded by the queue timeout."""
        if self.state is State.READY:
            return
        await self._bounded(self._settled.wait())
        if not self.ready:
            self._raise_if_settled()

    async def _bounded(self, wait: Coroutine[Any, Any, Any]) -> None:
        try:
            await asyncio.wait_for(wait, self.queue_timeout)
        except TimeoutError:
            raise QueueTimeoutError(
                f"the model did not finish loading within {self.queue_timeout:g} s of this request"
            ) from None

    def _raise_if_settled(self) -> None:
        if self.state is State.FAILED or self.error is not None:  # failed, then draining to exit
            raise NotReadyError(
                f"the model could not be loaded: {self.error or 'unknown error'}", code=self.error_code or None
            )
        if self.state in (State.DRAINING, State.STOPPED):
            raise DrainingError("the instance is shutting down")

    # -- requests in flight -----------------------------------------------------------------------

    @contextlib.contextmanager
    def track(self) -> Iterator[None]:
        """Count a request in flight for as long as the block runs (the drain waits for it)."""
        self.in_flight += 1
        self._idle.clear()
        try:
            yield
        finally:
            self.in_flight -= 1
            if self.in_flight == 0:
                self._idle.set()

    async def wait_idle(self, timeout: float) -> bool:
        """Wait until no request is in flight; False if `timeout` seconds passed first."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except TimeoutError:
            return False
        return True

    def take_cold_start_headers(self) -> dict[str, str]:
        """The cold-start breakdown headers, for the first response only (empty afterwards)."""
        if self._cold_headers_sent or self.state is not State.READY:
            return {}
        self._cold_headers_sent = True
        return self.cold_start.headers()
