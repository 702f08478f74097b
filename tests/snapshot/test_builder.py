"""Building snapshots: from Hugging Face directories (one or many shards) and from state dicts."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from snapshot_helpers import SMALL_CHUNK, reference_tensors
from store_faults import fingerprint, immutable, read_only, tiny_tmpfs

from kold.snapshot import build_snapshot, restore
from kold.snapshot.errors import ModelSourceError, StoreError, UnsupportedDtypeError
from kold.snapshot.filestore import FileStore
from kold.snapshot.store import data_key, manifest_key


def test_build_from_a_model_dir_carries_files_and_bytes(tiny_model: Path, store_uri: str) -> None:
    result = build_snapshot(tiny_model, store_uri, chunk_size=SMALL_CHUNK)
    m = result.manifest
    assert result.uploaded and result.uri.endswith(f"/snapshots/{m.id}")
    assert {f.name for f in m.files} == {
        "config.json",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
    }
    assert m.metadata == {"model_type": "llama", "architectures": "LlamaForCausalLM"}
    blob = FileStore(Path(store_uri.removeprefix("file://"))).get_bytes(data_key(m.id))
    assert len(blob) == m.data_size
    for name, tensor in reference_tensors(tiny_model).items():
        entry = m.tensor(name)
        assert entry.offset % 4096 == 0
        assert blob[entry.offset : entry.end] == tensor.view(torch.uint8).numpy().tobytes()


def test_publishing_twice_uploads_nothing(tiny_model: Path, store_uri: str) -> None:
    first = build_snapshot(tiny_model, store_uri, chunk_size=SMALL_CHUNK)
    store = FileStore(Path(store_uri.removeprefix("file://")))
    before = {k: store.path(k).stat().st_mtime_ns for k in store.list_keys("snapshots")}
    second = build_snapshot(tiny_model, store_uri, chunk_size=SMALL_CHUNK)
    assert second.manifest.id == first.manifest.id and not second.uploaded
    assert {k: store.path(k).stat().st_mtime_ns for k in store.list_keys("snapshots")} == before


def test_sharded_and_single_file_models_give_the_same_tensors(sharded_model: Path, store_uri: str) -> None:
    assert (sharded_model / "model.safetensors.index.json").is_file()
    assert len(list(sharded_model.glob("*.safetensors"))) > 2
    result = build_snapshot(sharded_model, store_uri, chunk_size=SMALL_CHUNK)
    snap = restore(result.uri)
    ref = reference_tensors(sharded_model)
    assert set(snap.tensors) == set(ref)
    for name, tensor in ref.items():
        assert torch.equal(snap.tensors[name], tensor)


ALL_DTYPES = [
    torch.bfloat16,
    torch.float16,
    torch.float32,
    torch.int8,
    torch.int64,
    torch.bool,
    torch.float8_e4m3fn,
    torch.float8_e5m2,
]


def test_state_dict_of_every_supported_dtype_round_trips(store_uri: str) -> None:
    gen = torch.Generator().manual_seed(0)
    state = {}
    for i, dtype in enumerate(ALL_DTYPES):
        raw = torch.randn(17, 33, generator=gen) * 10
        state[f"t{i}.{str(dtype).removeprefix('torch.')}"] = raw.to(dtype)
    state["scalar"] = torch.tensor(3.5)
    state["empty"] = torch.empty(0, 8)
    state["strided"] = torch.arange(40, dtype=torch.float32).view(5, 8).t()  # non-contiguous source
    result = build_snapshot(state, store_uri, chunk_size=4096)
    snap = restore(result.uri)
    for name, tensor in state.items():
        got = snap.tensors[name]
        assert got.dtype == tensor.dtype and got.shape == tensor.shape, name
        assert torch.equal(got.reshape(-1).view(torch.uint8), tensor.contiguous().reshape(-1).view(torch.uint8)), name


def test_unsupported_dtype_is_refused(store_uri: str) -> None:
    with pytest.raises(UnsupportedDtypeError, match="complex"):
        build_snapshot({"z": torch.zeros(2, dtype=torch.complex64)}, store_uri)


def test_peak_build_memory_is_one_chunk_not_the_model(tmp_path: Path, store_uri: str) -> None:
    """The builder reuses one chunk buffer: the chunk iterator never holds two chunks at once."""
    from kold.snapshot import builder

    seen: list[int] = []
    original = builder._chunks

    def spy(*args: object, **kwargs: object):  # type: ignore[no-untyped-def]
        for done, chunk in original(*args, **kwargs):  # type: ignore[arg-type]
            seen.append(id(chunk.obj))
            yield done, chunk

    state = {f"w{i}": torch.randn(64, 64) for i in range(20)}
    builder._chunks = spy  # type: ignore[assignment]
    try:
        build_snapshot(state, store_uri, chunk_size=4096)
    finally:
        builder._chunks = original
    assert len(seen) > 40 and len(set(seen)) == 1  # every chunk of both passes lives in the same buffer


def _write(path: Path, header: dict[str, object], data: bytes) -> None:
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        (lambda d: None, "no \\*.safetensors"),
        (lambda d: (d / "pytorch_model.bin").write_bytes(b"x"), "convert them to safetensors"),
        (lambda d: (d / "model.safetensors").write_bytes(b"abc"), "shorter than 8 bytes"),
        (lambda d: (d / "model.safetensors").write_bytes(struct.pack("<Q", 50) + b"{"), "truncated"),
        (
            lambda d: _write(
                d / "model.safetensors", {"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, b"x" * 8
            ),
            "past the end",
        ),
        (
            lambda d: _write(
                d / "model.safetensors", {"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 12]}}, b"x" * 16
            ),
            "do not match its shape",
        ),
        (
            lambda d: _write(
                d / "model.safetensors", {"w": {"dtype": "C64", "shape": [1], "data_offsets": [0, 8]}}, b"x" * 8
            ),
            "C64",
        ),
        (
            lambda d: (d / "model.safetensors.index.json").write_text('{"weight_map": {"w": "gone.safetensors"}}'),
            "missing: gone.safetensors",
        ),
    ],
)
def test_bad_model_dirs_give_a_clear_error_and_store_nothing(tmp_path: Path, store_uri: str, setup, message) -> None:  # type: ignore[no-untyped-def]
    model = tmp_path / "model"
    model.mkdir()
    setup(model)
    with pytest.raises(ModelSourceError, match=message):
        build_snapshot(model, store_uri)
    assert not Path(store_uri.removeprefix("file://")).exists() or not any(
        k.endswith("manifest.json") for k in FileStore(Path(store_uri.removeprefix("file://"))).list_keys("snapshots")
    )


def test_manifest_is_written_last(tiny_model: Path, store_uri: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A failure while writing files leaves no manifest (the snapshot does not exist), and the data
    already written is withdrawn (a crash, which skips that, leaves data but still no manifest)."""
    calls: list[str] = []
    original = FileStore.put_bytes

    def failing(self: FileStore, key: str, data: bytes) -> None:
        calls.append(key)
        if key.endswith("generation_config.json"):
            raise OSError("disk full")
        original(self, key, data)

    monkeypatch.setattr(FileStore, "put_bytes", failing)
    with pytest.raises(OSError, match="disk full"):
        build_snapshot(tiny_model, store_uri, chunk_size=SMALL_CHUNK)
    store = FileStore(Path(store_uri.removeprefix("file://")))
    assert store.list_keys("snapshots") == []
    assert not any(c == manifest_key(c.split("/")[1]) for c in calls)


