"""summary.json and summary.csv from synthetic records with known answers."""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

import pytest
from results_records import failed, mixed_run, rec

from kold.loadgen.summary import CSV_COLUMNS, parse_slo, read_summary, summarize, write_summary


def test_counts_errors_by_type_and_rates() -> None:
    s = summarize(mixed_run(), duration_s=20.0, settings={"mode": "open"})
    assert (s["requests"], s["succeeded"], s["failed"]) == (40, 36, 4)
    assert s["errors"] == {"http_503": 3, "timeout": 1}
    assert s["duration_s"] == 20.0
    assert s["request_rate_rps"] == pytest.approx(2.0)
    assert s["throughput_rps"] == pytest.approx(1.8)  # succeeded only
    assert s["output_tokens"] == 36 * 8
    assert s["output_tokens_per_s"] == pytest.approx(14.4)
    assert s["settings"] == {"mode": "open"}
    assert s["goodput"] is None and s["stages"] is None and s["prompt_tokens"] is None


def test_latency_percentiles_are_over_succeeded_requests() -> None:
    s = summarize(mixed_run(), duration_s=20.0, settings={})
    warm = sorted(0.05 + 0.001 * i for i in range(40) if i % 10 != 9 and not (i % 6 == 0 and i < 36))
    cold = [2.0, 2.25, 2.5, 2.75, 3.0, 3.25]
    assert s["ttft_s"]["max"] == pytest.approx(3.25)
    assert s["ttft_s"]["mean"] == pytest.approx((sum(warm) + sum(cold)) / 36)
    assert s["latency_s"]["mean"] == pytest.approx((sum(warm) + sum(cold)) / 36 + 0.4)
    assert s["lag_s"]["max"] == pytest.approx(0.0005)  # every request, failed ones included
    assert s["behind_schedule"] is False


def test_cold_and_warm_split() -> None:
    s = summarize(mixed_run(), duration_s=20.0, settings={})
    assert s["cold_starts"] == 6
    assert s["cold_known"] == 36  # the failed requests carried no headers
    assert s["cold_start_rate"] == pytest.approx(6 / 36)
    assert s["cold_ttft_s"] == pytest.approx({"p50": 2.625, "p90": 3.125, "p99": 3.2375, "max": 3.25, "mean": 2.625})
    assert s["warm_ttft_s"]["max"] == pytest.approx(0.088)
    assert s["warm_ttft_s"]["p50"] == pytest.approx(0.0705)  # i = 20 and 21 are the middle of the 30 warm ones
    assert s["cold_start_breakdown_ms"]["queue-ms"]["p50"] == pytest.approx(35.0)
    assert s["cold_start_breakdown_ms"]["restore-ms"]["max"] == pytest.approx(2000.0)


def test_servers_without_kold_headers_report_null_cold_figures() -> None:
    s = summarize([rec(cold=None), rec(cold=None)], duration_s=1.0, settings={})
    assert s["cold_starts"] is None and s["cold_start_rate"] is None and s["cold_known"] == 0
    assert s["cold_ttft_s"]["p50"] is None and s["warm_ttft_s"]["p50"] is None
    assert s["cold_start_breakdown_ms"] is None


def test_inter_token_gaps_are_pooled_over_all_requests() -> None:
    s = summarize([rec(itl_s=[0.1, 0.1, 0.1, 0.1]), rec(itl_s=[0.5])], duration_s=1.0, settings={})
    assert s["itl_s"]["mean"] == pytest.approx(0.18)  # not the mean of per-request means (0.3)
    assert s["itl_s"]["p50"] == pytest.approx(0.1)
    assert s["itl_s"]["max"] == pytest.approx(0.5)


