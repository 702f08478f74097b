"""Load generator fidelity: the highest Poisson rate at which a generator keeps to its schedule.

One run starts a trivial streaming OpenAI server (bench/loadgen_server.py: its own process, uvloop and
httptools, 16 tokens a request, the first `--ttft-ms` after the request head, then one every `--itl-ms`)
and drives it, rate by rate (`--rates`, `--duration` s each), with:
- `kold`: `kold.loadgen.runner.run` as `kold loadgen run` drives it (asyncio.run, open loop, Poisson plan,
  prompts from PromptFactory), each rate in a fresh subprocess;
- `kold@REF` (with `--before REF`): the same, with the loadgen/ package of git revision REF, to measure a
  change to the generator before and after in one run;
- `guidellm` (when `--peer-venv` has it): `guidellm run` with the openai_http backend and synthetic 16/16
  token data, one invocation per rate; its per-request timings give its lag (request_start minus
  targeted_start, the same definition as kold's).
vLLM's `vllm bench serve` is reported as not run unless `--peer-venv` has vllm (its PyPI wheel requires
a CUDA build of torch; see docs/benchmarks.md).

A rate passes when every request succeeded and lag p99 < 10 ms; a tool's ladder stops after two failed
rates in a row. The tool's maximum sustainable rate is its highest passing rate. Before the ladder, kold
runs at 20 req/s and its median TTFT is compared with the server's own (head parsed -> first token
written, from the server's GET /stats): the target is |difference| <= 2 ms.

Writes bench/out/loadgen/results.json and lag_p99.png; prints the table.

    .venv/bin/python bench/loadgen.py --duration 10 --before 4259e8e --peer-venv /tmp/peer-venv
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
from common import free_port, log

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
LAG_LIMIT_S = 0.010
TOKENS = 16
DEFAULT_RATES = "10,20,50,100,200,300,500,750,1000,1500,2000,3000,4000"


def p(values: list[float], q: float) -> float | None:
    """Percentile q (0..1), linear between closest ranks; None for no values."""
    if not values:
        return None
    s = sorted(values)
    pos = q * (len(s) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


# --- kold, in a subprocess per rate -------------------------------------------------------------------


def kold_worker(port: int, rate: float, duration: float, out: Path) -> None:
    """One rate of kold's generator (run in its own process: `loadgen.py _kold ...`)."""
    import asyncio
    import random

    from kold.loadgen.prompts import PromptFactory
    from kold.loadgen.runner import RunSettings, run
    from kold.loadgen.schedule import PatternSpec, plan
    from kold.loadgen.shapes import parse_shape
    from kold.loadgen.target import Target

    planned = plan(PatternSpec("poisson", rate=rate, duration_s=duration), [], parse_shape("16"), parse_shape("16"), 1)
    text = PromptFactory(None).make(TOKENS, random.Random(1))
    target = Target(f"http://127.0.0.1:{port}/v1")
    result = asyncio.run(run(planned, target, RunSettings(), lambda _: text))
    recs = result.records
    lags = [r.lag_s for r in recs]
    ok = [r for r in recs if r.error is None and r.completion_tokens == TOKENS]
    sent = [r.sent_s for r in recs]
    summary = {
        "rate": rate,
        "planned": len(planned),
        "requests": len(recs),
        "errors": len(recs) - len(ok),
        "error_types": sorted({r.error for r in recs if r.error}),
        "achieved_rps": (len(recs) - 1) / (max(sent) - min(sent)) if len(sent) > 1 else None,
        "lag_p50_s": p(lags, 0.5),
        "lag_p99_s": p(lags, 0.99),
        "lag_max_s": max(lags) if lags else None,
        "ttft_p50_s": p([r.ttft_s for r in ok if r.ttft_s is not None], 0.5),
        "cpu_s_per_request": result.overhead["cpu_s_per_request"],
    }
    out.write_text(json.dumps(summary))


def run_kold(port: int, rate: float, duration: float, pythonpath: str | None) -> dict[str, Any]:
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        out = Path(f.name)
    env = dict(os.environ)
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    cmd = [sys.executable, str(Path(__file__)), "_kold", str(port), str(rate), str(duration), str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=duration * 6 + 120, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"kold worker failed: {proc.stderr[-2000:]}")
    result = json.loads(out.read_text())
    out.unlink()
    return result


