"""kold.snapshot: the snapshot format, stores, node cache tiers and the pipelined restore.

Attributes are imported lazily (PEP 562) so that `import kold.snapshot` costs nothing on a cold
start: torch, boto3 and CuPy load only when the code that needs them runs.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from kold.snapshot.errors import (
    ChunkCorruptedError,
    ChunkTruncatedError,
    DeviceUnavailableError,
    HostPoolError,
    InvalidURIError,
    ManifestError,
    ManifestVersionError,
    ModelSourceError,
    ObjectNotFoundError,
    RestoreCancelledError,
    RestoreIncompleteError,
    SnapshotError,
    SnapshotNotFoundError,
    StoreAuthError,
    StoreError,
    TensorMismatchError,
    UnsupportedDtypeError,
)

if TYPE_CHECKING:
    from kold.snapshot.builder import BuildResult, build_snapshot
    from kold.snapshot.cache import CacheTier, NodeCache
    from kold.snapshot.hostpool import HostPool
    from kold.snapshot.loading import load_into
    from kold.snapshot.manifest import Manifest
    from kold.snapshot.prefetcher import prefetch
    from kold.snapshot.progress import RestoreProgress
    from kold.snapshot.restorer import RestoredSnapshot, RestoreStats, restore
    from kold.snapshot.store import S3Options, SnapshotRef, open_store, parse_snapshot_uri

_LAZY = {
    "build_snapshot": "builder",
    "BuildResult": "builder",
    "CacheTier": "cache",
    "NodeCache": "cache",
    "HostPool": "hostpool",
    "load_into": "loading",
    "Manifest": "manifest",
    "prefetch": "prefetcher",
    "RestoreProgress": "progress",
    "restore": "restorer",
    "RestoredSnapshot": "restorer",
    "RestoreStats": "restorer",
    "S3Options": "store",
    "SnapshotRef": "store",
    "open_store": "store",
    "parse_snapshot_uri": "store",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f"kold.snapshot.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'kold.snapshot' has no attribute {name!r}")


__all__ = [
    "BuildResult",
    "CacheTier",
    "ChunkCorruptedError",
    "ChunkTruncatedError",
    "DeviceUnavailableError",
    "HostPool",
    "HostPoolError",
    "InvalidURIError",
    "Manifest",
    "ManifestError",
    "ManifestVersionError",
    "ModelSourceError",
    "NodeCache",
    "ObjectNotFoundError",
    "RestoreCancelledError",
    "RestoreIncompleteError",
    "RestoreProgress",
    "RestoreStats",
    "RestoredSnapshot",
    "S3Options",
    "SnapshotError",
    "SnapshotNotFoundError",
    "SnapshotRef",
    "StoreAuthError",
    "StoreError",
    "TensorMismatchError",
    "UnsupportedDtypeError",
    "build_snapshot",
    "load_into",
    "open_store",
    "parse_snapshot_uri",
    "prefetch",
    "restore",
]
