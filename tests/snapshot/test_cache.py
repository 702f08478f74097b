"""Node cache tiers: fill on first restore, fastest tier first, bounded with LRU eviction, prefetch."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from snapshot_helpers import SMALL_CHUNK

from kold.snapshot import CacheTier, NodeCache, build_snapshot, prefetch, restore
from kold.snapshot.devices import CopyEvent, HostCopyEngine


@pytest.fixture
def published_small(tmp_path: Path) -> tuple[str, int]:
    """A snapshot of several 4 KiB chunks in a local store: (uri, number of chunks)."""
    result = build_snapshot(_state(7), (tmp_path / "store").as_uri(), chunk_size=4096)
    return result.uri, len(list(result.manifest.chunks()))


def _state(seed: int, n: int = 4) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {f"w{i}": torch.randn(64, 256, generator=gen) for i in range(n)}  # 64 KiB each


def test_first_restore_fills_the_shm_tier_and_the_next_maps_it(
    tiny_model: Path, store_uri: str, tmp_path: Path, reference
) -> None:  # type: ignore[no-untyped-def]
    uri = build_snapshot(tiny_model, store_uri, chunk_size=SMALL_CHUNK).uri
    cache = NodeCache([CacheTier("shm", tmp_path / "shm", 1 << 30)])
    first = restore(uri, cache=cache)
    assert first.stats.source_tier == "store"
    assert first.wait_cache_fill(timeout=30)
    second = restore(uri, cache=cache)
    assert second.stats.source_tier == "shm" and second.stats.mapped
    assert second.stats.bytes_by_tier == {"shm": second.manifest.data_size}
    for name, tensor in reference.items():
        assert torch.equal(second.tensors[name], tensor)
    # copy-on-write: changing our tensors never changes the cached entry another instance maps
    second.buffer[:16] = 7
    third = restore(uri, cache=cache)
    assert torch.equal(third.buffer[:16], first.buffer[:16])


def test_staged_restore_from_shm_copies_from_the_mapping(
    tiny_model: Path, store_uri: str, tmp_path: Path, reference
) -> None:  # type: ignore[no-untyped-def]
    uri = build_snapshot(tiny_model, store_uri, chunk_size=SMALL_CHUNK).uri
    cache = NodeCache([CacheTier("shm", tmp_path / "shm", 1 << 30)])
    prefetch(uri, cache)
    snap = restore(uri, cache=cache, staging=True)
    assert snap.stats.source_tier == "shm" and not snap.stats.mapped and snap.stats.h2d_s > 0
    for name, tensor in reference.items():
        assert torch.equal(snap.tensors[name], tensor)


def test_fastest_tier_wins(tmp_path: Path, store_uri: str) -> None:
    uri = build_snapshot(_state(0), store_uri, chunk_size=4096).uri
    shm = CacheTier("shm", tmp_path / "shm", 1 << 30)
    disk = CacheTier("disk", tmp_path / "disk", 1 << 30)
    cache = NodeCache([disk, shm])  # given in any order
    assert [t.name for t in cache.tiers] == ["shm", "disk"]
    snap = restore(uri)
    for tier in (disk, shm):
        cache.fill(tier, snap.manifest, snap.files, buffer=memoryview(snap.buffer.numpy()))
    hit = cache.lookup(snap.manifest.id)
    assert hit is not None and hit.tier.name == "shm"
    cache.evict(snap.manifest.id, shm)
    hit = cache.lookup(snap.manifest.id)
    assert hit is not None and hit.tier.name == "disk"
    assert restore(uri, cache=cache).stats.source_tier == "disk"


def test_lru_eviction_keeps_the_tier_within_its_bound(tmp_path: Path, store_uri: str) -> None:
    snaps = [restore(build_snapshot(_state(i), store_uri, chunk_size=4096).uri) for i in range(3)]
    size = snaps[0].manifest.data_size
    tier = CacheTier("shm", tmp_path / "shm", int(size * 2.5))  # room for two entries
    cache = NodeCache([tier])
    for i, snap in enumerate(snaps[:2]):
        assert cache.fill(tier, snap.manifest, snap.files, buffer=memoryview(snap.buffer.numpy()))
        os.utime(tier.entry_dir(snap.manifest.id), (1000 + i, 1000 + i))
    assert cache.lookup(snaps[0].manifest.id) is not None  # use the older one: now snaps[1] is least recent
    assert cache.fill(tier, snaps[2].manifest, snaps[2].files, buffer=memoryview(snaps[2].buffer.numpy()))
    held = {e.snapshot_id for e in cache.entries(tier)}
    assert held == {snaps[0].manifest.id, snaps[2].manifest.id}
    assert cache.usage(tier) <= tier.max_bytes


def test_a_snapshot_larger_than_the_tier_is_not_cached(tmp_path: Path, store_uri: str) -> None:
    snap = restore(build_snapshot(_state(0), store_uri, chunk_size=4096).uri)
    tier = CacheTier("shm", tmp_path / "shm", snap.manifest.data_size // 2)
    assert not NodeCache([tier]).fill(tier, snap.manifest, snap.files, buffer=memoryview(snap.buffer.numpy()))
    assert NodeCache([tier]).lookup(snap.manifest.id) is None


def test_prefetch_warms_every_tier_from_the_one_above(tmp_path: Path, store_uri: str, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    from kold.snapshot import restorer

    uri = build_snapshot(_state(0), store_uri, chunk_size=4096).uri
    monkeypatch.setattr(restorer, "_worth_caching", lambda tier, ref: True)  # pretend the store is remote
    from kold.snapshot import prefetcher

    monkeypatch.setattr(prefetcher, "_worth_caching", lambda tier, ref: True)
    cache = NodeCache([CacheTier("shm", tmp_path / "shm", 1 << 30), CacheTier("disk", tmp_path / "disk", 1 << 30)])
    assert prefetch(uri, cache) == ["shm", "disk"]
    assert restore(uri, cache=cache).stats.source_tier == "shm"


def test_disk_tier_is_skipped_in_front_of_a_local_store(tmp_path: Path, store_uri: str) -> None:
    uri = build_snapshot(_state(0), store_uri, chunk_size=4096).uri
    cache = NodeCache([CacheTier("disk", tmp_path / "disk", 1 << 30)])
    assert prefetch(uri, cache) == []
    snap = restore(uri, cache=cache)
    assert snap.wait_cache_fill(5) and cache.lookup(snap.manifest.id) is None


def test_concurrent_fills_make_one_entry(tmp_path: Path, store_uri: str) -> None:
    uri = build_snapshot(_state(0), store_uri, chunk_size=4096).uri
    cache = NodeCache([CacheTier("shm", tmp_path / "shm", 1 << 30)])
    errors: list[BaseException] = []

    def run() -> None:
        try:
            prefetch(uri, cache)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert len(cache.entries(cache.tiers[0])) == 1
    leftovers = [p for p in (tmp_path / "shm" / ".tmp").iterdir() if not p.name.startswith("evicted")]
    assert leftovers == []


def test_stale_temporaries_of_dead_fills_are_cleaned(tmp_path: Path, store_uri: str) -> None:
    uri = build_snapshot(_state(0), store_uri, chunk_size=4096).uri
    tier = CacheTier("shm", tmp_path / "shm", 1 << 30)
    stale = tmp_path / "shm" / ".tmp" / "deadbeef-1234"
    stale.mkdir(parents=True)
    old = time.time() - 7200
    os.utime(stale, (old, old))
    prefetch(uri, NodeCache([tier]))
    assert not stale.exists()


def test_unknown_tier_name_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown cache tier"):
        CacheTier("ram", tmp_path, 1)


def test_huge_page_detection_reads_the_mount_table(tmp_path: Path) -> None:
    from kold.snapshot.hostmem import huge_page_backed

    assert not huge_page_backed(tmp_path)  # pytest's tmp dir is not a huge-page tmpfs here
    mounts = Path("/proc/self/mountinfo").read_text()
    huge = [line.split()[4] for line in mounts.splitlines() if "huge=within_size" in line or "huge=always" in line]
    for mount_point in huge:
        assert huge_page_backed(Path(mount_point))


def test_a_staged_restore_fills_the_tier_by_reading_the_store_again(
    tiny_model: Path, store_uri: str, tmp_path: Path, reference
) -> None:  # type: ignore[no-untyped-def]
    """Device memory is not read back: the GPU path (here its CPU twin) fills tiers from the store."""
    uri = build_snapshot(tiny_model, store_uri, chunk_size=SMALL_CHUNK).uri
    cache = NodeCache([CacheTier("shm", tmp_path / "shm", 1 << 30)])
    first = restore(uri, cache=cache, staging=True)
    assert first.stats.source_tier == "store" and first.wait_cache_fill(30)
    second = restore(uri, cache=cache)
    assert second.stats.source_tier == "shm"
    for name, tensor in reference.items():
        assert torch.equal(second.tensors[name], tensor)


def test_a_cache_hit_never_touches_the_store(tiny_model: Path, tmp_path: Path, reference) -> None:  # type: ignore[no-untyped-def]
    """The store is opened lazily: with the snapshot in a tier, even a vanished store is not needed
    (for s3:// this skips importing boto3 and building a client on the cold path)."""
    import shutil

    store_root = tmp_path / "store"
    uri = build_snapshot(tiny_model, store_root.as_uri(), chunk_size=SMALL_CHUNK).uri
    for tier_name in ("shm", "disk"):
        tier = CacheTier(tier_name, tmp_path / tier_name, 1 << 30)
        snap = restore(uri)
        NodeCache([tier]).fill(tier, snap.manifest, snap.files, buffer=memoryview(snap.buffer.numpy()))
    shutil.rmtree(store_root)
    for tier_name in ("shm", "disk"):
        cache = NodeCache([CacheTier(tier_name, tmp_path / tier_name, 1 << 30)])
        got = restore(uri, cache=cache)
        assert got.stats.source_tier == tier_name
        for name, tensor in reference.items():
            assert torch.equal(got.tensors[name], tensor)


def test_a_disk_tier_hit_is_promoted_to_shm(tmp_path: Path, store_uri: str) -> None:
    uri = build_snapshot(_state(0), store_uri, chunk_size=4096).uri
    shm = CacheTier("shm", tmp_path / "shm", 1 << 30)
    disk = CacheTier("disk", tmp_path / "disk", 1 << 30)
    snap = restore(uri)
    NodeCache([disk]).fill(disk, snap.manifest, snap.files, buffer=memoryview(snap.buffer.numpy()))
    cache = NodeCache([shm, disk])
    for staging in (False, True):  # from the restored buffer, and (device memory) from the disk tier
        cache.evict(snap.manifest.id, shm)
        first = restore(uri, cache=cache, staging=staging)
        assert first.stats.source_tier == "disk" and first.wait_cache_fill(30)
        assert restore(uri, cache=cache).stats.source_tier == "shm"


class RecordingEngine(HostCopyEngine):
    """The CPU twin, recording what a CUDA engine would be asked to pin, copy and unpin."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[object, ...]] = []
        self.released = threading.Event()

    def alloc_pinned(self, nbytes: int) -> tuple[memoryview, int]:
        self.calls.append(("alloc", nbytes))
        return super().alloc_pinned(nbytes)

    def register_host(self, address: int, nbytes: int, *, read_only: bool = False) -> None:
        self.calls.append(("register", address, nbytes, read_only))

    def unregister_host(self, address: int) -> None:
        self.calls.append(("unregister", address))

    def copy_to_device_async(self, src_address: int, dst_offset: int, nbytes: int, stream: int) -> CopyEvent:
        self.calls.append(("copy", src_address, nbytes))
        return super().copy_to_device_async(src_address, dst_offset, nbytes, stream)

    def release_host(self) -> None:
        self.calls.append(("release",))
        self.released.set()


def _wait_until(condition: Callable[[], bool], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def test_staged_shm_restore_pins_each_chunk_read_only_before_its_copy_and_unpins_after(
    tiny_model: Path, store_uri: str, tmp_path: Path, reference, monkeypatch: pytest.MonkeyPatch
) -> None:  # type: ignore[no-untyped-def]
    """The GPU path from the shm tier: no staging ring; each chunk of the tier's (private, file-backed)
    mapping is pinned read-only (pinning for writing would copy every page) right before its copy."""
    from kold.snapshot import restorer

    uri = build_snapshot(tiny_model, store_uri, chunk_size=SMALL_CHUNK).uri
    cache = NodeCache([CacheTier("shm", tmp_path / "shm", 1 << 30)])
    prefetch(uri, cache)
    engine = RecordingEngine()
    monkeypatch.setattr(restorer, "make_engine", lambda spec: engine)
    snap = restore(uri, cache=cache, staging=True)
    for name, tensor in reference.items():
        assert torch.equal(snap.tensors[name], tensor)
    calls = list(engine.calls)
    assert not [c for c in calls if c[0] == "alloc"]  # no staging copy
    copies = [c for c in calls if c[0] == "copy"]
    assert len(copies) == len(list(snap.manifest.chunks())) > 1
    for copy in copies:
        reg = [i for i, c in enumerate(calls) if c[0] == "register" and c[1] == copy[1]]
        assert reg and reg[0] < calls.index(copy), "a chunk was copied before it was pinned"
        assert calls[reg[0]][2:] == (copy[2], True)  # its whole range, read-only
    pinned = {c[1] for c in calls if c[0] == "register"}
    assert _wait_until(lambda: {c[1] for c in engine.calls if c[0] == "unregister"} == pinned)


def test_staged_restore_pins_chunk_sized_slots_and_releases_the_ring(
    published_small: tuple[str, int], monkeypatch: pytest.MonkeyPatch
) -> None:
    from kold.snapshot import restorer

    uri, chunks = published_small
    engine = RecordingEngine()
    monkeypatch.setattr(restorer, "make_engine", lambda spec: engine)
    snap = restore(uri, staging=True, readers=2)
    allocs = [c for c in engine.calls if c[0] == "alloc"]
    assert 1 <= len(allocs) <= 2 + 2  # at most one per ring slot (readers + 2)
    assert {c[1] for c in allocs} == {snap.manifest.chunk_size}
    assert len([c for c in engine.calls if c[0] == "copy"]) == chunks
    assert engine.released.wait(10)  # the ring is unpinned once the copies are done