def before_tree(ref: str) -> str:
    """A PYTHONPATH whose kold.loadgen is loadgen/ as of git revision `ref` (nothing else of kold is needed:
    loadgen imports nothing of kold but itself)."""
    tmp = Path(tempfile.mkdtemp(prefix="kold-loadgen-before-"))
    (tmp / "kold").mkdir()
    (tmp / "kold" / "__init__.py").write_text("")
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", ref, "loadgen"], capture_output=True, check=True)
    subprocess.run(["tar", "-x", "-C", str(tmp / "kold")], input=archive.stdout, check=True)
    return str(tmp)


# --- GuideLLM -----------------------------------------------------------------------------------------


def make_tokenizer(venv: Path, where: Path) -> None:
    """A small word-level tokenizer on disk: GuideLLM's synthetic data needs one, and no hub is reachable."""
    code = r"""
import json, sys
from tokenizers import Tokenizer, models, pre_tokenizers
words = "the of and to a in is it you that he was for on are with as his they be at one have this from".split()
tok = Tokenizer(models.WordLevel({"[UNK]": 0, **{w: i + 1 for i, w in enumerate(words)}}, unk_token="[UNK]"))
tok.pre_tokenizer = pre_tokenizers.Whitespace()
out = sys.argv[1]
tok.save(out + "/tokenizer.json")
json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "unk_token": "[UNK]", "model_max_length": 4096},
          open(out + "/tokenizer_config.json", "w"))
json.dump({"model_type": "gpt2"}, open(out + "/config.json", "w"))
"""
    where.mkdir(parents=True, exist_ok=True)
    subprocess.run([str(venv / "bin" / "python"), "-c", code, str(where)], check=True)


def run_guidellm(venv: Path, port: int, profile: str, rate: float, duration: float, work: Path) -> dict[str, Any]:
    """One `guidellm run` at one rate; lag from its own per-request timings."""
    work.mkdir(parents=True, exist_ok=True)
    out = work / f"guidellm-{profile}-{rate:g}.json"
    cmd = [
        str(venv / "bin" / "guidellm"), "run",
        "--backend", f"kind=openai_http,target=http://127.0.0.1:{port},model=bench,request_format=/v1/chat/completions",
        "--profile", f"kind={profile},rate={rate:g}",
        "--constraint", f"kind=max_duration,seconds={duration:g}",
        "--data", f"kind=synthetic_text,prompt_tokens={TOKENS},output_tokens={TOKENS}",
        "--tokenizer", f"kind=huggingface_auto,model={work / 'tokenizer'}",
        "--output", f"kind=json,path={out}",
        "--disable-console",
    ]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=duration * 6 + 180, check=False)
    wall = time.perf_counter() - t0
    if proc.returncode != 0 or not out.exists():
        return {"rate": rate, "failed": f"guidellm exited {proc.returncode}: {proc.stderr[-1500:]}"}
    bench = json.loads(out.read_text())["benchmarks"][0]
    reqs = bench["requests"]
    done, errored, incomplete = reqs["successful"], reqs["errored"], reqs["incomplete"]
    started = [r for r in done + errored + incomplete if r["info"]["timings"].get("request_start") is not None]
    lags = [
        r["info"]["timings"]["request_start"] - r["info"]["timings"]["targeted_start"]
        for r in started
        if r["info"]["timings"].get("targeted_start") is not None
    ]
    starts = sorted(r["info"]["timings"]["request_start"] for r in started)
    ttfts = [
        r["info"]["timings"]["first_token_iteration"] - r["info"]["timings"]["request_start"]
        for r in done
        if r["info"]["timings"].get("first_token_iteration")
    ]
    metrics = bench["scheduler_metrics"]
    return {
        "rate": rate,
        "profile": profile,
        "requests": len(started),
        "errors": len(errored),
        "incomplete_at_end": len(incomplete),  # cut by max_duration: not errors
        "achieved_rps": (len(starts) - 1) / (starts[-1] - starts[0]) if len(starts) > 1 else None,
        "lag_p50_s": p(lags, 0.5),
        "lag_p99_s": p(lags, 0.99),
        "lag_max_s": max(lags) if lags else None,
        "ttft_p50_s": p(ttfts, 0.5),
        "guidellm_request_targeted_start_delay_avg_s": metrics.get("request_targeted_start_delay_avg"),
        "guidellm_warnings": [w.get("code") for w in bench.get("warnings") or [] if isinstance(w, dict)],
        "worker_processes": bench["scheduler_state"].get("num_processes"),
        "wall_s": wall,
    }


# --- the run ------------------------------------------------------------------------------------------


