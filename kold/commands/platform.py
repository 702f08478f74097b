"""The local platform: `kold up|down`, `kold deploy|ls|describe|rm|rollback|logs|invoke`, `kold keys`.

`kold up` runs the gateway (router + activator + instance pool) in the foreground; every other
command is a client of its admin API (kold/platform_client.py), as kubectl is of the API server,
and finds it from the state `kold up` writes under KOLD_HOME (kold/platform_state.py), as kubectl
finds its context. Commands whose stdout is data print it alone there; status lines go to stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import ipaddress
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kold.commands import knative_target
from kold.commands.snapshot import model_spec
from kold.errors import CLIError
from kold.output import add_output_option, human_bytes, human_time, note, print_data, redact_url
from kold.platform_state import (
    DEFAULT_URL,
    PlatformState,
    clear_stale_state,
    is_alive,
    locate_gateway,
    process_start,
    read_state,
    remove_state,
    write_state,
)
from kold.settings import Settings

if TYPE_CHECKING:
    from kold.controller.loop import Controller
    from kold.gateway.activator import Gateway
    from kold.gateway.registry import Registry
    from kold.hostpool_auto import HostPoolKeeper
    from kold.platform_client import PlatformClient


def size_arg(text: str) -> int:
    """An argparse type for sizes: 3GiB, 512M, a number of bytes (a bad one is a usage error)."""
    from kold.settings import parse_size

    try:
        return parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def register(top: Any) -> None:
    up = top.add_parser("up", help="start the local platform (gateway, instance manager, pre-warm controller)")
    up.add_argument("--host", default="127.0.0.1", help="address to bind (non-loopback requires API keys)")
    up.add_argument("--port", type=int, default=8080)
    up.add_argument("--detach", action="store_true", help="run in the background (stop with `kold down`)")
    up.add_argument(
        "--no-controller",
        dest="controller",
        action="store_false",
        default=None,
        help="do not run the pre-warm controller in the platform (default: KOLD_CONTROLLER, on)",
    )
    up.add_argument("--log-file", help=argparse.SUPPRESS)  # set by --detach: where the platform's output goes
    up.set_defaults(handler=cmd_up)

    down = top.add_parser("down", help="stop the platform `kold up` started")
    down.set_defaults(handler=cmd_down)

    deploy = _client_parser(top, "deploy", help="publish a Hugging Face model directory as a function")
    deploy.add_argument(
        "model",
        type=model_spec,
        metavar="MODEL",
        help="a Hugging Face directory, a .gguf file or a Hub id (owner/name)",
    )
    deploy.add_argument("--revision", help="a Hub id's branch, tag or commit (default: main)")
    deploy.add_argument("--name", required=True, help="function name (DNS label: a-z, 0-9, '-')")
    deploy.add_argument("--min-instances", type=int, default=0, help="0 allows scale to zero (default)")
    deploy.add_argument("--max-instances", type=int, default=4)
    deploy.add_argument("--target-concurrency", type=int, default=4, help="in-flight requests per instance")
    deploy.add_argument("--idle-timeout", type=float, default=60.0, help="seconds idle before scaling in")
    deploy.add_argument(
        "--request-timeout",
        type=float,
        default=300.0,
        help="seconds a request may wait for a cold start (then 503), and then for its answer to begin (then 504)",
    )
    deploy.add_argument("--device", default="cpu")
    deploy.add_argument("--max-batch", type=int, default=8)
    deploy.add_argument(
        "--cpus", type=float, default=1.0, help="CPUs one instance takes of the node (the pool schedules by it)"
    )
    deploy.add_argument(
        "--memory",
        type=size_arg,
        help="memory one instance takes (e.g. 3GiB; default: its weights plus a full KV cache)",
    )
    deploy.add_argument(
        "--prewarm",
        metavar="POLICY",
        help="the pre-warm policy: NAME or NAME:KNOB=VALUE[,...] (forecast, hybrid-histogram, fixed-keepalive, "
        "knative-default; default: forecast)",
    )
    _target_option(deploy)
    add_output_option(deploy)
    knative_target.add_cluster_options(deploy)
    knative_target.add_deploy_options(deploy)
    deploy.set_defaults(handler=cmd_deploy)

    ls = _client_parser(top, "ls", help="list functions")
    _target_option(ls)
    add_output_option(ls)
    knative_target.add_cluster_options(ls)
    ls.set_defaults(handler=cmd_ls)

    describe = _client_parser(top, "describe", help="a function's revisions and instances, with cold-start breakdowns")
    describe.add_argument("name")
    _target_option(describe)
    add_output_option(describe)
    knative_target.add_cluster_options(describe)
    describe.set_defaults(handler=cmd_describe)

    rm = _client_parser(top, "rm", help="remove a function (its instances drain first)")
    rm.add_argument("name")
    _target_option(rm)
    knative_target.add_cluster_options(rm)
    rm.set_defaults(handler=cmd_rm)

    rollback = _client_parser(top, "rollback", help="move a function's traffic back to an earlier revision")
    rollback.add_argument("name")
    rollback.add_argument("revision", nargs="?", help="default: the revision before the serving one")
    rollback.set_defaults(handler=cmd_rollback)

    logs = _client_parser(top, "logs", help="a function's instance logs (--follow: as they are written, like tail -F)")
    logs.add_argument("name")
    logs.add_argument("--tail", type=int, default=100)
    logs.add_argument("--follow", "-f", action="store_true")
    logs.set_defaults(handler=cmd_logs)

    invoke = _client_parser(
        top, "invoke", help="call a function and stream its answer (stdout: the answer; stderr: the timings)"
    )
    invoke.add_argument("name")
    invoke.add_argument("prompt")
    mode = invoke.add_mutually_exclusive_group()
    mode.add_argument(
        "--chat",
        dest="mode",
        action="store_const",
        const="chat",
        help="send the prompt as a chat message (the default for a model with a chat template)",
    )
    mode.add_argument(
        "--completion",
        dest="mode",
        action="store_const",
        const="completion",
        help="send the prompt as a plain completion (the default for a model without one)",
    )
    invoke.add_argument("--max-tokens", type=int, default=64)
    invoke.add_argument("--temperature", type=float, help="0 is greedy (default: the runtime's, 1.0)")
    invoke.set_defaults(handler=cmd_invoke)

    keys = top.add_parser("keys", help="API keys for the gateway")
    sub = keys.add_subparsers(dest="keys_command", required=True, metavar="SUBCOMMAND")
    create = _client_parser(sub, "create", help="create a key (stdout: its secret, shown once)")
    create.add_argument("label", nargs="?", default="")
    create.add_argument(
        "--scope",
        choices=("admin", "invoke"),
        default="admin",
        help="invoke: the OpenAI routes only; admin: also deploy, remove, roll back, logs and keys (default)",
    )
    create.set_defaults(handler=cmd_keys_create)
    keys_ls = _client_parser(sub, "ls", help="list keys")
    add_output_option(keys_ls)
    keys_ls.set_defaults(handler=cmd_keys_ls)
    revoke = _client_parser(sub, "revoke", help="revoke a key")
    revoke.add_argument("key_id")
    revoke.add_argument(
        "--disable-auth",
        action="store_true",
        help="allow revoking the last key, which turns authentication off (it never turns off by itself)",
    )
    revoke.set_defaults(handler=cmd_keys_revoke)


def _target_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--target",
        choices=("local", "knative"),
        default="local",
        help="local: the platform `kold up` runs (default); knative: Knative Services on a Kubernetes cluster",
    )


def _client_parser(sub: Any, name: str, **kwargs: Any) -> argparse.ArgumentParser:
    """A command that talks to the gateway: it takes --url (after the command, too, as kubectl's --server)."""
    parser: argparse.ArgumentParser = sub.add_parser(name, **kwargs)
    # SUPPRESS: when absent here, the value of `kold --url URL COMMAND` is kept, not reset to None
    parser.add_argument(
        "--url",
        default=argparse.SUPPRESS,
        help=f"the gateway (default: KOLD_GATEWAY_URL, else the platform `kold up` started, else {DEFAULT_URL})",
    )
    return parser


# -- the platform process -----------------------------------------------------------------------


def cmd_up(args: argparse.Namespace, settings: Settings) -> int:
    running = read_state(settings.home)
    if running is not None:
        raise CLIError(f"a kold platform is already running at {running.url} (pid {running.pid}): `kold down` first")
    if not 0 < args.port < 65536:
        raise CLIError(f"--port {args.port}: not a port number")
    url = _client_url(args.host, args.port)
    if args.detach:
        return _up_detached(args, settings, url)
    state = PlatformState(
        pid=os.getpid(),
        url=url,
        started_at=time.time(),
        log_path=args.log_file,
        pid_start=process_start(os.getpid()),
    )
    write_state(settings.home, state)  # before the gateway listens: a second `kold up` is refused from now on
    try:
        return _serve_platform(args, settings)
    finally:
        remove_state(settings.home, os.getpid())


def _record_redis_url(settings: Settings, redis_url: str) -> None:
    """Add the Redis URL to the state `cmd_up` wrote (it is known once the private redis-server runs)."""
    state = read_state(settings.home)
    if state is not None and state.pid == os.getpid():
        write_state(settings.home, dataclasses.replace(state, redis_url=redis_url))


def _client_url(host: str, port: int) -> str:
    """Where clients reach a gateway bound to `host`: a wildcard address is reached over loopback."""
    if host in ("0.0.0.0", ""):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def _up_detached(args: argparse.Namespace, settings: Settings, url: str) -> int:
    import httpx

    settings.home.mkdir(parents=True, exist_ok=True)
    log_path = settings.home / "platform.log"
    argv = ["up", "--host", args.host, "--port", str(args.port), "--log-file", str(log_path)]
    if args.controller is False:
        argv.append("--no-controller")
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "kold", *argv],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise CLIError(f"the platform exited at start: see {log_path}")
        try:
            if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                print(f"kold platform up at {url} (pid {proc.pid}, log {log_path}); stop it with `kold down`")
                return 0
        except httpx.HTTPError:
            time.sleep(0.1)
    raise CLIError(f"the platform did not answer within 60 s: see {log_path}")


