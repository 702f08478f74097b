"""The node agent (`kold node serve`, a DaemonSet): the node's shm tier holds what the controller expects to start.

Why: on Knative a new pod restores its weights from whatever its node has. With nothing prepared, that is
S3 on every scale from zero (the KServe complaint, kserve#2529). The controller writes down which snapshots
it expects to start soon (`kold.controller.nodes.NodeWants`); on every node this agent reads that list each
`sync_s`, prefetches each wanted snapshot into the node's shm tier (a hostPath the function pods mount
read-only), keeps the host pool in step with the wanted snapshots, and reports what it holds, so the
pod's restore maps memory instead of reading S3.

How, and why so:
- One prefetch at a time, in a worker thread: a prefetch already reads with many parallel connections,
  and two at once would only halve each other's bandwidth while delaying the first to finish.
- Bounded by the tier, without thrashing: the tier evicts least recently used entries when a fill needs
  room, so the agent plans first which wanted snapshots fit together (smallest first, the rule the host
  pool planner assumes too) and fills only those; the others are reported `too-big`. Before each fill
  it touches the wanted entries it holds, so the eviction takes entries nobody wants first. A snapshot's
  size is read from its manifest once (a small GET) before it is planned.
- Robust: Redis away leaves the last wants in force (the pool is then never shrunk) and is retried every
  pass; a snapshot that fails (missing, corrupt, store down) is logged once per distinct error and
  retried with a doubling delay; stopping cancels a prefetch between chunks, leaving no partial entry
  (cache fills commit by rename).
- The host pool is `kold up`'s keeper (`HostPoolKeeper`, `poolplan`, `poolsync`) fed with the wanted
  snapshots (one CPU segment each) instead of the deployed functions; the agent releases it when it stops.
  The cache tier stays: it is costly to refill and pods may be mapping its entries.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import queue
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import TYPE_CHECKING, Any

import redis
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, generate_latest

from kold.controller.nodes import NodeWants, Want
from kold.hostpool_auto import HostPoolKeeper, Place
from kold.output import human_bytes
from kold.snapshot.cache import CacheTier, NodeCache
from kold.snapshot.errors import RestoreCancelledError
from kold.snapshot.poolplan import PoolDemand
from kold.snapshot.store import parse_snapshot_uri

if TYPE_CHECKING:
    from kold.snapshot.manifest import ChunkEntry
    from kold.snapshot.store import S3Options, Store

log = logging.getLogger("kold.node")

BACKOFF_CAP_S = 300.0  # a snapshot that keeps failing is tried again at least every 5 minutes
PROGRESS_EVERY_S = 5.0  # a long prefetch says how far it got this often
MIN_REPORT_TTL_S = 15.0  # a report outlives a few missed syncs, never less than this


# -- what fits in the tier ----------------------------------------------------------------------------


@dataclass(frozen=True)
class TierPlan:
    """Which wanted snapshots the tier holds (`fits`, smallest first), which do not fit beside them
    (`too_big`), and which sizes are not known yet (`unknown`: their manifests are read first)."""

    fits: tuple[str, ...]
    too_big: tuple[str, ...]
    unknown: tuple[str, ...]


def plan_tier(sizes: Mapping[str, int | None], capacity: int) -> TierPlan:
    """Pure: snapshot id -> entry bytes (None: unknown) in, the snapshots to hold within `capacity` out.

    Smallest first, so the tier holds as many wanted snapshots as it can (and the host pool planner's
    assumption, that the tier holds the smallest, is true)."""
    known = sorted(((size, sid) for sid, size in sizes.items() if size is not None), key=lambda p: (p[0], p[1]))
    fits, too_big, used = [], [], 0
    for size, sid in known:
        if used + size <= capacity:
            fits.append(sid)
            used += size
        else:
            too_big.append(sid)
    unknown = sorted(sid for sid, size in sizes.items() if size is None)
    return TierPlan(tuple(fits), tuple(too_big), tuple(unknown))


def backoff_s(failures: int, base_s: float) -> float:
    """The wait after the `failures`-th failure in a row: base, 2 x base, 4 x base, ... up to BACKOFF_CAP_S."""
    doublings = min(max(failures - 1, 0), 30)
    return float(min(BACKOFF_CAP_S, base_s * (1 << doublings)))


# -- metrics ------------------------------------------------------------------------------------------


class AgentMetrics:
    """The agent's Prometheus metrics (its own registry: /metrics shows the agent alone)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.prefetches = Counter("kold_node_prefetches", "Snapshots prefetched into the shm tier", registry=r)
        self.prefetch_bytes = Counter(
            "kold_node_prefetch_bytes", "Bytes read from the store into the shm tier by prefetches", registry=r
        )
        self.failures = Counter(
            "kold_node_prefetch_failures",
            "Prefetches (or manifest reads) that failed, by reason",
            ["reason"],
            registry=r,
        )
        self.held = Gauge("kold_node_held_snapshots", "Snapshots the node's shm tier holds", registry=r)
        self.held_bytes = Gauge("kold_node_held_bytes", "Bytes the node's shm tier holds", registry=r)
        self.wanted = Gauge("kold_node_wanted_snapshots", "Snapshots the controller wants on the nodes", registry=r)
        self.wanted_held = Gauge(
            "kold_node_wanted_held_snapshots", "Wanted snapshots the node's shm tier holds", registry=r
        )
        self.pool_bytes = Gauge("kold_node_pool_bytes", "Bytes of pre-faulted segments in the host pool", registry=r)
        self.redis_up = Gauge("kold_node_redis_up", "1 when the last Redis call of the agent succeeded", registry=r)
        self.redis_errors = Counter("kold_node_redis_errors", "Agent syncs that could not reach Redis", registry=r)


