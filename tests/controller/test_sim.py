"""The simulator's engine (controller/sim/engine.py) on timelines small enough to work out by hand, and
the real policies on a strictly periodic function. Policies here are the registry's own objects, or tiny
ones written for a test (an oracle that knows the period, one that never holds anything)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import pytest

from kold.controller.history import DemandHistory
from kold.controller.policies.base import Plan, Policy
from kold.controller.policies.registry import make_policy
from kold.controller.records import Arrival
from kold.controller.scaling import Floor, Spec
from kold.controller.sim.engine import SimResult, simulate
from kold.controller.sim.generate import generate, write_csv
from kold.controller.sim.inputs import from_trace
from kold.controller.sim.model import CostModel, ServiceModel, SimConfig, SimSpec


class Nothing:
    """Holds nothing: the spec's idle timeout alone decides (a policy that never pre-warms)."""

    name: ClassVar[str] = "nothing"
    knob: ClassVar[str] = "unused"
    knob_values: ClassVar[tuple[float, ...]] = (1.0,)

    def plan(self, function: str, history: DemandHistory, spec: Spec, now: float) -> Plan:
        return Plan(Floor(0, now, "nothing"))


class Oracle:
    """Knows the function is called every `period` s from `period`: one instance from `lead` s before each
    call until just after it (a pre-warm that cannot miss), nothing in between."""

    name: ClassVar[str] = "oracle"
    knob: ClassVar[str] = "lead"
    knob_values: ClassVar[tuple[float, ...]] = (1.0,)

    def __init__(self, period: float, lead: float) -> None:
        self.period, self.lead = period, lead

    def plan(self, function: str, history: DemandHistory, spec: Spec, now: float) -> Plan:
        k = max(1, int((now + self.lead) // self.period))  # the next call not yet passed by more than 1 s
        due = k * self.period
        if now < due - self.lead:
            return Plan(Floor(0, now, "oracle: wait", idle_timeout_s=1.0), recheck_at=due - self.lead)
        if now > due + 1.0:
            due += self.period
            return Plan(Floor(0, now, "oracle: wait", idle_timeout_s=1.0), recheck_at=due - self.lead)
        return Plan(Floor(1, due + 1.0, "oracle: pre-warm"), recheck_at=due + 1.0)


def config(
    *,
    start_s: float = 1.0,
    service_s: float = 2.0,
    idle_timeout_s: float = 10.0,
    concurrency: int = 4,
    max_instances: int = 100,
    min_instances: int = 0,
    end_s: float | None = None,
) -> SimConfig:
    return SimConfig(
        spec=SimSpec(
            min_instances=min_instances,
            max_instances=max_instances,
            target_concurrency=concurrency,
            idle_timeout_s=idle_timeout_s,
        ),
        costs=CostModel(fixed_s=start_s, snapshot_gb=0.0),
        service=ServiceModel(service_s=service_s),
        end_s=end_s,
    )


def arrivals(times: Sequence[float], function: str = "f") -> list[Arrival]:
    return [Arrival(function, t) for t in times]


# -- accounting ---------------------------------------------------------------------------------------


def test_instance_and_idle_seconds_on_a_hand_computed_timeline() -> None:
    """start 1 s, service 2 s, idle timeout 10 s, arrivals at 0, 5 and 20, the trace ends at 40:
    A starts at 0, ready at 1, serves 1-3 (cold, waited 1 s) and 5-7, idle from 7, stopped at 17;
    B starts at 20, ready at 21, serves 21-23 (cold), stopped at 33.
    Instance-seconds: A 17 + B 13 = 30. Idle: A 1 (start) + 2 (3-5) + 10 (7-17), B 1 + 10: 24."""
    result = simulate(arrivals([0.0, 5.0, 20.0]), Nothing(), config(end_s=40.0))
    assert result.invocations == 3
    assert result.cold_starts == 2
    assert result.queued == 0
    assert result.instance_starts == 2
    assert result.instance_seconds == pytest.approx(30.0)
    assert result.idle_instance_seconds == pytest.approx(24.0)
    assert (result.wait_p50_s, result.wait_p99_s, result.wait_max_s) == pytest.approx((1.0, 1.0, 1.0))
    assert result.simulated_s == 40.0


def test_an_instance_still_alive_at_the_end_is_counted_up_to_the_end() -> None:
    """min_instances 1: started at 0 (before any arrival), ready at 1, serves 5-7, alive until the end (50)."""
    result = simulate(arrivals([5.0]), Nothing(), config(min_instances=1, end_s=50.0))
    assert result.cold_starts == 0
    assert result.instance_seconds == pytest.approx(50.0)
    assert result.idle_instance_seconds == pytest.approx(48.0)


def test_an_llm_request_runs_for_its_tokens_at_the_prefill_and_decode_rates() -> None:
    """1000 prompt tokens at 1000/s and 100 output tokens at 50/s: busy for 1 + 2 = 3 s."""
    cfg = SimConfig(
        spec=SimSpec(idle_timeout_s=10.0),
        costs=CostModel(fixed_s=1.0, snapshot_gb=0.0),
        service=ServiceModel(prefill_tps=1000.0, decode_tps=50.0),
    )
    result = simulate([Arrival("llm", 0.0, tokens_in=1000, tokens_out=100)], Nothing(), cfg)
    assert result.instance_seconds - result.idle_instance_seconds == pytest.approx(3.0)


def test_the_start_time_is_the_fixed_part_plus_the_snapshot_at_the_restore_bandwidth() -> None:
    assert CostModel(fixed_s=0.5, restore_gbps=2.0, snapshot_gb=3.0).start_s == pytest.approx(2.0)
    result = simulate(
        arrivals([0.0]), Nothing(), SimConfig(costs=CostModel(fixed_s=0.5, restore_gbps=2.0, snapshot_gb=3.0))
    )
    assert result.wait_max_s == pytest.approx(2.0)


# -- per-instance concurrency -------------------------------------------------------------------------


@dataclass(frozen=True)
class QueueCase:
    name: str
    max_instances: int
    waits: tuple[float, ...]  # sorted
    cold: int
    queued: int
    starts: int


QUEUE_CASES = [
    QueueCase(
        "a full instance queues the requests beyond its concurrency until a slot frees when max_instances holds it",
        max_instances=1,
        waits=(0.0, 0.0, 10.0, 10.0),
        cold=0,
        queued=2,
        starts=1,
    ),
    QueueCase(
        "a full instance makes the decider start another, and the requests that waited for it are cold",
        max_instances=2,
        waits=(0.0, 0.0, 1.0, 1.0),
        cold=2,
        queued=0,
        starts=2,
    ),
]


@pytest.mark.parametrize("case", QUEUE_CASES, ids=lambda c: c.name)
def test_per_instance_concurrency(case: QueueCase) -> None:
    """min_instances 1 (ready at 1), concurrency 2, service 10 s, four requests at 5."""
    cfg = config(min_instances=1, concurrency=2, service_s=10.0, max_instances=case.max_instances, idle_timeout_s=100.0)
    result = simulate(arrivals([5.0, 5.0, 5.0, 5.0]), Nothing(), cfg)
    assert (result.cold_starts, result.queued, result.instance_starts) == (case.cold, case.queued, case.starts)
    assert result.wait_max_s == pytest.approx(max(case.waits))
    assert result.wait_p50_s == pytest.approx((case.waits[1] + case.waits[2]) / 2)


def test_requests_go_to_the_least_loaded_ready_instance() -> None:
    """Two warm instances (min 2), concurrency 4: four requests at once split two and two, so the second
    instance is busy too (neither is idle between 5 and 15)."""
    cfg = config(min_instances=2, concurrency=4, service_s=10.0, idle_timeout_s=100.0, end_s=20.0)
    result = simulate(arrivals([5.0, 5.0, 5.0, 5.0]), Nothing(), cfg)
    assert result.instance_seconds == pytest.approx(40.0)
    assert result.idle_instance_seconds == pytest.approx(40.0 - 2 * 10.0)


def test_arrivals_out_of_order_are_refused() -> None:
    with pytest.raises(ValueError, match="sorted by time"):
        simulate(arrivals([5.0, 4.0]), Nothing(), config())


# -- policies on a strictly periodic function ---------------------------------------------------------


@dataclass(frozen=True)
class PeriodicCase:
    name: str
    policy: Callable[[], Policy]  # a fresh object per run: a policy may cache what it derived per function
    period: float
    cold_at_most: int  # cold starts allowed over the whole run
    cold_in_second_half: int = 0  # exactly this many in the second half of the calls


CALLS = 80
PERIODIC_CASES = [
    PeriodicCase(
        "an oracle that pre-warms 2 s ahead of each call of a 5-minute timer: no cold start at all",
        lambda: Oracle(300.0, 2.0),
        300.0,
        cold_at_most=0,
    ),
    PeriodicCase(
        "hybrid-histogram on a 5-minute timer: only the first call is cold (its pre-warm comes before the rest)",
        lambda: make_policy("hybrid-histogram"),
        300.0,
        cold_at_most=1,
    ),
    PeriodicCase(
        "forecast on a 5-minute timer: cold only while it learns the period, never once it has",
        lambda: make_policy("forecast"),
        300.0,
        cold_at_most=CALLS // 2,
    ),
    PeriodicCase(
        "knative-default on a 5-minute timer (period over its 90 s): every call is cold",
        lambda: make_policy("knative-default"),
        300.0,
        cold_at_most=CALLS,
        cold_in_second_half=CALLS // 2,
    ),
    PeriodicCase(
        "knative-default on a 1-minute timer (period under its 90 s): only the first call is cold",
        lambda: make_policy("knative-default"),
        60.0,
        cold_at_most=1,
    ),
]


@pytest.mark.parametrize("case", PERIODIC_CASES, ids=lambda c: c.name)
def test_a_strictly_periodic_function(case: PeriodicCase) -> None:
    times = [case.period * k for k in range(1, CALLS + 1)]
    cfg = SimConfig(spec=SimSpec(idle_timeout_s=60.0), service=ServiceModel(service_s=0.1))
    first = simulate(arrivals(times[: CALLS // 2]), case.policy(), cfg)
    whole = simulate(arrivals(times), case.policy(), cfg)
    assert whole.invocations == CALLS
    assert whole.cold_starts <= case.cold_at_most
    assert whole.cold_starts - first.cold_starts == case.cold_in_second_half


# -- determinism --------------------------------------------------------------------------------------


def _outcome(result: SimResult) -> dict[str, object]:
    data = result.to_dict(per_function=True)
    data.pop("wall_s")
    return data


def test_the_simulation_is_deterministic_for_a_seed(tmp_path: Path) -> None:
    path = tmp_path / "day.csv"
    write_csv(path, generate(30, seed=7, days=1))
    runs = [
        _outcome(simulate(from_trace(path, seed=3).arrivals, make_policy("hybrid-histogram"), SimConfig()))
        for _ in range(2)
    ]
    assert runs[0] == runs[1]
    assert runs[0]["invocations"] > 1000
    other = _outcome(simulate(from_trace(path, seed=4).arrivals, make_policy("hybrid-histogram"), SimConfig()))
    assert other["invocations"] == runs[0]["invocations"]  # the same counts, spread differently
    assert other != runs[0]
