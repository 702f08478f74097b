"""`restore(uri, device)`: a snapshot from its store (or a node cache tier) into memory, as tensors.

Phases: metadata (manifest + small files, or a cache-tier hit) -> fetch (parallel ranged reads into
the destination, verified per chunk) -> host-to-device (GPU: async copies overlapped with the reads)
-> views (every tensor is a view of one buffer: no copies). One structured log line reports them.

Source choice, fastest first: the shm tier (CPU: mapped, not copied — instances on a node share one
copy; GPU: the mapping is registered as pinned memory and copied to the device with no staging),
the disk tier, then the store. The first restore on a node fills the cache tiers in the background.

On a GPU the copy engine (CuPy's import, the CUDA context, streams) starts in a thread of its own
at the restore's first line, so it overlaps the metadata and the first reads instead of preceding
them.
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from kold.snapshot import dtypes
from kold.snapshot.cache import TIER_ORDER, CacheHit, CacheTier, NodeCache, data_identity
from kold.snapshot.checksum import chunk_checksum
from kold.snapshot.devices import (
    PIN_THREADS,
    CopyEngine,
    DeviceSpec,
    HostDestination,
    HostRegisterError,
    StagedDestination,
    host_tensor,
    keep_host_memory,
    make_engine,
)
from kold.snapshot.errors import (
    ChunkCorruptedError,
    ManifestError,
    ObjectNotFoundError,
    SnapshotNotFoundError,
)
from kold.snapshot.filestore import FileReader
from kold.snapshot.hostmem import map_file, map_file_read_only, readonly_address
from kold.snapshot.manifest import ChunkEntry, Manifest
from kold.snapshot.pipeline import LOCAL_PIECE_SIZE, PipelineStats, ReadSource, run_pipeline
from kold.snapshot.plan import default_readers, make_plan
from kold.snapshot.progress import RestoreProgress
from kold.snapshot.store import (
    ObjectReader,
    S3Options,
    SnapshotRef,
    Store,
    data_key,
    file_key,
    manifest_key,
    open_store,
    parse_snapshot_uri,
)
from kold.snapshot.verify import TrustedTier

if TYPE_CHECKING:
    import mmap

    import torch

    from kold.snapshot.hostpool import HostPool

log = logging.getLogger(__name__)


@dataclass
class RestoreStats:
    snapshot_id: str
    device: str
    source_tier: str  # where the data came from: "shm", "disk" or "store"
    data_bytes: int
    readers: int = 0
    verified: bool = False
    mapped: bool = False  # CPU restore from the shm tier by mapping (no copy)
    pinned_in_place: bool = False  # GPU restore from the shm tier: its mapping pinned read-only, no staging
    pooled: bool = False  # CPU restore into a segment of the node's pre-faulted host pool
    direct_io: bool = False  # the data file was cold and read with O_DIRECT (no page cache)
    metadata_s: float = 0.0
    fetch_s: float = 0.0
    h2d_s: float = 0.0
    verify_s: float = 0.0  # summed over reader threads; overlaps fetch
    views_s: float = 0.0
    # waiting for another thread's `import torch` before the views (the runtime imports torch while
    # the restore moves bytes); part of total_s, not restore work
    import_wait_s: float = 0.0
    total_s: float = 0.0
    bytes_by_tier: dict[str, int] = field(default_factory=dict)
    refetched_chunks: list[int] = field(default_factory=list)

    @property
    def gbps(self) -> float:
        return self.data_bytes / self.total_s / 1e9 if self.total_s > 0 else 0.0

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["gbps"] = round(self.gbps, 3)
        for key in ("metadata_s", "fetch_s", "h2d_s", "verify_s", "views_s", "import_wait_s", "total_s"):
            out[key] = round(out[key], 4)
        return out


@dataclass
class RestoredSnapshot:
    ref: SnapshotRef
    manifest: Manifest
    files: dict[str, bytes]
    tensors: dict[str, torch.Tensor]
    buffer: torch.Tensor  # uint8, the whole data blob; every tensor is a view of it
    stats: RestoreStats
    _fill: threading.Thread | None = None
    # set when the data came from a cache tier without a check (the default: tiers are verified when
    # filled): what a `TierVerifier` needs to check it after the fact and quarantine a corrupt entry
    trusted: TrustedTier | None = None

    def config(self) -> dict[str, Any]:
        """The model's config.json, parsed (empty if the snapshot carries none)."""
        raw = self.files.get("config.json")
        result: dict[str, Any] = json.loads(raw) if raw else {}
        return result

    def wait_cache_fill(self, timeout: float | None = None) -> bool:
        """Wait for the background cache fill started by this restore; True once it is done."""
        if self._fill is None:
            return True
        self._fill.join(timeout)
        return not self._fill.is_alive()


