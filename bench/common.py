"""Small helpers the benchmarks share (each benchmark runs as a script from this folder)."""

from __future__ import annotations

import socket
import time


def log(msg: str) -> None:
    """A timestamped progress line, flushed at once (benchmarks run for minutes)."""
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
