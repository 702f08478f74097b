"""`kold runtime serve`: one instance of the inference runtime (what a Knative pod runs).

Only what the start path needs is imported: the server (FastAPI, uvicorn, prometheus-client) before
listening; torch, the model and the tokenizer in the background load, after listening.

`main(argv)` runs `kold runtime ...` without the rest of the CLI: the local platform's fork template
(gateway/fork_template.py) enters a forked instance through it, with the argv and exit statuses that
`python -m kold runtime serve ...` has, so a forked instance and a spawned one behave the same.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
import threading
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from kold import __version__
from kold.errors import CLIError, run_command
from kold.settings import Settings

if TYPE_CHECKING:
    from kold.controller.demand import DemandStore
    from kold.runtime.demand import DemandReporting


def register(top: Any) -> None:
    parser = top.add_parser("runtime", help="run the inference runtime of one instance")
    sub = parser.add_subparsers(dest="runtime_command", required=True, metavar="SUBCOMMAND")
    serve = sub.add_parser(
        "serve",
        help="serve a snapshot over OpenAI-compatible HTTP (listens at once, loads in the background)",
    )
    serve.add_argument("--snapshot", required=True, metavar="URI", help="snapshot URI: <store>/snapshots/<id>")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port (default: $PORT, as Knative sets it, else 8080; 0: any)")
    serve.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default cpu)")
    serve.add_argument("--max-batch", type=int, help="sequences decoded together (default KOLD_RUNTIME_MAX_BATCH)")
    serve.add_argument("--max-seq-len", type=int, help="context limit in tokens (default: the model's)")
    serve.add_argument("--served-model-name", metavar="NAME", help="the model name clients use (default: the id)")
    serve.add_argument(
        "--termination-log",
        metavar="PATH",
        help="where a failed load writes its cause as JSON before the exit (Kubernetes' /dev/termination-log)",
    )
    serve.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "bfloat16", "float32", "float16"],
        help="compute dtype (default auto: the snapshot's; another dtype converts the weights after the restore, "
        "a copy that doubles their memory for bf16 -> fp32)",
    )
    serve.set_defaults(handler=cmd_serve)


def main(argv: Sequence[str]) -> int:
    """`kold runtime ...` (argv as `kold` takes it: `["runtime", "serve", "--snapshot", URI, ...]`); an exit status."""
    parser = argparse.ArgumentParser(prog="kold")
    parser.add_argument("--version", action="version", version=f"kold {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at DEBUG level")
    register(parser.add_subparsers(dest="command", required=True, metavar="COMMAND"))
    return run_command(parser, argv)


def cmd_serve(args: argparse.Namespace, settings: Settings) -> int:
    from kold.runtime.lifecycle import process_start_time
    from kold.snapshot.store import parse_snapshot_uri

    process_start = process_start_time()
    ref = parse_snapshot_uri(args.snapshot)  # a bad URI fails here, before anything listens
    demand = demand_reporting(settings, args.served_model_name, ref.snapshot_id)
    # torch's import (~1.8 s here) is the longest step of a cold start: begin it now, beside the
    # server's own imports, rather than after listening. Measured on the 1b model from the shm tier:
    # ready at 2.5-2.7 s instead of 2.9-3.9 s; the port opens ~0.4 s later, which no client sees (a
    # request sent early waits in the connection backlog, as it would wait in the model queue).
    threading.Thread(target=importlib.import_module, args=("torch",), name="kold-import-torch", daemon=True).start()
    port = settings.port if args.port is None else args.port
    if not 0 <= port <= 65535:
        raise CLIError(f"--port {port}: not a port number")
    max_batch = args.max_batch or settings.runtime_max_batch
    max_seq_len = args.max_seq_len or settings.runtime_max_seq_len
    if max_batch < 1 or (max_seq_len is not None and max_seq_len < 2):
        raise CLIError("--max-batch must be >= 1 and --max-seq-len >= 2")
    _log_events(verbose=args.verbose)

    # The load (restore, and the model build beside it) starts when the port listens, ~0.8 s in. Starting
    # it at process start instead was measured slower (1b, cold local disk, alternating runs: first
    # token 4.7-6.1 s against 4.2-4.3 s): the restore's threads, torch's import and the server's
    # imports then all compete for the GIL, and torch's import took 3-4.6 s instead of 1.4-1.6 s.
    from kold.runtime.backend import snapshot_loader
    from kold.runtime.server import ServeOptions, serve

    names = [args.served_model_name or ref.snapshot_id, ref.snapshot_id, ref.uri]
    options = ServeOptions(
        host=args.host,
        port=port,
        model_names=tuple(dict.fromkeys(names)),
        max_waiting=settings.runtime_max_waiting,
        queue_timeout_s=settings.runtime_queue_timeout_s,
        drain_timeout_s=settings.runtime_drain_timeout_s,
        max_body_bytes=settings.max_body_bytes,
        header_timeout_s=settings.header_timeout_s,
        body_timeout_s=settings.body_timeout_s,
        termination_log=args.termination_log,
        instance_token=settings.instance_token,
    )
    loader = snapshot_loader(
        ref.uri,
        device=args.device,
        max_batch=max_batch,
        max_seq_len=max_seq_len,
        cache=settings.node_cache,
        s3=settings.s3_options(),
        readers=settings.restore_readers,
        dtype=args.dtype,
        pool=settings.host_pool,
        verify_tiers=settings.verify_tiers,
    )
    return serve(options, loader, process_start=process_start, demand=demand)


def demand_reporting(settings: Settings, served_name: str | None, snapshot_id: str) -> DemandReporting | None:
    """Whether and as what the instance reports its demand to Redis (KOLD_RUNTIME_DEMAND): `auto`
    under Knative (K_SERVICE) with KOLD_REDIS_URL set, `on` always (a CLIError when it cannot), `off`
    never. The function is K_SERVICE, else the served model name; the revision K_REVISION, else the
    snapshot id."""
    mode = settings.runtime_demand
    if mode == "off" or (mode == "auto" and not (settings.k_service and settings.redis_url)):
        return None
    function = settings.k_service or served_name
    if not function:
        raise CLIError("KOLD_RUNTIME_DEMAND=on needs a function name: set K_SERVICE or --served-model-name")
    if not settings.redis_url:
        raise CLIError("KOLD_RUNTIME_DEMAND=on needs KOLD_REDIS_URL: the Redis the pre-warm controller reads")
    from urllib.parse import urlsplit

    from kold.gateway.names import InvalidNameError, validate_function_name
    from kold.runtime.demand import DemandReporting

    source = "K_SERVICE" if settings.k_service else "--served-model-name"
    try:
        validate_function_name(function)
    except InvalidNameError as exc:
        raise CLIError(f"demand reporting: {source} {function!r} is not a function name: {exc}") from None
    url = settings.redis_url
    scheme = urlsplit(url).scheme
    if scheme not in ("redis", "rediss", "unix"):  # the URL itself is not echoed: it may hold a password
        raise CLIError(f"KOLD_REDIS_URL is not a Redis URL (scheme {scheme!r}; redis://, rediss:// or unix://)")
    return DemandReporting(function, settings.k_revision or snapshot_id, lambda: _demand_store(url))


def _demand_store(redis_url: str) -> DemandStore:
    """The demand store over a Redis client with short timeouts, as the local platform's (a Redis that
    is away costs a write half a second, never a request anything). Made by the runtime's writer
    thread on its first write, so redis is not imported on the start path."""
    import redis
    from redis.backoff import ExponentialBackoff
    from redis.retry import Retry

    from kold.controller.demand import DemandStore

    retry = Retry(ExponentialBackoff(cap=0.05, base=0.01), 1)
    client = redis.Redis.from_url(redis_url, socket_connect_timeout=0.25, socket_timeout=0.25, retry=retry)
    return DemandStore(client, prefix="kold:")


def _log_events(*, verbose: bool) -> None:
    """The runtime's structured events (startup, first_token, drain) as bare JSON lines on stderr."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    events = logging.getLogger("kold.runtime.events")
    events.addHandler(handler)
    events.setLevel(logging.INFO)
    events.propagate = False
    logging.getLogger("kold.runtime").setLevel(logging.DEBUG if verbose else logging.INFO)
