"""The gateway under failure: redeploys under load, instances killed mid-load, Redis going away.

Same approach as test_gateway.py (real redis, real runtime subprocesses on a tiny model, uvicorn
serving the gateway app in a thread), through the shared conftest.py and gateway_helpers.py.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from gateway_helpers import Served, deploy, deploy_and_wait
from redis.backoff import NoBackoff
from redis.retry import Retry

from kold.gateway.registry import Registry
from kold.localredis import LocalRedis

pytestmark = pytest.mark.redis


def _registry_on(client: Any) -> Registry:
    return Registry(client, prefix=f"kold-gw-res-{uuid.uuid4().hex}:")


def completion(s: Served, name: str, client: httpx.Client | None = None, key: str | None = None) -> httpx.Response:
    body = {"model": name, "prompt": "hello", "max_tokens": 4}
    headers = {"Authorization": f"Bearer {key}"} if key else None
    return (client or s.http).post("/v1/completions", json=body, headers=headers)


class Load:
    """`threads` clients looping non-streamed completions until stopped (bounded by `max_s`)."""

    def __init__(self, s: Served, name: str, threads: int = 4, max_s: float = 120.0) -> None:
        self.s, self.name, self.max_s = s, name, max_s
        self.stop = threading.Event()
        self.results: list[tuple[int, str, str]] = []  # status, instance, body (errors only)
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self._loop, daemon=True) for _ in range(threads)]
        for t in self.threads:
            t.start()

    def _loop(self) -> None:
        deadline = time.monotonic() + self.max_s
        with httpx.Client(base_url=self.s.url, timeout=60, trust_env=False) as client:
            while not self.stop.is_set() and time.monotonic() < deadline:
                try:
                    r = completion(self.s, self.name, client)
                    item = (r.status_code, r.headers.get("x-kold-instance", ""), "" if r.is_success else r.text)
                except httpx.HTTPError as exc:
                    item = (0, "", repr(exc))
                with self.lock:
                    self.results.append(item)

    def count(self) -> int:
        with self.lock:
            return len(self.results)

    def finish(self) -> list[tuple[int, str, str]]:
        self.stop.set()
        for t in self.threads:
            t.join(90)
        return self.results


def failures(results: list[tuple[int, str, str]]) -> list[tuple[int, str, str]]:
    return [r for r in results if r[0] != 200]


def test_redeploy_under_load_loses_no_request(
    registry: Registry, serve: Callable[..., Served], tiny_snapshot: str
) -> None:
    s = serve(registry)
    first = deploy_and_wait(s, "rd", tiny_snapshot)
    assert completion(s, "rd").status_code == 200
    load = Load(s, "rd")
    try:
        time.sleep(1.0)
        second = deploy_and_wait(s, "rd", tiny_snapshot)
        time.sleep(1.0)
    finally:
        results = load.finish()
    assert len(results) >= 8, results
    assert not failures(results), failures(results)[:5]
    assert any(inst.startswith(first + "-") for _, inst, _ in results)
    for _ in range(3):
        resp = completion(s, "rd")
        assert resp.status_code == 200 and resp.headers["x-kold-instance"].startswith(second + "-")


def test_instance_killed_mid_load_is_replaced_without_loss(
    registry: Registry, serve: Callable[..., Served], tiny_snapshot: str
) -> None:
    deploy(registry, "kill", tiny_snapshot, max_instances=2, target_concurrency=4, request_timeout_s=60)
    s = serve(registry)
    first = completion(s, "kill")
    assert first.status_code == 200
    pool = s.app.state.gateway.pool
    # the instance that answered (it may have served that cold request before the pool saw it READY)
    (victim,) = [i for i in pool.instances() if i.id == first.headers["x-kold-instance"]]
    load = Load(s, "kill")
    try:
        deadline = time.monotonic() + 20
        while victim.in_flight == 0:  # kill it with requests in flight
            assert time.monotonic() < deadline, "no request reached the instance"
            time.sleep(0.005)
        assert victim.process is not None
        victim.process.kill()
        before = load.count()
        deadline = time.monotonic() + 60
        while load.count() < before + 8:  # served again after the kill, by a replacement
            assert time.monotonic() < deadline, "no requests served after the kill"
            time.sleep(0.1)
    finally:
        results = load.finish()
    assert victim.state.value == "failed"
    assert not failures(results), failures(results)[:5]
    assert any(inst and inst != victim.id for _, inst, _ in results[before:])
    r = completion(s, "kill")
    assert r.status_code == 200 and r.headers["x-kold-instance"] != victim.id


class PrivateRedis:
    """A redis-server of this test's own (the code `kold up` runs, in memory), to pause and kill."""

    def __init__(self, tmp: Path) -> None:
        self.server = LocalRedis(tmp / "redis", persist=False).start()
        self.port = self.server.port

    def _signal(self, sig: int) -> None:
        pid = self.server.pid
        assert pid is not None, "the private redis-server is not running"
        os.kill(pid, sig)

    def pause(self) -> None:
        self._signal(signal.SIGSTOP)

    def resume(self) -> None:
        self._signal(signal.SIGCONT)

    def kill(self) -> None:
        if self.server.pid is not None:
            with contextlib.suppress(ProcessLookupError):
                self._signal(signal.SIGCONT)
                self._signal(signal.SIGKILL)
        self.server.stop()


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[PrivateRedis]:
    pr = PrivateRedis(tmp_path)
    yield pr
    pr.kill()


