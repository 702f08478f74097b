"""A kold function as a Knative Service: rendered from a `FunctionDeploy`, and read back (`scaling_of`).

Pure: no cluster, no clock, no environment. `kold deploy --target knative` renders the Service here
and `--dry-run` prints exactly this dict; `kold ls`/`describe` and the pre-warm controller read a
Service's scaling back from the same annotations (names.py), so the two directions cannot drift.

The shape follows manifests/base/function.yaml (the kustomize template a person edits by hand),
filled in from the deploy's flags:

- `--min-instances` → `min-scale`, `--max-instances` → `max-scale`, `--target-concurrency` → the
  KPA `target` (in-flight requests per pod), `--idle-timeout` → `scale-down-delay`,
  `--request-timeout` → `timeoutSeconds` and `responseStartTimeoutSeconds`.
- `containerConcurrency` (the hard cap the queue-proxy enforces per pod) is twice the target, and at
  least `--max-batch`. The autoscaler aims at `target`; a burst that arrives while a new pod is
  still restoring its weights (seconds to minutes) is then taken into the running pods' continuous
  batch, a little slower per token, instead of queueing behind that cold start. Twice, not
  unlimited (0), so one pod is never handed a whole burst while others are on their way.
- `--device cuda` asks for `nvidia.com/gpu: 1` and tolerates the `nvidia.com/gpu` taint (Knative's
  `kubernetes.podspec-tolerations` feature flag must be on).
- The shm cache tier: with `node_cache` the pod mounts the node agent's `/dev/shm/kold-node` (a
  hostPath, Knative's `kubernetes.podspec-volumes-hostpath` flag) read-only at `/kold-node` (as
  Knative's defaulting makes every hostPath mount; said here so the YAML shows what the pod gets),
  so a restore maps what the agent prefetched (`/kold-node/cache`) and finds its host pool
  (`/kold-node/pool`); without it, a pod-private memory `emptyDir` sized for one snapshot.
- Memory: the pod asks for, and is limited to, `memory_bytes`, plus the private tier when there is
  one (tmpfs pages are charged to the pod that writes them, and a restore from S3 fills that tier
  as it goes). The node tier's pages were written, and are charged, by the agent.
- `serving.knative.dev/progress-deadline`: see `progress_deadline_s`.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from typing import Any, Final

from kold.knative import names

Doc = dict[str, Any]

CONTAINER = "runtime"
PORT = 8080  # the image's; Knative passes it to the runtime as $PORT
# KOLD_S3_ENDPOINT, KOLD_S3_REGION, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY; KOLD_REDIS_URL when its
# Redis needs a password (never a plain env value: that is written in the Service and every Revision)
S3_SECRET = "kold-s3"
NODE_DIR = "/dev/shm/kold-node"  # the node agent's tmpfs on the host (manifests/base/node-agent.yaml)
NODE_MOUNT = "/kold-node"
PRIVATE_SHM_DIR = "/dev/shm/kold"
DEVICES = ("cpu", "cuda")

# Knative's limits that a user's flags can break (its admission webhook would refuse the Service).
MAX_SCALE_DOWN_DELAY_S: Final = 3600  # autoscaling.knative.dev/scale-down-delay: 0s .. 1h
MAX_SCALE_UNLIMITED: Final = 2**31 - 1  # what `scaling_of` reports for max-scale 0 or absent (no limit)
KNATIVE_DEFAULT_TARGET: Final = 100  # config-autoscaler's container-concurrency-target-default
WINDOW: Final = "60s"  # the stable window the KPA averages concurrency over (Knative's default)
# How long the last pod stays once the KPA has decided on zero (`lastPodRetention` in
# pkg/reconciler/autoscaling/kpa/scaler.go: the annotation, else config-autoscaler's value). Zero, said
# on every revision: `--idle-timeout` (scale-down-delay, which delays the decision to zero too) and
# the pre-warm controller's floors already decide how long an idle pod is kept, and a cluster-wide
# retention would add idle time to every scale to zero that neither asked for.
SCALE_TO_ZERO_RETENTION: Final = "0s"

# The progress deadline: see progress_deadline_s.
KNATIVE_DEFAULT_PROGRESS_DEADLINE_S: Final = 600
RESTORE_BYTES_PER_S: Final = 50_000_000  # a conservative S3 throughput for one pod's restore
STARTUP_S: Final = 180  # scheduling, pulling a (CUDA) image, interpreter and torch import
DEADLINE_MARGIN: Final = 2.0


class InvalidFunctionError(ValueError):
    """A deploy that Knative's webhook (or kold) would refuse; the message names the flag and the rule."""


