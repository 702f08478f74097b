"""Instance logs for `kold logs`: the last lines of a function's instances, or a stream that follows them.

Split in three: file reads (bounded, in a worker thread), a pure `LineFramer` that turns the bytes read
per instance into whole, prefixed lines, and the follow loop that polls the pool for instances and
their new output.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator

from kold.gateway.pool import InstancePool

POLL_S = 0.2  # how often a follow stream looks for new output (and new instances)
READ_MAX = 1 << 20  # bytes read per instance per look, so a flood cannot stall the loop
TAIL_WINDOW = 8 << 20  # the last lines are searched in at most this much of the file's end


def read_tail(path: str, lines: int) -> tuple[bytes, int]:
    """The file's last `lines` lines and the offset of its end (where following starts)."""
    try:
        with open(path, "rb") as f:
            end = f.seek(0, 2)
            start = max(0, end - TAIL_WINDOW)
            f.seek(start)
            data = f.read(end - start)
    except FileNotFoundError:
        return b"", 0
    if start and b"\n" in data:
        data = data[data.index(b"\n") + 1 :]  # a cut first line is not a line
    kept = data.splitlines(keepends=True)[-lines:] if lines > 0 else []
    return b"".join(kept), end


def read_from(path: str, offset: int) -> tuple[bytes, int]:
    """What was appended since `offset`; a file now shorter (truncated, replaced) is read from its start."""
    try:
        with open(path, "rb") as f:
            if f.seek(0, 2) < offset:
                offset = 0
            f.seek(offset)
            data = f.read(READ_MAX)
    except FileNotFoundError:
        return b"", offset
    return data, offset + len(data)


class LineFramer:
    """Bytes read per instance in, whole lines out (no clock, no I/O).

    A line's end may arrive in a later read: the part before it is held until then, unless it grows
    past `max_pending` (a line without end is passed on as it is rather than held forever). Once more
    than one instance has been seen, every line is prefixed `[instance id] `.
    """

    def __init__(self, max_pending: int = READ_MAX) -> None:
        self.max_pending = max_pending
        self._pending: dict[str, bytes] = {}
        self._seen: set[str] = set()

    def see(self, instance_id: str) -> None:
        self._seen.add(instance_id)

    def feed(self, reads: list[tuple[str, bytes]]) -> bytes:
        """The whole lines in one round of reads, in order, as one chunk (b"" if none)."""
        for instance_id, _ in reads:
            self.see(instance_id)
        prefix_lines = len(self._seen) > 1
        chunks: list[bytes] = []
        for instance_id, data in reads:
            buf = self._pending.pop(instance_id, b"") + data
            cut = buf.rfind(b"\n") + 1
            if not cut and len(buf) > self.max_pending:
                cut = len(buf)
            if cut < len(buf):
                self._pending[instance_id] = buf[cut:]
            if cut:
                prefix = f"[{instance_id}] ".encode() if prefix_lines else b""
                lines = buf[:cut].split(b"\n")  # the last is b"" unless the line had no end
                chunks += [prefix + line + b"\n" for line in lines[:-1]]
                chunks += [prefix + lines[-1]] if lines[-1] else []
        return b"".join(chunks)


async def follow(
    pool: InstancePool, name: str, rev_ids: frozenset[str], tail: int, stopping: threading.Event | None
) -> AsyncIterator[bytes]:
    """The function's instances' last `tail` lines, then their new output as it is appended.

    Instances started later (also of revisions deployed after the stream began: revision ids are
    `<name>-<n>`) are picked up from the pool, never from Redis, so following survives a Redis
    outage. Ends when the client disconnects (Starlette cancels this generator) or when the server
    shuts down (`stopping`, set by `kold up`): an open stream must not hold up a graceful shutdown.
    """
    skip = {i.id for i in pool.instances() if i.revision_id not in rev_ids}  # e.g. a former same-named function
    offsets: dict[str, int] = {}  # instance id -> how far its log was sent
    framer = LineFramer()

    def read(jobs: list[tuple[str, str, int | None]]) -> list[tuple[str, bytes, int]]:
        """(instance id, log path, offset or None: from the last lines) -> (id, bytes, new offset)."""
        return [(i, *(read_tail(path, tail) if at is None else read_from(path, at))) for i, path, at in jobs]

    first = True
    while stopping is None or not stopping.is_set():
        jobs: list[tuple[str, str, int | None]] = []
        alive: dict[str, bool] = {}
        for inst in pool.instances():  # on the event loop: the pool's dict is not thread-safe
            if inst.id in skip:
                continue
            if inst.revision_id not in rev_ids and inst.revision_id.rpartition("-")[0] != name:
                skip.add(inst.id)
                continue
            alive[inst.id] = inst.alive  # taken before reading: what it wrote before it stopped is read
            jobs.append((inst.id, str(inst.log_path), offsets.get(inst.id, None if first else 0)))
        first = False
        results = await asyncio.to_thread(read, jobs) if jobs else []
        for inst_id, data, end in results:
            offsets[inst_id] = end
            if not data and not alive[inst_id]:
                skip.add(inst_id)  # stopped and read to the end: never written again
        chunk = framer.feed([(inst_id, data) for inst_id, data, _ in results])
        if chunk:
            yield chunk
        await asyncio.sleep(POLL_S)
