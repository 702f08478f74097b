"""requests.jsonl: records go out and come back unchanged; a bad line names the file and the line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kold.loadgen.records import RequestRecord, read_jsonl, write_jsonl


def record(**changes: object) -> RequestRecord:
    base = RequestRecord(
        function="f", scheduled_s=1.0, sent_s=1.001, lag_s=0.001, ttft_s=0.05, ttst_s=0.07, ttft_sched_s=0.051,
        latency_s=0.15, latency_sched_s=0.151, itl_s=[0.02, 0.02], tpot_s=0.02, prompt_tokens=7,
        completion_tokens=3, target_prompt_tokens=8, max_tokens=3, status=200, error=None, cold=True,
        cold_start={"cold-start-ms": 812.0}, instance="i1",
    )  # fmt: skip
    for k, v in changes.items():
        setattr(base, k, v)
    return base


def test_round_trip(tmp_path: Path) -> None:
    records = [record(), record(error="timeout", status=None, ttft_s=None, cold=None, cold_start=None, stage=3)]
    path = tmp_path / "requests.jsonl"
    write_jsonl(path, records)
    assert read_jsonl(path) == records
    first = json.loads(path.read_text().splitlines()[0])
    for key in ("function", "scheduled_s", "sent_s", "ttft_s", "latency_s", "itl_s", "prompt_tokens",
                "completion_tokens", "target_prompt_tokens", "max_tokens", "status", "error", "cold", "cold_start"):  # fmt: skip
        assert key in first  # the keys the issue requires


def test_unknown_keys_are_ignored(tmp_path: Path) -> None:
    path = tmp_path / "requests.jsonl"
    write_jsonl(path, [record()])
    data = json.loads(path.read_text())
    path.write_text(json.dumps({**data, "added_later": 1}) + "\n\n")
    assert read_jsonl(path) == [record()]


@pytest.mark.parametrize("line", ["not json", "[1, 2]", '{"function": "f"}'])
def test_bad_lines(tmp_path: Path, line: str) -> None:
    path = tmp_path / "requests.jsonl"
    write_jsonl(path, [record()])
    with path.open("a") as f:
        f.write(line + "\n")
    with pytest.raises(ValueError, match=r"requests.jsonl:2: not a request record"):
        read_jsonl(path)
