"""How big a node's host pool should be: segment sizes and counts from the functions it serves.

Pure: demands and limits in, a plan out (no clock, no filesystem), so every rule is a table test.

The rules, and why:
- Only CPU functions count. A GPU restore stages through a pinned ring and never claims a segment.
- A segment is the function's snapshot size in whole 2 MiB pages (a restore claims the smallest
  free segment that fits, and huge pages are what make claiming one cheap).
- A function wants one segment per instance it may run (`max_instances`): a running instance keeps
  its segment for its life, because its tensors are views of it.
- A function that the shm cache tier can hold wants one. After its first restore, its instances map
  the tier's copy and claim no segment. The one segment serves that first restore and any restore
  after an eviction. The tier holds the smallest snapshots first, as far as its size allows.
- The budget is shared out in rounds: every function gets its first segment before any function
  gets a second. Scaling from zero is the cold start that users wait for most, and a second
  segment only helps a second instance that starts while the first still runs. Within a round,
  smaller snapshots go first, so the budget covers as many functions as it can.
- The budget is capped at three quarters of the node's memory. A pool larger than that leaves too
  little for the instances' own processes (torch, KV cache) and the kernel, whatever was configured.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from kold.snapshot.hostpool import HUGE_PAGE, whole_huge_pages

NODE_SHARE = (3, 4)  # the most of a node's memory a pool may take, whatever the budget says


@dataclass(frozen=True)
class PoolDemand:
    """One deployed function as the pool sees it: its serving revision's snapshot and scaling."""

    function: str
    snapshot_bytes: int
    max_instances: int
    device: str = "cpu"


@dataclass(frozen=True)
class SegmentGroup:
    """`count` segments of `size` bytes, for `functions`."""

    size: int
    count: int
    functions: tuple[str, ...]


@dataclass(frozen=True)
class PoolPlan:
    """What the pool should hold: groups by size (smallest first), the limit it was planned within,
    and one sentence for each function that got fewer segments than it wanted."""

    groups: tuple[SegmentGroup, ...]
    limit: int
    short: tuple[str, ...] = ()

    @property
    def total_bytes(self) -> int:
        return sum(g.size * g.count for g in self.groups)

    @property
    def counts(self) -> dict[int, int]:
        """Segment size -> count, the form the reconciler applies."""
        return {g.size: g.count for g in self.groups}


def pool_limit(budget: int, node_memory: int) -> int:
    """The most a pool may hold: `budget`, capped at NODE_SHARE of `node_memory`, in whole huge pages
    (a segment is whole huge pages, so the rest could never be used)."""
    limit = max(0, min(budget, node_memory * NODE_SHARE[0] // NODE_SHARE[1]))
    return limit // HUGE_PAGE * HUGE_PAGE


def plan_pool(demands: Iterable[PoolDemand], *, budget: int, node_memory: int, shm_tier_bytes: int = 0) -> PoolPlan:
    """The segments a node's pool should hold for `demands`, within `budget` bytes (capped at
    NODE_SHARE of `node_memory`); `shm_tier_bytes` is the shm cache tier's size (0: no tier)."""
    limit = pool_limit(budget, node_memory)
    cpu = sorted(
        (d for d in demands if d.device == "cpu" and d.max_instances > 0),
        key=lambda d: (whole_huge_pages(d.snapshot_bytes), d.function),
    )
    wanted: dict[str, int] = {}
    cached = 0
    for d in cpu:  # smallest first: the tier holds as many snapshots as its size allows
        cached += d.snapshot_bytes
        wanted[d.function] = 1 if cached <= shm_tier_bytes else d.max_instances

    given = dict.fromkeys(wanted, 0)
    left = limit
    for round_ in range(1, max(wanted.values(), default=0) + 1):
        for d in cpu:
            size = whole_huge_pages(d.snapshot_bytes)
            if wanted[d.function] >= round_ and size <= left:
                given[d.function] += 1
                left -= size

    by_size: dict[int, tuple[int, list[str]]] = {}
    short = []
    for d in cpu:
        size = whole_huge_pages(d.snapshot_bytes)
        if given[d.function]:
            count, names = by_size.get(size, (0, []))
            by_size[size] = (count + given[d.function], [*names, d.function])
        if given[d.function] < wanted[d.function]:
            short.append(_shortfall(d.function, size, given[d.function], wanted[d.function], limit, budget))
    groups = tuple(SegmentGroup(size, count, tuple(names)) for size, (count, names) in sorted(by_size.items()))
    return PoolPlan(groups, limit, tuple(short))


def _shortfall(function: str, size: int, given: int, wanted: int, limit: int, budget: int) -> str:
    capped = " (capped at 3/4 of the node's memory)" if limit < budget // HUGE_PAGE * HUGE_PAGE else ""
    if given == 0:
        return f"{function}: no segment; its {_gib(size)} snapshot does not fit in what is left of the {_gib(limit)} budget{capped}"
    return f"{function}: {given} of {wanted} segments; the {_gib(limit)} budget{capped} is spent"


def _gib(n: int) -> str:
    return f"{n / (1 << 30):.2f} GiB" if n >= 1 << 30 else f"{n / (1 << 20):.1f} MiB"
