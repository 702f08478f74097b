"""`kold loadgen` against a bare `kold runtime serve` (no gateway): the request that carries the
runtime's cold-start breakdown is tagged cold, the ones after the restore warm."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from runtime_helpers import RuntimeProcess, restore_delay_env


def test_loadgen_tags_the_requests_that_waited_for_the_restore(
    start_runtime: Callable[..., RuntimeProcess], tmp_path: Path
) -> None:
    runtime = start_runtime("--served-model-name", "tiny", "--max-seq-len", "128", env=restore_delay_env(1.5))
    runtime.wait_listening()
    out = tmp_path / "run"
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "kold",
            "loadgen",
            "run",
            "--base-url",
            f"{runtime.base}/v1",
            "--model",
            "tiny",
            "--api",
            "completions",
            "--pattern",
            "constant",
            "--rate",
            "2",
            "--count",
            "8",
            "--max-tokens",
            "4",
            "--prompt-tokens",
            "8",
            "--out",
            str(out),
            "--no-progress",
        ],
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert r.returncode == 0, r.stderr
    records = [json.loads(line) for line in (out / "requests.jsonl").read_text().splitlines()]
    assert len(records) == 8 and all(rec["error"] is None for rec in records), records
    # a bare runtime sends its cold-start breakdown once, on the first answer after its restore: that
    # request (one of those sent while it restored) is cold, and every request sent after it is warm
    cold = [rec for rec in records if rec["cold"]]
    assert len(cold) == 1 and cold[0]["sent_s"] < 1.5 and cold[0]["cold_start"]["restore-ms"] > 0, records
    assert all(rec["cold"] is False for rec in records if rec["sent_s"] > 2.5), records
    summary = json.loads((out / "summary.json").read_text())
    assert summary["cold_starts"] == sum(1 for rec in records if rec["cold"]) >= 1
