"""`kold describe`'s view of a function: the admin API's JSON as a kubectl-describe-like text."""

from __future__ import annotations

import time
from typing import Any

from kold.output import human_age, human_time

_ENDED_SHOWN = 5  # stopped/failed instances listed by `describe` (the newest); -o json has all


def format_describe(doc: dict[str, Any], gateway_url: str, now: float | None = None) -> str:
    """`kold describe`'s view of GET /admin/functions/NAME: the function, its revisions, its instances.

    Written for people, like `kubectl describe`: every field may be missing or None (an older
    gateway, an instance that is not ready yet) and shows as '-' rather than failing.
    """
    now = time.time() if now is None else now
    name = str(doc.get("name") or "?")
    serving = doc.get("serving")
    revisions = [r for r in _list(doc.get("revisions")) if isinstance(r, dict)]
    instances = [i for i in _list(doc.get("instances")) if isinstance(i, dict)]
    base = gateway_url.rstrip("/")
    shown = next((r for r in revisions if r.get("id") == serving), revisions[-1] if revisions else {})

    fields = [
        ("Name", name),
        ("URL", f"{base}/v1/functions/{name}/v1/chat/completions"),
        ("", f"{base}/v1/functions/{name}/v1/completions"),
        ("OpenAI clients", f"base_url={base}/v1, model={name}"),
        ("Serving", serving or "- (no revision is serving yet)"),
    ]
    scaling = _dict(shown.get("scaling"))
    if scaling:
        fields.append(
            (
                "Scaling",
                f"{_v(scaling.get('min_instances'))}..{_v(scaling.get('max_instances'))} instances, "
                f"{_v(scaling.get('target_concurrency'))} in flight per instance, "
                f"idle timeout {_v(scaling.get('idle_timeout_s'))} s, request timeout {_v(scaling.get('request_timeout_s'))} s",
            )
        )
    if "prewarm" in doc or "floor" in doc:  # a gateway with the pre-warm controller's floors
        fields.append(("Pre-warm", _v(doc.get("prewarm"))))
        fields.append(("Floor", _floor(_dict(doc.get("floor")), now)))
    runtime = _dict(shown.get("runtime"))
    if runtime:
        seq = runtime.get("max_seq_len")
        seq_text = "the model's" if seq is None else str(seq)
        fields.append(
            (
                "Runtime",
                f"device {_v(runtime.get('device'))}, max batch {_v(runtime.get('max_batch'))}, "
                f"max sequence length {seq_text}",
            )
        )
    width = max(len(k) for k, _ in fields) + 2
    lines = [f"{k + ':' if k else '':<{width}}{v}" for k, v in fields]

    lines += ["", "Revisions:"]
    rows = [
        [
            str(r.get("id") or "-"),
            _snapshot_short(r.get("snapshot_uri")),
            _when(r.get("created_at"), now),
            "*" if serving is not None and r.get("id") == serving else "",
        ]
        for r in revisions
    ]
    lines += _table(["ID", "SNAPSHOT", "CREATED", "SERVING"], rows) if rows else ["  (none)"]
    for r in revisions:
        failure = _dict(r.get("start_failure"))
        if failure:
            state = "FAILED" if failure.get("failed") else "failing"
            lines.append(
                f"  {r.get('id')} {state}: {_v(failure.get('code'))}: {_v(failure.get('error'))} "
                f"({_v(failure.get('failed_starts'))} failed starts since {_when(failure.get('since'), now)}; "
                f"next start in {_v(failure.get('next_start_in_s'))} s)"
            )

    live = [i for i in instances if i.get("state") not in ("stopped", "failed")]
    ended = [i for i in instances if i.get("state") in ("stopped", "failed")]
    listed = live + ended[-_ENDED_SHOWN:]
    lines += ["", f"Instances ({len(live)} running):"]
    rows = []
    for inst in sorted(listed, key=lambda i: _number(i.get("started_at")) or 0.0):
        cold = _dict(inst.get("cold_start"))
        phases = _dict(cold.get("phases_ms"))
        rows.append(
            [
                str(inst.get("id") or "-"),
                str(inst.get("state") or "-"),
                _port(inst.get("url")),
                _v(inst.get("in_flight")),
                _age(inst.get("started_at"), now),
                _ms(cold.get("imports_ms")),
                _ms(phases.get("torch_import")),
                _ms(phases.get("restore")),
                _tier(_dict(cold.get("restore"))),
                _ms(phases.get("model")),
                _ms(cold.get("ready_ms")),
            ]
        )
    headers = ["ID", "STATE", "PORT", "IN-FLIGHT", "AGE", "IMPORTS", "TORCH", "RESTORE", "TIER", "BUILD", "READY"]
    lines += _table(headers, rows, right={2, 3, 4, 5, 6, 7, 9, 10}) if rows else ["  (none: scaled to zero)"]
    if rows:
        lines.append(
            "  cold start (ms): IMPORTS and READY after the process started; TORCH (import), RESTORE, BUILD took"
        )
        lines.append(
            "  that long (they overlap: the restore runs while torch imports); TIER: where the weights came from"
        )
        if any(r[headers.index("TIER")].endswith("→pool") for r in rows):
            lines.append("  →pool: restored into a segment of the node's pre-faulted host pool, not fresh memory")
    failed = [i for i in listed if _dict(i.get("failure"))]
    for inst in failed[-_ENDED_SHOWN:]:
        failure = _dict(inst.get("failure"))
        lines.append(f"  {inst.get('id')} failed: {_v(failure.get('code'))}: {_v(failure.get('error'))}")
    if len(ended) > _ENDED_SHOWN:
        lines.append(f"  ({len(ended) - _ENDED_SHOWN} earlier stopped instances not shown: -o json lists all)")
    return "\n".join(lines)


