"""A private redis-server that the tests kill and that comes back as under `kold up`: supervised on the
same port, its restart held until the test opens the gate (so "while it is down" is deterministic)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from kold.localredis import LocalRedis, RestartBackoff


class Gate(RestartBackoff):
    """Keeps a killed server down until the test opens the gate, then restarts it at once."""

    def __init__(self) -> None:
        super().__init__()
        self.open = threading.Event()

    def delay(self, uptime: float) -> float:
        self.open.wait(30)
        return 0.0


def wait_until(cond: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + 15
    while not cond():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting until {what}")
        time.sleep(0.02)


def is_down(client: redis.Redis) -> bool:
    try:
        client.ping()
    except redis.RedisError:
        return True
    return False


@contextmanager
def supervised_redis(directory: Path, *, persist: bool) -> Iterator[tuple[LocalRedis, Gate, redis.Redis]]:
    """The server, its gate, and a client that fails at once while it is down (no retries)."""
    gate = Gate()
    server = LocalRedis(directory, persist=persist).start()
    client = redis.Redis.from_url(server.url, socket_connect_timeout=1, socket_timeout=2, retry=Retry(NoBackoff(), 0))
    server.supervise(lambda line: None, gate)
    try:
        yield server, gate, client
    finally:
        gate.open.set()
        client.close()
        server.stop()
