"""The node's host pool: pre-faulted segments that CPU restores claim as their destination."""

from __future__ import annotations

import gc
import os
import shutil
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from snapshot_helpers import SMALL_CHUNK

from kold.snapshot import HostPool, build_snapshot, restore
from kold.snapshot.errors import HostPoolError
from kold.snapshot.hostpool import HUGE_PAGE
from kold.snapshot.store import data_key, open_store, parse_snapshot_uri

SHM = Path("/dev/shm")
pytestmark = pytest.mark.skipif(not SHM.is_dir(), reason="no /dev/shm (the pool must live in memory)")


@pytest.fixture
def pool() -> Iterator[HostPool]:
    directory = SHM / f"kold-test-pool-{uuid.uuid4().hex[:8]}"
    yield HostPool(directory)
    shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
def published(tiny_model: Path, store_uri: str) -> str:
    return build_snapshot(tiny_model, store_uri, chunk_size=SMALL_CHUNK).uri


def snapshot_bytes(uri: str) -> bytes:
    ref = parse_snapshot_uri(uri)
    reader = open_store(ref.store_uri).open_reader(data_key(ref.snapshot_id))
    try:
        out = bytearray(reader.size)
        view = memoryview(out)
        done = 0
        while done < len(out):
            done += reader.read_into(done, view[done:])
        return bytes(out)
    finally:
        reader.close()


def test_fill_makes_whole_segments_and_leaves_no_temporary_file(pool: HostPool) -> None:
    made = pool.fill(2, 3 << 20)
    assert len(made) == 2 and all(p.parent == pool.directory for p in made)
    segments = pool.segments()
    assert [s.size for s in segments] == [2 * HUGE_PAGE, 2 * HUGE_PAGE]  # rounded up to huge pages
    assert not any(s.in_use for s in segments)
    assert sorted(p.name for p in pool.directory.iterdir()) == sorted(p.name for p in made)


def test_restore_writes_into_a_segment_that_held_other_bytes(
    pool: HostPool, published: str, reference: dict[str, torch.Tensor]
) -> None:
    (segment,) = pool.fill(1, 1 << 20)
    segment.write_bytes(b"\xff" * segment.stat().st_size)  # an earlier model's leftovers
    snap = restore(published, pool=pool)
    assert snap.stats.pooled and not snap.stats.mapped
    for name, tensor in reference.items():
        assert torch.equal(snap.tensors[name], tensor), name
    # the tensors live in the segment itself: its file now holds the snapshot's data, byte for byte
    data = snapshot_bytes(published)
    assert segment.read_bytes()[: len(data)] == data
    assert pool.segments()[0].in_use


def test_a_held_segment_is_not_shared_and_comes_back_when_released(
    pool: HostPool, published: str, reference: dict[str, torch.Tensor]
) -> None:
    pool.fill(1, 1 << 20)
    first = restore(published, pool=pool)
    second = restore(published, pool=pool)  # the only segment is taken: fresh memory, same tensors
    assert first.stats.pooled and not second.stats.pooled
    assert second.buffer.data_ptr() != first.buffer.data_ptr()
    for name, tensor in reference.items():
        assert torch.equal(second.tensors[name], tensor), name
    del first
    gc.collect()
    assert not pool.segments()[0].in_use
    assert restore(published, pool=pool).stats.pooled


def test_the_smallest_fitting_segment_is_claimed(pool: HostPool) -> None:
    pool.fill(1, 8 << 20)
    pool.fill(1, 2 << 20)
    small = pool.claim(1 << 20)
    assert small is not None and len(small) == HUGE_PAGE
    big = pool.claim(1 << 20)  # the small one is held: the big one serves
    assert big is not None
    assert pool.claim(1 << 20) is None
    assert pool.claim(16 << 20) is None  # nothing that large, held or not
    assert sorted(s.in_use for s in pool.segments()) == [True, True]
    small.close()
    big.close()
    assert not any(s.in_use for s in pool.segments())


def test_a_killed_instance_gives_its_segment_back(pool: HostPool) -> None:
    pool.fill(1, 1 << 20)
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import sys, time; from pathlib import Path; from kold.snapshot import HostPool\n"
         f"m = HostPool(Path({str(pool.directory)!r})).claim(4096)\n"
         "print('held' if m is not None else 'none', flush=True); time.sleep(60)"],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        assert pool.segments()[0].in_use
        assert pool.claim(4096) is None
        assert pool.clear() == (0, 1)  # a held segment stays
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(10)
    assert not pool.segments()[0].in_use
    assert pool.claim(4096) is not None


def test_bad_requests_name_the_problem_and_leave_nothing_behind(pool: HostPool, tmp_path: Path) -> None:
    with pytest.raises(HostPoolError, match="at least 1"):
        pool.fill(0, 1 << 20)
    with pytest.raises(HostPoolError, match="too small"):
        pool.fill(1, 100)
    with pytest.raises(HostPoolError, match="do not fit"):
        pool.fill(1, 1 << 50)
    with pytest.raises(HostPoolError, match="not in memory"):
        HostPool(tmp_path / "pool").fill(1, 1 << 20)  # the test's tmp_path is a disk here
    assert not (tmp_path / "pool").exists()  # refused before anything was created there
    assert pool.segments() == []
    assert list(pool.directory.iterdir()) == []


