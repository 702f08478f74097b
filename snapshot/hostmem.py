"""Host memory for restores: aligned anonymous buffers and file mappings.

Page faults on fresh memory, not bandwidth, are what make a naive restore slow (a 4 KiB fault per
page costs more than copying the page). So the destination is an anonymous mapping advised to use
transparent huge pages (512x fewer faults), faulted in by the reader threads in parallel as they
write their chunks. A snapshot in the shared-memory tier is mapped instead of copied.
"""

from __future__ import annotations

import contextlib
import mmap
import os
from pathlib import Path
from typing import Any

PAGE = mmap.PAGESIZE


def round_up_pages(nbytes: int) -> int:
    return max(PAGE, (nbytes + PAGE - 1) // PAGE * PAGE)


def alloc_host(nbytes: int) -> mmap.mmap:
    """A private anonymous mapping of at least `nbytes`, page aligned, THP-advised where supported."""
    buf = mmap.mmap(-1, round_up_pages(nbytes), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    advise_hugepages(buf)
    return buf


def advise_hugepages(buf: mmap.mmap) -> None:
    if hasattr(mmap, "MADV_HUGEPAGE"):
        # THP disabled ("never"): plain pages still work, just with more faults
        with contextlib.suppress(OSError):
            buf.madvise(mmap.MADV_HUGEPAGE)


def map_file(path: Path, size: int, *, populate: bool = True) -> mmap.mmap:
    """Map a file copy-on-write: readers share the page cache (or /dev/shm) pages; a write stays private.

    Page tables are filled with MADV_POPULATE_READ, not MAP_POPULATE: on a private writable mapping
    MAP_POPULATE write-faults every page, i.e. copies the whole file and defeats the sharing.
    """
    fd = os.open(path, os.O_RDONLY)
    try:
        mapping = mmap.mmap(fd, size, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    finally:
        os.close(fd)
    if populate:
        populate_read(mapping, size)
    return mapping


def map_file_read_only(path: Path, size: int) -> mmap.mmap:
    """Map a file shared and read-only (`MAP_SHARED`, `PROT_READ`, from an `O_RDONLY` descriptor).

    For the GPU path from the shm tier: the driver pins host memory for DMA with `FOLL_LONGTERM`, and
    on a private (copy-on-write) mapping the kernel then unshares every file page into anonymous memory
    even for a read-only pin (about 1.2 s and 2.2 GB of RssAnon per 2.2 GB instance). The pages of a
    shared mapping are the tmpfs file's own, so pinning them copies nothing. Nothing can write through
    this mapping (a write is a TypeError in Python, SIGSEGV in C): take its address with
    `readonly_address`, never `buffer_address`.
    """
    fd = os.open(path, os.O_RDONLY)
    try:
        return mmap.mmap(fd, size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ)
    finally:
        os.close(fd)


def populate_read(mapping: mmap.mmap, size: int) -> bool:
    """Fill a mapping's page tables for reading (Linux >= 5.14). Releases the GIL (ctypes call).

    Returns False where the kernel lacks MADV_POPULATE_READ; the pages then fault in on first use.
    """
    return _populate(mapping, size, MADV_POPULATE_READ)


def populate_write(mapping: mmap.mmap, size: int) -> bool:
    """Fill a shared mapping's page tables for writing (Linux >= 5.14), so later writes take no fault.

    Returns False where the kernel lacks MADV_POPULATE_WRITE; the pages then fault in on first write.
    """
    return _populate(mapping, size, MADV_POPULATE_WRITE)


def _populate(mapping: mmap.mmap, size: int, advice: int) -> bool:
    import ctypes

    libc = _libc()
    if libc is None or size == 0:
        return False
    address = buffer_address(mapping)
    result = libc.madvise(ctypes.c_void_p(address), ctypes.c_size_t(size), advice)
    return bool(result == 0)


def resident_fraction(fd: int, size: int, *, samples: int = 256, window: int = 16) -> float | None:
    """The fraction of a file's pages that are in the page cache, from `mincore` on a temporary mapping.

    Why: a restore reads a cold file faster with O_DIRECT (no page-cache fill, no kernel copy), a hot
    one faster through the cache; this is how the reader finds out which. The mapping is never touched,
    so nothing is faulted in or read. A big file is sampled (`samples` evenly spaced windows of `window`
    pages): `mincore` over every page of a hot 2.2 GB file costs ~50 ms here, the sample well under 1 ms.
    None where the query is unavailable (no libc, mmap refused).
    """
    import ctypes

    libc = _libc()
    if libc is None or size <= 0:
        return None
    address = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
    if address is None or address == _MAP_FAILED:
        return None
    try:
        pages = (size + PAGE - 1) // PAGE
        if pages <= samples * window:
            ranges = [(0, pages)]
        else:
            stride = pages // samples
            ranges = [(i * stride, window) for i in range(samples)]
        vec = (ctypes.c_ubyte * min(pages, window if len(ranges) > 1 else pages))()
        resident = checked = 0
        for first, count in ranges:
            length = min(count * PAGE, size - first * PAGE)
            if libc.mincore(ctypes.c_void_p(address + first * PAGE), ctypes.c_size_t(length), vec) != 0:
                return None
            n = (length + PAGE - 1) // PAGE
            flags = bytes(vec)[:n]
            resident += n - flags.count(0)
            checked += n
    finally:
        libc.munmap(ctypes.c_void_p(address), ctypes.c_size_t(size))
    return resident / checked


def _libc() -> Any:
    import ctypes
    import ctypes.util

    global _LIBC
    if _LIBC is None:
        name = ctypes.util.find_library("c")
        if name is None:
            return None
        _LIBC = ctypes.CDLL(name, use_errno=True)
        _LIBC.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        _LIBC.mmap.argtypes = [
            ctypes.c_void_p,
            ctypes.c_size_t,
            ctypes.c_int,
            ctypes.c_int,
            ctypes.c_int,
            ctypes.c_long,
        ]
        _LIBC.mmap.restype = ctypes.c_void_p
        _LIBC.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
        _LIBC.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    return _LIBC


MADV_POPULATE_READ = 22  # <linux/mman.h>; Python's mmap module exports neither
MADV_POPULATE_WRITE = 23
_MAP_FAILED = (1 << 64) - 1  # (void *) -1 as ctypes returns it for a c_void_p result
_LIBC: Any = None


def buffer_address(buf: mmap.mmap | memoryview | bytearray) -> int:
    """Address of a writable buffer's first byte (for CUDA host registration and memmove)."""
    import ctypes

    return ctypes.addressof(ctypes.c_char.from_buffer(buf))


def readonly_address(buf: mmap.mmap | memoryview | bytes) -> int:
    """Address of any buffer's first byte, read-only ones included (`buffer_address` needs a writable
    buffer: ctypes refuses to export a read-only one). The buffer export is released before returning,
    so the caller must keep `buf` open for as long as it uses the address."""
    import numpy as np

    if len(buf) == 0:
        raise ValueError("an empty buffer has no address")
    array = np.frombuffer(buf, dtype=np.uint8)
    try:
        return int(array.ctypes.data)
    finally:
        del array


def huge_page_backed(path: Path) -> bool:
    """Whether files under `path` get 2 MiB pages: a hugetlbfs, or a tmpfs mounted with huge=always
    or huge=within_size (or any tmpfs when the kernel forces huge shmem). Mapping such a file costs
    ~500x fewer page-table entries, which is what makes a restore from the shm tier nearly free."""
    mount = mount_of(path)
    if mount is None:
        return False
    fstype, options = mount
    if fstype == "hugetlbfs":
        return True
    if fstype != "tmpfs":
        return False
    try:
        forced = "[force]" in Path("/sys/kernel/mm/transparent_hugepage/shmem_enabled").read_text()
    except OSError:
        forced = False
    return forced or any(opt in ("huge=always", "huge=within_size") for opt in options.split(","))


def mount_of(path: Path) -> tuple[str, str] | None:
    """(filesystem type, super options) of the mount holding `path`, from /proc/self/mountinfo."""
    try:
        mounts = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return None
    target = str(path.resolve())
    best: tuple[int, str, str] = (-1, "", "")
    for line in mounts:
        fields = line.split()
        if "-" not in fields:
            continue
        sep = fields.index("-")
        mount_point, fstype, options = fields[4], fields[sep + 1], fields[-1]
        if (target == mount_point or target.startswith(mount_point.rstrip("/") + "/")) and len(mount_point) > best[0]:
            best = (len(mount_point), fstype, options)
    return (best[1], best[2]) if best[0] >= 0 else None