# -- the agent ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PoolConfig:
    """The host pool the agent keeps: where, within what, and where `kold snapshot pool status` finds it."""

    directory: Path
    budget: int
    node_memory: int
    state_file: Path


@dataclass
class _Failure:
    count: int
    retry_at: float
    message: str


@dataclass(frozen=True)
class _Job:
    kind: str  # "measure" (read the manifest: the entry's size) or "prefetch"
    uri: str
    snapshot_id: str


class _StoppingError(RestoreCancelledError):
    """Raised from a chunk callback when the agent stops: the fill is abandoned, nothing is committed."""


class NodeAgent:
    """Keeps one node's shm tier (and host pool) in step with the wanted snapshots; see the module doc."""

    def __init__(
        self,
        wants: NodeWants,
        node: str,
        tier: CacheTier,
        *,
        sync_s: float,
        s3: S3Options | None = None,
        pool: PoolConfig | None = None,
        metrics: AgentMetrics | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.wants = wants
        self.node = node
        self.tier = tier
        self.cache = NodeCache([tier])
        self.sync_s = sync_s
        self.s3 = s3
        self.metrics = metrics or AgentMetrics()
        self.clock = clock
        self.keeper: HostPoolKeeper | None = None
        if pool is not None:
            pool.directory.mkdir(parents=True, exist_ok=True)
            place = Place(
                pool.directory, mounted=False, why_not_mounted="the node agent keeps it in KOLD_HOST_POOL_DIR"
            )
            self.keeper = HostPoolKeeper(
                place,
                self.pool_demands,
                budget=pool.budget,
                node_memory=pool.node_memory,
                shm_tier_bytes=tier.max_bytes,
                state_file=pool.state_file,
                say=log.info,
                interval_s=sync_s,
            )
        self._lock = threading.Lock()
        self._wants: list[Want] = []
        self._wants_known = False  # read from Redis at least once
        self._redis_ok: bool | None = None
        # of the snapshots wanted at the last sync pass
        self._sizes: dict[str, int] = {}  # snapshot id -> entry bytes on the tier, from its manifest
        self._data_sizes: dict[str, int] = {}  # snapshot id -> data bytes (what a pool segment must hold)
        self._failures: dict[str, _Failure] = {}  # by URI
        self._plan = TierPlan((), (), ())
        self._queued: set[str] = set()
        self._current: tuple[str, int, int] | None = None  # (uri, bytes done, bytes in all)
        self._counts: dict[str, int] = {"wanted": 0, "wanted_held": 0, "held": 0}
        self._jobs: queue.Queue[_Job] = queue.Queue()
        self._stores: dict[str, Store] = {}
        self._stop = threading.Event()
        self._poke = threading.Event()
        self._ready = threading.Event()
        self._threads: list[threading.Thread] = []

    # -- lifecycle --

    def start(self) -> NodeAgent:
        self.tier.root.mkdir(parents=True, exist_ok=True)
        for name, target in (("kold-node-sync", self._sync_loop), ("kold-node-prefetch", self._work_loop)):
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)
        if self.keeper is not None:
            self.keeper.start()
        return self

    def close(self) -> None:
        """Stop syncing, cancel a prefetch between chunks, release the host pool. The tier stays."""
        self._stop.set()
        self._poke.set()
        for thread in self._threads:
            thread.join(60)
        if self.keeper is not None:
            self.keeper.close()
        for store in self._stores.values():
            with contextlib.suppress(Exception):
                getattr(store, "close", lambda: None)()

    def healthy(self) -> bool:
        return not self._stop.is_set() and all(t.is_alive() for t in self._threads)

    def ready(self) -> bool:
        """After the first sync pass: the tier is usable and the agent has looked for wants (Redis or not)."""
        return self._ready.is_set() and self.healthy()

    def _sync_loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.sync_once()
            except Exception:  # a bug must not end the loop silently: say it, and go on next pass
                log.exception("node agent: sync failed")
            self._ready.set()
            self._poke.wait(self.sync_s)
            self._poke.clear()

    def _work_loop(self) -> None:
        while not self._stop.is_set():
            try:
                job = self._jobs.get(timeout=0.5)
            except queue.Empty:
                continue
            try:
                self.run_job(job)
            except Exception:
                log.exception("node agent: %s of %s failed unexpectedly", job.kind, job.uri)
            finally:
                with self._lock:
                    self._queued.discard(job.uri)

    # -- one sync pass --

    def sync_once(self) -> dict[str, Any]:
        """Read the wants, plan the tier, queue what is missing, report; the report is returned."""
        now = self.clock()
        self._read_wants(now)
        with self._lock:  # while Redis is away the last wants hold, each only until its own end
            wants = [w for w in self._wants if w.until > now]
        held = {e.snapshot_id: e.size for e in self.cache.entries(self.tier)}
        refs: dict[str, str] = {}  # uri -> snapshot id, for the wants whose URI parses
        for want in wants:
            try:
                refs[want.uri] = parse_snapshot_uri(want.uri).snapshot_id
            except ValueError as exc:
                if self._may_try(want.uri, now):
                    self._failed(want.uri, exc, now)
        wanted_ids = set(refs.values())
        with self._lock:  # sizes of the wanted snapshots only: ids come and go for as long as the agent runs
            for known in (self._sizes, self._data_sizes):
                for sid in known.keys() - wanted_ids:
                    del known[sid]
        for sid in wanted_ids & set(held):
            self._learn_held_size(sid)
        with self._lock:
            sizes: dict[str, int | None] = {sid: held.get(sid, self._sizes.get(sid)) for sid in refs.values()}
        plan = plan_tier(sizes, self.tier.max_bytes)
        with self._lock:
            self._plan = plan
        fits = set(plan.fits)
        for uri, sid in refs.items():
            if sid in held:
                self._succeeded(uri)
                continue
            if sid in plan.unknown:
                self._queue(_Job("measure", uri, sid), now)
            elif sid in fits:
                self._queue(_Job("prefetch", uri, sid), now)
        self._forget_unwanted({w.uri for w in wants})
        report = self._report_doc(wants, refs, held, plan, now)
        with self._lock:
            self._counts = {"wanted": len(wanted_ids), "wanted_held": len(wanted_ids & set(held)), "held": len(held)}
        self.metrics.held.set(len(held))
        self.metrics.held_bytes.set(sum(held.values()))
        self.metrics.wanted.set(len(wanted_ids))
        self.metrics.wanted_held.set(len(wanted_ids & set(held)))
        if self.keeper is not None:
            self.metrics.pool_bytes.set(sum(s.size for s in self.keeper.pool.segments()))
        try:
            self.wants.report(self.node, report, max(MIN_REPORT_TTL_S, 4 * self.sync_s))
        except redis.RedisError as exc:
            self._redis_failed(exc)
        return report

    def _read_wants(self, now: float) -> None:
        try:
            wants = self.wants.wanted(now)
        except redis.RedisError as exc:
            self._redis_failed(exc)
            return
        with self._lock:
            self._wants, self._wants_known = wants, True
            was_ok, self._redis_ok = self._redis_ok, True
        self.metrics.redis_up.set(1)
        if was_ok is False:
            log.info("node agent: Redis is reachable again; %d snapshots wanted", len(wants))

    def _redis_failed(self, exc: Exception) -> None:
        self.metrics.redis_errors.inc()
        self.metrics.redis_up.set(0)
        with self._lock:
            was_ok, self._redis_ok = self._redis_ok, False
        if was_ok is not False:
            known = "keeping the last known wants" if self._wants_known else "no wants known yet"
            log.warning(
                "node agent: cannot reach Redis (%s); %s, trying again every %g s",
                exc or type(exc).__name__,
                known,
                self.sync_s,
            )

    def _may_try(self, uri: str, now: float) -> bool:
        """False while `uri` waits out its backoff after a failure."""
        with self._lock:
            failure = self._failures.get(uri)
        return failure is None or failure.retry_at <= now

    def _queue(self, job: _Job, now: float) -> None:
        if not self._may_try(job.uri, now):
            return
        with self._lock:
            if job.uri in self._queued or (self._current is not None and self._current[0] == job.uri):
                return
            self._queued.add(job.uri)
        self._jobs.put(job)

    def _learn_held_size(self, sid: str) -> None:
        """A held entry's data size from its own manifest (an entry filled before this agent started)."""
        from kold.snapshot.manifest import Manifest

        with self._lock:
            if sid in self._data_sizes:
                return
        path = self.tier.entry_dir(sid) / "manifest.json"
        try:
            manifest = Manifest.from_json(path.read_bytes(), source=str(path))
        except (OSError, ValueError):
            return  # evicted meanwhile, or unreadable: the next lookup evicts it
        with self._lock:
            self._data_sizes[sid] = manifest.data_size

    def _forget_unwanted(self, uris: set[str]) -> None:
        with self._lock:
            for uri in [u for u in self._failures if u not in uris]:
                del self._failures[uri]

    # -- one job (the worker thread) --

    def run_pending(self) -> int:
        """Run the queued jobs in the calling thread, as the worker thread does; how many ran."""
        ran = 0
        while True:
            try:
                job = self._jobs.get_nowait()
            except queue.Empty:
                return ran
            try:
                self.run_job(job)
            finally:
                with self._lock:
                    self._queued.discard(job.uri)
            ran += 1

    def run_job(self, job: _Job) -> None:
        """Read a snapshot's size, or prefetch it into the tier; failures are counted and backed off."""
        now = self.clock()
        try:
            if job.kind == "measure":
                self._measure(job)
                self._poke.set()  # plan with the new size now, not a tick later
            else:
                self._prefetch(job)
        except RestoreCancelledError:
            if not self._stop.is_set():
                raise
            log.info("node agent: stopped while prefetching %s; nothing of it was kept", job.uri)
        except Exception as exc:
            self._failed(job.uri, exc, now)
        else:
            self._succeeded(job.uri)

    def _measure(self, job: _Job) -> None:
        from kold.snapshot.restorer import read_manifest
        from kold.snapshot.store import open_store

        ref = parse_snapshot_uri(job.uri)
        if ref.store_uri not in self._stores:
            self._stores[ref.store_uri] = open_store(ref.store_uri, self.s3)
        manifest = read_manifest(self._stores[ref.store_uri], ref)
        with self._lock:
            # what the entry will take on the tier, counted as the cache counts it (manifest.json included)
            self._sizes[job.snapshot_id] = (
                manifest.data_size + sum(f.size for f in manifest.files) + len(manifest.to_json())
            )
            self._data_sizes[job.snapshot_id] = manifest.data_size

    def _prefetch(self, job: _Job) -> None:
        from kold.snapshot.prefetcher import prefetch

        with self._lock:
            fits = self._plan.fits
            total = self._data_sizes.get(job.snapshot_id, 0)
        if job.snapshot_id not in fits:  # no longer wanted, or no longer fits beside the others
            return
        self._touch_wanted(fits)  # so the eviction a fill may need takes what nobody wants first
        with self._lock:
            self._current = (job.uri, 0, total)
        started = last_said = time.monotonic()
        log.info("node agent: prefetching %s (%s) into the %s tier", job.uri, human_bytes(total), self.tier.name)

        def on_chunk(tier: str, chunk: ChunkEntry) -> None:
            nonlocal last_said
            if self._stop.is_set():
                raise _StoppingError(f"prefetch of {job.uri} stopped: the node agent is stopping")
            self.metrics.prefetch_bytes.inc(chunk.size)
            with self._lock:
                assert self._current is not None
                uri, done, whole = self._current
                self._current = (uri, done + chunk.size, whole)
                done += chunk.size
                say = time.monotonic() - last_said >= PROGRESS_EVERY_S
                if say:
                    last_said = time.monotonic()
            if say:
                log.info("node agent: prefetching %s: %s of %s", job.uri, human_bytes(done), human_bytes(whole))

        try:
            filled = prefetch(job.uri, self.cache, s3=self.s3, on_chunk=on_chunk)
        finally:
            with self._lock:
                self._current = None
        if self.tier.name not in filled:
            raise RuntimeError(f"the {self.tier.name} tier ({human_bytes(self.tier.max_bytes)}) cannot hold it")
        self.metrics.prefetches.inc()
        log.info(
            "node agent: %s is in the %s tier (%s, %.1f s)",
            job.uri,
            self.tier.name,
            human_bytes(total),
            time.monotonic() - started,
        )

    def _touch_wanted(self, snapshot_ids: Iterable[str]) -> None:
        for sid in snapshot_ids:
            with contextlib.suppress(OSError):
                os.utime(self.tier.entry_dir(sid))

    def _failed(self, uri: str, exc: Exception, now: float) -> None:
        message = f"{type(exc).__name__}: {exc}"
        with self._lock:
            earlier = self._failures.get(uri)
            count = 1 if earlier is None else earlier.count + 1
            delay = backoff_s(count, self.sync_s)
            self._failures[uri] = _Failure(count, now + delay, message)
        self.metrics.failures.labels(type(exc).__name__).inc()
        if earlier is None or earlier.message != message:
            log.warning(
                "node agent: cannot prefetch %s (%s); trying again in %g s, then less often", uri, message, delay
            )
        else:
            log.debug("node agent: %s failed again (%d times): %s", uri, count, message)

    def _succeeded(self, uri: str) -> None:
        with self._lock:
            earlier = self._failures.pop(uri, None)
        if earlier is not None:
            log.info("node agent: %s is in the tier after %d failed tries", uri, earlier.count)

    # -- what the agent says --

    def pool_demands(self) -> tuple[list[PoolDemand], list[str]]:
        """The host pool's demands: one CPU segment per wanted function whose snapshot size is known.
        `problems` (so the keeper never shrinks the pool on partial knowledge): sizes still unknown, or
        wants not read because Redis cannot be reached."""
        demands, problems = [], []
        now = self.clock()
        with self._lock:
            if not self._redis_ok:
                problems.append("the wanted snapshots are not known now (Redis cannot be reached)")
            for want in (w for w in self._wants if w.until > now):  # as sync_once: the last wants, to their end
                sid = parse_snapshot_uri(want.uri).snapshot_id if _parses(want.uri) else None
                size = self._data_sizes.get(sid) if sid is not None else None
                if size is None:
                    problems.append(f"{want.function}: its snapshot's size is not known yet")
                    continue
                demands.append(PoolDemand(want.function, size, 1, "cpu"))
        return demands, problems

    def status(self) -> dict[str, Any]:
        """What /readyz shows: the node, whether Redis answers, and the last pass's counts."""
        with self._lock:
            return {
                "node": self.node,
                "ready": self._ready.is_set(),
                "redis": bool(self._redis_ok),
                **self._counts,
                "prefetching": None if self._current is None else self._current[0],
            }

    def _report_doc(
        self, wants: list[Want], refs: dict[str, str], held: dict[str, int], plan: TierPlan, now: float
    ) -> dict[str, Any]:
        entries = self.cache.entries(self.tier)
        with self._lock:
            current = self._current
            failures = dict(self._failures)
        rows = []
        for want in wants:
            sid = refs.get(want.uri)
            row: dict[str, Any] = {"function": want.function, "uri": want.uri, "until": want.until, "snapshot_id": sid}
            failure = failures.get(want.uri)
            if failure is not None:  # said while it is tried again, too
                row.update(error=failure.message, failures=failure.count, retry_at=failure.retry_at)
            if sid is not None and sid in held:
                row["state"] = "held"
            elif current is not None and current[0] == want.uri:
                row.update(state="prefetching", done_bytes=current[1], total_bytes=current[2])
            elif failure is not None:
                row["state"] = "failed"
            elif sid in plan.too_big:
                row["state"] = "too-big"  # it does not fit in the tier beside the smaller wanted snapshots
            else:
                row["state"] = "queued"
            rows.append(row)
        doc: dict[str, Any] = {
            "tier": {
                "name": self.tier.name,
                "dir": str(self.tier.root),
                "max_bytes": self.tier.max_bytes,
                "used_bytes": sum(e.size for e in entries),
            },
            "held": [{"snapshot_id": e.snapshot_id, "bytes": e.size, "last_used": e.last_used} for e in entries],
            "wanted": rows,
            "pool": None,
        }
        if self.keeper is not None:
            doc["pool"] = {
                "dir": str(self.keeper.place.directory),
                "planned": self.keeper.planned(),
                "holding": self.keeper.holding(),
            }
        return doc


