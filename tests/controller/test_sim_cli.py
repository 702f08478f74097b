"""`kold sim` and `kold sim generate` end to end: flags to printed results and files, errors as one line."""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import pytest

from kold.commands import sim
from kold.controller.policies.registry import POLICIES
from kold.errors import run_command

KEYS = {
    "policy",
    "functions",
    "invocations",
    "cold_starts",
    "wait_p50_s",
    "wait_p99_s",
    "idle_instance_seconds",
    "instance_seconds",
}


def kold(*argv: str) -> int:
    """The `kold` entry with the sim command registered (as kold/cli.py registers it)."""
    parser = argparse.ArgumentParser(prog="kold")
    parser.add_argument("-v", "--verbose", action="store_true")
    sim.register(parser.add_subparsers(dest="command", required=True))
    return run_command(parser, list(argv))


@pytest.fixture(scope="module")
def trace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("sim") / "day.csv"
    assert kold("sim", "generate", "--out", str(path), "--functions", "12", "--seed", "3") == 0
    return path


def test_json_has_the_documented_keys(trace: Path, capsys: pytest.CaptureFixture[str]) -> None:
    capsys.readouterr()
    assert kold("sim", "--trace", str(trace), "--policy", "fixed-keepalive:minutes=5", "--json", "--no-progress") == 0
    data = json.loads(capsys.readouterr().out)
    assert set(data) >= KEYS
    assert data["policy"] == "fixed-keepalive:minutes=5"
    assert data["invocations"] > 100
    assert 0 < data["idle_instance_seconds"] <= data["instance_seconds"]
    assert data["settings"]["end_s"] == 86400.0


def test_the_same_seed_prints_the_same_result(trace: Path, capsys: pytest.CaptureFixture[str]) -> None:
    outs = []
    for _ in range(2):
        capsys.readouterr()
        assert kold("sim", "--trace", str(trace), "--policy", "forecast", "--json", "--no-progress", "--seed", "9") == 0
        data = json.loads(capsys.readouterr().out)
        data.pop("wall_s")
        outs.append(data)
    assert outs[0] == outs[1]


def test_without_json_a_table_for_people(trace: Path, capsys: pytest.CaptureFixture[str]) -> None:
    capsys.readouterr()
    assert kold("sim", "--trace", str(trace), "--policy", "knative-default", "--no-progress") == 0
    out = capsys.readouterr().out
    assert "knative-default" in out
    assert "cold starts" in out
    assert "idle instance-seconds" in out


def test_a_synthetic_pattern_with_token_shapes(capsys: pytest.CaptureFixture[str]) -> None:
    capsys.readouterr()
    argv = ["sim", "--pattern", "poisson", "--rate", "0.5", "--duration", "600", "--functions", "a,b"]
    assert kold(*argv, "--prompt-tokens", "1000", "--max-tokens", "50", "--json", "--no-progress") == 0
    data = json.loads(capsys.readouterr().out)
    assert data["functions"] == 2
    assert 200 < data["invocations"] < 400
    assert data["settings"]["end_s"] == 600.0


def test_a_malformed_trace_gets_one_line_naming_the_file_and_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "bad.csv"
    bad.write_text("HashOwner,HashApp,HashFunction,Trigger,1,2\no,a,f1,http,1,0\no,a,f2,timer,1,x\n")
    capsys.readouterr()
    assert kold("sim", "--trace", str(bad), "--policy", "knative-default", "--no-progress") == 1
    err = capsys.readouterr().err.strip()
    assert err == f"kold: error: {bad}:3: minute 2: 'x' is not a whole number"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--trace", "/nonexistent/trace.csv"], "/nonexistent/trace.csv"),
        (["--pattern", "poisson", "--rate", "1"], "--duration SECONDS or --count N"),
        ([], "--trace FILE or --pattern NAME"),
        (["--pattern", "poisson", "--rate", "1", "--count", "5", "--policy", "nope"], "unknown prewarm policy 'nope'"),
        (
            ["--pattern", "poisson", "--rate", "1", "--count", "5", "--restore-gbps", "0"],
            "--restore-gbps: must be a number above 0",
        ),
        (["--pattern", "poisson", "--rate", "1", "--count", "5", "--pareto"], "--pareto needs --out"),
    ],
    ids=[
        "a missing file",
        "a pattern without a length",
        "no arrivals",
        "an unknown policy",
        "a zero bandwidth",
        "pareto without out",
    ],
)
def test_bad_input_is_one_line(argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    capsys.readouterr()
    assert kold("sim", *argv, "--no-progress") == 1
    err = capsys.readouterr().err
    assert err.startswith("kold: error: ")
    assert message in err
    assert err.count("\n") == 1


def test_pareto_writes_its_points_and_plot(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "pareto"
    capsys.readouterr()
    argv = ["sim", "--pattern", "onoff", "--rate", "0.2", "--on-s", "300", "--off-s", "900", "--duration", "7200"]
    assert kold(*argv, "--pareto", "--out", str(out), "--no-progress") == 0
    printed = capsys.readouterr().out
    with (out / "points.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == sum(len(cls.knob_values) for cls in POLICIES.values())
    assert {r["policy"] for r in rows} == set(POLICIES)
    for row in rows:
        assert row["knob"] == POLICIES[row["policy"]].knob
        assert int(row["cold_starts"]) >= 0
        assert float(row["idle_instance_seconds"]) <= float(row["instance_seconds"])
        assert row["spec"].startswith(row["policy"] + ":")
    assert (out / "pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for name in POLICIES:
        assert name in printed


def test_pareto_in_parallel_gives_the_same_points(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["sim", "--pattern", "poisson", "--rate", "0.02", "--duration", "7200", "--json", "--no-progress"]
    points = []
    for jobs in ("1", "2"):
        capsys.readouterr()
        out = tmp_path / f"jobs{jobs}"
        assert (
            kold(*argv, "--pareto", "--policies", "fixed-keepalive,knative-default", "--out", str(out), "--jobs", jobs)
            == 0
        )
        data = json.loads(capsys.readouterr().out)
        points.append([{k: v for k, v in p.items() if k != "wall_s"} for p in data["points"]])
    assert points[0] == points[1]
    assert len(points[0]) == len(POLICIES["fixed-keepalive"].knob_values) + len(POLICIES["knative-default"].knob_values)


def test_generate_refuses_a_directory(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    capsys.readouterr()
    assert kold("sim", "generate", "--out", str(tmp_path)) == 1
    assert "is a directory" in capsys.readouterr().err