def _serve_platform(args: argparse.Namespace, settings: Settings) -> int:
    import logging

    import redis
    import uvicorn
    from redis.backoff import ExponentialBackoff
    from redis.retry import Retry

    from kold.controller.demand import DemandStore
    from kold.gateway.activator import Gateway
    from kold.gateway.app import build_app, server_config
    from kold.gateway.pool import InstancePool
    from kold.gateway.registry import Registry
    from kold.localredis import LocalRedis
    from kold.resources import node_capacity

    logging.getLogger("kold").setLevel(logging.INFO)
    local_redis = None if settings.redis_url else LocalRedis(settings.home / "redis").start()
    redis_url = settings.redis_url or (local_redis.url if local_redis else "")
    _record_redis_url(settings, redis_url)
    keeper: HostPoolKeeper | None = None
    try:
        if local_redis is not None:
            # ours to keep alive: a killed redis-server comes back on its port, with its data
            local_redis.supervise(lambda line: print(line, flush=True))
        # Short, bounded waits, so the gateway learns of an outage at once and answers 503: with no
        # socket timeout a hung Redis (SIGSTOP, a partition) would hold requests for ever, and
        # redis-py's default 10 retries make each failed call ~15 s. The registry's calls are small
        # (a key, a set, a short pipeline) and a healthy Redis answers them in well under 1 ms, even
        # over a network in one data centre; 250 ms leaves 100x headroom for a busy server and still
        # gives up, with its one retry, in about half a second. Warm requests never wait for these
        # calls either way: the gateway refreshes what they need in the background.
        retry = Retry(ExponentialBackoff(cap=0.05, base=0.01), 1)
        client = redis.Redis.from_url(redis_url, socket_connect_timeout=0.25, socket_timeout=0.25, retry=retry)
        registry = Registry(client, prefix="kold:")
        keeper = _report_host_pool(settings, registry)
        # instances inherit our environment: KOLD_STORE, S3 credentials and cache settings reach them,
        # and KOLD_HOST_POOL_DIR when the pool is the one we keep
        env = {**os.environ, **(keeper.instance_env() if keeper is not None else {})}
        pool = InstancePool(settings.home / "logs", env=env, start_method=settings.instance_start)
        capacity = node_capacity(settings)
        note(
            f"node capacity for instances: {capacity.cpus:g} CPUs, {human_bytes(capacity.memory_bytes)}, "
            f"{capacity.gpus} GPUs (KOLD_NODE_CPUS / KOLD_NODE_MEMORY / KOLD_NODE_GPUS override)"
        )
        require_keys = not _is_loopback(args.host)
        if require_keys:
            _bootstrap_admin_key(settings, registry)
        gateway = Gateway(registry, pool, capacity=capacity, demand=DemandStore(client, prefix="kold:"))
        controller = _controller(args, settings, redis_url, gateway)
        app = build_app(
            registry,
            pool,
            require_keys=require_keys,
            gateway=gateway,
            warm_template=True,
            max_body_bytes=settings.max_body_bytes,
            body_timeout_s=settings.body_timeout_s,
            metrics_need_key=settings.metrics_require_key,
            capacity=capacity,
        )
        # `kold logs --follow` streams never end on their own: they end when this event is set, or
        # uvicorn's graceful shutdown (`kold down`, Ctrl-C) would wait for them forever
        stopping = threading.Event()
        app.state.log_streams_stopping = stopping

        class Server(uvicorn.Server):
            controller_task: asyncio.Task[None] | None = None

            async def startup(self, sockets: list[Any] | None = None) -> None:
                await super().startup(sockets)  # the gateway's lifespan has started it
                if controller is not None and not self.should_exit:
                    self.controller_task = asyncio.create_task(controller.run(), name="kold-controller")

            async def shutdown(self, sockets: list[Any] | None = None) -> None:
                stopping.set()
                if self.controller_task is not None:  # first: it gives its lease up on the way out
                    self.controller_task.cancel()
                    await asyncio.gather(self.controller_task, return_exceptions=True)
                await super().shutdown(sockets)

            def handle_exit(self, sig: int, frame: Any) -> None:
                super().handle_exit(sig, frame)
                # uvicorn re-raises a captured SIGTERM/SIGINT once it has shut down, which would kill
                # this process before the `finally`s below: the private redis-server and the pid file
                # would be left behind by every `kold down`
                self._captured_signals.clear()

        print(f"kold platform listening on http://{args.host}:{args.port} (redis {redact_url(redis_url)})", flush=True)
        config = server_config(
            app,
            args.host,
            args.port,
            header_timeout_s=settings.header_timeout_s,
            body_timeout_s=settings.body_timeout_s,
        )
        Server(config).run()
        return 0
    finally:
        if keeper is not None:
            keeper.close()  # the instances have stopped: their segments are free to remove
        if local_redis is not None:
            local_redis.stop()


