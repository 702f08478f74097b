"""What the gateway's end-to-end tests share: a gateway app served on a loopback port, the
environment its runtime instances get, and revisions written straight to the registry."""

from __future__ import annotations

import asyncio
import os
import socket
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import uvicorn

from kold.gateway.registry import Registry, RuntimeSpec, ScalingSpec

RUNTIME = {"max_batch": 4, "max_seq_len": 128}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def instance_env(tmp_path: Path) -> dict[str, str]:
    """Runtime instances restore from the store (cache tiers off) and use one torch thread."""
    return {
        **os.environ,
        "KOLD_HOME": str(tmp_path / "home"),
        "KOLD_CACHE_SHM_BYTES": "0",
        "KOLD_CACHE_DISK_BYTES": "0",
        "OMP_NUM_THREADS": "1",
    }


class Served:
    """A gateway app under uvicorn in a thread, on a free loopback port."""

    def __init__(self, app: Any) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning", lifespan="on")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=lambda: asyncio.run(self.server.serve()), daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            assert time.monotonic() < deadline, "gateway did not start"
            time.sleep(0.02)
        self.app = app
        self.http = httpx.Client(base_url=self.url, timeout=60, trust_env=False)

    def close(self) -> None:
        self.http.close()
        self.server.should_exit = True
        self.thread.join(30)


def deploy(registry: Registry, name: str, snapshot: str, **scaling: Any) -> str:
    """A revision written straight to the registry (no instance): the function starts cold."""
    rev = registry.create_revision(name, snapshot, scaling=ScalingSpec(**scaling), runtime=RuntimeSpec(**RUNTIME))
    registry.set_traffic(name, rev.revision_id)
    return rev.revision_id


def deploy_and_wait(s: Served, name: str, snapshot: str) -> str:
    """A revision deployed through the admin API (`wait`: answered once it serves); its id."""
    body = {"snapshot_uri": snapshot, "runtime": RUNTIME, "scaling": {"request_timeout_s": 60}, "wait": True}
    r = s.http.post(f"/admin/functions/{name}/revisions", json=body)
    assert r.status_code == 201, r.text
    revision: str = r.json()["revision"]
    return revision
