"""The restore pipeline on the CPU: the direct path and the staged (GPU-style) twin."""

from __future__ import annotations

import sys
import threading
from pathlib import Path

import pytest
import torch
from snapshot_helpers import SMALL_CHUNK

from kold.snapshot import build_snapshot, restore
from kold.snapshot.errors import DeviceUnavailableError, RestoreCancelledError
from kold.snapshot.manifest import Manifest, layout_tensors
from kold.snapshot.plan import make_plan


@pytest.fixture
def published(tiny_model: Path, store_uri: str) -> str:
    return build_snapshot(tiny_model, store_uri, chunk_size=SMALL_CHUNK).uri


@pytest.mark.parametrize("staging", [False, True], ids=["direct", "staged-twin"])
@pytest.mark.parametrize("readers", [1, 3, 8])
def test_restore_reproduces_every_tensor(published: str, reference, staging: bool, readers: int) -> None:  # type: ignore[no-untyped-def]
    snap = restore(published, readers=readers, staging=staging)
    assert set(snap.tensors) == set(reference)
    for name, tensor in reference.items():
        assert torch.equal(snap.tensors[name], tensor), name
    assert snap.stats.readers == min(readers, snap.manifest.num_chunks)
    assert snap.stats.bytes_by_tier == {"store": snap.manifest.data_size}
    assert snap.stats.verified and snap.stats.refetched_chunks == []
    if staging:
        assert snap.stats.h2d_s > 0


def test_tensors_are_views_of_one_buffer(published: str) -> None:
    snap = restore(published)
    base = snap.buffer.data_ptr()
    for name, tensor in snap.tensors.items():
        entry = snap.manifest.tensor(name)
        assert tensor.data_ptr() == base + entry.offset, name
        assert tensor.untyped_storage().data_ptr() == base
    # writing through the buffer shows in the tensor: same memory, no copy
    first = snap.manifest.tensors[0]
    snap.buffer[first.offset : first.offset + 2] = 0
    assert snap.tensors[first.name].view(-1)[0].item() == 0


def test_config_and_files_come_with_the_restore(published: str, tiny_model: Path) -> None:
    snap = restore(published)
    assert snap.files["config.json"] == (tiny_model / "config.json").read_bytes()
    assert snap.config()["model_type"] == "llama"


def test_stats_report_every_phase(published: str) -> None:
    stats = restore(published).stats.as_dict()
    for key in ("metadata_s", "fetch_s", "verify_s", "views_s", "total_s"):
        assert stats[key] >= 0
    assert stats["total_s"] >= stats["fetch_s"]
    assert stats["gbps"] > 0 and stats["source_tier"] == "store"


def test_restore_logs_one_structured_line(published: str, caplog: pytest.LogCaptureFixture) -> None:
    import json

    with caplog.at_level("INFO", logger="kold.snapshot.restorer"):
        restore(published)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("restore ")]
    assert len(lines) == 1
    assert json.loads(lines[0].removeprefix("restore "))["source_tier"] == "store"


def test_cancel_stops_the_restore(published: str) -> None:
    cancel = threading.Event()
    seen = []

    def on_chunk(chunk: object) -> None:
        seen.append(chunk)
        cancel.set()

    with pytest.raises(RestoreCancelledError, match="cancelled"):
        restore(published, readers=1, cancel=cancel, on_chunk=on_chunk)
    assert len(seen) == 1


def test_on_chunk_sees_every_chunk_once(published: str) -> None:
    seen: list[int] = []
    lock = threading.Lock()

    def on_chunk(chunk) -> None:  # type: ignore[no-untyped-def]
        with lock:
            seen.append(chunk.index)

    snap = restore(published, readers=4, on_chunk=on_chunk)
    assert sorted(seen) == list(range(snap.manifest.num_chunks))


def test_on_metadata_hands_over_the_manifest_and_files_before_any_data(published: str) -> None:
    calls: list[tuple[str, int, set[str]]] = []
    chunks_before: list[int] = []
    chunks: list[int] = []

    def on_metadata(manifest, files) -> None:  # type: ignore[no-untyped-def]
        calls.append((manifest.id, manifest.num_chunks, set(files)))
        chunks_before.append(len(chunks))

    snap = restore(published, readers=2, on_metadata=on_metadata, on_chunk=lambda c: chunks.append(c.index))
    assert calls == [(snap.manifest.id, snap.manifest.num_chunks, set(snap.files))]
    assert "config.json" in calls[0][2]
    assert chunks_before == [0] and len(chunks) == snap.manifest.num_chunks


def test_a_failing_on_metadata_does_not_fail_the_restore(published: str) -> None:
    def on_metadata(manifest, files) -> None:  # type: ignore[no-untyped-def]
        raise RuntimeError("the caller's problem")

    plain = restore(published)
    snap = restore(published, on_metadata=on_metadata)
    assert snap.tensors.keys() == plain.tensors.keys()
    assert all(torch.equal(snap.tensors[k], plain.tensors[k]) for k in plain.tensors)


def test_cuda_without_cupy_or_a_gpu_is_a_clear_error(published: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "cupy", None)  # as on a machine without it: `import cupy` fails
    with pytest.raises(DeviceUnavailableError, match="CuPy"):
        restore(published, device="cuda")


def test_unknown_device_is_refused(published: str) -> None:
    with pytest.raises(ValueError, match="unknown device"):
        restore(published, device="tpu")


def test_plan_uses_no_more_readers_than_chunks_and_sizes_the_ring() -> None:
    tensors, size = layout_tensors([("w", "fp32", (10 * 4096,))])
    m = Manifest(tensors, 65536, tuple("0" * 32 for _ in range(-(-size // 65536))), size)
    assert m.num_chunks == 3
    assert make_plan(m, readers=8, staged=False).readers == 3
    plan = make_plan(m, readers=2, staged=True)
    assert (plan.readers, plan.ring_slots, plan.slot_size) == (2, 4, 65536)
    assert plan.total_bytes == size
    with pytest.raises(ValueError):
        make_plan(m, readers=0, staged=False)


@pytest.mark.parametrize(
    ("remote", "cold", "cores", "expected"),
    [
        (False, False, 2, 2),  # local, page cache: one reader a core, at least two
        (False, False, 1, 2),
        (False, False, 16, 16),
        (False, True, 1, 8),  # local, O_DIRECT: four a core, between 8 and 16
        (False, True, 2, 8),
        (False, True, 3, 12),
        (False, True, 16, 16),
        (True, False, 2, 4),  # remote: two streams a core, between 4 and 16
        (True, False, 4, 8),
        (True, False, 64, 16),
    ],
)
def test_default_readers_by_source(remote: bool, cold: bool, cores: int, expected: int) -> None:
    from kold.snapshot.plan import default_readers

    assert default_readers(remote, cpu_count=cores, cold=cold) == expected
