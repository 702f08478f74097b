"""The mover: reader threads pull chunks, read them into the destination, verify, commit.

Every chunk is independent: a shared queue hands chunk indices to N readers (work stealing, so a
slow range does not stall one reader's fixed share). A chunk that fails its checksum or comes up
short is fetched once more from the source store (the fallback reader); only if that copy is bad
too does the restore fail, naming the chunk. Cancellation is checked per chunk; the first error
cancels the rest.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from kold.snapshot.checksum import chunk_hasher
from kold.snapshot.devices import Destination
from kold.snapshot.errors import ChunkCorruptedError, ChunkTruncatedError, RestoreCancelledError
from kold.snapshot.manifest import ChunkEntry
from kold.snapshot.plan import RestorePlan
from kold.snapshot.store import ObjectReader

# Local reads go in pieces of this size, each hashed right after its read. Every piece costs its reader
# two trips through the GIL (the read and the hash each release it), and each trip waits for whatever
# else holds the GIL. In a fresh runtime that is torch's import, which runs beside the restore.
# Measured on the 1b model (2.2 GB, 2 cores, cold page cache), beside the import: the restore took
# 0.6-0.7 s in 4 MiB pieces and 0.36-0.5 s in 32 MiB ones (one per default chunk) with the host pool,
# and 1.3-1.5 s against 0.44-0.55 s without it. Beside a thread spinning in Python, the fetch took
# 4.1 s against 0.9 s (0.3 s with no other thread). Alone, the big pieces cost the hot restore into the
# host pool ~6 ms (0.097 s against 0.091 s: hashing a piece still in the CPU cache, which small
# pieces were for) and nothing measurable elsewhere. Remote reads stay one request per chunk.
LOCAL_PIECE_SIZE = 32 << 20


@dataclass
class ReadSource:
    """A reader, the name of the tier behind it ("shm", "disk", "store"), and its read granularity."""

    reader: ObjectReader
    tier: str
    piece_size: int = 0  # 0: read each chunk in one request


@dataclass
class PipelineStats:
    fetch_s: float = 0.0  # wall time from the first read's start to the last commit
    read_s: float = 0.0  # summed over readers (overlaps: can exceed fetch_s)
    verify_s: float = 0.0  # summed over readers
    bytes_by_tier: dict[str, int] = field(default_factory=dict)
    refetched: list[int] = field(default_factory=list)  # chunks that had to be fetched again
    corrupt_in_primary: bool = False


def run_pipeline(
    plan: RestorePlan,
    snapshot_id: str,
    primary: ReadSource,
    dest: Destination,
    *,
    fallback: ReadSource | None = None,
    verify: bool = True,
    cancel: threading.Event | None = None,
    on_chunk: Callable[[ChunkEntry], None] | None = None,
) -> PipelineStats:
    stats = PipelineStats()
    work: queue.SimpleQueue[ChunkEntry] = queue.SimpleQueue()
    for chunk in plan.chunks:
        work.put(chunk)
    stop = threading.Event()
    errors: list[BaseException] = []
    lock = threading.Lock()
    retry_source = fallback or primary

    def fetch(source: ReadSource, chunk: ChunkEntry, view: memoryview) -> tuple[bool, str]:
        """Read and check one chunk, piece by piece; returns (ok, why not)."""
        piece = source.piece_size or chunk.size
        hasher = chunk_hasher() if verify else None
        read_s = verify_s = 0.0
        got = 0
        for start in range(0, chunk.size, piece):
            part = view[start : start + piece]
            t0 = time.perf_counter()
            n = source.reader.read_into(chunk.offset + start, part)
            t1 = time.perf_counter()
            read_s += t1 - t0
            got += n
            if n < len(part):
                break
            if hasher is not None:
                hasher.update(part)
                verify_s += time.perf_counter() - t1
        with lock:
            stats.read_s += read_s
            stats.verify_s += verify_s
            stats.bytes_by_tier[source.tier] = stats.bytes_by_tier.get(source.tier, 0) + got
        if got < chunk.size:
            return False, f"short read: {got} of {chunk.size} bytes (the data object ends early)"
        if hasher is not None and hasher.hexdigest() != chunk.checksum:
            return False, "checksum mismatch"
        return True, ""

    def worker() -> None:
        while not stop.is_set():
            if cancel is not None and cancel.is_set():
                raise RestoreCancelledError(f"restore of snapshot {snapshot_id} was cancelled")
            try:
                chunk = work.get_nowait()
            except queue.Empty:
                return
            view = dest.acquire(chunk)
            try:
                ok, why = fetch(primary, chunk, view)
                if not ok:
                    with lock:
                        stats.refetched.append(chunk.index)
                        stats.corrupt_in_primary |= fallback is not None
                    ok, why_again = fetch(retry_source, chunk, view)
                    if not ok:
                        kind = ChunkTruncatedError if why_again.startswith("short read") else ChunkCorruptedError
                        raise kind(
                            f"snapshot {snapshot_id}: chunk {chunk.index} (bytes {chunk.offset}..{chunk.end}) is "
                            f"bad from {primary.tier} ({why}) and again from {retry_source.tier} ({why_again})"
                        )
            except BaseException:
                dest.abandon(chunk, view)
                raise
            dest.commit(chunk, view)
            if on_chunk is not None:
                on_chunk(chunk)

    def guarded() -> None:
        try:
            worker()
        except BaseException as exc:
            with lock:
                errors.append(exc)
            stop.set()

    started = time.perf_counter()
    threads = [threading.Thread(target=guarded, name=f"kold-read{i}", daemon=True) for i in range(plan.readers - 1)]
    for t in threads:
        t.start()
    guarded()  # the calling thread is a reader too: one thread fewer to start on the cold path
    for t in threads:
        t.join()
    stats.fetch_s = time.perf_counter() - started
    if errors:
        raise errors[0]
    return stats
