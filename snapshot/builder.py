"""Build a snapshot from a model directory, a resolved model or a state dict and publish it to a store.

Two streaming passes over the weights, each holding one chunk in memory:
1. lay out and hash: every chunk's checksum, hence the manifest, hence the content-addressed id;
2. if the store does not already hold that id, stream the chunks to `snapshots/<id>/data`, then the
   model files, then the manifest last — its presence is what commits the snapshot, so a crash
   mid-upload leaves nothing a restore would trust.
Publishing the same model twice costs one read pass and uploads nothing.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from kold.snapshot.checksum import chunk_checksum
from kold.snapshot.errors import ModelSourceError
from kold.snapshot.layout import execution_key
from kold.snapshot.manifest import MIN_ALIGNMENT, FileEntry, Manifest, TensorEntry, layout_tensors
from kold.snapshot.resolve import ResolvedModel
from kold.snapshot.sources import ModelSource, TensorSource, from_model_dir, from_state_dict
from kold.snapshot.store import S3Options, SnapshotRef, Store, data_key, file_key, manifest_key, open_store

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

# 32 MiB chunks: large enough that per-chunk overhead (a syscall, a ranged GET, a CUDA copy launch)
# is noise, small enough that a 1B model gives ~70 chunks to spread over readers and a pinned ring
# of a few slots stays small. Measured on loopback S3: 8 x 32 MiB ranged GETs reached 1 GB/s.
DEFAULT_CHUNK_SIZE = 32 << 20

Progress = Callable[[str, int, int], None]  # (phase, bytes done so far, bytes in total)


@dataclass(frozen=True)
class BuildResult:
    ref: SnapshotRef
    manifest: Manifest
    uploaded: bool  # False when the store already held this snapshot id
    seconds: float

    @property
    def uri(self) -> str:
        return self.ref.uri


def build_snapshot(
    model: Path | str | ResolvedModel | Mapping[str, torch.Tensor],
    store: Store | str,
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    files: Mapping[str, bytes] | None = None,
    s3: S3Options | None = None,
    progress: Progress | None = None,
) -> BuildResult:
    """Publish a model (a Hugging Face directory, what `resolve_model` resolved, or a state dict) as a
    snapshot in `store`; `files` are added to (or replace) the model's carried files."""
    if chunk_size <= 0 or chunk_size % MIN_ALIGNMENT:
        raise ValueError(f"chunk_size must be a positive multiple of {MIN_ALIGNMENT}, got {chunk_size}")
    started = time.perf_counter()
    target = open_store(store, s3) if isinstance(store, str) else store
    if isinstance(model, ResolvedModel):
        source = model.source()
    elif isinstance(model, str | Path):
        source = from_model_dir(Path(model))
    else:
        source = from_state_dict(model, files=files)
    try:
        if files and not isinstance(model, Mapping):
            source = replace(source, files={**source.files, **files})
        return _publish(source, target, chunk_size, progress, started)
    finally:
        source.close()


