"""The private redis-server `kold up` keeps alive (kold/localredis.py): a real redis-server, killed
with SIGKILL, comes back on its port with its append-only file's data; one that keeps dying is
restarted after growing delays; `stop` ends the supervision and the server for good."""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path

import pytest
import redis
from kold_up import accepts, wait_for

from kold.localredis import LocalRedis, RestartBackoff

pytestmark = pytest.mark.timeout(120)


def test_restart_backoff_grows_while_the_server_keeps_dying_and_resets_after_a_long_life() -> None:
    backoff = RestartBackoff(first=0.5, cap=4.0, stable_after=30.0)
    assert [backoff.delay(1.0) for _ in range(6)] == [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]
    assert backoff.delay(31.0) == 0.0  # a one-off death after a long life: at once
    assert backoff.delay(1.0) == 0.5  # and the streak starts again


class Lines:
    """The supervisor's log lines, as the platform log would get them."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self._lock = threading.Lock()

    def __call__(self, line: str) -> None:
        with self._lock:
            self.lines.append(line)

    def count(self, needle: str) -> int:
        with self._lock:
            return sum(needle in line for line in self.lines)


def test_a_killed_server_is_reaped_and_restarted_with_its_data(tmp_path: Path) -> None:
    log = Lines()
    server = LocalRedis(tmp_path / "redis").start()
    try:
        server.supervise(log, RestartBackoff(first=0.1, cap=0.4, stable_after=60.0))
        client = redis.Redis.from_url(server.url)
        client.set("kold:test", "survives")
        port, first = server.port, server.pid
        assert first is not None

        os.kill(first, signal.SIGKILL)
        second = wait_for(lambda: server.pid not in (None, first) and server.pid, 20, "a restarted server")
        assert not Path(f"/proc/{first}").exists()  # reaped, not <defunct>
        assert server.port == port and client.get("kold:test") == b"survives"  # same port, same data
        assert log.count("was killed by SIGKILL") == 1 and log.count(f"restarted (pid {second}, port {port}") == 1

        # dying again soon after each start: the delays grow, each death and restart in the log
        for _ in range(2):
            pid = server.pid
            assert pid is not None
            os.kill(pid, signal.SIGKILL)
            wait_for(lambda pid=pid: server.pid not in (None, pid), 20, "another restart")  # type: ignore[misc]
        delays = [line.split("restarting it ")[1].split(" with")[0] for line in log.lines if "restarting it" in line]
        assert delays == ["in 0.1 s", "in 0.2 s", "in 0.4 s"]
        assert server.restarts == 3 and client.get("kold:test") == b"survives"
    finally:
        server.stop()  # ends the supervision first: nothing brings the server back
    assert server.pid is None and not accepts(port)


@pytest.mark.timeout(30)  # far less than the 60 s delay: stop must not wait it out
def test_stop_during_a_restart_delay_leaves_nothing_running(tmp_path: Path) -> None:
    log = Lines()
    server = LocalRedis(tmp_path / "redis").start()
    port, pid = server.port, server.pid
    assert pid is not None
    try:
        server.supervise(log, RestartBackoff(first=60.0, cap=60.0, stable_after=600.0))
        os.kill(pid, signal.SIGKILL)
        wait_for(lambda: log.count("restarting it in 60 s"), 20, "the death to be noticed")
    finally:
        server.stop()  # does not wait out the 60 s delay
    assert server.pid is None and server.restarts == 0 and not accepts(port)
    assert not Path(f"/proc/{pid}").exists()
