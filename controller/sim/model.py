"""What the simulator assumes about the platform: the scaling spec, how long an instance takes to start,
and how long a request takes to serve.

The defaults are the local platform's measured figures (docs/benchmarks.md, "More readers for a cold
local file", 2026-11-23 15:35 UTC, `kold-gateway`, 1b bf16 = 2.2 GB): the snapshot restored from the
cold local disk in 388 ms (2.2 GB / 0.388 s = 5.7 GB/s) and the instance was ready 23 ms after its restore
(ready 411 ms). So a start costs 0.025 s + 2.2 GB / 5.7 GB/s = 0.41 s. Token rates have no measured
figure (no GPU run yet): the defaults are a round guess for a small model on one GPU, and the flags move them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from kold.controller.records import Arrival

DEFAULT_START_S = 0.025  # READY 411 ms less the restore's 388 ms
DEFAULT_RESTORE_GBPS = 5.7  # 2.2 GB restored in 0.388 s
DEFAULT_SNAPSHOT_GB = 2.2  # the 1b model, bf16
DEFAULT_SERVICE_S = 0.1
DEFAULT_PREFILL_TPS = 5000.0
DEFAULT_DECODE_TPS = 50.0


def _positive(name: str, value: float, *, zero: bool = False) -> None:
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < 0 or (value == 0 and not zero):
        raise ValueError(f"{name}: must be a number {'of 0 or more' if zero else 'above 0'} (got {value!r})")


def _whole(name: str, value: int, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name}: must be a whole number of at least {low} (got {value!r})")


@dataclass(frozen=True, slots=True)
class SimSpec:
    """Every simulated function's scaling spec (the gateway's ScalingSpec fields that scaling.decide reads)."""

    min_instances: int = 0
    max_instances: int = 100
    target_concurrency: int = 4
    idle_timeout_s: float = 60.0

    def __post_init__(self) -> None:
        _whole("min_instances", self.min_instances, 0)
        _whole("max_instances", self.max_instances, 1)
        _whole("target_concurrency", self.target_concurrency, 1)
        _positive("idle_timeout_s", self.idle_timeout_s)
        if self.min_instances > self.max_instances:
            raise ValueError(
                f"min_instances ({self.min_instances}) must not exceed max_instances ({self.max_instances})"
            )


@dataclass(frozen=True, slots=True)
class CostModel:
    """An instance's start: a fixed part plus its snapshot read at the restore bandwidth."""

    fixed_s: float = DEFAULT_START_S
    restore_gbps: float = DEFAULT_RESTORE_GBPS
    snapshot_gb: float = DEFAULT_SNAPSHOT_GB

    def __post_init__(self) -> None:
        _positive("start_s", self.fixed_s, zero=True)
        _positive("restore_gbps", self.restore_gbps)
        _positive("snapshot_gb", self.snapshot_gb, zero=True)

    @property
    def start_s(self) -> float:
        return self.fixed_s + self.snapshot_gb / self.restore_gbps


@dataclass(frozen=True, slots=True)
class ServiceModel:
    """How long a request runs once an instance takes it: the trace's own duration when it has one, else
    its tokens at the prefill and decode rates (LLM traces), else a fixed time."""

    service_s: float = DEFAULT_SERVICE_S
    prefill_tps: float = DEFAULT_PREFILL_TPS
    decode_tps: float = DEFAULT_DECODE_TPS

    def __post_init__(self) -> None:
        _positive("service_time", self.service_s, zero=True)
        _positive("prefill_tps", self.prefill_tps)
        _positive("decode_tps", self.decode_tps)

    def of(self, arrival: Arrival) -> float:
        if arrival.service_s is not None:
            return arrival.service_s
        if arrival.tokens_in or arrival.tokens_out:
            return arrival.tokens_in / self.prefill_tps + arrival.tokens_out / self.decode_tps
        return self.service_s


@dataclass(frozen=True, slots=True)
class SimConfig:
    """One run's assumptions. `concurrency`: requests one instance serves at once (None: the spec's
    target_concurrency). `end_s`: the trace's span (idle instances are counted up to it, or to the last
    request's end if that is later); None: the last arrival."""

    spec: SimSpec = SimSpec()
    costs: CostModel = CostModel()
    service: ServiceModel = ServiceModel()
    concurrency: int | None = None
    end_s: float | None = None

    def __post_init__(self) -> None:
        if self.concurrency is not None:
            _whole("concurrency", self.concurrency, 1)
        if self.end_s is not None:
            _positive("end_s", self.end_s, zero=True)

    @property
    def instance_concurrency(self) -> int:
        return self.concurrency if self.concurrency is not None else self.spec.target_concurrency
