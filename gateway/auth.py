"""API-key authentication for the gateway: Bearer keys checked against the registry, with short caches.

Redis is asked at most every KEYS_CACHE_S per key (and for "are there keys at all"), so the data path
does not pay a round trip per request. While Redis is unreachable (`gateway.registry_down`) checks do
not wait for it: a key verified within VERIFIED_GRACE_S keeps working, anything else gets 503. The
clock is injected so that the expiry rules are tested without sleeping.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import time
from collections.abc import Callable
from typing import Protocol

from redis.exceptions import RedisError

from kold.gateway.activator import RegistryUnavailableError
from kold.gateway.errors import AuthenticationError
from kold.gateway.registry import Registry

# How long the answers "are there keys" and "this key is valid" are reused before Redis is asked
# again: a revoked key stops working within this time.
KEYS_CACHE_S = 1.5
# How long after its last successful check a key keeps working while Redis is unreachable. Revoking
# a key takes effect at the next check that reaches Redis.
VERIFIED_GRACE_S = 300.0
# Bound on the digests remembered: each distinct valid key costs one entry; past this the oldest go
# (they are simply checked against Redis again).
MAX_VERIFIED = 10_000


class RegistryHealth(Protocol):
    """What auth needs of the gateway: whether Redis is known to be away, and a way to report it."""

    registry_down: bool

    def redis_unreachable(self, exc: Exception) -> None: ...


class KeyAuth:
    """Checks `Authorization: Bearer <key>`. `require_keys`: demand a key even before any exists
    (a gateway bound beyond loopback); otherwise keys are demanded once one has been created."""

    def __init__(
        self,
        registry: Registry,
        health: RegistryHealth,
        *,
        require_keys: bool,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.registry = registry
        self.health = health
        self.require_keys = require_keys
        self.clock = clock
        self._has_keys_until = 0.0  # 0.0: never read
        self._has_keys = False
        self._verified: dict[str, float] = {}  # sha256 of a key -> when Redis last said it is valid

    def keys_changed(self) -> None:
        """A key was created or revoked here: ask Redis again, and forget every verified key at once
        (they are kept by digest, not id, so the revoked one cannot be picked out)."""
        self._has_keys_until = 0.0
        self._verified.clear()

    async def _keys_exist(self) -> bool:
        if self.require_keys:
            return True
        now = self.clock()
        if now >= self._has_keys_until and not (self.health.registry_down and self._has_keys_until):
            try:
                self._has_keys = await asyncio.to_thread(self.registry.has_keys)
                self._has_keys_until = self.clock() + KEYS_CACHE_S
            except RedisError as exc:
                self.health.redis_unreachable(exc)
                if not self._has_keys_until:
                    raise RegistryUnavailableError("the key registry (Redis) is unreachable") from None
        return self._has_keys

    def _verified_within(self, digest: str, window_s: float) -> bool:
        return self.clock() - self._verified.get(digest, float("-inf")) < window_s

    async def check(self, authorization: str | None) -> None:
        """Return if the request may pass; raise AuthenticationError (401) or RegistryUnavailableError."""
        if not await self._keys_exist():
            return
        header = authorization or ""
        scheme, _, secret = header.partition(" ")
        secret = secret.strip()
        if not header or not hmac.compare_digest(scheme.lower(), "bearer") or not secret:
            raise AuthenticationError("missing API key: send 'Authorization: Bearer <key>'")
        digest = hashlib.sha256(secret.encode()).hexdigest()
        if self._verified_within(digest, KEYS_CACHE_S):
            return  # checked against Redis moments ago: a revocation takes effect within KEYS_CACHE_S
        if not self.health.registry_down:
            try:
                ok = await asyncio.to_thread(self.registry.verify_key, secret)
            except RedisError as exc:
                self.health.redis_unreachable(exc)
            else:
                if not ok:
                    self._verified.pop(digest, None)
                    raise AuthenticationError("invalid API key")
                self._remember(digest)
                return
        if not self._verified_within(digest, VERIFIED_GRACE_S):
            raise RegistryUnavailableError("the key registry (Redis) is unreachable") from None

    def _remember(self, digest: str) -> None:
        self._verified.pop(digest, None)  # re-inserted last: the dict's order is oldest check first
        self._verified[digest] = self.clock()
        while len(self._verified) > MAX_VERIFIED:
            del self._verified[next(iter(self._verified))]
