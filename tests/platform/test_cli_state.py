"""kold/platform_state.py: the state `kold up` leaves for the other commands, and how they find the gateway."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from kold.platform_state import (
    DEFAULT_URL,
    PlatformState,
    clear_stale_state,
    locate_gateway,
    process_start,
    read_state,
    remove_state,
    state_path,
    write_state,
)


def _ours(url: str = "http://127.0.0.1:36001") -> PlatformState:
    return PlatformState(pid=os.getpid(), url=url, started_at=1.0, pid_start=process_start(os.getpid()))


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_a_written_state_reads_back_and_leaves_no_temporary_file(tmp_path: Path) -> None:
    home = tmp_path / "home"  # does not exist yet: `kold up` makes it
    state = PlatformState(
        pid=os.getpid(),
        url="http://127.0.0.1:36001",
        started_at=1700000000.5,
        redis_url="redis://127.0.0.1:7000/0",
        log_path="/tmp/platform.log",
        pid_start=process_start(os.getpid()),
    )
    write_state(home, state)
    assert read_state(home) == state
    assert [p.name for p in home.iterdir()] == ["platform.json"]
    assert json.loads(state_path(home).read_text())["url"] == "http://127.0.0.1:36001"


def test_a_state_whose_process_is_gone_is_no_platform(tmp_path: Path) -> None:
    write_state(tmp_path, PlatformState(pid=_dead_pid(), url="http://127.0.0.1:36001", started_at=1.0))
    assert read_state(tmp_path) is None
    assert locate_gateway(None, None, tmp_path).url == DEFAULT_URL
    clear_stale_state(tmp_path)
    assert not state_path(tmp_path).exists()


def test_a_reused_pid_is_no_platform(tmp_path: Path) -> None:
    """The pid is alive, but it is another process than the one that wrote the state (it started at another time)."""
    start = process_start(os.getpid())
    assert start is not None  # Linux: /proc
    write_state(tmp_path, PlatformState(pid=os.getpid(), url="http://x:1", started_at=1.0, pid_start=start + 1))
    assert read_state(tmp_path) is None


def test_an_unreadable_state_is_no_platform(tmp_path: Path) -> None:
    for text in ("", "{", "[]", '{"pid": "x"}', '{"pid": 1}'):
        state_path(tmp_path).write_text(text)
        assert read_state(tmp_path) is None, text


def test_a_platform_removes_only_its_own_state(tmp_path: Path) -> None:
    write_state(tmp_path, _ours())
    remove_state(tmp_path, os.getpid() + 1)  # an older platform ending late
    assert read_state(tmp_path) is not None
    clear_stale_state(tmp_path)  # alive: not stale
    assert read_state(tmp_path) is not None
    remove_state(tmp_path, os.getpid())
    assert not state_path(tmp_path).exists()


def test_the_gateway_is_found_by_flag_then_variable_then_state_then_default(tmp_path: Path) -> None:
    default = locate_gateway(None, None, tmp_path)
    assert (default.url, default.source) == (DEFAULT_URL, "default")
    assert "the default" in default.unreachable(tmp_path) and "start it with `kold up`" in default.unreachable(tmp_path)

    write_state(tmp_path, _ours("http://127.0.0.1:36001"))
    found = locate_gateway(None, None, tmp_path)
    assert (found.url, found.source) == ("http://127.0.0.1:36001", "state")
    assert f"pid {os.getpid()}" in found.unreachable(tmp_path)

    env = locate_gateway(None, "http://127.0.0.1:9/", tmp_path)
    assert (env.url, env.source) == ("http://127.0.0.1:9", "KOLD_GATEWAY_URL")
    assert "(from KOLD_GATEWAY_URL" in env.unreachable(tmp_path)

    flag = locate_gateway("http://127.0.0.1:10", "http://127.0.0.1:9", tmp_path)
    assert (flag.url, flag.source) == ("http://127.0.0.1:10", "--url")
    assert "(from --url)" in flag.unreachable(tmp_path)

    empty = locate_gateway(None, "", tmp_path)  # KOLD_GATEWAY_URL= (set, empty): unset
    assert empty.source == "state"
