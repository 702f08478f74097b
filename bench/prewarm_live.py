"""The pre-warm controller live: one multi-function trace replayed, time-compressed, against `kold up`
with the controller on and then off; cold-start rate and TTFT side by side.

The trace is an Azure-Functions-like day from `kold.controller.sim.generate` (seeded), cut to a window
of `--trace-minutes` from `--start-minute` (default 13:00, when the diurnal HTTP functions are busy).
From a pool of generated functions it keeps five that are active in the window: two timers of
different periods, one diurnal HTTP function with a modest rate (the one closest to `--http-rate`
calls a minute), one bursty (the most separate bursts) and one rare. Each minute's count is clipped
to `--max-per-minute`, so that at the speedup the tiny model on a few CPUs keeps up. The window is
written as its own CSV (azure-functions per-minute format), and its trace names are mapped to the
functions f0..f4 (a JSON mapping for `kold loadgen run --functions`).

For each mode, on a fresh KOLD_HOME and a free port (small caches, no host pool, as the platform
tests start it):
- `kold up --detach` (mode off: `--no-controller`);
- the tiny random model deployed once per trace function, `--idle-timeout` short (seconds are the
  compressed trace's minutes), `--prewarm` the policy (default forecast:budget=30: a budget in
  compressed seconds) and `--cpus 0.25` (the node's scheduler counts 1 CPU an instance by default,
  which on a 2-CPU machine would let two functions run at once and make the others queue for room,
  not for a start); the deploys' own instances are left to scale to zero before the replay;
- `kold loadgen run --trace CSV --speedup S --functions MAPPING` (completions, short prompts and
  answers, the same seed in both modes: the same arrival times), results in OUT/<mode>/;
- the gateway's /metrics read before and after the replay (the difference is the replay's share):
  kold_gateway_prewarm_starts_total, kold_gateway_prewarm_hits_total,
  kold_gateway_idle_instance_seconds_total;
- `kold down`.

It prints a table of both modes (requests, cold starts, cold-start rate, TTFT p50/p99, warm and
cold TTFT p99, pre-warm starts and hits, idle instance-seconds) and writes it to OUT/live.json.

What compression does to the policy: its history counts arrivals in wall-clock minutes, and a timer
is told from a steady rate by gaps over a minute. At 60x a 5-minute timer calls every 5 s, which the
controller sees as a rate; what this run checks is the live loop (demand recorded, floors set, the
reaper holding them, pre-warmed instances serving), not the timer forecast of `kold sim`'s days.

    .venv/bin/python bench/prewarm_live.py                       # 90 trace minutes at 60x: ~3 min per mode
    .venv/bin/python bench/prewarm_live.py --trace-minutes 20    # a short check
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from common import free_port, log
from prometheus_client.parser import text_string_to_metric_families

from kold.controller.sim.generate import GeneratedFunction, generate, write_csv

OUT = Path(__file__).resolve().parent / "out" / "prewarm-live"
MODES = ("on", "off")
GATEWAY_METRICS = (
    "kold_gateway_prewarm_starts_total",
    "kold_gateway_prewarm_hits_total",
    "kold_gateway_idle_instance_seconds_total",
)
TIMER_PERIODS = ("timer5m-", "timer10m-", "timer15m-", "timer30m-", "timer60m-")


# -- the trace -----------------------------------------------------------------------------------------


def _window(fn: GeneratedFunction, start: int, minutes: int, cap: int) -> np.ndarray:
    return np.minimum(fn.counts[start : start + minutes], cap)


def _bursts(counts: np.ndarray) -> int:
    """Runs of minutes with calls."""
    active = counts > 0
    return int(active[0]) + int(np.count_nonzero(active[1:] & ~active[:-1])) if active.size else 0


def pick(
    pool: Sequence[GeneratedFunction], start: int, minutes: int, cap: int, http_rate: float
) -> list[GeneratedFunction]:
    """Five functions active in the window: two timers of different periods, one HTTP function whose
    rate is closest to `http_rate` a minute, the bursty one with the most bursts (then the fewest
    calls), the rare one with the most calls. Their counts cut to the window and clipped to `cap`."""
    cut = {fn.name: _window(fn, start, minutes, cap) for fn in pool}
    active = [fn for fn in pool if cut[fn.name].sum() > 0]
    chosen: list[GeneratedFunction] = []
    for prefix in TIMER_PERIODS:
        timer = next((fn for fn in active if fn.name.startswith(prefix) and cut[fn.name].sum() >= 2), None)
        if timer is not None and len(chosen) < 2:
            chosen.append(timer)
    http = [fn for fn in active if fn.kind == "http"]
    if http:
        chosen.append(min(http, key=lambda fn: abs(math.log(cut[fn.name].mean() / http_rate))))
    bursty = [fn for fn in active if fn.kind == "bursty"]
    if bursty:
        chosen.append(max(bursty, key=lambda fn: (_bursts(cut[fn.name]), -int(cut[fn.name].sum()))))
    rare = [fn for fn in active if fn.kind == "rare"]
    if rare:
        chosen.append(max(rare, key=lambda fn: int(cut[fn.name].sum())))
    kinds = sorted({fn.kind for fn in chosen})
    if len(chosen) < 5:
        raise SystemExit(
            f"only {len(chosen)} suitable functions ({', '.join(kinds)}) are active in minutes "
            f"{start}..{start + minutes}: give a larger --pool, another --seed or another --start-minute"
        )
    return [GeneratedFunction(fn.owner, fn.app, fn.name, fn.kind, cut[fn.name]) for fn in chosen]


def write_trace(out: Path, chosen: Sequence[GeneratedFunction]) -> tuple[Path, Path, dict[str, str]]:
    """The window's CSV and the {trace name: fN} mapping (a JSON file for `--functions`)."""
    out.mkdir(parents=True, exist_ok=True)
    csv_path, mapping_path = out / "trace.csv", out / "functions.json"
    write_csv(csv_path, chosen)
    mapping = {fn.name: f"f{i}" for i, fn in enumerate(chosen)}
    mapping_path.write_text(json.dumps(mapping, indent=2) + "\n")
    return csv_path, mapping_path, mapping


