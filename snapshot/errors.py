"""Exception types of the snapshot engine.

Each failure a user can meet has a type of its own, so callers (the runtime, the CLI, the gateway)
can map it to a precise message or status code, and every message names the snapshot, chunk or
tensor it is about: "restore failed" alone helps nobody at 3 a.m.
"""

from __future__ import annotations


class SnapshotError(Exception):
    """Base class of every error the snapshot engine raises on purpose."""


class InvalidURIError(SnapshotError, ValueError):
    """A store or snapshot URI that kold cannot parse or does not support."""


class SnapshotNotFoundError(SnapshotError):
    """The snapshot (or one of its objects) is not in the store."""


class ObjectNotFoundError(SnapshotNotFoundError):
    """A key that is not in the store (the store-level form of a missing snapshot object)."""


class ManifestError(SnapshotError):
    """A manifest that cannot be parsed or fails validation."""


class ManifestVersionError(ManifestError):
    """A manifest written by a format version this build does not understand."""


class UnsupportedDtypeError(SnapshotError, ValueError):
    """A tensor dtype the snapshot format does not carry."""


class ModelSourceError(SnapshotError, ValueError):
    """A model directory or state dict that cannot be turned into a snapshot."""


class ChunkCorruptedError(SnapshotError):
    """A chunk whose bytes do not match its checksum, even after fetching it again from the source."""


class ChunkTruncatedError(ChunkCorruptedError):
    """A chunk (or the data object holding it) is shorter than the manifest says."""


class StoreError(SnapshotError):
    """A store that failed in a way retries did not fix."""


class StoreAuthError(StoreError):
    """The store refused our credentials (wrong key, secret or permissions)."""


class RestoreCancelledError(SnapshotError):
    """The restore was cancelled by its caller."""


class RestoreIncompleteError(SnapshotError):
    """Bytes a consumer waited for (`RestoreProgress.wait_until`) never landed: the restore failed."""


class TensorMismatchError(SnapshotError):
    """`load_into` found names, shapes or dtypes in the snapshot that do not fit the module."""


class DeviceUnavailableError(SnapshotError):
    """A restore asked for a device (CUDA) this process cannot use."""


class HostPoolError(SnapshotError):
    """The node's host memory pool cannot do what was asked (no room, bad size, unusable directory)."""
