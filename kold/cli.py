"""The `kold` command line. Thin: parse flags, build settings, call the library, print results.

Every error a user can cause ends as one line `kold: error: ...` and exit status 1, never a
traceback; usage errors (argparse's) exit 2, as kubectl's and `kn`'s do (kold/errors.py).
Data goes to stdout and words for people to stderr (kold/output.py).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from kold import __version__
from kold.errors import run_command

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kold", description="Serverless LLM inference with fast cold starts.")
    parser.add_argument("--version", action="version", version=f"kold {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at DEBUG level")
    parser.add_argument(
        "--url",
        help="the gateway client commands talk to (default: KOLD_GATEWAY_URL, else the platform `kold up` started)",
    )
    top = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    from kold.commands import controller, demo, loadgen, model, node, platform, runtime, sim, snapshot

    model.register(top)
    snapshot.register(top)
    demo.register(top)
    runtime.register(top)
    platform.register(top)
    loadgen.register(top)
    sim.register(top)
    controller.register(top)
    node.register(top)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    return run_command(build_parser(), argv)
