"""`kold up|deploy|invoke|describe|rollback|keys|down` as a user runs them, against a real platform:
a `kold up --detach` process (its own private redis-server), real runtime instances, real HTTP."""

from __future__ import annotations

import json
import os
import queue
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
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
        (("describe", "Bad_Name"), "lowercase letters"),
        (("logs", "../keys", "--follow"), "lowercase letters"),
        (("logs", "tiny", "--tail", "-1"), "must be >= 0"),
    ],
)
def test_bad_input_is_one_line(env: dict[str, str], args: tuple[str, ...], message: str) -> None:
    result = kold(*args, env=env)
    assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr


@pytest.fixture
def platform(env: dict[str, str]) -> Iterator[dict[str, str]]:
    """`kold up --detach`, with a host pool of one segment that its instances inherit."""
    pytest.importorskip("kold.gateway.app")
    from kold.snapshot import HostPool

    pool = HostPool(Path("/dev/shm") / f"kold-test-platform-pool-{uuid.uuid4().hex[:8]}")
    pool.fill(1, 2 << 20)
    env = {**env, "KOLD_HOST_POOL_DIR": str(pool.directory)}
    up = kold("up", "--detach", "--port", env["KOLD_TEST_PORT"], env=env, timeout=90)
    assert up.returncode == 0, up.stderr
    try:
        yield env
    finally:
        try:
            down = kold("down", env=env, timeout=90)
            assert down.returncode == 0, down.stderr
            # `kold down` leaves nothing behind: the private redis-server is stopped, the pid file removed
            home = Path(env["KOLD_HOME"])
            redis_port = int(re.findall(r"redis redis://127\.0\.0\.1:(\d+)", (home / "platform.log").read_text())[-1])
            deadline = time.monotonic() + 15
            while _accepts(redis_port):
                assert time.monotonic() < deadline, "the private redis-server outlived `kold down`"
                time.sleep(0.1)
            assert not list(home.glob("*.pid")), list(home.glob("*.pid"))
        finally:
            shutil.rmtree(pool.directory, ignore_errors=True)  # after `kold down`: no instance holds it


def _accepts(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


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
    # the instance restored into the node's host pool, which `kold up` handed down to it
    assert "1 segments (2.0 MiB), 1 free" in (Path(platform["KOLD_HOME"]) / "platform.log").read_text()
    pool = kold("snapshot", "pool", "status", env=platform)
    assert pool.returncode == 0 and "1 segments" in pool.stdout and "1 in use" in pool.stdout, pool.stdout

    described = kold("describe", "tiny", env=platform)
    assert described.returncode == 0, described.stderr
    out = described.stdout
    assert "Name:" in out and "/v1/functions/tiny/v1/chat/completions" in out and "Serving:" in out
    assert "Instances (1 running):" in out
    (row,) = [line.split() for line in out.splitlines() if line.strip().startswith("tiny-00001-1 ")]
    assert row[1] == "ready" and row[2].isdigit()  # state, port
    assert row[-1].isdigit()  # READY ms, from the runtime's startup event
    doc = json.loads(kold("describe", "tiny", "--json", env=platform).stdout)
    (inst,) = doc["instances"]
    assert inst["id"] == "tiny-00001-1" and inst["state"] == "ready"

    _logs_and_follow(platform, inst["id"])


def _logs_and_follow(env: dict[str, str], instance_id: str) -> None:
    """`kold logs`, and `kold logs --follow`: a line written after it started arrives; Ctrl-C ends it
    cleanly; a follow stream still open does not hold up `kold down`."""
    logs = kold("logs", "tiny", "--tail", "1000", env=env)
    assert logs.returncode == 0 and f"--- kold: instance {instance_id} starting" in logs.stdout, logs.stderr

    missing = kold("logs", "nosuch", "--follow", env=env, timeout=30)
    assert missing.returncode == 2 and "does not exist" in missing.stderr
    assert "Traceback" not in missing.stderr and len(missing.stderr.strip().splitlines()) == 1

    log_file = Path(env["KOLD_HOME"]) / "logs" / f"{instance_id}.log"
    follow = Following(env)
    try:
        assert follow.lines.get(timeout=30)  # the --tail 1 line: the stream is open
        marker = f"written after the follow began {uuid.uuid4().hex}"
        with open(log_file, "a") as f:
            f.write(marker + "\n")
        follow.wait_for(marker)
        follow.proc.send_signal(signal.SIGINT)
        assert follow.proc.wait(10) == 0
        assert "Traceback" not in follow.stderr()
    finally:
        follow.kill()

    follow = Following(env)
    try:
        assert follow.lines.get(timeout=30)
        down = kold("down", env=env, timeout=60)
        assert down.returncode == 0 and "stopped" in down.stdout, down.stderr
        assert follow.proc.wait(15) == 0  # the platform ended the stream as it shut down
        assert "ended the log stream" in follow.stderr()
    finally:
        follow.kill()


class Following:
    """`kold logs tiny --follow --tail 1` in the background, its stdout lines in a queue."""

    def __init__(self, env: dict[str, str]) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "kold", "logs", "tiny", "--follow", "--tail", "1"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        self.lines: queue.Queue[str] = queue.Queue()
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line)

    def wait_for(self, text: str, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        seen = []
        while time.monotonic() < deadline:
            try:
                seen.append(self.lines.get(timeout=max(0.01, deadline - time.monotonic())))
            except queue.Empty:
                break
            if text in seen[-1]:
                return
        raise AssertionError(f"{text!r} did not arrive; got {seen}")

    def stderr(self) -> str:
        assert self.proc.stderr is not None
        return self.proc.stderr.read()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self.thread.join(10)
