"""The pre-warm controller on Knative, whole: controller/loop.py's Controller with KnativeFunctionSource
and KnativeActuator, driven with tick_once(now) on a fake timeline against the fake API server, the
Knative sim and a real Redis holding the demand records; and `kold controller --target knative` as a
subprocess (start, /metrics on the given host and port, a floor on the Revision, a clean stop)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from kold.controller.demand import DemandStore
from kold.controller.lease import Lease
from kold.controller.loop import CLEAR, SET, Controller
from kold.controller.records import Invocation
from kold.knative import names
from kold.knative.actuator import KnativeActuator
from kold.knative.cluster import Cluster, ClusterConfig
from kold.knative.functions import KnativeFunctionSource
from kold.knative.service import FunctionDeploy, render_service
from tests.knative.apiserver import FakeApiServer
from tests.knative.conftest import NAMESPACE
from tests.knative.knative_sim import KnativeSim

pytestmark = pytest.mark.redis

T0 = 1_700_000_040.0  # a fake Unix time on a minute boundary
KOLD_KEYS = (names.FLOOR, names.BASE_MIN_SCALE, names.BASE_SCALE_DOWN_DELAY)


@pytest.fixture
def cluster(kubeconfig: Path) -> Iterator[Cluster]:
    with Cluster(ClusterConfig(kubeconfig=str(kubeconfig))) as c:
        yield c


@pytest.fixture
def redis_client(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url, socket_connect_timeout=1)
    yield client
    client.close()


def deploy(cluster: Cluster, knative: KnativeSim, name: str, prewarm: str | None) -> str:
    knative.address_base = knative.address_base or "http://127.0.0.1:9"  # warm-ups refused at once, on loopback
    fn = FunctionDeploy(
        name=name,
        image="registry.example/kold-runtime:1",
        snapshot_uri=f"s3://models/{name}/snapshots/abc",
        snapshot_id="abc",
        snapshot_bytes=1 << 30,
        namespace=NAMESPACE,
        idle_timeout_s=60.0,
        prewarm=prewarm,
    )
    cluster.apply_service(render_service(fn))
    knative.settle()
    (rev,) = knative.revisions(name, NAMESPACE)
    return str(rev["metadata"]["name"])


def revision_annotations(apiserver: FakeApiServer, revision: str) -> dict[str, str]:
    obj = apiserver.get_object("revisions", NAMESPACE, revision)
    assert obj is not None
    return dict(obj["metadata"].get("annotations") or {})


def test_the_controller_floors_the_revision_while_its_policy_holds_and_clears_it_after(
    apiserver: FakeApiServer, knative: KnativeSim, cluster: Cluster, redis_client: redis.Redis
) -> None:
    """A fake timeline: the controller ticks at fake times, the actuator's clock is the same fake clock.
    The floor reaches the Revision, ends there when the keep-alive runs out (the loop sends nothing for a
    floor that ran out: the actuator ends it), comes back with the next call, and is cleared by the loop
    when the Service's policy changes to one that holds nothing."""
    prefix = f"kold-knative-ctl-{uuid.uuid4().hex}:"
    rev = deploy(cluster, knative, "timer", "fixed-keepalive:minutes=5")
    deploy(cluster, knative, "quiet", "fixed-keepalive:minutes=5")
    store = DemandStore(redis_client, prefix)
    # what the runtime reports from its pod (runtime/demand.py): one cold call at T0 + 10
    store.record_invocations([Invocation("timer", T0 + 10, cold=True, wait_s=4.0)])
    apiserver.clear_requests()
    now = T0

    def floored() -> bool:
        return names.FLOOR in revision_annotations(apiserver, rev)

    async def timeline() -> list[list[tuple[str, str]]]:
        nonlocal now
        actuator = KnativeActuator(cluster, clock=lambda: now, expiry_poll_s=0.01)
        controller = Controller(
            store,
            KnativeFunctionSource(cluster),
            actuator,
            Lease(redis_client, f"{prefix}controller:lease", "a", 30.0),
            tick_s=10.0,
            reassert_s=3600.0,  # no re-assertions in the middle of this timeline: each pass shows a decision
        )
        passes = []

        async def tick(at: float) -> None:
            nonlocal now
            now = at
            actions = await controller.tick_once(at)
            passes.append(sorted((a.function, a.kind) for a in actions))
            await asyncio.sleep(0.1)  # the actuator's watch on the floors' ends runs meanwhile

        try:
            await tick(T0 + 20)
            ann = revision_annotations(apiserver, rev)
            assert ann[names.MIN_SCALE] == "1", "the floor reached the Revision"
            assert ann[names.SCALE_DOWN_DELAY] == "60s", "a live Revision's scale-down-delay is never changed"
            floor = json.loads(ann[names.FLOOR])
            assert floor["instances"] == 1 and floor["until"] == T0 + 10 + 300
            assert floor["reason"].startswith("fixed-keepalive")
            await tick(T0 + 200)
            assert floored()
            await tick(T0 + 309)
            assert floored()
            await tick(T0 + 311)
            assert not floored(), "past its until: the Revision has its own min-scale back"
            store.record_invocations([Invocation("timer", T0 + 700, cold=True, wait_s=4.0)])
            await tick(T0 + 710)
            assert floored()
            svc = apiserver.get_object("services", NAMESPACE, "timer")
            assert svc is not None
            svc["metadata"]["annotations"][names.PREWARM] = "fixed-keepalive:minutes=0"
            apiserver.put_object(svc)  # metadata only: no new Revision
            await tick(T0 + 720)
        finally:
            await actuator.aclose()
        return passes

    try:
        passes = asyncio.run(timeline())
    finally:
        keys = list(redis_client.scan_iter(match=prefix + "*", count=1000))
        if keys:
            redis_client.delete(*keys)
    assert passes == [
        [("quiet", CLEAR), ("timer", SET)],  # quiet: cleared once on taking the lease (nothing was there)
        [],
        [],  # the floor ran out: nothing to send; the actuator holds it for its idle timeout
        [],  # ... then ends it on the Revision
        [("timer", SET)],
        [("timer", CLEAR)],  # the policy now holds nothing
    ]
    ann = revision_annotations(apiserver, rev)
    assert ann[names.MIN_SCALE] == "0" and ann[names.SCALE_DOWN_DELAY] == "60s"
    assert not set(KOLD_KEYS) & ann.keys()
    assert len(knative.revisions("timer", NAMESPACE)) == 1
    service_writes = [
        r for r in apiserver.requests if r.method != "GET" and r.resource and r.resource.plural == "services"
    ]
    assert service_writes == [], "the controller never writes a Service"


