"""Stand-ins for the gateway's collaborators in its scaling and recording tests: a pool whose
instances have no process (READY as soon as started, or never), and a timeline that is both the
gateway's monotonic clock and its wall clock, moved by the test."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kold.gateway.activator import Gateway
from kold.gateway.pool import Instance, InstancePool, InstanceState, RevisionLike

EPOCH = 1_700_000_000.0  # the wall clock at the timeline's 0
COLD_START = {
    "event": "startup",
    "state": "ready",
    "restore": {"source_tier": "disk", "bytes": 4096, "fetch_ms": 80.0, "total_ms": 120.0},
}


class Timeline:
    """`clock()` (the gateway's monotonic clock) reads `t`; `wall()` is EPOCH + t."""

    def __init__(self, t: float = 0.0) -> None:
        self.t = t

    def clock(self) -> float:
        return self.t

    def wall(self) -> float:
        return EPOCH + self.t


class FakePool(InstancePool):
    """Instances with no process. They become READY at once (with the runtime's cold-start report),
    except those of the functions in `stuck`, which never do, and, while `gate` is set to an unset
    event, only once it is set (a start that takes time on the test's timeline). `port`: where their
    requests go (a scripted upstream), 0 when nothing is sent to them."""

    def __init__(self, log_dir: Path, *, port: int = 0) -> None:
        super().__init__(log_dir, start_method="spawn")
        self.port = port
        self.stuck: set[str] = set()
        self.gate: asyncio.Event | None = None
        self.started: list[Instance] = []
        self._function: dict[str, str] = {}

    async def start(self, revision: RevisionLike) -> Instance:
        inst = Instance(
            id=f"{revision.revision_id}-{len(self.started) + 1}",
            revision_id=revision.revision_id,
            port=self.port,
            url=f"http://127.0.0.1:{self.port}",
            log_path=self.log_dir / "fake.log",
        )
        self._register(inst)
        self.started.append(inst)
        self._function[inst.id] = revision.function
        return inst

    async def wait_ready(
        self, inst: Instance, timeout_s: float, on_accepting: Callable[[Instance], None] | None = None
    ) -> bool:
        await asyncio.sleep(0)
        if self._function[inst.id] in self.stuck:
            await asyncio.sleep(timeout_s)
            return False
        if self.gate is not None:
            await self.gate.wait()
        inst.state = InstanceState.READY
        inst.ready_at = time.time()
        inst.cold_start = {**COLD_START, "start_method": "fork-template"}
        inst.start_method = "fork-template"
        return True

    async def stop(self, inst: Instance, drain_timeout_s: float = 30.0) -> None:
        if inst.state is not InstanceState.FAILED:
            inst.state = InstanceState.STOPPED

    def live(self, function: str) -> list[Instance]:
        return [
            i
            for i in self.started
            if self._function[i.id] == function and i.state in (InstanceState.STARTING, InstanceState.READY)
        ]


async def settle(gw: Gateway) -> None:
    """Let the gateway's background work (starts, stops, revision reads) run to its end."""
    for _ in range(50):
        pending: list[Any] = [t for t in gw._starts if not t.done()]
        if not pending:
            return
        await asyncio.wait(pending, timeout=5)
    raise AssertionError("the gateway's background work did not settle")
