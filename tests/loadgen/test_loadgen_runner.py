"""The runner against real servers on loopback: the open loop keeps its schedule whatever the server
does, a cap or a closed loop limits what is in flight, queueing in the client shows in the times from
the schedule (coordinated omission), errors are records, and a kold gateway's instances are sampled.

Assertions are wide (tens of ms) so that they hold on a loaded 2-core machine; what they tell apart
differs by hundreds of ms."""

from __future__ import annotations

import asyncio
import itertools
import statistics
from collections.abc import Iterator

import pytest
from loadgen_server import FakeServer

from kold.loadgen.records import RequestRecord
from kold.loadgen.runner import LiveCounts, RunResult, RunSettings, run
from kold.loadgen.schedule import PlannedRequest
from kold.loadgen.target import Target


@pytest.fixture(scope="module")
def server() -> Iterator[FakeServer]:
    """Answers in about 60 ms: TTFT 50 ms, then 1 more token 10 ms later (max_tokens 2)."""
    with FakeServer(ttft_s=0.05, gap_s=0.01) as s:
        go(s, [PlannedRequest(0.0, "warm-up", 5, 2)], RunSettings())  # one-time costs of a fresh server
        yield s


@pytest.fixture
def slow() -> Iterator[FakeServer]:
    """Answers in about 350 ms."""
    with FakeServer(ttft_s=0.3, gap_s=0.025) as s:
        yield s


def go(
    server: FakeServer,
    plan: list[PlannedRequest],
    settings: RunSettings,
    *,
    gateway: bool = False,
    live: LiveCounts | None = None,
    seen: list[RequestRecord] | None = None,
) -> RunResult:
    server.max_in_flight = 0
    target = Target(base_url=server.url + "/v1", kold_gateway=server.url if gateway else None)
    return asyncio.run(
        run(plan, target, settings, lambda p: "hi", seen.append if seen is not None else None, live=live)
    )


def every(n: int, gap_s: float, function: str = "m", max_tokens: int = 2) -> list[PlannedRequest]:
    return [PlannedRequest(i * gap_s, function, 5, max_tokens) for i in range(n)]


def test_open_loop_keeps_its_schedule_against_a_slow_server(slow: FakeServer) -> None:
    """20 requests 25 ms apart, each answered in ~350 ms: every one goes out on time, so they overlap."""
    seen: list[RequestRecord] = []
    result = go(slow, every(20, 0.025, max_tokens=3), RunSettings(), seen=seen)
    assert len(result.records) == 20 and seen == result.records
    assert all(r.error is None for r in result.records)
    lags = [r.lag_s for r in result.records]
    assert statistics.median(lags) < 0.005 and max(lags) < 0.1, lags  # a closed loop: seconds
    assert slow.max_in_flight >= 10  # a closed loop would have had one
    for r in result.records:
        assert r.sent_s == pytest.approx(r.scheduled_s, abs=0.1)
        assert r.ttft_s is not None and 0.3 <= r.ttft_s < 0.4
    assert 19 * 0.025 + 0.35 <= result.duration_s < 19 * 0.025 + 0.35 + 0.2
    assert result.overhead["cpu_s_per_request"] > 0 and result.instances == []


def test_coordinated_omission_shows_in_times_from_the_schedule(server: FakeServer) -> None:
    """One request in flight at a time, one planned every 10 ms, each taking ~60 ms: the client queues.
    TTFT from the send stays ~50 ms; TTFT from the schedule grows with the queue, and so does lag."""
    result = go(server, every(8, 0.01), RunSettings(max_concurrency=1))
    assert server.max_in_flight == 1
    records = sorted(result.records, key=lambda r: r.scheduled_s)
    for r in records:
        assert r.error is None and r.ttft_s is not None and 0.05 <= r.ttft_s < 0.1
    sched = [r.ttft_sched_s or 0.0 for r in records]
    assert all(b > a for a, b in itertools.pairwise(sched)), sched
    assert sched[-1] > 0.3  # ~7 x (60 - 10) ms of queueing + 50 ms
    assert records[-1].lag_s > 0.25
    assert result.behind_schedule and "behind schedule" in result.warnings[0]
    assert "max-concurrency" in result.warnings[0]


def test_open_loop_without_a_cap_sends_everything_at_once(server: FakeServer) -> None:
    result = go(server, every(10, 0.0), RunSettings())
    assert server.max_in_flight == 10  # the connection pool does not hold requests back
    assert max(r.lag_s for r in result.records) < 0.05  # far below the ~60 ms a queued one would wait


