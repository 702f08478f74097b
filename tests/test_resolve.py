"""`resolve_model`: what a model argument names (a directory, a .gguf file, a Hub id), and the
provenance a snapshot built from it records."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
import torch
from gguf import GGMLQuantizationType
from test_gguf_source import write_gguf, write_model

from kold.snapshot import ModelSourceError, build_snapshot, restore
from kold.snapshot.resolve import resolve_model, spec_kind


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_model(tmp_path_factory.mktemp("resolve") / "llama")


@pytest.fixture(scope="module")
def gguf_file(model_dir: Path) -> Path:
    return write_gguf(model_dir, model_dir.parent / "tiny.Q8_0.gguf", GGMLQuantizationType.Q8_0)


def test_a_directory_builds_as_it_always_did(model_dir: Path, tmp_path: Path) -> None:
    """A directory's snapshot has no provenance keys, so its id is the one build_snapshot(dir) gives."""
    resolved = resolve_model(str(model_dir))
    assert (resolved.kind, resolved.model_dir, dict(resolved.provenance)) == ("dir", model_dir, {})
    assert resolved.config == json.loads((model_dir / "config.json").read_text())
    store = (tmp_path / "store").as_uri()
    assert build_snapshot(resolved, store).manifest.id == build_snapshot(model_dir, store).manifest.id


def test_a_gguf_records_its_name_and_sha256(gguf_file: Path, tmp_path: Path) -> None:
    phases: list[tuple[str, int, int]] = []
    resolved = resolve_model(gguf_file, progress=lambda *p: phases.append(p))
    digest = hashlib.sha256(gguf_file.read_bytes()).hexdigest()
    assert resolved.kind == "gguf" and resolved.model_dir is None
    assert dict(resolved.provenance) == {"source": "gguf", "source_file": "tiny.Q8_0.gguf", "source_sha256": digest}
    assert phases[-1] == ("sha256", gguf_file.stat().st_size, gguf_file.stat().st_size)
    assert resolved.config is not None and resolved.config["torch_dtype"] == "bfloat16"

    built = build_snapshot(resolved, (tmp_path / "store").as_uri(), chunk_size=64 << 10)
    assert built.manifest.metadata == {
        "model_type": "llama",
        "architectures": "LlamaForCausalLM",
        **resolved.provenance,
    }
    assert {t.dtype for t in built.manifest.tensors} == {"bf16"}


def test_a_gguf_in_another_compute_dtype(gguf_file: Path, tmp_path: Path) -> None:
    resolved = resolve_model(gguf_file, dtype="float16")
    snap = restore(build_snapshot(resolved, (tmp_path / "store").as_uri(), chunk_size=64 << 10).uri)
    assert snap.config()["torch_dtype"] == "float16"
    assert {t.dtype for t in snap.tensors.values()} == {torch.float16}
    with pytest.raises(ModelSourceError, match="not a compute dtype"):
        resolve_model(gguf_file, dtype="int8")


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("/definitely/not/here", "not a directory, a .gguf file or a Hugging Face Hub id"),
        ("/definitely/not/here.gguf", "no such file"),
        ("a/b/c", "not a directory, a .gguf file"),
    ],
)
def test_what_is_neither_is_a_one_line_error(spec: str, message: str) -> None:
    with pytest.raises(ModelSourceError, match=message):
        resolve_model(spec)


def test_spec_kind_reads_nothing(model_dir: Path, gguf_file: Path, tmp_path: Path) -> None:
    assert spec_kind(str(model_dir)) == "dir" and spec_kind(str(gguf_file)) == "gguf"
    assert spec_kind("HuggingFaceTB/SmolLM2-135M-Instruct") == "hub"
    other = tmp_path / "notes.txt"
    other.write_text("hello")
    assert spec_kind(str(other)) == "gguf"  # any existing file is tried as a GGUF, and refused when it is not one
    with pytest.raises(ModelSourceError, match="not a GGUF file"):
        resolve_model(other)


def test_options_that_do_not_apply_are_refused(model_dir: Path, gguf_file: Path) -> None:
    with pytest.raises(ModelSourceError, match="revision applies to Hugging Face Hub ids only"):
        resolve_model(model_dir, revision="main")
    with pytest.raises(ModelSourceError, match="revision applies to Hugging Face Hub ids only"):
        resolve_model(gguf_file, revision="main")
    with pytest.raises(ModelSourceError, match="dtype applies to GGUF files only"):
        resolve_model(model_dir, dtype="float16")


def test_extra_files_keep_the_source_closable(model_dir: Path, tmp_path: Path) -> None:
    """build_snapshot(..., files=...) merges the files and still closes the directory's shards."""
    before = len(os.listdir("/proc/self/fd"))
    built = build_snapshot(resolve_model(model_dir), (tmp_path / "store").as_uri(), files={"extra.txt": b"x"})
    assert "extra.txt" in {f.name for f in built.manifest.files}
    assert len(os.listdir("/proc/self/fd")) == before


def test_a_hub_id_that_fails_also_says_no_such_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`models/llama` (a mistyped directory, no ./) reads as a Hub id: the error says both."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # what HF_HUB_OFFLINE=1 sets at import: no network
    monkeypatch.chdir(tmp_path)
    cache = tmp_path / "hub-cache"
    with pytest.raises(ModelSourceError, match=r"\(no local directory models/llama either\)$"):
        resolve_model("models/llama", cache_dir=cache)
    for spec, revision in (("models/llama@main", None), ("models/llama", "main")):  # surely meant for the Hub
        with pytest.raises(ModelSourceError) as raised:
            resolve_model(spec, revision=revision, cache_dir=cache)
        assert "local directory" not in str(raised.value)
