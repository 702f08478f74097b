"""Helpers of the runtime tests: a fake backend and the runtime's app over it for in-process HTTP
tests, and `kold runtime serve` subprocesses on loopback."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from kold.runtime.backend import Backend, EngineStats, Loaded, Sampling
from kold.runtime.server import Runtime, ServeOptions

# -- a fake backend: words are tokens, generation counts up --------------------------------------


@dataclass(frozen=True)
class FakeEvent:
    token_id: int | None
    text_delta: str
    finish_reason: str | None = None
    error: str | None = None
    logprob: float | None = None
    top_logprobs: tuple[tuple[int, float], ...] = ()


def fake_logprob(i: int) -> float:
    """The fake model's log-probability of its i-th token (its top alternatives: the same minus 1, 2, ...)."""
    return -0.25 * (i + 1)


class FakeGeneration:
    def __init__(self, backend: FakeBackend, prompt_ids: list[int], sampling: Sampling, request_id: str) -> None:
        self.backend = backend
        self.prompt_ids = prompt_ids
        self.sampling = sampling
        self.request_id = request_id
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True
        self.backend.cancelled += 1

    async def __aiter__(self) -> AsyncIterator[FakeEvent]:
        self.backend.running += 1
        try:
            n = self.sampling.max_tokens
            k = self.sampling.logprobs
            for i in range(n):
                await asyncio.sleep(self.backend.token_delay)
                if self.cancelled:
                    return
                self.backend.generated_tokens += 1
                lp = fake_logprob(i) if k is not None else None
                top = tuple((100 + i + j, fake_logprob(i) - j) for j in range(k or 0))
                yield FakeEvent(100 + i, f" t{i}", "length" if i == n - 1 else None, logprob=lp, top_logprobs=top)
        finally:
            self.backend.running -= 1


class FakeBackend:
    """Tokens are whitespace-separated words (ids by hash), generations are ' t0 t1 ...'."""

    def __init__(self, max_seq_len: int = 64, token_delay: float = 0.0) -> None:
        self.max_seq_len = max_seq_len
        self.token_delay = token_delay
        self.generations: list[FakeGeneration] = []
        self.cancelled = 0
        self.running = 0
        self.generated_tokens = 0
        self.stopped = False

    def encode(self, text: str, *, special: bool) -> list[int]:
        return ([1] if special else []) + [3 + (sum(map(ord, w)) % 500) for w in text.split()]

    def decode(self, ids: Sequence[int]) -> str:
        return " ".join(f"w{i}" for i in ids)

    def token_bytes(self, token_id: int) -> bytes:
        return f" t{token_id - 100}".encode()  # generations count up from id 100: ' t0 t1 ...'

    tool_family = None  # tool calls are read the default (Qwen/Hermes) way

    def chat_prompt(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None) -> str:
        return " ".join(f"<{m['role']}> {m.get('content') or ''}" for m in messages) + " <assistant>"

    def generate(self, prompt_ids: list[int], sampling: Sampling, request_id: str = "") -> FakeGeneration:
        gen = FakeGeneration(self, prompt_ids, sampling, request_id)
        self.generations.append(gen)
        return gen

    def pending(self) -> int:
        return 0

    def stats(self) -> EngineStats:
        return EngineStats(0, self.running, self.generated_tokens, 0)

    def stop(self, drain_timeout: float) -> None:
        self.stopped = True


class ControlledLoader:
    """A loader that waits for `release` (or fails when told to); with `serve_early` set, it hands
    its backend over early once that event is set, as a restore that computes behind itself does."""

    def __init__(self, backend: FakeBackend) -> None:
        self.backend = backend
        self.release = threading.Event()
        self.serve_early: threading.Event | None = None
        self.fail: str | None = None

    def __call__(self, cancel: threading.Event, early: Callable[[Backend], None] | None = None) -> Loaded:
        if self.serve_early is not None and early is not None:
            self.serve_early.wait(10)
            early(self.backend)
        self.release.wait(10)
        if self.fail:
            raise RuntimeError(self.fail)
        return Loaded(
            self.backend,
            restore={"snapshot_id": "fake", "source_tier": "store", "data_bytes": 10, "fetch_s": 0.01, "total_s": 0.02},
            phases={"restore": 0.02, "model": 0.001},
        )


# -- the runtime's app in process, over a fake backend ------------------------------------------------


