"""The `knative-default` policy: what Knative's KPA does out of the box, as the baseline to beat.

KPA scales the last instance away only after a whole 60 s stable window without traffic plus the
30 s scale-to-zero grace period: 90 s after the last request. Instances above one go once the stable
window (60 s) has seen no need for them. Scale-out is reactive on concurrency, which is the decider's
own rule (scaling.decide), so this policy adds nothing for it.
"""

from __future__ import annotations

from typing import ClassVar

from kold.controller.history import DemandHistory
from kold.controller.policies.base import Plan
from kold.controller.scaling import Floor, Spec

STABLE_WINDOW_S = 60.0  # KPA's stable-window default
SCALE_TO_ZERO_GRACE_S = 30.0  # KPA's scale-to-zero-grace-period default


class KnativeDefault:
    """Keep one instance `grace` seconds after the last request; extra ones go after the stable window."""

    name: ClassVar[str] = "knative-default"
    knob: ClassVar[str] = "grace"
    knob_values: ClassVar[tuple[float, ...]] = (30, 60, 90, 180, 300, 600)

    def __init__(self, grace: float = STABLE_WINDOW_S + SCALE_TO_ZERO_GRACE_S) -> None:
        if not grace >= 0:  # also rejects NaN
            raise ValueError(f"knative-default: grace must be >= 0 seconds, not {grace}")
        self.grace = float(grace)

    def plan(self, function: str, history: DemandHistory, spec: Spec, now: float) -> Plan:
        last = history.last_arrival
        if last is None:
            return Plan(Floor(0, now, f"{self.name}: no request yet"))
        until = last + self.grace
        if now >= until:
            return Plan(Floor(0, now, f"{self.name}: idle {now - last:.0f} s, past the {self.grace:g} s grace"))
        reason = f"{self.name}: {self.grace:g} s after the last request"
        return Plan(Floor(1, until, reason, idle_timeout_s=STABLE_WINDOW_S), recheck_at=until)
