"""The controller's Prometheus metrics: what it decided, and whether it is the one acting.

Registered in a given CollectorRegistry (`kold up` passes the gateway's, so one /metrics shows both
sides) or a private one. What the floors achieved is counted where the instances are, by the gateway:
`kold_gateway_prewarm_starts_total`, `kold_gateway_prewarm_hits_total` and
`kold_gateway_idle_instance_seconds_total`.
"""

from __future__ import annotations

import contextlib

from prometheus_client import CollectorRegistry, Counter, Gauge


class ControllerMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self._policies: dict[str, set[str]] = {}  # function -> policies its decisions were counted under
        self.prewarms = Counter(
            "kold_controller_prewarms",
            "Floors raised above the instances the function's previous floor held (a pre-warm asked for)",
            ["function"],
            registry=self.registry,
        )
        self.decisions = Counter(
            "kold_controller_decisions",
            "Floors the controller set or cleared (a changed decision), by function and policy",
            ["function", "policy"],
            registry=self.registry,
        )
        self.lease_held = Gauge(
            "kold_controller_lease_held", "1 while this controller holds the lease (it is the one acting)",
            registry=self.registry,
        )  # fmt: skip
        self.redis_errors = Counter(
            "kold_controller_redis_errors", "Controller ticks cut short by a Redis error", registry=self.registry
        )

    def decided(self, function: str, policy: str, *, raised: bool) -> None:
        """One floor set or cleared; `raised`: it asks for more instances than the last one held."""
        self.decisions.labels(function, policy).inc()
        self._policies.setdefault(function, set()).add(policy)
        if raised:
            self.prewarms.labels(function).inc()
        else:
            self.prewarms.labels(function)  # the series exists (at 0) once the function has decisions

    def forget(self, function: str) -> None:
        """Drop a removed function's series (they would otherwise be exported for ever)."""
        with contextlib.suppress(KeyError):
            self.prewarms.remove(function)
        for policy in self._policies.pop(function, set()):
            with contextlib.suppress(KeyError):
                self.decisions.remove(function, policy)