@dataclass(frozen=True)
class FunctionDeploy:
    """Everything a function's Knative Service is rendered from (validated on construction).

    `memory_bytes`: what the runtime container needs (weights, KV cache, interpreter); None leaves
    memory unrequested. `redis_url`: where the runtime reports its demand, without a password (None:
    no KOLD_REDIS_URL entry, so the pods take the one in the `S3_SECRET` Secret, if any, through
    envFrom; an env entry would override it).
    """

    name: str
    image: str
    snapshot_uri: str
    snapshot_id: str
    snapshot_bytes: int
    namespace: str | None = None
    min_instances: int = 0
    max_instances: int = 4
    target_concurrency: int = 4
    idle_timeout_s: float = 60.0
    request_timeout_s: float = 300.0
    device: str = "cpu"
    max_batch: int = 8
    cpus: float | None = 1.0
    memory_bytes: int | None = None
    prewarm: str | None = None
    node_cache: bool = True
    redis_url: str | None = None

    def __post_init__(self) -> None:
        _validate(self)


def _validate(fn: FunctionDeploy) -> None:
    from kold.gateway.names import InvalidNameError, validate_function_name

    try:
        validate_function_name(fn.name)
    except InvalidNameError as exc:
        raise InvalidFunctionError(str(exc)) from None
    if not fn.image.strip():
        raise InvalidFunctionError("--image: must name the runtime image")
    if fn.min_instances < 0:
        raise InvalidFunctionError(f"--min-instances {fn.min_instances}: must be >= 0")
    if fn.max_instances < 1:
        raise InvalidFunctionError(f"--max-instances {fn.max_instances}: must be >= 1")
    if fn.min_instances > fn.max_instances:
        raise InvalidFunctionError(
            f"--min-instances {fn.min_instances} is above --max-instances {fn.max_instances} "
            "(Knative refuses min-scale > max-scale)"
        )
    if fn.target_concurrency < 1:
        raise InvalidFunctionError(
            f"--target-concurrency {fn.target_concurrency}: must be >= 1 (Knative's target is > 0)"
        )
    if not 0 <= fn.idle_timeout_s <= MAX_SCALE_DOWN_DELAY_S:
        raise InvalidFunctionError(
            f"--idle-timeout {fn.idle_timeout_s:g}: must be between 0 and {MAX_SCALE_DOWN_DELAY_S} s "
            "(Knative's scale-down-delay is at most 1h)"
        )
    if not fn.request_timeout_s >= 1:
        raise InvalidFunctionError(f"--request-timeout {fn.request_timeout_s:g}: must be at least 1 s")
    if fn.device not in DEVICES:
        raise InvalidFunctionError(f"--device {fn.device!r}: a Knative function runs on cpu or cuda (one GPU per pod)")
    if fn.max_batch < 1:
        raise InvalidFunctionError(f"--max-batch {fn.max_batch}: must be >= 1")
    if fn.cpus is not None and not fn.cpus > 0:
        raise InvalidFunctionError(f"--cpus {fn.cpus:g}: must be > 0")
    if fn.memory_bytes is not None and fn.memory_bytes <= 0:
        raise InvalidFunctionError(f"--memory {fn.memory_bytes}: must be > 0")
    if fn.snapshot_bytes < 0:
        raise InvalidFunctionError(f"snapshot size {fn.snapshot_bytes}: must be >= 0")
    if not fn.snapshot_uri or not fn.snapshot_id:
        raise InvalidFunctionError("a function needs its snapshot's URI and id")
    if fn.redis_url and _has_password(fn.redis_url):  # the message never repeats the URL: it holds the password
        raise InvalidFunctionError(
            "--redis-url carries a password, which would be written in the Service, every Revision and "
            f"--dry-run's output: put KOLD_REDIS_URL in the namespace's {S3_SECRET} Secret (the function's pods "
            "read it through envFrom) and deploy with --redis-url ''"
        )
    if fn.prewarm is not None:
        from kold.controller.policies.registry import parse_policy

        try:
            parse_policy(fn.prewarm)
        except ValueError as exc:
            raise InvalidFunctionError(f"--prewarm: {exc}") from None


def _has_password(url: str) -> bool:
    """A password in the URL's user info, or as redis-py's `?password=` query argument."""
    from urllib.parse import parse_qs, urlsplit

    parts = urlsplit(url)
    return bool(parts.password) or "password" in parse_qs(parts.query)


