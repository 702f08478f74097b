"""A private redis-server for `kold up` when no KOLD_REDIS_URL is given, and for the test suite.

It listens on a free loopback port, keeps its data (append-only file) under the user's state
directory so functions survive `kold down` / `kold up`, and stops with the platform. The tests start
the same server without persistence (`persist=False`), so they exercise the code `kold up` runs.

`kold up` also has it supervised (`supervise`): a redis-server that dies (killed, out of memory) is
reaped and started again on the same port with the same data directory, so the gateway's client
reconnects to where it was and the append-only file brings every function back. One that keeps
dying is restarted with a growing delay (`RestartBackoff`), each restart said in the platform log.
"""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType

from kold.errors import CLIError

# How often the supervisor looks for a dead server, and so how long `stop` may wait for it to notice.
_WATCH_INTERVAL_S = 0.2


class RestartBackoff:
    """How long to wait before restarting a server that died: at once after a long life (a one-off
    kill), then `first` seconds, doubled for each death soon after a start, up to `cap`, so that a
    server that cannot run (a bad append-only file, the port taken) is not restarted in a tight loop
    that floods the log. A life of `stable_after` seconds or more ends the streak."""

    def __init__(self, first: float = 0.5, cap: float = 30.0, stable_after: float = 30.0) -> None:
        self.first = first
        self.cap = cap
        self.stable_after = stable_after
        self._next = first

    def delay(self, uptime: float) -> float:
        """The wait before the next start of a server that ran for `uptime` seconds."""
        if uptime >= self.stable_after:
            self._next = self.first
            return 0.0
        delay, self._next = self._next, min(self.cap, self._next * 2)
        return delay


class LocalRedis:
    """A redis-server child process on 127.0.0.1. `persist=False` keeps everything in memory (no
    append-only file): for throwaway servers whose data must not outlive them, like the tests'."""

    def __init__(self, data_dir: Path, *, persist: bool = True) -> None:
        self.data_dir = data_dir
        self.persist = persist
        self.port = 0
        self.restarts = 0
        self._proc: subprocess.Popen[bytes] | None = None
        self._started_at = 0.0
        self._stopping = threading.Event()
        self._supervisor: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def pid(self) -> int | None:
        """The running server's process id (a new one after each restart); None when it is not running."""
        proc = self._proc
        return proc.pid if proc is not None and proc.poll() is None else None

    def start(self) -> LocalRedis:
        self._stopping.clear()
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        try:
            self._spawn()
        except CLIError:
            self.stop()
            raise
        return self

    def _spawn(self) -> subprocess.Popen[bytes]:
        """Start redis-server on `self.port` and wait until it answers PING; CLIError if it exits or
        stays silent (the process is then killed and reaped, and `self._proc` holds it, dead)."""
        binary = shutil.which("redis-server")
        if binary is None:
            raise CLIError("redis-server is not installed: run scripts/setup.sh, or set KOLD_REDIS_URL")
        self.data_dir.mkdir(parents=True, exist_ok=True)
        with open(self.data_dir / "redis.log", "ab") as log:  # the child keeps its own descriptor
            self._proc = proc = subprocess.Popen(
                [binary, "--bind", "127.0.0.1", "--port", str(self.port), "--dir", str(self.data_dir),
                 "--appendonly", "yes" if self.persist else "no", "--save", "", "--protected-mode", "yes"],
                stdout=log,
                stderr=subprocess.STDOUT,
            )  # fmt: skip
        self._started_at = time.monotonic()
        deadline = self._started_at + 10
        while time.monotonic() < deadline and not self._stopping.is_set():
            if proc.poll() is not None:
                raise CLIError(f"redis-server exited at start: see {self.data_dir / 'redis.log'}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as conn:
                    conn.sendall(b"PING\r\n")
                    if conn.recv(16).startswith(b"+PONG"):
                        return proc
            except OSError:
                time.sleep(0.02)
        proc.kill()
        proc.wait()
        raise CLIError("redis-server did not answer within 10 s")

    def supervise(self, log: Callable[[str], None], backoff: RestartBackoff | None = None) -> None:
        """Restart the server whenever it dies, until `stop`; `log` gets one line per death and restart.

        A thread, not a task of the gateway's event loop: restarting waits for the new server to
        answer, and the loop must keep serving warm requests meanwhile.
        """
        if self._supervisor is not None:
            return
        self._supervisor = threading.Thread(
            target=self._watch, args=(log, backoff or RestartBackoff()), name="kold-redis-supervisor", daemon=True
        )
        self._supervisor.start()

    def _watch(self, log: Callable[[str], None], backoff: RestartBackoff) -> None:
        while not self._stopping.is_set():
            proc = self._proc
            if proc is None:
                return
            try:
                status = proc.wait(timeout=_WATCH_INTERVAL_S)  # reaps it: no <defunct> server left behind
            except subprocess.TimeoutExpired:
                continue
            if self._stopping.is_set():
                return
            uptime = time.monotonic() - self._started_at
            delay = backoff.delay(uptime)
            log(
                f"redis-server (pid {proc.pid}, port {self.port}) {_exit_reason(status)} after {uptime:.1f} s: "
                f"restarting it {'now' if delay == 0 else f'in {delay:g} s'} with its data from {self.data_dir}"
            )
            if self._stopping.wait(delay):
                return
            try:
                new = self._spawn()
            except CLIError as exc:  # self._proc is the failed server, dead: the next round backs off
                if not self._stopping.is_set():
                    log(f"redis-server restart failed: {exc}")
                continue
            self.restarts += 1
            log(f"redis-server restarted (pid {new.pid}, port {self.port}, restart {self.restarts})")

    def stop(self) -> None:
        self._stopping.set()
        if self._supervisor is not None:
            self._supervisor.join()  # it notices within a watch interval, or a start's wait for PING
            self._supervisor = None
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        self._proc = None

    def __enter__(self) -> LocalRedis:
        return self.start()

    def __exit__(self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()


def _exit_reason(status: int) -> str:
    if status < 0:
        try:
            return f"was killed by {signal.Signals(-status).name}"
        except ValueError:
            return f"was killed by signal {-status}"
    return f"exited with status {status}"
