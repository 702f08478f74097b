"""The client against real HTTP servers on loopback with known delays: what it measures, what it sends,
and that every kind of bad server ends in a record with the right error, never an exception.

Times are checked against when the server (in this process, on the same clock) really wrote each token,
so the test measures the client's error and not the server's punctuality; the tolerance, ±15 ms, is
wide enough for a loaded 2-core machine and far below the delays being measured (50 ms, 20 ms)."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Iterator

import pytest
from loadgen_server import FakeServer, ResettingServer, Seen, free_port

from kold.loadgen.client import Client, kold_headers
from kold.loadgen.records import RequestRecord
from kold.loadgen.schedule import PlannedRequest
from kold.loadgen.target import Target

TOL = 0.015
TTFT, GAP = 0.05, 0.02
ORIGIN = [0.0]  # the perf_counter time the last send() counted from


def true_times(r: RequestRecord, seen: Seen) -> tuple[float, list[float], float | None]:
    """(TTFT, gaps, latency) as the server wrote them, counted from the client's send."""
    sent = ORIGIN[0] + r.sent_s
    gaps = [b - a for a, b in itertools.pairwise(seen.tokens)]
    return seen.tokens[0] - sent, gaps, seen.done - sent if seen.done is not None else None


@pytest.fixture(scope="module")
def server() -> Iterator[FakeServer]:
    with FakeServer(ttft_s=TTFT, gap_s=GAP) as s:
        send(s.url, "warm-up")  # the first request to a fresh server pays its one-time costs
        yield s


def send(
    url: str,
    model: str,
    *,
    api: str = "chat",
    stream: bool = True,
    max_tokens: int = 6,
    timeout_s: float = 10.0,
    stall_s: float = 5.0,
    api_key: str | None = None,
    ignore_eos: bool = False,
    late_s: float = 0.0,
) -> RequestRecord:
    """One request through a fresh client, scheduled `late_s` ago; the run began 1 s before that (so
    `scheduled_s` is 1.0 and the send's perf_counter time is `ORIGIN[0] + sent_s`)."""

    async def go() -> RequestRecord:
        target = Target(base_url=url + "/v1", api=api, stream=stream, api_key=api_key)
        async with Client(target, max_connections=None, timeout_s=timeout_s, stall_s=stall_s) as client:
            now = time.perf_counter()
            ORIGIN[0] = now - late_s - 1.0
            planned = PlannedRequest(0.0, model, 10, max_tokens, ignore_eos=ignore_eos, stage=2)
            return await client.send(planned, "hello world", origin=now - late_s - 1.0, scheduled=now - late_s)

    return asyncio.run(go())


@pytest.mark.parametrize("api", ["chat", "completions"])
def test_stream_times_every_token(server: FakeServer, api: str) -> None:
    r = send(server.url, "m", api=api, max_tokens=6)
    assert r.error is None and r.status == 200
    ttft, gaps, latency = true_times(r, server.requests[-1])
    assert ttft >= TTFT and len(gaps) == 5  # the server kept to its delays (at least)
    assert r.ttft_s == pytest.approx(ttft, abs=TOL)
    assert r.ttst_s == pytest.approx(ttft + gaps[0], abs=TOL)
    assert len(r.itl_s) == 5  # the role-only first chat chunk is not a token
    assert r.itl_s == pytest.approx(gaps, abs=TOL)
    assert r.latency_s is not None and r.ttft_s is not None
    assert r.latency_s == pytest.approx(latency, abs=TOL)
    assert r.tpot_s == pytest.approx((r.latency_s - r.ttft_s) / 5)
    assert r.tpot_s == pytest.approx(sum(gaps) / 5, abs=TOL / 2)
    assert (r.prompt_tokens, r.completion_tokens) == (7, 6)  # the server's usage, from the last chunk
    assert (r.target_prompt_tokens, r.max_tokens, r.function, r.stage) == (10, 6, "m", 2)
    assert (r.cold, r.cold_start, r.instance) == (None, None, None)  # no x-kold-* headers: no guess


def test_times_from_the_schedule_include_the_lateness(server: FakeServer) -> None:
    r = send(server.url, "m", late_s=0.2)
    assert r.lag_s == pytest.approx(0.2, abs=0.005)
    assert r.sent_s == pytest.approx(1.2, abs=0.005) and r.scheduled_s == pytest.approx(1.0)
    assert r.ttft_sched_s is not None and r.ttft_s is not None and r.latency_sched_s is not None
    assert r.ttft_sched_s == pytest.approx(r.ttft_s + r.lag_s)
    assert r.latency_sched_s == pytest.approx(r.latency_s + r.lag_s)  # type: ignore[operator]


