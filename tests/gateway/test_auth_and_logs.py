"""The gateway's key checks with an injected clock (real redis, no sleeping), and the pure line framer
that `kold logs --follow` streams through."""

from __future__ import annotations

import asyncio

import pytest

from kold.gateway.activator import RegistryUnavailableError
from kold.gateway.auth import KEYS_CACHE_S, VERIFIED_GRACE_S, KeyAuth
from kold.gateway.errors import AuthenticationError
from kold.gateway.logs import LineFramer
from kold.gateway.registry import Registry


class Health:
    """What auth sees of the gateway: a flag for Redis being away, and the report of it."""

    def __init__(self) -> None:
        self.registry_down = False
        self.reports: list[Exception] = []

    def redis_unreachable(self, exc: Exception) -> None:
        self.reports.append(exc)
        self.registry_down = True


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.mark.redis
def test_keys_are_demanded_once_one_exists_and_a_revocation_takes_effect_after_one_background_check(
    registry: Registry,
) -> None:
    clock, health = Clock(), Health()
    auth = KeyAuth(registry, health, require_keys=False, clock=clock)

    async def scenario() -> None:
        await auth.check(None)  # no keys yet: open
        key = registry.create_key("t")
        await auth.check(None)  # "no keys" is still fresh
        clock.now += KEYS_CACHE_S
        await auth.check(None)  # stale: this request passes on what is known, a refresh starts
        await _settled(auth)
        with pytest.raises(AuthenticationError, match="missing API key"):
            await auth.check(None)
        with pytest.raises(AuthenticationError, match="invalid API key"):
            await auth.check("Bearer kold_wrong")
        with pytest.raises(AuthenticationError, match="missing"):
            await auth.check(f"Basic {key.secret}")
        await auth.check(f"Bearer {key.secret}")
        registry.create_key("other")  # keys still exist, so they are still demanded
        registry.revoke_key(key.key_id)  # elsewhere: this gateway is not told
        await auth.check(f"Bearer {key.secret}")  # verified moments ago: no Redis call
        clock.now += KEYS_CACHE_S
        await auth.check(f"Bearer {key.secret}")  # stale: passes once more while it is re-checked
        await _settled(auth)
        with pytest.raises(AuthenticationError, match="invalid API key"):
            await auth.check(f"Bearer {key.secret}")
        auth.keys_changed()  # revoked through this gateway: the next check asks Redis first
        fresh = registry.create_key("fresh")
        await auth.check(f"Bearer {fresh.secret}")
        registry.revoke_key(fresh.key_id)
        auth.keys_changed()
        with pytest.raises(AuthenticationError, match="invalid API key"):
            await auth.check(f"Bearer {fresh.secret}")

    asyncio.run(scenario())


async def _settled(auth: KeyAuth) -> None:
    """Wait for the background checks the last requests started."""
    await asyncio.gather(*auth._refreshing.values())


@pytest.mark.redis
def test_while_redis_is_away_a_recently_verified_key_works_for_the_grace_period_only(registry: Registry) -> None:
    clock, health = Clock(), Health()
    auth = KeyAuth(registry, health, require_keys=True, clock=clock)
    key = registry.create_key("t")
    asyncio.run(auth.check(f"Bearer {key.secret}"))
    health.registry_down = True  # the gateway learnt that Redis is unreachable
    clock.now += VERIFIED_GRACE_S - 1
    asyncio.run(auth.check(f"Bearer {key.secret}"))
    with pytest.raises(RegistryUnavailableError):
        asyncio.run(auth.check("Bearer kold_never_seen"))
    clock.now += 2
    with pytest.raises(RegistryUnavailableError):
        asyncio.run(auth.check(f"Bearer {key.secret}"))


@pytest.mark.parametrize(
    ("reads", "expected"),
    [
        pytest.param([[("a", b"one\ntwo\n")]], [b"one\ntwo\n"], id="whole lines of one instance pass as they are"),
        pytest.param(
            [[("a", b"par")], [("a", b"tial\n")]], [b"", b"partial\n"], id="a line is held until its end arrives"
        ),
        pytest.param(
            [[("a", b"x\n"), ("b", b"y\n")]],
            [b"[a] x\n[b] y\n"],
            id="once two instances were seen every line names its instance",
        ),
        pytest.param(
            [[("a", b"x\n")], [("b", b"")], [("a", b"z\n")]],
            [b"x\n", b"", b"[a] z\n"],
            id="an instance seen without output still turns prefixes on",
        ),
        pytest.param([[("a", b"0123456789")]], [b"0123456789"], id="a line longer than the limit is passed on"),
    ],
)
def test_line_framer(reads: list[list[tuple[str, bytes]]], expected: list[bytes]) -> None:
    framer = LineFramer(max_pending=8)
    assert [framer.feed(r) for r in reads] == expected