def test_scheduled_time_variants_and_behind_schedule() -> None:
    records = [rec(scheduled_s=i * 0.1, lag_s=0.0 if i < 5 else 0.2, ttft_s=0.1, latency_s=0.5) for i in range(10)]
    s = summarize(records, duration_s=1.0, settings={})
    assert s["ttft_s"]["max"] == pytest.approx(0.1)
    assert s["ttft_sched_s"]["max"] == pytest.approx(0.3)  # the client's queueing shows here
    assert s["latency_sched_s"]["p50"] == pytest.approx(0.6)
    assert s["lag_s"]["p99"] == pytest.approx(0.2)
    assert s["behind_schedule"] is True
    assert s["lag_limit_s"] == 0.01
    relaxed = summarize(records, duration_s=1.0, settings={"behind_lag_s": 0.5})  # RunSettings.behind_lag_s
    assert relaxed["behind_schedule"] is False and relaxed["lag_limit_s"] == 0.5


def test_goodput_needs_every_slo() -> None:
    slo = parse_slo("ttft=1,e2e=2,tpot=0.1")
    records = [
        rec(ttft_s=0.5, latency_s=1.5, tpot_s=0.05),  # met
        rec(ttft_s=1.5, latency_s=1.8),  # TTFT too slow
        rec(ttft_s=0.5, latency_s=2.5),  # end to end too slow
        rec(ttft_s=0.5, latency_s=1.5, tpot_s=0.2),  # TPOT too slow
        rec(ttft_s=None, latency_s=0.8, tpot_s=None, completion_tokens=1),  # met: latency bounds TTFT
        rec(ttft_s=None, latency_s=1.5),  # TTFT unknown and not bounded under 1 s
        failed("http_500", 500),  # a failure meets nothing
        rec(tpot_s=None, completion_tokens=5),  # TPOT not measured: cannot be claimed
    ]
    s = summarize(records, duration_s=4.0, settings={}, slo=slo)
    assert s["goodput"] == {"slo": {"ttft": 1.0, "e2e": 2.0, "tpot": 0.1}, "met": 2, "share": 0.25, "rps": 0.5}


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("ttft=2,tpot=0.1,e2e=30", {"ttft": 2.0, "tpot": 0.1, "e2e": 30.0}),
        (" TTFT = 0.5 ", {"ttft": 0.5}),
        ("e2e=1,", {"e2e": 1.0}),
    ],
)
def test_parse_slo(text: str, expected: dict[str, float]) -> None:
    assert parse_slo(text) == expected


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "no SLO"),
        ("ttft", "expected KEY=SECONDS"),
        ("latency=3", "KEY one of ttft, tpot, e2e"),
        ("ttft=fast", "'fast' is not a number"),
        ("ttft=-1", "positive"),
        ("ttft=nan", "positive"),
        ("ttft=1,ttft=2", "given twice"),
    ],
)
def test_parse_slo_errors_name_the_problem(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_slo(text)


def test_prompt_token_error_against_the_target() -> None:
    records = [rec(prompt_tokens=90), rec(prompt_tokens=110), rec(prompt_tokens=100), rec(prompt_tokens=None)]
    s = summarize(records, duration_s=1.0, settings={})
    assert s["prompt_tokens"] == pytest.approx(
        {"reported": 3, "mean_error": 0.0, "mean_abs_error": 20 / 3, "mean_rel_error": 0.2 / 3}
    )


def sweep_records() -> list:
    """Stage 0 at 2 req/s for 5 s (all fine), stage 1 at 4 req/s for 5 s (2 failures, slower)."""
    records = [rec(scheduled_s=i * 0.5, ttft_s=0.1, latency_s=0.5, stage=0) for i in range(10)]
    for i in range(20):
        t = 5.0 + i * 0.25
        records.append(
            failed("timeout", stage=1, scheduled_s=t)
            if i in (3, 7)
            else rec(scheduled_s=t, ttft_s=0.3, latency_s=1.0, stage=1)
        )
    return records


def test_sweep_stages() -> None:
    settings = {"pattern": "sweep", "rates": [2, 4], "stage_s": 5}
    s = summarize(sweep_records(), duration_s=10.0, settings=settings, slo={"ttft": 0.2})
    first, second = s["stages"]
    assert (first["stage"], first["rate_rps"], first["duration_s"]) == (0, 2.0, 5.0)
    assert (first["requests"], first["failed"], first["sent_rps"], first["throughput_rps"]) == (10, 0, 2.0, 2.0)
    assert first["ttft_s"]["p50"] == pytest.approx(0.1) and first["goodput_share"] == 1.0
    assert (second["stage"], second["rate_rps"], second["requests"], second["failed"]) == (1, 4.0, 20, 2)
    assert second["sent_rps"] == pytest.approx(4.0)
    assert second["throughput_rps"] == pytest.approx(3.6)
    assert second["output_tokens_per_s"] == pytest.approx(18 * 8 / 5)
    assert second["latency_s"]["p99"] == pytest.approx(1.0)
    assert second["goodput_share"] == 0.0
    assert s["goodput"]["met"] == 10


def test_sweep_stage_lengths_without_a_hold_time_come_from_the_schedule() -> None:
    s = summarize(sweep_records(), duration_s=10.0, settings={})  # stages seen in the records
    first, second = s["stages"]
    assert first["duration_s"] == pytest.approx(5.0)  # to the next stage's first send
    assert first["rate_rps"] is None
    assert second["duration_s"] == pytest.approx(9.75 + 1.0 - 5.0)  # to its last response's end


def test_bad_duration_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="duration_s"):
        summarize([rec()], duration_s=float("nan"), settings={})


