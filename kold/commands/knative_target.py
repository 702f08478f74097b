"""`kold deploy|ls|describe|rm --target knative`: kold functions as Knative Services on a cluster.

platform.py's commands hand over here when `--target knative` is given. The cluster is named by
`--context`/`--namespace` (else KOLD_KNATIVE_CONTEXT/KOLD_KNATIVE_NAMESPACE, else the kubeconfig's
current context and its namespace; in a pod, its service account), and reached through
kold.knative.cluster. As for the local target, stdout is data (the URLs, a table, `-o json|yaml`,
the `--dry-run` YAML) and everything said to a person goes to stderr.
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from kold.errors import CLIError
from kold.output import human_bytes, human_time, note, print_data

if TYPE_CHECKING:
    from kold.knative.cluster import Cluster, ClusterConfig
    from kold.knative.readiness import Progress
    from kold.knative.service import FunctionDeploy
    from kold.settings import Settings
    from kold.snapshot.builder import BuildResult
    from kold.snapshot.resolve import ResolvedModel
    from kold.snapshot.store import ObjectReader, ObjectWriter

# what a runtime pod needs beside its weights and KV cache: the interpreter, torch, the HTTP server
RUNTIME_OVERHEAD_BYTES = 1 << 30
# the in-cluster Redis of manifests/ (the controller reads demand there); `--redis-url ''` renders no
# KOLD_REDIS_URL, so the pods take the kold-s3 Secret's (a Redis with a password), or report no demand
DEFAULT_REDIS_URL = "redis://kold-redis:6379/0"
WAIT_AFTER_DEADLINE_S = 60.0


def add_cluster_options(parser: argparse.ArgumentParser) -> None:
    """The flags that name a cluster (only with --target knative)."""
    group = parser.add_argument_group("with --target knative")
    group.add_argument(
        "--namespace", "-n", help="namespace of the functions (default: KOLD_KNATIVE_NAMESPACE, else the context's)"
    )
    group.add_argument("--context", help="kubeconfig context (default: KOLD_KNATIVE_CONTEXT, else the current one)")
    group.add_argument(
        "--kubeconfig",
        help="kubeconfig file (default: $KUBECONFIG, else ~/.kube/config; in a pod: its service account)",
    )


def add_deploy_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("deploy with --target knative")
    group.add_argument("--image", help="the runtime image the function's pods run (default: KOLD_KNATIVE_IMAGE)")
    group.add_argument(
        "--redis-url",
        help=f"where the pods report demand to the pre-warm controller (default: {DEFAULT_REDIS_URL}, the Redis of "
        "manifests/); no password: a Redis that needs one goes as KOLD_REDIS_URL in the namespace's kold-s3 "
        "Secret, with --redis-url '' (no KOLD_REDIS_URL on the pods but the Secret's; none there: no demand reported)",
    )
    group.add_argument(
        "--dry-run",
        action="store_true",
        help="print the Knative Service (YAML, or JSON with -o json) and stop: the snapshot is hashed for its id but "
        "not uploaded, and no cluster is contacted",
    )
    group.add_argument("--no-wait", action="store_true", help="apply the Service and return without waiting for Ready")


def refuse_cluster_options(args: argparse.Namespace) -> None:
    """A knative-only flag given to the local target is a mistake worth saying, not ignoring."""
    for flag in ("namespace", "context", "kubeconfig", "image", "redis_url", "dry_run", "no_wait"):
        if getattr(args, flag, None) not in (None, False):
            raise CLIError(
                f"--{flag.replace('_', '-')} is for --target knative (the local platform has no {flag.replace('_', ' ')})"
            )


# -- the cluster --------------------------------------------------------------------------------------


def cluster_config(args: argparse.Namespace, settings: Settings) -> ClusterConfig:
    """The cluster the flags name (`add_cluster_options`), else the KOLD_KNATIVE_* settings."""
    from kold.knative.cluster import ClusterConfig

    return ClusterConfig(
        context=args.context or settings.knative_context,
        namespace=args.namespace or settings.knative_namespace,
        kubeconfig=args.kubeconfig,
    )


@contextmanager
def _cluster(args: argparse.Namespace, settings: Settings) -> Iterator[Cluster]:
    from kold.knative.cluster import Cluster, KnativeError

    try:
        cluster = Cluster(cluster_config(args, settings))
    except KnativeError as exc:
        raise CLIError(str(exc)) from None
    try:
        yield cluster
    except KnativeError as exc:
        raise CLIError(str(exc)) from None
    finally:
        cluster.close()


def is_kolds(service: Mapping[str, Any]) -> bool:
    """Whether kold deployed this Knative Service (its `app.kubernetes.io/part-of: kold` label)."""
    from kold.knative import names

    labels = (service.get("metadata") or {}).get("labels") or {}
    return isinstance(labels, dict) and labels.get(names.PART_OF) == names.PART_OF_VALUE


def _refuse_foreign(cluster: Cluster, name: str) -> None:
    """Refuse to deploy over a Knative Service of that name that kold did not deploy: a forced
    server-side apply would silently take it over."""
    from kold.knative.cluster import NotFound

    try:
        existing = cluster.get_service(name)
    except NotFound:
        return
    if not is_kolds(existing):
        raise CLIError(
            f"{name} in namespace {cluster.namespace} is a Knative Service kold did not deploy: not replacing it "
            f"(choose another --name, or kubectl delete ksvc {name} -n {cluster.namespace} if you mean it)"
        )


def _function_name(name: str) -> str:
    from kold.gateway.names import InvalidNameError, validate_function_name

    try:
        return validate_function_name(name)
    except InvalidNameError as exc:
        raise CLIError(str(exc)) from None


# -- deploy -------------------------------------------------------------------------------------------


def deploy(args: argparse.Namespace, settings: Settings, name: str, prewarm: str | None) -> int:
    """stdout: the function's URL and OpenAI base_url (or the -o document, or the --dry-run YAML)."""
    from kold.knative.service import progress_deadline_s, render_service
    from kold.snapshot.store import normalize_store_uri

    store = normalize_store_uri(settings.store_uri)
    # the cheap refusals first (flags, store, cluster): the model is resolved (a Hub download, a GGUF's
    # hash) only once nothing else stands in the way
    _function(args, settings, name, prewarm, None, None)
    if args.dry_run:
        if store.startswith("file://"):
            note(f"kold: the store {store} is on this machine: pods could not read it (set KOLD_STORE=s3://...)")
        model, built = _hash_only(args, store, name)
        fn = _function(args, settings, name, prewarm, built, args.namespace or settings.knative_namespace, model.config)
        if args.output == "json":
            print_data(render_service(fn), "json")
            return 0
        import yaml

        print(yaml.safe_dump(render_service(fn), sort_keys=False, default_flow_style=False), end="")
        return 0
    if store.startswith("file://"):
        raise CLIError(
            f"the store is {store}, on this machine: the cluster's pods cannot read it; publish to S3 "
            "instead: set KOLD_STORE=s3://BUCKET/PREFIX (and KOLD_S3_ENDPOINT for a store that is not AWS), "
            "with the same credentials in the namespace's kold-s3 Secret"
        )
    with _cluster(args, settings) as cluster:
        # before a long download, hash or upload: the cluster answers, Knative is there, RBAC lets us read,
        # the name is free
        _refuse_foreign(cluster, name)
        model, built = _publish(args, store, settings, name)
        fn = _function(args, settings, name, prewarm, built, cluster.namespace, model.config)
        _refuse_foreign(cluster, name)  # again: one may have been made during the upload
        applied = cluster.apply_service(render_service(fn))
        generation = (applied.get("metadata") or {}).get("generation")
        note(
            f"service {name} applied in namespace {cluster.namespace}"
            + (f" (generation {generation})" if generation else "")
            + f" on {cluster.server}"
        )
        doc: dict[str, Any] = {
            "name": name,
            "namespace": cluster.namespace,
            "snapshot": {"id": built.manifest.id, "uri": built.uri},
        }
        if args.no_wait:
            url = (applied.get("status") or {}).get("url")
            note(f"not waiting for {name} to be Ready: `kold describe {name} --target knative` shows how it goes")
            return _print_deployed(args, {**doc, "ready": False}, name, url)
        timeout = settings.knative_wait_s or progress_deadline_s(fn.snapshot_bytes) + WAIT_AFTER_DEADLINE_S
        note(f"waiting for {name} to be Ready (at most {timeout:.0f} s) ...")
        progress = _wait(cluster, name, timeout)
        return _print_deployed(args, {**doc, "ready": True, "revision": progress.revision}, name, progress.url)


