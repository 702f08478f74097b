"""What of a restore has landed so far, for a consumer that starts before the restore ends.

Why: restoring a 1b model from a cold disk takes about a second on a small CPU node, and the first
request's prefill takes most of another. With the tensors laid out in forward order (layout.py) the
prefill of layer i only needs the bytes up to the end of layer i: a runtime that binds its model to
the destination buffer as soon as it exists can compute layer by layer behind the restore, waiting
only where it catches up with it (`wait_until`).

The restore drives it: `begin` once the host destination exists (CPU restores that fill a buffer,
and shm-tier mappings, which are complete at once), `landed` per chunk once the chunk is verified in
place, `end` when it is over (with the error if it failed). A GPU restore never calls `begin`: its
copies are asynchronous, so "committed" does not mean "on the device", and the restore is short
there anyway. A consumer calls `wait_destination`, then `wait_until(offset)` before it reads any
byte below `offset`.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING

from kold.snapshot.errors import RestoreIncompleteError

if TYPE_CHECKING:
    import mmap

    from kold.snapshot.manifest import ChunkEntry, Manifest


class RestoreProgress:
    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._manifest: Manifest | None = None
        self._buffer: mmap.mmap | None = None
        self._landed: list[bool] = []
        self._prefix = 0  # chunks [0, _prefix) have all landed
        self._ended = False
        self._error: BaseException | None = None

    # -- the restore's side ------------------------------------------------------------------------

    def begin(self, manifest: Manifest, buffer: mmap.mmap, *, complete: bool = False) -> None:
        """The destination exists (`complete`: and already holds every byte, e.g. a shm mapping)."""
        with self._cond:
            self._manifest, self._buffer = manifest, buffer
            n = len(manifest.chunk_checksums)
            self._landed = [complete] * n
            self._prefix = n if complete else 0
            self._cond.notify_all()

    def landed(self, chunk: ChunkEntry) -> None:
        with self._cond:
            if not self._landed:
                return
            self._landed[chunk.index] = True
            while self._prefix < len(self._landed) and self._landed[self._prefix]:
                self._prefix += 1
            self._cond.notify_all()

    def end(self, error: BaseException | None = None) -> None:
        with self._cond:
            self._ended = True
            self._error = error
            if error is None and self._landed:
                self._prefix = len(self._landed)
            self._cond.notify_all()

    # -- the consumer's side -----------------------------------------------------------------------

    def wait_destination(self, timeout: float | None = None) -> tuple[Manifest, mmap.mmap] | None:
        """The manifest and the host buffer being filled; None if the restore ended (or `timeout`
        passed) without one: a GPU restore, or one that failed before it had a destination."""
        with self._cond:
            self._cond.wait_for(lambda: self._buffer is not None or self._ended, timeout)
            if self._buffer is None or self._manifest is None:
                return None
            return self._manifest, self._buffer

    def landed_bytes(self) -> int:
        """Every byte below this offset is in place."""
        with self._cond:
            return self._prefix_end()

    def wait_until(self, offset: int) -> None:
        """Block until every byte below `offset` has landed. Raises `RestoreIncompleteError` if the
        restore ends without them (failed or cancelled)."""
        with self._cond:
            if self._prefix_end() >= offset:
                return
            self._cond.wait_for(lambda: self._prefix_end() >= offset or self._ended)
            if self._prefix_end() < offset:
                snapshot = self._manifest.id if self._manifest is not None else "?"
                raise RestoreIncompleteError(
                    f"snapshot {snapshot}: the restore ended before byte {offset} landed ({self._error or 'no error'})"
                ) from self._error

    @property
    def ended(self) -> bool:
        with self._cond:
            return self._ended

    def _prefix_end(self) -> int:
        m = self._manifest
        if m is None:
            return 0
        if self._prefix >= len(self._landed):
            return m.data_size
        return self._prefix * m.chunk_size
