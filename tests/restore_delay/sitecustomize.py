"""Test-only: hold a runtime's restore back, so tests can watch requests queue during a cold start.

Python imports `sitecustomize` at start-up from the first folder on its path that has one. Tests put
this folder on PYTHONPATH, with KOLDTEST_RESTORE_DELAY_S, in the environment of the runtime
processes they start (tests/runtime/runtime_helpers.py: `restore_delay_env`), forked instances
included: the fork template
imports this at its start and the instances it forks inherit it. Production never has this folder on
its path, so the delay is no setting of kold's and no production code reads it.

The hook wraps `kold.runtime.backend.snapshot_loader` (which `kold runtime serve` looks up when it
runs): the loader it makes waits KOLDTEST_RESTORE_DELAY_S seconds, read when the load begins (a forked
instance's own environment), or until the load is cancelled, before it restores.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from typing import Any

DELAY_VARIABLE = "KOLDTEST_RESTORE_DELAY_S"


def _install() -> None:
    from kold.runtime import backend

    make_loader = backend.snapshot_loader

    def delayed_snapshot_loader(*args: Any, **kwargs: Any) -> Any:
        load = make_loader(*args, **kwargs)

        def delayed(cancel: threading.Event, early: Callable[..., None] | None = None) -> Any:
            delay = float(os.environ.get(DELAY_VARIABLE) or 0)
            if delay > 0 and cancel.wait(delay):
                raise RuntimeError("cancelled before the restore started")
            return load(cancel, early)

        return delayed

    backend.snapshot_loader = delayed_snapshot_loader  # type: ignore[assignment]


if os.environ.get(DELAY_VARIABLE) and __name__ == "sitecustomize":
    _install()