# -- the platform --------------------------------------------------------------------------------------


def platform_env(root: Path) -> dict[str, str]:
    """A platform of its own under `root`: nothing KOLD_* from the caller's environment, small caches."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("KOLD_") and k != "PORT"}
    env.update(
        KOLD_HOME=str(root / "home"),
        KOLD_CACHE_SHM_DIR=str(root / "shm"),
        KOLD_CACHE_SHM_BYTES=str(256 << 20),
        KOLD_CACHE_DISK_BYTES="0",
        KOLD_HOST_POOL="off",
        OMP_NUM_THREADS="1",
        PYTHONUNBUFFERED="1",
    )
    return env


def kold(*args: str, env: dict[str, str], timeout: float = 300) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [sys.executable, "-m", "kold", *args], capture_output=True, text=True, env=env, timeout=timeout, check=False
    )
    if result.returncode != 0:
        raise RuntimeError(f"kold {' '.join(args)} failed ({result.returncode}):\n{result.stderr[-2000:]}")
    return result


@contextmanager
def platform(env: dict[str, str], port: int, controller: bool) -> Iterator[str]:
    """`kold up --detach` on `port` (without the controller when not `controller`), `kold down` after."""
    flags = () if controller else ("--no-controller",)
    kold("up", "--detach", "--port", str(port), *flags, env=env, timeout=120)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        try:
            kold("down", env=env, timeout=120)
        except (RuntimeError, subprocess.TimeoutExpired) as exc:
            log(f"kold down: {exc}")


def running(gateway: str, names: Sequence[str]) -> int:
    """Instances starting or ready across `names`."""
    total = 0
    for name in names:
        doc = httpx.get(f"{gateway}/admin/functions/{name}", timeout=10, trust_env=False).json()
        total += sum(1 for i in doc.get("instances", []) if i.get("state") in ("starting", "ready"))
    return total


def wait_cold(gateway: str, names: Sequence[str], timeout_s: float) -> None:
    """Until the deploys' instances have scaled to zero, so that the replay begins cold in both modes."""
    deadline = time.monotonic() + timeout_s
    while (n := running(gateway, names)) > 0:
        if time.monotonic() > deadline:
            raise RuntimeError(f"{n} instances still running {timeout_s:g} s after the deploys")
        time.sleep(0.5)


def gateway_metrics(gateway: str) -> dict[str, float]:
    """The pre-warm metrics summed over functions."""
    text = httpx.get(f"{gateway}/metrics", timeout=10, trust_env=False).text
    totals = dict.fromkeys(GATEWAY_METRICS, 0.0)
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in totals:
                totals[sample.name] += sample.value
    return totals


