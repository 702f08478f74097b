"""Node-local cache tiers: host shared memory (`/dev/shm/kold`) and a local disk directory.

The first restore on a node fills them; later restores read from the fastest tier that holds the
snapshot. Each tier is a directory laid out like a `file://` store (`snapshots/<id>/...`), so the
same readers serve it. An entry becomes visible only by renaming a fully written *and verified*
temporary directory into place: a crash or a failed fill never leaves an entry a restore would trust.
Size is bounded per tier; the least recently used entries are evicted first (use = a restore or
prefetch touching the entry directory's mtime).
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import mmap
import os
import shutil
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from kold.snapshot.checksum import chunk_checksum
from kold.snapshot.devices import HostDestination
from kold.snapshot.errors import ChunkCorruptedError
from kold.snapshot.filestore import FileStore
from kold.snapshot.hostmem import advise_hugepages
from kold.snapshot.manifest import ChunkEntry, Manifest
from kold.snapshot.pipeline import ReadSource, run_pipeline
from kold.snapshot.plan import make_plan
from kold.snapshot.store import SNAPSHOTS_PREFIX, data_key

log = logging.getLogger(__name__)

TIER_ORDER = ("shm", "disk")  # fastest first
STALE_TEMP_SECONDS = 3600  # a fill that has not finished in an hour belongs to a dead process


@dataclass(frozen=True)
class CacheTier:
    name: str  # "shm" or "disk"
    root: Path
    max_bytes: int

    def __post_init__(self) -> None:
        if self.name not in TIER_ORDER:
            raise ValueError(f"unknown cache tier {self.name!r} (use {', '.join(TIER_ORDER)})")
        if self.max_bytes < 0:
            raise ValueError("max_bytes must be >= 0")

    @property
    def store(self) -> FileStore:
        return FileStore(self.root)

    def entry_dir(self, snapshot_id: str) -> Path:
        return self.root / SNAPSHOTS_PREFIX / snapshot_id

    def data_path(self, snapshot_id: str) -> Path:
        return self.root / data_key(snapshot_id)


@dataclass(frozen=True)
class CacheHit:
    tier: CacheTier
    manifest: Manifest
    files: Mapping[str, bytes]


@dataclass(frozen=True)
class CacheEntry:
    tier: str
    snapshot_id: str
    size: int
    last_used: float


class NodeCache:
    def __init__(self, tiers: list[CacheTier]) -> None:
        self.tiers = sorted(tiers, key=lambda t: TIER_ORDER.index(t.name))

    # -- lookups ---------------------------------------------------------------------------------
    def lookup(self, snapshot_id: str) -> CacheHit | None:
        for tier in self.tiers:
            entry = tier.entry_dir(snapshot_id)
            if not (entry / "manifest.json").is_file():
                continue
            try:
                manifest = Manifest.from_json((entry / "manifest.json").read_bytes(), source=str(entry))
                files = {f.name: (entry / "files" / f.name).read_bytes() for f in manifest.files}
            except (OSError, ValueError) as exc:
                log.warning("cache entry %s is unreadable (%s): evicting it", entry, exc)
                self.evict(snapshot_id, tier)
                continue
            _touch(entry)
            return CacheHit(tier, manifest, files)
        return None

    def entries(self, tier: CacheTier) -> list[CacheEntry]:
        out = []
        base = tier.root / SNAPSHOTS_PREFIX
        if base.is_dir():
            for entry in base.iterdir():
                with contextlib.suppress(FileNotFoundError):
                    out.append(CacheEntry(tier.name, entry.name, _dir_size(entry), entry.stat().st_mtime))
        return sorted(out, key=lambda e: e.last_used)

    def usage(self, tier: CacheTier) -> int:
        return sum(e.size for e in self.entries(tier))

    def evict(self, snapshot_id: str, tier: CacheTier) -> None:
        """Remove an entry. Processes that mapped it keep their mapping: unlink frees memory only at unmap."""
        with _locked(tier):
            _remove_entry(tier, snapshot_id)

    def quarantine(self, snapshot_id: str, tier: CacheTier, *, identity: tuple[int, int] | None, reason: str) -> bool:
        """Take out an entry found corrupt after a restore trusted it, so the next restore on the node reads
        the store (and fills the tier again). `identity` is the (st_dev, st_ino) of the data file that was
        found corrupt: an entry filled again since (another instance's restore from the store) is a
        different file and stays. True if the entry was removed. The bad bytes are not kept: in the shm
        tier they are the node's memory, and the log line names the chunk."""
        with _locked(tier):
            if identity is not None and data_identity(tier, snapshot_id) != identity:
                log.info(
                    "snapshot %s: the %s tier's entry was replaced already; not quarantined", snapshot_id, tier.name
                )
                return False
            if not tier.entry_dir(snapshot_id).exists():
                return False
            _remove_entry(tier, snapshot_id)
        log.warning("quarantined snapshot %s in the %s tier (%s): %s", snapshot_id, tier.name, tier.root, reason)
        return True

    # -- fills -----------------------------------------------------------------------------------
    def fill(
        self,
        tier: CacheTier,
        manifest: Manifest,
        files: Mapping[str, bytes],
        *,
        buffer: memoryview | None = None,
        source: ReadSource | None = None,
        readers: int = 2,
        on_chunk: Callable[[ChunkEntry], None] | None = None,
    ) -> bool:
        """Write one entry, from a restored host buffer or by reading a source; False if it does not fit.

        Either way every chunk is checked against the manifest before the entry is committed.
        """
        snapshot_id = manifest.id
        entry_size = manifest.data_size + sum(len(c) for c in files.values())
        if entry_size > tier.max_bytes:
            log.info(
                "snapshot %s (%d bytes) exceeds the %s tier (%d bytes): not cached",
                snapshot_id,
                entry_size,
                tier.name,
                tier.max_bytes,
            )
            return False
        if (tier.entry_dir(snapshot_id) / "manifest.json").is_file():
            return True
        temp_root = tier.root / ".tmp"
        temp_root.mkdir(parents=True, exist_ok=True)
        _remove_stale_temps(temp_root)
        temp = temp_root / f"{snapshot_id}-{uuid.uuid4().hex}"
        (temp / "files").mkdir(parents=True)
        try:
            with _locked(tier):
                self._make_room(tier, entry_size)
            if buffer is not None:
                _write_verified(temp / "data", manifest, buffer)
            elif source is not None:
                _read_into_file(temp / "data", manifest, source, readers, on_chunk)
            else:
                raise ValueError("fill needs a buffer or a source")
            for f in manifest.files:
                content = files[f.name]
                if chunk_checksum(content) != f.checksum:
                    raise ChunkCorruptedError(f"snapshot {snapshot_id}: file {f.name} does not match its checksum")
                (temp / "files" / f.name).write_bytes(content)
            (temp / "manifest.json").write_bytes(manifest.to_json())
            if tier.name == "disk":
                _fsync_tree(temp)
            with _locked(tier):
                final = tier.entry_dir(snapshot_id)
                final.parent.mkdir(parents=True, exist_ok=True)
                try:
                    os.rename(temp, final)
                except OSError:
                    if not (final / "manifest.json").is_file():
                        raise
                    shutil.rmtree(temp, ignore_errors=True)  # another process filled it first
            log.info("cached snapshot %s in the %s tier (%s)", snapshot_id, tier.name, tier.root)
            return True
        except BaseException:
            shutil.rmtree(temp, ignore_errors=True)
            raise

    def _make_room(self, tier: CacheTier, needed: int) -> None:
        entries = self.entries(tier)
        used = sum(e.size for e in entries)
        for victim in entries:  # oldest first
            if used + needed <= tier.max_bytes:
                break
            log.info("evicting snapshot %s from the %s tier (least recently used)", victim.snapshot_id, tier.name)
            _remove_entry(tier, victim.snapshot_id)
            used -= victim.size


def data_identity(tier: CacheTier, snapshot_id: str) -> tuple[int, int] | None:
    """(st_dev, st_ino) of an entry's data file, None if there is none: which fill of the entry it is."""
    try:
        st = os.stat(tier.data_path(snapshot_id))
    except OSError:
        return None
    return (st.st_dev, st.st_ino)


def _write_verified(path: Path, manifest: Manifest, buffer: memoryview) -> None:
    with open(path, "wb") as f:
        for chunk in manifest.chunks():
            piece = buffer[chunk.offset : chunk.end]
            if chunk_checksum(piece) != chunk.checksum:
                raise ChunkCorruptedError(
                    f"snapshot {manifest.id}: chunk {chunk.index} in memory does not match its checksum; not caching it"
                )
            f.write(piece)


def _read_into_file(
    path: Path,
    manifest: Manifest,
    source: ReadSource,
    readers: int,
    on_chunk: Callable[[ChunkEntry], None] | None = None,
) -> None:
    """Parallel ranged reads straight into a shared mapping of the new file: the restore pipeline, aimed at a file."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        os.ftruncate(fd, manifest.data_size)
        if manifest.data_size == 0:
            return
        mapping = mmap.mmap(fd, manifest.data_size, flags=mmap.MAP_SHARED)
        advise_hugepages(mapping)  # a tmpfs mounted huge=advise then backs the entry with 2 MiB pages
    finally:
        os.close(fd)
    dest = HostDestination(manifest.data_size, buffer=mapping)
    try:
        plan = make_plan(manifest, readers=readers, staged=False)
        run_pipeline(plan, manifest.id, source, dest, verify=True, on_chunk=on_chunk)
        mapping.flush()
    finally:
        dest.release()
        mapping.close()


def _touch(entry: Path) -> None:
    with contextlib.suppress(OSError):
        os.utime(entry)


def _dir_size(path: Path) -> int:
    total = 0
    for root, _, names in os.walk(path):
        for name in names:
            with contextlib.suppress(FileNotFoundError):
                total += os.stat(os.path.join(root, name)).st_size
    return total


def _remove_entry(tier: CacheTier, snapshot_id: str) -> None:
    entry = tier.entry_dir(snapshot_id)
    if entry.exists():
        # rename first so a concurrent lookup never sees a half-deleted entry
        doomed = tier.root / ".tmp" / f"evicted-{snapshot_id}-{uuid.uuid4().hex}"
        doomed.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            os.rename(entry, doomed)
            shutil.rmtree(doomed, ignore_errors=True)


def _remove_stale_temps(temp_root: Path) -> None:
    now = time.time()
    for temp in temp_root.iterdir():
        with contextlib.suppress(OSError):
            if now - temp.stat().st_mtime > STALE_TEMP_SECONDS:
                shutil.rmtree(temp, ignore_errors=True)


def _fsync_tree(path: Path) -> None:
    for root, _, names in os.walk(path):
        for name in names:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


@contextlib.contextmanager
def _locked(tier: CacheTier) -> Iterator[None]:
    """Serialise eviction and commits between processes on this node (flock on the tier's lock file)."""
    tier.root.mkdir(parents=True, exist_ok=True)
    fd = os.open(tier.root / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)
