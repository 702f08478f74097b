"""The `forecast` policy (being written: for now it holds nothing, so the spec's idle timeout rules)."""

from __future__ import annotations

from typing import ClassVar

from kold.controller.history import DemandHistory
from kold.controller.policies.base import Plan
from kold.controller.scaling import Floor, Spec


class Forecast:
    name: ClassVar[str] = "forecast"
    knob: ClassVar[str] = "budget"
    knob_values: ClassVar[tuple[float, ...]] = (0.25, 0.5, 1.0, 2.0, 4.0)

    def __init__(self, budget: float = 1.0) -> None:
        self.budget = budget

    def plan(self, function: str, history: DemandHistory, spec: Spec, now: float) -> Plan:
        return Plan(Floor(0, now, "forecast: no prediction yet"))
