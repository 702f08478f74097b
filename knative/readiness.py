"""Is a deployed Service Ready, still on its way, or failed, and why (in one line)?

`assess` is pure: it reads a Service's status as Knative writes it. A status only counts when
Knative has reconciled the spec that was applied (`status.observedGeneration == metadata.generation`)
and the latest created Revision is the latest ready one; otherwise a Ready=True left over from the
previous Revision would pass a deploy whose new Revision has not started, or never will.

`wait_ready` follows the Service with a watch (from the resourceVersion last seen, again whenever
the server ends the stream, and from a fresh read when the version is gone: 410) until it is Ready,
has failed, or the deadline passes.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final, Literal

from kold.knative.cluster import Gone, KnativeError, NotFound

if TYPE_CHECKING:
    from kold.knative.cluster import Cluster

Doc = dict[str, Any]
State = Literal["pending", "ready", "failed"]

PENDING: Final = "pending"
READY: Final = "ready"
FAILED: Final = "failed"
WATCH_CHUNK_S: Final = 300.0  # re-watch at least this often, as kubectl does: a silent stream is not trusted for ever

# Knative's condition reasons a user can act on, as the words the CLI puts before the condition's message
IMAGE_PULL_REASONS: Final = frozenset({"ImagePullBackOff", "ErrImagePull", "InvalidImageName", "ContainerMissing"})
PROGRESS_DEADLINE_REASONS: Final = frozenset({"ProgressDeadlineExceeded"})


@dataclass(frozen=True)
class Progress:
    """Where a Service stands: its state, the condition that says so (type, reason, message), its
    URL once it has one, and one line for a person (`message`)."""

    state: State
    message: str
    condition: str | None = None
    reason: str | None = None
    url: str | None = None
    revision: str | None = None  # the latest created Revision

    @property
    def done(self) -> bool:
        return self.state != PENDING

    @property
    def kind(self) -> str:
        """What failed, in the words a user searches for: image-pull, progress-deadline, or revision."""
        text = self.message.lower()
        if self.reason in IMAGE_PULL_REASONS or "pull" in text or "fetch image" in text:
            return "image-pull"
        if (
            self.reason in PROGRESS_DEADLINE_REASONS
            or "progress deadline" in text
            or "initial scale was never achieved" in text
        ):
            return "progress-deadline"
        return "revision"


class WaitTimeoutError(KnativeError):
    """The Service was neither Ready nor failed by the deadline; `last` is what it said last."""

    def __init__(self, message: str, last: Progress) -> None:
        super().__init__(message)
        self.last = last


def assess(service: Doc) -> Progress:
    """The Service's state from its conditions (pure)."""
    meta = _dict(service.get("metadata"))
    status = _dict(service.get("status"))
    generation = meta.get("generation")
    observed = status.get("observedGeneration")
    created = status.get("latestCreatedRevisionName")
    url = status.get("url") or None
    if generation is not None and observed != generation:
        seen = "none yet" if observed is None else f"generation {observed}"
        return Progress(PENDING, f"waiting for Knative to take generation {generation} (status is of {seen})")
    conditions = {c.get("type"): c for c in status.get("conditions") or [] if isinstance(c, dict)}
    ready = conditions.get("Ready")
    if ready is None:
        return Progress(PENDING, "waiting for Knative to report the Ready condition", revision=created)
    if ready.get("status") == "False":
        # the condition underneath that failed says more than Ready's copy of it
        failing = next(
            (c for t, c in conditions.items() if t != "Ready" and c.get("status") == "False"),
            ready,
        )
        return Progress(FAILED, _line(failing), failing.get("type"), failing.get("reason"), url, created)
    if ready.get("status") == "True":
        latest_ready = status.get("latestReadyRevisionName")
        if created and latest_ready and created != latest_ready:
            return Progress(PENDING, f"revision {created} is not ready yet ({latest_ready} is)", revision=created)
        return Progress(READY, f"Ready: {url or 'no URL yet'}", "Ready", ready.get("reason"), url, created)
    waiting = next(
        (c for t, c in conditions.items() if t != "Ready" and c.get("status") != "True" and c.get("reason")),
        ready,
    )
    return Progress(PENDING, _line(waiting), waiting.get("type"), waiting.get("reason"), url, created)


def revision_failure(revision: Doc) -> tuple[str | None, str] | None:
    """A failed Revision's own (reason, one line): it names the cause (ContainerMissing,
    ProgressDeadlineExceeded) that the Service only reports as RevisionFailed. None if not failed."""
    status = _dict(revision.get("status"))
    conditions = [c for c in status.get("conditions") or [] if isinstance(c, dict) and c.get("status") == "False"]
    if not conditions:
        return None
    cause = next((c for c in conditions if c.get("type") != "Ready"), conditions[0])
    return cause.get("reason"), _line(cause)


def _dict(value: Any) -> Doc:
    return value if isinstance(value, dict) else {}


def _line(condition: Doc) -> str:
    """`Type Status: Reason: message`, on one line."""
    parts = [f"{condition.get('type', '?')} {condition.get('status', 'Unknown')}"]
    parts += [str(condition[k]) for k in ("reason", "message") if condition.get(k)]
    return " ".join(": ".join(parts).split())


def wait_ready(
    cluster: Cluster,
    name: str,
    timeout_s: float,
    on_progress: Callable[[Progress], None] | None = None,
    *,
    clock: Callable[[], float] = time.monotonic,
) -> Progress:
    """Follow the Service until it is Ready or failed (returned) or `timeout_s` passes (WaitTimeoutError).

    `on_progress` hears each change of state or message once. A Service deleted meanwhile is NotFound.
    """
    deadline = clock() + timeout_s
    last: Progress | None = None

    def seen(service: Doc) -> Progress:
        nonlocal last
        progress = assess(service)
        if on_progress is not None and (
            last is None or (progress.state, progress.message) != (last.state, last.message)
        ):
            on_progress(progress)
        last = progress
        return progress

    def read() -> tuple[Progress, str | None]:
        service = cluster.get_service(name)
        return seen(service), (service.get("metadata") or {}).get("resourceVersion")

    progress, version = read()
    while not progress.done:
        remaining = deadline - clock()
        if remaining <= 0:
            raise WaitTimeoutError(f"{name} was not Ready within {timeout_s:.0f} s: {progress.message}", progress)
        events = 0
        started = clock()
        try:
            for kind, service in cluster.watch_service(name, version, min(remaining, WATCH_CHUNK_S)):
                events += 1
                if kind == "DELETED":
                    raise NotFound(f"service {name} was deleted while kold waited for it")
                if kind == "ERROR":
                    break
                version = (service.get("metadata") or {}).get("resourceVersion") or version
                progress = seen(service)
                if progress.done or clock() >= deadline:
                    break
        except Gone:
            progress, version = read()
            continue
        if not events and clock() - started < 1:
            time.sleep(0.5)  # a server that ends every watch at once is not asked again in a tight loop
    return progress