def _print_deployed(args: argparse.Namespace, doc: dict[str, Any], name: str, url: str | None) -> int:
    if url:
        doc.update(url=url, openai_base_url=f"{url.rstrip('/')}/v1")
    if args.output:
        print_data(doc, args.output)
        return 0
    if url:
        note(f"{name} is {'serving' if doc.get('ready') else 'deployed'}")
        print(f"  {url}")
        print(f"  OpenAI clients: base_url={doc['openai_base_url']}, model={name}")
    return 0


def _wait(cluster: Cluster, name: str, timeout_s: float) -> Progress:
    from kold.knative.readiness import FAILED, WaitTimeoutError, revision_failure, wait_ready

    try:
        progress = wait_ready(cluster, name, timeout_s, lambda p: note(f"  {p.message}"))
    except WaitTimeoutError as exc:
        raise CLIError(
            f"timed out after {timeout_s:.0f} s waiting for {name} to be Ready (last: {exc.last.message}); "
            f"it may still come up: `kold describe {name} --target knative`"
        ) from None
    if progress.state != FAILED:
        return progress
    reason, line = progress.reason, progress.message
    if progress.revision:  # the Revision's own condition names the cause the Service calls RevisionFailed
        from kold.knative.cluster import KnativeError

        try:
            failure = revision_failure(cluster.get_revision(progress.revision))
        except KnativeError:
            failure = None
        if failure is not None:
            reason, line = failure
    from dataclasses import replace

    kind = replace(progress, reason=reason, message=line).kind
    what = {
        "image-pull": "the image could not be pulled",
        "progress-deadline": "it did not become ready within its progress deadline",
        "revision": "its revision failed",
    }[kind]
    where = f"revision {progress.revision}" if progress.revision else name
    raise CLIError(f"{name} is not Ready: {what} ({where}: {line})")


