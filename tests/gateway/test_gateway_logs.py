"""`GET /admin/functions/NAME/logs`: the JSON snapshot and the `follow=1` stream (`kold logs -f`).

The stream only reads the pool's instances and their log files, so these tests need no runtime
process: instances are registered in the pool as records with log files the test writes, which
is also the only way to control exactly when a line is "appended by an instance".
"""

from __future__ import annotations

import contextlib
import http.client
import queue
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from gateway_helpers import Served, deploy

from kold.gateway.app import build_app
from kold.gateway.pool import Instance, InstancePool
from kold.gateway.registry import Registry

pytestmark = pytest.mark.redis

SNAPSHOT = "file:///nowhere/store/snapshots/" + "0" * 32  # never restored: no instance process runs


def add_instance(pool: InstancePool, inst_id: str, revision_id: str, text: str = "") -> Instance:
    """An instance record as pool.start leaves it, without a process (the stream never needs one)."""
    inst = Instance(id=inst_id, revision_id=revision_id, port=0, url="", log_path=pool.log_dir / f"{inst_id}.log")
    inst.log_path.write_text(text)
    pool._register(inst)
    return inst


def append(inst: Instance, text: str) -> None:
    with open(inst.log_path, "a") as f:
        f.write(text)


class Follow:
    """A `logs?follow=1` stream read on a thread, its lines in a queue.

    Plain http.client, so that close() can shut the socket down under the reading thread: the
    server must then see the disconnect and end the stream by itself.
    """

    def __init__(self, s: Served, name: str, tail: int) -> None:
        self.lines: queue.Queue[str] = queue.Queue()
        self.conn = http.client.HTTPConnection("127.0.0.1", s.port, timeout=10)
        self.conn.request("GET", f"/admin/functions/{name}/logs?tail={tail}&follow=1")
        self.resp = self.conn.getresponse()
        self.status = self.resp.status
        self.content_type = self.resp.getheader("content-type", "")
        assert self.conn.sock is not None
        self.conn.sock.settimeout(None)
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        with contextlib.suppress(OSError, ValueError, http.client.HTTPException):
            while line := self.resp.readline():
                self.lines.put(line.decode().rstrip("\n"))

    def next_lines(self, n: int, timeout: float = 10.0) -> list[str]:
        deadline = time.monotonic() + timeout
        return [self.lines.get(timeout=max(0.01, deadline - time.monotonic())) for _ in range(n)]

    def close(self) -> None:
        if self.conn.sock is not None:
            with contextlib.suppress(OSError):
                self.conn.sock.shutdown(socket.SHUT_RDWR)
        self.thread.join(10)
        self.conn.close()


@pytest.fixture
def served(registry: Registry, tmp_path: Path) -> Iterator[tuple[Served, InstancePool]]:
    pool = InstancePool(tmp_path / "logs")
    pool.log_dir.mkdir(parents=True)
    s = Served(build_app(registry, pool, require_keys=False))
    yield s, pool
    started = time.monotonic()
    s.close()
    # a stream the client left must have ended with it, or the server's graceful shutdown waits for it
    assert time.monotonic() - started < 10


def test_follow_sends_the_tail_then_appended_lines_of_all_instances(
    registry: Registry, served: tuple[Served, InstancePool]
) -> None:
    s, pool = served
    rev = deploy(registry, "lg", SNAPSHOT, idle_timeout_s=600)
    add_instance(pool, "other-00001-1", "other-00001", "not this function's\n")
    first = add_instance(pool, f"{rev}-1", rev, "one\ntwo\nthree\n")
    follow = Follow(s, "lg", tail=2)
    try:
        assert follow.status == 200 and follow.content_type.startswith("text/plain")
        assert follow.next_lines(2) == ["two", "three"]  # one instance: lines as they are
        append(first, "four\nfi")
        assert follow.next_lines(1) == ["four"]  # whole lines only: "fi" waits for its end
        append(first, "ve\n")
        assert follow.next_lines(1) == ["five"]
        # an instance started after the stream began, of a revision deployed after it: read from its start,
        # and from now on lines say which instance wrote them
        rev2 = deploy(registry, "lg", SNAPSHOT, idle_timeout_s=600)
        second = add_instance(pool, f"{rev2}-2", rev2, "hello from two\n")
        assert follow.next_lines(1) == [f"[{rev2}-2] hello from two"]
        append(first, "six\n")
        append(second, "seven\n")
        assert sorted(follow.next_lines(2)) == [f"[{rev}-1] six", f"[{rev2}-2] seven"]
        time.sleep(0.5)
        assert follow.lines.empty()  # the other function's instance never shows
    finally:
        follow.close()


def test_follow_with_several_instances_prefixes_the_tail_too(
    registry: Registry, served: tuple[Served, InstancePool]
) -> None:
    s, pool = served
    rev = deploy(registry, "lg2", SNAPSHOT, idle_timeout_s=600)
    add_instance(pool, f"{rev}-1", rev, "a\nb\n")
    add_instance(pool, f"{rev}-2", rev, "c\n")
    follow = Follow(s, "lg2", tail=1)
    try:
        assert follow.next_lines(2) == [f"[{rev}-1] b", f"[{rev}-2] c"]
    finally:
        follow.close()


def test_logs_bad_input_is_a_json_error(registry: Registry, served: tuple[Served, InstancePool]) -> None:
    s, pool = served
    rev = deploy(registry, "lg3", SNAPSHOT, idle_timeout_s=600)
    add_instance(pool, f"{rev}-1", rev, "x\ny\n")
    r = s.http.get("/admin/functions/lg3/logs", params={"tail": "1"})
    assert r.status_code == 200 and r.json()["instances"] == [{"id": f"{rev}-1", "state": "starting", "log": "y\n"}]
    for name, params, status in [
        ("nosuch", {"follow": "1"}, 404),
        ("Bad_Name", {"follow": "1"}, 400),
        ("lg3", {"tail": "x", "follow": "1"}, 400),
        ("lg3", {"tail": "-1", "follow": "1"}, 400),
        ("lg3", {"follow": "maybe"}, 400),
    ]:
        r = s.http.get(f"/admin/functions/{name}/logs", params=params)
        assert r.status_code == status, (name, params, r.text)
        assert r.json()["error"]["message"], r.text
