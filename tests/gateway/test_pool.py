"""The instance pool with real `kold runtime serve` processes on a tiny model, forked from the fork
template (the default) or spawned."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest

from kold.gateway import fork_template
from kold.gateway import pool as pool_module
from kold.gateway.pool import Instance, InstancePool, InstanceState

T = TypeVar("T")


@dataclass(frozen=True)
class Runtime:
    device: str = "cpu"
    max_batch: int = 2
    max_seq_len: int | None = 256


@dataclass(frozen=True)
class Revision:
    revision_id: str
    snapshot_uri: str
    runtime: Runtime = Runtime()
    function: str = "tiny"


@pytest.fixture
def make_pool(tmp_path: Path) -> Callable[..., InstancePool]:
    def make(**kwargs: Any) -> InstancePool:
        env = {
            **os.environ,
            "KOLD_HOME": str(tmp_path / "home"),
            "KOLD_CACHE_SHM_BYTES": "0",
            "KOLD_CACHE_DISK_BYTES": "0",
            "OMP_NUM_THREADS": "1",
        }
        return InstancePool(tmp_path / "logs", env=env, **kwargs)

    return make


def run_with(pool: InstancePool, body: Callable[[], Awaitable[T]]) -> T:
    """Run `body` in a fresh event loop; the pool is closed (every process stopped) at the end."""

    async def main() -> T:
        try:
            return await body()
        finally:
            await pool.close(drain_timeout_s=5)

    return asyncio.run(main())


async def model_id(http: httpx.AsyncClient, inst: Instance) -> str:
    return str((await http.get(f"{inst.url}/v1/models")).json()["data"][0]["id"])


FORKED = "forked from the template"


@pytest.mark.parametrize("method", ["fork-template", "spawn"])
def test_start_ready_serve_then_stop_drains_a_stream(
    make_pool: Callable[..., InstancePool], tiny_snapshot: str, method: str
) -> None:
    pool = make_pool(start_method=method)

    async def body() -> None:
        inst = await pool.start(Revision("tiny-r1", tiny_snapshot))
        assert inst.state is InstanceState.STARTING and inst.id == "tiny-r1-1"
        assert inst.start_method == method
        assert await pool.wait_ready(inst, 60), pool.read_log(inst)
        assert inst.state is InstanceState.READY and inst.ready_at is not None
        assert inst.cold_start is not None and inst.cold_start["event"] == "startup"
        assert inst.cold_start["state"] == "ready" and inst.cold_start["start_method"] == method
        assert (FORKED in pool.read_log(inst)) == (method == "fork-template")
        assert pool.instances() == [inst] and pool.instances("tiny-r1") == [inst] and pool.instances("x") == []
        async with httpx.AsyncClient(timeout=60, headers=pool.instance_headers) as http:
            assert (await http.get(f"{inst.url}/readyz")).status_code == 200
            model = await model_id(http, inst)
            r = await http.post(f"{inst.url}/v1/completions", json={"model": model, "prompt": "hi", "max_tokens": 3})
            assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1

            # a stream in flight when the instance is stopped is finished, then the runtime exits 0
            long = {"model": model, "prompt": "go", "max_tokens": 150, "ignore_eos": True, "stream": True}
            text, finish, done, stop = "", None, False, None
            async with http.stream("POST", f"{inst.url}/v1/completions", json=long) as response:
                assert response.status_code == 200
                async for line in response.aiter_lines():
                    if not line:
                        continue
                    if stop is None:
                        stop = asyncio.create_task(pool.stop(inst, drain_timeout_s=30))
                        await asyncio.sleep(0.05)
                        assert inst.state is InstanceState.DRAINING
                    if line == "data: [DONE]":
                        done = True
                        break
                    choice = json.loads(line.removeprefix("data: "))["choices"][0]
                    text += choice["text"]
                    finish = choice["finish_reason"] or finish
            assert stop is not None
            await stop
        assert done and finish == "length", pool.read_log(inst)
        assert inst.state is InstanceState.STOPPED and inst.exit_code == 0, pool.read_log(inst)
        assert '"event": "drain"' in pool.read_log(inst)

    run_with(pool, body)


@pytest.mark.parametrize("method", ["fork-template", "spawn"])
def test_two_instances_and_a_crash_noticed(
    make_pool: Callable[..., InstancePool], tiny_snapshot: str, method: str
) -> None:
    failed: list[Instance] = []
    pool = make_pool(on_failure=failed.append, start_method=method)

    async def body() -> None:
        rev = Revision("tiny-r2", tiny_snapshot)
        a, b = await pool.start(rev), await pool.start(rev)
        assert a.id != b.id and a.port != b.port and a.log_path != b.log_path
        assert a.start_method == b.start_method == method
        assert all(await asyncio.gather(pool.wait_ready(a, 60), pool.wait_ready(b, 60)))
        for inst in (a, b):
            assert '"event": "startup"' in pool.read_log(inst)
            assert inst.log_path.parent == pool.log_dir and inst.log_path.name == f"{inst.id}.log"
        assert pool.read_log(a, tail_lines=1).count("\n") <= 1

        assert a.process is not None
        os.kill(a.process.pid, signal.SIGKILL)
        for _ in range(250):
            if failed:
                break
            await asyncio.sleep(0.02)
        assert failed == [a] and a.state is InstanceState.FAILED and a.exit_code == -signal.SIGKILL
        assert b.state is InstanceState.READY  # the other one is untouched
        await pool.stop(a)  # stopping a dead instance is harmless and keeps it FAILED
        assert a.state is InstanceState.FAILED

    run_with(pool, body)
    assert all(i.state in (InstanceState.STOPPED, InstanceState.FAILED) for i in pool.instances())
    assert failed == [pool.instances()[0]]  # close() is no failure


def test_a_missing_snapshot_fails_with_the_reason_in_the_log(
    make_pool: Callable[..., InstancePool], tiny_snapshot: str
) -> None:
    failed: list[Instance] = []
    pool = make_pool(on_failure=failed.append)
    missing = tiny_snapshot.rsplit("/", 1)[0] + "/" + "0" * 32

    async def body() -> None:
        inst = await pool.start(Revision("bad-r1", missing))
        assert not await pool.wait_ready(inst, 60)
        assert inst.state is InstanceState.FAILED and inst.exit_code not in (None, 0)
        assert failed == [inst]
        assert '"state": "failed"' in pool.read_log(inst), pool.read_log(inst)

    run_with(pool, body)


def test_a_taken_port_is_retried_on_another(
    make_pool: Callable[..., InstancePool], tiny_snapshot: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    pool = make_pool()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        ports = [int(taken.getsockname()[1])]
        real = pool_module._free_port
        monkeypatch.setattr(pool_module, "_free_port", lambda host: ports.pop() if ports else real(host))

        async def body() -> None:
            inst = await pool.start(Revision("tiny-r3", tiny_snapshot))
            first = inst.port
            assert await pool.wait_ready(inst, 60), pool.read_log(inst)
            assert inst.port != first and inst.state is InstanceState.READY
            assert "address already in use" in pool.read_log(inst).lower()

        run_with(pool, body)


def test_ids_are_validated(make_pool: Callable[..., InstancePool]) -> None:
    pool = make_pool()
    with pytest.raises(ValueError, match="revision id"):
        asyncio.run(pool.start(Revision("../etc", "file:///nowhere/snapshots/x")))
    assert pool.instances() == []


def test_the_default_start_method(make_pool: Callable[..., InstancePool]) -> None:
    assert make_pool().start_method == "fork-template"  # python is this interpreter
    assert make_pool(python="/usr/bin/python3-elsewhere").start_method == "spawn"
    with pytest.raises(ValueError, match="start_method"):
        make_pool(start_method="vfork")


def test_a_forked_instance_skips_the_imports_and_says_so(
    make_pool: Callable[..., InstancePool], tiny_snapshot: str
) -> None:
    pool = make_pool()

    async def body() -> None:
        assert await pool.warm_template()
        template_ready = time.time()
        inst = await pool.start(Revision("tiny-r5", tiny_snapshot))
        assert await pool.wait_ready(inst, 60), pool.read_log(inst)
        assert inst.process is not None and inst.start_method == "fork-template"
        log = pool.read_log(inst)
        assert FORKED in log and '"event": "startup"' in log
        cold = inst.cold_start
        assert cold is not None
        # the breakdown counts from the fork, not from the template's start (/proc's 10 ms ticks aside)
        assert cold["process_start"] >= template_ready - 0.05
        assert 0 <= cold["imports_ms"] <= cold["ready_ms"]
        assert cold["phases_ms"]["torch_import"] >= 0  # torch was in sys.modules: nothing to wait for
        # the instance is its own session, not the template's nor ours
        assert os.getsid(inst.process.pid) == inst.process.pid

    run_with(pool, body)
    assert "kold fork template" not in (pool.log_dir / "fork-template.log").read_text()  # nothing failed


def test_a_template_that_cannot_start_falls_back_to_spawn(
    make_pool: Callable[..., InstancePool],
    tiny_snapshot: str,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setattr(fork_template, "MODULE", "kold.gateway.no_such_template")
    pool = make_pool(start_method="fork-template")

    async def body() -> None:
        rev = Revision("tiny-r6", tiny_snapshot)
        a, b = await pool.start(rev), await pool.start(rev)
        assert a.start_method == b.start_method == "spawn"
        assert all(await asyncio.gather(pool.wait_ready(a, 60), pool.wait_ready(b, 60)))
        assert FORKED not in pool.read_log(a)

    with caplog.at_level(logging.WARNING, logger="kold.gateway.pool"):
        run_with(pool, body)
    assert sum("fork template unusable" in r.getMessage() for r in caplog.records) == 1
    assert "no_such_template" in (pool.log_dir / "fork-template.log").read_text()


def test_when_the_template_dies_its_instances_live_on_and_new_ones_are_spawned(
    make_pool: Callable[..., InstancePool],
    tiny_snapshot: str,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    failed: list[Instance] = []
    monkeypatch.setattr(pool_module, "TEMPLATE_RETRY_S", 1.0)
    pool = make_pool(on_failure=failed.append)

    async def body() -> None:
        rev = Revision("tiny-r7", tiny_snapshot)
        a = await pool.start(rev)
        assert await pool.wait_ready(a, 60), pool.read_log(a)
        assert a.start_method == "fork-template"
        template = pool._template
        assert template is not None and template.pid is not None
        os.kill(template.pid, signal.SIGKILL)
        for _ in range(250):
            if not template.alive:
                break
            await asyncio.sleep(0.02)
        assert not template.alive

        b = await pool.start(rev)
        assert b.start_method == "spawn"
        assert await pool.wait_ready(b, 60), pool.read_log(b)
        async with httpx.AsyncClient(
            timeout=60, headers=pool.instance_headers
        ) as http:  # the orphaned instance still serves
            body = {"model": await model_id(http, a), "prompt": "hi", "max_tokens": 2}
            assert (await http.post(f"{a.url}/v1/completions", json=body)).status_code == 200
        assert a.state is InstanceState.READY and not failed

        await pool.stop(a, drain_timeout_s=30)  # signalled through its pidfd; its exit seen through it
        assert a.state is InstanceState.STOPPED and a.exit_code == 255  # its status went with the template
        assert '"event": "drain"' in pool.read_log(a)

        # after the back-off, the next instance starts a new template and is forked from it
        await asyncio.sleep(1.1)
        c = await pool.start(rev)
        assert c.start_method == "fork-template"
        assert await pool.wait_ready(c, 60), pool.read_log(c)
        assert pool._template is not None and pool._template.pid != template.pid
        assert FORKED in pool.read_log(c)

    with caplog.at_level(logging.WARNING, logger="kold.gateway.pool"):
        run_with(pool, body)
    assert not failed
    assert sum("fork template unusable" in r.getMessage() for r in caplog.records) == 1
    assert sum("fork template: restarted" in r.getMessage() for r in caplog.records) == 1
