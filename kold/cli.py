"""The `kold` command line. Thin: parse flags, build settings, call the library, print results.

Every error a user can cause ends as one line `kold: error: ...` and exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from kold import __version__
from kold.settings import Settings, load_settings, parse_size

Handler = Callable[[argparse.Namespace, Settings], int]


class CLIError(Exception):
    """A problem with what the user asked for, reported as one line."""


def _size_arg(text: str) -> int:
    try:
        return parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kold", description="Serverless LLM inference with fast cold starts.")
    parser.add_argument("--version", action="version", version=f"kold {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at DEBUG level")
    top = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    from kold.commands import demo, model, platform, runtime, snapshot

    model.register(top)
    snapshot.register(top)
    demo.register(top)
    runtime.register(top)
    platform.register(top)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        settings = load_settings()
    except ValueError as exc:  # pydantic's ValidationError is a ValueError
        print(f"kold: error: invalid KOLD_* setting: {exc}", file=sys.stderr)
        return 2
    # The CLI prints its own summaries: library logs show from WARNING up, unless -v asks for all.
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    handler: Handler = args.handler
    from kold.snapshot.errors import SnapshotError

    try:
        return handler(args, settings)
    except (CLIError, SnapshotError, ValueError, FileNotFoundError) as exc:
        print(f"kold: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("kold: interrupted", file=sys.stderr)
        return 130


def human_bytes(n: int) -> str:
    """1.5 GiB, 2.0 MiB, 512 B: binary units, as sizes are given to `--size` and KOLD_*_BYTES."""
    for unit, shift in (("TiB", 40), ("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift:
            return f"{n / (1 << shift):.{2 if unit in ('TiB', 'GiB') else 1}f} {unit}"
    return f"{n} B"


def print_json(data: Any) -> None:
    print(json.dumps(data, indent=2, sort_keys=True))


def existing_dir(text: str) -> Path:
    path = Path(text).expanduser()
    if not path.is_dir():
        raise argparse.ArgumentTypeError(f"{text}: not a directory")
    return path
