"""The `fixed-keepalive` policy: keep instances a fixed time after their last request (AWS Lambda-like).

Every instance, the last one included, stays `minutes` after the function's last request; nothing is
pre-warmed. The baseline that shows what a single keep-alive length costs: long enough to catch a
function's gaps is idle most of the time for one called rarely.
"""

from __future__ import annotations

from typing import ClassVar

from kold.controller.history import DemandHistory
from kold.controller.policies.base import Plan
from kold.controller.scaling import Floor, Spec


class FixedKeepalive:
    """Floor one instance until `minutes` after the last request; extra instances idle as long."""

    name: ClassVar[str] = "fixed-keepalive"
    knob: ClassVar[str] = "minutes"
    knob_values: ClassVar[tuple[float, ...]] = (1, 2, 5, 10, 20, 30, 60)

    def __init__(self, minutes: float = 10.0) -> None:
        if not minutes >= 0:  # also rejects NaN
            raise ValueError(f"fixed-keepalive: minutes must be >= 0, not {minutes}")
        self.minutes = float(minutes)

    def plan(self, function: str, history: DemandHistory, spec: Spec, now: float) -> Plan:
        last = history.last_arrival
        if last is None:
            return Plan(Floor(0, now, f"{self.name}: no request yet"))
        keep_s = self.minutes * 60
        until = last + keep_s
        if now >= until:
            reason = f"{self.name}: idle {(now - last) / 60:.1f} min, past the {self.minutes:g} min keep-alive"
            return Plan(Floor(0, now, reason))
        reason = f"{self.name}: {self.minutes:g} min after the last request"
        return Plan(Floor(1, until, reason, idle_timeout_s=keep_s), recheck_at=until)