def read_manifest(store: Store, ref: SnapshotRef) -> Manifest:
    """Fetch and validate a manifest, checking that it hashes to the id it is stored under."""
    try:
        raw = store.get_bytes(manifest_key(ref.snapshot_id))
    except ObjectNotFoundError:
        raise SnapshotNotFoundError(f"snapshot {ref.snapshot_id} is not in {store.uri} (no manifest)") from None
    manifest = Manifest.from_json(raw, source=f"snapshot {ref.snapshot_id}")
    if manifest.id != ref.snapshot_id:
        raise ManifestError(
            f"snapshot {ref.snapshot_id}: the manifest in {store.uri} hashes to {manifest.id}, not its id (corrupted?)"
        )
    return manifest


def read_files(store: Store, ref: SnapshotRef, manifest: Manifest, threads: int = 8) -> dict[str, bytes]:
    """The small model files, fetched in parallel (they are separate objects) and checked."""

    def one(name: str) -> bytes:
        try:
            content = store.get_bytes(file_key(ref.snapshot_id, name))
        except ObjectNotFoundError:
            raise SnapshotNotFoundError(
                f"snapshot {ref.snapshot_id}: file {name} is missing from {store.uri}"
            ) from None
        if chunk_checksum(content) != manifest.file(name).checksum:
            raise ChunkCorruptedError(f"snapshot {ref.snapshot_id}: file {name} does not match its checksum")
        return content

    names = [f.name for f in manifest.files]
    if len(names) <= 1:
        return {n: one(n) for n in names}
    with ThreadPoolExecutor(min(threads, len(names))) as pool:
        return dict(zip(names, pool.map(one, names), strict=True))


def tensor_views(buffer: torch.Tensor, manifest: Manifest) -> dict[str, torch.Tensor]:
    """Every tensor as a view of the one restore buffer: slicing and reinterpreting, never copying."""
    views = {}
    for t in manifest.tensors:
        dtype = dtypes.to_torch(dtypes.by_name(t.dtype))
        views[t.name] = buffer[t.offset : t.end].view(dtype).view(t.shape)
    return views


def restore(
    uri: str,
    device: str = "cpu",
    *,
    readers: int | None = None,
    verify: bool | None = None,
    cache: NodeCache | None = None,
    s3: S3Options | None = None,
    staging: bool | None = None,
    fill_cache: bool = True,
    cancel: threading.Event | None = None,
    on_chunk: Callable[[ChunkEntry], None] | None = None,
    on_metadata: Callable[[Manifest, dict[str, bytes]], None] | None = None,
    progress: RestoreProgress | None = None,
    pool: HostPool | None = None,
) -> RestoredSnapshot:
    """Restore a snapshot onto `device` ("cpu", "cuda", "cuda:N").

    verify: None checks chunks read from the store and trusts cache tiers (verified when filled);
    True checks everything; False checks nothing. staging: force the GPU-style pinned-ring path on
    the CPU (the CPU twin of a CUDA restore, for tests and benchmarks). on_metadata: called with the
    manifest and the snapshot's small files as soon as they are read, before any data, so a caller
    can prepare what needs no weights (the runtime builds its model skeleton) while the data moves;
    an exception it raises is its own business (logged, the restore goes on). progress: told about
    the host destination as soon as it exists and about each chunk as it lands, so a consumer can
    start on the first tensors before the restore ends (see progress.py; CPU restores that fill a
    buffer only); it is always ended, with the error if the restore fails.
    """
    try:
        restored = _restore(uri, device, readers, verify, cache, s3, staging, fill_cache, cancel, on_chunk,
                            on_metadata, progress, pool)  # fmt: skip
    except BaseException as exc:
        if progress is not None:
            progress.end(exc)
        raise
    if progress is not None:
        progress.end()
    return restored


