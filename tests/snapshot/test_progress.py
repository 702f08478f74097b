"""Consuming a restore while it runs: the forward-order layout and `RestoreProgress`."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
import torch
from snapshot_helpers import SMALL_CHUNK

from kold.snapshot import RestoreIncompleteError, RestoreProgress, build_snapshot, restore
from kold.snapshot.errors import ChunkCorruptedError
from kold.snapshot.filestore import FileReader
from kold.snapshot.layout import execution_order
from kold.snapshot.manifest import ChunkEntry, Manifest
from kold.snapshot.store import data_key


def test_execution_order_puts_blocks_in_numeric_order_between_embeddings_and_head() -> None:
    names = ["lm_head.weight", "model.norm.weight", "model.layers.10.mlp.up_proj.weight",
             "model.layers.2.self_attn.q_proj.weight", "model.embed_tokens.weight",
             "model.layers.2.input_layernorm.weight", "model.layers.0.mlp.down_proj.weight"]  # fmt: skip
    assert execution_order(names) == [
        "model.embed_tokens.weight",
        "model.layers.0.mlp.down_proj.weight",
        "model.layers.2.input_layernorm.weight",
        "model.layers.2.self_attn.q_proj.weight",
        "model.layers.10.mlp.up_proj.weight",
        "lm_head.weight",
        "model.norm.weight",
    ]


def test_the_builder_lays_tensors_out_in_forward_order(tmp_path: Path) -> None:
    """Twelve layers: lexicographic order would put layer 10 before layer 2."""
    state = {f"model.layers.{i}.w": torch.full((1024,), float(i)) for i in range(12)}
    state |= {"lm_head.weight": torch.ones(1024), "model.embed_tokens.weight": torch.ones(1024)}
    manifest = build_snapshot(state, (tmp_path / "s").as_uri(), chunk_size=4096).manifest
    by_offset = [t.name for t in sorted(manifest.tensors, key=lambda t: t.offset)]
    assert by_offset == ["model.embed_tokens.weight", *(f"model.layers.{i}.w" for i in range(12)), "lm_head.weight"]


def _manifest(tmp_path: Path, chunks: int) -> Manifest:
    state = {"w": torch.zeros(chunks * 1024)}  # fp32: one 4 KiB chunk per 1024 elements
    return build_snapshot(state, (tmp_path / "m").as_uri(), chunk_size=4096).manifest


def test_landed_bytes_is_the_contiguous_prefix(tmp_path: Path) -> None:
    import mmap

    manifest = _manifest(tmp_path, 4)
    progress = RestoreProgress()
    progress.begin(manifest, mmap.mmap(-1, manifest.data_size))
    chunks = list(manifest.chunks())
    progress.landed(chunks[1])
    progress.landed(chunks[3])
    assert progress.landed_bytes() == 0  # chunk 0 is still missing
    progress.landed(chunks[0])
    assert progress.landed_bytes() == 2 * 4096
    progress.landed(chunks[2])
    assert progress.landed_bytes() == manifest.data_size


def test_a_consumer_reads_each_tensor_as_it_lands_and_sees_the_right_bytes(
    tiny_model: Path, store_uri: str, reference, monkeypatch: pytest.MonkeyPatch
) -> None:  # type: ignore[no-untyped-def]
    uri = build_snapshot(tiny_model, store_uri, chunk_size=SMALL_CHUNK).uri
    original = FileReader.read_into
    consumer_has_it = threading.Event()

    def slow(self: FileReader, offset: int, dest: memoryview) -> int:
        consumer_has_it.wait(10)  # no data moves before the consumer holds the destination
        time.sleep(0.002)  # and then slowly, so the consumer really runs beside the restore
        return original(self, offset, dest)

    monkeypatch.setattr(FileReader, "read_into", slow)
    progress = RestoreProgress()
    seen: dict[str, bool] = {}
    early: list[bool] = []

    def consume() -> None:
        got = progress.wait_destination(30)
        assert got is not None
        manifest, buffer = got
        early.append(progress.landed_bytes() == 0 and not progress.ended)
        consumer_has_it.set()
        whole = torch.frombuffer(buffer, dtype=torch.uint8, count=manifest.data_size)
        for t in sorted(manifest.tensors, key=lambda t: t.offset):
            progress.wait_until(t.end)
            view = whole[t.offset : t.end].view(reference[t.name].dtype).view(reference[t.name].shape)
            seen[t.name] = torch.equal(view, reference[t.name])

    consumer = threading.Thread(target=consume)
    consumer.start()
    snap = restore(uri, readers=2, progress=progress)
    consumer.join(30)
    assert early == [True]  # the destination was handed over before the restore ended
    assert seen == {name: True for name in reference}
    assert snap.stats.source_tier == "store"


def test_a_failed_restore_wakes_the_consumer_with_an_error(tiny_model: Path, tmp_path: Path) -> None:
    root = tmp_path / "store"
    result = build_snapshot(tiny_model, root.as_uri(), chunk_size=SMALL_CHUNK)
    last: ChunkEntry = list(result.manifest.chunks())[-1]
    with open(root / data_key(result.manifest.id), "r+b") as f:  # corrupt the last chunk, for good
        f.seek(last.offset)
        f.write(b"\xff" * 16)
    progress = RestoreProgress()
    errors: list[BaseException] = []

    def consume() -> None:
        got = progress.wait_destination(30)
        assert got is not None
        try:
            progress.wait_until(got[0].data_size)
        except RestoreIncompleteError as exc:
            errors.append(exc)

    consumer = threading.Thread(target=consume)
    consumer.start()
    with pytest.raises(ChunkCorruptedError):
        restore(result.uri, progress=progress)
    consumer.join(30)
    assert len(errors) == 1 and isinstance(errors[0].__cause__, ChunkCorruptedError)


def test_a_staged_restore_hands_over_no_destination(tiny_model: Path, store_uri: str) -> None:
    """GPU-style copies are asynchronous: a committed chunk is not yet on the device."""
    uri = build_snapshot(tiny_model, store_uri, chunk_size=SMALL_CHUNK).uri
    progress = RestoreProgress()
    restore(uri, staging=True, progress=progress)
    assert progress.ended and progress.wait_destination(0) is None
