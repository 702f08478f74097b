"""All of kold's configuration, read from `KOLD_*` environment variables in one place.

Library code never reads the environment: it takes explicit arguments. The CLI (and later the
runtime and platform entry points) build a `Settings` once and pass what each part needs.
"""

from __future__ import annotations

import os
import re
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Literal

from pydantic import BeforeValidator, Field
from pydantic_settings import BaseSettings, SettingsConfigDict

if TYPE_CHECKING:
    from kold.snapshot.cache import NodeCache
    from kold.snapshot.hostpool import HostPool
    from kold.snapshot.store import S3Options

_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(?:i?b)?\s*$", re.IGNORECASE)


def parse_size(value: object) -> int:
    """'8GiB', '512M', '1.5g' or a plain integer of bytes."""
    if isinstance(value, int):
        return value
    match = _SIZE.match(str(value))
    if not match:
        raise ValueError(f"{value!r} is not a size (examples: 8GiB, 512M, 1048576)")
    return int(float(match.group(1)) * _UNITS[match.group(2).lower()])


Size = Annotated[int, BeforeValidator(parse_size), Field(ge=0)]
# an optional directory: an empty variable (KOLD_X=) means unset, not the current directory
OptionalDir = Annotated[Path | None, BeforeValidator(lambda v: None if v == "" else v)]


def _state_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "kold"


def _physical_memory() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        return 8 << 30