def _restore(
    uri: str,
    device: str,
    readers: int | None,
    verify: bool | None,
    cache: NodeCache | None,
    s3: S3Options | None,
    staging: bool | None,
    fill_cache: bool,
    cancel: threading.Event | None,
    on_chunk: Callable[[ChunkEntry], None] | None,
    on_metadata: Callable[[Manifest, dict[str, bytes]], None] | None,
    progress: RestoreProgress | None,
    pool: HostPool | None,
) -> RestoredSnapshot:
    started = time.perf_counter()
    spec = DeviceSpec.parse(device)
    ref = parse_snapshot_uri(uri)
    staged = spec.kind == "cuda" or bool(staging)
    engine = _start_engine(spec) if staged else None
    # The store is opened only when something is read from it: a cache-tier hit of an s3:// snapshot
    # then never pays for importing boto3 and building a client (~0.3 s), only a corrupt chunk would.
    store = _LazyStore(ref.store_uri, s3)
    hit = cache.lookup(ref.snapshot_id) if cache is not None else None
    identity = data_identity(hit.tier, ref.snapshot_id) if hit is not None else None  # which fill of the entry
    if hit is not None:
        manifest, files = hit.manifest, dict(hit.files)
    else:
        manifest = read_manifest(store.get(), ref)
        files = read_files(store.get(), ref, manifest)
    metadata_done = time.perf_counter()
    if on_metadata is not None:
        try:
            on_metadata(manifest, dict(files))
        except Exception:
            log.exception("snapshot %s: on_metadata failed", ref.snapshot_id)

    stats = RestoreStats(ref.snapshot_id, str(spec), hit.tier.name if hit else "store", manifest.data_size)
    stats.metadata_s = metadata_done - started
    buffer: torch.Tensor | None = None
    if hit is not None and hit.tier.name == "shm":
        try:
            buffer = _from_shm(hit, manifest, stats, engine, verify=bool(verify))
        except _NotPinnableError as exc:  # read through the staged ring from the tier instead
            log.info("snapshot %s: %s; copying the shm tier through the staged ring", ref.snapshot_id, exc)
        else:
            if buffer is None:  # the entry failed verification: it is evicted, go to the store
                assert cache is not None
                cache.evict(ref.snapshot_id, hit.tier)
                hit = None
                stats.source_tier = "store"
    fill: threading.Thread | None = None
    if buffer is None:
        remote_store = ref.store_uri.startswith("s3://")
        store_reader = _LazyReader(lambda: _open_data(store.get(), ref))
        store_source = ReadSource(store_reader, "store", 0 if remote_store else LOCAL_PIECE_SIZE)
        primary = (
            ReadSource(
                _direct_if_cold(hit.tier.store.open_reader(data_key(ref.snapshot_id))), hit.tier.name, LOCAL_PIECE_SIZE
            )
            if hit
            else store_source
        )
        remote = remote_store and hit is None
        if not remote and primary is store_source:
            store_reader.open()  # a local file: cheap, and whether it reads direct sets the readers
        cold = not remote and _reads_direct(primary.reader)
        plan = make_plan(manifest, readers=readers or default_readers(remote, cold=cold), staged=staged)
        dest: HostDestination | StagedDestination
        try:
            if engine is not None:
                _raise_if_failed(engine)  # no CuPy or no device: say so before reading anything
                dest = StagedDestination(engine, manifest.data_size, plan.slot_size, plan.ring_slots)
            else:
                claimed = _claim(pool, manifest.data_size, ref.snapshot_id)
                stats.pooled = claimed is not None
                dest = HostDestination(manifest.data_size, buffer=claimed)
        except BaseException:
            _close_sources(primary, store_source)
            raise
        stats.verified = verify if verify is not None else hit is None
        landed = on_chunk
        if progress is not None and isinstance(dest, HostDestination):
            progress.begin(manifest, dest.buffer)
            landed = _chain(progress.landed, on_chunk)
        try:
            pstats = run_pipeline(
                plan,
                ref.snapshot_id,
                primary,
                dest,
                fallback=store_source if hit else None,
                verify=stats.verified,
                cancel=cancel,
                on_chunk=landed,
            )
            dest.finish()
            stats.direct_io = _reads_direct(primary.reader)
        finally:
            if isinstance(dest, StagedDestination):
                dest.synchronize()  # on failure too: no copy may still read the ring
                dest.release_staging()
            _close_sources(primary, store_source)
        _record(stats, pstats, plan.readers, dest.copy_seconds)
        if hit is not None and pstats.corrupt_in_primary and cache is not None:
            log.warning(
                "snapshot %s: corrupt chunks in the %s tier; evicting the entry",
                ref.snapshot_id,
                hit.tier.name,
            )
            cache.evict(ref.snapshot_id, hit.tier)
            hit = None
        _await_torch(stats)
        buffer = dest.tensor()
        if cache is not None and fill_cache:
            # every tier faster than where the bytes came from: a disk-tier hit promotes to shm
            faster = [
                t
                for t in cache.tiers
                if _worth_caching(t, ref)
                and (hit is None or TIER_ORDER.index(t.name) < TIER_ORDER.index(hit.tier.name))
            ]
            if faster:
                source = (hit.tier.store, hit.tier.name) if hit is not None else (store.get(), "store")
                fill = _start_fill(cache, faster, source, ref, manifest, files, dest)

    views_started = time.perf_counter()
    tensors = tensor_views(buffer, manifest)
    stats.views_s = time.perf_counter() - views_started
    stats.total_s = time.perf_counter() - started
    log.info("restore %s", json.dumps(stats.as_dict(), sort_keys=True))
    trusted = (
        TrustedTier(cache, hit.tier, identity) if hit is not None and cache is not None and not stats.verified else None
    )
    return RestoredSnapshot(ref, manifest, files, tensors, buffer, stats, fill, trusted)


