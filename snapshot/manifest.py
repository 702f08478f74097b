"""Snapshot format v1: the manifest (see FORMAT.md, which is the spec this module implements).

A snapshot is one data blob plus a JSON manifest. The manifest lists every tensor (name, dtype,
shape, byte offset, size), the fixed-size chunks the blob is cut into with a checksum each, and the
small model files (config, tokenizer) carried beside the weights. The snapshot id is a hash of the
canonical manifest, so the same model published twice has the same id and is stored once.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from kold.snapshot import dtypes
from kold.snapshot.errors import ManifestError, ManifestVersionError, UnsupportedDtypeError

FORMAT_NAME = "kold.snapshot"
FORMAT_VERSION = 1
CHECKSUM_ALGORITHM = "xxh3_128"
# Tensors start on 4 KiB boundaries: page-aligned offsets allow O_DIRECT reads and let every dtype
# view (and vectorised copies) start aligned inside the one restore buffer.
MIN_ALIGNMENT = 4096
ID_HEX_CHARS = 32  # 128 bits of sha256: collision-free in practice, short enough for URLs and logs

_FILE_NAME = re.compile(r"^[A-Za-z0-9._-]{1,200}$")
_ID = re.compile(rf"^[0-9a-f]{{{ID_HEX_CHARS}}}$")


def is_snapshot_id(text: str) -> bool:
    return bool(_ID.match(text))


@dataclass(frozen=True)
class TensorEntry:
    name: str
    dtype: str  # a name from kold.snapshot.dtypes
    shape: tuple[int, ...]
    offset: int
    nbytes: int

    @property
    def end(self) -> int:
        return self.offset + self.nbytes


@dataclass(frozen=True)
class ChunkEntry:
    index: int
    offset: int
    size: int
    checksum: str

    @property
    def end(self) -> int:
        return self.offset + self.size


@dataclass(frozen=True)
class FileEntry:
    """A small model file carried with the weights (config.json, tokenizer.json, ...)."""

    name: str
    size: int
    checksum: str


@dataclass(frozen=True)
class Manifest:
    tensors: tuple[TensorEntry, ...]
    chunk_size: int
    chunk_checksums: tuple[str, ...]
    data_size: int
    files: tuple[FileEntry, ...] = ()
    alignment: int = MIN_ALIGNMENT
    metadata: Mapping[str, str] = field(default_factory=dict)
    version: int = FORMAT_VERSION

    def __post_init__(self) -> None:
        _validate(self)

    # -- derived -------------------------------------------------------------------------------
    @property
    def id(self) -> str:
        """Content address: sha256 of the canonical manifest JSON, first 128 bits in hex."""
        return hashlib.sha256(self.to_json()).hexdigest()[:ID_HEX_CHARS]

    @property
    def num_chunks(self) -> int:
        return len(self.chunk_checksums)

    def chunk(self, index: int) -> ChunkEntry:
        offset = index * self.chunk_size
        size = min(self.chunk_size, self.data_size - offset)
        return ChunkEntry(index, offset, size, self.chunk_checksums[index])

    def chunks(self) -> Iterator[ChunkEntry]:
        return (self.chunk(i) for i in range(self.num_chunks))

    def tensor(self, name: str) -> TensorEntry:
        for t in self.tensors:
            if t.name == name:
                return t
        raise KeyError(name)

    def file(self, name: str) -> FileEntry:
        for f in self.files:
            if f.name == name:
                return f
        raise KeyError(name)

    @property
    def tensor_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)

    # -- serialisation -------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT_NAME,
            "version": self.version,
            "alignment": self.alignment,
            "data_size": self.data_size,
            "checksum": CHECKSUM_ALGORITHM,
            "chunk_size": self.chunk_size,
            "chunks": list(self.chunk_checksums),
            "tensors": [
                {
                    "name": t.name,
                    "dtype": t.dtype,
                    "shape": list(t.shape),
                    "offset": t.offset,
                    "nbytes": t.nbytes,
                }
                for t in self.tensors
            ],
            "files": [{"name": f.name, "size": f.size, "checksum": f.checksum} for f in self.files],
            "metadata": dict(sorted(self.metadata.items())),
        }

    def to_json(self) -> bytes:
        """Canonical JSON: sorted keys, no whitespace, so the same content always hashes the same."""
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, raw: bytes, *, source: str = "manifest") -> Manifest:
        try:
            doc = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ManifestError(f"{source}: not valid JSON ({exc})") from None
        return cls.from_dict(doc, source=source)

    @classmethod
    def from_dict(cls, doc: Any, *, source: str = "manifest") -> Manifest:
        if not isinstance(doc, dict) or doc.get("format") != FORMAT_NAME:
            raise ManifestError(f"{source}: not a kold snapshot manifest (missing format {FORMAT_NAME!r})")
        version = doc.get("version")
        if version != FORMAT_VERSION:
            raise ManifestVersionError(
                f"{source}: manifest format version {version!r} is not supported by this kold "
                f"(it reads version {FORMAT_VERSION}); upgrade kold or rebuild the snapshot"
            )
        if doc.get("checksum") != CHECKSUM_ALGORITHM:
            raise ManifestError(f"{source}: unknown checksum algorithm {doc.get('checksum')!r}")
        try:
            return cls(
                version=version,
                alignment=int(doc["alignment"]),
                data_size=int(doc["data_size"]),
                chunk_size=int(doc["chunk_size"]),
                chunk_checksums=tuple(str(c) for c in doc["chunks"]),
                tensors=tuple(
                    TensorEntry(
                        name=str(t["name"]),
                        dtype=str(t["dtype"]),
                        shape=tuple(int(s) for s in t["shape"]),
                        offset=int(t["offset"]),
                        nbytes=int(t["nbytes"]),
                    )
                    for t in doc["tensors"]
                ),
                files=tuple(
                    FileEntry(name=str(f["name"]), size=int(f["size"]), checksum=str(f["checksum"]))
                    for f in doc.get("files", [])
                ),
                metadata={str(k): str(v) for k, v in dict(doc.get("metadata", {})).items()},
            )
        except ManifestError as exc:
            raise ManifestError(f"{source}: {exc}") from None
        except (KeyError, TypeError, ValueError) as exc:
            raise ManifestError(f"{source}: malformed manifest ({type(exc).__name__}: {exc})") from None


def align_up(value: int, alignment: int) -> int:
    return (value + alignment - 1) // alignment * alignment


def layout_tensors(
    specs: Sequence[tuple[str, str, tuple[int, ...]]], alignment: int = MIN_ALIGNMENT
) -> tuple[tuple[TensorEntry, ...], int]:
    """Place tensors back to back, each at the next aligned offset. Returns entries and data size.

    The data size is rounded up to the alignment too, so a blob is always whole pages (the last
    page is padding) and an O_DIRECT read of the final chunk stays legal.
    """
    entries = []
    offset = 0
    for name, dtype_name, shape in specs:
        nbytes = math.prod(shape) * dtypes.by_name(dtype_name).itemsize
        entries.append(TensorEntry(name, dtype_name, tuple(shape), offset, nbytes))
        offset = align_up(offset + nbytes, alignment)
    return tuple(entries), offset


def _validate(m: Manifest) -> None:
    if m.version != FORMAT_VERSION:
        raise ManifestVersionError(f"manifest version {m.version} is not supported")
    if m.alignment < MIN_ALIGNMENT or m.alignment & (m.alignment - 1):
        raise ManifestError(f"alignment {m.alignment} must be a power of two >= {MIN_ALIGNMENT}")
    if m.chunk_size <= 0 or m.chunk_size % m.alignment:
        raise ManifestError(f"chunk_size {m.chunk_size} must be a positive multiple of the alignment")
    if m.data_size < 0:
        raise ManifestError("data_size must be >= 0")
    expected_chunks = math.ceil(m.data_size / m.chunk_size)
    if len(m.chunk_checksums) != expected_chunks:
        raise ManifestError(
            f"{len(m.chunk_checksums)} chunk checksums for {m.data_size} bytes in chunks of "
            f"{m.chunk_size} (expected {expected_chunks})"
        )
    seen: set[str] = set()
    previous_end = 0
    for t in sorted(m.tensors, key=lambda t: t.offset):
        if not t.name or t.name in seen:
            raise ManifestError(f"tensor name {t.name!r} is empty or duplicated")
        seen.add(t.name)
        try:
            itemsize = dtypes.by_name(t.dtype).itemsize
        except UnsupportedDtypeError as exc:
            raise ManifestError(f"tensor {t.name!r}: {exc}") from None
        if any(s < 0 for s in t.shape) or t.nbytes != math.prod(t.shape) * itemsize:
            raise ManifestError(f"tensor {t.name!r}: nbytes {t.nbytes} does not match shape {t.shape}")
        if t.offset % m.alignment:
            raise ManifestError(f"tensor {t.name!r}: offset {t.offset} is not aligned to {m.alignment}")
        if t.offset < previous_end or t.end > m.data_size:
            raise ManifestError(f"tensor {t.name!r}: bytes [{t.offset}, {t.end}) overlap or lie outside the data")
        previous_end = t.end
    names: set[str] = set()
    for f in m.files:
        if not _FILE_NAME.match(f.name) or f.name in {".", ".."} or f.name in names:
            raise ManifestError(f"file name {f.name!r} is not a plain, unique file name")
        names.add(f.name)
