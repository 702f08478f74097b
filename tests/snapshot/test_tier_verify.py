"""Cache tiers checked after the fact: a restore trusts a tier (fast path), a `TierVerifier` hashes what
it served, and a corrupt entry is quarantined so the next restore reads the store."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch
from snapshot_helpers import SMALL_CHUNK

from kold.snapshot import CacheTier, NodeCache, build_snapshot, restore
from kold.snapshot.manifest import Manifest
from kold.snapshot.verify import TierVerifier, first_mismatch

CORRUPT_BYTES = 4 << 20  # the repro overwrote 4 MB of the tier's copy


def _overwrite(path: Path, offset: int, nbytes: int) -> int:
    """Overwrite up to `nbytes` from `offset` with 0xA5 (as a stray writer would); the bytes written."""
    size = path.stat().st_size
    n = min(nbytes, size - offset)
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(b"\xa5" * n)
    return n


@pytest.fixture
def published(tiny_model: Path, tmp_path: Path) -> tuple[str, Manifest]:
    result = build_snapshot(tiny_model, (tmp_path / "store").as_uri(), chunk_size=SMALL_CHUNK)
    return result.uri, result.manifest


def _filled(uri: str, cache: NodeCache) -> None:
    first = restore(uri, cache=cache)
    assert first.stats.source_tier == "store" and first.trusted is None  # checked on the way in
    assert first.wait_cache_fill(timeout=30)


def test_first_mismatch_names_the_chunk_of_one_flipped_byte(published) -> None:  # type: ignore[no-untyped-def]
    uri, manifest = published
    data = bytearray(restore(uri).buffer.numpy().tobytes())
    view = memoryview(data)

    def read(chunk):  # type: ignore[no-untyped-def]
        return view[chunk.offset : chunk.end]

    assert first_mismatch(manifest, read) is None
    target = manifest.chunk(2)
    data[target.offset + 777] ^= 0x01
    # hashed in pieces smaller than a chunk: the same digest as the manifest's one-shot checksum
    found = first_mismatch(manifest, read, tier="shm", piece=4096)
    assert found is not None and found.chunk.index == 2
    assert f"chunk 2 (bytes {target.offset}-{target.end}) served from the shm tier" in str(found)
    stop = threading.Event()
    stop.set()
    checked = [0]
    assert first_mismatch(manifest, read, stop=stop, checked=checked) is None and checked == [0]


def test_a_corrupt_shm_entry_is_served_then_found_and_quarantined(published, reference, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    uri, manifest = published
    tier = CacheTier("shm", tmp_path / "shm", 1 << 30)
    cache = NodeCache([tier])
    _filled(uri, cache)
    bad = manifest.chunk(1)
    _overwrite(tier.data_path(manifest.id), bad.offset, CORRUPT_BYTES)

    served = restore(uri, cache=cache)  # the fast path: mapped, not checked
    assert served.stats.source_tier == "shm" and served.stats.mapped and not served.stats.verified
    verifier = TierVerifier.for_restore(served)
    assert verifier is not None
    verdict = verifier.run(low_priority=False)
    assert verdict.state == "corrupt" and verdict.quarantined
    assert verdict.mismatch is not None and verdict.mismatch.chunk.index == bad.index
    assert cache.lookup(manifest.id) is None  # quarantined: the next restore reads the store

    again = restore(uri, cache=cache)
    assert again.stats.source_tier == "store" and again.trusted is None
    for name, tensor in reference.items():
        assert torch.equal(again.tensors[name], tensor)
    assert again.wait_cache_fill(timeout=30)  # and the tier is filled again, from verified bytes
    healed = restore(uri, cache=cache)
    assert healed.stats.source_tier == "shm"
    healed_verifier = TierVerifier.for_restore(healed)
    assert healed_verifier is not None
    assert healed_verifier.run(low_priority=False).state == "verified"


def test_a_clean_tier_verifies_and_a_corrupt_disk_tier_is_found_too(published, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    uri, manifest = published
    tier = CacheTier("disk", tmp_path / "disk", 1 << 30)
    cache = NodeCache([tier])
    clean = restore(uri)
    # a file:// store is not worth a disk tier in normal use; fill it directly for this test
    assert cache.fill(tier, manifest, clean.files, buffer=memoryview(clean.buffer.numpy()))
    snap = restore(uri, cache=cache)
    assert snap.stats.source_tier == "disk" and not snap.stats.verified
    verifier = TierVerifier.for_restore(snap)
    assert verifier is not None
    verdict = verifier.run()
    assert verdict.state == "verified" and verdict.checked_bytes == manifest.data_size

    _overwrite(tier.data_path(manifest.id), manifest.chunk(3).offset + 100, 10)
    corrupt = restore(uri, cache=cache)
    corrupt_verifier = TierVerifier.for_restore(corrupt)
    assert corrupt_verifier is not None
    found = corrupt_verifier.run()
    assert found.mismatch is not None and found.mismatch.chunk.index == 3 and found.mismatch.tier == "disk"
    assert cache.lookup(manifest.id) is None


def test_verify_true_checks_the_tier_before_serving_and_needs_no_verifier(published, reference, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    uri, manifest = published
    tier = CacheTier("shm", tmp_path / "shm", 1 << 30)
    cache = NodeCache([tier])
    _filled(uri, cache)
    assert TierVerifier.for_restore(restore(uri, cache=cache, verify=True)) is None
    _overwrite(tier.data_path(manifest.id), manifest.chunk(0).offset, CORRUPT_BYTES)
    snap = restore(uri, cache=cache, verify=True)
    assert snap.stats.source_tier == "store" and snap.trusted is None
    for name, tensor in reference.items():
        assert torch.equal(snap.tensors[name], tensor)


def test_a_quarantine_never_removes_an_entry_filled_again_since(published, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """Two instances mapped the same corrupt entry; the first quarantines it and a restore from the
    store fills the tier again before the second's check ends: the new, good entry stays."""
    uri, manifest = published
    tier = CacheTier("shm", tmp_path / "shm", 1 << 30)
    cache = NodeCache([tier])
    _filled(uri, cache)
    _overwrite(tier.data_path(manifest.id), manifest.chunk(2).offset, 64)
    first, second = restore(uri, cache=cache), restore(uri, cache=cache)
    first_verifier, second_verifier = TierVerifier.for_restore(first), TierVerifier.for_restore(second)
    assert first_verifier is not None and second_verifier is not None
    assert first_verifier.run().quarantined
    refill = restore(uri, cache=cache)
    assert refill.stats.source_tier == "store" and refill.wait_cache_fill(timeout=30)
    late = second_verifier.run()
    assert late.state == "corrupt" and not late.quarantined  # its own bytes are bad: it still says so
    assert cache.lookup(manifest.id) is not None