def _publish(
    source: ModelSource, store: Store, chunk_size: int, progress: Progress | None, started: float
) -> BuildResult:
    if not source.tensors:
        raise ModelSourceError(f"{source.description}: no tensors to publish")
    # in the order a forward pass needs them (layout.py): a runtime can compute while the rest lands
    ordered = sorted(source.tensors, key=lambda t: execution_key(t.name))
    entries, data_size = layout_tensors([(t.name, t.dtype, t.shape) for t in ordered])
    by_name = {t.name: t for t in source.tensors}
    buffer = bytearray(min(chunk_size, max(data_size, 1)))

    checksums = []
    for done, chunk in _chunks(entries, by_name, data_size, chunk_size, buffer):
        checksums.append(chunk_checksum(chunk))
        if progress:
            progress("hash", done, data_size)
    manifest = Manifest(
        tensors=entries,
        chunk_size=chunk_size,
        chunk_checksums=tuple(checksums),
        data_size=data_size,
        files=tuple(
            FileEntry(name, len(content), chunk_checksum(content)) for name, content in sorted(source.files.items())
        ),
        metadata=source.metadata,
    )
    ref = SnapshotRef(store.uri, manifest.id)
    if store.exists(manifest_key(manifest.id)):
        log.info("snapshot %s already in %s: nothing uploaded", manifest.id, store.uri)
        return BuildResult(ref, manifest, uploaded=False, seconds=time.perf_counter() - started)

    written: list[str] = []  # what this build committed: withdrawn if a later object fails
    try:
        writer = store.open_writer(data_key(manifest.id))
        try:
            for done, chunk in _chunks(entries, by_name, data_size, chunk_size, buffer):
                writer.write(chunk)
                if progress:
                    progress("upload", done, data_size)
            writer.commit()
        except BaseException:
            writer.abort()
            raise
        written.append(data_key(manifest.id))
        for name, content in source.files.items():
            store.put_bytes(file_key(manifest.id, name), content)
            written.append(file_key(manifest.id, name))
        store.put_bytes(manifest_key(manifest.id), manifest.to_json())
    except BaseException:
        _withdraw(store, manifest.id, written)
        raise
    seconds = time.perf_counter() - started
    log.info("published snapshot %s (%d bytes) to %s in %.2fs", manifest.id, data_size, store.uri, seconds)
    return BuildResult(ref, manifest, uploaded=True, seconds=seconds)


def _withdraw(store: Store, snapshot_id: str, keys: list[str]) -> None:
    """Remove the objects of a build that failed before its manifest (a full disk, a read-only or
    immutable store): without a manifest they are garbage no restore would read, and a failed
    publish should leave the store as it found it. Best effort: the build's own error is the one
    the caller sees, and a crash (which skips this) still leaves nothing a restore trusts. A build
    of the same model beside this one that did commit its manifest keeps the objects (the same
    bytes: the id is their hash)."""
    try:
        if not keys or store.exists(manifest_key(snapshot_id)):
            return
        for key in keys:
            store.delete_prefix(key)
    except Exception as exc:  # reported, never allowed to hide the build's error
        log.warning("could not remove the objects of the failed publish of %s from %s: %s", snapshot_id, store.uri, exc)


def _chunks(
    entries: tuple[TensorEntry, ...],
    sources: Mapping[str, TensorSource],
    data_size: int,
    chunk_size: int,
    buffer: bytearray,
) -> Iterator[tuple[int, memoryview]]:
    """Yield (bytes done, chunk view) for the blob, assembled in one reused buffer.

    The view is only valid until the next iteration: callers hash or write it, never keep it.
    """
    view = memoryview(buffer)
    ordered = sorted(entries, key=lambda e: e.offset)
    first = 0  # first tensor that may still overlap the current chunk
    for chunk_start in range(0, data_size, chunk_size):
        chunk_end = min(chunk_start + chunk_size, data_size)
        chunk = view[: chunk_end - chunk_start]
        while first < len(ordered) and ordered[first].end <= chunk_start:
            first += 1
        cursor = chunk_start  # bytes before the cursor are filled; gaps between tensors are zeroed
        i = first
        while i < len(ordered) and ordered[i].offset < chunk_end:
            entry = ordered[i]
            lo = max(entry.offset, chunk_start)
            hi = min(entry.end, chunk_end)
            if hi > lo:
                _zero(chunk, cursor - chunk_start, lo - chunk_start)
                sources[entry.name].read(lo - entry.offset, chunk[lo - chunk_start : hi - chunk_start])
                cursor = hi
            i += 1
        _zero(chunk, cursor - chunk_start, len(chunk))
        yield chunk_end, chunk


def _zero(view: memoryview, start: int, end: int) -> None:
    if end > start:  # alignment padding: always shorter than one alignment unit, so cheap
        view[start:end] = bytes(end - start)
