"""How `kold` commands print: data on stdout, words for people on stderr.

A command whose stdout is data (a table, a URI, generated text, `-o json|yaml`) keeps it clean for
scripts: `URI=$(kold snapshot build ./m)` and `kold invoke x hi > out.txt` get the data alone,
while progress, status lines and footers go to stderr, where a person at a terminal still sees them.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from typing import Any
from urllib.parse import urlsplit

FORMATS = ("json", "yaml")


def add_output_option(parser: argparse.ArgumentParser) -> None:
    """`-o json|yaml` (as kubectl and `kn` spell it), and `--json`, kept as its alias."""
    parser.add_argument(
        "-o", "--output", choices=FORMATS, help="print machine-readable output instead of the text view"
    )
    parser.add_argument("--json", dest="output", action="store_const", const="json", help="same as -o json")


def print_data(data: Any, fmt: str) -> None:
    """`data` in the format `-o` asked for, on stdout."""
    if fmt == "yaml":
        import yaml

        sys.stdout.write(yaml.safe_dump(data, sort_keys=True, default_flow_style=False, allow_unicode=True))
    else:
        print_json(data)


def print_json(data: Any) -> None:
    print(json.dumps(data, indent=2, sort_keys=True))


def note(message: str) -> None:
    """A line meant for a person (status, progress, hints): on stderr, so that stdout stays data."""
    print(message, file=sys.stderr, flush=True)


def human_bytes(n: int) -> str:
    """1.5 GiB, 2.0 MiB, 512 B: binary units, as sizes are given to `--size` and KOLD_*_BYTES."""
    for unit, shift in (("TiB", 40), ("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift:
            return f"{n / (1 << shift):.{2 if unit in ('TiB', 'GiB') else 1}f} {unit}"
    return f"{n} B"


def human_age(seconds: float) -> str:
    """Like kubectl's AGE: 42s, 3m12s, 2h5m, 4d3h."""
    s = max(0, int(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60}m"
    return f"{s // 86400}d{s % 86400 // 3600}h"


def human_time(stamp: float, now: float | None = None) -> str:
    """A Unix time as local time and how long ago: `2026-11-23 14:02:11 (3m12s ago)`."""
    now = time.time() if now is None else now
    return f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(stamp))} ({human_age(now - stamp)} ago)"


def redact_url(url: str) -> str:
    """`url` fit for a log line or an error: a password in it (`redis://user:secret@host`,
    `redis://:secret@[::1]:6379`, `unix://:secret@/run/redis.sock`, `?password=secret`) shown as ***,
    because pod logs and terminals are widely read. The rest is left as given, IPv6 brackets included;
    a URL too malformed to split keeps its scheme only."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return f"{url.partition(':')[0]}://***" if "://" in url else "***"
    userinfo, at, host = parts.netloc.rpartition("@")
    netloc = parts.netloc
    if at and ":" in userinfo:
        netloc = f"{userinfo.partition(':')[0]}:***@{host}"
    query = re.sub(r"(^|[&;])(password=)[^&;]*", r"\1\2***", parts.query, flags=re.IGNORECASE)
    if (netloc, query) == (parts.netloc, parts.query):
        return url
    # by hand, not urlunsplit: that drops the empty authority of unix:///path
    return (
        f"{parts.scheme}://{netloc}{parts.path}"
        + (f"?{query}" if query else "")
        + (f"#{parts.fragment}" if parts.fragment else "")
    )
