"""report.html: one file that carries a whole run (settings, tables, plots) to whoever reads it.

Self-contained so it can be mailed, attached to an issue or opened from an archive years later: the
plots are embedded as base64 PNGs, the CSS is inline, and there is no script. A Content-Security-Policy
forbids everything else (no network, no script), so a page that tried to fetch anything would fail
visibly in the browser rather than quietly depend on the network. Everything taken from the summary is
HTML-escaped (function names and error types come from the target).
"""

from __future__ import annotations

import base64
import html
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from kold.loadgen.plots import PLOT_FILES
from kold.loadgen.stats import PERCENTILE_KEYS

# Images only from data: URLs, styles only inline, nothing else at all (scripts included).
CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'; script-src 'none'"

_CSS = """
body { font: 15px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2em auto; max-width: 1240px;
       padding: 0 1em; color: #1b1b1b; }
h1 { font-size: 1.6em; margin-bottom: 0.2em; } h2 { font-size: 1.25em; margin-top: 1.8em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; margin: 0.6em 0; } th, td { padding: 0.25em 0.8em; border-bottom: 1px solid #eee; }
th { text-align: left; background: #f6f6f6; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
.banner { padding: 0.8em 1em; border-radius: 6px; margin: 1em 0; }
.behind { background: #fde8e8; border: 2px solid #c62828; color: #7f1d1d; }
.note { background: #eef4fb; border: 1px solid #90b4dd; }
figure { margin: 1.2em 0; } img { max-width: 100%; height: auto; border: 1px solid #eee; }
figcaption { color: #555; font-size: 0.95em; } .muted { color: #777; }
"""

_DISTRIBUTION_LABELS = {
    "ttft_s": "TTFT",
    "ttst_s": "time to second token",
    "latency_s": "end-to-end latency",
    "itl_s": "inter-token gap (pooled)",
    "tpot_s": "time per output token",
    "ttft_sched_s": "TTFT from the scheduled send",
    "latency_sched_s": "latency from the scheduled send",
    "cold_ttft_s": "TTFT, cold requests",
    "warm_ttft_s": "TTFT, warm requests",
    "lag_s": "schedule lag (send − scheduled)",
}


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _num(value: Any, digits: int = 4) -> str:
    """A figure for a table cell, escaped: null as an em dash, floats to `digits` significant figures."""
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    if isinstance(value, list | dict):
        return _e(json.dumps(value))
    return _e(value)


