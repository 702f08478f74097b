"""Checking, after the fact, the bytes a restore took on trust from a node cache tier.

Why: a restore from the shm tier is a mapping of a file that any process on the node could have
overwritten since the tier was filled (and verified); hashing it before serving would put a pass over
every byte back on the cold start's critical path (a 2.2 GB model: ~0.07 s of an idle core here, more
while torch imports beside it, seconds for a model of tens of GB). So the restore trusts the tier,
the instance starts serving, and a `TierVerifier` hashes the served bytes against the manifest's
chunk checksums in a low-priority thread. On a mismatch it quarantines the tier entry (the next
restore on the node reads from the store and fills the tier again) and says which chunk was wrong,
so the runtime stops serving and exits to be restarted. A corrupt tier can thus serve for at most
the time that check takes: the window documented in FORMAT.md ("Integrity").

What is hashed is the restored buffer itself (what the model reads), not the tier's file: a CPU
restore's buffer *is* the tier's mapping or a copy of it; a GPU restore's buffer is copied back one
chunk at a time.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from kold.snapshot.checksum import chunk_hasher
from kold.snapshot.manifest import ChunkEntry, Manifest

if TYPE_CHECKING:
    import torch

    from kold.snapshot.cache import CacheTier, NodeCache
    from kold.snapshot.restorer import RestoredSnapshot

log = logging.getLogger(__name__)

# Hashed a piece at a time: each hash call then holds the interpreter (if the binding does not release
# it) for well under a millisecond, and a stop request is seen within one piece.
PIECE_BYTES = 4 << 20
# The verifier thread's nice increment (Linux: per thread). Against one busy thread on the same core the
# kernel then gives it ~25% of that core (weights 335 : 1024): requests keep most of the CPU, and the
# check, so the window of a corrupt tier, takes at most ~4x its time on an idle core. A larger increment
# would protect the first requests more and leave the window unbounded under load.
VERIFY_NICE = 5


@dataclass(frozen=True)
class TrustedTier:
    """Where a restore took its data without checking it: the cache, the tier, and the identity of the
    entry's data file at the time (so a quarantine never removes an entry filled again since)."""

    cache: NodeCache
    tier: CacheTier
    identity: tuple[int, int] | None  # (st_dev, st_ino) of the entry's data file


@dataclass(frozen=True)
class Mismatch:
    """A chunk whose bytes do not hash to the manifest's checksum."""

    snapshot_id: str
    tier: str
    chunk: ChunkEntry
    actual: str

    def __str__(self) -> str:
        c = self.chunk
        return (
            f"snapshot {self.snapshot_id}: chunk {c.index} (bytes {c.offset}-{c.end}) served from the {self.tier} "
            f"tier does not match its checksum (expected {c.checksum}, got {self.actual})"
        )


@dataclass(frozen=True)
class TierVerdict:
    """The outcome of one check. `complete` is False when it was stopped before the last chunk."""

    snapshot_id: str
    tier: str
    complete: bool
    checked_bytes: int
    seconds: float
    mismatch: Mismatch | None = None
    quarantined: bool = False  # the tier entry was removed (False: it had been removed or replaced already)

    @property
    def state(self) -> str:
        """verified | corrupt | stopped"""
        if self.mismatch is not None:
            return "corrupt"
        return "verified" if self.complete else "stopped"


def first_mismatch(
    manifest: Manifest,
    read: Callable[[ChunkEntry], memoryview],
    *,
    tier: str = "",
    stop: threading.Event | None = None,
    piece: int = PIECE_BYTES,
    checked: list[int] | None = None,
) -> Mismatch | None:
    """Hash every chunk (`read(chunk)` gives its bytes) against the manifest, in order; the first that
    does not match, or None. Returns None early, with `checked` short of the data size, once `stop` is
    set. `checked` (a one-element list) counts the bytes hashed so far."""
    for chunk in manifest.chunks():
        if stop is not None and stop.is_set():
            return None
        data = read(chunk)
        hasher = chunk_hasher()
        for start in range(0, len(data), piece):
            hasher.update(data[start : start + piece])
        actual = hasher.hexdigest()
        if checked is not None:
            checked[0] += chunk.size
        if actual != chunk.checksum:
            return Mismatch(manifest.id, tier, chunk, actual)
    return None


class TierVerifier:
    """Checks the data of one restore that came from a cache tier unverified (`RestoredSnapshot.trusted`)."""

    def __init__(self, manifest: Manifest, buffer: torch.Tensor, trusted: TrustedTier) -> None:
        self.manifest = manifest
        self.buffer = buffer
        self.trusted = trusted

    @classmethod
    def for_restore(cls, snap: RestoredSnapshot) -> TierVerifier | None:
        """The verifier of `snap`'s data, or None when it was checked on the way in (or came from the store)."""
        return cls(snap.manifest, snap.buffer, snap.trusted) if snap.trusted is not None else None

    @property
    def tier(self) -> str:
        return self.trusted.tier.name

    def run(self, stop: threading.Event | None = None, *, low_priority: bool = True) -> TierVerdict:
        """Hash the restored data chunk by chunk (in the calling thread, reniced when `low_priority`);
        on a mismatch, quarantine the tier entry and log the chunk. Stops early once `stop` is set."""
        if low_priority:
            _lower_this_threads_priority(VERIFY_NICE)
        started = time.perf_counter()
        checked = [0]
        mismatch = first_mismatch(self.manifest, _chunk_reader(self.buffer), tier=self.tier, stop=stop, checked=checked)
        seconds = time.perf_counter() - started
        complete = mismatch is None and checked[0] == self.manifest.data_size
        quarantined = False
        if mismatch is not None:
            log.error("%s; quarantining the %s tier's entry", mismatch, self.tier)
            try:
                quarantined = self.trusted.cache.quarantine(
                    self.manifest.id, self.trusted.tier, identity=self.trusted.identity, reason=str(mismatch)
                )
            except OSError as exc:  # the verdict stands: the instance must stop serving these bytes anyway
                log.error("could not quarantine snapshot %s in the %s tier: %s", self.manifest.id, self.tier, exc)
        return TierVerdict(self.manifest.id, self.tier, complete, checked[0], seconds, mismatch, quarantined)


def _chunk_reader(buffer: torch.Tensor) -> Callable[[ChunkEntry], memoryview]:
    """Each chunk's bytes as the model reads them: a view of a host buffer, or a device buffer's chunk
    copied back to the host (one chunk at a time: a chunk's worth of host memory, not the model's)."""
    if buffer.device.type == "cpu":
        whole = buffer.numpy().data if buffer.numel() else memoryview(b"")
        return lambda chunk: whole[chunk.offset : chunk.end]
    return lambda chunk: buffer[chunk.offset : chunk.end].cpu().numpy().data


def _lower_this_threads_priority(increment: int) -> None:
    """Renice the calling thread only. On Linux a thread id names one thread for setpriority(2);
    elsewhere that call would renice the whole process, so nothing is done there."""
    if sys.platform != "linux":
        return
    with contextlib.suppress(OSError, AttributeError):
        tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + increment))
