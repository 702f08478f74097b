"""report.html: self-contained, marked when behind schedule, and rendered by a real Chromium with every
image loaded and no console errors."""

from __future__ import annotations

import re
from pathlib import Path

from browser_check import render
from results_records import mixed_run, rec

from kold.loadgen.plots import plot_all
from kold.loadgen.report import CSP, write_report
from kold.loadgen.summary import summarize

SETTINGS = {"mode": "open", "pattern": "poisson", "rate": 2.0, "base_url": "http://127.0.0.1:9/v1", "functions": ["f"]}


def run_folder(tmp_path: Path, *, behind: bool) -> tuple[Path, list[Path]]:
    records = mixed_run()
    if behind:
        records = [rec(scheduled_s=r.scheduled_s, lag_s=0.05, cold=r.cold) for r in records]
    records.append(rec(function="<b>f&amp;</b>", error="http_418<script>", ttft_s=None, latency_s=None))
    summary = summarize(
        records, duration_s=20.0, settings=SETTINGS, slo={"ttft": 1.0}, overhead={"cpu_s_per_request": 0.0002}
    )
    instances = [
        {"t_s": float(t), "function": "f", "starting": int(t < 3), "ready": int(t >= 3), "draining": 0}
        for t in range(20)
    ]
    plots = plot_all(tmp_path, records, summary, instances)
    return write_report(tmp_path, summary, plots), plots


def test_report_is_self_contained(tmp_path: Path) -> None:
    page, plots = run_folder(tmp_path, behind=False)
    text = page.read_text()
    assert len(plots) == 3
    sources = re.findall(r'\b(?:src|href)="([^"]*)"', text)
    assert len(sources) == 4  # three plots and the empty favicon
    assert all(s.startswith("data:") for s in sources), sources
    assert "<script" not in text.replace("http_418&lt;script&gt;", "")  # the target's text is escaped
    assert "<b>f&amp;</b>" not in text
    assert "http_418&lt;script&gt;" in text
    assert f'content="{CSP}"' in text
    assert "goodput share (meeting ttft ≤ 1 s)" in text
    assert 'id="behind-schedule"' not in text


def test_report_renders_in_chromium_with_every_image_loaded(tmp_path: Path) -> None:
    page, plots = run_folder(tmp_path, behind=False)
    seen = render(page, CSP)
    assert len(seen.images) == len(plots) == 3
    for image in seen.images:
        assert image["complete"] and image["width"] == 1200 and int(image["height"]) > 0, image
    assert seen.errors == []
    assert seen.console == []
    assert "Behind schedule" not in seen.dom


def test_behind_schedule_is_marked_in_the_browser(tmp_path: Path) -> None:
    page, _ = run_folder(tmp_path, behind=True)
    seen = render(page, CSP)
    assert seen.errors == [] and seen.console == []
    assert '<div class="banner behind" id="behind-schedule"><strong>Behind schedule.</strong>' in seen.dom
    assert "schedule lag p99 50 ms" in seen.dom
    assert "<title>kold loadgen report — behind schedule</title>" in seen.dom


def test_the_browser_check_sees_a_broken_image_and_a_network_fetch(tmp_path: Path) -> None:
    """The check itself: a page that embeds a corrupt image and one that fetches from the network must
    both be caught, or the tests above prove nothing."""
    page, _ = run_folder(tmp_path, behind=False)
    text = page.read_text()
    broken = text.replace('src="data:image/png;base64,', 'src="data:image/png;base64,AAAA', 1)
    fetching = text.replace("</body>", '<img src="http://127.0.0.1:9/x.png" alt="remote"></body>')
    (tmp_path / "broken.html").write_text(broken)
    (tmp_path / "fetching.html").write_text(fetching)
    seen = render(tmp_path / "broken.html", CSP)
    assert [i["width"] for i in seen.images].count(0) == 1
    assert seen.errors  # the image's error event
    seen = render(tmp_path / "fetching.html", CSP)
    assert any(e.startswith("csp: img-src http://127.0.0.1:9/x.png") for e in seen.errors), seen.errors
    assert any("Content Security Policy" in line for line in seen.console), seen.console  # Chromium's own log


def test_a_sweep_report_has_its_stage_table(tmp_path: Path) -> None:
    records = [
        rec(scheduled_s=s * 5 + i / r, stage=s, ttft_s=0.1 * (s + 1))
        for s, r in enumerate([1, 3])
        for i in range(5 * r)
    ]
    summary = summarize(records, duration_s=10.0, settings={"pattern": "sweep", "rates": [1, 3], "stage_s": 5})
    text = write_report(tmp_path, summary, plot_all(tmp_path, records, summary, None)).read_text()
    assert "<h2>Sweep stages</h2>" in text
    assert '<tr><td>0</td><td class="num">1</td><td class="num">1</td><td class="num">1</td>' in text
    assert '<tr><td>1</td><td class="num">3</td><td class="num">3</td><td class="num">3</td>' in text
    assert "sweep.png" in text