def _function(
    args: argparse.Namespace,
    settings: Settings,
    name: str,
    prewarm: str | None,
    built: BuildResult | None,
    namespace: str | None,
    config: Mapping[str, Any] | None = None,
) -> FunctionDeploy:
    """The deploy's FunctionDeploy; with `built` None, a stand-in snapshot: the flags are checked by
    the same rules before anything is hashed or uploaded."""
    from kold.knative.service import FunctionDeploy

    memory = args.memory
    if memory is None and built is not None:
        from kold.resources import instance_memory

        memory = instance_memory(config, built.manifest.data_size, args.max_batch, None) + RUNTIME_OVERHEAD_BYTES
    try:
        return FunctionDeploy(
            name=name,
            image=args.image or settings.knative_image,
            snapshot_uri=built.uri if built else "s3://check/snapshots/0",
            snapshot_id=built.manifest.id if built else "0",
            snapshot_bytes=built.manifest.data_size if built else 0,
            namespace=namespace,
            min_instances=args.min_instances,
            max_instances=args.max_instances,
            target_concurrency=args.target_concurrency,
            idle_timeout_s=args.idle_timeout,
            request_timeout_s=args.request_timeout,
            device=args.device,
            max_batch=args.max_batch,
            cpus=args.cpus,
            memory_bytes=memory,
            prewarm=prewarm,
            node_cache=settings.knative_node_cache,
            redis_url=DEFAULT_REDIS_URL if args.redis_url is None else (args.redis_url or None),
        )
    except ValueError as exc:
        raise CLIError(str(exc)) from None


