"""One resolver for the model a user names, used by `kold deploy` and `kold snapshot build` alike.

`resolve_model(spec)` decides what `spec` is and returns a `ResolvedModel`: what the builder reads
(`source()`), the model's config.json, and the provenance the snapshot's manifest records.

| spec | kind | manifest metadata added |
|---|---|---|
| an existing directory (Hugging Face layout) | `dir` | nothing: a directory's snapshot id stays what it always was |
| a `*.gguf` file (llama.cpp, Ollama) | `gguf` | `source=gguf`, `source_file` (its name), `source_sha256` |
| `owner/name[@revision]` that is no local path | `hub` | `source=hub`, `hub_repo`, `hub_commit` (what the revision resolved to: the same commit is one snapshot however it was asked for) |

Problems are `ModelSourceError`s that name the spec, raised before anything is built: a GGUF is
parsed and checked here (architecture, quantization types, tensors), so `kold deploy` fails before
it reaches the platform.

The GGUF's sha256 is of the whole file, not of its header: it is the identity the Hub shows for a
file and the name Ollama stores a blob under, so a snapshot can be matched to the exact download.
It costs one sequential read, which a build pays several times over anyway (it reads and
dequantizes every tensor twice).

A Hub id is fetched by `hub_source.py`: safetensors and tokenizer files only, through huggingface_hub's
cache (the library reads HF_TOKEN, HF_ENDPOINT, HF_HUB_CACHE and HF_HUB_OFFLINE itself). The revision
is `owner/name@revision` or the `revision` argument (default main), and the commit it resolved to is
pinned in the manifest: the snapshot names the exact weights it holds, not a branch that moves.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from kold.snapshot.errors import ModelSourceError
from kold.snapshot.sources import ModelSource, from_model_dir

Progress = Callable[[str, int, int], None]  # (phase, bytes done, bytes in total), as the builder's

# `owner/name` as the Hub spells repository ids, and an optional `@revision` (a branch such as refs/pr/3 has slashes)
_HUB_ID = re.compile(r"(?P<repo>[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*)(?:@(?P<revision>[^\s@]+))?")
_HASH_BLOCK = 8 << 20  # read size when hashing a file


@dataclass(frozen=True)
class ResolvedModel:
    """A model ready to build: see the module docstring."""

    kind: str  # "dir", "gguf" or "hub"
    path: Path  # the model directory, or the .gguf file
    config: Mapping[str, Any] | None  # config.json as the snapshot carries it (None: the directory has none)
    provenance: Mapping[str, str]  # added to the manifest's metadata
    open_source: Callable[[], ModelSource]

    @property
    def model_dir(self) -> Path | None:
        """The Hugging Face directory the model is read from (None for a GGUF file)."""
        return None if self.kind == "gguf" else self.path

    def source(self) -> ModelSource:
        """The tensors and files to publish, provenance included (the caller closes it)."""
        source = self.open_source()
        return replace(source, metadata={**source.metadata, **self.provenance})


def resolve_model(
    spec: str | Path,
    *,
    revision: str | None = None,
    cache_dir: Path | None = None,
    dtype: str | None = None,
    progress: Progress | None = None,
) -> ResolvedModel:
    """What `spec` names (see the module docstring). `revision` is for Hub ids (as `owner/name@revision`
    is), `cache_dir` where Hub downloads go (unset: huggingface_hub's cache), `dtype` what a GGUF is
    dequantized to (bfloat16 by default; a directory's weights keep their own), `progress` is told of
    long reads (the GGUF's hash; a Hub download draws huggingface_hub's own bars)."""
    text = str(spec)
    kind = spec_kind(text)
    path = Path(text).expanduser()
    if kind == "dir":
        _only_for(text, "directory", revision=revision, dtype=dtype)
        return _resolve_dir(path)
    if kind == "gguf":
        _only_for(text, "file", revision=revision)
        return _resolve_gguf(path, dtype, progress)
    return _resolve_hub(text, revision=revision, cache_dir=cache_dir, dtype=dtype, progress=progress)


def spec_kind(spec: str) -> str:
    """ "dir", "gguf" or "hub" for what `spec` looks like, without reading it (a CLI checks arguments
    with this); `ModelSourceError` when it is none of them."""
    path = Path(spec).expanduser()
    if path.is_dir():
        return "dir"
    if path.is_file() or spec.lower().endswith(".gguf"):
        if not path.is_file():
            raise ModelSourceError(f"{spec}: no such file")
        return "gguf"
    if _HUB_ID.fullmatch(spec):
        return "hub"
    raise ModelSourceError(f"{spec}: not a directory, a .gguf file or a Hugging Face Hub id (owner/name[@revision])")


def _only_for(spec: str, kind: str, *, revision: str | None = None, dtype: str | None = None) -> None:
    if revision is not None:
        raise ModelSourceError(f"{spec}: a revision applies to Hugging Face Hub ids only, not to a local {kind}")
    if dtype is not None:
        raise ModelSourceError(f"{spec}: a directory's weights keep their dtype; a dtype applies to GGUF files only")


def _resolve_dir(path: Path) -> ResolvedModel:
    return ResolvedModel("dir", path, _read_config(path), {}, lambda: from_model_dir(path))


def _read_config(path: Path) -> Mapping[str, Any] | None:
    config_path = path / "config.json"
    if not config_path.is_file():
        return None
    try:
        config: Mapping[str, Any] = json.loads(config_path.read_bytes())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelSourceError(f"{config_path}: not valid JSON ({exc})") from None
    return config


def _resolve_gguf(path: Path, dtype: str | None, progress: Progress | None) -> ResolvedModel:
    from kold.snapshot.gguf_source import DEFAULT_DTYPE, read_gguf

    model = read_gguf(path, dtype=dtype or DEFAULT_DTYPE)
    provenance = {"source": "gguf", "source_file": path.name, "source_sha256": file_sha256(path, progress)}
    return ResolvedModel("gguf", path, model.config, provenance, model.source)


def _resolve_hub(
    spec: str, *, revision: str | None, cache_dir: Path | None, dtype: str | None, progress: Progress | None
) -> ResolvedModel:
    from kold.snapshot.hub_source import fetch_hub_model

    match = _HUB_ID.fullmatch(spec)
    assert match is not None  # spec_kind said "hub"
    repo_id, pinned = match["repo"], match["revision"]
    if pinned is not None and revision is not None and pinned != revision:
        raise ModelSourceError(f"{spec}: two revisions given ({pinned} in the id, {revision} as an option): name one")
    if dtype is not None:
        raise ModelSourceError(
            f"{spec}: a Hub model's safetensors keep their dtype; a dtype applies to GGUF files only"
        )
    try:
        model = fetch_hub_model(repo_id, revision=pinned or revision, cache_dir=cache_dir)
    except ModelSourceError as exc:
        if pinned is None and revision is None:  # `models/llama` may be a mistyped directory, not a Hub id
            raise ModelSourceError(f"{exc} (no local directory {spec} either)") from None
        raise
    return ResolvedModel("hub", model.path, _read_config(model.path), model.provenance, model.source)


def file_sha256(path: Path, progress: Progress | None = None) -> str:
    """The hex sha256 of a whole file, read sequentially (`progress` gets phase "sha256")."""
    digest = hashlib.sha256()
    total = path.stat().st_size
    done = 0
    with open(path, "rb", buffering=0) as f:
        while block := f.read(_HASH_BLOCK):
            digest.update(block)
            done += len(block)
            if progress:
                progress("sha256", done, total)
    return digest.hexdigest()
