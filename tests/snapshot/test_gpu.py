"""CUDA restores (CuPy pinned ring + async H2D). Skipped cleanly without CuPy and a GPU."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from snapshot_helpers import SMALL_CHUNK

cupy = pytest.importorskip("cupy", reason="CuPy not installed (pip install 'kold[gpu]')")
if not torch.cuda.is_available():
    pytest.skip("no CUDA device for torch", allow_module_level=True)
try:
    cupy.cuda.runtime.getDeviceCount()
except Exception as exc:  # CUDARuntimeError has no common base with anything importable here
    pytest.skip(f"CuPy cannot reach a GPU: {exc}", allow_module_level=True)

from kold.snapshot import CacheTier, NodeCache, build_snapshot, load_into, restore  # noqa: E402

pytestmark = pytest.mark.gpu


def test_cuda_restore_matches_the_source(tiny_model: Path, store_uri: str, reference) -> None:  # type: ignore[no-untyped-def]
    uri = build_snapshot(tiny_model, store_uri, chunk_size=SMALL_CHUNK).uri
    snap = restore(uri, device="cuda")
    assert snap.buffer.is_cuda and snap.stats.h2d_s > 0
    for name, tensor in reference.items():
        assert snap.tensors[name].is_cuda
        assert snap.tensors[name].data_ptr() == snap.buffer.data_ptr() + snap.manifest.tensor(name).offset
        assert torch.equal(snap.tensors[name].cpu(), tensor), name


def test_cuda_restore_from_shm_registers_the_mapping(
    tiny_model: Path, store_uri: str, tmp_path: Path, reference
) -> None:  # type: ignore[no-untyped-def]
    from kold.snapshot import prefetch

    uri = build_snapshot(tiny_model, store_uri, chunk_size=SMALL_CHUNK).uri
    cache = NodeCache([CacheTier("shm", tmp_path / "shm", 1 << 30)])
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