def _controller(args: argparse.Namespace, settings: Settings, redis_url: str, gateway: Gateway) -> Controller | None:
    """The pre-warm controller `kold up` runs beside the gateway (None when --no-controller or
    KOLD_CONTROLLER=off): it sets floors on this gateway directly, and a cold request pokes it.

    Its own Redis client: a fold of a long backlog may take longer than the data path's 250 ms
    budget, and must not hold the connections warm requests' background refreshes use."""
    enabled = settings.controller if args.controller is None else args.controller
    if not enabled:
        print("pre-warm controller: off (floors only from the admin API or a `kold controller`)", flush=True)
        return None
    import redis

    from kold.commands.controller import LEASE_KEY, lease_seconds
    from kold.controller.actuators import LocalActuator
    from kold.controller.demand import DemandStore
    from kold.controller.lease import Lease, default_holder_id
    from kold.controller.loop import Controller, RegistrySource
    from kold.controller.metrics import ControllerMetrics
    from kold.gateway.registry import Registry

    client = redis.Redis.from_url(redis_url, socket_connect_timeout=0.5, socket_timeout=2)
    controller = Controller(
        DemandStore(client, prefix="kold:"),
        RegistrySource(Registry(client, prefix="kold:")),
        LocalActuator(gateway),
        Lease(client, LEASE_KEY, default_holder_id(), lease_seconds(settings, settings.controller_tick_s)),
        tick_s=settings.controller_tick_s,
        metrics=ControllerMetrics(gateway.metrics),  # on the gateway's /metrics
    )
    gateway.on_cold = controller.poke
    print(f"pre-warm controller: on, a decision pass every {settings.controller_tick_s:g} s", flush=True)
    return controller


