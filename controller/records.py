"""The record types every part that deals with demand shares: the gateway writes them, the controller
folds them into per-function history, the simulator replays them, and the trace readers yield them.

Standard library only, so that the gateway and the load generator may import this module without
importing the controller. Times are Unix seconds (floats) unless a field says otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Final

# What became of a request (Invocation.outcome)
OK: Final = "ok"  # answered (any status below 500 that the instance gave)
FAILED: Final = "failed"  # the instance failed it, or it broke off (5xx, cut stream)
TIMED_OUT: Final = "timed_out"  # waited for an instance longer than the revision's request timeout
CANCELLED: Final = "cancelled"  # the client left before the answer ended
OUTCOMES: Final = (OK, FAILED, TIMED_OUT, CANCELLED)


@dataclass(frozen=True, slots=True)
class Invocation:
    """One request to a function, as the gateway saw it (timed-out and failed ones included).

    `concurrency` is how many requests of the function were in flight or held when this one arrived,
    itself included: the per-minute peak of it is the function's concurrency peak, at no extra cost.
    Token counts are the answer's `usage` when it carried one, else None (unknown, never a guess)."""

    function: str
    arrival: float
    cold: bool
    wait_s: float
    outcome: str = OK
    tokens_in: int | None = None
    tokens_out: int | None = None
    concurrency: int = 1


@dataclass(frozen=True, slots=True)
class ColdStart:
    """What one instance's start cost, from the runtime's cold-start report (its ready /readyz answer).

    `total_s` is from the start being asked for to READY, as the gateway measured it; `restore_s` and
    `tiers` (seconds spent reading from each cache tier or store) are the runtime's own figures."""

    function: str
    revision: str
    at: float
    total_s: float
    restore_s: float | None = None
    snapshot_bytes: int | None = None
    tiers: dict[str, float] = field(default_factory=dict)
    start_method: str | None = None


@dataclass(frozen=True, slots=True)
class Arrival:
    """One request of a trace or a synthetic schedule, as the simulator consumes it: `t` in seconds from
    the trace's start; `service_s` when the trace knows how long it ran, else the simulator derives it
    from the token counts or its default service time."""

    function: str
    t: float
    tokens_in: int = 0
    tokens_out: int = 0
    service_s: float | None = None
