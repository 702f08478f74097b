"""Small helpers the benchmarks share (each benchmark runs as a script from this folder)."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path


def log(msg: str) -> None:
    """A timestamped progress line, flushed at once (benchmarks run for minutes)."""
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def huge_tmpfs(path: Path, size: int, log: Callable[[str], None]) -> Iterator[Path | None]:
    """Mount a tmpfs with transparent huge pages (huge=within_size) for the duration, when allowed.

    A node that serves models from the shm tier should give it such a mount: 2 MiB pages make the
    mapping ~500x fewer page-table entries. Mounting needs root; elsewhere this yields None.
    """
    path.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"huge=within_size,size={size + (1 << 30)}", "kold-bench-huge", str(path)],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    if mounted.returncode != 0:
        log(f"no huge-page tmpfs at {path}: {mounted.stderr.strip() or 'mount failed'}")
        yield None
        return
    try:
        yield path
    finally:
        subprocess.run(["umount", str(path)], capture_output=True, check=False)


@contextlib.contextmanager
def host_pool(path: Path, size: int, log: Callable[[str], None]) -> Iterator[Path]:
    """The node's host pool with one segment for the model, filled untimed (`kold snapshot pool fill`),
    on a huge-page tmpfs when one can be mounted (root), else in /dev/shm; removed afterwards."""
    from kold.snapshot import HostPool

    with huge_tmpfs(path, size, log) as mounted:
        directory = mounted or Path("/dev/shm") / f"kold-bench-pool-{os.getpid()}"
        pool = HostPool(directory)
        t0 = time.perf_counter()
        pool.fill(1, size)
        log(f"host pool: one {size / 1e9:.2f} GB segment in {directory} "
            f"({'2 MiB' if pool.huge_pages else '4 KiB'} pages), faulted in in {time.perf_counter() - t0:.1f} s")  # fmt: skip
        try:
            yield directory
        finally:
            pool.clear()
            if mounted is None:
                shutil.rmtree(directory, ignore_errors=True)
