"""The pre-warm controller as a user meets it: `kold deploy --prewarm`, `kold describe`'s policy and
floor, the controller `kold up` runs (and `--no-controller`), and `kold controller` on its own beside a
platform, setting floors through the gateway's admin API. Real `kold up --detach` platforms, each on
its own KOLD_HOME and free port (tests/platform/kold_up.py)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from kold_up import free_port, kold, platform_env, platform_log, running_platform, wait_for

from kold.describe import format_describe

pytestmark = pytest.mark.timeout(300)


def test_a_bad_prewarm_policy_is_a_one_line_error_before_anything_is_built(tmp_path: Path) -> None:
    env = platform_env(tmp_path)
    cases = [
        ("nope", "unknown prewarm policy 'nope'"),
        ("fixed-keepalive:hours=1", "has no parameter 'hours'"),
        ("hybrid-histogram:tail=lots", "is not a number"),
    ]
    for policy, message in cases:
        result = kold("deploy", str(tmp_path), "--name", "fn", "--prewarm", policy, env=env)
        assert result.returncode == 1, result.stderr
        assert message in result.stderr and "--prewarm" in result.stderr, result.stderr
        assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr
    assert not (tmp_path / "home" / "store").exists(), "nothing was built"


def test_describe_shows_the_policy_and_the_floor_and_why() -> None:
    doc: dict[str, Any] = {
        "name": "fn",
        "prewarm": "fixed-keepalive:minutes=2",
        "floor": {"instances": 1, "until": 1250.0, "reason": "fixed-keepalive: 2 min after the last request",
                  "idle_timeout_s": 120.0},
    }  # fmt: skip
    text = format_describe(doc, "http://gw", now=1000.0)
    lines = {line.split(":", 1)[0]: line.split(":", 1)[1].strip() for line in text.splitlines() if ":" in line}
    assert lines["Pre-warm"] == "fixed-keepalive:minutes=2"
    assert lines["Floor"].startswith("1 instance for 4m10s more (until ")
    assert lines["Floor"].endswith("idle timeout 120 s: fixed-keepalive: 2 min after the last request")
    expired = format_describe({**doc, "floor": {**doc["floor"], "until": 999.0}}, "http://gw", now=1000.0)
    assert "none (the scaling spec alone decides)" in expired
    assert "Pre-warm" not in format_describe({"name": "fn"}, "http://gw", now=1000.0), "an older gateway"


def _deploy_and_call(env: dict[str, str], tmp_path: Path, policy: str) -> None:
    from kold.modelgen import write_random_model

    model = write_random_model(tmp_path / "model", "llama", "tiny")
    args = ("--name", "tiny", "--idle-timeout", "2", "--prewarm", policy)
    deployed = kold("deploy", str(model), *args, env=env)
    assert deployed.returncode == 0, deployed.stderr
    called = kold("invoke", "tiny", "Hi", "--completion", "--max-tokens", "2", env=env)
    assert called.returncode == 0, called.stderr


def _describe(env: dict[str, str]) -> dict[str, Any]:
    result = kold("describe", "tiny", "--json", env=env)
    assert result.returncode == 0, result.stderr
    doc: dict[str, Any] = json.loads(result.stdout)
    return doc


def _running(doc: dict[str, Any]) -> int:
    return sum(1 for i in doc["instances"] if i["state"] in ("starting", "ready"))


def _metrics(env: dict[str, str]) -> str:
    return httpx.get(f"http://127.0.0.1:{env['KOLD_TEST_PORT']}/metrics", timeout=10).text


def test_kold_up_runs_the_controller_and_its_floor_outlives_the_idle_timeout(tmp_path: Path) -> None:
    """A call to a function deployed with `--prewarm fixed-keepalive:minutes=1` makes the controller in
    `kold up` hold one instance for a minute: `kold describe` says so and why, and the instance stays
    past the function's own 2 s idle timeout."""
    with running_platform(platform_env(tmp_path)) as env:
        _deploy_and_call(env, tmp_path, "fixed-keepalive:minutes=1")
        doc = wait_for(lambda: (d := _describe(env))["floor"] and d, 30, "the controller's floor")
        assert doc["prewarm"] == "fixed-keepalive:minutes=1"
        assert doc["floor"]["instances"] == 1 and doc["floor"]["reason"].startswith("fixed-keepalive:")
        time.sleep(4)  # twice the idle timeout
        assert _running(_describe(env)) == 1, "the floor keeps the instance the idle timeout would stop"
        text = kold("describe", "tiny", env=env).stdout
        assert "Pre-warm:" in text and "fixed-keepalive:minutes=1" in text
        assert "Floor:" in text and "1 instance for" in text and "after the last request" in text
        metrics = _metrics(env)
        assert "kold_controller_lease_held 1.0" in metrics
        assert 'kold_controller_decisions_total{function="tiny",policy="fixed-keepalive"} 1.0' in metrics
        assert "pre-warm controller: on" in platform_log(env)