def run_mode(mode: str, args: argparse.Namespace, model: Path, trace: Path, mapping: Path, names: list[str]) -> dict:
    out = args.out / mode
    shutil.rmtree(out, ignore_errors=True)
    root = Path(tempfile.mkdtemp(prefix=f"kold-prewarm-{mode}-"))
    env = platform_env(root)
    port = free_port()
    try:
        log(f"[{mode}] kold up on port {port} (controller {mode})")
        with platform(env, port, controller=mode == "on") as gateway:
            for name in names:
                kold(
                    "deploy", str(model), "--name", name, "--idle-timeout", f"{args.idle_timeout:g}",
                    "--prewarm", args.prewarm, "--cpus", f"{args.cpus:g}", env=env,
                )  # fmt: skip
            log(f"[{mode}] deployed {', '.join(names)}; waiting for them to scale to zero")
            wait_cold(gateway, names, 60 + 3 * args.idle_timeout)
            before = gateway_metrics(gateway)
            log(f"[{mode}] replaying the trace at {args.speedup:g}x")
            t0 = time.monotonic()
            kold(
                "loadgen", "run", "--trace", str(trace), "--trace-format", "azure-functions",
                "--speedup", f"{args.speedup:g}", "--functions", str(mapping), "--api", "completions",
                "--prompt-tokens", str(args.prompt_tokens), "--max-tokens", str(args.max_tokens),
                "--seed", str(args.seed), "--timeout", "120", "--out", str(out), "--no-progress",
                env=env, timeout=args.trace_minutes * 60 / args.speedup + 300,
            )  # fmt: skip
            log(f"[{mode}] replay done in {time.monotonic() - t0:.0f} s")
            after = gateway_metrics(gateway)
    finally:
        out.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(OSError):  # kept for a failed run's post-mortem too
            shutil.copyfile(root / "home" / "platform.log", out / "platform.log")
        shutil.rmtree(root, ignore_errors=True)
    summary: dict[str, Any] = json.loads((out / "summary.json").read_text())
    return {"summary": summary, "gateway": {k: after[k] - before[k] for k in GATEWAY_METRICS}}


# -- the report ----------------------------------------------------------------------------------------


def _pct(d: dict[str, Any] | None, key: str) -> float | None:
    return None if not d else d.get(key)


def row(result: dict[str, Any]) -> dict[str, Any]:
    s = result["summary"]
    g = result["gateway"]
    errors = s.get("errors") or {}
    return {
        "requests": s.get("requests"),
        "errors": sum(errors.values()) if isinstance(errors, dict) else errors,
        "cold_starts": s.get("cold_starts"),
        "cold_start_rate": s.get("cold_start_rate"),
        "ttft_p50_s": _pct(s.get("ttft_s"), "p50"),
        "ttft_p99_s": _pct(s.get("ttft_s"), "p99"),
        "warm_ttft_p99_s": _pct(s.get("warm_ttft_s"), "p99"),
        "cold_ttft_p99_s": _pct(s.get("cold_ttft_s"), "p99"),
        "prewarm_starts": g["kold_gateway_prewarm_starts_total"],
        "prewarm_hits": g["kold_gateway_prewarm_hits_total"],
        "idle_instance_s": g["kold_gateway_idle_instance_seconds_total"],
    }


def _fmt(key: str, value: Any) -> str:
    if value is None:
        return "-"
    if key == "cold_start_rate":
        return f"{100 * value:.1f}%"
    if key.endswith("_p50_s") or key.endswith("_p99_s"):
        return f"{1000 * value:.0f} ms"
    if key == "idle_instance_s":
        return f"{value:.1f}"
    return f"{value:g}" if isinstance(value, float) else str(value)


LABELS = {
    "requests": "requests",
    "errors": "errors",
    "cold_starts": "cold starts",
    "cold_start_rate": "cold-start rate",
    "ttft_p50_s": "TTFT p50",
    "ttft_p99_s": "TTFT p99",
    "warm_ttft_p99_s": "warm TTFT p99",
    "cold_ttft_p99_s": "cold TTFT p99",
    "prewarm_starts": "pre-warm starts",
    "prewarm_hits": "pre-warm hits",
    "idle_instance_s": "idle instance-s",
}


