"""Summaries of one benchmark run: per-method medians, the table, the issue's target checks, the plot.

Every ratio compares numbers measured in the same run (same machine state, same file contents), never
with figures from elsewhere.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import statistics
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from restore_methods import METHODS

MB = 1e6


@dataclass
class Outcome:
    """All runs of one method."""

    name: str
    runs: list[dict[str, Any]] = field(default_factory=list)
    skipped: str = ""
    errors: list[str] = field(default_factory=list)  # one per failed run: a failure does not stop the others

    @property
    def ok(self) -> bool:
        return bool(self.runs)

    @property
    def median_s(self) -> float:
        return float(statistics.median(r["seconds"] for r in self.runs))

    @property
    def gbps(self) -> float:
        return float(self.runs[0]["bytes"]) / self.median_s / 1e9

    @property
    def peak_rss_mb(self) -> float:
        return float(max(r["peak_rss"] for r in self.runs)) / MB

    @property
    def delta_rss_mb(self) -> float:
        """Peak RSS over the process's RSS just before the timed part: what the restore itself added."""
        return float(max(r["peak_rss"] - r["base_rss"] for r in self.runs)) / MB


def fastest(outcomes: dict[str, Outcome], tier: str, owner: str = "peer") -> Outcome | None:
    pool = [o for o in outcomes.values() if o.ok and METHODS[o.name].tier == tier and METHODS[o.name].owner == owner]
    return min(pool, key=lambda o: o.median_s, default=None)


def reference_for(name: str, outcomes: dict[str, Outcome]) -> Outcome | None:
    """The fastest peer of the same tier (limits are compared with the hot peers)."""
    tier = METHODS[name].tier
    return fastest(outcomes, "hot" if tier == "limit" else tier)


def fingerprint_notes(outcomes: dict[str, Outcome]) -> dict[str, str]:
    """Every tensor-producing method must deliver the same bytes: flag those that disagree."""
    prints = {
        o.name: {r["fingerprint"] for r in o.runs}
        for o in outcomes.values()
        if o.ok and METHODS[o.name].tier != "limit"
    }
    if not prints:
        return {}
    values = [fp for fps in prints.values() for fp in fps]
    majority = max(set(values), key=values.count)
    return {name: "DATA MISMATCH" for name, fps in prints.items() if fps != {majority}}


def last_line(errors: list[str]) -> str:
    return errors[-1].strip().splitlines()[-1] if errors and errors[-1].strip() else "?"


def table(outcomes: dict[str, Outcome]) -> str:
    notes = fingerprint_notes(outcomes)
    head = f"{'method':<18} {'tier':<5} {'median s':>9} {'GB/s':>6} {'x peer':>7} {'peak RSS MB':>11} "
    head += f"{'+RSS MB':>8} {'runs':>4}  note"
    lines = [head, "-" * len(head)]
    for o in outcomes.values():
        tier = METHODS[o.name].tier
        if not o.ok:
            why = f"skipped: {o.skipped}" if o.skipped else f"FAILED: {last_line(o.errors)}"
            lines.append(
                f"{o.name:<18} {tier:<5} {'-':>9} {'-':>6} {'-':>7} {'-':>11} {'-':>8} {len(o.runs):>4}  {why}"
            )
            continue
        note = notes.get(o.name, "")
        if o.errors:
            note += f" {len(o.errors)} run(s) FAILED: {last_line(o.errors)}"
        kold_s = [r["kold_stats"]["total_s"] for r in o.runs if "kold_stats" in r]
        if kold_s:
            note += f" restore() itself {statistics.median(kold_s):.3f} s"
        ref = reference_for(o.name, outcomes)
        ratio = f"{ref.median_s / o.median_s:.2f}" if ref else "-"
        lines.append(
            f"{o.name:<18} {tier:<5} {o.median_s:>9.3f} {o.gbps:>6.2f} {ratio:>7} {o.peak_rss_mb:>11.0f} "
            f"{o.delta_rss_mb:>8.0f} {len(o.runs):>4}  {note.strip()}"
        )
    return "\n".join(lines)