def _report_host_pool(settings: Settings, registry: Registry) -> HostPoolKeeper | None:
    """The node's host pool for CPU restores, and a line saying what instances will find there: the
    pool we keep in step with the deployed functions (KOLD_HOST_POOL=auto, the default; returned, to
    be closed at the end), the user's own (KOLD_HOST_POOL_DIR, used as it is, inherited), or none."""
    if settings.host_pool_dir is None:
        if settings.host_pool_mode == "off":
            print("host pool: off (KOLD_HOST_POOL=off): CPU restores fault in fresh memory", flush=True)
            return None
        from kold.hostpool_auto import start_host_pool

        return start_host_pool(settings, registry, lambda line: print(line, flush=True))
    pool = settings.host_pool
    if pool is None:
        return None
    segments = pool.segments()
    if not segments:
        print(f"warning: the host pool {pool.directory} has no segments: CPU restores use fresh memory until "
              "`kold snapshot pool fill --size SIZE --count N` adds some", flush=True)  # fmt: skip
        return None
    sizes = ", ".join(human_bytes(size) for size in sorted({s.size for s in segments}))
    print(f"host pool {pool.directory}: {len(segments)} segments ({sizes}), {sum(not s.in_use for s in segments)} "
          "free, for CPU restores (KOLD_HOST_POOL_DIR: yours, used as it is)", flush=True)  # fmt: skip
    return None


