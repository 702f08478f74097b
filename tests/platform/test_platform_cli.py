"""`kold up|deploy|invoke|describe|rollback|keys|down` as a user runs them, against a real platform:
a `kold up --detach` process (its own private redis-server), real runtime instances, real HTTP."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(300)


def kold(*args: str, env: dict[str, str], timeout: float = 240) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "kold", *args], capture_output=True, text=True, timeout=timeout, env=env, check=False
    )


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    port = _free_port()
    return {
        **os.environ,
        "KOLD_HOME": str(tmp_path / "home"),
        "KOLD_CACHE_SHM_DIR": str(tmp_path / "shm"),
        "KOLD_CACHE_DISK_BYTES": "0",
        "KOLD_GATEWAY_URL": f"http://127.0.0.1:{port}",
        "KOLD_TEST_PORT": str(port),
        "OMP_NUM_THREADS": "1",
    }


def test_commands_without_a_platform_say_so(env: dict[str, str]) -> None:
    for args in (("ls",), ("describe", "tiny"), ("invoke", "tiny", "hi"), ("keys", "ls")):
        result = kold(*args, env=env)
        assert result.returncode == 2, args
        assert "start it with `kold up`" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("deploy", ".", "--name", "Bad_Name"), "lowercase letters"),
        (("deploy", ".", "--name", "ok", "--target", "knative"), "not available yet"),
        (("deploy", "/definitely/not/here", "--name", "ok"), "not a directory"),
        (("up", "--port", "0"), "not a port number"),
    ],
)
def test_bad_input_is_one_line(env: dict[str, str], args: tuple[str, ...], message: str) -> None:
    result = kold(*args, env=env)
    assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr


@pytest.fixture
def platform(env: dict[str, str]) -> Iterator[dict[str, str]]:
    pytest.importorskip("kold.gateway.app")
    up = kold("up", "--detach", "--port", env["KOLD_TEST_PORT"], env=env, timeout=90)
    assert up.returncode == 0, up.stderr
    try:
        yield env
    finally:
        down = kold("down", env=env, timeout=90)
        assert down.returncode == 0, down.stderr


def test_deploy_invoke_cold_then_warm_describe_and_down(platform: dict[str, str], tmp_path: Path) -> None:
    from kold.modelgen import write_random_model

    model = write_random_model(tmp_path / "model", "llama", "tiny")
    deployed = kold("deploy", str(model), "--name", "tiny", "--idle-timeout", "60", env=platform)
    assert deployed.returncode == 0, deployed.stderr
    assert "/v1/functions/tiny/v1/chat/completions" in deployed.stdout
    assert "revision tiny-00001 is serving" in deployed.stdout

    listed = kold("ls", env=platform)
    assert listed.returncode == 0 and "tiny-00001" in listed.stdout

    first = kold("invoke", "tiny", "Hello", "--max-tokens", "8", env=platform)
    assert first.returncode == 0, first.stderr
    assert "first token" in first.stdout and "8 tokens" in first.stdout
    second = kold("invoke", "tiny", "Hello", "--chat", "--max-tokens", "4", env=platform)
    assert second.returncode == 0, second.stderr
    assert "warm:" in second.stdout

    described = kold("describe", "tiny", env=platform)
    assert described.returncode == 0 and "tiny-00001" in described.stdout
