"""Store and snapshot URIs, and object keys that must never escape a store's root."""

from __future__ import annotations

from pathlib import Path

import pytest

from kold.snapshot.errors import InvalidURIError
from kold.snapshot.filestore import FileStore
from kold.snapshot.store import check_key, normalize_store_uri, open_store, parse_snapshot_uri

SID = "0123456789abcdef0123456789abcdef"


def test_store_uris_are_normalised(tmp_path: Path) -> None:
    assert normalize_store_uri(str(tmp_path)) == tmp_path.resolve().as_uri()
    assert normalize_store_uri(f"file://{tmp_path}/") == tmp_path.resolve().as_uri()
    assert normalize_store_uri("s3://bucket/a/b/") == "s3://bucket/a/b"
    assert normalize_store_uri("s3://bucket") == "s3://bucket"


@pytest.mark.parametrize("uri", ["", "http://x/y", "s3:///nobucket", "file://host/path"])
def test_bad_store_uris(uri: str) -> None:
    with pytest.raises(InvalidURIError):
        normalize_store_uri(uri)


def test_snapshot_uri_round_trip(tmp_path: Path) -> None:
    ref = parse_snapshot_uri(f"{tmp_path.as_uri()}/snapshots/{SID}")
    assert ref.snapshot_id == SID and ref.store_uri == tmp_path.resolve().as_uri()
    assert parse_snapshot_uri(ref.uri) == ref
    s3 = parse_snapshot_uri(f"s3://models/team/snapshots/{SID}")
    assert s3.store_uri == "s3://models/team"


@pytest.mark.parametrize("uri", [f"file:///tmp/store/{SID}", "file:///tmp/store/snapshots/xyz", "s3://b/snapshots/"])
def test_bad_snapshot_uris_name_the_expected_form(uri: str) -> None:
    with pytest.raises(InvalidURIError, match="snapshots/<32 hex chars>"):
        parse_snapshot_uri(uri)


@pytest.mark.parametrize("key", ["", "/abs", "a/../b", "a//b", "./a", "a\\b", "a\0b"])
def test_keys_that_could_escape_the_root_are_refused(key: str) -> None:
    with pytest.raises(InvalidURIError):
        check_key(key)


def test_open_store_gives_a_file_store(tmp_path: Path) -> None:
    store = open_store(str(tmp_path))
    assert isinstance(store, FileStore)
    store.put_bytes("a/b", b"hello")
    assert store.get_bytes("a/b") == b"hello" and store.size("a/b") == 5
    assert store.list_keys("a") == ["a/b"]
    with pytest.raises(InvalidURIError):
        store.put_bytes("../escape", b"x")
    assert not (tmp_path.parent / "escape").exists()


def test_file_writer_abort_leaves_nothing(tmp_path: Path) -> None:
    store = FileStore(tmp_path)
    writer = store.open_writer("x/data")
    writer.write(b"partial")
    writer.abort()
    assert not store.exists("x/data")
    assert not (tmp_path / "x").exists()  # nor the directory it made for the object