def _bootstrap_admin_key(settings: Settings, registry: Any) -> None:
    """A gateway reachable beyond loopback demands a key from the start; with none yet, nobody could
    create the first one. So `kold up` creates an admin key and leaves its secret where the CLI on this
    machine looks for one (`$KOLD_HOME/admin.key`, mode 600), as Jupyter leaves its token."""
    path = admin_key_path(settings)
    if registry.has_keys():
        return
    key = registry.create_key("kold up (bootstrap)", "admin")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(key.secret + "\n")
    note(
        f"no API key existed and the gateway listens beyond loopback: admin key {key.key_id} created, its secret in {path}"
    )


def admin_key_path(settings: Settings) -> Path:
    return settings.home / "admin.key"


def api_key(settings: Settings) -> str | None:
    """KOLD_API_KEY, else the admin key `kold up` left on this machine (a gateway beyond loopback)."""
    if settings.api_key:
        return settings.api_key
    try:
        return admin_key_path(settings).read_text().strip() or None
    except OSError:
        return None


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def cmd_down(args: argparse.Namespace, settings: Settings) -> int:
    state = read_state(settings.home)
    if state is None:
        clear_stale_state(settings.home)
        print("no kold platform is running")
        return 0
    os.kill(state.pid, signal.SIGTERM)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if not is_alive(state):
            remove_state(settings.home, state.pid)  # it removes its own, unless it was killed first
            print(f"kold platform stopped (pid {state.pid}, {state.url})")
            return 0
        time.sleep(0.1)
    raise CLIError(f"the platform (pid {state.pid}) did not stop within 60 s")


# -- clients of the gateway ------------------------------------------------------------------------