# -- a store that refuses the write: the kernel's own errors, and the store left as it was ---------------


def _store_with_a_snapshot(root: Path) -> FileStore:
    """A store that already holds one published snapshot: what a failed publish must not disturb."""
    build_snapshot({"kept": torch.arange(16, dtype=torch.float32)}, root.as_uri(), chunk_size=4096)
    return FileStore(root)


def _new_model() -> dict[str, torch.Tensor]:
    return {"w": torch.randn(256, 256, generator=torch.Generator().manual_seed(3))}  # 256 KiB of data


@pytest.mark.parametrize(
    ("model", "files", "refused"),
    [
        (_new_model, None, "data"),  # the data does not fit
        (lambda: {"w": torch.ones(8)}, {"vocab.bin": bytes(256 << 10)}, "files/vocab.bin"),  # the data fits: withdrawn
    ],
)
def test_a_full_disk_is_one_line_and_leaves_the_store_as_it_was(tmp_path: Path, model, files, refused) -> None:  # type: ignore[no-untyped-def]
    with tiny_tmpfs(tmp_path / "disk", "64k") as disk:
        store = _store_with_a_snapshot(disk / "store")
        before = fingerprint(store.root)
        with pytest.raises(StoreError) as info:
            build_snapshot(model(), store.uri, chunk_size=4096, files=files)
        message = str(info.value)
        assert "\n" not in message and "No space left on device (ENOSPC)" in message
        assert f"cannot write {store.root}/snapshots/" in message and message.partition(": ")[0].endswith(refused)
        assert fingerprint(store.root) == before


def test_an_immutable_store_is_one_line_and_unchanged(tmp_path: Path) -> None:
    store = _store_with_a_snapshot(tmp_path / "store")
    before = fingerprint(store.root)
    with immutable(store.root / "snapshots"), pytest.raises(StoreError) as info:
        build_snapshot(_new_model(), store.uri, chunk_size=4096)
    message = str(info.value)
    assert "\n" not in message and "Operation not permitted (EPERM)" in message
    assert f"creating {store.root}/snapshots/" in message  # the directory that refused
    assert fingerprint(store.root) == before


def test_a_read_only_store_is_one_line_and_unchanged(tmp_path: Path) -> None:
    store = _store_with_a_snapshot(tmp_path / "store")
    before = fingerprint(store.root)
    with read_only(store.root), pytest.raises(StoreError) as info:
        build_snapshot(_new_model(), store.uri, chunk_size=4096)
    message = str(info.value)
    assert "\n" not in message and "Read-only file system (EROFS)" in message
    assert f"cannot write {store.root}/snapshots/" in message
    assert fingerprint(store.root) == before
