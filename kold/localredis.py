"""A private redis-server for `kold up` when no KOLD_REDIS_URL is given, and for the test suite.

It listens on a free loopback port, keeps its data (append-only file) under the user's state
directory so functions survive `kold down` / `kold up`, and stops with the platform. The tests start
the same server without persistence (`persist=False`), so they exercise the code `kold up` runs.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from pathlib import Path
from types import TracebackType

from kold.errors import CLIError


class LocalRedis:
    """A redis-server child process on 127.0.0.1. `persist=False` keeps everything in memory (no
    append-only file): for throwaway servers whose data must not outlive them, like the tests'."""

    def __init__(self, data_dir: Path, *, persist: bool = True) -> None:
        self.data_dir = data_dir
        self.persist = persist
        self.port = 0
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> LocalRedis:
        binary = shutil.which("redis-server")
        if binary is None:
            raise CLIError("redis-server is not installed: run scripts/setup.sh, or set KOLD_REDIS_URL")
        self.data_dir.mkdir(parents=True, exist_ok=True)
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        self._proc = subprocess.Popen(
            [binary, "--bind", "127.0.0.1", "--port", str(self.port), "--dir", str(self.data_dir),
             "--appendonly", "yes" if self.persist else "no", "--save", "", "--protected-mode", "yes"],
            stdout=open(self.data_dir / "redis.log", "ab"),  # noqa: SIM115 - owned by the child
            stderr=subprocess.STDOUT,
        )  # fmt: skip
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise CLIError(f"redis-server exited at start: see {self.data_dir / 'redis.log'}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as conn:
                    conn.sendall(b"PING\r\n")
                    if conn.recv(16).startswith(b"+PONG"):
                        return self
            except OSError:
                time.sleep(0.02)
        self.stop()
        raise CLIError("redis-server did not answer within 10 s")

    def stop(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
        self._proc = None

    def __enter__(self) -> LocalRedis:
        return self.start()

    def __exit__(self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()