def _publish(args: argparse.Namespace, store: str, settings: Settings, name: str) -> tuple[ResolvedModel, BuildResult]:
    """The model resolved and its snapshot published exactly as the local target does both."""
    from kold.progress import ByteProgress
    from kold.snapshot import build_snapshot
    from kold.snapshot.resolve import resolve_model

    with ByteProgress(f"publish {name}") as progress:
        model = resolve_model(args.model, revision=args.revision, progress=progress)
        built = build_snapshot(model, store, s3=settings.s3_options(), progress=progress)
    note(f"snapshot {built.manifest.id} {'published' if built.uploaded else 'already in the store'}: {built.uri}")
    return model, built


def _hash_only(args: argparse.Namespace, store: str, name: str) -> tuple[ResolvedModel, BuildResult]:
    """The model resolved, and its snapshot's id, size and URI as a publish to `store` would give them,
    with nothing uploaded."""
    from kold.progress import ByteProgress
    from kold.snapshot import build_snapshot
    from kold.snapshot.resolve import resolve_model

    with ByteProgress(f"hash {name}") as progress:
        model = resolve_model(args.model, revision=args.revision, progress=progress)
        built = build_snapshot(model, _HashOnlyStore(store), progress=progress)
    note(f"snapshot {built.manifest.id} (not uploaded: --dry-run): {built.uri}")
    return model, built


class _HashOnlyStore:
    """A store that says it holds every snapshot: `build_snapshot` then stops after its hashing pass
    (the id is content-addressed), so a dry run shows the very URI a deploy would, and writes nothing."""

    def __init__(self, uri: str) -> None:
        self._uri = uri

    @property
    def uri(self) -> str:
        return self._uri

    def exists(self, key: str) -> bool:
        return True

    def _nothing(self, *_: object) -> Any:
        raise AssertionError("a dry run reads and writes nothing in the store")

    def size(self, key: str) -> int:
        return int(self._nothing(key))

    def get_bytes(self, key: str) -> bytes:
        return bytes(self._nothing(key))

    def put_bytes(self, key: str, data: bytes) -> None:
        self._nothing(key)

    def open_reader(self, key: str) -> ObjectReader:
        return self._nothing(key)  # type: ignore[no-any-return]

    def open_writer(self, key: str) -> ObjectWriter:
        return self._nothing(key)  # type: ignore[no-any-return]

    def list_keys(self, prefix: str) -> list[str]:
        return list(self._nothing(prefix))

    def delete_prefix(self, prefix: str) -> None:
        self._nothing(prefix)


# -- ls, describe, rm --------------------------------------------------------------------------------


def ls(args: argparse.Namespace, settings: Settings) -> int:
    from kold.knative.readiness import assess
    from kold.knative.service import scaling_of

    with _cluster(args, settings) as cluster:
        services = cluster.list_services()
        rows: list[dict[str, Any]] = []
        for svc in sorted(services, key=lambda s: str((s.get("metadata") or {}).get("name"))):
            progress = assess(svc)
            status = svc.get("status") or {}
            scaling = _safe(scaling_of, svc)
            rows.append(
                {
                    "name": (svc.get("metadata") or {}).get("name"),
                    "state": progress.state,
                    "serving": status.get("latestReadyRevisionName"),
                    "latest": status.get("latestCreatedRevisionName"),
                    "url": status.get("url"),
                    "min_instances": scaling.min_instances if scaling else None,
                    "max_instances": _max(scaling.max_instances) if scaling else None,
                    "prewarm": (scaling.prewarm if scaling else None) or "default",
                }
            )
        if args.output:
            print_data({"namespace": cluster.namespace, "functions": rows}, args.output)
            return 0
        if not rows:
            note(
                f"no functions in namespace {cluster.namespace}: deploy one with `kold deploy MODEL_DIR --name NAME --target knative`"
            )
            return 0
        table = [["NAME", "STATE", "SERVING", "SCALE", "URL"]]
        for r in rows:
            scale = f"{r['min_instances']}-{r['max_instances'] if r['max_instances'] is not None else '∞'}"
            table.append([str(r["name"]), r["state"], r["serving"] or "-", scale, r["url"] or "-"])
        _print_table(table)
    return 0