def registry_unreachable(s: Served) -> float:
    """The gateway's own gauge: 1 while it knows Redis cannot be reached."""
    for line in s.http.get("/metrics").text.splitlines():
        if line.startswith("kold_gateway_registry_unreachable "):
            return float(line.split()[-1])
    raise AssertionError("no kold_gateway_registry_unreachable gauge in /metrics")


def dropped_records(s: Served) -> float:
    text = s.http.get("/metrics").text
    total = 0.0
    for line in text.splitlines():
        if line.startswith("kold_gateway_invocation_records_dropped_total"):
            total += float(line.split()[-1])
    return total


def test_redis_outage_does_not_stop_a_warm_function(
    private_redis: PrivateRedis, serve: Callable[..., Served], tiny_snapshot: str
) -> None:
    client = redis.Redis(host="127.0.0.1", port=private_redis.port, socket_connect_timeout=0.5, socket_timeout=1)
    registry = _registry_on(client)
    deploy(registry, "warm", tiny_snapshot, request_timeout_s=60)
    s = serve(registry)
    try:
        assert completion(s, "warm").status_code == 200  # warm it
        dropped_before = dropped_records(s)
        private_redis.pause()  # unreachable: connections hang (socket_timeout 1 s), as in a partition
        outage_end = time.monotonic() + 3.0
        during = []
        while time.monotonic() < outage_end:
            during.append(completion(s, "warm"))
        private_redis.resume()
        after = [completion(s, "warm") for _ in range(3)]
        assert [r.status_code for r in after] == [200] * 3, [r.text for r in after]
        assert [r.status_code for r in during] == [200] * len(during), [r.text for r in during[-1:]]
        assert dropped_records(s) >= dropped_before  # records written during the outage may be dropped
    finally:
        private_redis.kill()
        client.close()


def test_api_keys_during_a_redis_outage(
    private_redis: PrivateRedis, serve: Callable[..., Served], tiny_snapshot: str
) -> None:
    """A key verified before the outage keeps working through it (VERIFIED_GRACE_S); one never seen
    gets a 503 JSON error (the gateway cannot tell, so it neither admits nor rejects it). The first
    Redis call that times out tells the gateway of the outage; from then on it does not wait for Redis
    again. Once Redis is back, keys verify again and a revoked key is refused at once, grace or not."""
    # one attempt per Redis call (redis-py would retry 10 times with backoff: ~15 s a call while paused)
    client = redis.Redis(
        host="127.0.0.1",
        port=private_redis.port,
        socket_connect_timeout=0.5,
        socket_timeout=1,
        retry=Retry(NoBackoff(), 0),
    )
    registry = _registry_on(client)
    deploy(registry, "keyed", tiny_snapshot, request_timeout_s=60)
    known, unknown, admin = (registry.create_key(label) for label in ("known", "unknown", "admin"))
    s = serve(registry, require_keys=True)
    try:
        assert completion(s, "keyed").status_code == 401  # keys are on
        assert completion(s, "keyed", key=known.secret).status_code == 200  # warms it, and verifies the key
        private_redis.pause()  # unreachable: connections hang (socket_timeout 1 s), as in a partition
        try:
            # the gateway learns of the outage from the first Redis call that times out: this one's
            first = completion(s, "keyed", key=unknown.secret)
            assert registry_unreachable(s) == 1.0
            during = [completion(s, "keyed", key=known.secret) for _ in range(2)]
            started = time.monotonic()
            refused = completion(s, "keyed", key=unknown.secret)
            refused_s = time.monotonic() - started
        finally:
            private_redis.resume()
        assert [r.status_code for r in during] == [200, 200], [r.text for r in during]
        for r in (first, refused):
            assert r.status_code == 503, r.text
            assert r.headers["content-type"].startswith("application/json") and "Retry-After" in r.headers
            assert r.json()["error"]["message"] and "Traceback" not in r.text
        assert refused_s < 0.9, refused_s  # known to be gone: decided without waiting for Redis's 1 s timeout

        admin_auth = {"Authorization": f"Bearer {admin.secret}"}
        deadline = time.monotonic() + 10
        while (r := s.http.get("/admin/keys", headers=admin_auth)).status_code == 503:  # until it sees Redis
            assert time.monotonic() < deadline, r.text
            time.sleep(0.1)
        assert r.status_code == 200, r.text
        revoked = s.http.delete(f"/admin/keys/{known.key_id}", headers=admin_auth)
        assert revoked.status_code == 200, revoked.text
        after = completion(s, "keyed", key=known.secret)
        assert after.status_code == 401 and after.json()["error"]["code"] == "invalid_api_key", after.text
        assert completion(s, "keyed", key=unknown.secret).status_code == 200  # it was valid all along
    finally:
        private_redis.kill()
        client.close()


