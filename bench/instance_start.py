"""Instance start: the pool forking an instance from its fork template against spawning a fresh one.

Two `InstancePool`s side by side, one per start method, on the same snapshot (a local store, cache
tiers off, the page cache warm: what differs is only how the process starts):
- `spawn`:         `python -m kold runtime serve ...` as a fresh subprocess (imports torch and the runtime);
- `fork-template`: forked from the pool's template, which imported them once (started and made ready
                   before the runs; its one-time start is reported apart).

Per instance, from `pool.start()`: when it returns (the process exists), when `wait_ready` sees
/readyz turn 200, and when the first token of a one-token request sent at once (retried until the
port accepts; the runtime holds it while loading) comes back; plus the runtime's own startup
breakdown (imports, listening, torch_import phase, restore, model build, ready; ms after its
process start). Methods alternate (the order flips every run); medians over --runs.

    flock /tmp/kold-bench.lock .venv/bin/python bench/instance_start.py --sizes tiny,1b --runs 5
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import httpx
from coldstart import prepare  # the models and their snapshots, built once under bench/out/coldstart
from common import log

from kold.gateway.pool import Instance, InstancePool, StartMethod

OUT = Path(__file__).resolve().parent / "out" / "instance_start"
METHODS: tuple[StartMethod, ...] = ("spawn", "fork-template")
PROMPT = "The weights of a cold function"


class _Runtime:
    device = "cpu"
    max_batch = 4
    max_seq_len: int | None = 256


class _Revision:
    def __init__(self, revision_id: str, uri: str) -> None:
        self.function = "bench"
        self.revision_id = revision_id
        self.snapshot_uri = uri
        self.runtime = _Runtime()


async def first_token(
    http: httpx.AsyncClient, inst: Instance, started: float, timeout_s: float, headers: dict[str, str]
) -> float:
    """Seconds from `started` to the first token of a one-token request sent as soon as the port accepts."""
    body = {"model": "bench", "prompt": PROMPT, "max_tokens": 1}
    deadline = started + timeout_s
    while True:
        try:
            r = await http.post(f"{inst.url}/v1/completions", json=body, timeout=timeout_s, headers=headers)
            if r.status_code != 200:
                raise RuntimeError(f"instance answered {r.status_code}: {r.text[:300]}")
            return time.perf_counter() - started
        except httpx.ConnectError:
            if time.perf_counter() > deadline or not inst.alive:
                raise RuntimeError(f"instance {inst.id} did not come up") from None
            await asyncio.sleep(0.005)


async def one(pool: InstancePool, http: httpx.AsyncClient, revision: _Revision) -> dict[str, Any]:
    started = time.perf_counter()
    inst = await pool.start(revision)
    launched = time.perf_counter() - started

    async def ready() -> float:
        if not await pool.wait_ready(inst, 300):
            raise RuntimeError(f"instance {inst.id} not ready: {pool.read_log(inst, 20)}")
        return time.perf_counter() - started

    try:
        ready_s, first_s = await asyncio.gather(ready(), first_token(http, inst, started, 300, pool.instance_headers))
    finally:
        await pool.stop(inst, drain_timeout_s=30)
    cold = inst.cold_start or {}
    phases = cold.get("phases_ms") or {}
    return {
        "start_method": inst.start_method,
        "launch_ms": launched * 1000,
        "ready_ms": ready_s * 1000,
        "first_token_ms": first_s * 1000,
        "rt_imports_ms": cold.get("imports_ms"),
        "rt_listening_ms": cold.get("listening_ms"),
        "rt_ready_ms": cold.get("ready_ms"),
        "rt_torch_import_ms": phases.get("torch_import"),
        "rt_restore_ms": phases.get("restore"),
        "rt_model_ms": phases.get("model"),
    }


async def run_size(size: str, runs: int) -> dict[str, Any]:
    _, uri = prepare(size)
    env = {
        **os.environ,
        "KOLD_HOME": str(OUT / size / "home"),
        "KOLD_CACHE_SHM_BYTES": "0",
        "KOLD_CACHE_DISK_BYTES": "0",
    }
    pools = {m: InstancePool(OUT / size / f"logs-{m}", env=env, start_method=m) for m in METHODS}
    rows: dict[str, list[dict[str, Any]]] = {m: [] for m in METHODS}
    try:
        t = time.perf_counter()
        if not await pools["fork-template"].warm_template():
            raise RuntimeError(f"the fork template did not start: see {OUT / size / 'logs-fork-template'}")
        template_s = time.perf_counter() - t
        log(f"{size}: fork template ready in {template_s:.2f} s (once per pool)")
        async with httpx.AsyncClient(trust_env=False) as http:
            for run in range(1, runs + 1):
                order = METHODS if run % 2 else METHODS[::-1]
                for method in order:
                    row = await one(pools[method], http, _Revision(f"{size}-{method.split('-')[0]}", uri))
                    if row["start_method"] != method:
                        raise RuntimeError(f"{method} pool started an instance by {row['start_method']}")
                    rows[method].append(row)
                    log(
                        f"{size:<4} {method:<13} run {run}/{runs}: ready {row['ready_ms']:.0f} ms, "
                        f"first token {row['first_token_ms']:.0f} ms (runtime imports {row['rt_imports_ms']} ms)"
                    )
    finally:
        await asyncio.gather(*(p.close(drain_timeout_s=10) for p in pools.values()))
    return {"template_start_ms": template_s * 1000, "runs": rows}


COLUMNS = (
    ("launch_ms", "launch"),
    ("ready_ms", "READY"),
    ("first_token_ms", "1st token"),
    ("rt_imports_ms", "rt imports"),
    ("rt_listening_ms", "rt listen"),
    ("rt_torch_import_ms", "rt torch"),
    ("rt_restore_ms", "rt restore"),
    ("rt_model_ms", "rt model"),
    ("rt_ready_ms", "rt ready"),
)


def median(rows: list[dict[str, Any]], key: str) -> float:
    values = [float(r[key]) for r in rows if r.get(key) is not None]
    return statistics.median(values) if values else float("nan")


def report(results: dict[str, dict[str, Any]]) -> None:
    print("\nmedians, ms (launch / READY / 1st token: from pool.start(); rt_*: the runtime's breakdown)")
    print(f"{'size':<5} {'method':<13} " + " ".join(f"{h:>10}" for _, h in COLUMNS))
    for size, data in results.items():
        rows = data["runs"]
        for method in METHODS:
            print(f"{size:<5} {method:<13} " + " ".join(f"{median(rows[method], k):>10.1f}" for k, _ in COLUMNS))
        ready = median(rows["spawn"], "ready_ms") / median(rows["fork-template"], "ready_ms")
        first = median(rows["spawn"], "first_token_ms") / median(rows["fork-template"], "first_token_ms")
        print(
            f"{size:<5} spawn / fork: READY {ready:.2f}x, first token {first:.2f}x "
            f"(the template's one-time start: {data['template_start_ms']:.0f} ms)"
        )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="tiny", help="comma-separated modelgen sizes (default tiny)")
    parser.add_argument("--runs", type=int, default=3, help="instances per method and size (default 3)")
    args = parser.parse_args()
    if args.runs < 1:
        parser.error("--runs must be >= 1")
    results = {size: asyncio.run(run_size(size, args.runs)) for size in args.sizes.split(",")}
    report(results)
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "instance_start.json").write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