def test_request_body_and_key(server: FakeServer) -> None:
    send(server.url, "m", api_key="sk-test", ignore_eos=True, max_tokens=3)
    headers, body = server.requests[-1].headers, server.requests[-1].body
    assert headers["authorization"] == "Bearer sk-test"
    assert body["model"] == "m" and body["max_tokens"] == 3 and body["ignore_eos"] is True
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
    assert body["messages"] == [{"role": "user", "content": "hello world"}]
    send(server.url, "m", api="completions", stream=False)
    headers, body = server.requests[-1].headers, server.requests[-1].body
    assert "authorization" not in headers and "ignore_eos" not in body and "stream_options" not in body
    assert body["prompt"] == "hello world" and body["stream"] is False


def test_not_streamed(server: FakeServer) -> None:
    r = send(server.url, "m", stream=False, max_tokens=4)
    assert r.error is None
    seen = server.requests[-1]
    assert seen.done is not None and seen.done - seen.arrived >= TTFT + 3 * GAP
    assert r.latency_s == pytest.approx(seen.done - (ORIGIN[0] + r.sent_s), abs=TOL)
    assert (r.ttft_s, r.itl_s, r.tpot_s) == (None, [], None)  # no tokens seen one by one
    assert (r.prompt_tokens, r.completion_tokens) == (7, 4)


def test_stream_in_fragments(server: FakeServer) -> None:
    """Events split every 3 bytes, CRLF line ends split too: the same tokens, the same timing."""
    r = send(server.url, "fragments", max_tokens=4)
    assert r.error is None and r.completion_tokens == 4
    ttft, gaps, _ = true_times(r, server.requests[-1])
    assert r.ttft_s == pytest.approx(ttft, abs=TOL) and r.itl_s == pytest.approx(gaps, abs=TOL)


def test_kold_cold_start_headers(server: FakeServer) -> None:
    r = send(server.url, "cold")
    assert r.cold is True and r.instance == "inst-1"
    assert r.cold_start == {"queue-ms": 1.5, "cold-start-ms": 812.0, "restore-ms": 400.5}  # restore-source: text


def test_kold_headers_rules() -> None:
    assert kold_headers({"content-type": "text/event-stream"}) == (None, None, None)
    assert kold_headers({"X-Kold-Cold": "0", "X-Kold-Queue-Ms": "0.2"}) == (False, {"queue-ms": 0.2}, None)
    # a runtime answering directly: no tag, so cold exactly when the cold-start breakdown is there
    assert kold_headers({"x-kold-queue-ms": "0.2"}) == (False, {"queue-ms": 0.2}, None)
    assert kold_headers({"x-kold-cold-start-ms": "900"}) == (True, {"cold-start-ms": 900.0}, None)


@pytest.mark.parametrize(
    ("model", "error", "status", "detail", "tokens"),
    [
        ("error500", "http_500", 500, "internal: boom", 0),
        ("error_stall", "http_503", 503, None, 0),  # the status, without waiting for a body that never ends
        ("json_stream", "malformed_sse", 200, "application/json", 0),
        ("crash", "connection_reset", 200, None, 2),
        ("stall", "stream_stalled", 200, "mid-stream", 2),
        ("malformed", "malformed_sse", 200, "not JSON", 2),
        ("sse_error", "sse_error", 200, "stream_cut: the instance failed mid-answer", 2),
        ("no_done", "incomplete_stream", 200, "[DONE]", 6),
        ("slow_head", "timeout", None, "within", 0),
    ],
)
def test_bad_servers_become_records(
    server: FakeServer, model: str, error: str, status: int | None, detail: str | None, tokens: int
) -> None:
    started = time.perf_counter()
    r = send(server.url, model, timeout_s=1.0, stall_s=0.3)
    assert r.error == error, r.error_detail
    assert r.status == status
    if detail is not None:
        assert r.error_detail is not None and detail in r.error_detail
    assert r.latency_s is None and r.latency_sched_s is None and r.tpot_s is None  # no complete answer
    assert len(r.itl_s) == max(tokens - 1, 0)  # tokens measured before the failure are kept
    assert (r.ttft_s is not None) == (tokens > 0)
    assert time.perf_counter() - started < 3.0  # the stall and the slow head end at their deadlines


def test_connection_reset_mid_stream() -> None:
    with ResettingServer() as s:
        r = send(s.url, "m")
    assert r.error == "connection_reset", r.error_detail
    assert r.status == 200 and r.ttft_s is not None and r.latency_s is None


def test_connection_refused() -> None:
    r = send(f"http://127.0.0.1:{free_port()}", "m")
    assert r.error == "connection_refused", r.error_detail
    assert r.status is None and r.ttft_s is None and r.latency_s is None


def test_bad_targets() -> None:
    with pytest.raises(ValueError, match="api must be one of"):
        Target(base_url="http://x/v1", api="embeddings")
    with pytest.raises(ValueError, match="http:// or https://"):
        Target(base_url="localhost:8000/v1")