def progress_deadline_s(snapshot_bytes: int) -> int:
    """Seconds a new revision may take to become Ready before Knative fails it.

    deadline = max(600, ceil_to_minute(2 × (180 + snapshot_bytes / 50 MB/s)))

    The expected first load is the start-up (scheduling, an image pull, the interpreter: 180 s)
    plus a restore of the whole snapshot from S3 at 50 MB/s, a conservative figure for one pod
    reading a shared object store (loopback S3 gives 1 GB/s; cloud object stores a few hundred
    MB/s per client); twice that is the margin for a slow node or a busy store. Never below
    Knative's own default of 600 s: a deadline exists to catch a revision that will never start,
    and a long first load of a large model must not be mistaken for one (knative/serving#15316).
    """
    expected = STARTUP_S + max(snapshot_bytes, 0) / RESTORE_BYTES_PER_S
    return max(KNATIVE_DEFAULT_PROGRESS_DEADLINE_S, 60 * math.ceil(DEADLINE_MARGIN * expected / 60))


def container_concurrency(target: int, max_batch: int) -> int:
    """The per-pod hard cap: twice the autoscaler's target, at least one full batch (module docstring)."""
    return max(2 * target, max_batch)


def render_service(fn: FunctionDeploy) -> Doc:
    """The function's Knative Service (`serving.knative.dev/v1`), as a dict ready to apply or print."""
    labels = {names.PART_OF: names.PART_OF_VALUE, names.FUNCTION: fn.name}
    annotations = {
        names.SNAPSHOT_URI: fn.snapshot_uri,
        names.SNAPSHOT_ID: fn.snapshot_id,
        names.SNAPSHOT_BYTES: str(fn.snapshot_bytes),
    }
    if fn.prewarm is not None:
        annotations[names.PREWARM] = fn.prewarm.strip()
    metadata: Doc = {"name": fn.name, "labels": dict(labels), "annotations": annotations}
    if fn.namespace:
        metadata["namespace"] = fn.namespace
    template_annotations = {
        names.AUTOSCALING_CLASS: names.KPA_CLASS,
        names.AUTOSCALING_METRIC: names.METRIC_CONCURRENCY,
        names.TARGET: str(fn.target_concurrency),
        names.MIN_SCALE: str(fn.min_instances),
        names.MAX_SCALE: str(fn.max_instances),
        # a new revision starts one pod, so that it can become Ready (0 needs allow-zero-initial-scale)
        names.INITIAL_SCALE: "1",
        names.SCALE_DOWN_DELAY: go_duration(math.ceil(fn.idle_timeout_s)),
        names.SCALE_TO_ZERO_RETENTION: SCALE_TO_ZERO_RETENTION,
        names.WINDOW: WINDOW,
        names.PROGRESS_DEADLINE: go_duration(progress_deadline_s(fn.snapshot_bytes)),
        names.SNAPSHOT_URI: fn.snapshot_uri,
    }
    timeout = math.ceil(fn.request_timeout_s)
    pod: Doc = {
        "containerConcurrency": container_concurrency(fn.target_concurrency, fn.max_batch),
        # the whole request, and the wait for its first byte: a streamed answer's first token may
        # come only after a long prompt's prefill
        "timeoutSeconds": timeout,
        "responseStartTimeoutSeconds": timeout,
        "containers": [_container(fn)],
        "volumes": [_volume(fn)],
    }
    if fn.device == "cuda":
        pod["tolerations"] = [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    return {
        "apiVersion": names.API_VERSION,
        "kind": "Service",
        "metadata": metadata,
        "spec": {"template": {"metadata": {"labels": dict(labels), "annotations": template_annotations}, "spec": pod}},
    }


def _container(fn: FunctionDeploy) -> Doc:
    args = ["runtime", "serve", "--snapshot", fn.snapshot_uri, "--host", "0.0.0.0", "--device", fn.device]
    args += ["--max-batch", str(fn.max_batch), "--served-model-name", fn.name]
    args += ["--termination-log", "/dev/termination-log"]
    env: list[Doc] = []
    if fn.redis_url:
        env.append({"name": "KOLD_REDIS_URL", "value": fn.redis_url})
    if fn.node_cache:
        env.append({"name": "KOLD_CACHE_SHM_DIR", "value": f"{NODE_MOUNT}/cache"})
        env.append({"name": "KOLD_HOST_POOL_DIR", "value": f"{NODE_MOUNT}/pool"})
    else:
        env.append({"name": "KOLD_CACHE_SHM_DIR", "value": PRIVATE_SHM_DIR})
        env.append({"name": "KOLD_CACHE_SHM_BYTES", "value": str(_private_tier_bytes(fn))})
    # no disk tier: it would fill the container's writable layer, ephemeral storage the kubelet evicts for
    env.append({"name": "KOLD_CACHE_DISK_BYTES", "value": "0"})
    requests: Doc = {}
    limits: Doc = {}
    if fn.cpus is not None:
        requests["cpu"] = cpu_quantity(fn.cpus)  # no CPU limit: throttling a decode loop costs latency
    if fn.memory_bytes is not None:
        private = 0 if fn.node_cache else _private_tier_bytes(fn)
        requests["memory"] = memory_quantity(fn.memory_bytes + private)
        limits["memory"] = requests["memory"]
    if fn.device == "cuda":
        limits["nvidia.com/gpu"] = "1"
    resources = {k: v for k, v in (("requests", requests), ("limits", limits)) if v}
    return {
        "name": CONTAINER,
        "image": fn.image,
        "args": args,
        "ports": [{"name": "http1", "containerPort": PORT}],
        "env": env,
        "envFrom": [{"secretRef": {"name": S3_SECRET}}],
        # /healthz answers as soon as the server listens; /readyz once the weights are in place
        "readinessProbe": {"httpGet": {"path": "/readyz"}, "periodSeconds": 2, "failureThreshold": 3},
        "livenessProbe": {"httpGet": {"path": "/healthz"}, "periodSeconds": 10, "failureThreshold": 6},
        "volumeMounts": [
            {"name": "kold-node", "mountPath": NODE_MOUNT, "readOnly": True} if fn.node_cache else _private_mount()
        ],
        **({"resources": resources} if resources else {}),
        # the image runs as uid 10001 (Dockerfile); nothing it does needs privileges
        "securityContext": {
            "runAsNonRoot": True,
            "allowPrivilegeEscalation": False,
            "capabilities": {"drop": ["ALL"]},
            "seccompProfile": {"type": "RuntimeDefault"},
        },
    }


def _private_mount() -> Doc:
    return {"name": "shm-cache", "mountPath": PRIVATE_SHM_DIR}


def _volume(fn: FunctionDeploy) -> Doc:
    if fn.node_cache:
        return {"name": "kold-node", "hostPath": {"path": NODE_DIR, "type": "DirectoryOrCreate"}}
    return {
        "name": "shm-cache",
        "emptyDir": {"medium": "Memory", "sizeLimit": memory_quantity(_private_tier_bytes(fn))},
    }


def _private_tier_bytes(fn: FunctionDeploy) -> int:
    """One snapshot and its model files (tokenizer, config: well under 64 MiB)."""
    return fn.snapshot_bytes + (64 << 20)


# -- quantities and durations ---------------------------------------------------------------------


def cpu_quantity(cpus: float) -> str:
    """Kubernetes CPU quantity: whole CPUs as "2", fractions in millicores ("1500m")."""
    milli = math.ceil(cpus * 1000)
    return str(milli // 1000) if milli % 1000 == 0 else f"{milli}m"


def memory_quantity(n: int) -> str:
    """Bytes as a Kubernetes quantity in whole MiB, rounded up ("16384Mi")."""
    return f"{math.ceil(n / (1 << 20))}Mi"


def go_duration(seconds: int) -> str:
    """Whole seconds as a Go duration Knative parses ("90s")."""
    return f"{int(seconds)}s"


_GO_DURATION = re.compile(r"(?:\d+(?:\.\d*)?|\.\d+)(?:ns|us|µs|ms|s|m|h)")
_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)")
_UNIT_S = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_go_duration(text: str) -> float:
    """A Go `time.ParseDuration` string ("5m", "90s", "1h30m", "1.5m", "0") in seconds; ValueError else."""
    text = text.strip()
    if text in ("0", "+0", "-0"):
        return 0.0
    body = text.removeprefix("+")
    if not body or _GO_DURATION.sub("", body) != "":
        raise ValueError(f"{text!r} is not a duration (examples: 90s, 5m, 1h30m)")
    return sum(float(n) * _UNIT_S[unit] for n, unit in _DURATION_PART.findall(body))


# -- the reverse: a Service's scaling, for ls, describe and the controller --------------------------


@dataclass(frozen=True, slots=True)
class FunctionScaling:
    """A Service's scaling as its template's annotations say (it fits the controller's `Spec`).

    Absent annotations read as Knative's defaults: min 0, no max (`MAX_SCALE_UNLIMITED`), the
    containerConcurrency (else 100) as target, no scale-down delay.
    """

    name: str
    min_instances: int
    max_instances: int
    target_concurrency: int
    idle_timeout_s: float
    request_timeout_s: float | None
    prewarm: str | None
    snapshot_uri: str | None
    snapshot_id: str | None
    snapshot_bytes: int | None
    progress_deadline_s: float | None

    @property
    def unlimited(self) -> bool:
        return self.max_instances >= MAX_SCALE_UNLIMITED


# the shared design's names for the same thing
ScalingView = FunctionScaling


def scaling_of(service: Doc) -> FunctionScaling:
    """Read a Service's (or a Revision's: same annotation names, under metadata) scaling back.

    Raises InvalidFunctionError when an annotation kold reads is present but malformed (someone edited
    the Service by hand): the message names the annotation.
    """
    meta = _dict(service.get("metadata"))
    spec = _dict(service.get("spec"))
    template = _dict(spec.get("template"))
    if template:  # a Service: the revision template's annotations and pod spec
        annotations = _strings(_dict(template.get("metadata")).get("annotations"))
        pod = _dict(template.get("spec"))
    else:  # a Revision: its own annotations and spec
        annotations = _strings(meta.get("annotations"))
        pod = spec
    own = _strings(meta.get("annotations"))
    cc = pod.get("containerConcurrency")
    default_target = cc if isinstance(cc, int) and cc > 0 else KNATIVE_DEFAULT_TARGET
    max_scale = _int(annotations, names.MAX_SCALE, 0)
    timeout = pod.get("timeoutSeconds")
    deadline = annotations.get(names.PROGRESS_DEADLINE)
    size = own.get(names.SNAPSHOT_BYTES)
    return FunctionScaling(
        name=str(meta.get("name", "")),
        min_instances=_int(annotations, names.MIN_SCALE, 0),
        max_instances=max_scale if max_scale > 0 else MAX_SCALE_UNLIMITED,
        target_concurrency=max(1, math.ceil(_float(annotations, names.TARGET, default_target))),
        idle_timeout_s=_duration(annotations, names.SCALE_DOWN_DELAY, 0.0),
        request_timeout_s=float(timeout) if isinstance(timeout, int | float) else None,
        prewarm=own.get(names.PREWARM) or None,
        snapshot_uri=annotations.get(names.SNAPSHOT_URI) or own.get(names.SNAPSHOT_URI),
        snapshot_id=own.get(names.SNAPSHOT_ID),
        snapshot_bytes=int(size) if size is not None and size.isdigit() else None,
        progress_deadline_s=_duration(annotations, names.PROGRESS_DEADLINE, 0.0) if deadline else None,
    )


function_spec = scaling_of


def floor_of(revision: Doc) -> Doc | None:
    """The floor the pre-warm controller holds on a Revision (`names.FLOOR`), or None."""
    text = _strings(_dict(revision.get("metadata")).get("annotations")).get(names.FLOOR)
    if not text:
        return None
    try:
        floor = json.loads(text)
    except ValueError:
        return None
    return floor if isinstance(floor, dict) else None


def _dict(value: Any) -> Doc:
    return value if isinstance(value, dict) else {}


def _strings(value: Any) -> dict[str, str]:
    return {str(k): str(v) for k, v in value.items() if v is not None} if isinstance(value, dict) else {}


def _float(annotations: dict[str, str], key: str, default: float) -> float:
    if key not in annotations:
        return default
    try:
        value = float(annotations[key])
    except ValueError:
        raise InvalidFunctionError(f"annotation {key}: {annotations[key]!r} is not a number") from None
    if not math.isfinite(value) or value < 0:
        raise InvalidFunctionError(f"annotation {key}: {annotations[key]!r} is not a number >= 0")
    return value


def _int(annotations: dict[str, str], key: str, default: int) -> int:
    value = _float(annotations, key, default)
    if value != int(value):
        raise InvalidFunctionError(f"annotation {key}: {annotations[key]!r} is not a whole number")
    return int(value)


def _duration(annotations: dict[str, str], key: str, default: float) -> float:
    if key not in annotations:
        return default
    try:
        return parse_go_duration(annotations[key])
    except ValueError as exc:
        raise InvalidFunctionError(f"annotation {key}: {exc}") from None
