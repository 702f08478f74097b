"""`kold loadgen` as a user runs it: against any OpenAI-compatible URL (a fake server with known timing),
and against the local platform, where cold starts are counted and tagged from kold's headers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from loadgen_server import FakeServer

pytestmark = pytest.mark.timeout(300)

PLATFORM_TESTS = Path(__file__).resolve().parents[1] / "platform"


def kold(*args: str, env: dict[str, str] | None = None, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "kold", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env if env is not None else dict(os.environ),
        check=False,
    )


def test_a_run_against_any_openai_url_writes_every_output(tmp_path: Path) -> None:
    out = tmp_path / "run"
    with FakeServer(ttft_s=0.05, gap_s=0.02) as server:
        r = kold(
            "loadgen", "run", "--base-url", f"{server.url}/v1", "--model", "m", "--pattern", "poisson",
            "--rate", "20", "--count", "20", "--max-tokens", "4", "--prompt-tokens", "32", "--slo", "ttft=1",
            "--out", str(out), "--no-progress",
        )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "TTFT p50" in r.stdout and "Traceback" not in r.stderr
    for name in ("requests.jsonl", "summary.json", "summary.csv", "report.html"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    assert list(out.glob("*.png"))
    lines = [json.loads(line) for line in (out / "requests.jsonl").read_text().splitlines()]
    assert len(lines) == 20 and all(rec["status"] == 200 and rec["error"] is None for rec in lines)
    assert all(rec["cold"] is None and rec["cold_start"] is None for rec in lines)  # no kold headers: no guess
    summary = json.loads((out / "summary.json").read_text())
    assert summary["requests"] == 20 and summary["cold_starts"] is None  # unknown, not zero
    assert 0.04 < summary["ttft_s"]["p50"] < 0.5  # the server's 50 ms, and some loaded-machine slack
    assert summary["settings"]["driven"] == "open loop" and summary["settings"]["pattern"] == "poisson"

    compared = kold("loadgen", "compare", str(out), str(out), "--out", str(tmp_path / "cmp"))
    assert compared.returncode == 0, compared.stderr
    assert "throughput" in compared.stdout.lower()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        pytest.param(["--base-url", "http://127.0.0.1:9/v1", "--model", "m"], "--duration", id="no amount of traffic"),
        pytest.param(["--base-url", "http://127.0.0.1:9/v1"], "--model", id="a base URL without a model"),
        pytest.param(
            ["--base-url", "http://127.0.0.1:9/v1", "--model", "m", "--count", "3", "--max-tokens", "uniform:9"],
            "uniform",
            id="a bad shape",
        ),
        pytest.param(["--count", "3"], "--function", id="no target"),
    ],
)
def test_bad_flags_are_one_line_errors(args: list[str], message: str, tmp_path: Path) -> None:
    r = kold("loadgen", "run", *args, "--out", str(tmp_path / "x"), "--no-progress")
    assert r.returncode == 1 and message in r.stderr, r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_a_malformed_trace_names_its_file_and_line(tmp_path: Path) -> None:
    trace = tmp_path / "trace.csv"
    trace.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n2024-05-10 00:00:00.000,10,5\nnot,a,row\n")
    r = kold("loadgen", "run", "--base-url", "http://127.0.0.1:9/v1", "--model", "m", "--trace", str(trace))
    assert r.returncode == 1 and f"{trace}:3:" in r.stderr and "TIMESTAMP" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr


def test_against_the_local_platform_cold_starts_are_counted_and_tagged(tmp_path: Path) -> None:
    sys.path.insert(0, str(PLATFORM_TESTS))
    from kold_up import platform_env, running_platform

    from kold.modelgen import write_random_model

    model = write_random_model(tmp_path / "m", "llama", "tiny", seed=4)
    env = platform_env(tmp_path)
    with running_platform(env):
        deployed = kold("deploy", str(model), "--name", "lg", "--idle-timeout", "60", env=env)
        assert deployed.returncode == 0, deployed.stderr
        cold = kold("loadgen", "coldstart", "lg", "--n", "2", "--out", str(tmp_path / "cold"), env=env)
        assert cold.returncode == 0, cold.stderr
        assert "cold starts: 2 of 2" in cold.stdout and "restore-ms" in cold.stdout, cold.stdout
        out = tmp_path / "run"
        r = kold(
            "loadgen", "run", "--function", "lg", "--pattern", "constant", "--rate", "5", "--count", "6",
            "--max-tokens", "4", "--prompt-tokens", "16", "--out", str(out), "--no-progress", env=env,
        )  # fmt: skip
        assert r.returncode == 0, r.stderr
    records = [json.loads(line) for line in (out / "requests.jsonl").read_text().splitlines()]
    assert len(records) == 6 and all(rec["error"] is None for rec in records), records
    assert all(rec["cold"] in (True, False) for rec in records)  # kold says, for every request
    summary = json.loads((out / "summary.json").read_text())
    assert summary["cold_starts"] == sum(1 for rec in records if rec["cold"])
    assert summary["settings"]["kold"] is True


def test_a_sweep_stops_at_the_rate_that_saturates_the_target(tmp_path: Path) -> None:
    """One request at a time (max-concurrency 1) of ~130 ms each: ~7 req/s is all the target can do. A sweep
    of 2, 20 and 40 req/s keeps up at 2, saturates at 20, and never runs 40."""
    out = tmp_path / "sweep"
    with FakeServer(ttft_s=0.05, gap_s=0.02) as server:
        r = kold(
            "loadgen", "run", "--base-url", f"{server.url}/v1", "--model", "m", "--pattern", "sweep",
            "--rates", "2,20,40", "--stage-s", "2", "--max-tokens", "4", "--max-concurrency", "1",
            "--out", str(out), "--no-progress",
        )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "saturated at" in r.stderr, r.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["settings"]["saturated_at_rps"] > 10
    stages = {rec["stage"] for rec in map(json.loads, (out / "requests.jsonl").read_text().splitlines())}
    assert stages == {0, 1}  # the 40 req/s stage never ran