# -- `kold controller --target knative` as a subprocess -------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def kold_env(tmp_path: Path, kubeconfig: Path, redis_url: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KOLD_", "KUBECONFIG"))}
    return env | {"KOLD_HOME": str(tmp_path / "home"), "KUBECONFIG": str(kubeconfig), "KOLD_REDIS_URL": redis_url}


def kold(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "kold", *args], capture_output=True, text=True, timeout=120, env=env, check=False
    )


def wait_for(check: Callable[[], Any], timeout_s: float, what: str) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            found = check()
        except (httpx.HTTPError, KeyError):
            found = None
        if found:
            return found
        if time.monotonic() > deadline:
            raise TimeoutError(f"no {what} within {timeout_s} s")
        time.sleep(0.2)


def test_kold_controller_target_knative_starts_serves_metrics_floors_a_revision_and_stops_on_sigint(
    tmp_path: Path,
    apiserver: FakeApiServer,
    knative: KnativeSim,
    cluster: Cluster,
    kubeconfig: Path,
    redis_url: str,
    redis_client: redis.Redis,
) -> None:
    rev = deploy(cluster, knative, "tiny", "fixed-keepalive:minutes=5")
    store = DemandStore(redis_client, "kold:")  # the prefix the CLI's controller and the runtimes use
    store.record_invocations([Invocation("tiny", time.time(), cold=True, wait_s=2.0)])
    apiserver.clear_requests()
    port = free_port()
    args = ["controller", "--target", "knative", "--tick", "0.5", "--metrics-host", "127.0.0.1"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "kold", *args, "--metrics-port", str(port)],
        env=kold_env(tmp_path, kubeconfig, redis_url),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:

        def held() -> str | None:
            text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=2).text
            return text if "kold_controller_lease_held 1.0" in text else None

        wait_for(held, 30, "metrics with the lease held")
        wait_for(lambda: revision_annotations(apiserver, rev).get(names.MIN_SCALE) == "1", 10, "floor on the Revision")
        decided = 'kold_controller_decisions_total{function="tiny",policy="fixed-keepalive"} 1.0'
        # counted once the actuator has answered (after its patch, which the line above saw land)
        wait_for(lambda: decided in httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=2).text, 10, "the decision")
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        keys = list(redis_client.scan_iter(match="kold:fn:tiny:*"))
        if keys:
            redis_client.delete(*keys)
        redis_client.hdel("kold:node:wants", "tiny")
    assert proc.returncode == 0, err
    assert f"namespace {NAMESPACE}" in err and f"metrics at http://127.0.0.1:{port}/metrics" in err
    assert "holds the lease" in err and "pre-warm controller stopped" in err and "Traceback" not in err
    assert redis_client.get("kold:controller:lease") is None, "the lease was given up"
    assert revision_annotations(apiserver, rev)[names.MIN_SCALE] == "1", "a floor outlives its controller"
    assert [r for r in apiserver.requests if r.method != "GET" and r.resource and r.resource.plural == "services"] == []


