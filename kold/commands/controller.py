"""`kold controller`: the pre-warm controller on its own, beside a running platform.

`kold up` runs one inside its gateway's process by default (it sets floors on that gateway directly,
and a request that finds a function cold pokes it at once). This one runs elsewhere (another
terminal, another machine), sets floors through the gateway's admin API, and decides on its ticks
only: pokes reach only a controller inside `kold up`. Both take the same Redis lease, so only one of
them acts at a time; the other waits and takes over if the acting one goes away. Its Prometheus
metrics are served with `--metrics-port` (`kold up`'s are on the gateway's /metrics).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
from typing import TYPE_CHECKING, Any

from kold.controller.lease import DEFAULT_KEY
from kold.errors import CLIError
from kold.output import note
from kold.platform_state import locate_gateway, read_state
from kold.settings import Settings

if TYPE_CHECKING:
    from kold.controller.metrics import ControllerMetrics

PREFIX = "kold:"  # the platform's key prefix (kold up's registry)
LEASE_KEY = PREFIX + DEFAULT_KEY  # kold up's controller and this one take the same lease


def lease_seconds(settings: Settings, tick_s: float) -> float:
    """The lease's expiry: KOLD_CONTROLLER_LEASE_S, but never under three ticks, or a holder that
    renews once a tick would lose it between two of them."""
    return max(settings.controller_lease_s, 3 * tick_s)


def register(top: Any) -> None:
    parser = top.add_parser(
        "controller",
        help="run the pre-warm controller on its own (kold up runs one unless --no-controller); Ctrl-C stops it",
        description=(
            "Run the pre-warm controller beside a running platform: it sets floors through the gateway's admin "
            "API and decides every --tick. Requests that find a function cold poke only a controller running "
            "inside `kold up`; this one sees them at its next tick. Only one controller acts at a time (a Redis "
            "lease): this one takes over when the acting one goes away."
        ),
    )
    parser.add_argument(
        "--url",
        default=argparse.SUPPRESS,
        help="the gateway whose floors it sets (default: KOLD_GATEWAY_URL, else the platform `kold up` started)",
    )
    parser.add_argument(
        "--tick", type=float, help="seconds between decision passes (default: KOLD_CONTROLLER_TICK_S, 1)"
    )
    parser.add_argument(
        "--metrics-port",
        type=int,
        metavar="PORT",
        help="serve the controller's Prometheus metrics at http://127.0.0.1:PORT/metrics (default: not served)",
    )
    parser.set_defaults(handler=cmd_controller)


def cmd_controller(args: argparse.Namespace, settings: Settings) -> int:
    import prometheus_client
    import redis

    from kold.commands.platform import api_key
    from kold.controller.metrics import ControllerMetrics
    from kold.platform_client import PlatformClient

    tick_s = settings.controller_tick_s if args.tick is None else args.tick
    if not 0 < tick_s <= 300:
        raise CLIError(f"--tick {args.tick}: must be a number of seconds above 0 and at most 300")
    if args.metrics_port is not None and not 1 <= args.metrics_port <= 65535:
        raise CLIError(f"--metrics-port {args.metrics_port}: must be a port number from 1 to 65535")
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
    metrics = ControllerMetrics()
    if args.metrics_port is not None:
        try:
            prometheus_client.start_http_server(args.metrics_port, addr="127.0.0.1", registry=metrics.registry)
        except OSError as exc:
            raise CLIError(f"--metrics-port {args.metrics_port}: cannot serve metrics there: {exc.strerror}") from None
    logging.getLogger("kold").setLevel(logging.INFO)
    served = "" if args.metrics_port is None else f", metrics at http://127.0.0.1:{args.metrics_port}/metrics"
    note(f"pre-warm controller: Redis {redis_url}, gateway {where.url}, a decision pass every {tick_s:g} s{served}")
    try:
        asyncio.run(_run(client, where.url, key, tick_s, settings, metrics))
    except (KeyboardInterrupt, asyncio.CancelledError):  # Ctrl-C or SIGTERM: the lease was given up
        note("pre-warm controller stopped")
    finally:
        client.close()
    return 0


async def _run(
    client: Any, gateway_url: str, key: str | None, tick_s: float, settings: Settings, metrics: ControllerMetrics
) -> None:
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
        metrics=metrics,
    )
    try:
        await controller.run()
    finally:
        await actuator.aclose()
