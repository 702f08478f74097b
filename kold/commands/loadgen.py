"""`kold loadgen run|coldstart|compare`: drive traffic at a kold gateway or any OpenAI-compatible URL and
measure it (TTFT, ITL, latency, cold starts), into a folder of results (loadgen/README.md has the schemas).

Thin: flags become a plan (loadgen/schedule.py or loadgen/traces.py), the runner sends it
(loadgen/runner.py) and the results are written (loadgen/summary.py, plots.py, report.py).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import random
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kold.errors import CLIError
from kold.output import note
from kold.settings import Settings

if TYPE_CHECKING:
    from kold.loadgen.records import RequestRecord
    from kold.loadgen.runner import RunResult
    from kold.loadgen.schedule import PatternSpec, PlannedRequest
    from kold.loadgen.target import Target

PATTERNS = ("constant", "poisson", "gamma", "onoff", "diurnal", "ramp", "sweep")

SCHEMAS = """
outputs (--out DIR):
  requests.jsonl   one object per request: function, scheduled_s, sent_s, lag_s, ttft_s, ttst_s,
                   ttft_sched_s, latency_s, latency_sched_s, itl_s (list), tpot_s, prompt_tokens,
                   completion_tokens, target_prompt_tokens, max_tokens, status, error, cold
                   (true/false/null), cold_start (the x-kold-* breakdown in ms, or null), instance, stage
  summary.json     requests, errors (by type), duration_s, throughput_rps, output_tokens_per_s,
                   ttft_s / latency_s / itl_s / tpot_s / lag_s as {p50, p90, p99, max, mean},
                   cold_starts, cold_start_rate, cold_ttft_s, warm_ttft_s, goodput (with --slo),
                   stages (sweeps), settings
  summary.csv      the same, one row per metric
  *.png            latency CDF (cold/warm), TTFT over time, instances over time, sweep curve
  report.html      self-contained: tables and plots
