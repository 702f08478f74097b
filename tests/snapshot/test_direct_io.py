"""O_DIRECT reads of cold local files: same bytes as buffered reads, real sizes at EOF, silent fallback,
and the page-cache residency check that decides between the two."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest
import torch
from snapshot_helpers import SMALL_CHUNK

from kold.snapshot import build_snapshot, restore
from kold.snapshot.errors import ChunkTruncatedError
from kold.snapshot.filestore import DIRECT_ALIGN, FileReader
from kold.snapshot.hostmem import alloc_host, resident_fraction
from kold.snapshot.plan import default_readers
from kold.snapshot.store import data_key

pytestmark = pytest.mark.skipif(not hasattr(os, "O_DIRECT"), reason="O_DIRECT is Linux-only")


def _evict(path: Path) -> None:
    """Drop a file from the page cache (dirty pages cannot be dropped: fsync first)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def _residency(path: Path) -> float | None:
    fd = os.open(path, os.O_RDONLY)
    try:
        return resident_fraction(fd, os.fstat(fd).st_size)
    finally:
        os.close(fd)


def _cold(path: Path) -> None:
    """Evict `path`, or skip where that is impossible (tmpfs keeps everything in memory)."""
    _evict(path)
    fraction = _residency(path)
    if fraction is None or fraction >= 0.1:
        pytest.skip(f"cannot evict {path} from the page cache here (residency {fraction})")


def _direct_reader(path: Path) -> FileReader:
    reader = FileReader(path, direct=True)
    if not reader.direct:
        reader.close()
        pytest.skip(f"the filesystem under {path.parent} refuses O_DIRECT")
    return reader


@pytest.fixture
def published(tiny_model: Path, tmp_path: Path) -> tuple[str, Path]:
    root = tmp_path / "store"
    result = build_snapshot(tiny_model, root.as_uri(), chunk_size=SMALL_CHUNK)
    return result.uri, root / data_key(result.manifest.id)


@pytest.mark.parametrize("staging", [False, True], ids=["host", "staged-twin"])
def test_a_cold_snapshot_is_read_with_o_direct_and_restores_identical_tensors(  # type: ignore[no-untyped-def]
    published: tuple[str, Path], reference, staging: bool
) -> None:
    uri, data = published
    _cold(data)
    snap = restore(uri, readers=3, staging=staging)
    if not snap.stats.direct_io:
        pytest.skip("the filesystem under the test's tmp dir refuses O_DIRECT")
    assert set(snap.tensors) == set(reference)
    for name, tensor in reference.items():
        assert torch.equal(snap.tensors[name], tensor), name
    assert snap.stats.verified and snap.stats.refetched_chunks == []
    assert snap.stats.bytes_by_tier == {"store": snap.manifest.data_size}


def test_a_cold_snapshot_gets_more_readers_than_a_hot_one(published: tuple[str, Path]) -> None:
    """O_DIRECT reads wait on the device, not on a core: more of them are kept in flight."""
    uri, data = published
    data.read_bytes()
    hot = restore(uri)
    _cold(data)
    cold = restore(uri)
    if not cold.stats.direct_io:
        pytest.skip("the filesystem under the test's tmp dir refuses O_DIRECT")
    chunks = cold.manifest.num_chunks
    assert hot.stats.readers == min(default_readers(False), chunks)
    assert cold.stats.readers == min(default_readers(False, cold=True), chunks) > hot.stats.readers


def test_a_hot_snapshot_keeps_buffered_reads(published: tuple[str, Path], reference) -> None:  # type: ignore[no-untyped-def]
    uri, data = published
    data.read_bytes()  # in the page cache now
    fraction = _residency(data)
    assert fraction is not None and fraction > 0.9
    snap = restore(uri)
    assert not snap.stats.direct_io
    for name, tensor in reference.items():
        assert torch.equal(snap.tensors[name], tensor), name


def test_residency_picks_direct_only_for_a_cold_file(tmp_path: Path) -> None:
    path = tmp_path / "blob"
    path.write_bytes(os.urandom(8 * DIRECT_ALIGN))
    path.read_bytes()
    hot = FileReader(path)
    try:
        assert not hot.direct_if_cold()
        assert not hot.direct
    finally:
        hot.close()
    _cold(path)
    cold = FileReader(path)
    try:
        assert cold.direct_if_cold() == cold.direct
    finally:
        cold.close()


def test_a_file_on_tmpfs_counts_as_resident(tmp_path: Path) -> None:
    shm = Path("/dev/shm")
    if not shm.is_dir():
        pytest.skip("no /dev/shm")
    path = shm / f"kold-test-direct-{os.getpid()}"
    try:
        path.write_bytes(os.urandom(4 * DIRECT_ALIGN))
        _evict(path)  # a no-op on tmpfs: its pages are the file
        reader = FileReader(path)
        try:
            assert not reader.direct_if_cold()
        finally:
            reader.close()
    finally:
        path.unlink(missing_ok=True)


