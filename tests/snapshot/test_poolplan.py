"""The host pool planner: which segments a node keeps for the functions it serves, within its budget."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from kold.snapshot.poolplan import PoolDemand, plan_pool, pool_limit

MiB = 1 << 20
GiB = 1 << 30
NODE = 64 * GiB  # plenty, unless a case says otherwise


@dataclass(frozen=True)
class Case:
    name: str
    demands: tuple[PoolDemand, ...]
    budget: int
    want: dict[int, int]  # segment size -> count
    node: int = NODE
    shm_tier: int = 0
    short: tuple[str, ...] = ()  # words each shortfall note contains, in order


def fn(name: str, size: int, max_instances: int = 1, device: str = "cpu") -> PoolDemand:
    return PoolDemand(name, size, max_instances, device)


CASES = [
    Case("no functions, no segments", (), 8 * GiB, {}),
    Case(
        "a function gets one segment per instance it may run, rounded up to whole huge pages",
        (fn("tiny", 3 * MiB, max_instances=3),),
        8 * GiB,
        {4 * MiB: 3},
    ),
    Case(
        "functions whose snapshots round to the same size share one group",
        (fn("a", 1 * MiB, 2), fn("b", 2 * MiB, 1)),
        8 * GiB,
        {2 * MiB: 3},
    ),
    Case("a GPU function gets no host segments", (fn("gpu", 2 * GiB, 4, "cuda:0"),), 8 * GiB, {}),
    Case(
        "every function gets its first segment before any gets a second",
        (fn("big", 4 * MiB, 4), fn("small", 2 * MiB, 4)),
        12 * MiB,
        {2 * MiB: 2, 4 * MiB: 2},
        short=("small: 2 of 4", "big: 2 of 4"),
    ),
    Case(
        "within a round the smaller snapshot goes first, so the budget covers as many functions as it can",
        (fn("big", 8 * MiB, 1), fn("small", 2 * MiB, 1)),
        8 * MiB,
        {2 * MiB: 1},
        short=("big: no segment; its 8.0 MiB snapshot does not fit",),
    ),
    Case(
        "a snapshot larger than the whole budget gets nothing and says so",
        (fn("huge", 3 * GiB, 2),),
        2 * GiB,
        {},
        short=("huge: no segment; its 3.00 GiB snapshot does not fit in what is left of the 2.00 GiB budget",),
    ),
    Case(
        "a budget beyond three quarters of the node's memory is capped there",
        (fn("m", 1 * GiB, 8),),
        1024 * GiB,
        {1 * GiB: 6},
        node=8 * GiB,
        short=("m: 6 of 8 segments; the 6.00 GiB budget (capped at 3/4 of the node's memory)",),
    ),
    Case(
        "a function the shm tier can hold keeps one segment, for the restore the tier misses",
        (fn("cached", 2 * MiB, 4),),
        8 * GiB,
        {2 * MiB: 1},
        shm_tier=1 * GiB,
    ),
    Case(
        "the shm tier holds the smallest snapshots first; the others keep one segment per instance",
        (fn("large", 6 * MiB, 2), fn("small", 2 * MiB, 3)),
        8 * GiB,
        {2 * MiB: 1, 6 * MiB: 2},
        shm_tier=4 * MiB,
    ),
    Case("a zero budget plans nothing", (fn("tiny", 2 * MiB, 1),), 0, {}, short=("tiny: no segment",)),
]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_plan(case: Case) -> None:
    plan = plan_pool(case.demands, budget=case.budget, node_memory=case.node, shm_tier_bytes=case.shm_tier)
    assert plan.counts == case.want
    assert plan.total_bytes == sum(size * n for size, n in case.want.items()) <= plan.limit
    assert len(plan.short) == len(case.short), plan.short
    for note, words in zip(plan.short, case.short, strict=True):
        assert words in note, note


def test_a_plan_names_the_functions_of_each_size_and_ignores_the_order_it_was_given() -> None:
    demands = [fn("b", 2 * MiB, 1), fn("a", 2 * MiB, 1), fn("c", 4 * MiB, 1)]
    forward = plan_pool(demands, budget=GiB, node_memory=NODE)
    backward = plan_pool(reversed(demands), budget=GiB, node_memory=NODE)
    assert forward == backward
    assert [(g.size, g.functions) for g in forward.groups] == [(2 * MiB, ("a", "b")), (4 * MiB, ("c",))]


def test_the_limit_is_whole_huge_pages() -> None:
    assert pool_limit(5 * MiB + 1, NODE) == 4 * MiB
    assert pool_limit(GiB, 1 * MiB) == 0  # 3/4 of 1 MiB is less than one huge page
