"""The CUDA restore's host-side logic, on the CPU twin (`HostCopyEngine`): the shm tier mapped shared
and read-only for pinning, the fallbacks when the driver refuses to pin, pins run in parallel, unpin
threads that outlive nothing, and reads that start before the CUDA engine is up.

Subclasses of the twin play a driver that refuses a flag or is slow; everything else is the real
restore. The same checks on a GPU are in test_gpu.py.
"""

from __future__ import annotations

import ctypes
import mmap
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from kold.snapshot import CacheTier, NodeCache, build_snapshot, prefetch, restore
from kold.snapshot.devices import KEPT_HOST_MEMORY, HostCopyEngine, HostRegisterError
from kold.snapshot.hostmem import buffer_address, map_file_read_only, readonly_address

CHUNK = 4096


def _state(seed: int = 0, chunks: int = 85) -> dict[str, torch.Tensor]:
    """One fp32 tensor of exactly `chunks` 4 KiB chunks."""
    gen = torch.Generator().manual_seed(seed)
    return {"w": torch.randn(chunks * CHUNK // 4, generator=gen)}


def _mapping_of(address: int) -> tuple[str, str]:
    """(permissions, path) of the mapping that holds `address`, from /proc/self/maps."""
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split(maxsplit=5)
        start, end = (int(x, 16) for x in fields[0].split("-"))
        if start <= address < end:
            return fields[1], fields[5].strip() if len(fields) > 5 else ""
    raise AssertionError(f"address {address:#x} is not mapped")


class Driver(HostCopyEngine):
    """The twin as a driver: records each pin with the mapping it falls in, and refuses what it is told to."""

    def __init__(self, *, refuse_read_only_after: int | None = None, refuse_all: bool = False) -> None:
        super().__init__()
        self.refuse_read_only_after = refuse_read_only_after
        self.refuse_all = refuse_all
        self.pins: list[tuple[int, int, bool, str, str]] = []  # address, size, read_only, perms, path
        self.unpinned: list[int] = []
        self.allocated: list[int] = []
        self.lock = threading.Lock()

    def register_host(self, address: int, nbytes: int, *, read_only: bool = False) -> None:
        with self.lock:
            done = sum(1 for p in self.pins if p[2])
            if self.refuse_all or (read_only and self.refuse_read_only_after is not None
                                   and done >= self.refuse_read_only_after):  # fmt: skip
                raise HostRegisterError("refused by the test's driver")
            self.pins.append((address, nbytes, read_only, *_mapping_of(address)))

    def unregister_host(self, address: int) -> None:
        with self.lock:
            self.unpinned.append(address)

    def _alloc_locked(self, nbytes: int) -> tuple[memoryview, int, object]:
        self.allocated.append(nbytes)
        return super()._alloc_locked(nbytes)


def _shm_cache(uri: str, tmp_path: Path) -> NodeCache:
    cache = NodeCache([CacheTier("shm", tmp_path / "shm", 1 << 30)])
    prefetch(uri, cache)
    return cache


def _wait_until(condition: Callable[[], bool], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def _use(monkeypatch: pytest.MonkeyPatch, engine: HostCopyEngine) -> None:
    from kold.snapshot import restorer

    monkeypatch.setattr(restorer, "make_engine", lambda spec: engine)


# -- defect 2: the shm tier is pinned in a shared, read-only mapping ---------------------------------


def test_a_read_only_mapping_is_shared_and_has_an_address(tmp_path: Path) -> None:
    path = tmp_path / "data"
    path.write_bytes(bytes(range(256)) * 64)
    mapping = map_file_read_only(path, 16384)
    perms, where = _mapping_of(readonly_address(mapping))
    assert perms == "r--s" and where == str(path)
    assert ctypes.string_at(readonly_address(mapping), 256) == bytes(range(256))
    with pytest.raises(TypeError):
        mapping[0] = 1  # nothing writes through it
    with pytest.raises(TypeError):
        buffer_address(mapping)  # ctypes wants a writable buffer: why readonly_address exists
    mapping.close()  # no buffer export left behind by readonly_address


def test_the_gpu_path_pins_the_shm_tier_read_only_in_a_shared_mapping(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A read-only pin of a private mapping still makes the kernel copy every page (FOLL_LONGTERM);
    the pages of a shared one are the tier's own."""
    uri = build_snapshot(_state(), (tmp_path / "store").as_uri(), chunk_size=CHUNK).uri
    cache = _shm_cache(uri, tmp_path)
    engine = Driver()
    _use(monkeypatch, engine)
    snap = restore(uri, cache=cache, staging=True)
    assert snap.stats.source_tier == "shm" and snap.stats.pinned_in_place
    assert torch.equal(snap.tensors["w"], _state()["w"])
    data_file = str(cache.tiers[0].data_path(snap.manifest.id))
    assert len(engine.pins) == 85
    for _, _, read_only, perms, where in engine.pins:
        assert read_only and perms == "r--s" and where == data_file
    assert engine.allocated == []  # no staging ring
    pinned = {p[0] for p in engine.pins}
    assert _wait_until(lambda: set(engine.unpinned) == pinned)


def test_a_refused_read_only_pin_goes_through_the_staged_ring_never_a_writable_pin(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    uri = build_snapshot(_state(1), (tmp_path / "store").as_uri(), chunk_size=CHUNK).uri
    cache = _shm_cache(uri, tmp_path)
    engine = Driver(refuse_read_only_after=3)  # the first pins succeed, then the flag is refused
    _use(monkeypatch, engine)
    snap = restore(uri, cache=cache, staging=True, readers=2)
    assert snap.stats.source_tier == "shm" and snap.stats.bytes_by_tier == {"shm": snap.manifest.data_size}
    assert not snap.stats.pinned_in_place
    assert torch.equal(snap.tensors["w"], _state(1)["w"])
    data_file = str(cache.tiers[0].data_path(snap.manifest.id))
    writable = [p for p in engine.pins if not p[2]]
    assert writable, "the ring was not used"
    assert all(where != data_file for *_, where in writable), "the shm tier was pinned for writing"
    read_only = {p[0] for p in engine.pins if p[2]}
    assert len(read_only) == 3
    assert _wait_until(lambda: read_only <= set(engine.unpinned))  # the pins made before the refusal


# -- defect 3: pins run in parallel, ahead of the copies -------------------------------------------


def test_the_shm_tier_is_pinned_by_several_threads_at_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    class SlowPins(HostCopyEngine):
        def __init__(self) -> None:
            super().__init__()
            self.now = self.most = 0
            self.lock = threading.Lock()

        def register_host(self, address: int, nbytes: int, *, read_only: bool = False) -> None:
            with self.lock:
                self.now += 1
                self.most = max(self.most, self.now)
            time.sleep(0.01)  # cudaHostRegister walks and locks every page: real time per chunk
            with self.lock:
                self.now -= 1

    uri = build_snapshot(_state(2, chunks=16), (tmp_path / "store").as_uri(), chunk_size=CHUNK).uri
    cache = _shm_cache(uri, tmp_path)
    engine = SlowPins()
    _use(monkeypatch, engine)
    snap = restore(uri, cache=cache, staging=True)
    assert torch.equal(snap.tensors["w"], _state(2, chunks=16)["w"])
    assert engine.most >= 2, "chunks were pinned one at a time"


# -- defect 6: pinning refused, unpinning failed ---------------------------------------------------


def test_a_refused_ring_pin_falls_back_to_allocated_pinned_memory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    uri = build_snapshot(_state(3), (tmp_path / "store").as_uri(), chunk_size=CHUNK).uri
    engine = Driver(refuse_all=True)
    _use(monkeypatch, engine)
    snap = restore(uri, staging=True, readers=2)
    assert torch.equal(snap.tensors["w"], _state(3)["w"])
    assert engine.pins == []
    assert 1 <= len(engine.allocated) <= 4 and set(engine.allocated) == {CHUNK}  # one per slot at most


def test_memory_whose_unpin_failed_stays_mapped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    class StuckPins(HostCopyEngine):
        def unregister_host(self, address: int) -> None:
            raise RuntimeError("cudaHostUnregister failed (the test's driver)")

    uri = build_snapshot(_state(4), (tmp_path / "store").as_uri(), chunk_size=CHUNK).uri
    cache = _shm_cache(uri, tmp_path)
    before = len(KEPT_HOST_MEMORY)
    _use(monkeypatch, StuckPins())
    restore(uri, staging=True, readers=2)  # the ring
    restore(uri, cache=cache, staging=True)  # the shm tier's mapping
    assert _wait_until(lambda: len(KEPT_HOST_MEMORY) >= before + 2)
    kept = KEPT_HOST_MEMORY[before:]
    assert all(isinstance(m, mmap.mmap) and not m.closed for m in kept)
    del KEPT_HOST_MEMORY[before:]


# -- defect 5: the unpin threads finish before the process exits ------------------------------------

EXIT_SCRIPT = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from kold.snapshot import CacheTier, NodeCache, prefetch, restore, restorer
    from kold.snapshot.devices import HostCopyEngine

    uri, shm, log = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])

    class SlowUnpin(HostCopyEngine):
        def unregister_host(self, address):
            time.sleep(0.05)  # cudaHostUnregister takes time; the process must not end inside it
            with log.open("a") as f:
                f.write("unpinned\\n")

    restorer.make_engine = lambda spec: SlowUnpin()
    cache = NodeCache([CacheTier("shm", shm, 1 << 30)])
    prefetch(uri, cache)
    restore(uri, staging=True, readers=2)
    restore(uri, cache=cache, staging=True)
    print("exiting", flush=True)
    """
)


def test_the_process_waits_for_its_unpin_threads(tmp_path: Path) -> None:
    uri = build_snapshot(_state(5, chunks=8), (tmp_path / "store").as_uri(), chunk_size=CHUNK).uri
    log = tmp_path / "unpins.log"
    done = subprocess.run(
        [sys.executable, "-c", EXIT_SCRIPT, uri, str(tmp_path / "shm"), str(log)],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert done.returncode == 0 and "exiting" in done.stdout, done.stderr
    # the ring's slots (2 readers + 2) and the shm tier's 8 chunks, every one unpinned before exit
    unpins = log.read_text().count("unpinned") if log.exists() else 0
    assert unpins >= 8 + 1, f"only {unpins} unpins finished before the process exited"


# -- defect 10: the first reads do not wait for the CUDA engine ---------------------------------------


def test_reads_start_while_the_cuda_engine_is_still_starting(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`restore(device="cuda")` with the twin in place of CuPy: the engine's start (CUDA's context)
    waits until a chunk has been read, which only works if the reads do not wait for the engine."""
    from kold.snapshot import restorer
    from kold.snapshot.filestore import FileReader

    read = threading.Event()
    original = FileReader.read_into

    def reading(self: FileReader, offset: int, dest: memoryview) -> int:
        read.set()
        return original(self, offset, dest)

    monkeypatch.setattr(FileReader, "read_into", reading)
    seen: list[bool] = []

    def slow_start(spec: object) -> HostCopyEngine:
        seen.append(read.wait(5))
        return HostCopyEngine()

    monkeypatch.setattr(restorer, "make_engine", slow_start)
    uri = build_snapshot(_state(6), (tmp_path / "store").as_uri(), chunk_size=CHUNK).uri
    snap = restore(uri, device="cuda", readers=2)
    assert seen == [True], "the engine started before any chunk was read"
    assert snap.stats.device == "cuda:0"
    assert torch.equal(snap.tensors["w"], _state(6)["w"])


def test_a_cuda_engine_that_fails_to_start_fails_the_restore(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from kold.snapshot import restorer
    from kold.snapshot.errors import DeviceUnavailableError

    def no_device(spec: object) -> HostCopyEngine:
        time.sleep(0.2)  # fails only once the reads have begun
        raise DeviceUnavailableError("CUDA device 0 is not usable: the test's driver")

    monkeypatch.setattr(restorer, "make_engine", no_device)
    uri = build_snapshot(_state(7), (tmp_path / "store").as_uri(), chunk_size=CHUNK).uri
    with pytest.raises(DeviceUnavailableError, match="not usable"):
        restore(uri, device="cuda", readers=2)


# -- defect 4 on the twin: a ring smaller than the chunks, reused many times --------------------------


def test_a_four_slot_ring_carries_85_chunks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    uri = build_snapshot(_state(8), (tmp_path / "store").as_uri(), chunk_size=CHUNK).uri
    engine = Driver()
    _use(monkeypatch, engine)
    snap = restore(uri, staging=True, readers=2)
    assert len(list(snap.manifest.chunks())) == 85
    assert len({p[0] for p in engine.pins}) <= 4  # 2 readers + 2 slots, each pinned once
    assert torch.equal(snap.tensors["w"], _state(8)["w"])