def targets(outcomes: dict[str, Outcome], tensor_bytes: int, chunk_size: int) -> list[dict[str, Any]]:
    """The issue's targets, each PASS/FAIL (or SKIP when a method it needs did not run)."""
    got = {name: o for name, o in outcomes.items() if o.ok}
    out: list[dict[str, Any]] = []

    def check(label: str, need: list[str], value: Any) -> None:
        missing = [n for n in need if n not in got]
        if missing:
            out.append({"target": label, "verdict": "SKIP", "detail": f"not measured: {', '.join(missing)}"})
            return
        passed, detail = value()
        out.append({"target": label, "verdict": "PASS" if passed else "FAIL", "detail": detail})

    hot, cold = fastest(outcomes, "hot"), fastest(outcomes, "cold")

    def speedup(a: str, b: Outcome | None, need: float) -> tuple[bool, str]:
        assert b is not None  # check() calls this only when every method it needs was measured
        x = b.median_s / got[a].median_s
        return x >= need, f"{a} {got[a].median_s:.3f} s vs {b.name} {b.median_s:.3f} s: {x:.2f}x (need {need}x)"

    # the local-store targets, into fresh memory and into the node's pre-faulted host pool (hostpool.py)
    for a, a_cold in (("kold", "kold-cold"), ("kold-pool", "kold-pool-cold")):
        check(f"{a} local hot >= 1.5x fastest peer hot", [a] + ([] if hot else ["a hot peer"]),
              lambda a=a: speedup(a, hot, 1.5))  # type: ignore[misc]  # fmt: skip
        check(f"{a} local hot >= 0.5x memcpy into touched memory", [a, "memcpy-touched"],
              lambda a=a: speedup(a, got["memcpy-touched"], 0.5))  # type: ignore[misc]  # fmt: skip
        check(f"{a} local cold >= fastest peer cold", [a_cold] + ([] if cold else ["a cold peer"]),
              lambda a_cold=a_cold: speedup(a_cold, cold, 1.0))  # type: ignore[misc]  # fmt: skip

    def shm() -> tuple[bool, str]:
        frac = got["kold-shm"].median_s / got["kold"].median_s
        return frac < 0.10, f"kold-shm {got['kold-shm'].median_s:.3f} s = {frac:.1%} of kold hot (need < 10%)"

    check("kold shm restore < 10% of kold hot", ["kold-shm", "kold"], shm)

    def shm_huge() -> tuple[bool, str]:
        frac = got["kold-shm-huge"].median_s / got["kold"].median_s
        return frac < 0.10, f"kold-shm-huge {got['kold-shm-huge'].median_s:.3f} s = {frac:.1%} of kold hot (need < 10%)"

    check("kold shm (huge-page tmpfs) restore < 10% of kold hot", ["kold-shm-huge", "kold"], shm_huge)
    check("kold s3 >= 2.5x boto3 default", ["kold-s3", "boto3-default"],
          lambda: speedup("kold-s3", got["boto3-default"], 2.5))  # fmt: skip
    check("kold s3 >= 1.5x runai from s3://", ["kold-s3", "runai-s3"],
          lambda: speedup("kold-s3", got["runai-s3"], 1.5))  # fmt: skip

    limit = tensor_bytes + 2 * chunk_size
    for name in ("kold", "kold-cold", "kold-s3", "kold-pool"):

        def rss(name: str = name) -> tuple[bool, str]:
            if not chunk_size:
                return False, "kold's chunk size is unknown"
            added = got[name].delta_rss_mb * MB
            return added <= limit, (
                f"{name} added {added / MB:.0f} MB RSS; model {tensor_bytes / MB:.0f} MB + 2 chunks of "
                f"{chunk_size / MB:.0f} MB = {limit / MB:.0f} MB"
            )

        check(f"{name} peak RSS <= model size + 2 chunks", [name], rss)
    return out


