"""A real `kold up --detach` for fault tests: its own KOLD_HOME and port, found by the CLI from the
state it writes, and `kold down` at the end (which must leave no redis-server behind)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path


def kold(
    *args: str, env: dict[str, str], timeout: float = 240, prefix: Sequence[str] = ()
) -> subprocess.CompletedProcess[str]:
    """Run `kold ARGS`; `prefix` is a command that runs it (setpriv, to drop capabilities)."""
    return subprocess.run(
        [*prefix, sys.executable, "-m", "kold", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        check=False,
    )


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def accepts(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def platform_env(root: Path, **extra: str) -> dict[str, str]:
    """The environment of a platform under `root`: no gateway URL, key or Redis from the caller's."""
    env = {
        **os.environ,
        "KOLD_HOME": str(root / "home"),
        "KOLD_CACHE_SHM_DIR": str(root / "shm"),
        "KOLD_CACHE_DISK_BYTES": "0",
        "KOLD_HOST_POOL": "off",
        "KOLD_TEST_PORT": str(free_port()),
        "OMP_NUM_THREADS": "1",
    }
    for name in ("KOLD_GATEWAY_URL", "KOLD_API_KEY", "KOLD_REDIS_URL", "KOLD_STORE"):
        env.pop(name, None)
    return {**env, **extra}


@contextmanager
def running_platform(env: dict[str, str]) -> Iterator[dict[str, str]]:
    """`kold up --detach` with `env`, and `kold down` afterwards."""
    up = kold("up", "--detach", "--port", env["KOLD_TEST_PORT"], env=env, timeout=90)
    assert up.returncode == 0, up.stderr + up.stdout
    try:
        yield env
    finally:
        down = kold("down", env=env, timeout=90)
        assert down.returncode == 0, down.stderr


def platform_state(env: dict[str, str]) -> dict[str, object]:
    state: dict[str, object] = json.loads((Path(env["KOLD_HOME"]) / "platform.json").read_text())
    return state


def platform_log(env: dict[str, str]) -> str:
    return (Path(env["KOLD_HOME"]) / "platform.log").read_text()


def child_redis_servers(pid: int) -> list[int]:
    """The live (not zombie) redis-server children of process `pid`."""
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            children = (task / "children").read_text().split()
        except OSError:
            continue
        for child in map(int, children):
            try:
                name = Path(f"/proc/{child}/comm").read_text().strip()
                state = Path(f"/proc/{child}/stat").read_text().rsplit(")", 1)[1].split()[0]
            except OSError:
                continue
            if name == "redis-server" and state != "Z":
                found.append(child)
    return found


def wait_for(check, timeout: float, what: str):  # type: ignore[no-untyped-def]
    """Poll `check()` until it returns something truthy; fail naming `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        assert time.monotonic() < deadline, f"timed out after {timeout} s waiting for {what}"
        time.sleep(0.1)