"""


def register(top: Any) -> None:
    lg = top.add_parser(
        "loadgen",
        help="drive traffic at a function or any OpenAI-compatible URL and measure it (cold starts included)",
        description="Traffic and measurement. " + SCHEMAS,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = lg.add_subparsers(dest="loadgen_command", required=True, metavar="SUBCOMMAND")

    from kold.commands.platform import _client_parser

    run = _client_parser(
        sub,
        "run",
        help="send a planned stream of requests and write the results",
        description="Open loop by default: requests go out on schedule whether or not earlier ones finished. "
        + SCHEMAS,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    target = run.add_argument_group("target (a kold gateway, or any OpenAI-compatible base URL)")
    target.add_argument(
        "--function",
        "--functions",
        dest="function",
        help="kold function(s): a,b,c, or a JSON/YAML file mapping a trace's functions to them; the gateway is "
        "found as for `kold ls`",
    )
    target.add_argument("--base-url", help="any OpenAI-compatible base URL (…/v1): vLLM, a Knative URL, a hosted API")
    target.add_argument("--model", help="with --base-url: the model name to send")
    target.add_argument("--api", choices=("chat", "completions"), default="chat")
    target.add_argument("--no-stream", action="store_true", help="non-streamed requests (TTFT is then the latency)")
    target.add_argument("--api-key", help="Bearer key (default for kold: KOLD_API_KEY)")
    traffic = run.add_argument_group("traffic")
    traffic.add_argument("--pattern", choices=PATTERNS, default="poisson")
    traffic.add_argument("--rate", type=float, help="requests/s (the start rate for ramp)")
    traffic.add_argument("--duration", type=float, help="seconds of traffic")
    traffic.add_argument("--count", type=int, help="number of requests")
    traffic.add_argument("--burstiness", type=float, help="gamma: 1 = Poisson, < 1 burstier (as vLLM)")
    traffic.add_argument("--on-s", type=float, help="onoff: seconds of each burst")
    traffic.add_argument("--off-s", type=float, help="onoff: seconds of each silence")
    traffic.add_argument("--period-s", type=float, help="diurnal: seconds of one period")
    traffic.add_argument("--amplitude", type=float, help="diurnal: 0..1 of the rate")
    traffic.add_argument("--rate-to", type=float, help="ramp: the rate at the end")
    traffic.add_argument("--rates", help="sweep: comma-separated rates, each held --stage-s")
    traffic.add_argument("--stage-s", type=float, help="sweep: seconds of each rate")
    traffic.add_argument("--trace", type=Path, help="replay a trace (Azure LLM / Azure Functions CSV, Mooncake JSONL)")
    traffic.add_argument("--trace-format", choices=("azure-llm", "azure-functions", "mooncake"))
    traffic.add_argument("--speedup", type=float, default=1.0, help="trace: replay this many times faster")
    traffic.add_argument("--limit", type=int, help="trace: at most this many requests")
    traffic.add_argument("--start", type=float, default=0.0, help="trace: skip its first S seconds")
    traffic.add_argument("--prompt-tokens", default="256", help="fixed, uniform:A:B, lognormal:MEAN:SIGMA, normal:M:SD")
    traffic.add_argument("--max-tokens", default="64", help="as --prompt-tokens")
    traffic.add_argument("--tokenizer", type=Path, help="a model dir: prompts of exact token counts")
    traffic.add_argument("--seed", type=int, default=0)
    drive = run.add_argument_group("how it is driven")
    drive.add_argument("--concurrency", type=int, help="closed loop: N workers, each sends when its last finished")
    drive.add_argument("--max-concurrency", type=int, help="open loop: at most N in flight")
    drive.add_argument("--timeout", type=float, default=600.0, help="seconds a request may take")
    drive.add_argument("--slo", help="e.g. ttft=2,tpot=0.1,e2e=30 (seconds): goodput")
    run.add_argument("--out", type=Path, help="results folder (default: ./loadgen-<time>)")
    run.add_argument("--no-progress", action="store_true", help="no live display")
    run.set_defaults(handler=cmd_run)

    cold = _client_parser(
        sub, "coldstart", help="force a function to zero before each of N requests; cold-start breakdown"
    )
    cold.add_argument("name")
    cold.add_argument("--n", type=int, default=10)
    cold.add_argument("--api", choices=("chat", "completions"), default="completions")
    cold.add_argument("--max-tokens", type=int, default=8)
    cold.add_argument("--out", type=Path)
    cold.set_defaults(handler=cmd_coldstart)

    cmp = sub.add_parser("compare", help="runs side by side, and overlaid CDFs")
    cmp.add_argument("runs", nargs="+", type=Path)
    cmp.add_argument("--out", type=Path, help="where the overlaid CDF plot goes")
    cmp.set_defaults(handler=cmd_compare)


# -- run ----------------------------------------------------------------------------------------------


def _target(args: argparse.Namespace, settings: Settings) -> tuple[Target, list[str]]:
    from kold.loadgen.target import Target

    if args.base_url and args.function:
        raise CLIError("give --function (a kold gateway) or --base-url with --model, not both")
    if args.base_url:
        if not args.model:
            raise CLIError("--base-url needs --model (the name the server serves)")
        try:
            return Target(args.base_url, api=args.api, stream=not args.no_stream, api_key=args.api_key), [args.model]
        except ValueError as exc:
            raise CLIError(str(exc)) from None
    if not args.function:
        raise CLIError("name the target: --function NAME (a kold gateway) or --base-url URL --model NAME")
    from kold.commands.platform import _client, _function_name
    from kold.loadgen.traces import parse_functions

    mapping = parse_functions(args.function)
    names = [_function_name(n) for n in (mapping.values() if isinstance(mapping, dict) else mapping)]
    client = _client(args, settings)
    client.request("GET", "/readyz")  # fail fast, in one line, when no platform answers
    gateway = client.base_url
    key = args.api_key or client.api_key
    target = Target(f"{gateway}/v1", api=args.api, stream=not args.no_stream, api_key=key, kold_gateway=gateway)
    return target, names


def _plan(args: argparse.Namespace, functions: list[str]) -> tuple[list[PlannedRequest], dict[str, Any]]:
    from kold.loadgen.schedule import plan
    from kold.loadgen.shapes import parse_shape

    prompt, output = parse_shape(args.prompt_tokens), parse_shape(args.max_tokens)
    if args.trace is not None:
        from kold.loadgen.traces import parse_functions, read_trace

        # a {trace function: target function} file maps a multi-function trace; names alone are dealt round-robin
        mapping = parse_functions(args.function) if args.function else functions
        planned = read_trace(
            args.trace,
            fmt=args.trace_format,
            speedup=args.speedup,
            limit=args.limit,
            start_s=args.start,
            functions=mapping,
            seed=args.seed,
            prompt=prompt,
            output=output,
        )
        return planned, {"trace": str(args.trace), "speedup": args.speedup, "limit": args.limit, "start_s": args.start}
    spec = pattern_spec(args)
    planned = plan(spec, functions, prompt, output, args.seed)
    settings = {k: v for k, v in dataclasses.asdict(spec).items() if v not in (None, ())}
    return planned, {**settings, "prompt_tokens": args.prompt_tokens, "max_tokens": args.max_tokens}


def cmd_run(args: argparse.Namespace, settings: Settings) -> int:
    """stdout: the headline table; the results folder holds everything (its path goes to stderr)."""
    from kold.loadgen.prompts import PromptFactory
    from kold.loadgen.runner import LiveCounts, RunSettings

    try:
        target, functions = _target(args, settings)
        planned, traffic = _plan(args, functions)
        run_settings = RunSettings(
            mode="closed" if args.concurrency is not None else "open",
            concurrency=args.concurrency,
            max_concurrency=args.max_concurrency,
            timeout_s=args.timeout,
        )
        slo = _slo(args.slo)
        prompts = PromptFactory(args.tokenizer)
    except (ValueError, OSError) as exc:
        raise CLIError(str(exc)) from None
    if not planned:
        raise CLIError("the plan has no requests: raise --rate, --duration or --count")
    out = args.out or Path(f"loadgen-{time.strftime('%Y%m%d-%H%M%S')}")
    out.mkdir(parents=True, exist_ok=True)
    # every prompt length is made before the run: with a tokenizer, making one encodes it several times,
    # too slow beside the send loop
    rng = random.Random(args.seed)
    lengths = sorted({r.prompt_tokens for r in planned})
    note(f"kold loadgen: making prompts of {len(lengths)} lengths ({prompts.description})")
    texts = {n: prompts.make(n, rng) for n in lengths}

    def prompt_for(request: PlannedRequest) -> str:
        return texts[request.prompt_tokens]

    counts = LiveCounts()
    note(f"kold loadgen: {len(planned)} requests to {target.url} ({run_settings.label}); results in {out}")
    if args.pattern == "sweep" and args.trace is None:
        result, saturated = _sweep(
            planned, target, run_settings, prompt_for, stage_s=args.stage_s, progress=not args.no_progress
        )
        traffic["saturated_at_rps"] = saturated
    else:
        result = _drive(planned, target, run_settings, prompt_for, counts, progress=not args.no_progress)
    described = {
        **dataclasses.asdict(run_settings),
        "driven": run_settings.label,
        "target": target.url,
        "functions": functions,
        "api": target.api,
        "stream": target.stream,
        "kold": target.kold_gateway is not None,
        "seed": args.seed,
        "prompts": prompts.description,
        "behind_schedule": result.behind_schedule,
        **traffic,
    }
    summary = _write_results(out, result, described, slo)
    print(_headline(summary, result))
    failed = [r for r in result.records if r.error is not None]
    if failed and len(failed) == len(result.records):
        example = failed[0]
        note(f"warning: every request failed, e.g. {example.error}: {example.error_detail or '-'}")
    for warning in result.warnings:
        note(f"warning: {warning}")
    return 0


def _slo(text: str | None) -> dict[str, float] | None:
    if not text:
        return None
    from kold.loadgen.summary import parse_slo

    return parse_slo(text)


def _drive(
    planned: list[PlannedRequest],
    target: Target,
    run_settings: Any,
    prompt_for: Any,
    counts: Any,
    *,
    progress: bool,
) -> RunResult:
    from kold.loadgen.runner import run

    show = progress and sys.stderr.isatty()
    if not show:
        return asyncio.run(run(planned, target, run_settings, prompt_for, live=counts))
    from kold.loadgen.progress import Progress

    with Progress(counts, label=f"{target.url} ({run_settings.label})"):
        return asyncio.run(run(planned, target, run_settings, prompt_for, live=counts))


# A sweep stage saturates the target when it completes under this share of the rate it was offered, or
# fails more than this share of its requests: later (higher) rates would only measure a queue.
SATURATED_BELOW = 0.9
SATURATED_ERRORS = 0.05


def _sweep(
    planned: list[PlannedRequest],
    target: Target,
    run_settings: Any,
    prompt_for: Any,
    *,
    stage_s: float | None,
    progress: bool,
) -> tuple[RunResult, float | None]:
    """Run a sweep stage by stage and stop after the first stage that saturates the target; the records
    keep run-relative times. Returns the merged result and the rate that saturated (None: none did)."""
    from kold.loadgen.runner import LiveCounts

    stages = sorted({r.stage for r in planned})
    merged: RunResult | None = None
    offset = 0.0
    saturated: float | None = None
    for stage in stages:
        part = [r for r in planned if r.stage == stage]
        start = min(r.at_s for r in part)
        end = max(r.at_s for r in part)
        rebased = [dataclasses.replace(r, at_s=r.at_s - start) for r in part]
        result = _drive(rebased, target, run_settings, prompt_for, LiveCounts(), progress=progress)
        for rec in result.records:
            rec.scheduled_s += offset
            rec.sent_s += offset
        span = stage_s or max(end - start, 1e-9)
        offered = len(part) / span
        done = sum(1 for rec in result.records if rec.error is None)
        # a target that keeps up finishes the stage about one request latency after its span; one that
        # does not builds a queue, and its completions stretch far past it
        achieved = done / max(result.duration_s, span)
        failed = 1 - done / len(part)
        note(f"sweep stage {stage}: offered {offered:.2f} req/s, completed {achieved:.2f} req/s, {failed:.0%} failed")
        if merged is None:
            merged = result
        else:
            merged.records += result.records
            merged.duration_s = offset + result.duration_s
            merged.behind_schedule = merged.behind_schedule or result.behind_schedule
            merged.instances += [{**s, "t_s": s.get("t_s", 0.0) + offset} for s in result.instances]
            merged.warnings += result.warnings
        offset += result.duration_s
        if achieved < SATURATED_BELOW * offered or failed > SATURATED_ERRORS:
            saturated = offered
            note(f"the target saturated at {offered:.2f} req/s: the sweep stops here")
            break
    assert merged is not None
    return merged, saturated


def _write_results(
    out: Path, result: RunResult, settings: dict[str, Any], slo: dict[str, float] | None
) -> dict[str, Any]:
    from kold.loadgen.plots import plot_all
    from kold.loadgen.records import write_jsonl
    from kold.loadgen.report import write_report
    from kold.loadgen.summary import summarize, write_summary

    write_jsonl(out / "requests.jsonl", result.records)
    summary = summarize(
        result.records, duration_s=result.duration_s, settings=settings, slo=slo, overhead=result.overhead
    )
    write_summary(out, summary)
    (out / "instances.json").write_text(json.dumps(result.instances))
    plots = plot_all(out, result.records, summary, result.instances)
    write_report(out, summary, plots)
    return summary


def _cold_starts(summary: dict[str, Any]) -> str:
    if summary.get("cold_starts") is None:
        return "- (the server sends no x-kold-* headers)"
    return f"{summary['cold_starts']} ({(summary.get('cold_start_rate') or 0) * 100:.1f}%)"


def _headline(summary: dict[str, Any], result: RunResult) -> str:
    def ms(block: Any, key: str = "p50") -> str:
        value = block.get(key) if isinstance(block, dict) else None
        return "-" if value is None else f"{value * 1000:.1f}"

    rows = [
        ("requests", str(summary.get("requests"))),
        ("errors", ", ".join(f"{k} {v}" for k, v in (summary.get("errors") or {}).items()) or "0"),
        ("throughput", f"{summary.get('throughput_rps') or 0:.2f} req/s"),
        ("output tokens", f"{summary.get('output_tokens_per_s') or 0:.1f} tok/s"),
        ("TTFT p50 / p99", f"{ms(summary.get('ttft_s'))} / {ms(summary.get('ttft_s'), 'p99')} ms"),
        ("latency p50 / p99", f"{ms(summary.get('latency_s'))} / {ms(summary.get('latency_s'), 'p99')} ms"),
        ("ITL p50", f"{ms(summary.get('itl_s'))} ms"),
        ("cold starts", _cold_starts(summary)),
        ("cold / warm TTFT p50", f"{ms(summary.get('cold_ttft_s'))} / {ms(summary.get('warm_ttft_s'))} ms"),
        ("lag p99", f"{ms(summary.get('lag_s'), 'p99')} ms" + (" (BEHIND SCHEDULE)" if result.behind_schedule else "")),
    ]
    goodput = summary.get("goodput")
    if isinstance(goodput, dict):
        rows.append(("goodput", f"{(goodput.get('share') or 0) * 100:.1f}% ({goodput.get('rps') or 0:.2f} req/s)"))
    width = max(len(k) for k, _ in rows) + 2
    return "\n".join(f"{k + ':':<{width}}{v}" for k, v in rows)


# -- coldstart ----------------------------------------------------------------------------------------


def cmd_coldstart(args: argparse.Namespace, settings: Settings) -> int:
    """N cold starts of one function, each after forcing it to zero through the admin API."""
    from kold.commands.platform import _client, _function_name
    from kold.loadgen.runner import LiveCounts, RunSettings
    from kold.loadgen.schedule import PlannedRequest
    from kold.loadgen.target import Target

    if args.n < 1:
        raise CLIError(f"--n {args.n}: must be >= 1")
    name = _function_name(args.name)
    client = _client(args, settings)
    gateway = client.base_url
    target = Target(f"{gateway}/v1", api=args.api, stream=True, api_key=client.api_key, kold_gateway=gateway)
    out = args.out or Path(f"loadgen-coldstart-{time.strftime('%Y%m%d-%H%M%S')}")
    out.mkdir(parents=True, exist_ok=True)
    records: list[RequestRecord] = []
    started = time.perf_counter()
    for i in range(args.n):
        client.request("POST", f"/admin/functions/{name}/scale-to-zero")
        one = PlannedRequest(at_s=0.0, function=name, prompt_tokens=16, max_tokens=args.max_tokens, ignore_eos=True)
        result = _drive(
            [one], target, RunSettings(), lambda _r: "Hello, how are you today?", LiveCounts(), progress=False
        )
        records += result.records
        rec = result.records[0]
        cold = "cold" if rec.cold else "warm" if rec.cold is False else "?"
        ttft = "-" if rec.ttft_s is None else f"{rec.ttft_s * 1000:.0f} ms"
        note(f"[{i + 1}/{args.n}] {cold}: first token {ttft}{'' if rec.error is None else ', error ' + rec.error}")
    from kold.loadgen.records import write_jsonl

    write_jsonl(out / "requests.jsonl", records)
    print(_coldstart_table(records))
    note(f"results in {out} ({time.perf_counter() - started:.1f} s)")
    return 0


def _coldstart_table(records: list[RequestRecord]) -> str:
    """The distribution of each part of the cold-start breakdown the gateway reported."""
    from kold.loadgen.stats import percentiles

    parts: dict[str, list[float]] = {}
    for r in records:
        for key, value in (r.cold_start or {}).items():
            parts.setdefault(key, []).append(value)
    ttft = [r.ttft_s * 1000 for r in records if r.ttft_s is not None]
    lines = [f"{'part (ms)':<28}{'p50':>10}{'p90':>10}{'max':>10}{'n':>5}"]
    for key, values in [("ttft", ttft), *sorted(parts.items())]:
        p = percentiles(values)
        lines.append(
            f"{key:<28}" + "".join(f"{(p.get(k) or 0):>10.1f}" for k in ("p50", "p90", "max")) + f"{len(values):>5}"
        )
    cold = sum(1 for r in records if r.cold)
    lines.append(f"cold starts: {cold} of {len(records)}")
    return "\n".join(lines)


# -- compare ------------------------------------------------------------------------------------------


def cmd_compare(args: argparse.Namespace, settings: Settings) -> int:
    from kold.loadgen.compare import compare

    missing = [str(r) for r in args.runs if not (r / "summary.json").is_file()]
    if missing:
        raise CLIError(f"not a loadgen results folder (no summary.json): {', '.join(missing)}")
    print(compare(args.runs, args.out))
    return 0


def pattern_spec(args: argparse.Namespace) -> PatternSpec:
    """The synthetic pattern the command line describes (`kold loadgen run` and `kold sim` share the
    flags; sweep's `--rates`/`--stage-s` exist only where the command has them)."""
    from kold.loadgen.schedule import PatternSpec

    if args.duration is None and args.count is None and args.pattern != "sweep":
        raise CLIError("say how much traffic: --duration SECONDS or --count N")
    rates_text = getattr(args, "rates", None)
    return PatternSpec(
        pattern=args.pattern,
        rate=args.rate,
        duration_s=args.duration,
        count=args.count,
        burstiness=args.burstiness,
        on_s=args.on_s,
        off_s=args.off_s,
        period_s=args.period_s,
        amplitude=args.amplitude,
        rate_to=args.rate_to,
        rates=tuple(float(r) for r in rates_text.split(",")) if rates_text else (),
        stage_s=getattr(args, "stage_s", None),
    )
