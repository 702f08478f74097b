"""The pre-warm policy interface: what every policy gives the controller and the simulator.

A policy is pure: `plan(history, spec, now)` reads the function's demand history and returns a floor
(instances to keep until a time, the keep-alive for instances above it, and why) and when to ask
again. Nothing in a policy reads a clock, Redis or the network, so the simulator runs the very objects
the live controller runs. A policy object may cache what it derived from a history (a detected
period) keyed by function, but its answer depends only on its arguments.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Protocol

from kold.controller.history import DemandHistory
from kold.controller.scaling import Floor, Spec


@dataclass(frozen=True, slots=True)
class Plan:
    """A policy's answer for one function at `now`: the floor to hold, and `recheck_at`, the time the
    answer changes with no new arrival (a pre-warm falling due, a keep-alive running out); None: not
    before the next arrival. The controller and the simulator ask again then, or at the next arrival."""

    floor: Floor
    recheck_at: float | None = None


class Policy(Protocol):
    """One pre-warm policy. `name` is what `kold deploy --prewarm` takes; `knob` names the parameter
    that `kold sim --pareto` sweeps, and `knob_values` the values it tries."""

    name: ClassVar[str]
    knob: ClassVar[str]
    knob_values: ClassVar[tuple[float, ...]]

    def plan(self, function: str, history: DemandHistory, spec: Spec, now: float) -> Plan: ...
