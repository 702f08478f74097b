"""`kold node serve`: the node agent (one per node, a DaemonSet on Kubernetes; kold/node_agent.py).

It reads the snapshots the controller wants warm from Redis (KOLD_REDIS_URL) every KOLD_NODE_SYNC_S,
prefetches them into this node's shm tier (KOLD_CACHE_SHM_DIR, at most KOLD_CACHE_SHM_BYTES), keeps the
host pool in KOLD_HOST_POOL_DIR in step with them (KOLD_HOST_POOL=off: none), and reports what it holds
as node KOLD_NODE_NAME (else the host name). /healthz, /readyz and /metrics are served on --host:--port.
SIGTERM or Ctrl-C stop it: a prefetch under way is abandoned, the host pool released, the tier kept.
"""

from __future__ import annotations

import argparse
import logging
import signal
import socket
import threading
from types import FrameType
from typing import Any

from kold.errors import CLIError
from kold.output import human_bytes, note, redact_url
from kold.settings import Settings

DEFAULT_PORT = 9095  # not 8080: the gateway and the runtime listen there by default


def register(top: Any) -> None:
    parser = top.add_parser("node", help="the node agent: keep this node's cache tier and host pool warm")
    sub = parser.add_subparsers(dest="node_command", required=True, metavar="SUBCOMMAND")
    serve = sub.add_parser(
        "serve",
        help="run the node agent (a DaemonSet on Kubernetes); SIGTERM or Ctrl-C stops it",
        description=(
            "Prefetch the snapshots the controller wants warm (Redis, KOLD_REDIS_URL) into this node's shm tier "
            "(KOLD_CACHE_SHM_DIR, KOLD_CACHE_SHM_BYTES), keep the host pool (KOLD_HOST_POOL_DIR) in step with them, "
            "and report what the node holds, every KOLD_NODE_SYNC_S seconds. Serves /healthz, /readyz and /metrics."
        ),
    )
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1; 0.0.0.0 in a pod)")
    serve.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port to listen on (default {DEFAULT_PORT})")
    serve.add_argument(
        "--metrics",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="serve Prometheus metrics at /metrics (default: on)",
    )
    serve.set_defaults(handler=cmd_serve)


def cmd_serve(args: argparse.Namespace, settings: Settings) -> int:
    import redis

    from kold.controller.nodes import NodeWants, validate_node_name
    from kold.hostpool_auto import STATE_FILE
    from kold.node_agent import NodeAgent, PoolConfig, serve_http
    from kold.settings import node_memory
    from kold.snapshot.cache import CacheTier
    from kold.snapshot.poolplan import pool_limit

    if not 0 <= args.port <= 65535:
        raise CLIError(f"--port {args.port}: must be a port number from 0 to 65535")
    if not settings.redis_url:
        raise CLIError("the node agent reads the wanted snapshots from Redis: set KOLD_REDIS_URL (the controller's)")
    if settings.cache_shm_bytes <= 0:
        raise CLIError("KOLD_CACHE_SHM_BYTES is 0: the node agent has no shm tier to fill")
    node = settings.node_name or socket.gethostname()
    try:
        validate_node_name(node)
        client = redis.Redis.from_url(settings.redis_url, socket_connect_timeout=2, socket_timeout=10)
    except ValueError as exc:
        raise CLIError(str(exc)) from None
    pool, no_pool = None, ""
    if settings.host_pool_mode == "off":
        no_pool = "KOLD_HOST_POOL=off"
    elif settings.host_pool_dir is None:
        no_pool = "set KOLD_HOST_POOL_DIR to where the functions look for it"
    elif pool_limit(settings.host_pool_max_bytes, node_memory()) == 0:
        no_pool = "KOLD_HOST_POOL_MAX_BYTES=0"
    else:
        settings.home.mkdir(parents=True, exist_ok=True)
        pool = PoolConfig(
            settings.host_pool_dir, settings.host_pool_max_bytes, node_memory(), settings.home / STATE_FILE
        )
    tier = CacheTier("shm", settings.cache_shm_dir, settings.cache_shm_bytes)
    agent = NodeAgent(NodeWants(client), node, tier, sync_s=settings.node_sync_s, s3=settings.s3_options(), pool=pool)
    try:
        http = serve_http(agent, args.host, args.port, metrics=args.metrics)
    except OSError as exc:
        raise CLIError(f"--host {args.host} --port {args.port}: cannot listen there: {exc.strerror or exc}") from None
    logging.getLogger("kold").setLevel(logging.INFO)
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    host, port = http.server_address[:2]
    note(
        f"node agent on {node}: shm tier {tier.root} (up to {human_bytes(tier.max_bytes)}), Redis "
        f"{redact_url(settings.redis_url)}, a sync every {settings.node_sync_s:g} s; "
        f"http://{host!s}:{port}/healthz"
    )
    if no_pool:
        note(f"host pool: none ({no_pool})")
    try:
        agent.start()
        stop.wait()
    finally:
        agent.close()
        http.shutdown()
        http.server_close()
        client.close()
    note("node agent stopped")
    return 0