@dataclass(frozen=True)
class FakeRunSettings:
    mode: str
    concurrency: int | None


def test_write_summary_json_and_csv_layout(tmp_path: Path) -> None:
    settings = {"run": FakeRunSettings("open", None), "out": Path("/tmp/x"), "pattern": "sweep", "rates": (2, 4)}
    s = summarize(
        [*sweep_records(), rec(cold=True, cold_start={"restore-ms": 5.0}, stage=1)],
        duration_s=10.0,
        settings=settings,
        slo={"e2e": 2},
    )
    write_summary(tmp_path / "run", s)
    back = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert back == json.loads(json.dumps(s))
    assert back["settings"] == {
        "run": {"mode": "open", "concurrency": None},
        "out": "/tmp/x",
        "pattern": "sweep",
        "rates": [2, 4],
    }

    with (tmp_path / "run" / "summary.csv").open(newline="") as f:
        reader = csv.DictReader(f)
        assert tuple(reader.fieldnames or ()) == CSV_COLUMNS
        rows = list(reader)
    by_key = {(r["stage"], r["metric"]): r for r in rows}
    assert len(by_key) == len(rows)  # one row per metric (per stage)
    assert by_key[("", "requests")]["value"] == "31"
    assert by_key[("", "errors.timeout")]["value"] == "2"
    assert by_key[("", "behind_schedule")]["value"] == "false"
    assert float(by_key[("", "ttft_s")]["p50"]) == s["ttft_s"]["p50"]
    assert by_key[("", "ttft_s")]["value"] == ""
    assert float(by_key[("", "cold_start_breakdown_ms.restore-ms")]["max"]) == 5.0
    assert by_key[("", "goodput.slo.e2e")]["value"] == "2.0"
    assert by_key[("", "prompt_tokens")]["value"] == ""  # null
    assert float(by_key[("1", "throughput_rps")]["value"]) == pytest.approx(s["stages"][1]["throughput_rps"])
    assert float(by_key[("0", "latency_s")]["p99"]) == pytest.approx(0.5)
    assert by_key[("", "setting.rates")]["value"] == "[2,4]"
    assert by_key[("", "setting.run")]["value"] == '{"mode":"open","concurrency":null}'


def test_read_summary_names_a_folder_that_is_not_a_run(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"no summary\.json"):
        read_summary(tmp_path)
    (tmp_path / "summary.json").write_text("[1]")
    with pytest.raises(ValueError, match="not a summary"):
        read_summary(tmp_path)
