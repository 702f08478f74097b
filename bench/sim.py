"""`kold sim` at scale: 1 million invocations over 1,000 functions, under 60 s on the 2-core machine
(issue 13's target), per policy.

It generates an Azure-Functions-like day (controller/sim/generate.py: ~1 M invocations for 1,000 functions
a day), writes it as the per-minute CSV, reads it back with the simulator's input code (the load generator's
trace reader: every minute's count spread over the minute) and simulates it once per policy. Reported per
policy: reading (the CSV to arrivals), simulating, and their sum against the target; and the outcome
(cold starts, idle instance-hours) so that a speed-up that changed the result shows. Results go to
bench/out/sim/sim.json. `--profile POLICY` prints where a run's time goes (cProfile, top 25).

    flock /tmp/kold-bench.lock .venv/bin/python bench/sim.py
    .venv/bin/python bench/sim.py --functions 100 --policies knative-default   # a quick check that it runs
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import platform
import pstats
import sys
import time
from pathlib import Path
from typing import Any

from common import log

from kold.controller.policies.registry import POLICIES, make_policy
from kold.controller.sim.engine import simulate
from kold.controller.sim.generate import generate, write_csv
from kold.controller.sim.inputs import from_trace
from kold.controller.sim.model import SimConfig

OUT = Path(__file__).resolve().parent / "out" / "sim"
TARGET_S = 60.0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--functions", type=int, default=1000)
    ap.add_argument("--days", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--policies", default=",".join(POLICIES), help="comma-separated policy specs")
    ap.add_argument("--profile", metavar="POLICY", help="profile this policy's run instead")
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()

    args.out.mkdir(parents=True, exist_ok=True)
    trace = args.out / f"day-{args.functions}x{args.days}-seed{args.seed}.csv"
    t0 = time.perf_counter()
    functions = generate(args.functions, args.seed, args.days)
    write_csv(trace, functions)
    log(f"generated {trace.name}: {sum(int(f.counts.sum()) for f in functions):,} invocations "
        f"({time.perf_counter() - t0:.1f} s)")  # fmt: skip

    t0 = time.perf_counter()
    workload = from_trace(trace, seed=args.seed)
    read_s = time.perf_counter() - t0
    n = len(workload.arrivals)
    log(f"read {n:,} arrivals of {len({a.function for a in workload.arrivals}):,} functions in {read_s:.1f} s")
    config = SimConfig(end_s=workload.end_s)

    if args.profile:
        profiler = cProfile.Profile()
        profiler.enable()
        result = simulate(workload.arrivals, make_policy(args.profile), config, label=args.profile)
        profiler.disable()
        log(f"{args.profile}: {result.wall_s:.1f} s under the profiler")
        pstats.Stats(profiler, stream=sys.stdout).sort_stats("tottime").print_stats(25)
        return 0

    rows: list[dict[str, Any]] = []
    for spec in args.policies.split(","):
        result = simulate(workload.arrivals, make_policy(spec), config, label=spec)
        total = read_s + result.wall_s
        row = result.to_dict() | {"read_s": round(read_s, 3), "total_s": round(total, 3)}
        row["per_1k_invocations_ms"] = round(1000 * result.wall_s / max(1, n) * 1000, 3)
        row["target"] = "PASS" if total < TARGET_S else "FAIL"
        rows.append(row)
        log(f"{spec}: simulated in {result.wall_s:.1f} s (+ read {read_s:.1f} s = {total:.1f} s, {row['target']}); "
            f"{result.cold_starts:,} cold starts, {result.idle_instance_seconds / 3600:,.0f} idle instance-h")  # fmt: skip

    print()
    print(
        f"| policy | invocations | read s | simulate s | total s | < {TARGET_S:.0f} s | cold starts | idle instance-h |"
    )
    print("|---|---:|---:|---:|---:|---|---:|---:|")
    for r in rows:
        print(f"| {r['policy']} | {r['invocations']:,} | {r['read_s']:.1f} | {r['wall_s']:.1f} | {r['total_s']:.1f} | "
              f"{r['target']} | {r['cold_starts']:,} | {r['idle_instance_seconds'] / 3600:,.0f} |")  # fmt: skip
    report = {
        "functions": args.functions,
        "days": args.days,
        "seed": args.seed,
        "invocations": n,
        "read_s": round(read_s, 3),
        "runs": rows,
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "load": os.getloadavg()},
        "when": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
    }
    (args.out / "sim.json").write_text(json.dumps(report, indent=2))
    log(f"wrote {args.out / 'sim.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
