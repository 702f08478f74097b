"""The fork template ("zygote"): one process that has imported torch and the runtime, forking instances.

Every cold start of a spawned runtime pays `import torch` (~1.8 s on a 2-core machine) and the
runtime's other imports (~0.4 s) before it can serve; for a small model that is most of the cold
start. The pool instead keeps one template process per pool that did those imports once, and asks it
to fork each new instance: the fork takes milliseconds, and the child shares the imported modules
copy-on-write.

Why our own fork server rather than `multiprocessing`'s forkserver context (which does the same with
`set_forkserver_preload`):
- the stdlib fork server is one per gateway process and inherits the gateway's `os.environ`; the
  template must import torch under the instance's environment (OMP_NUM_THREADS and the like are read
  once, when the native libraries load), and two pools may have different environments;
- if the stdlib fork server dies, every process it forked reads as exited (status 255) while it still
  runs and holds its port; here the pool then watches each instance through a pidfd instead;
- the stdlib child re-imports the parent's `__main__` and restores its `sys.argv`/`sys.path`, its
  atexit handler joins every child at the gateway's exit, and `Process.start()` blocks the event loop.

The template runs no thread of its own (a selector loop; SIGCHLD arrives through the signal wakeup
fd), and no lock is held when it forks; the one native thread its imports leave, OpenBLAS's worker
pool (numpy's import starts it), is stopped by OpenBLAS's own pthread_atfork handler and restarted in
the child on first use. So forking from it is safe; nothing in it runs torch operations. Protocol, over a SOCK_SEQPACKET socket pair whose other end the pool keeps:
- template -> pool, once: `{"ready": true, "preload_s": ..., "failed": [...]}` after the imports;
- pool -> template, per instance: `{"argv": [...], "env": {...}}` with two fds attached (SCM_RIGHTS):
  the instance's log file (opened for append) and one end of a per-instance stream socket pair;
- template -> pool, on that per-instance socket: the child's pid (8 bytes, signed, big-endian; -1 if
  the fork failed), then, when the template reaps it, its exit status as asyncio reports one
  (negative: killed by that signal); then the socket closes.
EOF on the control socket (the pool closed it, or the gateway died) ends the template; its children
keep running, as spawned instances do.

The child: a new session, stdin from /dev/null, stdout and stderr to the log, `os.environ` replaced by
the one sent, then the runtime's entry `kold.commands.runtime.main(argv)` (the arguments of
`kold runtime serve ...`) and a normal interpreter exit
with its status. Run as `python -m kold.gateway.fork_template --fd N`.
"""

from __future__ import annotations

import argparse
import array
import asyncio
import contextlib
import importlib
import json
import logging
import os
import selectors
import signal
import socket
import struct
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

log = logging.getLogger("kold.gateway.pool")

# What `kold runtime serve` imports before it serves (listed from a run's sys.modules): torch (its
# import thread and the loader then find it in sys.modules), the CLI and every command module its
# parser imports, the server and uvicorn's lazily imported parts, the loader and the restore.
PRELOAD: tuple[str, ...] = (
    "torch",
    "kold.cli",
    "kold.commands.demo",
    "kold.commands.model",
    "kold.commands.platform",
    "kold.commands.runtime",
    "kold.commands.snapshot",
    "kold.runtime.server",
    "kold.runtime.backend",
    "kold.runtime.engine",
    "kold.runtime.model",
    "kold.runtime.tokenizer",
    "kold.snapshot",
    "kold.snapshot.loading",
    "kold.snapshot.restorer",
    "uvicorn.lifespan.off",
    "uvicorn.loops.auto",
    "uvicorn.loops.uvloop",
    "uvicorn.protocols.http.auto",
    "uvicorn.protocols.http.httptools_impl",
)
MODULE = "kold.gateway.fork_template"  # what the pool runs with `python -m`
READY_TIMEOUT_S = 120.0  # the imports take ~2 s; a template this late is treated as broken
_PID = struct.Struct("!q")
_MAX_MESSAGE = 1 << 20
_FD_SIZE = array.array("i").itemsize