def passes(row: dict[str, Any]) -> bool:
    lag = row.get("lag_p99_s")
    return "failed" not in row and row.get("errors") == 0 and lag is not None and lag < LAG_LIMIT_S


def ladder(name: str, rates: list[float], one: Any) -> list[dict[str, Any]]:
    """Each rate in turn until two fail in a row."""
    rows: list[dict[str, Any]] = []
    fails = 0
    for rate in rates:
        row = one(rate)
        row["tool"] = name
        row["pass"] = passes(row)
        rows.append(row)
        lag = row.get("lag_p99_s")
        ach = row.get("achieved_rps")
        log(
            f"{name} @ {rate:g}/s: achieved {ach if ach is None else round(ach, 1)}/s, "
            f"lag p99 {'-' if lag is None else f'{lag * 1000:.2f} ms'}, errors {row.get('errors')}"
            f"{'' if row['pass'] else '  FAIL ' + str(row.get('failed', ''))[:300]}"
        )
        fails = 0 if row["pass"] else fails + 1
        if fails >= 2:
            break
    return rows


def max_rate(rows: list[dict[str, Any]]) -> float | None:
    ok = [r["rate"] for r in rows if r["pass"]]
    return max(ok) if ok else None


def start_server(port: int, ttft_ms: float, itl_ms: float) -> subprocess.Popen[bytes]:
    cmd = [sys.executable, str(HERE / "loadgen_server.py"), "--port", str(port), "--ttft-ms", str(ttft_ms)]
    proc = subprocess.Popen([*cmd, "--itl-ms", str(itl_ms)])
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", trust_env=False, timeout=1).status_code == 200:
                return proc
        except httpx.TransportError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError("the server did not start")


def ttft_check(port: int, duration: float) -> dict[str, Any]:
    """kold at 20 req/s: its median TTFT against the server's own."""
    httpx.post(f"http://127.0.0.1:{port}/stats/reset", trust_env=False)
    row = run_kold(port, 20.0, duration, None)
    stats = httpx.get(f"http://127.0.0.1:{port}/stats", trust_env=False).json()
    true = p(stats["true_ttft_s"], 0.5)
    diff = row["ttft_p50_s"] - true if true is not None and row["ttft_p50_s"] is not None else None
    return {
        "rate": 20.0,
        "requests": row["requests"],
        "server_requests": stats["requests"],
        "measured_ttft_p50_s": row["ttft_p50_s"],
        "server_true_ttft_p50_s": true,
        "difference_s": diff,
        "within_2ms": diff is not None and abs(diff) <= 0.002,
        "lag_p99_s": row["lag_p99_s"],
    }