def node_memory() -> int:
    """The memory this node gives kold: physical memory, or the cgroup's limit when lower (in a
    container /proc shows the host's memory, but a tmpfs page is charged to the cgroup that wrote it)."""
    limits = [_physical_memory()]
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            limits.append(int(Path(path).read_text().strip()))
        except (OSError, ValueError):  # absent, or "max": no limit
            continue
    return min(limits)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="KOLD_", extra="ignore")

    home: Path = Field(default_factory=_state_dir, description="state directory (store, caches, logs)")
    store: str = Field(default="", description="snapshot store URI: file:///path or s3://bucket/prefix")
    s3_endpoint: str | None = Field(default=None, description="S3 endpoint URL (MinIO, rclone, ...); AWS if unset")
    s3_region: str | None = None
    s3_concurrency: int = Field(default=8, ge=1, le=256)
    # A quarter of RAM in /dev/shm by default: enough for a few hot models without starving instances.
    cache_shm_dir: Path = Path("/dev/shm/kold")
    cache_shm_bytes: Size = Field(default_factory=lambda: _physical_memory() // 4)
    cache_disk_dir: OptionalDir = None
    cache_disk_bytes: Size = 20 << 30
    restore_readers: int | None = Field(default=None, ge=1, le=256)
    # pre-faulted host memory that CPU restores claim instead of faulting in fresh pages (see
    # snapshot/hostpool.py). Set: a pool you manage (`kold snapshot pool fill`), used as it is and
    # never resized. Unset: `kold up` keeps one sized from the deployed functions (KOLD_HOST_POOL).
    host_pool_dir: OptionalDir = Field(default=None, description="the node's host memory pool directory")
    # auto: `kold up` mounts (as root) or makes (in /dev/shm) a pool and keeps it in step with the
    # deployed functions; off: no pool, CPU restores fault in fresh memory.
    host_pool_mode: Annotated[Literal["auto", "off"], BeforeValidator(lambda v: str(v).strip().lower())] = Field(
        default="auto", validation_alias="KOLD_HOST_POOL", description="the host pool kold up keeps: auto or off"
    )
    # A quarter of the node's memory: the shm cache tier takes another quarter by default, and the
    # half left is for what instances need besides their weights (torch, KV cache, activations; a
    # segment in use *is* its instance's weights, not a copy), for instances that start when every
    # segment is taken (fresh memory), and for the kernel. 0 turns the pool off.
    host_pool_max_bytes: Size = Field(default_factory=lambda: node_memory() // 4)

    # -- the runtime (`kold runtime serve`) --
    # Knative's contract: the container listens on $PORT (no KOLD_ prefix).
    port: int = Field(default=8080, ge=0, le=65535, validation_alias="PORT")
    runtime_max_batch: int = Field(default=8, ge=1, le=1024, description="sequences decoded together")
    runtime_max_seq_len: int | None = Field(default=None, ge=2, description="context limit (default: the model's)")
    runtime_max_waiting: int = Field(default=256, ge=0, description="requests that may wait for the model to load")
    runtime_queue_timeout_s: float = Field(default=300.0, gt=0, description="how long one of them may wait")
    runtime_drain_timeout_s: float = Field(default=30.0, ge=0, description="SIGTERM: how long in-flight requests get")
    # weights restored from a node cache tier: background trusts the tier (no pass over the weights on
    # the cold start) and checks them once serving begins, stopping the instance if they are corrupt;
    # sync checks them before serving; off trusts the tiers (see snapshot/FORMAT.md, "Integrity")
    verify_tiers: Annotated[Literal["background", "sync", "off"], BeforeValidator(lambda v: str(v).strip().lower())] = (
        Field(default="background", description="when cache-tier weights are checked: background, sync or off")
    )

    # -- slow and oversized clients: the gateway (`kold up`) and every runtime instance alike --
    # 16 MiB: a full 128k-token context is ~0.5 MB of text (~3 MB with every character JSON-escaped),
    # so this leaves room for batched prompts and token-id lists, while a runtime holds a few copies
    # of a body while it parses it (bytes, text, objects): some 100 MB at the limit, not gigabytes.
    max_body_bytes: Size = Field(default=16 << 20, ge=1, description="largest request body (413 above)")
    # a request head is a few hundred bytes a client sends in one write: 10 s is ample on any link,
    # and short enough that connections which never finish one are not held
    header_timeout_s: float = Field(default=10.0, gt=0, description="time for a request head")
    # the whole body, counted from its head: a 16 MiB body then needs ~280 kB/s; a trickle is cut off
    body_timeout_s: float = Field(default=60.0, gt=0, description="time for a request body (408 after)")

    # /metrics of the gateway asks for an API key (any scope) like the data path; off: open for scrapers
    metrics_require_key: bool = False
    # the node's capacity the local platform schedules instances into (unset: detected; kold/resources.py)
    node_cpus: float | None = Field(default=None, gt=0)
    node_memory: Annotated[int | None, BeforeValidator(lambda v: None if v in (None, "") else parse_size(v))] = None
    node_gpus: int | None = Field(default=None, ge=0)
    # the local platform's secret for its instances: set by its pool in their environment; when set, an
    # instance answers /v1/ requests only with it (the gateway sends it), not any local process
    instance_token: str | None = Field(default=None, repr=False)

    # -- the local platform (`kold up` and the commands that talk to it) --
    redis_url: str | None = Field(default=None, description="Redis for the platform; unset: `kold up` starts one")
    # fork-template: instances fork from a process that has imported torch and the runtime already
    # (a cold start skips ~2 s of imports); spawn: each instance is a fresh `kold runtime serve`.
    instance_start: Literal["fork-template", "spawn"] = Field(
        default="fork-template", description="how the local platform starts instances"
    )
    # -- the pre-warm controller (`kold controller`, and inside `kold up` unless off) --
    controller: bool = Field(default=True, description="kold up runs the pre-warm controller")
    # one decision pass a second: a pre-warm is planned ahead by at least the cold start it hides (seconds),
    # and a cold arrival pokes the controller at once rather than waiting for the tick
    controller_tick_s: float = Field(default=1.0, gt=0, le=300, description="the controller's decision interval")
    # a lease a little over a few ticks: a controller that died hands over within seconds, while a slow
    # tick (Redis busy) does not lose it
    controller_lease_s: float = Field(default=10.0, gt=0, le=3600, description="the controller lease's expiry")
    # unset: the platform `kold up` started (its state under `home`), else http://127.0.0.1:8080
    gateway_url: str | None = Field(default=None, description="where the CLI finds the gateway")
    api_key: str | None = Field(default=None, description="Bearer key the CLI sends to the gateway")

    # -- the Knative target (`kold deploy/ls/describe/rm --target knative`, `kold controller --target knative`) --
    # the kubeconfig context (unset: the kubeconfig's current one; in a pod: the in-cluster service account)
    knative_context: str | None = Field(default=None, description="kubeconfig context of the Knative cluster")
    # unset: the context's namespace, else the pod's own (in-cluster), else "default"
    knative_namespace: str | None = Field(default=None, description="namespace of the kold functions")
    knative_image: str = Field(default="ghcr.io/kold/kold-runtime:0.1.0", description="the runtime image functions run")
    # the node agent's paths (`kold node serve`, a DaemonSet): functions mount them as hostPath volumes so a
    # restore finds the node's shm tier and host pool; off: functions use a pod-private emptyDir tier only
    knative_node_cache: bool = Field(default=True, description="functions mount the node agent's cache and pool")
    # seconds a deploy waits for the Service to be Ready (unset: the revision's progress deadline plus a minute)
    knative_wait_s: float | None = Field(default=None, gt=0, description="how long deploy waits for Ready")

    # -- what Knative tells a pod about itself (no KOLD_ prefix: the runtime contract's own variables) --
    k_service: str | None = Field(default=None, validation_alias="K_SERVICE")
    k_revision: str | None = Field(default=None, validation_alias="K_REVISION")
    # the runtime's demand records (invocations, its cold start) to Redis for the controller: auto reports
    # when it runs under Knative (K_SERVICE set) with KOLD_REDIS_URL set; a local platform's instances
    # never need it (the gateway records their demand)
    runtime_demand: Annotated[Literal["auto", "on", "off"], BeforeValidator(lambda v: str(v).strip().lower())] = Field(
        default="auto", description="the runtime reports its demand to Redis: auto, on or off"
    )

    # -- the node agent (`kold node serve`) --
    # the node this agent runs on (the DaemonSet sets it from the downward API's spec.nodeName)
    node_name: str | None = Field(default=None, description="the node the agent reports as")
    node_sync_s: float = Field(default=5.0, gt=0, le=3600, description="how often the agent syncs its node")

    @property
    def store_uri(self) -> str:
        return self.store or (self.home / "store").as_uri()

    def s3_options(self) -> S3Options:
        from kold.snapshot.store import S3Options

        return S3Options(endpoint_url=self.s3_endpoint, region=self.s3_region, max_concurrency=self.s3_concurrency)

    @property
    def host_pool(self) -> HostPool | None:
        """The pool CPU restores claim from: KOLD_HOST_POOL_DIR's, else the one a `kold up` with
        this home keeps (which sets KOLD_HOST_POOL_DIR for its instances), else none."""
        from kold.snapshot.hostpool import HostPool

        if self.host_pool_dir is not None:
            return HostPool(self.host_pool_dir)
        if self.host_pool_mode == "off":
            return None
        from kold.hostpool_auto import managed_directory

        directory = managed_directory(self.home)
        return HostPool(directory) if directory is not None else None

    @cached_property
    def node_cache(self) -> NodeCache:
        from kold.snapshot.cache import CacheTier, NodeCache

        tiers = []
        if self.cache_shm_bytes > 0:
            tiers.append(CacheTier("shm", self.cache_shm_dir, self.cache_shm_bytes))
        if self.cache_disk_bytes > 0:
            tiers.append(CacheTier("disk", self.cache_disk_dir or self.home / "cache", self.cache_disk_bytes))
        return NodeCache(tiers)


def load_settings() -> Settings:
    return Settings()