def test_the_waking_request_goes_to_the_instance_while_it_restores(
    registry: Registry, serve: Callable[..., Served], tiny_snapshot: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The runtime queues requests during its restore and runs them behind it: the gateway sends the
    request that woke an instance as soon as the runtime answers "restoring", not once it is READY.
    Seen from the runtime: that request waited in its own queue for the (held back) restore."""
    # the restore held back by a test-only sitecustomize (tests/restore_delay), not by a kold setting
    monkeypatch.setenv("PYTHONPATH", str(Path(__file__).resolve().parents[1] / "restore_delay"))
    monkeypatch.setenv("KOLDTEST_RESTORE_DELAY_S", "1.5")
    deploy(registry, "eager", tiny_snapshot, max_instances=1, request_timeout_s=60)
    s = serve(registry)
    r = completion(s, "eager")
    assert r.status_code == 200, r.text
    assert r.headers["x-kold-cold"] == "1"
    assert float(r.headers["x-kold-queue-ms"]) > 500, r.headers  # it was in the runtime during the restore
    assert "x-kold-cold-start-ms" in r.headers  # and its answer still carries the cold-start breakdown


def test_warm_requests_never_wait_for_a_stalled_redis(
    private_redis: PrivateRedis, serve: Callable[..., Served], tiny_snapshot: str
) -> None:
    """With Redis stalled and a client whose every call would hang 30 s, warm requests are answered
    from what the gateway knows (a stale serving revision is refreshed in the background)."""
    client = redis.Redis(
        host="127.0.0.1",
        port=private_redis.port,
        socket_connect_timeout=30,
        socket_timeout=30,
        retry=Retry(NoBackoff(), 0),
    )
    registry = _registry_on(client)
    deploy(registry, "stall", tiny_snapshot, request_timeout_s=60)
    s = serve(registry)
    try:
        assert completion(s, "stall").status_code == 200  # warm it
        private_redis.pause()
        try:
            time.sleep(1.2)  # the gateway's cached serving revision is now stale
            with httpx.Client(base_url=s.url, timeout=10, trust_env=False) as quick:
                during = [completion(s, "stall", quick) for _ in range(3)]
        finally:
            private_redis.resume()
        assert [r.status_code for r in during] == [200] * 3, [r.text for r in during]
    finally:
        private_redis.kill()
        client.close()


def test_a_killed_redis_is_a_503_registry_unavailable_and_a_degraded_health(
    private_redis: PrivateRedis, serve: Callable[..., Served], tiny_snapshot: str
) -> None:
    client = redis.Redis(host="127.0.0.1", port=private_redis.port, socket_connect_timeout=1, socket_timeout=1)
    registry = _registry_on(client)
    s = serve(registry)
    try:
        assert s.http.get("/readyz").json() == {"status": "ready", "registry": "ok"}
        private_redis.kill()
        for path in ("/admin/functions", "/v1/models", "/admin/functions/x"):
            r = s.http.get(path)
            assert r.status_code == 503, (path, r.text)
            assert r.json()["error"]["code"] == "registry_unavailable" and "Redis" in r.json()["error"]["message"]
        assert s.http.get("/healthz").json() == {"status": "degraded", "registry": "unreachable"}
        r = s.http.get("/readyz")
        assert r.status_code == 503 and r.json()["error"]["code"] == "registry_unavailable"
    finally:
        client.close()