def _floor(floor: dict[str, Any], now: float) -> str:
    """The floor the pre-warm controller holds, and why: `1 instance for 4m10s more (until 14:02:11),
    idle timeout 60 s: fixed-keepalive: 10 min after the last request`."""
    until = _number(floor.get("until"))
    if not floor or until is None or until <= now:
        return "none (the scaling spec alone decides)"
    n = floor.get("instances")
    count = f"{_v(n)} instance{'' if n == 1 else 's'}"
    idle = _number(floor.get("idle_timeout_s"))
    keep = "" if idle is None else f", idle timeout {idle:g} s"
    end = time.strftime("%H:%M:%S", time.localtime(until))
    return f"{count} for {human_age(until - now)} more (until {end}){keep}: {_v(floor.get('reason'))}"


def _table(headers: list[str], rows: list[list[str]], right: set[int] | None = None) -> list[str]:
    """Columns as wide as their widest cell, two spaces apart, indented like kubectl's sections."""
    widths = [max(len(h), *(len(r[c]) for r in rows)) for c, h in enumerate(headers)]
    right = right or set()

    def line(cells: list[str]) -> str:
        return (
            "  "
            + "  ".join(
                cell.rjust(w) if c in right else cell.ljust(w)
                for c, (cell, w) in enumerate(zip(cells, widths, strict=True))
            ).rstrip()
        )

    return [line(headers), *(line(r) for r in rows)]


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


def _v(value: Any) -> str:
    return "-" if value is None or value == "" else str(value)


def _tier(restore: dict[str, Any]) -> str:
    """Where the weights came from, and `→pool` when the restore wrote them into a host pool segment
    (the fast path `kold up` keeps by default) rather than fresh memory."""
    tier = _v(restore.get("source_tier"))
    return f"{tier}→pool" if restore.get("pooled") is True else tier


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def _ms(value: Any) -> str:
    number = _number(value)
    return "-" if number is None else f"{number:.0f}"


def _port(url: Any) -> str:
    host, _, port = str(url or "").rpartition(":")
    return port if host and port.isdigit() else "-"


def _snapshot_short(uri: Any) -> str:
    """The snapshot id's first 12 hex digits (a store URI ends in snapshots/<id>)."""
    tail = str(uri or "").rstrip("/").rpartition("/")[2]
    return tail[:12] if tail else "-"


def _age(started: Any, now: float) -> str:
    start = _number(started)
    return "-" if start is None else human_age(now - start)


def _when(ts: Any, now: float) -> str:
    stamp = _number(ts)
    return "-" if stamp is None else human_time(stamp, now)
