"""The floors the pre-warm controller holds per function, kept in the gateway's own clock.

The controller and Redis speak Unix time (`Floor.until`); the gateway's scaling runs on a monotonic
clock that a change of the wall clock cannot move. A floor is converted once, when it is set, and
kept in both forms: the local one for `decide`, the Unix one to show (`kold describe`, the admin
API). Pure: both clocks' readings are passed in. `check_floor` is the one check of a floor (the
admin API's floor bodies and `set_floor` both go through it), `floor_to_json` the one way a floor is
shown (the admin API, the controller's HTTP actuator).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

from kold.controller.scaling import Floor

MAX_FLOOR_INSTANCES = 1_000  # far above any node's instances: a typo, not a plan
MAX_REASON_LEN = 200


class FloorError(ValueError):
    """A floor that cannot be held; `field` names the bad field (the admin API's 400 `param`)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


def check_floor(floor: Floor) -> Floor:
    """`floor` when it is usable, else FloorError (a ValueError) naming the bad field."""
    if not isinstance(floor, Floor):
        raise FloorError("floor", f"a floor must be a scaling.Floor, not {type(floor).__name__}")
    if isinstance(floor.instances, bool) or not isinstance(floor.instances, int):
        raise FloorError("instances", f"instances must be an integer, not {floor.instances!r}")
    if not 0 <= floor.instances <= MAX_FLOOR_INSTANCES:
        raise FloorError("instances", f"instances must be between 0 and {MAX_FLOOR_INSTANCES}, not {floor.instances}")
    if not _finite(floor.until):
        raise FloorError("until", f"until must be a finite Unix time, not {floor.until!r}")
    if not isinstance(floor.reason, str) or len(floor.reason) > MAX_REASON_LEN or not floor.reason.isprintable():
        raise FloorError("reason", f"reason must be printable text of at most {MAX_REASON_LEN} characters")
    if floor.idle_timeout_s is not None and (not _finite(floor.idle_timeout_s) or floor.idle_timeout_s <= 0):
        raise FloorError("idle_timeout_s", f"idle_timeout_s must be a number > 0 or null, not {floor.idle_timeout_s!r}")
    return floor


def floor_to_json(floor: Floor) -> dict[str, Any]:
    """A floor as the admin API shows and takes it (`until` in Unix time)."""
    return {
        "instances": floor.instances,
        "until": floor.until,
        "reason": floor.reason,
        "idle_timeout_s": floor.idle_timeout_s,
    }


def _finite(value: object) -> bool:
    return not isinstance(value, bool) and isinstance(value, int | float) and math.isfinite(value)


@dataclass(frozen=True, slots=True)
class _Held:
    unix: Floor  # as it was set: `until` in Unix time
    local: Floor  # `until` in the gateway's clock


class FloorTable:
    """Floors by function name; an expired floor reads as none and is dropped by `expire`."""

    def __init__(self) -> None:
        self._held: dict[str, _Held] = {}

    def set(self, function: str, floor: Floor | None, *, now: float, wall: float) -> None:
        """Hold `floor` (Unix `until`) for `function`, replacing its last one; None clears it."""
        if floor is None:
            self._held.pop(function, None)
            return
        check_floor(floor)
        local = replace(floor, until=now + (floor.until - wall))
        self._held[function] = _Held(floor, local)

    def local(self, function: str, now: float) -> Floor | None:
        """The function's floor in the gateway's clock, while it holds."""
        held = self._held.get(function)
        return held.local if held is not None and held.local.holds(now) else None

    def unix(self, function: str, now: float) -> Floor | None:
        """The function's floor as the controller set it (Unix `until`), while it holds."""
        held = self._held.get(function)
        return held.unix if held is not None and held.local.holds(now) else None

    def functions(self) -> list[str]:
        return list(self._held)

    def expire(self, now: float) -> list[str]:
        """Drop the floors that ran out; the functions they held."""
        gone = [name for name, held in self._held.items() if not held.local.holds(now)]
        for name in gone:
            del self._held[name]
        return gone

    def forget(self, function: str) -> None:
        self._held.pop(function, None)