def test_max_concurrency_caps_in_flight(server: FakeServer) -> None:
    result = go(server, every(6, 0.0), RunSettings(max_concurrency=3))
    assert server.max_in_flight == 3
    records = sorted(result.records, key=lambda r: r.sent_s)
    first_end = min(r.sent_s + (r.latency_s or 0.0) for r in records[:3])
    assert records[3].sent_s >= first_end - 0.001  # the fourth waited for a slot
    assert records[3].lag_s > 0.04


def test_closed_loop(server: FakeServer) -> None:
    """2 workers, 6 requests: never more than 2 in flight, each sent when a worker's last one ended, so
    lag is nil and the run takes three answers' time."""
    result = go(server, every(6, 10.0), RunSettings(mode="closed", concurrency=2))
    assert server.max_in_flight == 2
    assert all(r.error is None and r.lag_s < 0.02 for r in result.records)
    records = sorted(result.records, key=lambda r: r.sent_s)
    first_end = min(r.sent_s + r.latency_s for r in records[:2])  # type: ignore[operator]
    assert records[2].sent_s >= first_end - 0.001
    assert 0.18 <= result.duration_s < 1.0  # three answers' time, not the plan's 50 s
    assert not result.behind_schedule


def test_errors_are_records_and_counted(server: FakeServer) -> None:
    plan = [PlannedRequest(0.0, "error500", 5, 2), PlannedRequest(0.0, "crash", 5, 4), PlannedRequest(0.0, "m", 5, 2)]
    live = LiveCounts()
    result = go(server, plan, RunSettings(), live=live)
    assert sorted(str(r.error) for r in result.records) == ["None", "connection_reset", "http_500"]
    assert (live.planned, live.sent, live.done, live.errors, live.in_flight) == (3, 3, 3, 2, 0)
    assert live.lag_p99() is not None


def test_cold_starts_counted_live(server: FakeServer) -> None:
    live = LiveCounts()
    result = go(server, [PlannedRequest(0.0, "cold", 5, 2), PlannedRequest(0.0, "m", 5, 2)], RunSettings(), live=live)
    assert live.cold == 1 and sorted(str(r.cold) for r in result.records) == ["None", "True"]


def test_instances_sampled_from_the_gateway(server: FakeServer) -> None:
    result = go(server, every(5, 0.1, function="fn"), RunSettings(sample_interval_s=0.1), gateway=True)
    assert len(result.instances) >= 3
    for sample in result.instances:
        assert {k: sample[k] for k in ("function", "starting", "ready", "draining")} == {
            "function": "fn", "starting": 1, "ready": 2, "draining": 1,
        }  # fmt: skip
    times = [s["t_s"] for s in result.instances]
    assert times == sorted(times) and times[0] < 0.5


def test_sampling_refused_is_a_warning_not_a_failure(server: FakeServer) -> None:
    result = go(server, every(3, 0.05, function="forbidden"), RunSettings(sample_interval_s=0.05), gateway=True)
    assert result.instances == [] and all(r.error is None for r in result.records)
    assert any("403" in w and "admin scope" in w for w in result.warnings), result.warnings


def test_no_sampling_for_other_servers(server: FakeServer) -> None:
    assert go(server, every(3, 0.05, function="fn"), RunSettings(sample_interval_s=0.05)).instances == []


def test_a_failing_on_record_is_not_swallowed(server: FakeServer) -> None:
    def boom(record: RequestRecord) -> None:
        raise RuntimeError("writer broke")

    target = Target(base_url=server.url + "/v1")
    with pytest.raises(RuntimeError, match="writer broke"):
        asyncio.run(run(every(3, 0.01), target, RunSettings(), lambda p: "hi", boom))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"mode": "burst"}, "mode must be"),
        ({"mode": "closed"}, "concurrency >= 1"),
        ({"mode": "closed", "concurrency": 2, "max_concurrency": 2}, "caps an open-loop run"),
        ({"concurrency": 2}, "closed-loop run"),
        ({"max_concurrency": 0}, "max_concurrency must be >= 1"),
        ({"timeout_s": 0}, "timeout_s must be a positive number"),
        ({"stall_s": float("nan")}, "stall_s must be a positive number"),
    ],
)
def test_bad_settings(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        RunSettings(**kwargs)  # type: ignore[arg-type]


def test_labels() -> None:
    assert RunSettings().label == "open loop"
    assert RunSettings(max_concurrency=4).label == "open loop, at most 4 in flight"
    assert RunSettings(mode="closed", concurrency=8).label == "closed loop, concurrency 8"
