"""What can go wrong in a `kold` command, and how it ends: one line on stderr and an exit status.

The exit statuses follow kubectl and `kn`: 1 for an error, 2 for a usage error (argparse's own:
an unknown flag, a missing argument, an argument of the wrong form), 130 for Ctrl-C. A closed
stdout (`kold describe x -o json | head -1`) ends quietly, as it ends `cat` or kubectl.

Its own module so that `kold.cli`, `kold.commands.*` and the library code the CLI drives
(`kold.platform_client`, `kold.localredis`) can all raise `CLIError` without importing each other.
"""

from __future__ import annotations

import argparse
import errno
import logging
import os
import signal
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from kold.settings import Settings

Handler = Callable[[argparse.Namespace, "Settings"], int]

EXIT_ERROR = 1
EXIT_USAGE = 2  # what argparse exits with
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as a shell reports Ctrl-C
# 128 + SIGPIPE: what a shell reports for `cat` or kubectl when the reader of their stdout went away
EXIT_BROKEN_PIPE = 128 + signal.SIGPIPE


class CLIError(Exception):
    """A problem with what the user asked for, reported as one line (exit status 1)."""


def existing_dir(text: str) -> Path:
    """An argparse type: a directory that exists (otherwise a usage error, exit status 2)."""
    path = Path(text).expanduser()
    if not path.is_dir():
        raise argparse.ArgumentTypeError(f"{text}: not a directory")
    return path


def run_command(parser: argparse.ArgumentParser, argv: Sequence[str] | None = None) -> int:
    """Parse `argv`, build the settings, run the chosen handler; every way it can end, as an exit status.

    The one place where errors become exit statuses, shared by `kold` (kold.cli) and by the
    runtime's own entry (`kold.commands.runtime.main`, which forked instances call).
    """
    try:
        return _run(parser, argv)
    except BrokenPipeError:
        # The Python docs' recipe (library/signal.html, "Note on SIGPIPE"): the reader is gone, so
        # point stdout at /dev/null, or the interpreter's final flush would fail again, with a traceback
        _quiet_stdout()
        return EXIT_BROKEN_PIPE


def _run(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> int:
    args = parser.parse_args(argv)  # a usage error prints itself and exits 2
    from kold.settings import load_settings

    try:
        settings = load_settings()
    except ValueError as exc:  # pydantic's ValidationError is a ValueError
        print(f"kold: error: invalid KOLD_* setting: {exc}", file=sys.stderr)
        return EXIT_ERROR
    # The CLI prints its own summaries: library logs show from WARNING up, unless -v asks for all.
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    handler: Handler = args.handler
    from kold.snapshot.errors import SnapshotError

    try:
        status = handler(args, settings)
        sys.stdout.flush()  # here, so that a closed pipe is caught above rather than at interpreter exit
        return status
    except (CLIError, SnapshotError, ValueError) as exc:
        print(f"kold: error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except BrokenPipeError:
        raise  # a closed stdout ends quietly (run_command), not as an error
    except OSError as exc:
        # the machine refused something (a missing file, a full disk, a read-only or immutable
        # directory, permissions): the user can act on the path and the cause, not on a traceback
        print(f"kold: error: {describe_os_error(exc)}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("kold: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


def describe_os_error(exc: OSError) -> str:
    """`exc` as one line: the path (both, for a rename), the cause and its errno's name, e.g.
    `/data/store/x: No space left on device (ENOSPC)`."""
    cause = exc.strerror or str(exc) or type(exc).__name__
    name = errno.errorcode.get(exc.errno or 0)
    if name:
        cause = f"{cause} ({name})"
    paths = [str(p) for p in (exc.filename, exc.filename2) if p is not None]
    return f"{' -> '.join(paths)}: {cause}" if paths else cause


def _quiet_stdout() -> None:
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):  # stdout is closed or not a file: nothing left to flush into it
        pass
    finally:
        os.close(devnull)
