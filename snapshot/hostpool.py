"""A node's pool of pre-faulted host memory, which CPU restores claim as their destination.

Why: on a CPU restore the bytes are cheap and fresh memory is not. Every page of a new buffer costs
a fault (on a VM also the hypervisor's own first-touch fault): 2.2 GB of fresh memory took 1.4 s
here, against 0.2 s to copy the same bytes into memory already faulted in. The pool moves that cost
off the cold start. The node faults segments in once, ahead of time (`kold snapshot pool fill`). A
restore maps a free one and reads straight into it. On a huge-page tmpfs, a mapping costs ~1000
page-table entries for 2 GB: a few milliseconds.

Segments are plain files in one directory. Point it at a tmpfs mounted with `huge=within_size`
(or a hugetlbfs). On a 4 KiB-page tmpfs such as /dev/shm, mapping 2 GB fills 500k page-table entries
(~0.3-0.8 s): still no first-touch cost, but little faster than fresh memory.

A restore claims a segment with an exclusive `flock` taken on the file descriptor the mapping keeps
open. The claim ends when the mapping is closed or the process dies, however it dies. So there is
no daemon and nothing to clean up, and a crashed instance never leaks its segment. Segments are
reused without zeroing. A restore overwrites every byte of the snapshot's data; only the tail of
the last page may still hold an earlier restore's bytes. That is the trust of one node and one
operator, the same as the shm tier's.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import mmap
import os
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from kold.snapshot.errors import HostPoolError
from kold.snapshot.hostmem import huge_page_backed, mount_of, populate_write, round_up_pages

log = logging.getLogger(__name__)

SEGMENT_PREFIX = "segment-"
_FILLING_PREFIX = ".filling-"
HUGE_PAGE = 2 << 20  # a mapping of a hugetlbfs file must cover whole huge pages
MEMORY_FILESYSTEMS = ("tmpfs", "hugetlbfs")


@dataclass(frozen=True)
class Segment:
    path: Path
    size: int
    in_use: bool


class HostPool:
    """Pre-faulted segments under `directory`. Restores `claim` them; `fill` and `clear` manage them."""

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)

    def __repr__(self) -> str:
        return f"HostPool({str(self.directory)!r})"

    @property
    def huge_pages(self) -> bool:
        return huge_page_backed(self.directory)

    def segments(self) -> list[Segment]:
        """Every segment, smallest first, with whether a process holds it now."""
        out = []
        for size, path in self._sized():
            try:
                out.append(Segment(path, size, _held(path)))
            except FileNotFoundError:  # cleared meanwhile
                continue
        return out

    def claim(self, nbytes: int) -> mmap.mmap | None:
        """A shared writable mapping of at least `nbytes` over a free segment, its page tables filled;
        None when no free segment is large enough (the caller falls back to fresh memory).

        The mapping holds the claim: close it (or drop the last reference) to give the segment back.
        """
        for path in self._candidates(nbytes):
            fd = _lock(path)
            if fd is None:  # gone, or another restore holds it
                continue
            try:
                info = os.fstat(fd)
                size = info.st_size
                # replaced by a smaller one since it was listed, or removed (by `clear`, or by the
                # platform shrinking the pool) between our open and our lock: memory nobody could see
                if size < nbytes or info.st_nlink == 0:
                    continue
                # mmap dups the descriptor and keeps the dup open until the mapping closes: the lock
                # belongs to the open file description both share, so it lives exactly as long
                mapping = mmap.mmap(fd, _map_length(nbytes, size), flags=mmap.MAP_SHARED)
            finally:
                os.close(fd)
            populate_write(mapping, len(mapping))
            return mapping
        return None

    def fill(self, count: int, segment_bytes: int, *, on_segment: Callable[[Path], None] | None = None) -> list[Path]:
        """Add `count` segments of `segment_bytes` each, every page faulted in now.

        Each segment is written under a temporary name and renamed when complete, so a restore never
        claims a half-filled one; a failure removes what it created and names the reason.
        """
        if count < 1:
            raise HostPoolError(f"host pool {self.directory}: the segment count must be at least 1, not {count}")
        if segment_bytes < mmap.PAGESIZE:
            raise HostPoolError(f"host pool {self.directory}: a segment of {segment_bytes} bytes is too small")
        size = whole_huge_pages(segment_bytes)
        mount = mount_of(self.directory)  # the mount that holds it, whether or not it exists yet
        if mount is not None and mount[0] not in MEMORY_FILESYSTEMS:
            # a shared mapping of a disk file would write every restored byte back to the disk
            raise HostPoolError(
                f"host pool {self.directory} is on {mount[0]}, not in memory: use a tmpfs (ideally mounted "
                "with huge=within_size) or a hugetlbfs"
            )
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            vfs = os.statvfs(self.directory)
        except OSError as exc:
            raise HostPoolError(f"host pool {self.directory}: {exc.strerror or exc}") from exc
        free = vfs.f_bavail * vfs.f_frsize
        if free < count * size:
            raise HostPoolError(
                f"host pool {self.directory}: {count} x {size:,} bytes do not fit ({free:,} bytes free there)"
            )
        made = []
        for _ in range(count):
            made.append(self._make_segment(size))
            if on_segment is not None:
                on_segment(made[-1])
        return made

    def clear(self) -> tuple[int, int]:
        """Remove every segment no process holds; (removed, still in use). A held segment stays
        until its instance ends (removing it now would only hide it: its memory stays mapped)."""
        removed = busy = 0
        for path in self._segment_paths():
            if self.remove(path):
                removed += 1
            else:
                busy += path.exists()  # held (a segment removed meanwhile is neither)
        self.remove_partial_fills()
        return removed, busy

    def remove(self, path: Path) -> bool:
        """Remove one segment if no process holds it; False when one does (or it is gone already).

        The segment is unlinked under its own lock, so a restore can never claim it halfway through;
        a restore that opened it just before is turned away by `claim`'s link-count check.
        """
        fd = _lock(path)
        if fd is None:
            return False
        try:
            path.unlink(missing_ok=True)
            return True
        finally:
            os.close(fd)

    def remove_partial_fills(self) -> None:
        """Remove what a killed fill left behind (its temporary files). Only while no fill runs."""
        with contextlib.suppress(FileNotFoundError):
            for stale in self.directory.glob(_FILLING_PREFIX + "*"):
                stale.unlink(missing_ok=True)

    def _segment_paths(self) -> list[Path]:
        try:
            return [p for p in self.directory.iterdir() if p.name.startswith(SEGMENT_PREFIX)]
        except FileNotFoundError:
            return []

    def _sized(self) -> list[tuple[int, Path]]:
        """(size, path) of every segment, smallest first (ties by name); one cleared meanwhile is left out."""
        sized = []
        for path in self._segment_paths():
            with contextlib.suppress(FileNotFoundError):
                sized.append((path.stat().st_size, path.name, path))
        return [(size, path) for size, _, path in sorted(sized)]

    def _candidates(self, nbytes: int) -> list[Path]:
        """Segments that fit, smallest first (a big segment stays for a big model)."""
        return [path for size, path in self._sized() if size >= nbytes]

    def _make_segment(self, size: int) -> Path:
        name = uuid.uuid4().hex[:12]
        temp = self.directory / f"{_FILLING_PREFIX}{name}"
        final = self.directory / f"{SEGMENT_PREFIX}{name}"
        fd = os.open(temp, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.posix_fallocate(fd, 0, size)
            # fallocate reserves pages on a tmpfs but leaves them to be cleared on first access; a
            # write fault through a mapping clears and maps every one of them now, not in a restore
            with mmap.mmap(fd, size, flags=mmap.MAP_SHARED) as mapping:
                if not populate_write(mapping, size):
                    for offset in range(0, size, mmap.PAGESIZE):
                        mapping[offset] = 0
            os.rename(temp, final)
        except OSError as exc:
            temp.unlink(missing_ok=True)
            reason = "out of space" if exc.errno in (errno.ENOSPC, errno.ENOMEM) else exc.strerror or str(exc)
            raise HostPoolError(f"host pool {self.directory}: cannot make a {size:,}-byte segment: {reason}") from exc
        finally:
            os.close(fd)
        return final


def whole_huge_pages(nbytes: int) -> int:
    """The size a segment of `nbytes` gets: whole 2 MiB pages (what a huge-page mapping covers)."""
    return max(1, (nbytes + HUGE_PAGE - 1) // HUGE_PAGE) * HUGE_PAGE


def _map_length(nbytes: int, size: int) -> int:
    """`nbytes` rounded up to whole huge pages where the segment allows, else to whole pages."""
    length = whole_huge_pages(nbytes)
    return length if length <= size else round_up_pages(nbytes)


def _lock(path: Path) -> int | None:
    """A read-write descriptor of `path` holding its exclusive lock; None when the file is gone or
    some process holds the lock already."""
    try:
        fd = os.open(path, os.O_RDWR)
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def _held(path: Path) -> bool:
    """Whether some process holds the segment (a lock test that takes nothing)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False
    finally:
        os.close(fd)