class TemplateError(RuntimeError):
    """The template could not start an instance (not running, died, or fork failed)."""


# -- the pool's side ---------------------------------------------------------------------------------


class ForkedProcess:
    """An instance forked by the template: the subset of `asyncio.subprocess.Process` the pool uses.

    The template is the parent (only it can reap the child), so the exit status comes over the
    per-instance socket; signals go through a pidfd (no pid-reuse race). If the template dies first,
    the socket ends without a status and the pidfd tells when the process exits; its status is then
    unknown and reads 255, as asyncio and multiprocessing report an unknown one.
    """

    def __init__(self, pid: int, status: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.pid = pid
        self.returncode: int | None = None
        self._status = status
        self._writer = writer
        self._pidfd: int | None = None
        with contextlib.suppress(OSError):
            self._pidfd = os.pidfd_open(pid)
        self._done = asyncio.Event()
        self._watcher = asyncio.get_running_loop().create_task(self._watch(), name=f"kold-forked-{pid}")

    async def _watch(self) -> None:
        try:
            code: int | None = _PID.unpack(await self._status.readexactly(_PID.size))[0]
        except (asyncio.IncompleteReadError, OSError):
            code = None
        finally:
            self._writer.close()
        if code is None:
            log.warning("forked instance pid %s: the template is gone; watching the process itself", self.pid)
            await self._wait_pidfd()
            code = 255
        self._set_exited(code)

    async def _wait_pidfd(self) -> None:
        if self._pidfd is None:  # no pidfd (not Linux >= 5.3): poll, the only way left
            while _alive(self.pid):
                await asyncio.sleep(0.2)
            return
        loop = asyncio.get_running_loop()
        exited: asyncio.Future[None] = loop.create_future()

        def readable() -> None:
            if not exited.done():
                exited.set_result(None)

        loop.add_reader(self._pidfd, readable)
        try:
            await exited
        finally:
            loop.remove_reader(self._pidfd)

    def _set_exited(self, code: int) -> None:
        self.returncode = code
        if self._pidfd is not None:
            os.close(self._pidfd)
            self._pidfd = None
        self._done.set()

    async def wait(self) -> int:
        await self._done.wait()
        assert self.returncode is not None
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.returncode is not None:
            raise ProcessLookupError(self.pid)
        if self._pidfd is not None:
            signal.pidfd_send_signal(self._pidfd, sig)
        else:
            os.kill(self.pid, sig)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class ForkTemplate:
    """The pool's handle on its template process: start it, fork instances from it, stop it."""

    def __init__(
        self,
        python: str,
        env: Mapping[str, str],
        log_path: str,
        *,
        on_exit: Callable[[int], object] | None = None,
    ) -> None:
        self.python = python
        self.env = dict(env)
        self.log_path = log_path
        self.on_exit = on_exit  # called if the template exits while in use (not by `close`)
        self.info: dict[str, Any] = {}  # the template's ready message: preload_s, failed imports
        self._control: socket.socket | None = None
        self._process: asyncio.subprocess.Process | None = None
        self._exit_watch: asyncio.Task[None] | None = None

    @property
    def alive(self) -> bool:
        return self._control is not None and self._process is not None and self._process.returncode is None

    @property
    def pid(self) -> int | None:
        return None if self._process is None else self._process.pid

    async def start(self, timeout_s: float = READY_TIMEOUT_S) -> None:
        """Start the template and wait until it has imported everything (TemplateError if it cannot)."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            with open(self.log_path, "ab") as out:
                self._process = await asyncio.create_subprocess_exec(
                    self.python,
                    "-m",
                    MODULE,
                    "--fd",
                    str(theirs.fileno()),
                    pass_fds=(theirs.fileno(),),
                    stdin=asyncio.subprocess.DEVNULL,
                    stdout=out,
                    stderr=asyncio.subprocess.STDOUT,
                    env=self.env,
                    start_new_session=True,  # no terminal signal reaches it; the pool ends it
                )
        except OSError as exc:
            ours.close()
            raise TemplateError(f"the template could not be started: {exc}") from exc
        finally:
            theirs.close()
        ours.setblocking(False)
        self._control = ours
        self._exit_watch = asyncio.get_running_loop().create_task(self._watch_exit(), name="kold-template-exit")
        try:
            raw = await asyncio.wait_for(asyncio.get_running_loop().sock_recv(ours, _MAX_MESSAGE), timeout_s)
            info = json.loads(raw) if raw else {}
            if not isinstance(info, dict) or not info.get("ready"):
                raise TemplateError(f"the template exited before it was ready (see {self.log_path})")
        except (TimeoutError, OSError, ValueError) as exc:
            await self.close()
            raise TemplateError(f"the template did not become ready: {exc!r} (see {self.log_path})") from exc
        except TemplateError:
            await self.close()
            raise
        self.info = info
        if info.get("failed"):
            log.warning("fork template: could not preload %s (instances import them themselves)", info["failed"])

    async def _watch_exit(self) -> None:
        assert self._process is not None
        code = await self._process.wait()
        if self._control is not None:  # not closed by us
            self._close_control()
            if self.on_exit is not None:
                self.on_exit(code)

    def _close_control(self) -> None:
        if self._control is not None:
            self._control.close()
            self._control = None

    async def fork(self, argv: Sequence[str], env: Mapping[str, str], log_fd: int) -> ForkedProcess:
        """Fork an instance running `kold <argv>` with `env`, its output appended to `log_fd`."""
        control = self._control
        if control is None or not self.alive:
            raise TemplateError("the template is not running")
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            message = json.dumps({"argv": list(argv), "env": dict(env)}).encode()
            fds = array.array("i", [log_fd, theirs.fileno()])
            try:
                # small and non-blocking: the template reads at once; a full buffer means it is stuck
                control.sendmsg([message], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds)])
            except OSError as exc:
                raise TemplateError(f"the template does not accept requests: {exc}") from exc
        finally:
            theirs.close()
        reader, writer = await asyncio.open_unix_connection(sock=ours)
        try:
            pid = _PID.unpack(await asyncio.wait_for(reader.readexactly(_PID.size), 30))[0]
        except (TimeoutError, asyncio.IncompleteReadError, OSError) as exc:
            writer.close()
            raise TemplateError(f"the template did not fork: {exc!r}") from exc
        if pid <= 0:
            writer.close()
            raise TemplateError("the template could not fork (see its log)")
        return ForkedProcess(pid, reader, writer)

    async def close(self, timeout_s: float = 5.0) -> None:
        """End the template (its EOF); instances it forked are not touched."""
        self._close_control()
        process = self._process
        if process is not None and process.returncode is None:
            try:
                await asyncio.wait_for(process.wait(), timeout_s)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    process.kill()
                await process.wait()
        if self._exit_watch is not None:
            await asyncio.gather(self._exit_watch, return_exceptions=True)


# -- the template's side --------------------------------------------------------------------------


@dataclass
class _Child:
    """What a freshly forked child runs (returned out of the template's loop, so its frames unwind)."""

    argv: list[str]
    env: dict[str, str]
    log_fd: int


def _preload(modules: Sequence[str]) -> tuple[float, list[str]]:
    started = time.perf_counter()
    failed = []
    for name in modules:
        try:
            importlib.import_module(name)
        except Exception as exc:  # the instance will import it itself and report the error there
            print(f"kold fork template: cannot preload {name}: {exc!r}", file=sys.stderr)
            failed.append(name)
    return time.perf_counter() - started, failed


def _serve(control: socket.socket) -> _Child | None:
    """The template's loop: fork on request, report pids and exit statuses. Returns in a child."""
    children: dict[int, socket.socket] = {}
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_r, False)
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda signum, frame: None)  # a handler, so the wakeup fd is written
    selector = selectors.DefaultSelector()
    selector.register(control, selectors.EVENT_READ)
    selector.register(wake_r, selectors.EVENT_READ)

    def reap() -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            sock = children.pop(pid, None)
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.sendall(_PID.pack(os.waitstatus_to_exitcode(status)))
                sock.close()

    while True:
        for key, _ in selector.select():
            if key.fileobj is not control:
                with contextlib.suppress(BlockingIOError):
                    while os.read(wake_r, 512):
                        pass
                reap()
                continue
            message, ancillary, _, _ = control.recvmsg(_MAX_MESSAGE, socket.CMSG_SPACE(2 * _FD_SIZE))
            fds = array.array("i")
            for level, kind, data in ancillary:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    fds.frombytes(data[: len(data) - len(data) % _FD_SIZE])
            if not message:  # the pool is gone: end; the children keep running
                return None
            if len(fds) != 2:
                for fd in fds:
                    os.close(fd)
                print("kold fork template: a request without its two fds, ignored", file=sys.stderr)
                continue
            log_fd, status_fd = fds
            status = socket.socket(fileno=status_fd)
            request = json.loads(message)
            sys.stdout.flush()
            sys.stderr.flush()
            try:
                pid = os.fork()
            except OSError as exc:
                print(f"kold fork template: fork failed: {exc}", file=sys.stderr)
                with contextlib.suppress(OSError):
                    status.sendall(_PID.pack(-1))
                status.close()
                os.close(log_fd)
                continue
            if pid == 0:  # the child: drop everything of the template's, then run the instance
                selector.close()
                control.close()
                signal.set_wakeup_fd(-1)
                signal.signal(signal.SIGCHLD, signal.SIG_DFL)
                os.close(wake_r)
                os.close(wake_w)
                for sock in children.values():
                    sock.close()
                status.close()
                return _Child(
                    [str(a) for a in request["argv"]], {str(k): str(v) for k, v in request["env"].items()}, log_fd
                )
            os.close(log_fd)
            try:
                status.sendall(_PID.pack(pid))
            except OSError:  # the pool gave up waiting: the instance runs unwatched; stop it
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)
            children[pid] = status


