"""`kold sim`: simulate pre-warm policies on a trace or a synthetic pattern (controller/sim), and
`kold sim generate`: write an Azure-Functions-like trace to simulate.

Thin: flags become a workload (controller/sim/inputs.py) and a SimConfig (controller/sim/model.py), the
engine runs it (controller/sim/engine.py) or the sweep does (controller/sim/pareto.py), and the result is
printed: a table for people, one JSON object with --json.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

from kold.errors import CLIError
from kold.output import note, print_json
from kold.settings import Settings

if TYPE_CHECKING:
    from tqdm import tqdm

    from kold.controller.sim.engine import SimResult
    from kold.controller.sim.inputs import Workload
    from kold.controller.sim.model import SimConfig

PATTERNS = ("constant", "poisson", "gamma", "onoff", "diurnal", "ramp", "sweep")

OUTPUTS = """
--json prints one object: policy, functions, invocations, cold_starts (requests that waited for an
instance start), cold_start_rate, queued (waited for room on a READY instance), wait_p50_s, wait_p99_s,
wait_max_s, idle_instance_seconds (alive with nothing in flight, starting and pre-warmed time included),
instance_seconds, instance_starts, simulated_s, wall_s, settings (and per_function with --per-function).
--pareto --out DIR writes points.csv (one row per policy and knob value) and pareto.png.
"""


def register(top: Any) -> None:
    from kold.controller.sim import model as m

    sim = top.add_parser(
        "sim",
        help="simulate pre-warm policies on a trace: cold starts against idle cost",
        description="A discrete-event simulation that runs the platform's own scaling decider and pre-warm "
        "policies on a trace or a synthetic pattern. " + OUTPUTS,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    source = sim.add_argument_group("arrivals (a trace, or a synthetic pattern)")
    source.add_argument("--trace", type=Path, help="azure-functions per-minute CSV, azure-llm CSV or mooncake JSONL")
    source.add_argument("--trace-format", choices=("azure-llm", "azure-functions", "mooncake"))
    source.add_argument("--speedup", type=float, default=1.0, help="trace: this many times faster")
    source.add_argument("--limit", type=int, help="trace: at most this many requests")
    source.add_argument("--start", type=float, default=0.0, help="trace: skip its first S seconds")
    source.add_argument("--pattern", choices=PATTERNS, help="a synthetic pattern, as `kold loadgen run`'s")
    source.add_argument("--functions", help="pattern: function names a,b,c (requests dealt round-robin)")
    source.add_argument("--rate", type=float, help="pattern: requests/s")
    source.add_argument("--duration", type=float, help="pattern: seconds of traffic")
    source.add_argument("--count", type=int, help="pattern: number of requests")
    source.add_argument("--burstiness", type=float)
    source.add_argument("--on-s", type=float)
    source.add_argument("--off-s", type=float)
    source.add_argument("--period-s", type=float)
    source.add_argument("--amplitude", type=float)
    source.add_argument("--rate-to", type=float)
    source.add_argument(
        "--prompt-tokens", help="pattern: token shape (as loadgen's); with it, service time from tokens"
    )
    source.add_argument("--max-tokens", help="pattern: output token shape")
    source.add_argument("--seed", type=int, default=0, help="spreads per-minute counts and draws patterns")

    what = sim.add_argument_group("policy")
    what.add_argument("--policy", help="NAME or NAME:knob=value (default: the platform's default policy)")
    what.add_argument("--pareto", action="store_true", help="sweep every policy's knob; needs --out")
    what.add_argument("--policies", help="--pareto: only these policies (a,b)")
    what.add_argument("--jobs", type=int, default=1, help="--pareto: simulations run at once (processes)")
    what.add_argument("--out", type=Path, help="--pareto: folder for points.csv and pareto.png")

    model = sim.add_argument_group("platform model")
    model.add_argument("--min-instances", type=int, default=0)
    model.add_argument("--max-instances", type=int, default=100)
    model.add_argument("--target-concurrency", type=int, default=4, help="requests per instance the scaler aims at")
    model.add_argument("--concurrency", type=int, help="requests one instance serves at once (default: the target)")
    model.add_argument("--idle-timeout", type=float, default=60.0, help="seconds an idle instance is kept")
    model.add_argument(
        "--start-s", type=float, help=f"fixed part of an instance start, s (default {m.DEFAULT_START_S})"
    )
    model.add_argument("--restore-gbps", type=float, help=f"restore bandwidth, GB/s (default {m.DEFAULT_RESTORE_GBPS})")
    model.add_argument("--snapshot-gb", type=float, help=f"snapshot size, GB (default {m.DEFAULT_SNAPSHOT_GB})")
    model.add_argument(
        "--service-time",
        type=float,
        help=f"seconds a request runs without token counts (default {m.DEFAULT_SERVICE_S})",
    )
    model.add_argument("--prefill-tps", type=float, help=f"prompt tokens/s (default {m.DEFAULT_PREFILL_TPS:g})")
    model.add_argument(
        "--decode-tps", type=float, help=f"output tokens/s per request (default {m.DEFAULT_DECODE_TPS:g})"
    )

    sim.add_argument("--json", action="store_true", help="one JSON object (--pareto: the points)")
    sim.add_argument("--per-function", action="store_true", help="--json: each function's figures too")
    sim.add_argument("--no-progress", action="store_true")
    sim.set_defaults(handler=cmd_sim)

    sub = sim.add_subparsers(dest="sim_command", metavar="SUBCOMMAND")
    gen = sub.add_parser(
        "generate",
        help="write an Azure-Functions-like trace (timers, diurnal HTTP, bursty, rare), seeded",
        description="Writes the azure-functions per-minute CSV (HashOwner,HashApp,HashFunction,Trigger,1..N).",
    )
    gen.add_argument("--out", type=Path, required=True, help="the CSV to write")
    gen.add_argument("--functions", type=int, default=1000)
    gen.add_argument("--days", type=int, default=1, help="days of minutes (1440 columns each)")
    gen.add_argument("--seed", type=int, default=0)
    gen.set_defaults(handler=cmd_generate)


# -- generate -----------------------------------------------------------------------------------------


def cmd_generate(args: argparse.Namespace, settings: Settings) -> int:
    from kold.controller.sim.generate import KINDS, generate, write_csv

    out: Path = args.out
    if out.is_dir():
        raise CLIError(f"{out} is a directory: give a file name for the trace")
    functions = generate(args.functions, args.seed, args.days)
    write_csv(out, functions)
    by_kind = {kind: [f for f in functions if f.kind == kind] for kind in KINDS}
    parts = ", ".join(
        f"{len(fs)} {kind} ({sum(int(f.counts.sum()) for f in fs):,} calls)" for kind, fs in by_kind.items() if fs
    )
    total = sum(int(f.counts.sum()) for f in functions)
    note(f"wrote {out}: {len(functions)} functions over {args.days} day(s), {total:,} invocations: {parts}")
    return 0


# -- sim ----------------------------------------------------------------------------------------------


def cmd_sim(args: argparse.Namespace, settings: Settings) -> int:
    from kold.controller.policies.registry import DEFAULT_POLICY, make_policy
    from kold.controller.sim.engine import simulate

    if args.pareto and args.policy:
        raise CLIError("--pareto sweeps every policy: leave out --policy (or pick them with --policies)")
    if args.pareto and args.out is None:
        raise CLIError("--pareto needs --out DIR (for points.csv and pareto.png)")
    if not args.pareto and (args.out is not None or args.policies):
        raise CLIError("--out and --policies go with --pareto")
    if args.jobs < 1:
        raise CLIError(f"--jobs: must be at least 1 (got {args.jobs})")
    config = _config(args)
    policy_text = args.policy or DEFAULT_POLICY
    policy = None if args.pareto else make_policy(policy_text)  # a bad spec fails before the trace is read
    workload = _workload(args)
    if not workload.arrivals:
        raise CLIError(f"{workload.source}: no requests to simulate")
    config = _with_end(config, workload.end_s)
    if args.pareto:
        return _pareto(args, workload, config)
    assert policy is not None
    with _Bar(len(workload.arrivals), policy_text, enabled=not args.no_progress) as bar:
        result = simulate(workload.arrivals, policy, config, label=policy_text, progress=bar.update)
    data = result.to_dict(per_function=args.per_function) | {"settings": _settings(workload, config)}
    if args.json:
        print_json(data)
    else:
        _print_table(result, workload, config)
    return 0


def _config(args: argparse.Namespace) -> SimConfig:
    from kold.controller.sim.model import CostModel, ServiceModel, SimConfig, SimSpec

    def given(**kw: float | None) -> dict[str, float]:
        return {k: v for k, v in kw.items() if v is not None}

    try:
        spec = SimSpec(
            min_instances=args.min_instances,
            max_instances=args.max_instances,
            target_concurrency=args.target_concurrency,
            idle_timeout_s=args.idle_timeout,
        )
        costs = CostModel(**given(fixed_s=args.start_s, restore_gbps=args.restore_gbps, snapshot_gb=args.snapshot_gb))
        service = ServiceModel(
            **given(service_s=args.service_time, prefill_tps=args.prefill_tps, decode_tps=args.decode_tps)
        )
        return SimConfig(spec=spec, costs=costs, service=service, concurrency=args.concurrency)
    except ValueError as exc:
        name, _, problem = str(exc).partition(": ")
        raise CLIError(f"{_FLAGS.get(name, name)}: {problem}" if problem else str(exc)) from None


# the model's names for what the flags set, as its errors name them
_FLAGS = {
    "min_instances": "--min-instances",
    "max_instances": "--max-instances",
    "target_concurrency": "--target-concurrency",
    "idle_timeout_s": "--idle-timeout",
    "start_s": "--start-s",
    "restore_gbps": "--restore-gbps",
    "snapshot_gb": "--snapshot-gb",
    "service_time": "--service-time",
    "prefill_tps": "--prefill-tps",
    "decode_tps": "--decode-tps",
    "concurrency": "--concurrency",
}


def _with_end(config: SimConfig, end_s: float | None) -> SimConfig:
    from dataclasses import replace

    return replace(config, end_s=end_s)


def _workload(args: argparse.Namespace) -> Workload:
    from kold.controller.sim.inputs import from_pattern, from_trace

    if (args.trace is None) == (args.pattern is None):
        raise CLIError("give the arrivals: --trace FILE or --pattern NAME (one of them)")
    if args.trace is not None:
        pattern_flags = ("functions", "rate", "duration", "count", "burstiness", "on_s", "off_s", "period_s")
        extra = [
            f"--{f.replace('_', '-')}"
            for f in (*pattern_flags, "amplitude", "rate_to", "prompt_tokens", "max_tokens")
            if getattr(args, f) is not None
        ]
        if extra:
            raise CLIError(f"{', '.join(extra)}: pattern options, not for a --trace")
        return from_trace(
            args.trace,
            fmt=args.trace_format,
            seed=args.seed,
            speedup=args.speedup,
            limit=args.limit,
            start_s=args.start,
        )
    from kold.commands.loadgen import pattern_spec
    from kold.loadgen.shapes import parse_shape
    from kold.loadgen.traces import parse_functions

    spec = pattern_spec(args)
    names = parse_functions(args.functions) if args.functions else []
    if isinstance(names, dict):
        raise CLIError("--functions: a pattern takes a list of names, not a mapping")
    prompt = parse_shape(args.prompt_tokens) if args.prompt_tokens else None
    output = parse_shape(args.max_tokens) if args.max_tokens else None
    return from_pattern(spec, names, seed=args.seed, prompt=prompt, output=output)


def _settings(workload: Workload, config: SimConfig) -> dict[str, Any]:
    spec, costs, service = config.spec, config.costs, config.service
    return {
        "source": workload.source,
        "end_s": workload.end_s,
        "min_instances": spec.min_instances,
        "max_instances": spec.max_instances,
        "target_concurrency": spec.target_concurrency,
        "concurrency": config.instance_concurrency,
        "idle_timeout_s": spec.idle_timeout_s,
        "start_s": round(costs.start_s, 6),
        "start_fixed_s": costs.fixed_s,
        "restore_gbps": costs.restore_gbps,
        "snapshot_gb": costs.snapshot_gb,
        "service_time_s": service.service_s,
        "prefill_tps": service.prefill_tps,
        "decode_tps": service.decode_tps,
    }


def _print_table(result: SimResult, workload: Workload, config: SimConfig) -> None:
    r = result
    idle_share = r.idle_instance_seconds / r.instance_seconds if r.instance_seconds else 0.0
    rows = [
        ("policy", r.policy),
        ("arrivals", workload.source),
        ("functions", f"{r.functions:,}"),
        ("invocations", f"{r.invocations:,}"),
        ("cold starts", f"{r.cold_starts:,} ({100 * r.cold_start_rate:.2f}%)"),
        ("queued (warm, no room)", f"{r.queued:,}"),
        ("wait p50 / p99 / max", f"{r.wait_p50_s:.3f} / {r.wait_p99_s:.3f} / {r.wait_max_s:.3f} s"),
        ("instance starts", f"{r.instance_starts:,} ({config.costs.start_s:.3f} s each)"),
        ("instance-seconds", f"{r.instance_seconds:,.0f} ({r.instance_seconds / 3600:,.1f} h)"),
        ("idle instance-seconds", f"{r.idle_instance_seconds:,.0f} ({100 * idle_share:.1f}% of them)"),
        ("simulated", f"{r.simulated_s:,.0f} s in {r.wall_s:.1f} s"),
    ]
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")


# -- pareto -------------------------------------------------------------------------------------------


def _pareto(args: argparse.Namespace, workload: Workload, config: SimConfig) -> int:
    from kold.controller.sim.pareto import COLUMNS, Point, plot, sweep, sweep_specs, write_csv

    policies = [p.strip() for p in args.policies.split(",")] if args.policies else None
    specs = sweep_specs(policies)
    out: Path = args.out
    if out.exists() and not out.is_dir():
        raise CLIError(f"{out} exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)
    show = not args.no_progress
    began = time.perf_counter()

    def on_point(k: int, n: int, point: Point) -> None:
        if show:
            r = point.result
            note(
                f"[{k}/{n}] {r.policy}: {r.cold_starts:,} cold starts, "
                f"{r.idle_instance_seconds / 3600:,.1f} idle instance-h ({r.wall_s:.1f} s)"
            )

    if show:
        note(f"{len(specs)} simulations of {len(workload.arrivals):,} arrivals, {args.jobs} at a time")
    bar = _Bar(len(workload.arrivals), "", enabled=show and args.jobs == 1)
    with bar:
        points = sweep(
            workload.arrivals,
            config,
            policies=policies,
            jobs=args.jobs,
            on_point=on_point,
            progress=bar.update if args.jobs == 1 else None,
        )
    write_csv(out / "points.csv", points)
    plot(out / "pareto.png", points, title=f"{workload.source}: {len(workload.arrivals):,} invocations")
    if args.json:
        print_json({"points": [p.row() for p in points], "settings": _settings(workload, config)})
    else:
        shown = [c for c in COLUMNS if c not in ("spec", "wall_s")]
        rows = [[_cell(p.row()[c]) for c in shown] for p in points]
        widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(shown)]
        print("  ".join(c.ljust(w) for c, w in zip(shown, widths, strict=True)))
        for row in rows:
            print("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)))
    note(f"wrote {out / 'points.csv'} and {out / 'pareto.png'} ({time.perf_counter() - began:.1f} s)")
    return 0


def _cell(value: object) -> str:
    if isinstance(value, float):
        return f"{value:,.4g}" if abs(value) < 1000 else f"{value:,.0f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


class _Bar:
    """Progress over the arrivals of one run: a tqdm bar on a terminal, a line every few seconds otherwise,
    nothing when disabled. Reset when a new run starts (the count goes back to 0)."""

    def __init__(self, total: int, label: str, *, enabled: bool, interval_s: float = 5.0) -> None:
        self.total = total
        self.label = label
        self.enabled = enabled
        self.tty = sys.stderr.isatty()
        self.interval_s = interval_s
        self._bar: tqdm[Any] | None = None
        self._last = time.monotonic()

    def update(self, done: int, total: int) -> None:
        if not self.enabled:
            return
        if self.tty:
            from tqdm import tqdm

            if self._bar is None or done < self._bar.n:
                self.close()
                self._bar = tqdm(total=total, unit="req", unit_scale=True, desc=self.label or None, leave=False)
            self._bar.update(done - self._bar.n)
            return
        now = time.monotonic()
        if done and done < total and now - self._last >= self.interval_s:
            self._last = now
            note(f"simulated {done:,}/{total:,} arrivals ({100 * done / total:.0f}%)")

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> _Bar:
        return self

    def __exit__(self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self.close()
