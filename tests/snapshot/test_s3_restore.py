"""Build to and restore from a real S3-protocol server on loopback (rclone serve s3)."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest
import torch
from snapshot_helpers import SMALL_CHUNK

from kold.snapshot import CacheTier, NodeCache, build_snapshot, prefetch, restore
from kold.snapshot.errors import StoreAuthError
from kold.snapshot.store import S3Options

pytestmark = pytest.mark.s3


@pytest.fixture
def bucket_uri(s3_server, s3_env) -> str:  # type: ignore[no-untyped-def]
    bucket = f"snap-{uuid.uuid4().hex[:10]}"
    s3_server.create_bucket(bucket)
    return f"s3://{bucket}/team/models"


def test_publish_restore_and_republish(tiny_model: Path, bucket_uri: str, s3_server, reference) -> None:  # type: ignore[no-untyped-def]
    options: S3Options = s3_server.options()
    first = build_snapshot(tiny_model, bucket_uri, chunk_size=SMALL_CHUNK, s3=options)
    assert first.uploaded and first.uri.startswith(bucket_uri + "/snapshots/")
    again = build_snapshot(tiny_model, bucket_uri, chunk_size=SMALL_CHUNK, s3=options)
    assert not again.uploaded and again.uri == first.uri

    snap = restore(first.uri, s3=options, readers=4)
    assert snap.stats.source_tier == "store" and snap.stats.verified
    assert snap.stats.bytes_by_tier == {"store": snap.manifest.data_size}
    for name, tensor in reference.items():
        assert torch.equal(snap.tensors[name], tensor), name
    assert snap.config()["model_type"] == "llama"


def test_first_restore_from_s3_fills_the_node_tiers(
    tiny_model: Path, bucket_uri: str, s3_server, tmp_path: Path, reference
) -> None:  # type: ignore[no-untyped-def]
    options = s3_server.options()
    uri = build_snapshot(tiny_model, bucket_uri, chunk_size=SMALL_CHUNK, s3=options).uri
    cache = NodeCache([CacheTier("shm", tmp_path / "shm", 1 << 30), CacheTier("disk", tmp_path / "disk", 1 << 30)])
    first = restore(uri, s3=options, cache=cache)
    assert first.wait_cache_fill(60)
    assert {e.tier for t in cache.tiers for e in cache.entries(t)} == {"shm", "disk"}
    second = restore(uri, s3=options, cache=cache)
    assert second.stats.source_tier == "shm"
    for name, tensor in reference.items():
        assert torch.equal(second.tensors[name], tensor), name


def test_prefetch_from_s3(tiny_model: Path, bucket_uri: str, s3_server, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    options = s3_server.options()
    uri = build_snapshot(tiny_model, bucket_uri, chunk_size=SMALL_CHUNK, s3=options).uri
    cache = NodeCache([CacheTier("disk", tmp_path / "disk", 1 << 30)])
    assert prefetch(uri, cache, s3=options) == ["disk"]
    assert restore(uri, s3=options, cache=cache).stats.source_tier == "disk"


def test_wrong_credentials_are_an_auth_error(tiny_model: Path, bucket_uri: str, s3_server, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    options = s3_server.options()
    uri = build_snapshot(tiny_model, bucket_uri, chunk_size=SMALL_CHUNK, s3=options).uri
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    with pytest.raises(StoreAuthError):
        restore(uri, s3=options)