def _close_sources(primary: ReadSource, store_source: ReadSource) -> None:
    primary.reader.close()
    if store_source is not primary:
        store_source.reader.close()


def _claim(pool: HostPool | None, nbytes: int, snapshot_id: str) -> mmap.mmap | None:
    if pool is None:
        return None
    try:
        claimed = pool.claim(nbytes)
    except OSError as exc:  # an unusable pool must not fail a restore that fresh memory can serve
        log.warning("snapshot %s: host pool %s unusable (%s); using fresh memory", snapshot_id, pool.directory, exc)
        return None
    if claimed is None:
        log.info("snapshot %s: no free segment of %s bytes in %s; using fresh memory", snapshot_id, nbytes, pool)
    return claimed


def _chain(
    first: Callable[[ChunkEntry], None], then: Callable[[ChunkEntry], None] | None
) -> Callable[[ChunkEntry], None]:
    if then is None:
        return first

    def both(chunk: ChunkEntry) -> None:
        first(chunk)
        then(chunk)

    return both


class _LazyStore:
    """`open_store` on first use."""

    def __init__(self, uri: str, s3: S3Options | None) -> None:
        self._uri, self._s3 = uri, s3
        self._store: Store | None = None
        self._lock = threading.Lock()

    def get(self) -> Store:
        with self._lock:
            if self._store is None:
                self._store = open_store(self._uri, self._s3)
            return self._store


class _LazyReader:
    """An ObjectReader opened on its first read: the store as a fallback costs nothing unless used."""

    def __init__(self, opener: Callable[[], ObjectReader]) -> None:
        self._opener = opener
        self._reader: ObjectReader | None = None
        self._lock = threading.Lock()

    def _get(self) -> ObjectReader:
        with self._lock:
            if self._reader is None:
                self._reader = self._opener()
            return self._reader

    @property
    def size(self) -> int:
        return self._get().size

    @property
    def opened(self) -> ObjectReader | None:
        return self._reader

    def open(self) -> ObjectReader:
        """Open it now (errors surface here, not in the first read)."""
        return self._get()

    def read_into(self, offset: int, dest: memoryview) -> int:
        return self._get().read_into(offset, dest)

    def close(self) -> None:
        if self._reader is not None:
            self._reader.close()


def _await_torch(stats: RestoreStats) -> None:
    """Import torch now that the bytes are in place (it is needed only for the views), timing any wait
    for an import another thread already started."""
    started = time.perf_counter()
    import torch  # noqa: F401

    stats.import_wait_s = time.perf_counter() - started


