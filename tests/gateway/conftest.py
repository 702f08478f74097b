"""Fixtures of the gateway tests: a tiny model's snapshot, a registry on the session's real
redis-server (`redis_url`, tests/conftest.py) under a fresh key prefix that is removed afterwards,
and gateway apps served on loopback."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis
from gateway_helpers import Served, instance_env

from kold.gateway.registry import Registry


@pytest.fixture(scope="session")
def tiny_snapshot(tmp_path_factory: pytest.TempPathFactory) -> str:
    from kold.modelgen import write_random_model
    from kold.snapshot import build_snapshot

    root = tmp_path_factory.mktemp("gw-model")
    model_dir = write_random_model(root / "tiny", "llama", "tiny", seed=3)
    return build_snapshot(model_dir, (root / "store").as_uri(), chunk_size=64 << 10).uri


@pytest.fixture
def registry(redis_url: str) -> Iterator[Registry]:
    client = redis.Redis.from_url(redis_url, socket_connect_timeout=1)
    registry = Registry(client, prefix=f"kold-gw-test-{uuid.uuid4().hex}:")
    yield registry
    keys = list(client.scan_iter(match=registry.prefix + "*", count=1000))
    if keys:
        client.delete(*keys)
    client.close()


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[Callable[..., Served]]:
    """`serve(registry, require_keys=False)`: a gateway app over `registry` under uvicorn on loopback,
    its instances logging under tmp_path; all of them closed at the end."""
    from kold.gateway.app import build_app
    from kold.gateway.pool import InstancePool

    started: list[Served] = []

    def make(registry: Registry, *, require_keys: bool = False) -> Served:
        pool = InstancePool(tmp_path / "logs", env=instance_env(tmp_path))
        s = Served(build_app(registry, pool, require_keys=require_keys))
        started.append(s)
        return s

    yield make
    for s in started:
        s.close()
