"""S3Store against a real S3 protocol server (`rclone serve s3` on loopback, see kold.locals3)."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, cast

import pytest
import urllib3.exceptions
from botocore.exceptions import BotoCoreError, ClientError

from kold.snapshot import s3store
from kold.snapshot.errors import InvalidURIError, ObjectNotFoundError, StoreAuthError, StoreError
from kold.snapshot.s3store import MIN_PART_SIZE, MiB, S3Store
from kold.snapshot.store import S3Options, open_store, reading

pytestmark = pytest.mark.s3


def _blob(n: int, seed: int = 0) -> bytes:
    """Non-repeating bytes, so an off-by-one range or a swapped part cannot compare equal."""
    import numpy as np

    return np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8).tobytes()


def _files_on_disk(s3_server, store: S3Store) -> list[str]:
    base = s3_server.root / store.bucket
    return sorted(p.relative_to(base).as_posix() for p in base.rglob("*") if p.is_file())


def test_put_get_round_trip(s3_store: S3Store, s3_server) -> None:
    assert s3_store.uri == f"s3://{s3_store.bucket}/kold/store"
    s3_store.put_bytes("snapshots/x/manifest.json", b'{"a": 1}')
    assert s3_store.get_bytes("snapshots/x/manifest.json") == b'{"a": 1}'
    assert s3_store.exists("snapshots/x/manifest.json")
    assert s3_store.size("snapshots/x/manifest.json") == 8
    s3_store.put_bytes("empty", b"")
    assert s3_store.get_bytes("empty") == b""
    assert s3_store.size("empty") == 0
    # keys live under the store's prefix in the bucket
    assert (s3_server.root / s3_store.bucket / "kold/store/snapshots/x/manifest.json").is_file()


def test_read_into_middle_range(s3_store: S3Store) -> None:
    data = _blob(3 * MiB + 17)
    s3_store.put_bytes("blob", data)
    with reading(s3_store, "blob") as reader:
        assert reader.size == len(data)
        buf = bytearray(1 * MiB + 3)
        n = reader.read_into(1 * MiB + 5, memoryview(buf))
        assert n == len(buf)
        assert bytes(buf) == data[1 * MiB + 5 : 2 * MiB + 8]
        # into a slice of a larger buffer: only that slice changes
        big = bytearray(b"\xaa" * 100)
        assert reader.read_into(10, memoryview(big)[20:30]) == 10
        assert big[20:30] == data[10:20]
        assert big[:20] == b"\xaa" * 20 and big[30:] == b"\xaa" * 70


def test_read_past_end_is_short(s3_store: S3Store) -> None:
    data = _blob(1000)
    s3_store.put_bytes("small", data)
    reader = s3_store.open_reader("small")
    buf = bytearray(500)
    assert reader.read_into(800, memoryview(buf)) == 200
    assert bytes(buf[:200]) == data[800:]
    assert reader.read_into(1000, memoryview(buf)) == 0
    assert reader.read_into(5000, memoryview(buf)) == 0
    with pytest.raises(ValueError):
        reader.read_into(-1, memoryview(buf))


def test_reads_stream_into_the_destination_without_a_copy(s3_store: S3Store) -> None:
    """The zero-copy path must really be taken with the installed botocore/urllib3."""
    s3_store.put_bytes("blob", _blob(4096))
    resp = s3_store.client.get_object(Bucket=s3_store.bucket, Key=s3_store.full_key("blob"), Range="bytes=100-199")
    try:
        assert s3store._direct_fp(resp["Body"]) is not None
    finally:
        resp["Body"].close()


def test_multipart_upload_round_trip(s3_store: S3Store, s3_server, monkeypatch) -> None:
    data = _blob(12 * MiB + 12345, seed=1)
    parts: list[int] = []
    real_upload_part = s3_store.client.upload_part

    def spy(**kwargs):
        parts.append(len(kwargs["Body"]))
        return real_upload_part(**kwargs)

    monkeypatch.setattr(s3_store.client, "upload_part", spy)
    writer = s3_store.open_writer("snapshots/x/data", part_size=MIN_PART_SIZE)
    view = memoryview(data)
    pos = 0
    for step in (1, 999_999, 3 * MiB, 7, 5 * MiB):  # odd sizes straddle part boundaries
        writer.write(view[pos : pos + step])
        pos += step
    writer.write(view[pos:])
    # two full parts are uploaded by now, but nothing is visible under the key before commit
    assert not s3_store.exists("snapshots/x/data")
    assert s3_store.list_keys("") == []
    writer.commit()
    assert sorted(parts) == sorted([5 * MiB, 5 * MiB, 2 * MiB + 12345])
    assert s3_store.size("snapshots/x/data") == len(data)
    assert s3_store.get_bytes("snapshots/x/data") == data
    assert _files_on_disk(s3_server, s3_store) == ["kold/store/snapshots/x/data"]
    with pytest.raises(StoreError):
        writer.write(b"more")


def test_small_object_is_one_put(s3_store: S3Store, monkeypatch) -> None:
    def no_multipart(**kwargs):
        raise AssertionError("a one-part object must not start a multipart upload")

    monkeypatch.setattr(s3_store.client, "create_multipart_upload", no_multipart)
    data = _blob(MIN_PART_SIZE, seed=2)  # exactly one part: still a single PUT
    writer = s3_store.open_writer("one", part_size=MIN_PART_SIZE)
    writer.write(data)
    writer.commit()
    assert s3_store.get_bytes("one") == data


def test_abort_leaves_nothing(s3_store: S3Store, s3_server) -> None:
    writer = s3_store.open_writer("snapshots/x/data", part_size=MIN_PART_SIZE)
    writer.write(_blob(11 * MiB, seed=3))  # two parts in flight or done, a third buffered
    writer.abort()
    writer.abort()  # idempotent
    assert not s3_store.exists("snapshots/x/data")
    assert s3_store.list_keys("") == []
    assert _files_on_disk(s3_server, s3_store) == []
    with pytest.raises(StoreError):
        writer.commit()
    # an object already under the key survives an aborted overwrite
    s3_store.put_bytes("keep", b"old")
    writer = s3_store.open_writer("keep", part_size=MIN_PART_SIZE)
    writer.write(_blob(6 * MiB))
    writer.abort()
    assert s3_store.get_bytes("keep") == b"old"


def test_missing_key_and_bucket(s3_store: S3Store, s3_server) -> None:
    assert not s3_store.exists("nope")
    where = f"s3://{s3_store.bucket}/kold/store/nope"
    for call in (s3_store.get_bytes, s3_store.size, s3_store.open_reader):
        with pytest.raises(ObjectNotFoundError, match=where):
            call("nope")
    other = S3Store("no-such-bucket-kold", "p", s3_server.options())
    with pytest.raises(ObjectNotFoundError, match="no-such-bucket-kold"):
        other.get_bytes("k")
    with pytest.raises(ObjectNotFoundError):
        other.list_keys("")


def test_invalid_keys_are_refused(s3_store: S3Store) -> None:
    for bad in ("", "/abs", "a/../b", "a//b", "a/./b"):
        with pytest.raises(InvalidURIError):
            s3_store.exists(bad)
    with pytest.raises(InvalidURIError):
        s3_store.open_writer("../x")
    with pytest.raises(ValueError):
        s3_store.open_writer("k", part_size=MIN_PART_SIZE - 1)


@pytest.mark.parametrize("field", ["secret", "access"])
def test_wrong_credentials_are_an_auth_error(s3_store: S3Store, s3_server, monkeypatch, field) -> None:
    s3_store.put_bytes("k", b"v")
    if field == "secret":
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    else:
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "nobodyknows")
    bad = S3Store(s3_store.bucket, "kold/store", s3_server.options())
    calls: list[Callable[[], object]] = [
        lambda: bad.get_bytes("k"),
        lambda: bad.size("k"),
        lambda: bad.exists("k"),
        lambda: bad.put_bytes("k2", b"x"),
        lambda: bad.list_keys(""),
    ]
    for call in calls:
        with pytest.raises(StoreAuthError) as info:
            call()
        assert not isinstance(info.value, (ClientError, BotoCoreError))
        assert info.value.__cause__ is None and info.value.__suppress_context__
        assert s3_server.endpoint_url in str(info.value)
        assert "refused the credentials" in str(info.value)


def test_list_keys_and_delete_prefix(s3_store: S3Store, s3_server) -> None:
    keys = ["a/1", "a/2", "a/sub/3", "ab/4", "b/c/5", "z"]
    for k in keys:
        s3_store.put_bytes(k, k.encode())
    # an object outside the store's prefix is none of its business
    outside = S3Store(s3_store.bucket, "kold/other", s3_server.options())
    outside.put_bytes("a/1", b"outside")
    s3_store.list_page_size = 2  # force pagination
    assert s3_store.list_keys("") == sorted(keys)
    assert s3_store.list_keys("a") == ["a/1", "a/2", "a/sub/3"]  # not "ab/4": a prefix is a folder
    assert s3_store.list_keys("a/sub") == ["a/sub/3"]
    assert s3_store.list_keys("z") == ["z"]
    assert s3_store.list_keys("missing") == []
    s3_store.delete_prefix("a")
    assert s3_store.list_keys("") == ["ab/4", "b/c/5", "z"]
    s3_store.delete_prefix("z")
    s3_store.delete_prefix("missing")
    assert s3_store.list_keys("") == ["ab/4", "b/c/5"]
    assert outside.get_bytes("a/1") == b"outside"
    with pytest.raises(InvalidURIError):
        s3_store.delete_prefix("")


def test_open_store_s3_uri(s3_server, s3_env) -> None:
    s3_server.create_bucket("open-store")
    store = open_store("s3://open-store/some/prefix/", S3Options(endpoint_url=s3_server.endpoint_url))
    assert isinstance(store, S3Store)
    assert store.uri == "s3://open-store/some/prefix"
    store.put_bytes("k", b"via open_store")
    assert store.get_bytes("k") == b"via open_store"
    assert (s3_server.root / "open-store/some/prefix/k").read_bytes() == b"via open_store"
    root_store = open_store("s3://open-store", s3_server.options())
    assert root_store.list_keys("some") == ["some/prefix/k"]


def test_concurrent_read_into_disjoint_slices(s3_store: S3Store) -> None:
    data = _blob(8 * MiB + 333, seed=4)
    s3_store.put_bytes("blob", data)
    reader = s3_store.open_reader("blob")
    out = bytearray(len(data))
    view = memoryview(out)
    step = -(-len(data) // 8)
    threads_seen: set[int] = set()

    def fetch(start: int) -> int:
        threads_seen.add(threading.get_ident())
        return reader.read_into(start, view[start : start + step])

    with ThreadPoolExecutor(8) as pool:
        counts = list(pool.map(fetch, range(0, len(data), step)))
    assert sum(counts) == len(data)
    assert out == data
    assert len(threads_seen) > 1


class _FlakyBody:
    """A response body that breaks like a reset connection after `fail_after` bytes."""

    def __init__(self, real, fail_after: int) -> None:
        self.real = real
        self.left = fail_after

    def readinto(self, b: memoryview) -> int:
        if self.left <= 0:
            raise urllib3.exceptions.ProtocolError("Connection broken: ConnectionResetError(104)")
        n = int(self.real.readinto(memoryview(b)[: self.left]))
        self.left -= n
        return n

    def close(self) -> None:
        self.real.close()


def test_read_into_resumes_a_broken_stream(s3_store: S3Store, monkeypatch) -> None:
    data = _blob(2 * MiB, seed=5)
    s3_store.put_bytes("blob", data)
    reader = s3_store.open_reader("blob")
    ranges: list[str] = []
    real_get = s3_store.client.get_object

    def flaky_get(**kwargs):
        ranges.append(kwargs["Range"])
        resp = real_get(**kwargs)
        if len(ranges) <= 2:  # the first two attempts break part-way
            resp["Body"] = cast(Any, _FlakyBody(resp["Body"], 100_000))
        return resp

    monkeypatch.setattr(s3_store.client, "get_object", flaky_get)
    buf = bytearray(1 * MiB)
    assert reader.read_into(4096, memoryview(buf)) == len(buf)
    assert bytes(buf) == data[4096 : 4096 + MiB]
    end = 4096 + MiB - 1
    assert ranges == [f"bytes=4096-{end}", f"bytes={4096 + 100_000}-{end}", f"bytes={4096 + 200_000}-{end}"]


def test_read_into_gives_up_as_store_error(s3_store: S3Store, s3_server, monkeypatch) -> None:
    s3_store.put_bytes("blob", _blob(1000))
    store = S3Store(s3_store.bucket, "kold/store", s3_server.options(max_attempts=3))
    store.backoff_base = 0.001
    reader = store.open_reader("blob")
    real_get = store.client.get_object
    calls = []

    def broken_get(**kwargs):
        calls.append(kwargs["Range"])
        resp = real_get(**kwargs)
        resp["Body"] = cast(Any, _FlakyBody(resp["Body"], 0))
        return resp

    monkeypatch.setattr(store.client, "get_object", broken_get)
    with pytest.raises(StoreError, match=r"failed 3 times while streaming.*ProtocolError") as info:
        reader.read_into(0, memoryview(bytearray(10)))
    assert not isinstance(info.value, ObjectNotFoundError)
    assert len(calls) == 3


def test_put_bytes_large_goes_multipart(s3_store: S3Store, monkeypatch) -> None:
    store = s3_store
    store.part_size = MIN_PART_SIZE
    started = []
    real = store.client.create_multipart_upload

    def spy(**kwargs):
        started.append(kwargs["Key"])
        return real(**kwargs)

    monkeypatch.setattr(store.client, "create_multipart_upload", spy)
    data = os.urandom(MIN_PART_SIZE + 1)
    store.put_bytes("big", data)
    assert started == [store.full_key("big")]
    assert store.get_bytes("big") == data


def test_parts_upload_concurrently_but_bounded(s3_store: S3Store, s3_server, monkeypatch) -> None:
    store = S3Store(s3_store.bucket, "kold/store", s3_server.options(max_concurrency=2))
    active = 0
    peak = 0
    lock = threading.Lock()
    real_upload_part = store.client.upload_part

    def slow_part(**kwargs: Any) -> Any:
        nonlocal active, peak
        with lock:
            active += 1
            peak = max(peak, active)
        try:
            time.sleep(0.05)  # long enough for the writer to try to run ahead
            return real_upload_part(**kwargs)
        finally:
            with lock:
                active -= 1

    monkeypatch.setattr(store.client, "upload_part", slow_part)
    data = _blob(5 * MIN_PART_SIZE + 1, seed=6)
    writer = store.open_writer("obj", part_size=MIN_PART_SIZE)
    for pos in range(0, len(data), MiB):
        writer.write(data[pos : pos + MiB])
    writer.commit()
    assert peak == 2  # concurrent, and never more than max_concurrency in flight
    assert store.get_bytes("obj") == data


def test_failed_part_fails_the_upload_cleanly(s3_store: S3Store, s3_server, monkeypatch) -> None:
    real_upload_part = s3_store.client.upload_part
    aborted: list[str] = []
    real_abort = s3_store.client.abort_multipart_upload

    def failing_part(**kwargs: Any) -> Any:
        if kwargs["PartNumber"] == 2:
            response: Any = {
                "Error": {"Code": "InternalError", "Message": "boom"},
                "ResponseMetadata": {"HTTPStatusCode": 500},
            }
            raise ClientError(response, "UploadPart")
        return real_upload_part(**kwargs)

    def spy_abort(**kwargs: Any) -> Any:
        aborted.append(kwargs["UploadId"])
        return real_abort(**kwargs)

    monkeypatch.setattr(s3_store.client, "upload_part", failing_part)
    monkeypatch.setattr(s3_store.client, "abort_multipart_upload", spy_abort)
    writer = s3_store.open_writer("obj", part_size=MIN_PART_SIZE)
    with pytest.raises(StoreError, match=r"UploadPart 2 .*/kold/store/obj failed: InternalError \(HTTP 500\)"):
        writer.write(_blob(3 * MIN_PART_SIZE, seed=7))
        writer.commit()
    assert len(aborted) == 1  # dropped at once, without waiting for the caller's abort()
    writer.abort()
    assert len(aborted) == 1
    assert not s3_store.exists("obj")
    assert _files_on_disk(s3_server, s3_store) == []
