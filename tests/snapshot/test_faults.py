"""Bad data and missing pieces: each has its own error, names what is wrong, and nothing bad is loaded."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from snapshot_helpers import SMALL_CHUNK

from kold.snapshot import CacheTier, NodeCache, build_snapshot, restore
from kold.snapshot.errors import (
    ChunkCorruptedError,
    ChunkTruncatedError,
    ManifestError,
    ManifestVersionError,
    SnapshotNotFoundError,
)
from kold.snapshot.filestore import FileReader
from kold.snapshot.store import data_key, manifest_key


@pytest.fixture
def built(tiny_model: Path, tmp_path: Path):  # type: ignore[no-untyped-def]
    store_root = tmp_path / "store"
    result = build_snapshot(tiny_model, store_root.as_uri(), chunk_size=SMALL_CHUNK)
    return result, store_root


def _flip(path: Path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0xFF]))


def test_a_corrupted_chunk_in_the_store_fails_naming_the_chunk(built) -> None:  # type: ignore[no-untyped-def]
    result, root = built
    chunk = result.manifest.chunk(2)
    _flip(root / data_key(result.manifest.id), chunk.offset + 10)
    with pytest.raises(ChunkCorruptedError, match=rf"snapshot {result.manifest.id}: chunk 2 .*checksum mismatch"):
        restore(result.uri)


def test_a_transient_corruption_is_fetched_again_and_succeeds(built, reference, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """A bit flipped in flight (first read of chunk 1 only): the chunk is re-read and the restore is right."""
    result, _ = built
    original = FileReader.read_into
    chunk = result.manifest.chunk(1)
    flipped = []

    def flaky(self: FileReader, offset: int, dest: memoryview) -> int:
        n = original(self, offset, dest)
        if offset == chunk.offset and not flipped:
            flipped.append(True)
            dest[5] ^= 0xFF
        return n

    monkeypatch.setattr(FileReader, "read_into", flaky)
    snap = restore(result.uri)
    assert snap.stats.refetched_chunks == [1]
    for name, tensor in reference.items():
        assert torch.equal(snap.tensors[name], tensor)


def test_unverified_restore_is_possible_but_verified_is_the_default(built) -> None:  # type: ignore[no-untyped-def]
    result, root = built
    _flip(root / data_key(result.manifest.id), result.manifest.chunk(0).offset + 1)
    snap = restore(result.uri, verify=False)
    assert not snap.stats.verified
    with pytest.raises(ChunkCorruptedError):
        restore(result.uri)


def test_truncated_data_is_its_own_error(built) -> None:  # type: ignore[no-untyped-def]
    result, root = built
    path = root / data_key(result.manifest.id)
    with open(path, "r+b") as f:
        f.truncate(result.manifest.data_size - 5000)
    with pytest.raises(ChunkTruncatedError, match=rf"chunk {result.manifest.num_chunks - 1} .*short read"):
        restore(result.uri)


def test_missing_snapshot_and_missing_data(built, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    result, root = built
    missing = f"{(tmp_path / 'elsewhere').as_uri()}/snapshots/{result.manifest.id}"
    with pytest.raises(SnapshotNotFoundError, match=rf"snapshot {result.manifest.id} is not in"):
        restore(missing)
    (root / data_key(result.manifest.id)).unlink()
    with pytest.raises(SnapshotNotFoundError, match="data object is missing"):
        restore(result.uri)


def test_unknown_manifest_version(built) -> None:  # type: ignore[no-untyped-def]
    result, root = built
    path = root / manifest_key(result.manifest.id)
    doc = json.loads(path.read_bytes())
    doc["version"] = 7
    path.write_text(json.dumps(doc))
    with pytest.raises(ManifestVersionError, match=rf"snapshot {result.manifest.id}.*version 7"):
        restore(result.uri)


def test_a_tampered_manifest_does_not_match_its_id(built) -> None:  # type: ignore[no-untyped-def]
    result, root = built
    path = root / manifest_key(result.manifest.id)
    doc = json.loads(path.read_bytes())
    doc["metadata"]["model_type"] = "evil"
    path.write_text(json.dumps(doc))
    with pytest.raises(ManifestError, match="hashes to"):
        restore(result.uri)


def test_a_corrupted_cache_entry_is_refetched_from_the_store_and_evicted(built, reference, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    result, _ = built
    tier = CacheTier("disk", tmp_path / "disk", 1 << 30)
    cache = NodeCache([tier])
    # a file:// store is not worth a disk tier in normal use; fill it directly for this test
    clean = restore(result.uri)
    assert cache.fill(tier, result.manifest, clean.files, buffer=memoryview(clean.buffer.numpy()))
    _flip(tier.data_path(result.manifest.id), result.manifest.chunk(3).offset + 7)
    snap = restore(result.uri, cache=cache, verify=True)
    assert snap.stats.source_tier == "disk" and snap.stats.refetched_chunks == [3]
    assert snap.stats.bytes_by_tier["store"] == result.manifest.chunk(3).size
    for name, tensor in reference.items():
        assert torch.equal(snap.tensors[name], tensor)
    assert cache.lookup(result.manifest.id) is None  # the bad entry is gone


def test_a_failed_cache_fill_leaves_no_entry(built, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    result, _ = built
    tier = CacheTier("shm", tmp_path / "shm", 1 << 30)
    cache = NodeCache([tier])
    snap = restore(result.uri)
    corrupted = bytearray(snap.buffer.numpy().tobytes())
    corrupted[result.manifest.chunk(1).offset] ^= 0xFF
    with pytest.raises(ChunkCorruptedError, match="not caching"):
        cache.fill(tier, result.manifest, snap.files, buffer=memoryview(corrupted))
    assert cache.lookup(result.manifest.id) is None
    assert list((tmp_path / "shm" / ".tmp").iterdir()) == []


def test_a_corrupted_shm_entry_falls_back_to_the_store(built, reference, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    result, _ = built
    cache = NodeCache([CacheTier("shm", tmp_path / "shm", 1 << 30)])
    restore(result.uri, cache=cache).wait_cache_fill()
    _flip(cache.tiers[0].data_path(result.manifest.id), 100)
    snap = restore(result.uri, cache=cache, verify=True)
    assert snap.stats.source_tier == "store"
    for name, tensor in reference.items():
        assert torch.equal(snap.tensors[name], tensor)