def _ms(value: Any) -> str:
    return "—" if value is None else f"{float(value) * 1000:.4g}"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]], numeric_from: int = 1) -> str:
    """An HTML table; cells are given already escaped."""
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    body = "".join(
        "<tr>"
        + "".join(f'<td class="num">{c}</td>' if i >= numeric_from else f"<td>{c}</td>" for i, c in enumerate(row))
        + "</tr>"
        for row in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _banners(summary: Mapping[str, Any]) -> str:
    out = []
    if summary.get("behind_schedule"):
        lag = (summary.get("lag_s") or {}).get("p99")
        limit = summary.get("lag_limit_s", 0.01)
        out.append(
            '<div class="banner behind" id="behind-schedule"><strong>Behind schedule.</strong> '
            f"The generator sent requests late (schedule lag p99 {_ms(lag)} ms, over the {_ms(limit)} ms limit): "
            "the load offered was lower and later than planned, so these figures describe the client as much as "
            "the server. Rerun with a lower rate or on a larger machine before publishing them.</div>"
        )
    settings = summary.get("settings") or {}
    if settings.get("mode") == "closed" or settings.get("max_concurrency"):
        label = (
            f"Closed loop: {_e(settings.get('concurrency'))} requests in flight at a time"
            if settings.get("mode") == "closed"
            else f"Open loop, capped at {_e(settings.get('max_concurrency'))} requests in flight"
        )
        out.append(f'<div class="banner note">{label}: latency here is not that of an open arrival process.</div>')
    return "".join(out)


def _headline(summary: Mapping[str, Any]) -> str:
    goodput = summary.get("goodput")
    rows = [
        ("requests", _num(summary.get("requests"))),
        ("succeeded", _num(summary.get("succeeded"))),
        ("failed", _num(summary.get("failed"))),
        ("duration (s)", _num(summary.get("duration_s"))),
        ("request rate sent (requests/s)", _num(summary.get("request_rate_rps"))),
        ("throughput (succeeded requests/s)", _num(summary.get("throughput_rps"))),
        ("output tokens/s", _num(summary.get("output_tokens_per_s"))),
        ("cold starts", _num(summary.get("cold_starts"))),
        ("cold-start rate (of requests with kold headers)", _num(summary.get("cold_start_rate"))),
        ("behind schedule", _num(summary.get("behind_schedule"))),
    ]
    if goodput:
        slo = ", ".join(f"{_e(k)} ≤ {_num(v)} s" for k, v in (goodput.get("slo") or {}).items())
        rows += [
            (f"goodput share (meeting {slo})", _num(goodput.get("share"))),
            ("goodput (requests/s)", _num(goodput.get("rps"))),
        ]
    return _table(("figure", "value"), [(_e(k), v) for k, v in rows])


def _latencies(summary: Mapping[str, Any]) -> str:
    rows = []
    for key, label in _DISTRIBUTION_LABELS.items():
        dist = summary.get(key)
        if isinstance(dist, Mapping):
            rows.append((_e(label), *(_ms(dist.get(k)) for k in PERCENTILE_KEYS)))
    return _table(("figure (ms)", *PERCENTILE_KEYS), rows)


def _details(summary: Mapping[str, Any]) -> str:
    parts = []
    errors = summary.get("errors") or {}
    if errors:
        parts.append(
            "<h2>Errors by type</h2>" + _table(("error", "requests"), [(_e(k), _num(v)) for k, v in errors.items()])
        )
    breakdown = summary.get("cold_start_breakdown_ms") or {}
    if breakdown:
        rows = [(_e(k), *(_num((v or {}).get(p)) for p in PERCENTILE_KEYS)) for k, v in breakdown.items()]
        parts.append(
            "<h2>Cold-start breakdown (ms, from x-kold-* headers)</h2>" + _table(("stage", *PERCENTILE_KEYS), rows)
        )
    prompt = summary.get("prompt_tokens")
    if prompt:
        rows = [(_e(k.replace("_", " ")), _num(v)) for k, v in prompt.items()]
        parts.append("<h2>Prompt length: server's count against the target</h2>" + _table(("figure", "tokens"), rows))
    stages = summary.get("stages") or []
    if stages:
        header = ("stage", "offered (req/s)", "sent (req/s)", "throughput (req/s)", "failed", "TTFT p50 (ms)",
                  "TTFT p99 (ms)", "latency p50 (ms)", "latency p99 (ms)", "lag p99 (ms)", "goodput share")  # fmt: skip
        rows = [
            (
                _num(s.get("stage")),
                _num(s.get("rate_rps")),
                _num(s.get("sent_rps")),
                _num(s.get("throughput_rps")),
                _num(s.get("failed")),
                _ms((s.get("ttft_s") or {}).get("p50")),
                _ms((s.get("ttft_s") or {}).get("p99")),
                _ms((s.get("latency_s") or {}).get("p50")),
                _ms((s.get("latency_s") or {}).get("p99")),
                _ms(s.get("lag_p99_s")),
                _num(s.get("goodput_share")),
            )
            for s in stages
        ]
        parts.append("<h2>Sweep stages</h2>" + _table(header, rows))
    overhead = summary.get("overhead") or {}
    if overhead:
        rows = [(_e(k), _num(v)) for k, v in overhead.items()]
        parts.append("<h2>The generator's own overhead</h2>" + _table(("figure", "value"), rows))
    return "".join(parts)


def _plots(plots: Sequence[Path]) -> str:
    figures = []
    for path in plots:
        data = base64.b64encode(path.read_bytes()).decode("ascii")
        caption = PLOT_FILES.get(path.name, path.stem.replace("_", " "))
        figures.append(
            f'<figure><img src="data:image/png;base64,{data}" alt="{_e(caption)}">'
            f"<figcaption>{_e(caption)} ({_e(path.name)})</figcaption></figure>"
        )
    return "<h2>Plots</h2>" + "".join(figures) if figures else ""


def render_report(summary: Mapping[str, Any], plots: Sequence[Path]) -> str:
    """The report's HTML text."""
    settings = summary.get("settings") or {}
    title = "kold loadgen report" + (" — behind schedule" if summary.get("behind_schedule") else "")
    setting_rows = [(_e(k), _num(v)) for k, v in settings.items()]
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f'<meta http-equiv="Content-Security-Policy" content="{CSP}">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        '<link rel="icon" href="data:,">'  # no favicon request
        f"<title>{_e(title)}</title><style>{_CSS}</style></head><body>"
        f"<h1>{_e(title)}</h1>"
        f'<p class="muted">summary schema {_e(summary.get("schema_version", "?"))}; '
        "times in the latency table are milliseconds; figures that were not measured show as —.</p>"
        f"{_banners(summary)}"
        f"<h2>Headline</h2>{_headline(summary)}"
        f"<h2>Settings</h2>{_table(('setting', 'value'), setting_rows) if setting_rows else '<p>none recorded</p>'}"
        f"<h2>Latency</h2>{_latencies(summary)}"
        f"{_details(summary)}"
        f"{_plots(plots)}"
        "</body></html>\n"
    )


def write_report(out: Path, summary: Mapping[str, Any], plots: list[Path]) -> Path:
    """Write report.html into the run's folder `out`; its path."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / "report.html"
    path.write_text(render_report(summary, plots), encoding="utf-8")
    return path


__all__ = ["CSP", "render_report", "write_report"]