def _client(args: argparse.Namespace, settings: Settings) -> PlatformClient:
    """A client of the gateway that `--url`, KOLD_GATEWAY_URL or `kold up`'s state names (platform_state.py)."""
    from kold.platform_client import PlatformClient

    where = locate_gateway(getattr(args, "url", None), settings.gateway_url, settings.home)
    return PlatformClient(where.url, api_key(settings), unreachable=where.unreachable(settings.home))


def cmd_deploy(args: argparse.Namespace, settings: Settings) -> int:
    """stdout: the function's URLs (or the -o document); progress and status: stderr."""
    name = _function_name(args.name)
    prewarm = _prewarm_policy(args.prewarm)
    if args.target == "knative":
        return knative_target.deploy(args, settings, name, prewarm)
    knative_target.refuse_cluster_options(args)
    from kold.progress import ByteProgress
    from kold.resources import instance_memory
    from kold.snapshot import build_snapshot
    from kold.snapshot.resolve import resolve_model

    client = _client(args, settings)
    # fail fast, before building, if no platform runs or its registry (Redis) is known to be away
    client.request("GET", "/readyz")
    with ByteProgress(f"publish {name}") as progress:
        model = resolve_model(args.model, revision=args.revision, progress=progress)
        built = build_snapshot(model, settings.store_uri, s3=settings.s3_options(), progress=progress)
    note(f"snapshot {built.manifest.id} {'published' if built.uploaded else 'already in the store'}: {built.uri}")
    body = {
        "snapshot_uri": built.uri,
        "scaling": {
            "min_instances": args.min_instances,
            "max_instances": args.max_instances,
            "target_concurrency": args.target_concurrency,
            "idle_timeout_s": args.idle_timeout,
            "request_timeout_s": args.request_timeout,
            **({"prewarm": prewarm} if prewarm is not None else {}),
        },
        "runtime": {
            "device": args.device,
            "max_batch": args.max_batch,
            "cpus": args.cpus,
            "memory_bytes": args.memory
            if args.memory is not None
            else instance_memory(model.config, built.manifest.data_size, args.max_batch, None),
        },
        "wait": True,
    }
    note(f"deploying {name}: waiting for the new revision's first instance to be ready ...")
    rev = client.request("POST", f"/admin/functions/{name}/revisions", body)
    revision = rev.get("revision", "?") if isinstance(rev, dict) else "?"
    base = client.base_url
    urls = {
        "chat_completions": f"{base}/v1/functions/{name}/v1/chat/completions",
        "completions": f"{base}/v1/functions/{name}/v1/completions",
        "openai_base_url": f"{base}/v1",
    }
    note(f"revision {revision} is serving")
    if args.output:
        doc = {"name": name, "revision": revision, "snapshot": {"id": built.manifest.id, "uri": built.uri}, **urls}
        print_data(doc, args.output)
        return 0
    print(f"  {urls['chat_completions']}")
    print(f"  OpenAI clients: base_url={urls['openai_base_url']}, model={name}")
    return 0


def cmd_ls(args: argparse.Namespace, settings: Settings) -> int:
    if args.target == "knative":
        return knative_target.ls(args, settings)
    knative_target.refuse_cluster_options(args)
    functions = _client(args, settings).request("GET", "/admin/functions")
    if args.output:
        print_data(functions, args.output)
        return 0
    items = functions.get("functions", functions) if isinstance(functions, dict) else functions
    if not items:
        note("no functions: deploy one with `kold deploy MODEL_DIR --name NAME`")
        return 0
    print(f"{'NAME':<24} {'SERVING':<20} {'INSTANCES':>9}")
    for fn in items:
        instances = fn.get("instances", [])
        count = len(instances) if isinstance(instances, list) else instances
        print(f"{fn.get('name', '?'):<24} {fn.get('serving') or '-':<20} {count:>9}")
    return 0


def _prewarm_policy(text: str | None) -> str | None:
    """`--prewarm`, checked here (a one-line error naming the problem, before anything is built)."""
    if text is None:
        return None
    from kold.controller.policies.registry import parse_policy

    try:
        parse_policy(text)
    except ValueError as exc:
        raise CLIError(f"--prewarm: {exc}") from None
    return text.strip()