def describe(args: argparse.Namespace, settings: Settings) -> int:
    from kold.knative.cluster import NotFound

    name = _function_name(args.name)
    with _cluster(args, settings) as cluster:
        try:
            svc = cluster.get_service(name)
        except NotFound:
            raise CLIError(f"no function {name} in namespace {cluster.namespace}") from None
        revisions = cluster.list_revisions(name)
        doc = _describe_doc(svc, revisions, cluster.namespace)
    if args.output:
        print_data(doc, args.output)
    else:
        print(format_describe(doc))
    return 0


def rm(args: argparse.Namespace, settings: Settings) -> int:
    from kold.knative.cluster import NotFound

    name = _function_name(args.name)
    with _cluster(args, settings) as cluster:
        try:
            if not is_kolds(cluster.get_service(name)):
                raise CLIError(
                    f"{name} in namespace {cluster.namespace} is a Knative Service kold did not deploy: not removing "
                    f"it (kubectl delete ksvc {name} -n {cluster.namespace} if you mean it)"
                )
            cluster.delete_service(name)
        except NotFound:
            raise CLIError(f"no function {name} in namespace {cluster.namespace}") from None
        print(f"function {name} removed from namespace {cluster.namespace}")
    return 0


def _describe_doc(svc: dict[str, Any], revisions: list[dict[str, Any]], namespace: str) -> dict[str, Any]:
    """What describe shows, as data (-o json|yaml prints it as it is)."""
    from kold.knative.readiness import assess
    from kold.knative.service import floor_of, scaling_of

    status = svc.get("status") or {}
    scaling = _safe(scaling_of, svc)
    serving = status.get("latestReadyRevisionName")
    url = status.get("url")
    floor = None
    revs = []
    for rev in sorted(revisions, key=lambda r: str((r.get("metadata") or {}).get("name"))):
        meta = rev.get("metadata") or {}
        rstatus = rev.get("status") or {}
        ready: dict[str, Any] = next((c for c in rstatus.get("conditions") or [] if c.get("type") == "Ready"), {})
        rev_scaling = _safe(scaling_of, rev)
        rev_floor = floor_of(rev)
        if meta.get("name") == serving:
            floor = rev_floor
        traffic = sum(
            int(t.get("percent") or 0) for t in status.get("traffic") or [] if t.get("revisionName") == meta.get("name")
        )
        revs.append(
            {
                "name": meta.get("name"),
                "ready": ready.get("status", "Unknown"),
                "reason": ready.get("reason"),
                "traffic_percent": traffic,
                "actual_replicas": rstatus.get("actualReplicas"),
                "min_scale": rev_scaling.min_instances if rev_scaling else None,
                "floor": rev_floor,
                "snapshot": rev_scaling.snapshot_uri if rev_scaling else None,
                "created": meta.get("creationTimestamp"),
            }
        )
    return {
        "name": (svc.get("metadata") or {}).get("name"),
        "namespace": namespace,
        "deployed_by_kold": is_kolds(svc),
        "state": assess(svc).state,
        "message": assess(svc).message,
        "url": url,
        "openai_base_url": f"{url.rstrip('/')}/v1" if url else None,
        "latest_created_revision": status.get("latestCreatedRevisionName"),
        "latest_ready_revision": serving,
        "conditions": [
            {k: c.get(k) for k in ("type", "status", "reason", "message")}
            for c in status.get("conditions") or []
            if isinstance(c, dict)
        ],
        "scaling": None
        if scaling is None
        else {
            "min_instances": scaling.min_instances,
            "max_instances": _max(scaling.max_instances),
            "target_concurrency": scaling.target_concurrency,
            "idle_timeout_s": scaling.idle_timeout_s,
            "request_timeout_s": scaling.request_timeout_s,
            "progress_deadline_s": scaling.progress_deadline_s,
        },
        "prewarm": scaling.prewarm if scaling else None,
        "snapshot": None
        if scaling is None
        else {"uri": scaling.snapshot_uri, "id": scaling.snapshot_id, "bytes": scaling.snapshot_bytes},
        "floor": floor,
        "revisions": revs,
    }


