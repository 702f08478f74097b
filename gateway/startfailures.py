"""Failed instance starts per revision: back-off between starts, and a revision marked failed.

A revision whose instances cannot start (a corrupt snapshot, a missing store) must not become a restart
storm: each failed start doubles the wait before the next (BACKOFF_BASE_S, at most BACKOFF_MAX_S), and
FAILED_AFTER consecutive failures with the same cause mark the revision failed, so its requests get
that cause at once instead of waiting out their timeout. A start that reaches READY clears it all. No
clock inside: the caller passes `now` (monotonic) and `wall` (Unix time, for people).
"""

from __future__ import annotations

from dataclasses import dataclass

FAILED_AFTER = 3  # consecutive failed starts with one cause: the revision is failed
BACKOFF_BASE_S = 1.0  # the wait after the first failed start; doubled after each further one
BACKOFF_MAX_S = 60.0  # a failed revision is still tried once a minute, so it recovers when its store does


@dataclass(frozen=True)
class RevisionFailure:
    code: str  # machine-readable cause, e.g. "snapshot_corrupted" (the runtime's termination log)
    error: str  # the runtime's own words
    count: int  # consecutive failed starts with this cause
    first_at: float  # Unix time of the first of them
    retry_at: float  # monotonic time before which no instance of the revision is started

    @property
    def failed(self) -> bool:
        return self.count >= FAILED_AFTER

    def describe(self, now: float) -> dict[str, object]:
        return {
            "code": self.code,
            "error": self.error,
            "failed_starts": self.count,
            "since": self.first_at,
            "failed": self.failed,
            "next_start_in_s": round(max(0.0, self.retry_at - now), 1),
        }


def backoff_s(count: int) -> float:
    return min(BACKOFF_MAX_S, BACKOFF_BASE_S * 2.0 ** max(0, count - 1))


class StartFailures:
    """Revision id -> its current run of failed starts (none once an instance became READY)."""

    def __init__(self) -> None:
        self._by_revision: dict[str, RevisionFailure] = {}

    def record(self, revision_id: str, code: str, error: str, *, now: float, wall: float) -> RevisionFailure:
        """One more failed start; a different cause starts the count again."""
        last = self._by_revision.get(revision_id)
        count = last.count + 1 if last is not None and last.code == code else 1
        first_at = last.first_at if last is not None and last.code == code else wall
        failure = RevisionFailure(code, error, count, first_at, now + backoff_s(count))
        self._by_revision[revision_id] = failure
        return failure

    def succeeded(self, revision_id: str) -> None:
        self._by_revision.pop(revision_id, None)

    def get(self, revision_id: str) -> RevisionFailure | None:
        return self._by_revision.get(revision_id)

    def may_start(self, revision_id: str, now: float) -> bool:
        failure = self._by_revision.get(revision_id)
        return failure is None or now >= failure.retry_at

    def forget(self, revision_id: str) -> None:
        self._by_revision.pop(revision_id, None)
