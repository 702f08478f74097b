"""The runtime's demand reporting (runtime/demand.py): where no kold gateway is in the path (Knative), an
instance writes its requests and its cold start to Redis itself, off the request path, for the
pre-warm controller. Against the session's real redis-server (or a private one a test stops), with
real `kold runtime serve` processes on the tiny model, and the in-process app over a fake backend for
the outcomes that a real model does not produce on demand.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from runtime_helpers import ControlledLoader, FakeBackend, RuntimeProcess, parse_sse, restore_delay_env

from kold.commands.runtime import demand_reporting
from kold.controller import records
from kold.controller.demand import DemandStore
from kold.controller.records import ColdStart, Invocation
from kold.errors import CLIError
from kold.localredis import LocalRedis
from kold.runtime.demand import STOP_FLUSH_S, DemandReporting
from kold.runtime.server import Runtime, ServeOptions
from kold.settings import Settings

pytestmark = pytest.mark.timeout(180)

DROPPED = "kold_runtime_demand_records_dropped_total"
# what a parent test process may have set that would change how a runtime it starts reports
_DEMAND_ENV = ("K_SERVICE", "K_REVISION", "KOLD_REDIS_URL", "KOLD_RUNTIME_DEMAND")


@pytest.fixture
def function_name(redis_url: str) -> Iterator[str]:
    """A function name of this test's own (the runtime writes under the platform's `kold:` prefix);
    its demand keys are removed afterwards."""
    name = f"fn-{uuid.uuid4().hex[:12]}"
    yield name
    client = redis.Redis.from_url(redis_url, socket_connect_timeout=1)
    DemandStore(client).forget(name)
    client.close()


@pytest.fixture
def store(redis_url: str) -> Iterator[DemandStore]:
    """The controller's view of the session's Redis, under the prefix the runtime writes."""
    client = redis.Redis.from_url(redis_url, socket_connect_timeout=1)
    yield DemandStore(client, prefix="kold:")
    client.close()


def start(start_runtime: Callable[..., RuntimeProcess], *args: str, **env: str) -> RuntimeProcess:
    """A runtime process whose demand settings are exactly `env` (none inherited from this process)."""
    unset = {name: "" for name in _DEMAND_ENV if name in os.environ}
    return start_runtime(*args, env={**unset, "KOLD_RUNTIME_DEMAND": "auto", **env})


def wait_for(cond: Callable[[], Any], what: str, timeout: float = 20.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.05)


def dropped(rt: RuntimeProcess) -> float:
    text = httpx.get(f"{rt.base}/metrics", timeout=5).text
    match = re.search(rf"^{DROPPED} (\S+)$", text, re.MULTILINE)
    assert match, text
    return float(match.group(1))


def waiting(rt: RuntimeProcess) -> int:
    return int(httpx.get(f"{rt.base}/readyz", timeout=5).json().get("waiting", 0))


def complete(rt: RuntimeProcess, *, headers: dict[str, str] | None = None, timeout: float = 60) -> dict[str, Any]:
    r = httpx.post(
        f"{rt.base}/v1/completions",
        json={"model": "tiny", "prompt": "The cold start of a function", "max_tokens": 5},
        headers=headers,
        timeout=timeout,
    )
    assert r.status_code == 200, r.text
    return dict(r.json())


def chat_stream(rt: RuntimeProcess) -> dict[str, Any]:
    """A streamed chat that asks for usage: the usage chunk's counts."""
    body = {
        "model": "tiny",
        "messages": [{"role": "user", "content": "Hello there"}],
        "max_tokens": 3,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    r = httpx.post(f"{rt.base}/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text
    return dict(parse_sse(r.text)[-1]["usage"])


def stop(rt: RuntimeProcess) -> None:
    """SIGTERM: the drain flushes the queued records before the exit."""
    rt.terminate()
    assert rt.wait(30) == 0, rt.output


def tokens(rec: Invocation) -> tuple[int | None, int | None]:
    return rec.tokens_in, rec.tokens_out


# -- a Knative instance: K_SERVICE + KOLD_REDIS_URL -----------------------------------------------


def test_a_knative_instance_reports_its_requests_and_its_cold_start(
    start_runtime: Callable[..., RuntimeProcess], redis_url: str, function_name: str, store: DemandStore
) -> None:
    revision = f"{function_name}-00001"
    rt = start(
        start_runtime,
        "--served-model-name",
        "tiny",
        K_SERVICE=function_name,
        K_REVISION=revision,
        KOLD_REDIS_URL=redis_url,
        **restore_delay_env(3),
    )
    rt.wait_listening()
    with ThreadPoolExecutor(3) as pool:
        # two requests while the model loads: they wait for it (cold), in this arrival order
        first = pool.submit(complete, rt)
        wait_for(lambda: waiting(rt) == 1, "the first request to wait")
        second = pool.submit(chat_stream, rt)
        wait_for(lambda: waiting(rt) == 2, "the second request to wait")
        # a third whose client gives up while it waits: cancelled
        third = pool.submit(complete, rt, timeout=0.5)
        wait_for(lambda: waiting(rt) == 3, "the third request to wait")
        with pytest.raises(httpx.TimeoutException):
            third.result()
        wait_for(lambda: waiting(rt) == 2, "the runtime to see the client leave")
        cold_usage = [first.result()["usage"], second.result()]
    rt.wait_ready()
    warm_usage = complete(rt)["usage"]
    # the controller's warm-up through the activator, and what a prober asks: none of it is demand
    complete(rt, headers={"x-kold-warmup": "1"})
    assert httpx.get(f"{rt.base}/readyz", headers={"x-kold-warmup": "1"}).status_code == 200
    for path in ("/healthz", "/metrics", "/v1/models"):
        assert httpx.get(f"{rt.base}{path}").status_code == 200
    wait_for(lambda: len(store.invocations(function_name)) == 4, "the four requests' records")
    assert dropped(rt) == 0
    stop(rt)

    startup = rt.events("startup")[0]
    assert isinstance(startup["restore"], dict) and isinstance(startup["ready_ms"], float)
    (cold_start,) = store.cold_starts(function_name)
    assert cold_start.revision == revision
    assert cold_start.total_s >= 3 and abs(cold_start.total_s - startup["ready_ms"] / 1000) < 0.001
    assert cold_start.restore_s == pytest.approx(startup["restore"]["total_ms"] / 1000)
    assert cold_start.snapshot_bytes == startup["restore"]["bytes"] > 0
    assert cold_start.tiers == {"store": pytest.approx(startup["restore"]["fetch_ms"] / 1000)}

    invocations = sorted(store.invocations(function_name), key=lambda r: r.arrival)
    assert len(invocations) == 4, invocations  # the warm-up and the health checks are not among them
    *cold, warm = invocations
    assert [r.cold for r in cold] == [True, True, True] and not warm.cold
    assert [r.concurrency for r in invocations] == [1, 2, 3, 1]  # in flight here at arrival, itself included
    assert [r.outcome for r in invocations] == [records.OK, records.OK, records.CANCELLED, records.OK]
    for rec in cold[:2]:  # waited until the model was ready for them: about when the instance turned ready
        assert rec.wait_s > 1 and cold_start.at - 1 < rec.arrival + rec.wait_s <= cold_start.at + 0.01
    assert 0.4 < cold[2].wait_s < 2.5 and tokens(cold[2]) == (None, None)  # it left after ~0.5 s of waiting
    assert warm.wait_s == 0
    usage = [*cold_usage[:2], warm_usage]
    assert [tokens(r) for r in (cold[0], cold[1], warm)] == [
        (u["prompt_tokens"], u["completion_tokens"]) for u in usage
    ]

    # the controller's view of cluster demand: what it folds for the function
    history = store.fold(function_name)
    assert history.arrivals == 4 and history.cold_starts == 1
    assert history.cold_start_s == pytest.approx(cold_start.total_s)
    assert max(history.peak(int(r.arrival // 60)) for r in invocations) == 3


# -- Redis away ---------------------------------------------------------------------------------


def test_requests_succeed_while_redis_hangs_or_is_gone_and_the_drops_are_counted(
    start_runtime: Callable[..., RuntimeProcess], tiny_snapshot: str, tmp_path: Path
) -> None:
    name = f"fn-{uuid.uuid4().hex[:12]}"
    server = LocalRedis(tmp_path / "redis", persist=False).start()
    client = redis.Redis.from_url(server.url, socket_connect_timeout=1, socket_timeout=2)
    demand = DemandStore(client)
    try:
        # `on` without K_SERVICE: the served model name is the function, the snapshot id the revision
        rt = start(start_runtime, "--served-model-name", name, KOLD_RUNTIME_DEMAND="on", KOLD_REDIS_URL=server.url)
        rt.wait_listening()
        rt.wait_ready()
        (cold_start,) = wait_for(lambda: demand.cold_starts(name), "the cold start's record")
        assert cold_start.revision == tiny_snapshot.rsplit("/", 1)[1]

        def request() -> None:
            r = httpx.post(
                f"{rt.base}/v1/completions", json={"model": name, "prompt": "hi", "max_tokens": 2}, timeout=30
            )
            assert r.status_code == 200, r.text

        request()
        wait_for(lambda: len(demand.invocations(name)) == 1, "the first request's record")
        assert server.pid is not None
        os.kill(server.pid, signal.SIGSTOP)  # hung: connections open, nothing answers
        try:
            request()
            wait_for(lambda: dropped(rt) >= 1, "the record written to a hung Redis to be dropped")
        finally:
            os.kill(server.pid, signal.SIGCONT)
        sent = time.time()  # the hung batch may still land, once Redis runs again: look for this one
        request()
        wait_for(lambda: any(r.arrival >= sent for r in demand.invocations(name)), "recording again")
        before = dropped(rt)
        server.stop()  # gone: connections refused
        for _ in range(3):
            request()
        wait_for(lambda: dropped(rt) == before + 3, "the three records written to a gone Redis to be dropped")
        request()  # queued when the drain begins: its flush fails, and the exit does not wait for Redis
        stop(rt)
    finally:
        client.close()
        server.stop()


# -- which instances report, as what (KOLD_RUNTIME_DEMAND) --------------------------------------------


def settings_from(monkeypatch: pytest.MonkeyPatch, **env: str) -> Settings:
    """The settings a runtime would build from exactly `env` (of the demand variables)."""
    for name in _DEMAND_ENV:
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return Settings()


@pytest.mark.parametrize(
    ("env", "served", "expected"),
    [
        (
            {"K_SERVICE": "chat", "K_REVISION": "chat-00002", "KOLD_REDIS_URL": "redis://r:6379"},
            "m",
            ("chat", "chat-00002"),
        ),
        ({"K_SERVICE": "chat", "KOLD_REDIS_URL": "redis://r:6379"}, None, ("chat", "snap")),
        ({"K_SERVICE": "chat"}, None, None),  # auto, no Redis
        ({"KOLD_REDIS_URL": "redis://r:6379"}, "chat", None),  # auto, not under Knative: the gateway records
        ({"KOLD_RUNTIME_DEMAND": "off", "K_SERVICE": "chat", "KOLD_REDIS_URL": "redis://r:6379"}, None, None),
        ({"KOLD_RUNTIME_DEMAND": "on", "KOLD_REDIS_URL": "unix:///run/redis.sock"}, "chat", ("chat", "snap")),
        ({"KOLD_RUNTIME_DEMAND": "ON", "K_SERVICE": "svc", "KOLD_REDIS_URL": "rediss://r"}, "chat", ("svc", "snap")),
    ],
    ids=["auto under Knative", "no K_REVISION", "auto without Redis", "auto without K_SERVICE", "off", "on", "ON"],
)
def test_which_instances_report_and_as_what(
    monkeypatch: pytest.MonkeyPatch, env: dict[str, str], served: str | None, expected: tuple[str, str] | None
) -> None:
    reporting = demand_reporting(settings_from(monkeypatch, **env), served, "snap")
    assert (None if reporting is None else (reporting.function, reporting.revision)) == expected


@pytest.mark.parametrize(
    ("env", "served", "message"),
    [
        ({"KOLD_REDIS_URL": "redis://r"}, None, "needs a function name: set K_SERVICE or --served-model-name"),
        ({"K_SERVICE": "chat"}, None, "needs KOLD_REDIS_URL"),
        ({"KOLD_REDIS_URL": "redis://r"}, "Tiny_Model", "--served-model-name 'Tiny_Model' is not a function name"),
        ({"K_SERVICE": "chat", "KOLD_REDIS_URL": "http://r:6379"}, None, "not a Redis URL"),
    ],
    ids=["no function name", "no Redis", "a name that is no function name", "not a Redis URL"],
)
def test_on_that_cannot_report_is_a_cli_error(
    monkeypatch: pytest.MonkeyPatch, env: dict[str, str], served: str | None, message: str
) -> None:
    settings = settings_from(monkeypatch, KOLD_RUNTIME_DEMAND="on", **env)
    with pytest.raises(CLIError, match=re.escape(message)):
        demand_reporting(settings, served, "snap")


def test_on_without_a_function_name_fails_at_start_with_one_line(tiny_snapshot: str, tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in _DEMAND_ENV}
    env.update(KOLD_HOME=str(tmp_path), KOLD_RUNTIME_DEMAND="on", KOLD_REDIS_URL="redis://127.0.0.1:1")
    done = subprocess.run(
        [sys.executable, "-m", "kold", "runtime", "serve", "--snapshot", tiny_snapshot, "--port", "0"],
        env=env,
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1, done.stderr
    assert done.stderr.strip().splitlines() == [
        "kold: error: KOLD_RUNTIME_DEMAND=on needs a function name: set K_SERVICE or --served-model-name"
    ]


def test_an_instance_with_reporting_off_writes_nothing(
    start_runtime: Callable[..., RuntimeProcess], redis_url: str, function_name: str, store: DemandStore
) -> None:
    rt = start(
        start_runtime,
        "--served-model-name",
        "tiny",
        KOLD_RUNTIME_DEMAND="off",
        K_SERVICE=function_name,
        KOLD_REDIS_URL=redis_url,
    )
    rt.wait_listening()
    rt.wait_ready()
    complete(rt)
    assert DROPPED not in httpx.get(f"{rt.base}/metrics").text
    stop(rt)  # a reporting instance would have flushed its records by now
    assert store.invocations(function_name) == [] and store.cold_starts(function_name) == []


# -- outcomes, in process (a fake backend that fails on demand) ---------------------------------------


class FailingBackend(FakeBackend):
    """Fails every generation with an internal error (the 500 a broken engine gives)."""

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("engine broke")


def test_timed_out_failed_and_refused_requests_are_recorded_as_the_gateway_names_them(
    redis_url: str, function_name: str, store: DemandStore
) -> None:
    async def scenario() -> None:
        loader = ControlledLoader(FailingBackend())
        reporting = DemandReporting(function_name, "rev-1", lambda: store)
        runtime = Runtime(ServeOptions(model_names=("fake",), queue_timeout_s=0.3), loader, demand=reporting)
        runtime.on_listening(asyncio.get_running_loop(), "test")
        transport = httpx.ASGITransport(app=runtime.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            body = {"model": "fake", "prompt": "a b", "max_tokens": 2}
            r = await client.post("/v1/completions", json=body)  # the model does not load in time
            assert r.status_code == 503 and r.json()["error"]["code"] == "queue_timeout"
            loader.release.set()
            while not runtime.lifecycle.ready:
                await asyncio.sleep(0.01)
            assert (await client.post("/v1/completions", json=body)).status_code == 500
            assert (await client.post("/v1/completions", json={**body, "max_tokens": -1})).status_code == 400
            r = await client.post("/v1/completions", json=body, headers={"x-kold-warmup": "1"})
            assert r.status_code == 500  # a warm-up that failed is no demand either
            assert runtime.demand is not None
            await runtime.demand.close()

    asyncio.run(scenario())
    timed_out, failed, refused = sorted(store.invocations(function_name), key=lambda r: r.arrival)
    assert (timed_out.outcome, timed_out.cold) == (records.TIMED_OUT, True) and 0.3 <= timed_out.wait_s < 2
    assert (failed.outcome, failed.cold, failed.wait_s) == (records.FAILED, False, 0)
    assert refused.outcome == records.OK  # a 4xx is an answer, as the gateway counts it
    (cold_start,) = store.cold_starts(function_name)
    assert cold_start == ColdStart(
        function=function_name,
        revision="rev-1",
        at=cold_start.at,
        total_s=cold_start.total_s,
        restore_s=0.02,
        snapshot_bytes=10,
        tiers={"store": 0.01},
    )


class HungWriter:
    """A Redis that never answers and a client without timeouts: every write blocks until released."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.calls = 0

    def record_invocations(self, records: list[Invocation]) -> None:
        self.calls += 1
        self.release.wait(60)

    def record_cold_starts(self, reports: list[ColdStart]) -> None:
        self.calls += 1
        self.release.wait(60)


def test_a_writer_that_hangs_holds_no_request_and_the_drain_flush_is_bounded() -> None:
    writer = HungWriter()

    async def scenario() -> None:
        loader = ControlledLoader(FakeBackend())
        reporting = DemandReporting("fn", "r", lambda: writer)
        runtime = Runtime(ServeOptions(model_names=("fake",)), loader, demand=reporting)
        runtime.on_listening(asyncio.get_running_loop(), "test")
        loader.release.set()
        while not runtime.lifecycle.ready:
            await asyncio.sleep(0.01)
        transport = httpx.ASGITransport(app=runtime.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            while writer.calls == 0:  # the cold start's write has begun, and hangs
                await asyncio.sleep(0.01)
            for _ in range(3):
                r = await asyncio.wait_for(
                    client.post("/v1/completions", json={"model": "fake", "prompt": "a", "max_tokens": 2}), 5
                )
                assert r.status_code == 200
        started = time.monotonic()
        await runtime._drain()  # what SIGTERM runs: the flush gives up after STOP_FLUSH_S
        assert time.monotonic() - started < STOP_FLUSH_S + 1
        text = runtime.metrics.render().decode()
        assert f"{DROPPED} 3.0" in text, text  # the three requests' records; the cold start's write still hangs
        writer.release.set()

    asyncio.run(scenario())