def _direct_if_cold(reader: ObjectReader) -> ObjectReader:
    """A local data file that is not in the page cache is read with O_DIRECT: straight into the
    destination, without filling the page cache and copying out of it (see `FileReader`). A hot file,
    or one on tmpfs, keeps buffered reads. Decided once per file, from `mincore` (milliseconds)."""
    if isinstance(reader, FileReader):
        reader.direct_if_cold()
    return reader


def _reads_direct(reader: ObjectReader) -> bool:
    if isinstance(reader, _LazyReader):
        return _reads_direct(reader.opened) if reader.opened is not None else False
    return isinstance(reader, FileReader) and reader.direct


def _open_data(store: Store, ref: SnapshotRef) -> ObjectReader:
    try:
        return _direct_if_cold(store.open_reader(data_key(ref.snapshot_id)))
    except ObjectNotFoundError:
        raise SnapshotNotFoundError(
            f"snapshot {ref.snapshot_id}: its data object is missing from {store.uri}"
        ) from None


def _record(stats: RestoreStats, pstats: PipelineStats, readers: int, copy_seconds: float) -> None:
    stats.readers = readers
    stats.fetch_s = pstats.fetch_s
    stats.verify_s = pstats.verify_s
    stats.h2d_s = copy_seconds
    stats.bytes_by_tier = dict(pstats.bytes_by_tier)
    stats.refetched_chunks = sorted(pstats.refetched)


class _NotPinnableError(Exception):
    """The shm tier's mapping could not be pinned read-only: the GPU restore reads it through the ring."""


def _start_engine(spec: DeviceSpec) -> Future[CopyEngine]:
    """The copy engine. For CUDA it is made in a thread of its own (not a daemon: CUDA's initialisation
    is never cut off at exit): importing CuPy and creating the context and streams take ~0.3-1 s of a
    cold start, beside torch's import, and the first reads need none of it. The CPU twin costs nothing
    and is made at once."""
    future: Future[CopyEngine] = Future()

    def make() -> None:
        try:
            future.set_result(make_engine(spec))
        except BaseException as exc:
            future.set_exception(exc)

    if spec.kind == "cuda":
        threading.Thread(target=make, name="kold-cuda-init").start()
    else:
        make()
    return future


def _raise_if_failed(engine: Future[CopyEngine]) -> None:
    if engine.done() and (exc := engine.exception()) is not None:
        raise exc


def _from_shm(
    hit: CacheHit, manifest: Manifest, stats: RestoreStats, engine: Future[CopyEngine] | None, *, verify: bool
) -> torch.Tensor | None:
    """Restore from the shm tier without reading through a pipeline. None if verification fails.

    CPU (`engine` None): the tier's file mapped copy-on-write, page tables filled now so the first
    forward pass does not fault page by page (on a huge-page tmpfs that is ~1100 PMD entries for a 2 GB
    model, milliseconds; on 4 KiB pages ~540k PTEs, a few hundred ms). GPU: mapped shared and
    read-only, and pinned in place (see `_shm_to_device`).
    """
    path = hit.tier.data_path(manifest.id)
    fetch_started = time.perf_counter()
    mapping: mmap.mmap | None = None
    if manifest.data_size and engine is None:
        mapping = map_file(path, manifest.data_size, populate=True)
    elif manifest.data_size:
        mapping = map_file_read_only(path, manifest.data_size)
    stats.bytes_by_tier = {"shm": manifest.data_size}
    if verify and mapping is not None:
        stats.verified = True
        t0 = time.perf_counter()
        view = memoryview(mapping)
        try:
            for chunk in manifest.chunks():
                if chunk_checksum(view[chunk.offset : chunk.end]) != chunk.checksum:
                    log.warning("snapshot %s: chunk %d in the shm tier is corrupt", manifest.id, chunk.index)
                    return None
        finally:
            view.release()
        stats.verify_s = time.perf_counter() - t0
    if engine is None:
        stats.mapped = True
        stats.fetch_s = time.perf_counter() - fetch_started
        _await_torch(stats)
        return host_tensor(mapping, manifest.data_size) if mapping is not None else host_tensor(memoryview(b""), 0)
    return _shm_to_device(mapping, manifest, engine, stats, fetch_started)


