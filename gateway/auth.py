"""API-key authentication for the gateway: Bearer keys checked against the registry, with short caches.

Redis is asked at most every KEYS_CACHE_S per key (and for "are there keys at all"), so the data path
does not pay a round trip per request, and once an answer is known it is re-checked in the background
(stale-while-revalidate), so a stalled Redis never holds a request. While Redis is unreachable
(`gateway.registry_down`) a key verified within VERIFIED_GRACE_S keeps working, anything else gets 503. The
clock is injected so that the expiry rules are tested without sleeping.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import time
from collections.abc import Callable, Coroutine
from typing import Any, Protocol

from redis.exceptions import RedisError

from kold.gateway.activator import RegistryUnavailableError
from kold.gateway.errors import AuthenticationError, PermissionDeniedError
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
        self._scopes: dict[str, str] = {}  # sha256 of a verified key -> its scope
        self._refreshing: dict[str, asyncio.Task[None]] = {}  # background checks, by what they check

    def keys_changed(self) -> None:
        """A key was created or revoked here: ask Redis again, and forget every verified key at once
        (they are kept by digest, not id, so the revoked one cannot be picked out)."""
        self._has_keys_until = 0.0
        self._verified.clear()
        self._scopes.clear()

    async def _keys_exist(self) -> bool:
        if self.require_keys:
            return True
        if not self._has_keys_until:  # never read: this request waits for the answer
            try:
                await self._read_has_keys()
            except RedisError as exc:
                self.health.redis_unreachable(exc)
                raise RegistryUnavailableError("the key registry (Redis) is unreachable") from None
        elif self.clock() >= self._has_keys_until and not self.health.registry_down:
            self._in_background("has_keys", self._read_has_keys())
        return self._has_keys

    async def _read_has_keys(self) -> None:
        self._has_keys = await asyncio.to_thread(self.registry.has_keys)
        self._has_keys_until = self.clock() + KEYS_CACHE_S

    def _verified_within(self, digest: str, window_s: float) -> bool:
        return self.clock() - self._verified.get(digest, float("-inf")) < window_s

    async def check(self, authorization: str | None, scope: str = "invoke") -> None:
        """Return if the request may pass with `scope` ("invoke" or "admin"; an admin key may do
        both); raise AuthenticationError (401), PermissionDeniedError (403: a valid key of too small a
        scope) or RegistryUnavailableError.

        Stale-while-revalidate, so requests never wait for Redis once they were answered: a key that
        verified within VERIFIED_GRACE_S passes at once, and if its check is older than KEYS_CACHE_S
        one is started in the background (a key revoked elsewhere stops working when it answers;
        one revoked through this gateway stops at once: `keys_changed`). A key never seen waits for
        Redis, and gets 503 while Redis is known to be unreachable."""
        if not await self._keys_exist():
            return
        header = authorization or ""
        kind, _, secret = header.partition(" ")
        secret = secret.strip()
        if not header or not hmac.compare_digest(kind.lower(), "bearer") or not secret:
            raise AuthenticationError("missing API key: send 'Authorization: Bearer <key>'")
        digest = hashlib.sha256(secret.encode()).hexdigest()
        if self._verified_within(digest, VERIFIED_GRACE_S):
            if not self._verified_within(digest, KEYS_CACHE_S) and not self.health.registry_down:
                self._in_background(digest, self._verify(secret, digest))
        elif self.health.registry_down:
            raise RegistryUnavailableError("the key registry (Redis) is unreachable")
        else:
            try:
                ok = await self._verify(secret, digest)
            except RedisError as exc:
                self.health.redis_unreachable(exc)
                raise RegistryUnavailableError("the key registry (Redis) is unreachable") from None
            if not ok:
                raise AuthenticationError("invalid API key")
        if scope == "admin" and self._scopes.get(digest) != "admin":
            raise PermissionDeniedError("this API key may only invoke functions: the admin API needs an admin key")

    async def _verify(self, secret: str, digest: str) -> bool:
        scope = await asyncio.to_thread(self.registry.key_scope, secret)
        if scope is not None:
            self._remember(digest)
            self._scopes[digest] = scope
        else:
            self._verified.pop(digest, None)
            self._scopes.pop(digest, None)
        return scope is not None

    def _in_background(self, what: str, check: Coroutine[Any, Any, Any]) -> None:
        """Run one check of `what` at a time off the request path; a Redis failure marks it away."""
        if what in self._refreshing:
            check.close()
            return

        async def run() -> None:
            try:
                await check
            except RedisError as exc:
                self.health.redis_unreachable(exc)
            finally:
                self._refreshing.pop(what, None)

        self._refreshing[what] = asyncio.get_running_loop().create_task(run())

    def _remember(self, digest: str) -> None:
        self._verified.pop(digest, None)  # re-inserted last: the dict's order is oldest check first
        self._verified[digest] = self.clock()
        while len(self._verified) > MAX_VERIFIED:
            oldest = next(iter(self._verified))
            del self._verified[oldest]
            self._scopes.pop(oldest, None)
