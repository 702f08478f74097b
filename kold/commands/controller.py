"""`kold controller`: the pre-warm controller on its own, beside a running platform or on Knative.

`kold up` runs one inside its gateway's process by default (it sets floors on that gateway directly,
and a request that finds a function cold pokes it at once). This one runs elsewhere (another
terminal, another machine), sets floors through the gateway's admin API, and decides on its ticks
only: pokes reach only a controller inside `kold up`. Both take the same Redis lease, so only one of
them acts at a time; the other waits and takes over if the acting one goes away. Its Prometheus
metrics are served with `--metrics-port` on `--metrics-host` (`kold up`'s are on the gateway's /metrics).

`--target knative` runs the same loop against a Knative cluster (the controller Deployment in
manifests/ runs it in a pod): the functions are the namespace's kold Services
(kold.knative.functions), their demand is what the runtimes report to KOLD_REDIS_URL, and a floor
raises the serving Revision's min-scale (kold.knative.actuator).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
from typing import TYPE_CHECKING, Any

from kold.commands.knative_target import add_cluster_options, cluster_config
from kold.controller.lease import DEFAULT_KEY
from kold.errors import CLIError
from kold.output import note, redact_url
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
            "lease): this one takes over when the acting one goes away. With --target knative it decides for the "
            "namespace's kold Services from the demand their pods report to KOLD_REDIS_URL, and holds a floor as "
            "the serving Revision's min-scale (docs/knative-prewarm.md)."
        ),
    )
    parser.add_argument(
        "--target",
        choices=("local", "knative"),
        default="local",
        help="local: the platform `kold up` runs (floors through its gateway); knative: the cluster's kold Services "
        "(floors on their Revisions' min-scale; needs KOLD_REDIS_URL)",
    )
    parser.add_argument(
        "--url",
        default=argparse.SUPPRESS,
        help="the gateway whose floors it sets (default: KOLD_GATEWAY_URL, else the platform `kold up` started)",
    )
    add_cluster_options(parser)  # --namespace/-n, --context, --kubeconfig: the flags deploy/ls/describe/rm take
    parser.add_argument(
        "--tick", type=float, help="seconds between decision passes (default: KOLD_CONTROLLER_TICK_S, 1)"
    )
    parser.add_argument(
        "--metrics-port",
        type=int,
        metavar="PORT",
        help="serve the controller's Prometheus metrics at http://HOST:PORT/metrics (default: not served)",
    )
    parser.add_argument(
        "--metrics-host",
        default="127.0.0.1",
        metavar="HOST",
        help="the address the metrics are served on (default 127.0.0.1; 0.0.0.0 in a pod, for Prometheus to scrape)",
    )
    parser.set_defaults(handler=cmd_controller)


def cmd_controller(args: argparse.Namespace, settings: Settings) -> int:
    tick_s = settings.controller_tick_s if args.tick is None else args.tick
    if not 0 < tick_s <= 300:
        raise CLIError(f"--tick {args.tick}: must be a number of seconds above 0 and at most 300")
    if args.metrics_port is not None and not 1 <= args.metrics_port <= 65535:
        raise CLIError(f"--metrics-port {args.metrics_port}: must be a port number from 1 to 65535")
    if args.target == "knative":
        if getattr(args, "url", None) is not None:
            raise CLIError("--url names a gateway: --target knative sets floors on the cluster's Revisions")
        return _cmd_knative(args, settings, tick_s)
    if args.namespace is not None or args.context is not None or args.kubeconfig is not None:
        raise CLIError("--namespace, --context and --kubeconfig are for --target knative")
    return _cmd_local(args, settings, tick_s)


def _cmd_local(args: argparse.Namespace, settings: Settings, tick_s: float) -> int:
    from kold.commands.platform import api_key
    from kold.platform_client import PlatformClient

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
    client = _redis(redis_url)
    metrics, served = _serve_metrics(args)
    logging.getLogger("kold").setLevel(logging.INFO)
    note(
        f"pre-warm controller: Redis {redact_url(redis_url)}, gateway {where.url}, a decision pass every {tick_s:g} s{served}"
    )
    try:
        asyncio.run(_run(client, where.url, key, tick_s, settings, metrics))
    except (KeyboardInterrupt, asyncio.CancelledError):  # Ctrl-C or SIGTERM: the lease was given up
        note("pre-warm controller stopped")
    finally:
        client.close()
    return 0


def _cmd_knative(args: argparse.Namespace, settings: Settings, tick_s: float) -> int:
    from kold.knative.cluster import Cluster, KnativeError
    from kold.knative.names import KOLD_SELECTOR

    if not settings.redis_url:
        raise CLIError(
            "--target knative: no Redis to read demand from: set KOLD_REDIS_URL to the one the functions' runtimes "
            "report to (manifests/ deploy one beside the controller)"
        )
    client = _redis(settings.redis_url)
    # the kubernetes client retries a refused connection and urllib3 logs each retry as a warning:
    # the one error line below (at start) or the loop's one warning (later) says it once
    logging.getLogger("urllib3.connectionpool").setLevel(logging.ERROR)
    try:
        try:
            cluster = Cluster(cluster_config(args, settings))
        except KnativeError as exc:
            raise CLIError(f"Knative cluster: {exc}") from None
        try:
            # fail fast, in one line, when the cluster cannot be reached or RBAC refuses what the loop reads
            cluster.list_services(KOLD_SELECTOR)
            metrics, served = _serve_metrics(args)
            logging.getLogger("kold").setLevel(logging.INFO)
            note(
                f"pre-warm controller on Knative: namespace {cluster.namespace}, Redis {redact_url(settings.redis_url)}, "
                f"a decision pass every {tick_s:g} s{served}"
            )
            asyncio.run(_run_knative(client, cluster, tick_s, settings, metrics))
        except KnativeError as exc:
            raise CLIError(f"Knative cluster: {exc}") from None
        except (KeyboardInterrupt, asyncio.CancelledError):  # Ctrl-C or SIGTERM: the lease was given up
            note("pre-warm controller stopped")
        finally:
            cluster.close()
    finally:
        client.close()
    return 0


def _redis(url: str) -> Any:
    """A client of the Redis at `url`, or a one-line error when it does not answer."""
    import redis

    client = redis.Redis.from_url(url, socket_connect_timeout=1, socket_timeout=5)
    try:
        client.ping()
    except redis.RedisError as exc:
        client.close()
        raise CLIError(f"cannot reach Redis at {redact_url(url)}: {exc or type(exc).__name__}") from None
    return client


def _serve_metrics(args: argparse.Namespace) -> tuple[ControllerMetrics, str]:
    """The controller's metrics, served on --metrics-host:--metrics-port when a port is given; and the
    words that say where, for the start line."""
    import prometheus_client

    from kold.controller.metrics import ControllerMetrics

    metrics = ControllerMetrics()
    if args.metrics_port is None:
        return metrics, ""
    where = f"{args.metrics_host}:{args.metrics_port}"
    try:
        prometheus_client.start_http_server(args.metrics_port, addr=args.metrics_host, registry=metrics.registry)
    except OSError as exc:
        raise CLIError(
            f"--metrics-host/--metrics-port {where}: cannot serve metrics there: {exc.strerror or exc}"
        ) from None
    return metrics, f", metrics at http://{where}/metrics"


def _stop_on_sigterm() -> None:
    task = asyncio.current_task()
    assert task is not None
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)  # as Ctrl-C: the lease is given up


async def _run(
    client: Any, gateway_url: str, key: str | None, tick_s: float, settings: Settings, metrics: ControllerMetrics
) -> None:
    from kold.controller.actuators import HttpActuator
    from kold.controller.loop import RegistrySource
    from kold.gateway.registry import Registry

    await _control(
        client,
        RegistrySource(Registry(client, prefix=PREFIX)),
        HttpActuator(gateway_url, key),
        tick_s,
        settings,
        metrics,
    )


async def _run_knative(
    client: Any, cluster: Any, tick_s: float, settings: Settings, metrics: ControllerMetrics
) -> None:
    from kold.controller.nodes import NodeWants
    from kold.knative.actuator import KnativeActuator
    from kold.knative.functions import KnativeFunctionSource

    # the node agents prefetch what the floors will start: they read the wants from this Redis
    actuator = KnativeActuator(cluster, wants=NodeWants(client, PREFIX))
    await _control(client, KnativeFunctionSource(cluster), actuator, tick_s, settings, metrics)


async def _control(
    client: Any, source: Any, actuator: Any, tick_s: float, settings: Settings, metrics: ControllerMetrics
) -> None:
    """The controller loop, whichever target: it holds the Redis lease and runs until cancelled
    (Ctrl-C or SIGTERM), then closes the actuator."""
    from kold.controller.demand import DemandStore
    from kold.controller.lease import Lease, default_holder_id
    from kold.controller.loop import Controller

    _stop_on_sigterm()
    controller = Controller(
        DemandStore(client, PREFIX),
        source,
        actuator,
        Lease(client, LEASE_KEY, default_holder_id(), lease_seconds(settings, tick_s)),
        tick_s=tick_s,
        metrics=metrics,
    )
    try:
        await controller.run()
    finally:
        await actuator.aclose()