def _function_name(name: str) -> str:
    """The name, checked here so that a bad one is a one-line error, never a URL path like `../keys`."""
    from kold.gateway.names import InvalidNameError, validate_function_name

    try:
        return validate_function_name(name)
    except InvalidNameError as exc:
        raise CLIError(str(exc)) from None


def cmd_describe(args: argparse.Namespace, settings: Settings) -> int:
    if args.target == "knative":
        return knative_target.describe(args, settings)
    knative_target.refuse_cluster_options(args)
    client = _client(args, settings)
    doc = client.request("GET", f"/admin/functions/{_function_name(args.name)}")
    if args.output:
        print_data(doc, args.output)
    else:
        from kold.describe import format_describe

        print(format_describe(doc if isinstance(doc, dict) else {}, client.base_url))
    return 0


def cmd_rm(args: argparse.Namespace, settings: Settings) -> int:
    if args.target == "knative":
        return knative_target.rm(args, settings)
    knative_target.refuse_cluster_options(args)
    _client(args, settings).request("DELETE", f"/admin/functions/{_function_name(args.name)}")
    print(f"function {args.name} removed")
    return 0


def cmd_rollback(args: argparse.Namespace, settings: Settings) -> int:
    body = {"revision": args.revision} if args.revision else {}
    result = _client(args, settings).request("POST", f"/admin/functions/{_function_name(args.name)}/rollback", body)
    print(f"{args.name} now serves {result.get('serving')}")
    return 0


def cmd_logs(args: argparse.Namespace, settings: Settings) -> int:
    name = _function_name(args.name)
    if args.tail < 0:
        raise CLIError(f"--tail {args.tail}: must be >= 0")
    client = _client(args, settings)
    try:
        if args.follow:
            for text in client.stream_logs(name, args.tail):
                sys.stdout.write(text)
                sys.stdout.flush()
            note("kold: the platform ended the log stream (it is shutting down)")
            return 0
        doc = client.request("GET", f"/admin/functions/{name}/logs?tail={args.tail}")
        sys.stdout.write(format_logs(doc if isinstance(doc, dict) else {}))
        return 0
    except KeyboardInterrupt:  # Ctrl-C is how one stops following: a normal end, not an error
        return 0


def format_logs(doc: dict[str, Any]) -> str:
    """GET .../logs as text: each instance's lines, prefixed `[instance id] ` when there are several
    (as `logs --follow` streams them)."""
    raw = doc.get("instances")
    instances = [i for i in (raw if isinstance(raw, list) else []) if isinstance(i, dict) and i.get("log")]
    out = []
    for inst in instances:
        prefix = f"[{inst.get('id')}] " if len(instances) > 1 else ""
        out += [f"{prefix}{line}\n" for line in str(inst["log"]).splitlines()]
    return "".join(out)


def cmd_invoke(args: argparse.Namespace, settings: Settings) -> int:
    """stdout: the answer alone (`kold invoke x hi > out.txt`); stderr: cold or warm, and the timings."""
    name = _function_name(args.name)
    if args.max_tokens < 1:
        raise CLIError(f"--max-tokens {args.max_tokens}: must be >= 1")
    if args.temperature is not None and not 0 <= args.temperature <= 2:
        raise CLIError(f"--temperature {args.temperature}: must be between 0 and 2")
    client = _client(args, settings)
    mode = args.mode or _default_mode(client, name, settings)
    body: dict[str, Any] = {"model": name, "max_tokens": args.max_tokens, "stream_options": {"include_usage": True}}
    if args.temperature is not None:
        body["temperature"] = args.temperature
    if mode == "chat":
        body["messages"] = [{"role": "user", "content": args.prompt}]
    else:
        body["prompt"] = args.prompt
    started = time.perf_counter()
    first: float | None = None
    headers: dict[str, str] = {}
    tokens = 0
    for response_headers, chunk in client.stream_chat(name, body):
        headers = response_headers
        if chunk.get("usage"):
            tokens = int(chunk["usage"].get("completion_tokens", 0))
        for choice in chunk.get("choices", []):
            text = choice.get("text") if "text" in choice else (choice.get("delta") or {}).get("content")
            if text:
                first = first if first is not None else time.perf_counter() - started
                print(text, end="", flush=True)
    total = time.perf_counter() - started
    print(flush=True)  # the answer ends its line (and out.txt ends with a newline)
    cold = headers.get("x-kold-cold") == "1"
    note(
        f"\n{'cold' if cold else 'warm'} ({mode}): first token {1000 * (first or total):.0f} ms, "
        f"{tokens} tokens in {1000 * total:.0f} ms"
    )
    for key in sorted(headers):
        if key.startswith("x-kold-") and key != "x-kold-cold":
            note(f"  {key}: {headers[key]}")
    return 0