def test_kold_controller_target_knative_says_in_one_line_when_the_cluster_refuses_or_is_away(
    tmp_path: Path, apiserver: FakeApiServer, kubeconfig: Path, redis_url: str
) -> None:
    env = kold_env(tmp_path, kubeconfig, redis_url)
    apiserver.deny("list", "services")
    forbidden = kold("controller", "--target", "knative", env=env)
    assert forbidden.returncode == 1 and "RBAC must allow it" in forbidden.stderr, forbidden.stderr
    assert "list" in forbidden.stderr and len(forbidden.stderr.strip().splitlines()) == 1

    away = tmp_path / "away.kubeconfig"
    away.write_text(kubeconfig.read_text().replace(apiserver.url, f"http://127.0.0.1:{free_port()}"))
    unreachable = kold("controller", "--target", "knative", env=env | {"KUBECONFIG": str(away)})
    assert unreachable.returncode == 1 and "cannot reach the Kubernetes API server" in unreachable.stderr
    assert len(unreachable.stderr.strip().splitlines()) == 1, unreachable.stderr

    no_redis = kold("controller", "--target", "knative", env={k: v for k, v in env.items() if k != "KOLD_REDIS_URL"})
    assert no_redis.returncode == 1 and "KOLD_REDIS_URL" in no_redis.stderr
    assert len(no_redis.stderr.strip().splitlines()) == 1

    apiserver.allow("list", "services")
    bad_host = kold(
        "controller",
        "--target",
        "knative",
        "--metrics-host",
        "no.such.host.invalid",
        "--metrics-port",
        str(free_port()),
        env=env,
    )
    assert bad_host.returncode == 1 and "--metrics-host" in bad_host.stderr, bad_host.stderr
    assert len(bad_host.stderr.strip().splitlines()) == 1

    missing = kold("controller", "--target", "knative", "--kubeconfig", str(tmp_path / "none"), env=env)
    assert missing.returncode == 1 and "no such file" in missing.stderr
    assert len(missing.stderr.strip().splitlines()) == 1

    mixed = kold("controller", "--namespace", "ml", env=env)
    assert mixed.returncode == 1 and "--target knative" in mixed.stderr
