"""Bring a host pool to a plan: remove the free segments it no longer needs, then fill the missing ones.

Removing comes first, so a pool that changes size (a new revision with a bigger model) gives its
memory back before it asks for more. A segment that an instance holds is never removed. It counts
toward its size's place in the plan while held, and it goes on a later pass once it is free and
still surplus. Filling faults in every page now, which costs seconds per GB: call this from a
thread, never from an event loop.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from kold.snapshot.errors import HostPoolError
from kold.snapshot.hostpool import HostPool, whole_huge_pages


@dataclass
class SyncResult:
    """What one pass did, by segment size: added, removed, and surplus left because it is held;
    `error` says why a fill stopped short (the next pass tries again)."""

    added: Counter[int] = field(default_factory=Counter)
    removed: Counter[int] = field(default_factory=Counter)
    held_surplus: Counter[int] = field(default_factory=Counter)
    error: str | None = None

    @property
    def changed(self) -> bool:
        return bool(self.added or self.removed)


def sync_pool(
    pool: HostPool,
    counts: Mapping[int, int],
    *,
    shrink: bool = True,
    on_segment: Callable[[Path], None] | None = None,
    should_stop: Callable[[], bool] = lambda: False,
) -> SyncResult:
    """Make `pool` hold `counts` (segment size -> count) segments. `shrink=False` only adds (for a
    plan made from incomplete knowledge, which must not take away what it could not see);
    `should_stop` is asked between segments, so a shutdown does not wait for a whole fill."""
    want = Counter({whole_huge_pages(size): n for size, n in counts.items() if n > 0})
    result = SyncResult()
    segments = pool.segments()
    have = Counter(s.size for s in segments)
    if shrink:
        for size in sorted(have):
            surplus = have[size] - want[size]
            for segment in (s for s in segments if s.size == size and not s.in_use):
                if surplus <= 0:
                    break
                if pool.remove(segment.path):  # False: claimed since it was listed
                    result.removed[size] += 1
                    surplus -= 1
            if surplus > 0:
                result.held_surplus[size] = surplus
    for size in sorted(want):
        for _ in range(want[size] - (have[size] - result.removed[size])):
            if should_stop():
                return result
            try:
                (made,) = pool.fill(1, size)
            except HostPoolError as exc:
                result.error = str(exc)
                return result
            result.added[size] += 1
            if on_segment is not None:
                on_segment(made)
    return result