def _default_mode(client: PlatformClient, name: str, settings: Settings) -> str:
    """chat for a model with a chat template, completion otherwise (kold/chat_model.py)."""
    from kold.chat_model import has_chat_template, serving_snapshot
    from kold.platform_client import PlatformError
    from kold.snapshot.errors import SnapshotError

    try:
        doc = client.request("GET", f"/admin/functions/{name}")  # a missing function fails here, in one line
    except PlatformError as exc:
        if exc.status != 403:
            raise
        note(f"kold: an invoke-scoped key cannot look {name} up: sending a completion (--chat to choose)")
        return "completion"
    uri = serving_snapshot(doc if isinstance(doc, dict) else {})
    if uri is None:
        return "completion"  # nothing serves: the gateway's answer to the request will say so
    try:
        return "chat" if has_chat_template(uri, settings.s3_options()) else "completion"
    except (SnapshotError, OSError, ValueError) as exc:
        note(f"kold: cannot tell whether {name} is a chat model ({exc}): sending a completion (--chat to choose)")
        return "completion"


def cmd_keys_create(args: argparse.Namespace, settings: Settings) -> int:
    """stdout: the secret alone (`KEY=$(kold keys create laptop)`); what it is: stderr."""
    key = _client(args, settings).request("POST", "/admin/keys", {"label": args.label, "scope": args.scope})
    note(f"{args.scope} key {key.get('key_id')} created; its secret follows, shown once: store it now")
    print(key.get("secret"))
    return 0


def cmd_keys_ls(args: argparse.Namespace, settings: Settings) -> int:
    keys = _client(args, settings).request("GET", "/admin/keys")
    if args.output:
        print_data(keys, args.output)
        return 0
    items = keys.get("keys", keys) if isinstance(keys, dict) else keys
    if not items:
        note("no keys: create one with `kold keys create LABEL` (from then on the gateway demands one)")
        return 0
    rows = [
        (
            str(k.get("key_id") or "-"),
            str(k.get("label") or "-"),
            str(k.get("scope") or "admin"),
            _created(k.get("created_at")),
        )
        for k in items
        if isinstance(k, dict)
    ]
    headers = ("KEY ID", "LABEL", "SCOPE")
    widths = [max(len(h), *(len(r[c]) for r in rows)) for c, h in enumerate(headers)]
    for row in [(*headers, "CREATED"), *rows]:
        print(f"{row[0]:<{widths[0]}}  {row[1]:<{widths[1]}}  {row[2]:<{widths[2]}}  {row[3]}")
    return 0


def _created(stamp: Any) -> str:
    try:
        return human_time(float(stamp))
    except (TypeError, ValueError):
        return "-"


def cmd_keys_revoke(args: argparse.Namespace, settings: Settings) -> int:
    if not args.key_id or not all(c.isalnum() or c in "-_" for c in args.key_id):
        raise CLIError(f"{args.key_id!r} is not a key id (`kold keys ls` lists them)")
    query = "?disable_auth=1" if args.disable_auth else ""
    _client(args, settings).request("DELETE", f"/admin/keys/{args.key_id}{query}")
    print(f"key {args.key_id} revoked" + ("; authentication is off" if args.disable_auth else ""))
    return 0