def _shm_to_device(
    mapping: mmap.mmap | None,
    manifest: Manifest,
    engine: Future[CopyEngine],
    stats: RestoreStats,
    started: float,
) -> torch.Tensor:
    """Copy the shm tier's mapping to the device chunk by chunk with no staging copy.

    The mapping is shared and read-only, and each chunk is pinned read-only: the driver pins with
    FOLL_LONGTERM, which on a private mapping makes the kernel copy every page into anonymous memory
    (~1.2 s and 2.2 GB per 2.2 GB instance); a shared mapping's pages are the tier's own. Pins run in
    `PIN_THREADS` threads, all submitted at once, so they run ahead of the copies: chunk i is copied as
    soon as its own pin is done. Where the driver refuses the read-only flag, nothing is pinned for
    writing: `_NotPinnableError` sends the restore through the staged ring. Unpinning, once every copy is
    done, runs off the critical path (a thread the interpreter waits for at exit), and only then is
    the mapping closed.
    """
    dest = StagedDestination(engine, manifest.data_size, manifest.chunk_size, slots=0)
    if mapping is not None:
        address = readonly_address(mapping)
        chunks = list(manifest.chunks())
        copy_engine = dest.engine
        pins: list[Future[None]] = []
        refused: HostRegisterError | None = None
        pool = ThreadPoolExecutor(min(PIN_THREADS, len(chunks)), thread_name_prefix="kold-shm-pin")
        try:
            pins = [pool.submit(copy_engine.register_host, address + c.offset, c.size, read_only=True) for c in chunks]
            for chunk, pin in zip(chunks, pins, strict=True):
                try:
                    pin.result()
                except HostRegisterError as exc:
                    refused = exc
                    break
                dest.commit_external(chunk, address + chunk.offset)
            if refused is None:
                dest.finish()
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
            dest.synchronize()  # nothing may still read the pages when they are unpinned
            pinned = [
                address + c.offset
                for c, pin in zip(chunks, pins, strict=False)
                if pin.done() and not pin.cancelled() and pin.exception() is None
            ]
            threading.Thread(target=_unpin_and_close, args=(copy_engine, pinned, mapping), name="kold-unpin").start()
        if refused is not None:
            raise _NotPinnableError(str(refused))
    stats.fetch_s = time.perf_counter() - started
    stats.h2d_s = dest.copy_seconds
    stats.readers = 0
    stats.pinned_in_place = mapping is not None
    return dest.tensor()


def _unpin_and_close(engine: CopyEngine, addresses: list[int], mapping: mmap.mmap) -> None:
    for address in addresses:
        try:
            engine.unregister_host(address)
        except Exception:  # keep the mapping rather than unmap pages the driver may still hold
            keep_host_memory(mapping, "the shm tier's mapping")
            return
    with contextlib.suppress(BufferError):
        mapping.close()


def _start_fill(
    cache: NodeCache,
    tiers: list[CacheTier],
    source: tuple[Store, str],
    ref: SnapshotRef,
    manifest: Manifest,
    files: dict[str, bytes],
    dest: HostDestination | StagedDestination,
) -> threading.Thread:
    """Fill cache tiers in the background: from the restored host buffer, or (device memory) by
    reading again where the bytes came from (`source`: the store or a slower tier) rather than
    copying back from the GPU."""
    source_store, source_tier = source
    remote = source_tier == "store" and ref.store_uri.startswith("s3://")

    def fill() -> None:
        for tier in tiers:
            try:
                if isinstance(dest, HostDestination):
                    cache.fill(tier, manifest, files, buffer=memoryview(dest.buffer))
                else:
                    reader = source_store.open_reader(data_key(ref.snapshot_id))
                    try:
                        cache.fill(
                            tier,
                            manifest,
                            files,
                            source=ReadSource(reader, source_tier, 0 if remote else LOCAL_PIECE_SIZE),
                            readers=default_readers(remote),
                        )
                    finally:
                        reader.close()
            except Exception as exc:  # a failed fill must never fail the restore that started it
                log.warning("could not cache snapshot %s in the %s tier: %s", ref.snapshot_id, tier.name, exc)

    thread = threading.Thread(target=fill, name="kold-cache-fill", daemon=True)
    thread.start()
    return thread


def _worth_caching(tier: CacheTier, ref: SnapshotRef) -> bool:
    # a disk tier in front of a local-directory store would copy a file to the same kind of disk
    return not (tier.name == "disk" and ref.store_uri.startswith("file://"))
