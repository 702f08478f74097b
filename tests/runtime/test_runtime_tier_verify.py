"""A corrupt shm cache tier is found after serving begins: the instance stops serving (503
`tier_corrupted`), quarantines the entry and exits non-zero; the next instance reads the store."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from pathlib import Path

import httpx
import pytest
from runtime_helpers import RuntimeProcess

from kold.runtime.backend import Backend, Loaded, snapshot_loader
from kold.runtime.lifecycle import State
from kold.runtime.server import Runtime, ServeOptions
from kold.snapshot import CacheTier, NodeCache, parse_snapshot_uri, prefetch
from kold.snapshot.verify import TierVerdict, TierVerifier

CORRUPT_BYTES = 4 << 20  # the repro overwrote 4 MB of the tier's copy
PROMPT = "Once upon a time"


def _overwrite(path: Path, nbytes: int) -> None:
    """Overwrite the first `nbytes` (at most the file) with 0xA5, as a stray writer would."""
    n = min(nbytes, path.stat().st_size)
    with open(path, "r+b") as f:
        f.write(b"\xa5" * n)


def _corrupt_shm_tier(uri: str, shm: Path) -> CacheTier:
    """Fill an shm tier at `shm` with the snapshot (verified on the way in), then overwrite 4 MB of it."""
    tier = CacheTier("shm", shm, 1 << 30)
    prefetch(uri, NodeCache([tier]))
    _overwrite(tier.data_path(parse_snapshot_uri(uri).snapshot_id), CORRUPT_BYTES)
    return tier


def _complete(base: str, model: str, max_tokens: int = 12) -> httpx.Response:
    body = {"model": model, "prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0}
    return httpx.post(f"{base}/v1/completions", json=body, timeout=60)


def test_a_corrupt_shm_tier_stops_the_instance_and_the_next_one_reads_the_store(
    tiny_snapshot: str, tmp_path: Path
) -> None:
    snapshot_id = parse_snapshot_uri(tiny_snapshot).snapshot_id
    # the reference: an instance restored from the store (no cache tiers)
    reference = RuntimeProcess(tiny_snapshot, tmp_path / "a", "--served-model-name", "tiny")
    started = [reference]
    try:
        reference.wait_listening()
        reference.wait_ready()
        expected = _complete(reference.base, "tiny")
        assert expected.status_code == 200, expected.text
        expected_text = expected.json()["choices"][0]["text"]
        reference.terminate()
        assert reference.wait() == 0

        tier = _corrupt_shm_tier(tiny_snapshot, tmp_path / "shm")
        env = {"KOLD_CACHE_SHM_DIR": str(tier.root), "KOLD_CACHE_SHM_BYTES": "1GiB"}
        termination = tmp_path / "corrupt.termination"
        corrupt = RuntimeProcess(
            tiny_snapshot, tmp_path / "b", "--served-model-name", "tiny", "--termination-log", str(termination),
            env=env,
        )  # fmt: skip
        started.append(corrupt)
        assert corrupt.wait(60) == 1, corrupt.output
        [startup] = corrupt.events("startup")
        assert startup["restore"]["source_tier"] == "shm"  # type: ignore[index]  # it served from the tier...
        assert startup["tier_verification"] == {"state": "pending", "tier": "shm"}
        [verdict] = corrupt.events("tier_verify")  # ...until the check found the overwritten chunk
        assert verdict["state"] == "corrupt" and verdict["tier"] == "shm" and verdict["chunk"] == 0
        assert verdict["quarantined"] is True
        cause = json.loads(termination.read_text())
        assert cause["code"] == "tier_corrupted" and "chunk 0 " in cause["error"] and snapshot_id in cause["error"]
        assert not (tier.entry_dir(snapshot_id) / "manifest.json").exists()  # quarantined

        fresh = RuntimeProcess(tiny_snapshot, tmp_path / "c", "--served-model-name", "tiny", env=env)
        started.append(fresh)
        fresh.wait_listening()
        fresh.wait_ready()
        ready = httpx.get(f"{fresh.base}/readyz", timeout=5).json()
        assert ready["cold_start"]["restore"]["source_tier"] == "store"
        assert ready["tier_verification"] == {"state": "verified", "tier": "store"}
        got = _complete(fresh.base, "tiny")
        assert got.status_code == 200 and got.json()["choices"][0]["text"] == expected_text
    finally:
        for process in started:
            process.kill()


class _HeldVerifier(TierVerifier):
    """The real check, held until the test has a request in flight (a tiny model's check takes
    milliseconds: without the hold it would end before any request arrives)."""

    def __init__(self, real: TierVerifier, release: threading.Event) -> None:
        super().__init__(real.manifest, real.buffer, real.trusted)
        self.release = release

    def run(self, stop: threading.Event | None = None, *, low_priority: bool = True) -> TierVerdict:
        self.release.wait(30)
        return super().run(stop, low_priority=False)


def test_requests_in_flight_and_new_ones_get_tier_corrupted(tiny_snapshot: str, tmp_path: Path) -> None:
    tier = _corrupt_shm_tier(tiny_snapshot, tmp_path / "shm")
    release = threading.Event()
    real = snapshot_loader(tiny_snapshot, max_batch=2, max_seq_len=512, cache=NodeCache([tier]))

    def loader(cancel: threading.Event, early: object = None) -> Loaded:
        loaded = real(cancel)
        assert loaded.verifier is not None and loaded.restore["source_tier"] == "shm"
        loaded.verifier = _HeldVerifier(loaded.verifier, release)
        return loaded

    termination = tmp_path / "termination"

    async def main() -> None:
        runtime = Runtime(ServeOptions(model_names=("tiny",), termination_log=str(termination)), loader)  # type: ignore[arg-type]
        runtime.on_listening(asyncio.get_running_loop(), "test")
        for _ in range(600):
            if runtime.lifecycle.ready:
                break
            await asyncio.sleep(0.05)
        assert runtime.lifecycle.ready
        transport = httpx.ASGITransport(app=runtime.app)
        try:
            async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=60) as client:
                ready = (await client.get("/readyz")).json()
                assert ready["tier_verification"] == {"state": "pending", "tier": "shm"}
                body = {"model": "tiny", "prompt": PROMPT, "max_tokens": 480, "ignore_eos": True, "temperature": 0}
                in_flight = asyncio.ensure_future(client.post("/v1/completions", json=body))
                backend: Backend | None = runtime.service.backend
                assert backend is not None
                deadline = time.monotonic() + 30
                while backend.stats().generated_tokens == 0 and time.monotonic() < deadline:
                    await asyncio.sleep(0.005)
                release.set()  # a request is generating from the corrupt weights: now the check runs
                answered = await in_flight
                assert answered.status_code == 503, answered.text
                assert answered.json()["error"]["code"] == "tier_corrupted"
                assert backend.stats().generated_tokens < 480  # cut off, not run to the end
                late = await client.post("/v1/completions", json=body)
                assert late.status_code == 503 and late.json()["error"]["code"] == "tier_corrupted"
                assert "chunk 0 " in late.json()["error"]["message"]
                readyz = await client.get("/readyz")
                assert readyz.status_code == 503 and readyz.json()["code"] == "tier_corrupted"
                assert readyz.json()["tier_verification"]["state"] == "corrupt"
                metrics = (await client.get("/metrics")).text
                assert "kold_tier_verified 0.0" in metrics
            assert runtime.exit_code == 1 and runtime.lifecycle.state in (State.FAILED, State.DRAINING)
            assert json.loads(termination.read_text())["code"] == "tier_corrupted"
        finally:
            release.set()
            runtime.finish()

    asyncio.run(main())


@pytest.mark.parametrize("mode", ["sync", "off"])
def test_sync_checks_before_serving_and_off_trusts_the_tier(tiny_snapshot: str, tmp_path: Path, mode: str) -> None:
    tier = _corrupt_shm_tier(tiny_snapshot, tmp_path / "shm")
    loaded = snapshot_loader(tiny_snapshot, cache=NodeCache([tier]), verify_tiers=mode)(threading.Event())
    try:
        assert loaded.verifier is None
        if mode == "sync":  # found before serving: read from the store instead
            assert loaded.restore["source_tier"] == "store" and loaded.restore["verified"]
        else:  # trusted: the corrupt bytes are served, as before this check existed
            assert loaded.restore["source_tier"] == "shm" and not loaded.restore["verified"]
    finally:
        loaded.backend.stop(0.0)


def test_a_clean_tier_is_verified_in_the_background(tiny_snapshot: str, tmp_path: Path) -> None:
    tier = CacheTier("shm", tmp_path / "shm", 1 << 30)
    prefetch(tiny_snapshot, NodeCache([tier]))
    loaded = snapshot_loader(tiny_snapshot, cache=NodeCache([tier]))(threading.Event())

    async def main() -> None:
        runtime = Runtime(ServeOptions(model_names=("tiny",)), lambda cancel, early=None: loaded)
        runtime.on_listening(asyncio.get_running_loop(), "test")
        for _ in range(400):
            if runtime.tier_verification is not None and runtime.tier_verification["state"] != "pending":
                break
            await asyncio.sleep(0.05)
        try:
            assert runtime.tier_verification is not None
            assert runtime.tier_verification["state"] == "verified" and runtime.lifecycle.ready
            transport = httpx.ASGITransport(app=runtime.app)
            async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
                assert "kold_tier_verified 1.0" in (await client.get("/metrics")).text
        finally:
            runtime.finish()

    asyncio.run(main())