def _run_child(child: _Child, template_pid: int) -> int:
    """In the forked child: become the instance `python -m kold <argv>` would have been."""
    os.setsid()  # like start_new_session=True: a terminal's Ctrl-C is the gateway's to handle
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    os.dup2(child.log_fd, 1)
    os.dup2(child.log_fd, 2)
    os.close(child.log_fd)
    os.environ.clear()
    os.environ.update(child.env)
    # numpy seeded its global generator from OS entropy at import: give each instance its own
    numpy = sys.modules.get("numpy")
    if numpy is not None:
        numpy.random.seed()
    sys.argv = ["kold", *child.argv]
    print(
        f"--- kold: forked from the template (pid {template_pid}), torch and the runtime already imported", flush=True
    )
    from kold.commands.runtime import main

    return main(child.argv)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kold.gateway.fork_template")
    parser.add_argument("--fd", type=int, required=True, help="the control socket (SOCK_SEQPACKET) from the pool")
    args = parser.parse_args(argv)
    control = socket.socket(fileno=args.fd)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the gateway ends us by closing the control socket
    preload_s, failed = _preload(PRELOAD)
    try:
        control.send(json.dumps({"ready": True, "preload_s": round(preload_s, 3), "failed": failed}).encode())
    except OSError:
        return 0  # the pool is gone already
    template_pid = os.getpid()
    child = _serve(control)
    if child is None:
        return 0
    signal.signal(signal.SIGINT, signal.default_int_handler)
    return _run_child(child, template_pid)


if __name__ == "__main__":
    sys.exit(main())
