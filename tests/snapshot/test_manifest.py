"""The manifest is the format's contract: validation and content addressing."""

from __future__ import annotations

import itertools
import json

import pytest

from kold.snapshot.errors import ManifestError, ManifestVersionError
from kold.snapshot.manifest import FileEntry, Manifest, TensorEntry, layout_tensors


def make(**overrides: object) -> Manifest:
    tensors, size = layout_tensors([("a", "bf16", (3, 5)), ("b", "fp32", (7,)), ("c", "int8", ())])
    fields: dict[str, object] = {
        "tensors": tensors,
        "chunk_size": 8192,
        "chunk_checksums": tuple(f"{i:032x}" for i in range(-(-size // 8192))),
        "data_size": size,
        "files": (FileEntry("config.json", 2, "0" * 32),),
        "metadata": {"model_type": "llama"},
    }
    fields.update(overrides)
    return Manifest(**fields)  # type: ignore[arg-type]


def test_layout_aligns_every_tensor_and_rounds_the_blob_to_whole_pages() -> None:
    tensors, size = layout_tensors([("a", "bf16", (3, 5)), ("b", "fp32", (7,)), ("c", "fp8_e4m3", (4096,))])
    assert [t.offset for t in tensors] == [0, 4096, 8192]
    assert [t.nbytes for t in tensors] == [30, 28, 4096]
    assert size == 12288


def test_json_round_trip_keeps_the_id() -> None:
    m = make()
    again = Manifest.from_json(m.to_json())
    assert again == m
    assert again.id == m.id and len(m.id) == 32


def test_id_changes_with_any_content() -> None:
    base = make()
    assert make(metadata={"model_type": "mistral"}).id != base.id
    checksums = list(base.chunk_checksums)
    checksums[0] = "f" * 32
    assert make(chunk_checksums=tuple(checksums)).id != base.id


def test_chunks_cover_the_data_exactly() -> None:
    m = make()
    chunks = list(m.chunks())
    assert chunks[0].offset == 0
    assert all(a.end == b.offset for a, b in itertools.pairwise(chunks))
    assert chunks[-1].end == m.data_size


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"version": 2}, "version"),
        ({"alignment": 1000}, "alignment"),
        ({"chunk_size": 5000}, "chunk_size"),
        ({"chunk_checksums": ("0" * 32,)}, "chunk checksums"),
        ({"tensors": (TensorEntry("a", "bf16", (3, 5), 100, 30),)}, "not aligned"),
        ({"tensors": (TensorEntry("a", "bf16", (3, 5), 0, 31),)}, "does not match shape"),
        ({"tensors": (TensorEntry("a", "complex", (1,), 0, 8),)}, "not supported"),
        ({"tensors": (TensorEntry("a", "bf16", (2,), 0, 4), TensorEntry("a", "bf16", (2,), 4096, 4))}, "duplicated"),
        ({"tensors": (TensorEntry("a", "fp32", (2048,), 0, 8192), TensorEntry("b", "bf16", (2,), 4096, 4))}, "overlap"),
        ({"tensors": (TensorEntry("a", "bf16", (2,), 12288, 4),)}, "outside"),
        ({"files": (FileEntry("../etc/passwd", 1, "0" * 32),)}, "plain"),
    ],
)
def test_invalid_manifests_are_refused_with_the_reason(change: dict[str, object], message: str) -> None:
    with pytest.raises(ManifestError, match=message):
        make(**change)


def test_unknown_version_has_its_own_error_and_names_the_source() -> None:
    doc = json.loads(make().to_json())
    doc["version"] = 99
    with pytest.raises(ManifestVersionError, match=r"snapshot abc.*version 99"):
        Manifest.from_json(json.dumps(doc).encode(), source="snapshot abc")


@pytest.mark.parametrize(
    "raw", [b"not json", b"[]", b'{"format": "other"}', b'{"format": "kold.snapshot", "version": 1}']
)
def test_garbage_is_a_manifest_error(raw: bytes) -> None:
    with pytest.raises(ManifestError):
        Manifest.from_json(raw)
