"""Redis faults under a real `kold up --detach` (issue 11, item 5), as a user meets them from the CLI.

- `kold up`'s private redis-server killed with SIGKILL: it is reaped and restarted on its port with
  its append-only file, so the deployed function is still listed, described and served.
- A Redis the platform was pointed at (KOLD_REDIS_URL) that the test stops with SIGSTOP, then
  kills: every admin command says in one line that the registry (Redis) is unreachable (503
  registry_unavailable), the gateway says so within about half a second, and all is well again
  once Redis is back.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import httpx
import pytest
from kold_up import (
    accepts,
    child_redis_servers,
    kold,
    platform_env,
    platform_log,
    platform_state,
    running_platform,
    wait_for,
)

pytestmark = pytest.mark.timeout(300)

REGISTRY_AWAY = "the function registry (Redis) is unreachable"


def _one_line_error(result, needle: str) -> None:  # type: ignore[no-untyped-def]
    assert result.returncode == 1, (result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("kold: error:")]
    assert len(errors) == 1 and needle in errors[0], result.stderr


def test_a_killed_private_redis_is_restarted_and_the_functions_survive(tmp_path: Path) -> None:
    from kold.modelgen import write_random_model

    model = write_random_model(tmp_path / "model", "llama", "tiny")
    with running_platform(platform_env(tmp_path)) as env:
        deployed = kold("deploy", str(model), "--name", "tiny", "--idle-timeout", "120", env=env)
        assert deployed.returncode == 0, deployed.stderr
        state = platform_state(env)
        platform_pid = int(state["pid"])  # type: ignore[call-overload]
        redis_port = int(str(state["redis_url"]).rsplit(":", 1)[1].split("/")[0])
        (first,) = child_redis_servers(platform_pid)

        os.kill(first, signal.SIGKILL)
        # reaped (no <defunct> left) and replaced by a new server on the same port
        wait_for(lambda: not Path(f"/proc/{first}").exists(), 15, "the killed redis-server to be reaped")
        (second,) = wait_for(lambda: child_redis_servers(platform_pid), 30, "a new redis-server")
        assert second != first
        log = wait_for(lambda: "restarted" in platform_log(env) and platform_log(env), 15, "the restart in the log")
        assert f"redis-server (pid {first}, port " in log and "was killed by SIGKILL" in log
        assert f"redis-server restarted (pid {second}, port " in log

        # the data came back from the append-only file: the registry lists and describes the function
        listed = wait_for(lambda: (r := kold("ls", env=env)).returncode == 0 and r, 30, "`kold ls` to answer")
        assert "tiny" in listed.stdout and "tiny-00001" in listed.stdout, listed.stdout
        described = kold("describe", "tiny", env=env)
        assert described.returncode == 0 and "tiny-00001" in described.stdout, described.stderr
        invoked = kold("invoke", "tiny", "Hello", "--max-tokens", "4", "--temperature", "0", env=env)
        assert invoked.returncode == 0 and invoked.stdout.strip(), invoked.stderr
    # `kold down` stopped the restarted server too, and its supervisor did not bring it back
    assert not Path(f"/proc/{second}").exists() and not Path(f"/proc/{platform_pid}").exists()
    assert not accepts(redis_port)


def test_the_cli_says_in_one_line_that_the_registry_is_away(tmp_path: Path) -> None:
    from kold.localredis import LocalRedis
    from kold.modelgen import write_random_model

    model = write_random_model(tmp_path / "model", "llama", "tiny")
    redis = LocalRedis(tmp_path / "redis", persist=False).start()  # ours to stop and kill
    try:
        env = platform_env(tmp_path, KOLD_REDIS_URL=redis.url)
        with running_platform(env):
            url = str(platform_state(env)["url"])
            assert kold("ls", env=env).returncode == 0
            pid = redis.pid
            assert pid is not None
            os.kill(pid, signal.SIGSTOP)  # stalled: it accepts connections and never answers
            try:
                # the gateway gives up on a stalled Redis in about half a second (250 ms socket
                # timeout, one retry): before, each call waited 2 s twice
                started = time.monotonic()
                resp = httpx.get(f"{url}/admin/functions", timeout=30)
                assert time.monotonic() - started < 3.0
                assert resp.status_code == 503 and resp.json()["error"]["code"] == "registry_unavailable"
                for args in (("ls",), ("describe", "tiny"), ("deploy", str(model), "--name", "tiny")):
                    _one_line_error(kold(*args, env=env), REGISTRY_AWAY)
                assert "(HTTP 503, registry_unavailable)" in kold("ls", env=env).stderr
            finally:
                os.kill(pid, signal.SIGCONT)
            wait_for(lambda: kold("ls", env=env).returncode == 0, 30, "`kold ls` to work again")

            os.kill(pid, signal.SIGKILL)  # gone: connections are refused
            redis.stop()
            for args in (("ls",), ("describe", "tiny")):
                _one_line_error(kold(*args, env=env), REGISTRY_AWAY)
    finally:
        redis.stop()
