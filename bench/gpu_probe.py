"""The GPU machine's primitives that bound a CUDA restore, measured once: pinned allocation, host
registration, host-to-device bandwidth by copy size and stream count, and page-cache reads into pinned
memory by thread count. Run on a GPU machine before tuning the restore's plan:

    python bench/gpu_probe.py [--file PATH]

Prints one table; nothing is written.
"""

from __future__ import annotations

import argparse
import mmap
import os
import statistics
import time
from concurrent.futures import ThreadPoolExecutor

MiB = 1 << 20


def timed(fn, runs: int = 3) -> float:  # type: ignore[no-untyped-def]
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    import cupy as cp
    import numpy as np

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--file", help="a large file (in the page cache) to read into pinned memory")
    p.add_argument("--gib", type=float, default=2.0)
    args = p.parse_args()
    total = int(args.gib * (1 << 30)) // (32 * MiB) * 32 * MiB
    rt = cp.cuda.runtime
    cp.cuda.Device(0).use()
    dev = cp.cuda.alloc(total)
    print(f"device: {rt.getDeviceProperties(0)['name'].decode()}, {total / 1e9:.2f} GB per copy test")

    for size_mib in (32, 64, 576, 2048):

        def host_alloc(n: int = size_mib * MiB) -> None:  # CuPy's pinned pool would hide the real cost
            rt.freeHost(rt.hostAlloc(n, 0))

        s = timed(host_alloc, 3)
        print(f"cudaHostAlloc+free {size_mib:5d} MiB: {s * 1000:8.1f} ms ({size_mib * MiB / s / 1e9:.1f} GB/s)")

    anon = mmap.mmap(-1, total)
    anon.write(b"\1" * 4096)
    addr = np.frombuffer(anon, dtype=np.uint8).ctypes.data
    np.frombuffer(anon, dtype=np.uint8)[::4096] = 1  # touch every page

    def reg() -> None:
        rt.hostRegister(addr, total, 0)
        rt.hostUnregister(addr)

    s = timed(reg, 3)
    print(f"hostRegister+Unregister of {total / 1e9:.2f} GB touched: {s * 1000:.1f} ms")

    pinned = cp.cuda.alloc_pinned_memory(total)
    src = np.frombuffer(pinned, dtype=np.uint8, count=total)
    src[::4096] = 1
    src_addr = src.ctypes.data
    streams = [cp.cuda.Stream(non_blocking=True) for _ in range(4)]
    for chunk_mib in (8, 32, 128, total // MiB):
        for nstreams in (1, 2, 4):
            chunk = chunk_mib * MiB

            def copy(chunk: int = chunk, nstreams: int = nstreams) -> None:
                for i, off in enumerate(range(0, total, chunk)):
                    s = streams[i % nstreams]
                    rt.memcpyAsync(dev.ptr + off, src_addr + off, min(chunk, total - off), rt.memcpyHostToDevice, s.ptr)
                for s in streams:
                    s.synchronize()

            copy()
            sec = timed(copy, 3)
            print(f"H2D pinned chunk {chunk_mib:5d} MiB x {nstreams} streams: {total / sec / 1e9:6.2f} GB/s")
            if chunk_mib == total // MiB:
                break
    # registered anonymous memory as the source (the shm tier's path)
    rt.hostRegister(addr, total, 0)

    def copy_reg() -> None:
        for i, off in enumerate(range(0, total, 32 * MiB)):
            s = streams[i % 2]
            rt.memcpyAsync(dev.ptr + off, addr + off, 32 * MiB, rt.memcpyHostToDevice, s.ptr)
        for s in streams:
            s.synchronize()

    print(f"H2D registered mapping 32 MiB x 2 streams: {total / timed(copy_reg, 3) / 1e9:6.2f} GB/s")
    rt.hostUnregister(addr)

    if args.file:
        size = min(os.path.getsize(args.file), total) // (32 * MiB) * 32 * MiB
        with open(args.file, "rb") as f:
            while f.read(64 * MiB):
                pass
        view = memoryview(src)
        for threads in (1, 2, 4, 8, 16):

            def read(threads: int = threads) -> None:
                fd = os.open(args.file, os.O_RDONLY)
                try:

                    def one(off: int) -> None:
                        os.preadv(fd, [view[off : off + 32 * MiB]], off)

                    with ThreadPoolExecutor(threads) as pool:
                        list(pool.map(one, range(0, size, 32 * MiB)))
                finally:
                    os.close(fd)

            sec = timed(read, 3)
            print(f"page cache -> pinned, {threads:2d} threads x 32 MiB preadv: {size / sec / 1e9:6.2f} GB/s")


if __name__ == "__main__":
    main()
