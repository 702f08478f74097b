"""A pytest plugin: a skipped test fails the run unless it is marked `gpu`.

Skips hide breakage: a test that skips because a service is not running, or because one of kold's
own modules fails to import, looks like a pass in the summary. The suite starts every service it
needs itself, so the only legitimate reason to skip is hardware the machine does not have (CUDA);
those tests carry the `gpu` marker. Every other skip is listed at the end and the run fails.
An expected failure (`xfail`) is not a skip.

A module that skips while it is imported (`pytest.skip(..., allow_module_level=True)`) is never
turned into items, so its marks are never applied: whether it is a `gpu` module is read from the
`pytestmark = ...` assignment in its source.
"""

from __future__ import annotations

import ast
from collections.abc import Generator
from pathlib import Path

import pytest

ALLOWED_MARKER = "gpu"


def declares_marker(path: Path, marker: str) -> bool:
    """Whether the module's top-level `pytestmark` names `pytest.mark.<marker>` (read, not run)."""
    try:
        tree = ast.parse(path.read_text(), str(path))
    except (OSError, SyntaxError, ValueError):
        return False
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "pytestmark" for t in node.targets):
            value: ast.expr | None = node.value
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and node.target.id == "pytestmark":
            value = node.value
        else:
            continue
        if value is not None and any(
            isinstance(n, ast.Attribute)
            and n.attr == marker
            and isinstance(n.value, ast.Attribute)
            and n.value.attr == "mark"
            for n in ast.walk(value)
        ):
            return True
    return False


def _reason(report: pytest.CollectReport | pytest.TestReport) -> str:
    longrepr = report.longrepr
    if isinstance(longrepr, tuple) and len(longrepr) == 3:
        return str(longrepr[2]).removeprefix("Skipped: ")
    return str(longrepr)


class SkipPolicy:
    """The plugin's state for one run: which items are `gpu`, and the skips that break the rule."""

    def __init__(self) -> None:
        self.gpu_items: set[str] = set()
        self.bad: list[tuple[str, str]] = []  # (node id, reason)

    def pytest_collection_modifyitems(self, items: list[pytest.Item]) -> None:
        self.gpu_items.update(item.nodeid for item in items if item.get_closest_marker(ALLOWED_MARKER))

    @pytest.hookimpl(wrapper=True)
    def pytest_make_collect_report(
        self, collector: pytest.Collector
    ) -> Generator[None, pytest.CollectReport, pytest.CollectReport]:
        report = yield
        module = isinstance(collector, pytest.Module)
        if report.skipped and module and not declares_marker(collector.path, ALLOWED_MARKER):
            self.bad.append((report.nodeid, _reason(report)))
        return report

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        if report.skipped and not hasattr(report, "wasxfail") and report.nodeid not in self.gpu_items:
            self.bad.append((report.nodeid, _reason(report)))

    def pytest_sessionfinish(self, session: pytest.Session) -> None:
        if self.bad and session.exitstatus in (pytest.ExitCode.OK, pytest.ExitCode.NO_TESTS_COLLECTED):
            session.exitstatus = pytest.ExitCode.TESTS_FAILED

    def pytest_terminal_summary(self, terminalreporter: pytest.TerminalReporter) -> None:
        if not self.bad:
            return
        title = f"{len(self.bad)} skipped that must not skip: only `{ALLOWED_MARKER}` tests may (this fails the run)"
        terminalreporter.write_sep("=", title, red=True)
        for nodeid, reason in self.bad:
            terminalreporter.write_line(f"SKIPPED {nodeid}: {reason}")


def pytest_configure(config: pytest.Config) -> None:
    config.pluginmanager.register(SkipPolicy(), "kold-skip-policy")