def format_describe(doc: dict[str, Any], now: float | None = None) -> str:
    now = time.time() if now is None else now
    lines = [
        f"Name:       {doc['name']}",
        f"Namespace:  {doc['namespace']}",
        f"State:      {doc['state']}: {doc['message']}",
    ]
    if not doc.get("deployed_by_kold", True):
        lines.append(
            "Owner:      not kold's: a Knative Service kold did not deploy (no app.kubernetes.io/part-of=kold)"
        )
    if doc.get("url"):
        lines.append(f"URL:        {doc['url']}")
        lines.append(f"OpenAI:     base_url={doc['openai_base_url']}, model={doc['name']}")
    lines.append(
        f"Revisions:  latest created {doc.get('latest_created_revision') or '-'}, "
        f"latest ready {doc.get('latest_ready_revision') or '-'}"
    )
    snap = doc.get("snapshot") or {}
    if snap.get("uri"):
        size = f", {human_bytes(int(snap['bytes']))}" if snap.get("bytes") is not None else ""
        lines.append(f"Snapshot:   {snap['uri']}{size}")
    scaling = doc.get("scaling")
    if scaling:
        top = scaling["max_instances"] if scaling["max_instances"] is not None else "no limit"
        parts = [
            f"min {scaling['min_instances']}",
            f"max {top}",
            f"target {scaling['target_concurrency']} in flight per pod",
            f"scale-down delay {scaling['idle_timeout_s']:g} s",
        ]
        if scaling.get("request_timeout_s") is not None:
            parts.append(f"request timeout {scaling['request_timeout_s']:g} s")
        if scaling.get("progress_deadline_s") is not None:
            parts.append(f"progress deadline {scaling['progress_deadline_s']:g} s")
        lines.append(f"Scaling:    {', '.join(parts)}")
    lines.append(f"Pre-warm:   {doc.get('prewarm') or 'forecast (the default)'}")
    lines.append(f"Floor:      {_floor_text(doc.get('floor'), now)}")
    if doc.get("conditions"):
        lines.append("Conditions:")
        rows = [["TYPE", "STATUS", "REASON", "MESSAGE"]]
        rows += [[str(c.get(k) or "") for k in ("type", "status", "reason", "message")] for c in doc["conditions"]]
        lines += ["  " + line for line in _table(rows)]
    if doc.get("revisions"):
        lines.append("Revisions:")
        rows = [["NAME", "READY", "TRAFFIC", "PODS", "MIN-SCALE", "FLOOR"]]
        for r in doc["revisions"]:
            rows.append(
                [
                    str(r["name"]),
                    str(r["ready"]),
                    f"{r['traffic_percent']}%",
                    "-" if r["actual_replicas"] is None else str(r["actual_replicas"]),
                    "-" if r["min_scale"] is None else str(r["min_scale"]),
                    _floor_text(r["floor"], now) if r["floor"] else "-",
                ]
            )
        lines += ["  " + line for line in _table(rows)]
    return "\n".join(lines)


def _floor_text(floor: Any, now: float) -> str:
    if not isinstance(floor, dict):
        return "none (the revision's own min-scale)"
    text = f"{floor.get('instances', '?')} instances"
    until = floor.get("until")
    if isinstance(until, int | float) and math.isfinite(until):
        text += f" until {human_time(float(until), now)}"
    if floor.get("reason"):
        text += f" ({floor['reason']})"
    return text


def _max(value: int) -> int | None:
    from kold.knative.service import MAX_SCALE_UNLIMITED

    return None if value >= MAX_SCALE_UNLIMITED else value


def _safe(read: Callable[[dict[str, Any]], Any], obj: dict[str, Any]) -> Any:
    """A hand-edited annotation that kold cannot read is shown as unknown, not a failed listing."""
    try:
        return read(obj)
    except ValueError as exc:
        note(f"kold: {(obj.get('metadata') or {}).get('name')}: {exc}")
        return None


def _table(rows: list[list[str]]) -> list[str]:
    widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
    return ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows]


def _print_table(rows: list[list[str]]) -> None:
    for line in _table(rows):
        print(line)