def test_kold_controller_on_its_own_sets_floors_through_the_admin_api(tmp_path: Path) -> None:
    """`kold up --no-controller` holds no floor by itself; a `kold controller` started beside it takes
    the lease, sets the floor over HTTP, serves its metrics on --metrics-port, and gives the lease up
    when stopped."""
    env = platform_env(tmp_path)
    up = kold("up", "--detach", "--no-controller", "--port", env["KOLD_TEST_PORT"], env=env, timeout=90)
    assert up.returncode == 0, up.stderr
    controller: subprocess.Popen[str] | None = None
    try:
        _deploy_and_call(env, tmp_path, "fixed-keepalive:minutes=1")
        time.sleep(1)
        assert _describe(env)["floor"] is None, "no controller runs in the platform"
        assert "pre-warm controller: off" in platform_log(env)
        metrics_port = free_port()
        controller = subprocess.Popen(
            [sys.executable, "-m", "kold", "controller", "--tick", "0.5", "--metrics-port", str(metrics_port)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        doc = wait_for(lambda: (d := _describe(env))["floor"] and d, 60, "the standalone controller's floor")
        assert doc["floor"]["instances"] == 1 and doc["floor"]["reason"].startswith("fixed-keepalive:")
        metrics = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).text
        assert "kold_controller_lease_held 1.0" in metrics
        assert 'kold_controller_decisions_total{function="tiny",policy="fixed-keepalive"} 1.0' in metrics
        controller.send_signal(signal.SIGTERM)
        _, err = controller.communicate(timeout=30)
        assert controller.returncode == 0, err
        assert "holds the lease" in err and "pre-warm controller stopped" in err and "Traceback" not in err
        assert "controller:lease" not in _redis_keys(env), "the lease was given up"
    finally:
        if controller is not None and controller.poll() is None:
            controller.kill()
            controller.wait()
        down = kold("down", env=env, timeout=90)
        assert down.returncode == 0, down.stderr


def _redis_keys(env: dict[str, str]) -> str:
    import redis

    state = json.loads((Path(env["KOLD_HOME"]) / "platform.json").read_text())
    client = redis.Redis.from_url(state["redis_url"])
    try:
        return " ".join(k.decode() for k in client.scan_iter(match="kold:*"))
    finally:
        client.close()


def test_kold_controller_without_a_platform_says_so_in_one_line(tmp_path: Path) -> None:
    env = {
        **platform_env(tmp_path),
        "KOLD_GATEWAY_URL": f"http://127.0.0.1:{free_port()}",
    }  # not 8080: it may be in use
    result = kold("controller", env=env, timeout=60)
    assert result.returncode == 1 and "start it with `kold up`" in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    bad = kold("controller", "--tick", "0", env=env)
    assert bad.returncode == 1 and "--tick 0" in bad.stderr
    bad_port = kold("controller", "--metrics-port", "70000", env=env)
    assert bad_port.returncode == 1 and "--metrics-port 70000" in bad_port.stderr, bad_port.stderr
    assert len(bad_port.stderr.strip().splitlines()) == 1


def test_kold_controller_never_prints_the_redis_password(tmp_path: Path) -> None:
    # nothing listens there: the one-line error names the Redis, its password left out
    url = f"redis://:s3cretpw@127.0.0.1:{free_port()}/0"
    result = kold("controller", "--target", "knative", env={**platform_env(tmp_path), "KOLD_REDIS_URL": url})
    assert result.returncode == 1 and "cannot reach Redis at redis://:***@127.0.0.1:" in result.stderr, result.stderr
    assert "s3cretpw" not in result.stderr + result.stdout
    assert len(result.stderr.strip().splitlines()) == 1
