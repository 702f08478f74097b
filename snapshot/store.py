"""Where snapshots live: the `Store` protocol, store URIs, and `open_store`.

A store is a flat key space of immutable objects (`snapshots/<id>/manifest.json`, `.../data`,
`.../files/<name>`). Two back-ends implement it: a local directory (`file://`, the embedded default)
and any S3-compatible service (`s3://bucket/prefix`). The restore pipeline only needs ranged reads
into caller-owned buffers, so both back-ends can fill the destination memory directly with no
intermediate `bytes` objects.

Layout of one snapshot in a store::

    snapshots/<id>/data              the blob: every tensor at an aligned offset
    snapshots/<id>/files/<name>      config.json, tokenizer.json, ...
    snapshots/<id>/manifest.json     written last: its presence commits the snapshot
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Protocol
from urllib.parse import unquote, urlparse

from kold.snapshot.errors import InvalidURIError
from kold.snapshot.manifest import is_snapshot_id

SNAPSHOTS_PREFIX = "snapshots"


def manifest_key(snapshot_id: str) -> str:
    return f"{SNAPSHOTS_PREFIX}/{snapshot_id}/manifest.json"


def data_key(snapshot_id: str) -> str:
    return f"{SNAPSHOTS_PREFIX}/{snapshot_id}/data"


def file_key(snapshot_id: str, name: str) -> str:
    return f"{SNAPSHOTS_PREFIX}/{snapshot_id}/files/{name}"


class ObjectReader(Protocol):
    """Random access to one object, shared by the restore's reader threads (must be thread-safe)."""

    @property
    def size(self) -> int: ...

    def read_into(self, offset: int, dest: memoryview) -> int:
        """Fill `dest` with the object's bytes from `offset`; return how many bytes were read.

        Fewer than `len(dest)` only when the object ends first (the caller decides if that is a
        truncation). Transient failures are retried inside; what escapes is final.
        """
        ...

    def close(self) -> None: ...


class ObjectWriter(Protocol):
    """A streaming upload of one object: nothing is visible under the key until `commit`."""

    def write(self, data: memoryview | bytes) -> None: ...

    def commit(self) -> None: ...

    def abort(self) -> None: ...


class Store(Protocol):
    @property
    def uri(self) -> str: ...

    def exists(self, key: str) -> bool: ...

    def size(self, key: str) -> int: ...

    def get_bytes(self, key: str) -> bytes: ...

    def put_bytes(self, key: str, data: bytes) -> None: ...

    def open_reader(self, key: str) -> ObjectReader: ...

    def open_writer(self, key: str) -> ObjectWriter: ...

    def list_keys(self, prefix: str) -> list[str]: ...

    def delete_prefix(self, prefix: str) -> None: ...


@dataclass(frozen=True)
class S3Options:
    """Connection settings for s3:// stores beyond what boto3 reads from the standard AWS settings."""

    endpoint_url: str | None = None
    region: str | None = None
    # Concurrency of ranged GETs and multipart part uploads. 8 saturated a loopback S3 server on a
    # 2-core machine (1.0 GB/s with 32 MiB ranges); real object stores reward more.
    max_concurrency: int = 8
    max_attempts: int = 5  # retries on 5xx, throttling and connection resets, with backoff


@dataclass(frozen=True)
class SnapshotRef:
    """A snapshot's address: which store, which id. Its URI is `<store uri>/snapshots/<id>`."""

    store_uri: str
    snapshot_id: str

    @property
    def uri(self) -> str:
        return f"{self.store_uri.rstrip('/')}/{SNAPSHOTS_PREFIX}/{self.snapshot_id}"

    def __str__(self) -> str:
        return self.uri


def normalize_store_uri(uri: str) -> str:
    """`file:///abs`, `s3://bucket[/prefix]`, or a plain local path (made absolute)."""
    if not uri:
        raise InvalidURIError("empty store URI")
    if "://" not in uri:
        return Path(uri).expanduser().resolve().as_uri()
    parsed = urlparse(uri)
    if parsed.scheme == "file":
        if parsed.netloc not in ("", "localhost"):
            raise InvalidURIError(f"{uri!r}: file:// URIs must be absolute paths (file:///path)")
        return Path(unquote(parsed.path)).resolve().as_uri()
    if parsed.scheme == "s3":
        if not parsed.netloc:
            raise InvalidURIError(f"{uri!r}: s3:// URIs need a bucket (s3://bucket/prefix)")
        prefix = parsed.path.strip("/")
        return f"s3://{parsed.netloc}" + (f"/{prefix}" if prefix else "")
    raise InvalidURIError(f"{uri!r}: unsupported store scheme {parsed.scheme!r} (use file:// or s3://)")


def parse_snapshot_uri(uri: str) -> SnapshotRef:
    """Split `<store uri>/snapshots/<id>` into its store and id, validating both."""
    head, sep, snapshot_id = uri.rstrip("/").rpartition(f"/{SNAPSHOTS_PREFIX}/")
    if not sep or not is_snapshot_id(snapshot_id):
        raise InvalidURIError(
            f"{uri!r} is not a snapshot URI (expected <store>/{SNAPSHOTS_PREFIX}/<32 hex chars>, "
            "as printed by `kold snapshot build`)"
        )
    if head.endswith(":/") or head.endswith("://"):  # file:///snapshots/<id>: the store is the root
        head = head.rstrip("/") + "//"
    return SnapshotRef(normalize_store_uri(head or "/"), snapshot_id)


def open_store(uri: str, s3: S3Options | None = None) -> Store:
    """Open the store a URI names. boto3 is imported only for s3:// (cold start pays for what it uses)."""
    uri = normalize_store_uri(uri)
    if uri.startswith("file://"):
        from kold.snapshot.filestore import FileStore

        return FileStore(Path(unquote(urlparse(uri).path)))
    from kold.snapshot.s3store import S3Store

    parsed = urlparse(uri)
    return S3Store(parsed.netloc, parsed.path.strip("/"), s3 or S3Options())


class _ClosingReader:
    """Context-manager sugar for ObjectReader."""

    def __init__(self, reader: ObjectReader) -> None:
        self.reader = reader

    def __enter__(self) -> ObjectReader:
        return self.reader

    def __exit__(self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self.reader.close()


def put_via_writer(writer: ObjectWriter, data: bytes) -> None:
    """Write a whole object through a streaming writer: committed if it all went through, else aborted."""
    try:
        writer.write(data)
        writer.commit()
    except BaseException:
        writer.abort()
        raise


def reading(store: Store, key: str) -> _ClosingReader:
    return _ClosingReader(store.open_reader(key))


def check_key(key: str) -> str:
    """Refuse keys that could escape a store's root (`..`, absolute paths, empty parts)."""
    parts = key.split("/")
    if not key or key.startswith("/") or any(p in ("", ".", "..") for p in parts) or "\\" in key or "\0" in key:
        raise InvalidURIError(f"invalid object key {key!r}")
    return key


def default_io_threads() -> int:
    return max(4, min(16, 2 * (os.cpu_count() or 2)))


__all__ = [
    "ObjectReader",
    "ObjectWriter",
    "S3Options",
    "SnapshotRef",
    "Store",
    "check_key",
    "data_key",
    "file_key",
    "manifest_key",
    "normalize_store_uri",
    "open_store",
    "parse_snapshot_uri",
    "put_via_writer",
    "reading",
]
