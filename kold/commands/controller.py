"""`kold controller`: the pre-warm controller on its own, beside a running platform.

`kold up` runs one in its own process by default; this one runs elsewhere (another terminal, another
machine) and sets floors through the gateway's admin API. Both take the same Redis lease, so only
one of them acts at a time; the other waits and takes over if the acting one goes away.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
from typing import Any

from kold.errors import CLIError
from kold.output import note
from kold.platform_state import locate_gateway, read_state
from kold.settings import Settings

PREFIX = "kold:"  # the platform's key prefix (kold up's registry)
LEASE_KEY = PREFIX + "controller:lease"


def lease_seconds(settings: Settings, tick_s: float) -> float:
    """The lease's expiry: KOLD_CONTROLLER_LEASE_S, but never under three ticks, or a holder that
    renews once a tick would lose it between two of them."""
    return max(settings.controller_lease_s, 3 * tick_s)


def register(top: Any) -> None:
    parser = top.add_parser(
        "controller",
        help="run the pre-warm controller on its own (kold up runs one unless --no-controller); Ctrl-C stops it",
    )
    parser.add_argument(
        "--url",
        default=argparse.SUPPRESS,
        help="the gateway whose floors it sets (default: KOLD_GATEWAY_URL, else the platform `kold up` started)",
    )
    parser.add_argument(
        "--tick", type=float, help="seconds between decision passes (default: KOLD_CONTROLLER_TICK_S, 1)"
    )
    parser.set_defaults(handler=cmd_controller)


def cmd_controller(args: argparse.Namespace, settings: Settings) -> int:
    import redis

    from kold.commands.platform import api_key
    from kold.platform_client import PlatformClient

    tick_s = settings.controller_tick_s if args.tick is None else args.tick
    if not 0 < tick_s <= 300:
        raise CLIError(f"--tick {args.tick}: must be a number of seconds above 0 and at most 300")
    where = locate_gateway(getattr(args, "url", None), settings.gateway_url, settings.home)
    key = api_key(settings)
    # fail fast, in one line, when no gateway answers: there would be nobody to hold the floors
    PlatformClient(where.url, key, timeout_s=10, unreachable=where.unreachable(settings.home)).request(
        "GET", "/healthz"
    )
    state = read_state(settings.home)
    redis_url = settings.redis_url or (state.redis_url if state is not None else None)
    if not redis_url:
        raise CLIError(
            "no Redis to read demand from: set KOLD_REDIS_URL to the platform's, or run this where `kold up` runs"
        )
    client = redis.Redis.from_url(redis_url, socket_connect_timeout=1, socket_timeout=5)
    try:
        client.ping()
    except redis.RedisError as exc:
        raise CLIError(f"cannot reach Redis at {redis_url}: {exc or type(exc).__name__}") from None
    logging.getLogger("kold").setLevel(logging.INFO)
    note(f"pre-warm controller: Redis {redis_url}, gateway {where.url}, a decision pass every {tick_s:g} s")
    try:
        asyncio.run(_run(client, where.url, key, tick_s, settings))
    except (KeyboardInterrupt, asyncio.CancelledError):  # Ctrl-C or SIGTERM: the lease was given up
        note("pre-warm controller stopped")
    finally:
        client.close()
    return 0


async def _run(client: Any, gateway_url: str, key: str | None, tick_s: float, settings: Settings) -> None:
    from kold.controller.actuators import HttpActuator
    from kold.controller.demand import DemandStore
    from kold.controller.lease import Lease, default_holder_id
    from kold.controller.loop import Controller, RegistrySource
    from kold.gateway.registry import Registry

    task = asyncio.current_task()
    assert task is not None
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)  # as Ctrl-C: the lease is given up
    actuator = HttpActuator(gateway_url, key)
    controller = Controller(
        DemandStore(client, PREFIX),
        RegistrySource(Registry(client, prefix=PREFIX)),
        actuator,
        Lease(client, LEASE_KEY, default_holder_id(), lease_seconds(settings, tick_s)),
        tick_s=tick_s,
    )
    try:
        await controller.run()
    finally:
        await actuator.aclose()