def gpu_targets(outcomes: dict[str, Outcome]) -> list[dict[str, Any]]:
    """The issue's GPU targets: >= 80% of the pinned host-to-device bandwidth measured in the same run,
    and faster than every peer loading to CUDA (hot and cold, each against its own tier)."""
    got = {name: o for name, o in outcomes.items() if o.ok}
    out: list[dict[str, Any]] = []

    def add(label: str, passed: bool | None, detail: str) -> None:
        verdict = "SKIP" if passed is None else "PASS" if passed else "FAIL"
        out.append({"target": label, "verdict": verdict, "detail": detail})

    if "kold" in got and "h2d-pinned" in got:
        frac = got["h2d-pinned"].median_s / got["kold"].median_s
        add("kold to CUDA >= 80% of pinned H2D bandwidth", frac >= 0.8,
            f"kold {got['kold'].gbps:.2f} GB/s vs pinned H2D {got['h2d-pinned'].gbps:.2f} GB/s: {frac:.0%}")  # fmt: skip
    else:
        add("kold to CUDA >= 80% of pinned H2D bandwidth", None, "not measured: kold, h2d-pinned")
    for tier, name in (("hot", "kold"), ("cold", "kold-cold")):
        best = fastest(outcomes, tier)
        label = f"kold {tier} to CUDA faster than every {tier} peer"
        if name not in got or best is None:
            add(label, None, f"not measured: {name}" + ("" if best else f", a {tier} peer"))
            continue
        x = best.median_s / got[name].median_s
        add(label, x > 1.0, f"{name} {got[name].median_s:.3f} s vs {best.name} {best.median_s:.3f} s: {x:.2f}x")
    for name in ("kold-shm", "kold-shm-huge"):
        if name in got:
            stats = [r.get("kold_stats", {}) for r in got[name].runs]
            tiers = {s.get("source_tier") for s in stats}
            in_place = all(s.get("pinned_in_place") for s in stats)
            add(f"{name} to CUDA copies from the mapping pinned read-only in place (no staging)",
                tiers == {"shm"} and in_place,
                f"source tier {sorted(map(str, tiers))}, pinned in place: {in_place}, {got[name].gbps:.2f} GB/s")  # fmt: skip
    return out


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for pkg in ("kold", "torch", "safetensors", "tensorizer", "runai-model-streamer", "runai-model-streamer-s3",
                "boto3", "s3transfer", "numpy", "cupy-cuda12x", "cupy-cuda13x"):  # fmt: skip
        try:
            out[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            out[pkg] = "not installed"
    from kold.locals3 import find_rclone

    rclone = find_rclone()
    out["rclone"] = "not installed"
    if rclone:
        run = subprocess.run([rclone, "version"], capture_output=True, text=True, timeout=30, check=False)
        out["rclone"] = (run.stdout.splitlines() or ["?"])[0].removeprefix("rclone ").strip()
    return out


def machine() -> dict[str, Any]:
    import psutil
    import torch

    return {
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "memory_gib": round(psutil.virtual_memory().total / (1 << 30), 1),
        "gpu": torch.cuda.is_available(),
        "gpu_name": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "",
        "kernel": platform.release(),
        "processor": platform.processor() or platform.machine(),
    }


def plot(outcomes: dict[str, Outcome], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    done = [o for o in outcomes.values() if o.ok]
    if not done:
        return
    colors = {"limit": "#9e9e9e", "peer": "#4c72b0", "kold": "#dd8452"}
    fig, ax = plt.subplots(figsize=(9, 0.42 * len(done) + 1.6))
    names = [f"{o.name} ({METHODS[o.name].tier})" for o in done]
    speeds = [o.gbps for o in done]
    bars = ax.barh(names, speeds, color=[colors[METHODS[o.name].owner] for o in done])
    for bar, o in zip(bars, done, strict=True):
        ax.text(bar.get_width(), bar.get_y() + bar.get_height() / 2, f" {o.median_s:.2f} s", va="center", fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("GB/s (model bytes / median seconds; higher is better)")
    ax.set_title(title, fontsize=10)
    handles = [
        Patch(color=c, label=label) for c, label in zip(colors.values(), ["machine limit", "peer", "kold"], strict=True)
    ]
    ax.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, -0.6 / (0.42 * len(done))),
              ncol=3, fontsize=8, frameon=False)  # fmt: skip
    ax.margins(x=0.15)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
