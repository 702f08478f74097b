"""The one scaling core: how many instances a function should run, and which idle ones to stop.

`decide(spec, observed, floor, now)` is pure: it reads no clock, no Redis and no network, so the
gateway's scaler, the controller and the simulator all call this same function and cannot disagree
(Knative's pkg/autoscaler split: collect -> decide -> act; only the outer loops own a clock).

The rules, in order:
- reactive: ceil((requests in flight + requests held) / target_concurrency) instances, so a burst starts
  as many instances as its concurrency needs and no instance is idle while the function has a backlog;
- the floor: what the pre-warm controller asked to keep (`Floor`), while it has not expired;
- min_instances; then everything is capped at max_instances;
- scale in: only READY instances with nothing in flight for the idle timeout (the floor's, while it
  holds one, else the spec's), longest idle first, and only as many as are above what is desired.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final, Protocol

STARTING: Final = "starting"
READY: Final = "ready"
DRAINING: Final = "draining"


class Spec(Protocol):
    """What the decider reads of a revision's scaling spec (the gateway's ScalingSpec fits it)."""

    @property
    def min_instances(self) -> int: ...
    @property
    def max_instances(self) -> int: ...
    @property
    def target_concurrency(self) -> int: ...
    @property
    def idle_timeout_s(self) -> float: ...


@dataclass(frozen=True, slots=True)
class InstanceView:
    """One instance as the collector saw it. `idle_since`: when it last had nothing in flight (when it
    became READY for one that has served nothing yet); None while it has requests in flight."""

    id: str
    state: str  # STARTING, READY or DRAINING
    in_flight: int = 0
    idle_since: float | None = None


@dataclass(frozen=True, slots=True)
class Observed:
    """A function's serving revision at one moment: its instances, the requests held for want of an
    instance, and starts asked for but not spawned yet."""

    instances: Sequence[InstanceView] = ()
    waiting: int = 0
    pending: int = 0


@dataclass(frozen=True, slots=True)
class Floor:
    """What the pre-warm controller asks for: keep at least `instances` live until `until`, and, while
    it holds, scale in instances above it only after `idle_timeout_s` (None: the spec's)."""

    instances: int
    until: float
    reason: str
    idle_timeout_s: float | None = None

    def holds(self, now: float) -> bool:
        return now < self.until


@dataclass(frozen=True, slots=True)
class Decision:
    """What to do now. `desired` counts live instances (starting and ready); `start` is how many to
    start on top of those live and pending; `stop` names idle READY instances to drain. `next_at` is
    the earliest time the answer changes with no new input (an idle timeout or the floor running out),
    so an event-driven caller knows when to ask again; None: not before something changes."""

    desired: int
    start: int
    stop: tuple[str, ...]
    reason: str
    next_at: float | None = None


@dataclass(frozen=True, slots=True)
class NoData:
    """Nothing observed (the collector could not see the function): do not act on a guess."""

    reason: str


def decide(spec: Spec, observed: Observed | None, floor: Floor | None, now: float) -> Decision | NoData:
    """The desired instances for one function's serving revision and the idle instances to stop."""
    if observed is None:
        return NoData("no observation of the function")
    live = [i for i in observed.instances if i.state in (STARTING, READY)]
    load = sum(i.in_flight for i in live) + observed.waiting
    reactive = math.ceil(load / spec.target_concurrency)
    holding = floor is not None and floor.holds(now)
    floor_n = floor.instances if holding and floor is not None else 0
    desired = min(spec.max_instances, max(spec.min_instances, reactive, floor_n))
    if desired == reactive and reactive > 0:
        reason = f"load {load} at target {spec.target_concurrency}"
    elif floor is not None and holding and desired == floor_n and floor_n > 0:
        reason = f"floor {floor_n}: {floor.reason}"
    elif desired == spec.min_instances and desired > 0:
        reason = f"min_instances {spec.min_instances}"
    elif desired == spec.max_instances and desired > 0:
        reason = f"max_instances {spec.max_instances}"
    else:
        reason = "no load"
    start = max(0, desired - len(live) - observed.pending)

    idle_timeout = spec.idle_timeout_s
    if floor is not None and holding and floor.idle_timeout_s is not None:
        idle_timeout = floor.idle_timeout_s
    expired: list[InstanceView] = []
    upcoming: list[float] = []
    for inst in live:
        if inst.state != READY or inst.in_flight or inst.idle_since is None:
            continue
        due = inst.idle_since + idle_timeout
        if due <= now:
            expired.append(inst)
        else:
            upcoming.append(due)
    surplus = len(live) - desired
    # only the floor running out, or an idle timeout that would free an instance above `desired`, can
    # change the answer without new input
    times = [floor.until] if floor is not None and holding else []
    if surplus > len(expired) and upcoming:
        times.append(min(upcoming))
    next_at = min(times) if times else None
    stop: tuple[str, ...] = ()
    if surplus > 0 and expired:
        expired.sort(key=lambda i: (i.idle_since, i.id))
        stop = tuple(i.id for i in expired[:surplus])
        reason = f"{reason}; idle {idle_timeout:g} s: scale in {len(stop)}"
    return Decision(desired=desired, start=start, stop=stop, reason=reason, next_at=next_at)
