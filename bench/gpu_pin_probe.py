"""Pinning the shm tier for a CUDA restore: what each kind of mapping costs to pin read-only, in time
and in anonymous memory, and how pinning scales with threads and behaves beside a copy in flight.

    python bench/gpu_pin_probe.py [--gib 2.2] [--dir /dev/shm] [--dry-run]

1. A file the size of the 1b model on a tmpfs, as the shm tier holds it.
2. Pinned read-only (cudaHostRegisterReadOnly) in 32 MiB slices from one thread, mapped
   `MAP_PRIVATE` (what the shm tier's CPU path maps: copy-on-write) and then `MAP_SHARED` + `PROT_READ`
   from an `O_RDONLY` descriptor (what the GPU path maps now). The driver pins with FOLL_LONGTERM: a
   private mapping's file pages are unshared into anonymous memory, so RssAnon grows by the file's
   size; a shared mapping's are pinned as they are.
3. The shared mapping pinned by 1, 2, 4 and 8 threads at once (the restore uses PIN_THREADS).
4. One slice pinned while a 2 GB host-to-device copy is in flight on another stream: whether
   cudaHostRegister waits for the copy (an implicit synchronisation would serialise pins and copies).

Prints a table and, last, one JSON line with every figure. `--dry-run` does everything up to the
first CUDA call (file, both mappings, their addresses, RssAnon) and stops there.
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

MiB = 1 << 20
SLICE = 32 * MiB
READ_ONLY = 0x08  # cudaHostRegisterReadOnly
ATTR_READ_ONLY = 113  # cudaDevAttrHostRegisterReadOnlySupported


def rss_anon() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
    return -1


def make_file(directory: Path, size: int) -> Path:
    path = directory / f"kold-pin-probe-{uuid.uuid4().hex[:8]}"
    piece = bytes(range(256)) * (4 * MiB // 256)
    with path.open("wb") as f:
        for _ in range(size // len(piece)):
            f.write(piece)
    return path


def map_private(path: Path, size: int) -> mmap.mmap:
    fd = os.open(path, os.O_RDONLY)
    try:
        return mmap.mmap(fd, size, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    finally:
        os.close(fd)


def slices(size: int) -> list[tuple[int, int]]:
    return [(off, min(SLICE, size - off)) for off in range(0, size, SLICE)]


def pin(rt: Any, address: int, size: int, threads: int) -> tuple[float, float]:
    """(seconds to pin every slice read-only with `threads` threads, seconds to unpin them)."""

    def one(part: tuple[int, int]) -> None:
        rt.hostRegister(address + part[0], part[1], READ_ONLY)

    t0 = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(one, slices(size)))
    pinned = time.perf_counter() - t0
    t0 = time.perf_counter()
    for off, _ in slices(size):
        rt.hostUnregister(address + off)
    return pinned, time.perf_counter() - t0


def main() -> int:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--gib", type=float, default=2.05, help="file size in GiB (the 1b model is 2.05 GiB)")
    p.add_argument("--dir", type=Path, default=Path("/dev/shm"), help="a tmpfs, as the shm tier's")
    p.add_argument("--dry-run", action="store_true", help="stop before the first CUDA call")
    args = p.parse_args()
    from kold.snapshot.hostmem import huge_page_backed, map_file_read_only, readonly_address

    size = int(args.gib * (1 << 30)) // SLICE * SLICE
    result: dict[str, Any] = {"bytes": size, "dir": str(args.dir), "huge_pages": huge_page_backed(args.dir)}
    path = make_file(args.dir, size)
    try:
        private = map_private(path, size)
        shared = map_file_read_only(path, size)
        addresses = {"private": readonly_address(private), "shared": readonly_address(shared)}
        result["rss_anon_start_mib"] = rss_anon() / MiB
        print(f"{size / 1e9:.2f} GB file in {args.dir} (huge pages: {result['huge_pages']}), "
              f"RssAnon {result['rss_anon_start_mib']:.0f} MiB")  # fmt: skip
        if args.dry_run:
            print("dry run: stopping before the first CUDA call")
            result["dry_run"] = True
            print(json.dumps(result))
            return 0

        import cupy

        rt = cupy.cuda.runtime
        cupy.cuda.Device(0).use()
        result["read_only_supported"] = bool(rt.deviceGetAttribute(ATTR_READ_ONLY, 0))
        print(f"cudaDevAttrHostRegisterReadOnlySupported: {result['read_only_supported']}")
        for kind in ("private", "shared"):
            before = rss_anon()
            try:
                pinned, unpinned = pin(rt, addresses[kind], size, 1)
            except Exception as exc:  # the flag refused: the restore falls back to the ring
                result[kind] = {"error": str(exc)}
                print(f"{kind:<8} read-only pin refused: {exc}")
                continue
            grew = rss_anon() - before
            result[kind] = {"pin_s": pinned, "unpin_s": unpinned, "rss_anon_growth_mib": grew / MiB}
            print(f"{kind:<8} 1 thread: pin {pinned * 1000:7.1f} ms ({size / pinned / 1e9:5.1f} GB/s), "
                  f"unpin {unpinned * 1000:6.1f} ms, RssAnon +{grew / MiB:6.0f} MiB")  # fmt: skip
        if "error" not in result.get("shared", {}):
            result["shared_threads"] = {}
            for threads in (1, 2, 4, 8):
                pinned, unpinned = pin(rt, addresses["shared"], size, threads)
                result["shared_threads"][threads] = {"pin_s": pinned, "unpin_s": unpinned}
                print(f"shared   {threads} threads: pin {pinned * 1000:7.1f} ms ({size / pinned / 1e9:5.1f} GB/s), "
                      f"unpin {unpinned * 1000:6.1f} ms")  # fmt: skip
            # one slice pinned alone, then while a big copy runs on another stream
            src = cupy.cuda.alloc_pinned_memory(size)
            dst = cupy.cuda.Memory(size)
            stream = cupy.cuda.Stream(non_blocking=True)
            rt.memcpyAsync(dst.ptr, src.ptr, size, rt.memcpyHostToDevice, stream.ptr)
            stream.synchronize()  # first use of the buffers, untimed
            address = addresses["shared"]
            t0 = time.perf_counter()
            rt.hostRegister(address, SLICE, READ_ONLY)
            alone = time.perf_counter() - t0
            rt.hostUnregister(address)
            t0 = time.perf_counter()
            rt.memcpyAsync(dst.ptr, src.ptr, size, rt.memcpyHostToDevice, stream.ptr)
            t1 = time.perf_counter()
            rt.hostRegister(address, SLICE, READ_ONLY)
            beside = time.perf_counter() - t1
            stream.synchronize()
            copy = time.perf_counter() - t0
            rt.hostUnregister(address)
            result["pin_beside_copy"] = {"alone_s": alone, "beside_s": beside, "copy_s": copy}
            print(f"one 32 MiB pin: {alone * 1000:.2f} ms alone, {beside * 1000:.2f} ms while a "
                  f"{copy * 1000:.1f} ms copy runs ({'waits for it' if beside > copy / 2 else 'does not wait'})")  # fmt: skip
        print(json.dumps(result))
        return 0
    finally:
        path.unlink(missing_ok=True)


if __name__ == "__main__":
    sys.exit(main())
