"""The controller lease against the real redis-server: one holder at a time, handed over on release
or expiry, and a holder that lost it can neither extend nor release the new holder's."""

from __future__ import annotations

import time

import pytest
import redis

from kold.controller.lease import Lease, default_holder_id

pytestmark = pytest.mark.redis


def _pair(client: redis.Redis, prefix: str, ttl_s: float = 10.0) -> tuple[Lease, Lease]:
    key = f"{prefix}controller:lease"
    return Lease(client, key, "a", ttl_s), Lease(client, key, "b", ttl_s)


def test_one_holder_at_a_time_the_other_waits(redis_client: redis.Redis, redis_prefix: str) -> None:
    a, b = _pair(redis_client, redis_prefix)
    assert a.try_acquire(100.0)
    assert not b.try_acquire(100.0)
    assert a.held(100.0) and not b.held(100.0)
    assert a.try_acquire(101.0), "the holder's try_acquire extends its lease"
    assert not b.try_acquire(101.0) and a.holder() == b.holder() == "a"
    assert 9_000 < redis_client.pttl(a.key) <= 10_000


def test_release_hands_over_at_once(redis_client: redis.Redis, redis_prefix: str) -> None:
    a, b = _pair(redis_client, redis_prefix)
    assert a.try_acquire(0.0)
    a.release()
    assert not a.held(0.0)
    assert b.try_acquire(0.0) and b.holder() == "b"


def test_expiry_hands_over_and_the_old_holder_stops_acting(redis_client: redis.Redis, redis_prefix: str) -> None:
    a, b = _pair(redis_client, redis_prefix, ttl_s=0.2)
    start = time.time()
    assert a.try_acquire(start)
    assert not b.try_acquire(time.time())
    time.sleep(0.3)  # `a` stalled past its ttl: Redis let the key go
    now = time.time()
    assert not a.held(now), "by its own clock the stalled holder knows it may no longer act"
    assert b.try_acquire(now)
    assert not a.renew(now) and not a.held(now), "the old holder cannot extend the new holder's lease"
    a.release()
    assert b.holder() == "b", "nor release it"
    assert not a.try_acquire(now) and b.renew(now)


def test_a_lease_taken_away_is_noticed_at_the_next_renew(redis_client: redis.Redis, redis_prefix: str) -> None:
    a, b = _pair(redis_client, redis_prefix)
    assert a.try_acquire(0.0)
    redis_client.delete(a.key)  # e.g. a Redis restart that kept no data
    assert b.try_acquire(1.0)
    assert not a.try_acquire(1.0) and not a.held(1.0)


def test_a_restarted_holder_with_the_same_id_takes_its_lease_back(redis_client: redis.Redis, redis_prefix: str) -> None:
    first, _ = _pair(redis_client, redis_prefix)
    assert first.try_acquire(0.0)
    again = Lease(redis_client, first.key, "a", 10.0)
    assert again.try_acquire(0.0) and again.held(5.0)


def test_bad_arguments_are_refused(redis_client: redis.Redis) -> None:
    with pytest.raises(ValueError, match="ttl_s must be > 0"):
        Lease(redis_client, "k", "a", 0)
    with pytest.raises(ValueError, match="needs a key and a holder id"):
        Lease(redis_client, "k", "", 1)
    assert default_holder_id() != default_holder_id()