def table(rows: dict[str, dict[str, Any]]) -> str:
    modes = list(rows)
    lines = ["| | " + " | ".join(f"controller {m}" for m in modes) + " |", "|---" * (len(modes) + 1) + "|"]
    for key, label in LABELS.items():
        lines.append(f"| {label} | " + " | ".join(_fmt(key, rows[m][key]) for m in modes) + " |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pool", type=int, default=500, help="functions generated to pick from (default 500)")
    ap.add_argument("--seed", type=int, default=0, help="the generator's and the replay's seed (default 0)")
    ap.add_argument("--start-minute", type=int, default=13 * 60, help="the window's first minute of the day")
    ap.add_argument("--trace-minutes", type=int, default=90, help="the window's length (default 90)")
    ap.add_argument("--speedup", type=float, default=60.0, help="replay this many times faster (default 60)")
    ap.add_argument("--http-rate", type=float, default=2.0, help="HTTP function's rate to pick, calls/min")
    ap.add_argument("--max-per-minute", type=int, default=20, help="clip each function's minute to this")
    ap.add_argument("--idle-timeout", type=float, default=3.0, help="the functions' idle timeout, seconds")
    ap.add_argument("--prewarm", default="forecast:budget=30", help="the functions' pre-warm policy")
    ap.add_argument("--cpus", type=float, default=0.25, help="CPUs one instance takes of the node (default 0.25)")
    ap.add_argument("--prompt-tokens", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=8)
    ap.add_argument("--modes", default="on,off", help="which runs, in order (default on,off)")
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if not modes or any(m not in MODES for m in modes):
        ap.error(f"--modes: a comma-separated list of {', '.join(MODES)} (got {args.modes!r})")
    if not 0 <= args.start_minute < 1440 or args.trace_minutes < 1 or args.start_minute + args.trace_minutes > 1440:
        ap.error("--start-minute and --trace-minutes must give a window inside the day (0..1440)")
    positive = (args.speedup, args.idle_timeout, args.http_rate, args.cpus, args.max_per_minute)
    if not all(v > 0 for v in positive):
        ap.error("--speedup, --idle-timeout, --http-rate, --cpus and --max-per-minute must be above 0")

    args.out.mkdir(parents=True, exist_ok=True)
    model = args.out / "model"
    if not (model / "tokenizer.json").is_file():
        log(f"making the tiny model in {model}")
        kold("model", "make-tiny", str(model), "--arch", "llama", "--size", "tiny", env=dict(os.environ))

    pool = generate(args.pool, seed=args.seed, days=1)
    chosen = pick(pool, args.start_minute, args.trace_minutes, args.max_per_minute, args.http_rate)
    trace, mapping_path, mapping = write_trace(args.out, chosen)
    total = int(sum(fn.counts.sum() for fn in chosen))
    log(
        f"trace: minutes {args.start_minute}..{args.start_minute + args.trace_minutes} of day 1 at "
        f"{args.speedup:g}x ({args.trace_minutes * 60 / args.speedup:.0f} s), {total} calls: "
        + ", ".join(f"{mapping[fn.name]}={fn.name} ({int(fn.counts.sum())})" for fn in chosen)
    )
    if total > 2000:
        log(f"warning: {total} calls is more than this benchmark is sized for (a few hundred)")

    results: dict[str, dict[str, Any]] = {}
    for mode in modes:
        results[mode] = run_mode(mode, args, model, trace, mapping_path, list(mapping.values()))
    rows = {mode: row(r) for mode, r in results.items()}

    settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    functions = [
        {"function": mapping[fn.name], "trace_name": fn.name, "kind": fn.kind, "calls": int(fn.counts.sum())}
        for fn in chosen
    ]
    doc = {
        "settings": settings,
        "functions": functions,
        "rows": rows,
        "gateway": {m: r["gateway"] for m, r in results.items()},
    }
    (args.out / "live.json").write_text(json.dumps(doc, indent=2) + "\n")
    print()
    print(
        f"{total} calls of {len(chosen)} functions, {args.trace_minutes} trace minutes at {args.speedup:g}x, "
        f"idle timeout {args.idle_timeout:g} s, --prewarm {args.prewarm}"
    )
    print()
    print(table(rows))
    print()
    print(f"written: {args.out / 'live.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