@asynccontextmanager
async def app_client(
    backend: FakeBackend | None = None, *, release: bool = True, early: bool = False, **options: Any
) -> AsyncIterator[tuple[httpx.AsyncClient, Runtime, ControlledLoader]]:
    loader = ControlledLoader(backend or FakeBackend())
    if early:  # the loader hands its backend over before the load ends, once told to
        loader.serve_early = threading.Event()
    runtime = Runtime(ServeOptions(model_names=("fake", "alias"), **options), loader)
    runtime.on_listening(asyncio.get_running_loop(), "test")
    if release:
        loader.release.set()
        for _ in range(200):
            if runtime.lifecycle.ready:
                break
            await asyncio.sleep(0.01)
    transport = httpx.ASGITransport(app=runtime.app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        yield client, runtime, loader
    loader.release.set()


def run(coro: Callable[[], Any]) -> None:
    asyncio.run(coro())


def parse_sse(text: str) -> list[Any]:
    events = [block for block in text.split("\n\n") if block]
    assert all(e.startswith("data: ") for e in events), text
    assert events[-1] == "data: [DONE]"
    return [json.loads(e.removeprefix("data: ")) for e in events[:-1]]


# -- runtime subprocesses ---------------------------------------------------------------------------

# a test-only sitecustomize that holds back the restore of the runtime processes it reaches
RESTORE_DELAY_HOOK = Path(__file__).resolve().parents[1] / "restore_delay"


def restore_delay_env(seconds: float) -> dict[str, str]:
    """Environment for runtime processes whose restore waits `seconds` first (tests only: the hook is
    tests/restore_delay/sitecustomize.py, never on a production path)."""
    path = os.pathsep.join(p for p in (str(RESTORE_DELAY_HOOK), os.environ.get("PYTHONPATH", "")) if p)
    return {"PYTHONPATH": path, "KOLDTEST_RESTORE_DELAY_S": str(seconds)}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RuntimeProcess:
    """`python -m kold runtime serve` on loopback, its stderr collected by a thread."""

    def __init__(self, uri: str, tmp: Path, *args: str, env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        full_env = {
            **os.environ,
            "KOLD_HOME": str(tmp / "home"),
            "KOLD_CACHE_SHM_BYTES": "0",
            "KOLD_CACHE_DISK_BYTES": "0",
            "PYTHONUNBUFFERED": "1",
            # one intra-op thread: on a small shared machine, OpenMP's spinning workers make decode
            # steps of a tiny model intermittently ~20x slower when another process wants the cores
            "OMP_NUM_THREADS": "1",
            **(env or {}),
        }
        full_env.pop("PORT", None)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "kold", "runtime", "serve", "--snapshot", uri, "--port", str(self.port), *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=full_env,
        )
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    @property
    def output(self) -> str:
        return "\n".join(self.lines)

    def events(self, name: str) -> list[dict[str, object]]:
        out = []
        for line in self.lines:
            if line.startswith("{"):
                try:
                    data = json.loads(line)
                except ValueError:
                    continue
                if data.get("event") == name:
                    out.append(data)
        return out

    def wait_listening(self, timeout: float = 30.0) -> float:
        """Poll /healthz until it answers; the seconds it took."""
        started = time.monotonic()
        while time.monotonic() - started < timeout:
            if self.proc.poll() is not None:
                raise AssertionError(f"the runtime exited with {self.proc.returncode}:\n{self.output}")
            try:
                if httpx.get(f"{self.base}/healthz", timeout=1).status_code == 200:
                    return time.monotonic() - started
            except httpx.TransportError:
                pass
            time.sleep(0.02)
        raise AssertionError(f"the runtime did not listen within {timeout}s:\n{self.output}")

    def wait_ready(self, timeout: float = 60.0) -> None:
        started = time.monotonic()
        while time.monotonic() - started < timeout:
            if self.proc.poll() is not None:
                raise AssertionError(f"the runtime exited with {self.proc.returncode}:\n{self.output}")
            if httpx.get(f"{self.base}/readyz", timeout=2).status_code == 200:
                return
            time.sleep(0.05)
        raise AssertionError(f"the runtime was not ready within {timeout}s:\n{self.output}")

    def terminate(self) -> None:
        self.proc.send_signal(signal.SIGTERM)

    def wait(self, timeout: float = 30.0) -> int:
        code = self.proc.wait(timeout)
        self._reader.join(5)
        return code

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
