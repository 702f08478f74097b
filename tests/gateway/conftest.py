"""Fixtures of the gateway tests: a tiny model's snapshot, and a registry on the real redis-server
under a fresh key prefix that is removed afterwards."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest

from kold.gateway.registry import Registry


@pytest.fixture(scope="session")
def tiny_snapshot(tmp_path_factory: pytest.TempPathFactory) -> str:
    from kold.modelgen import write_random_model
    from kold.snapshot import build_snapshot

    root = tmp_path_factory.mktemp("gw-model")
    model_dir = write_random_model(root / "tiny", "llama", "tiny", seed=3)
    return build_snapshot(model_dir, (root / "store").as_uri(), chunk_size=64 << 10).uri


@pytest.fixture
def registry() -> Iterator[Registry]:
    redis = pytest.importorskip("redis")
    client = redis.Redis(host="127.0.0.1", port=6379, socket_connect_timeout=1)
    try:
        client.ping()
    except redis.exceptions.RedisError as exc:
        pytest.skip(f"no redis-server on 127.0.0.1:6379 ({exc})")
    registry = Registry(client, prefix=f"kold-gw-test-{uuid.uuid4().hex}:")
    yield registry
    keys = list(client.scan_iter(match=registry.prefix + "*", count=1000))
    if keys:
        client.delete(*keys)
    client.close()