@pytest.mark.parametrize("size", [5 * DIRECT_ALIGN + 123, 3 * DIRECT_ALIGN, 100])
def test_direct_reads_return_the_real_size_at_the_end_of_the_file(tmp_path: Path, size: int) -> None:
    """The destination is rounded up to whole pages (as alloc_host does): the read must stop at EOF and
    say how many bytes there really were, not the rounded length."""
    content = os.urandom(size)
    path = tmp_path / "blob"
    path.write_bytes(content)
    _evict(path)
    reader = _direct_reader(path)
    buf = alloc_host(size)
    try:
        view = memoryview(buf)
        assert len(view) % DIRECT_ALIGN == 0 and len(view) >= size
        assert reader.read_into(0, view) == size
        assert bytes(view[:size]) == content
        # exactly the file's length, not a multiple of the alignment: the aligned head goes direct,
        # the tail buffered
        assert reader.read_into(0, view[:size]) == size
        # unaligned offsets and buffer addresses are read buffered, correctly
        assert reader.read_into(7, view[1 : size - 6]) == size - 7
        assert bytes(view[1 : size - 6]) == content[7:]
        assert reader.direct
        view.release()
    finally:
        reader.close()
        buf.close()


def test_a_truncated_data_file_is_reported_with_its_real_length_under_o_direct(
    published: tuple[str, Path],
) -> None:
    uri, data = published
    size = data.stat().st_size
    cut = size - DIRECT_ALIGN - 100  # inside the last chunk, not page-aligned
    os.truncate(data, cut)
    _cold(data)
    last_chunk_start = (cut // SMALL_CHUNK) * SMALL_CHUNK
    expected_got = cut - last_chunk_start
    with pytest.raises(ChunkTruncatedError, match=rf"short read: {expected_got} of "):
        restore(uri)


def test_a_filesystem_that_refuses_o_direct_at_open_gets_buffered_reads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    content = os.urandom(4 * DIRECT_ALIGN)
    path = tmp_path / "blob"
    path.write_bytes(content)
    real_open = os.open

    def refusing_open(file: str | os.PathLike[str], flags: int, *args: int) -> int:
        if flags & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(file, flags, *args)

    monkeypatch.setattr(os, "open", refusing_open)
    reader = FileReader(path, direct=True)
    buf = alloc_host(len(content))
    try:
        assert not reader.direct
        assert reader.read_into(0, memoryview(buf)) == len(content)
        assert buf[: len(content)] == content
    finally:
        reader.close()
        buf.close()


def test_a_filesystem_that_refuses_o_direct_reads_falls_back_silently(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Some filesystems accept the O_DIRECT open and fail the reads with EINVAL: switch to buffered."""
    content = os.urandom(4 * DIRECT_ALIGN)
    path = tmp_path / "blob"
    path.write_bytes(content)
    reader = _direct_reader(path)
    direct_fd = reader._direct_fd
    real_preadv = os.preadv
    refused = []

    def refusing_preadv(fd: int, buffers: list[memoryview], offset: int) -> int:
        if fd == direct_fd:
            refused.append(offset)
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_preadv(fd, buffers, offset)

    monkeypatch.setattr(os, "preadv", refusing_preadv)
    buf = alloc_host(len(content))
    try:
        assert reader.read_into(0, memoryview(buf)) == len(content)
        assert buf[: len(content)] == content
        assert refused == [0]
        assert not reader.direct
        assert reader.read_into(0, memoryview(buf)) == len(content)  # no second attempt
        assert refused == [0]
    finally:
        reader.close()
        buf.close()


def test_tmpfs_reads_work_whatever_it_answers_to_o_direct() -> None:
    """/dev/shm is tmpfs: older kernels refuse O_DIRECT (EINVAL at open), newer ones accept it."""
    shm = Path("/dev/shm")
    if not shm.is_dir():
        pytest.skip("no /dev/shm")
    content = os.urandom(3 * DIRECT_ALIGN + 17)
    path = shm / f"kold-test-direct-{os.getpid()}"
    path.write_bytes(content)
    reader = FileReader(path, direct=True)
    buf = alloc_host(len(content))
    try:
        assert reader.read_into(0, memoryview(buf)) == len(content)
        assert buf[: len(content)] == content
    finally:
        reader.close()
        buf.close()
        path.unlink(missing_ok=True)


def test_residency_of_a_big_file_is_sampled_evenly(tmp_path: Path) -> None:
    """Windows spread over the whole file: half the file resident reads as half (4 windows of 2 pages).
    8 MiB, evicted from 4 MiB on: the page cache may hold a file in large folios (up to 2 MiB here),
    which are evicted whole."""
    pages = 2048
    path = tmp_path / "blob"
    path.write_bytes(os.urandom(pages * DIRECT_ALIGN))
    path.read_bytes()
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        assert resident_fraction(fd, pages * DIRECT_ALIGN, samples=4, window=2) == 1.0
        os.posix_fadvise(fd, pages // 2 * DIRECT_ALIGN, 0, os.POSIX_FADV_DONTNEED)
        if resident_fraction(fd, pages * DIRECT_ALIGN) != 0.5:
            pytest.skip("cannot evict part of a file from the page cache here")
        assert resident_fraction(fd, pages * DIRECT_ALIGN, samples=4, window=2) == 0.5
    finally:
        os.close(fd)
