"""What an instance tells the platform about itself: its Prometheus metrics, the `x-request-id` of
each request (response header and log lines), and the cold-start breakdown in its `/readyz` answer,
which the gateway's instance pool takes from there (not from the instance's log)."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from runtime_helpers import FakeBackend, RuntimeProcess, app_client, run

pytestmark = pytest.mark.timeout(180)


def samples(text: str) -> dict[str, float]:
    """`/metrics` as {series: value} (comment lines left out)."""
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


# -- metrics ----------------------------------------------------------------------------------------


def test_metrics_have_no_created_series_and_count_generated_tokens_once() -> None:
    async def main() -> None:
        async with app_client() as (client, _, _):
            for n in (3, 4):
                r = await client.post("/v1/completions", json={"model": "fake", "prompt": "a b", "max_tokens": n})
                assert r.status_code == 200, r.text
            text = (await client.get("/metrics")).text
            series = samples(text)
            assert not [s for s in series if "_created" in s], text
            assert series["kold_engine_generated_tokens_total"] == 7
            assert "# TYPE kold_engine_generated_tokens_total counter" in text
            # the duplicate counter and the tokens-per-second gauge are gone: a counter is rate()d
            assert not [s for s in series if s.startswith(("kold_generated_tokens", "kold_tokens_per_second"))]
            assert series['kold_requests_total{endpoint="completions",status="200"}'] == 2

    run(main)


# -- x-request-id -----------------------------------------------------------------------------------


def request_lines(caplog: pytest.LogCaptureFixture) -> list[dict[str, Any]]:
    out = []
    for record in caplog.records:
        if record.name == "kold.runtime.events" and record.getMessage().startswith('{"event": "request"'):
            line = json.loads(record.getMessage())
            assert getattr(record, "request_id", None) == line["request_id"]  # the record carries it too
            out.append(line)
    return out


def test_the_request_id_is_taken_or_made_returned_and_logged(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="kold.runtime.events")

    async def main() -> None:
        backend = FakeBackend()
        async with app_client(backend) as (client, _, _):
            body = {"model": "fake", "prompt": "a b", "max_tokens": 2}
            r = await client.post("/v1/completions", json=body, headers={"x-request-id": "gw-abc-123"})
            assert r.status_code == 200 and r.headers["x-request-id"] == "gw-abc-123"
            assert backend.generations[-1].request_id == "gw-abc-123#0"  # the engine's log lines name it too

            r = await client.post("/v1/chat/completions", json={**body, "messages": [{"role": "user", "content": "x"}]})
            made = r.headers["x-request-id"]
            assert r.status_code == 200 and re.fullmatch(r"[0-9a-f]{32}", made)

            # an id that is not a short plain token is replaced, never echoed into the logs
            r = await client.post("/v1/completions", json=body, headers={"x-request-id": "x" * 200})
            replaced = r.headers["x-request-id"]
            assert re.fullmatch(r"[0-9a-f]{32}", replaced)
            r = await client.post("/v1/completions", json=body, headers={"x-request-id": 'a"b'})
            assert re.fullmatch(r"[0-9a-f]{32}", r.headers["x-request-id"])
            also_replaced = r.headers["x-request-id"]

            r = await client.post(
                "/v1/completions", json={**body, "stream": True, "max_tokens": 3}, headers={"x-request-id": "s-1"}
            )
            assert r.status_code == 200 and r.headers["x-request-id"] == "s-1"
            r = await client.post(
                "/v1/completions", json={**body, "max_tokens": "x"}, headers={"x-request-id": "bad-1"}
            )
            assert r.status_code == 400 and r.headers["x-request-id"] == "bad-1"
            r = await client.get("/healthz", headers={"x-request-id": "probe-1"})
            assert r.headers["x-request-id"] == "probe-1"
            await asyncio.sleep(0.05)  # a stream's line is logged once its response has ended

            lines = {line["request_id"]: line for line in request_lines(caplog)}
            assert set(lines) == {"gw-abc-123", made, replaced, also_replaced, "s-1", "bad-1"}
            assert lines["gw-abc-123"]["status"] == "200" and lines["gw-abc-123"]["completion_tokens"] == 2
            assert lines[made]["endpoint"] == "chat"
            assert lines["s-1"]["completion_tokens"] == 3 and lines["s-1"]["ttft_ms"] is not None
            assert lines["bad-1"]["status"] == "400"

    run(main)


# -- /readyz carries the cold-start breakdown --------------------------------------------------------


def test_readyz_carries_the_cold_start_breakdown_once_ready() -> None:
    async def main() -> None:
        async with app_client(release=False) as (client, runtime, loader):
            r = await client.get("/readyz")
            assert r.status_code == 503 and "cold_start" not in r.json()
            loader.release.set()
            while not runtime.lifecycle.ready:
                await asyncio.sleep(0.01)
            body = (await client.get("/readyz")).json()
            cold = body["cold_start"]
            assert body["status"] == "ready" and cold["event"] == "startup" and cold["state"] == "ready"
            assert cold["ready_ms"] >= cold["listening_ms"] >= 0
            assert cold["phases_ms"] == {"restore": 20.0, "model": 1.0}
            assert cold["restore"]["source_tier"] == "store" and cold["restore"]["fetch_ms"] == 10.0

    run(main)


def test_a_real_instance_answers_with_ids_breakdown_and_clean_metrics(start_runtime: Any) -> None:
    # the old test-only knob is no setting any more: a production process does not wait for it
    rt: RuntimeProcess = start_runtime(env={"KOLD_RUNTIME_TEST_RESTORE_DELAY_S": "600"})
    rt.wait_listening()
    rt.wait_ready(timeout=60)
    ready = httpx.get(f"{rt.base}/readyz").json()
    startup = rt.events("startup")
    assert len(startup) == 1 and ready["cold_start"] == startup[0]  # the same object as the log line
    model = httpx.get(f"{rt.base}/v1/models").json()["data"][0]["id"]
    r = httpx.post(
        f"{rt.base}/v1/completions",
        json={"model": model, "prompt": "Hi", "max_tokens": 3, "stream": True},
        headers={"x-request-id": "from-the-gateway"},
        timeout=60,
    )
    assert r.status_code == 200 and r.headers["x-request-id"] == "from-the-gateway"
    deadline = time.monotonic() + 5  # the log lines reach the test through the process's stdout, a little later
    while not (rt.events("first_token") and rt.events("request")) and time.monotonic() < deadline:
        time.sleep(0.02)
    first = rt.events("first_token")
    assert len(first) == 1 and first[0]["request_id"] == "from-the-gateway"
    (line,) = rt.events("request")
    assert line["request_id"] == "from-the-gateway" and line["status"] == "200"
    assert line["completion_tokens"] == 3
    text = httpx.get(f"{rt.base}/metrics").text
    assert "_created" not in text and samples(text)["kold_engine_generated_tokens_total"] == 3


def test_the_pool_takes_the_breakdown_from_readyz_not_from_the_log(tiny_snapshot: str, tmp_path: Path) -> None:
    """The instance's log file is gone (unlinked as the instance starts): its "startup" line is
    written where nobody reads it, and the pool still has the breakdown, with how it started."""
    import os
    from dataclasses import dataclass

    from kold.gateway.pool import InstancePool, InstanceState

    @dataclass(frozen=True)
    class Spec:
        device: str = "cpu"
        max_batch: int = 2
        max_seq_len: int | None = 128

    @dataclass(frozen=True)
    class Revision:
        revision_id: str
        snapshot_uri: str
        runtime: Spec = Spec()
        function: str = "tiny"

    env = {
        **os.environ,
        "KOLD_HOME": str(tmp_path / "home"),
        "KOLD_CACHE_SHM_BYTES": "0",
        "KOLD_CACHE_DISK_BYTES": "0",
        "OMP_NUM_THREADS": "1",
    }
    pool = InstancePool(tmp_path / "logs", env=env, start_method="spawn")

    async def main() -> None:
        try:
            inst = await pool.start(Revision("tiny-r1", tiny_snapshot))
            inst.log_path.unlink()
            assert await pool.wait_ready(inst, 60)
            assert inst.state is InstanceState.READY and not inst.log_path.exists()
            cold = inst.cold_start
            assert cold is not None and cold["event"] == "startup" and cold["start_method"] == "spawn"
            assert cold["ready_ms"] > 0 and "restore" in cold["phases_ms"]
        finally:
            await pool.close(drain_timeout_s=5)

    asyncio.run(main())
