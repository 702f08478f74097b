"""Fixtures of the controller tests: a client of the session's real redis-server (`redis_url`,
tests/conftest.py) and a fresh key prefix per test whose keys are removed afterwards, so tests that
share the server never see each other's functions."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest
import redis


@pytest.fixture
def redis_client(redis_url: str) -> Iterator[redis.Redis]:
    """A client that returns bytes (the gateway's and the controller's default)."""
    client = redis.Redis.from_url(redis_url, socket_connect_timeout=1)
    yield client
    client.close()


@pytest.fixture
def redis_prefix(redis_client: redis.Redis) -> Iterator[str]:
    """A key prefix of this test's own; every key under it is removed afterwards."""
    prefix = f"kold-ctl-test-{uuid.uuid4().hex}:"
    yield prefix
    keys = list(redis_client.scan_iter(match=prefix + "*", count=1000))
    if keys:
        redis_client.delete(*keys)