def test_no_pool_directory_means_fresh_memory(tmp_path: Path, published: str) -> None:
    empty = HostPool(SHM / f"kold-test-missing-{uuid.uuid4().hex[:8]}")
    assert empty.segments() == [] and empty.claim(4096) is None
    assert not restore(published, pool=empty).stats.pooled
    assert not empty.directory.exists()  # claiming creates nothing


def test_cli_fill_status_clear(tmp_path: Path, published: str) -> None:
    directory = SHM / f"kold-test-cli-{uuid.uuid4().hex[:8]}"
    env = {**os.environ, "KOLD_HOME": str(tmp_path / "home"), "KOLD_HOST_POOL_DIR": str(directory),
           "KOLD_CACHE_SHM_BYTES": "0", "KOLD_CACHE_DISK_BYTES": "0"}  # fmt: skip

    def kold(*args: str, **extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "kold", *args], capture_output=True, text=True, timeout=120,
                              env={**env, **extra}, check=False)  # fmt: skip

    try:
        filled = kold("snapshot", "pool", "fill", "--size", "4MiB", "--count", "2")
        assert filled.returncode == 0, filled.stderr
        assert "[2/2]" in filled.stdout and "2 segments" in filled.stdout
        restored = kold("snapshot", "restore", published)
        assert restored.returncode == 0, restored.stderr
        assert "into a host pool segment" in restored.stdout
        status = kold("snapshot", "pool", "status")
        assert status.returncode == 0 and status.stdout.count("free") == 2  # the restore's process ended
        cleared = kold("snapshot", "pool", "clear")
        assert cleared.returncode == 0 and "removed 2 segments" in cleared.stdout
        unset = kold("snapshot", "pool", "status", KOLD_HOST_POOL_DIR="")  # empty: no pool configured
        bad = kold("snapshot", "pool", "fill", "--size", "lots")
        for result, message in ((unset, "no host pool is configured"), (bad, "--size: 'lots' is not a size")):
            assert result.returncode == 1 and message in result.stderr and "Traceback" not in result.stderr
    finally:
        shutil.rmtree(directory, ignore_errors=True)


# -- bringing a pool to a plan (snapshot/poolsync.py) -------------------------------------------------


def test_sync_grows_to_the_plan_and_does_nothing_more_when_it_is_met(pool: HostPool) -> None:
    from kold.snapshot.poolsync import sync_pool

    made: list[Path] = []
    first = sync_pool(pool, {2 << 20: 2, 3 << 20: 1}, on_segment=made.append)
    assert first.added == {HUGE_PAGE: 2, 2 * HUGE_PAGE: 1} and not first.removed and first.error is None
    assert [s.size for s in pool.segments()] == [HUGE_PAGE, HUGE_PAGE, 2 * HUGE_PAGE]
    assert sorted(made) == sorted(s.path for s in pool.segments())
    again = sync_pool(pool, {2 << 20: 2, 4 << 20: 1})  # the same plan, sizes already whole huge pages
    assert not again.changed and not again.held_surplus


def test_sync_shrinks_by_free_segments_only_and_a_held_one_goes_once_it_is_released(pool: HostPool) -> None:
    from kold.snapshot.poolsync import sync_pool

    pool.fill(3, HUGE_PAGE)
    held = pool.claim(4096)
    assert held is not None
    shrunk = sync_pool(pool, {})
    assert shrunk.removed == {HUGE_PAGE: 2} and shrunk.held_surplus == {HUGE_PAGE: 1}
    (left,) = pool.segments()
    assert left.in_use
    held[:5] = b"still"  # the instance's memory is untouched
    assert left.path.read_bytes()[:5] == b"still"
    grown = sync_pool(pool, {HUGE_PAGE: 2})  # the held one counts toward the plan
    assert grown.added == {HUGE_PAGE: 1} and len(pool.segments()) == 2
    held.close()
    assert sync_pool(pool, {}).removed == {HUGE_PAGE: 2} and pool.segments() == []


def test_sync_without_shrink_only_adds(pool: HostPool) -> None:
    from kold.snapshot.poolsync import sync_pool

    pool.fill(1, 2 * HUGE_PAGE)
    result = sync_pool(pool, {HUGE_PAGE: 1}, shrink=False)
    assert result.added == {HUGE_PAGE: 1} and not result.removed
    assert [s.size for s in pool.segments()] == [HUGE_PAGE, 2 * HUGE_PAGE]


def test_sync_stops_between_segments_when_asked_and_names_what_does_not_fit(pool: HostPool) -> None:
    from kold.snapshot.poolsync import sync_pool

    asked = iter([False, True])
    stopped = sync_pool(pool, {HUGE_PAGE: 3}, should_stop=lambda: next(asked))
    assert stopped.added == {HUGE_PAGE: 1} and len(pool.segments()) == 1
    too_big = sync_pool(pool, {HUGE_PAGE: 1, 1 << 50: 1})
    assert not too_big.changed and too_big.error is not None and "do not fit" in too_big.error


def test_remove_takes_a_free_segment_and_refuses_a_held_one(pool: HostPool) -> None:
    free, busy = pool.fill(2, HUGE_PAGE)
    held = pool.claim(4096)  # the first free one, by name
    assert held is not None
    held_path = next(s.path for s in pool.segments() if s.in_use)
    free_path = next(p for p in (free, busy) if p != held_path)
    assert not pool.remove(held_path) and held_path.exists()
    assert pool.remove(free_path) and not free_path.exists()
    assert not pool.remove(free_path)  # gone already
    held.close()
    assert pool.remove(held_path)