def plot(rows: list[dict[str, Any]], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 5), dpi=130)
    for tool in dict.fromkeys(r["tool"] for r in rows):
        pts = [(r["rate"], r["lag_p99_s"] * 1000) for r in rows if r["tool"] == tool and r.get("lag_p99_s") is not None]
        if pts:
            ax.plot(*zip(*pts, strict=True), marker="o", label=tool)
    ax.axhline(LAG_LIMIT_S * 1000, color="red", linestyle="--", linewidth=1, label="10 ms limit")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("offered rate (requests/s, 16 streamed tokens each)")
    ax.set_ylabel("schedule lag p99 (ms)")
    ax.set_title("Load generator schedule fidelity on a trivial loopback server (2 cores)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)


def table(rows: list[dict[str, Any]]) -> str:
    lines = [f"{'tool':<22}{'rate/s':>8}{'achieved/s':>12}{'lag p50 ms':>12}{'lag p99 ms':>12}{'errors':>8}  pass"]

    def ms(v: float | None) -> str:
        return "-" if v is None else f"{v * 1000:.2f}"

    for r in rows:
        ach = r.get("achieved_rps")
        lines.append(
            f"{r['tool']:<22}{r['rate']:>8g}{'-' if ach is None else f'{ach:.1f}':>12}{ms(r.get('lag_p50_s')):>12}"
            f"{ms(r.get('lag_p99_s')):>12}{r.get('errors', '-')!s:>8}  {'yes' if r['pass'] else 'no'}"
        )
    return "\n".join(lines)


def version(venv: Path, package: str) -> str | None:
    py = venv / "bin" / "python"
    if not py.exists():
        return None
    proc = subprocess.run(
        [str(py), "-c", f"import importlib.metadata as m; print(m.version('{package}'))"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    return proc.stdout.strip() if proc.returncode == 0 else None


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "_kold":
        kold_worker(int(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4]), Path(sys.argv[5]))
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rates", default=DEFAULT_RATES, help="comma-separated requests/s")
    ap.add_argument("--duration", type=float, default=10.0, help="seconds per rate")
    ap.add_argument("--ttft-ms", type=float, default=10.0)
    ap.add_argument("--itl-ms", type=float, default=2.0)
    ap.add_argument("--ttft-check-s", type=float, default=15.0, help="length of the 20 req/s TTFT check")
    ap.add_argument("--before", help="also run kold's loadgen/ as of this git revision")
    ap.add_argument("--peer-venv", type=Path, default=Path("/tmp/peer-venv"), help="a venv with guidellm (and vllm)")
    ap.add_argument("--guidellm-profiles", default="constant", help="GuideLLM profiles to ladder (poisson, constant)")
    ap.add_argument("--guidellm-poisson-probe", type=float, default=50.0, help="one GuideLLM poisson run at this rate")
    ap.add_argument("--out", type=Path, default=HERE / "out" / "loadgen")
    args = ap.parse_args()
    rates = [float(r) for r in args.rates.split(",")]
    args.out.mkdir(parents=True, exist_ok=True)
    port = free_port()
    server = start_server(port, args.ttft_ms, args.itl_ms)
    rows: list[dict[str, Any]] = []
    notes: list[str] = []
    try:
        check = ttft_check(port, args.ttft_check_s)
        log(f"TTFT at 20/s: kold {check['measured_ttft_p50_s'] * 1000:.3f} ms, server "
            f"{check['server_true_ttft_p50_s'] * 1000:.3f} ms, difference {check['difference_s'] * 1000:+.3f} ms")  # fmt: skip
        rows += ladder("kold", rates, lambda r: run_kold(port, r, args.duration, None))
        if args.before:
            tree = before_tree(args.before)
            try:
                rows += ladder(f"kold@{args.before}", rates, lambda r: run_kold(port, r, args.duration, tree))
            finally:
                shutil.rmtree(tree, ignore_errors=True)
        venv = args.peer_venv
        if (venv / "bin" / "guidellm").exists():
            make_tokenizer(venv, args.out / "tokenizer")
            if args.guidellm_poisson_probe:
                probe = run_guidellm(venv, port, "poisson", args.guidellm_poisson_probe, args.duration, args.out)
                probe["tool"] = "guidellm poisson (probe)"
                probe["pass"] = passes(probe)
                rows.append(probe)
                log(f"guidellm poisson @ {probe['rate']:g}/s: achieved {probe.get('achieved_rps')}/s, "
                    f"lag p50 {probe.get('lag_p50_s')} s")  # fmt: skip
            for profile in args.guidellm_profiles.split(","):
                rows += ladder(
                    f"guidellm {profile}",
                    rates,
                    lambda r, pr=profile: run_guidellm(venv, port, pr, r, args.duration, args.out),
                )
        else:
            notes.append(f"guidellm: not run, not installed in {venv}")
        if not (venv / "bin" / "vllm").exists():
            notes.append(
                "vllm bench serve: not run: vllm's PyPI wheel requires torch==2.14.0 (a CUDA build on Linux), "
                "flashinfer-python and nvidia-cutlass-dsl[cu13]; it cannot be installed without a CUDA torch"
            )
    finally:
        server.terminate()
        server.wait(10)
    per_tool = {
        tool: max_rate([r for r in rows if r["tool"] == tool]) for tool in dict.fromkeys(r["tool"] for r in rows)
    }
    results = {
        "date_utc": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
        "versions": {"guidellm": version(args.peer_venv, "guidellm"), "vllm": version(args.peer_venv, "vllm")},
        "server": {"ttft_ms": args.ttft_ms, "itl_ms": args.itl_ms, "tokens": TOKENS},
        "duration_s_per_rate": args.duration,
        "lag_limit_s": LAG_LIMIT_S,
        "ttft_check": check,
        "rows": rows,
        "max_sustainable_rps": per_tool,
        "notes": notes,
    }
    (args.out / "results.json").write_text(json.dumps(results, indent=2))
    plot([r for r in rows if "probe" not in r["tool"]], args.out / "lag_p99.png")
    print(table(rows))
    print("\nmax sustainable rate (lag p99 < 10 ms, no errors):")
    for tool, rate in per_tool.items():
        print(f"  {tool:<26} {rate if rate is not None else 'none'}")
    for note in notes:
        print(f"  {note}")
    print(f"results: {args.out / 'results.json'}, plot: {args.out / 'lag_p99.png'}")


if __name__ == "__main__":
    main()