def _parses(uri: str) -> bool:
    try:
        parse_snapshot_uri(uri)
    except ValueError:
        return False
    return True


# -- HTTP: /healthz, /readyz, /metrics ----------------------------------------------------------------


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    agent: NodeAgent
    metrics_enabled: bool


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        agent = self.server.agent
        if path == "/healthz":
            ok = agent.healthy()
            self._json(200 if ok else 503, {"status": "ok" if ok else "stopping"})
        elif path == "/readyz":
            self._json(200 if agent.ready() else 503, agent.status())
        elif path == "/metrics" and self.server.metrics_enabled:
            self._send(200, generate_latest(agent.metrics.registry), CONTENT_TYPE_LATEST)
        else:
            self._error(404, "route_not_found", f"no route GET {path}")

    def _not_allowed(self) -> None:
        self._error(405, "method_not_allowed", f"{self.command} is not allowed on {self.path.split('?', 1)[0]}")

    def do_POST(self) -> None:
        self._not_allowed()

    def do_PUT(self) -> None:
        self._not_allowed()

    def do_DELETE(self) -> None:
        self._not_allowed()

    def do_PATCH(self) -> None:
        self._not_allowed()

    def _error(self, status: int, code: str, message: str) -> None:
        self._json(status, {"error": {"message": message, "type": "invalid_request_error", "code": code}})

    def _json(self, status: int, body: dict[str, Any]) -> None:
        self._send(status, json.dumps(body, sort_keys=True).encode() + b"\n", "application/json")

    def _send(self, status: int, payload: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(payload)

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("http: %s", format % args)


def serve_http(agent: NodeAgent, host: str, port: int, *, metrics: bool = True) -> ThreadingHTTPServer:
    """Serve the agent's probes (and metrics) on `host:port` in a thread; OSError if it cannot listen."""
    server = _Server((host, port), _Handler)
    server.agent = agent
    server.metrics_enabled = metrics
    threading.Thread(target=server.serve_forever, name="kold-node-http", daemon=True).start()
    return server
