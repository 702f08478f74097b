"""CUDA restores (CuPy pinned ring + async H2D). Skipped cleanly without CuPy and a GPU.

kold is imported before the skip checks, so a broken install fails here instead of skipping. The
host-side logic of every check below also runs on the CPU twin, in every run (test_gpu_twin.py).
"""

from __future__ import annotations

import gc
import subprocess
import sys
import textwrap
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from snapshot_helpers import SMALL_CHUNK

from kold.snapshot import CacheTier, NodeCache, build_snapshot, load_into, prefetch, restore
from kold.snapshot.devices import CUPY_HINT

cupy = pytest.importorskip("cupy", reason=f"CuPy not installed ({CUPY_HINT})")
if not torch.cuda.is_available():
    pytest.skip("no CUDA device for torch", allow_module_level=True)
try:
    cupy.cuda.runtime.getDeviceCount()
except Exception as exc:  # CUDARuntimeError has no common base with anything importable here
    pytest.skip(f"CuPy cannot reach a GPU: {exc}", allow_module_level=True)

pytestmark = pytest.mark.gpu

MiB = 1 << 20


def _state(nbytes: int, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {"w": torch.randn(nbytes // 4, generator=gen)}


def _rss_anon() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no RssAnon in /proc/self/status")


@pytest.fixture
def shm_root() -> Iterator[Path]:
    """A shm tier on /dev/shm (a tmpfs), as on a node: pytest's tmp_path may be on a disk."""
    import shutil

    root = Path("/dev/shm") / f"kold-test-{uuid.uuid4().hex[:12]}"
    yield root
    shutil.rmtree(root, ignore_errors=True)


def test_cuda_restore_matches_the_source(tiny_model: Path, store_uri: str, reference) -> None:  # type: ignore[no-untyped-def]
    uri = build_snapshot(tiny_model, store_uri, chunk_size=SMALL_CHUNK).uri
    snap = restore(uri, device="cuda")
    assert snap.buffer.is_cuda and snap.stats.h2d_s > 0
    for name, tensor in reference.items():
        assert snap.tensors[name].is_cuda
        assert snap.tensors[name].data_ptr() == snap.buffer.data_ptr() + snap.manifest.tensor(name).offset
        assert torch.equal(snap.tensors[name].cpu(), tensor), name


def test_cuda_restore_from_shm_registers_the_mapping(
    tiny_model: Path, store_uri: str, shm_root: Path, reference
) -> None:  # type: ignore[no-untyped-def]
    uri = build_snapshot(tiny_model, store_uri, chunk_size=SMALL_CHUNK).uri
    cache = NodeCache([CacheTier("shm", shm_root, 1 << 30)])
    prefetch(uri, cache)
    snap = restore(uri, device="cuda", cache=cache)
    assert snap.stats.source_tier == "shm"
    for name, tensor in reference.items():
        assert torch.equal(snap.tensors[name].cpu(), tensor), name


def test_load_into_on_cuda(tmp_path: Path) -> None:
    from torch import nn

    source = nn.Linear(64, 32).to(torch.bfloat16)
    uri = build_snapshot(source.state_dict(), (tmp_path / "s").as_uri(), chunk_size=4096).uri
    with torch.device("meta"):
        model = nn.Linear(64, 32).to(torch.bfloat16)
    load_into(model, restore(uri, device="cuda"))
    x = torch.randn(4, 64, dtype=torch.bfloat16)
    torch.testing.assert_close(model(x.cuda()).cpu(), source(x))


def test_a_four_slot_ring_carries_85_chunks(tmp_path: Path) -> None:
    """2 readers and 85 tiny chunks: 4 pinned slots, each reused ~20 times on 2 streams, so a slot's
    previous copy must be waited for before a reader overwrites it."""
    state = _state(85 * 4096, seed=1)
    uri = build_snapshot(state, (tmp_path / "s").as_uri(), chunk_size=4096).uri
    snap = restore(uri, device="cuda", readers=2)
    assert len(list(snap.manifest.chunks())) == 85 and snap.stats.readers == 2
    assert torch.equal(snap.tensors["w"].cpu(), state["w"])


def test_a_view_outlives_its_snapshot(tmp_path: Path) -> None:
    """The tensors keep the device buffer alive: dropped snapshot, garbage collected, the memory
    handed out again by both allocators, and the view still holds the weights."""
    state = _state(8 * MiB, seed=2)
    uri = build_snapshot(state, (tmp_path / "s").as_uri(), chunk_size=MiB).uri
    snap = restore(uri, device="cuda")
    view = snap.tensors["w"]
    del snap
    gc.collect()
    torch.cuda.empty_cache()
    junk = [torch.full((16 * MiB,), 0x5A, dtype=torch.uint8, device="cuda") for _ in range(4)]
    more = cupy.full((16 * MiB,), 0xA5, dtype=cupy.uint8)
    torch.cuda.synchronize()
    assert torch.equal(view.cpu(), state["w"])
    del junk, more


def test_the_device_buffer_is_returned_to_the_device_not_to_a_pool(tmp_path: Path) -> None:
    """cudaMalloc'd directly: CuPy's pool never holds it, and freeing the tensors frees the memory."""
    nbytes = 64 * MiB
    uri = build_snapshot(_state(nbytes, seed=3), (tmp_path / "s").as_uri(), chunk_size=8 * MiB).uri
    pool = cupy.get_default_memory_pool()
    pooled = pool.total_bytes()
    snap = restore(uri, device="cuda")
    assert pool.total_bytes() == pooled
    free_while_held = cupy.cuda.runtime.memGetInfo()[0]
    del snap
    gc.collect()
    for thread in threading.enumerate():  # the unpinning (which holds the engine) is done too
        if thread.name == "kold-unpin":
            thread.join(10)
    freed = cupy.cuda.runtime.memGetInfo()[0] - free_while_held
    assert freed >= nbytes * 0.9, f"only {freed} of {nbytes} bytes came back"


def test_the_shm_tier_is_pinned_in_place_without_copying_it(tmp_path: Path, shm_root: Path) -> None:
    """A shared read-only mapping, pinned read-only: anonymous memory does not grow by the model's
    size (a private mapping pinned with FOLL_LONGTERM did: every page unshared)."""
    nbytes = 256 * MiB
    state = _state(nbytes, seed=4)
    uri = build_snapshot(state, (tmp_path / "s").as_uri(), chunk_size=16 * MiB).uri
    cache = NodeCache([CacheTier("shm", shm_root, 1 << 30)])
    prefetch(uri, cache)
    small = build_snapshot(_state(MiB), (tmp_path / "t").as_uri(), chunk_size=MiB).uri
    restore(small, device="cuda")  # CUDA's context and CuPy's modules: allocated before the count
    gc.collect()
    before = _rss_anon()
    snap = restore(uri, device="cuda", cache=cache)
    grew = _rss_anon() - before
    assert snap.stats.source_tier == "shm"
    assert snap.stats.pinned_in_place, "the driver refused the read-only pin (see the restore's log)"
    assert grew < nbytes / 4, f"RssAnon grew by {grew / MiB:.0f} MiB for a {nbytes / MiB:.0f} MiB model"
    assert torch.equal(snap.tensors["w"].cpu(), state["w"])


def test_restores_from_several_threads_do_not_cross(tmp_path: Path) -> None:
    """One `cupy.cuda.Device` per `with` block: concurrent restores (one per GPU where there are
    several) each land on their own device and leave every thread's current device alone."""
    devices = [f"cuda:{i % torch.cuda.device_count()}" for i in range(4)]
    state = _state(4 * MiB, seed=5)
    uri = build_snapshot(state, (tmp_path / "s").as_uri(), chunk_size=256 << 10).uri
    results: dict[int, torch.Tensor] = {}
    errors: list[BaseException] = []

    def one(i: int) -> None:
        try:
            results[i] = restore(uri, device=devices[i]).tensors["w"]
        except BaseException as exc:
            errors.append(exc)

    current = cupy.cuda.runtime.getDevice()
    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(devices))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert cupy.cuda.runtime.getDevice() == current
    for i, tensor in results.items():
        assert str(tensor.device) == devices[i]
        assert torch.equal(tensor.cpu(), state["w"])


EXIT_SCRIPT = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from kold.snapshot import CacheTier, NodeCache, prefetch, restore
    uri, shm = sys.argv[1], Path(sys.argv[2])
    cache = NodeCache([CacheTier("shm", shm, 1 << 30)])
    prefetch(uri, cache)
    a = restore(uri, device="cuda")
    b = restore(uri, device="cuda", cache=cache)
    assert b.stats.source_tier == "shm"
    print("exiting", flush=True)
    """
)


def test_a_process_exits_cleanly_right_after_cuda_restores(tmp_path: Path, shm_root: Path) -> None:
    """The unpin threads (ring and shm tier) are waited for at exit, not cut off inside the driver."""
    uri = build_snapshot(_state(32 * MiB, seed=6), (tmp_path / "s").as_uri(), chunk_size=4 * MiB).uri
    done = subprocess.run(
        [sys.executable, "-c", EXIT_SCRIPT, uri, str(shm_root)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0 and "exiting" in done.stdout, done.stderr
    assert "Traceback" not in done.stderr and "could not unpin" not in done.stderr, done.stderr
