"""`kold deploy` into a store that refuses the write (issue 11, item 8), against a real `kold up`:
a full disk (ENOSPC, a 64 KiB tmpfs), an immutable directory (EPERM, `chattr +i`), a read-only
mount (EROFS) and a directory without write permission (EACCES: the CLI runs without the
capabilities that let root ignore permissions). Each is one `kold: error:` line naming the path
and the cause, exit status 1, and the store byte-identical afterwards (every file hashed).
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path

import pytest
import torch
from kold_up import kold, platform_env, running_platform
from store_faults import fingerprint, immutable, read_only, require_root, tiny_tmpfs

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def platform(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    with running_platform(platform_env(tmp_path_factory.mktemp("platform"))) as env:
        yield env


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from kold.modelgen import write_random_model

    return write_random_model(tmp_path_factory.mktemp("model") / "tiny", "llama", "tiny")


def _store_with_a_snapshot(root: Path) -> Path:
    """A store that already holds one snapshot: what a failed deploy must leave exactly as it was."""
    from kold.snapshot import build_snapshot

    build_snapshot({"kept": torch.arange(16, dtype=torch.float32)}, root.as_uri(), chunk_size=4096)
    return root


@contextmanager
def _full_disk(tmp: Path) -> Iterator[Path]:
    with tiny_tmpfs(tmp / "disk", "64k") as disk:
        yield _store_with_a_snapshot(disk / "store")


@contextmanager
def _immutable(tmp: Path) -> Iterator[Path]:
    store = _store_with_a_snapshot(tmp / "store")
    with immutable(store / "snapshots"):
        yield store


@contextmanager
def _read_only(tmp: Path) -> Iterator[Path]:
    store = _store_with_a_snapshot(tmp / "store")
    with read_only(store):
        yield store


@contextmanager
def _no_write_permission(tmp: Path) -> Iterator[Path]:
    store = _store_with_a_snapshot(tmp / "store")
    (store / "snapshots").chmod(0o555)
    try:
        yield store
    finally:
        (store / "snapshots").chmod(0o755)


def _without_dac_override() -> list[str]:
    """A prefix that runs a command as root without CAP_DAC_OVERRIDE (and DAC_READ_SEARCH), so that
    file permissions bind it as they bind any user: how these tests meet EACCES as root."""
    require_root()
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.fail("setpriv is not installed (Debian: util-linux)")
    return [setpriv, "--bounding-set", "-dac_override,-dac_read_search"]


@pytest.mark.parametrize(
    ("fault", "cause"),
    [
        (_full_disk, "No space left on device (ENOSPC)"),
        (_immutable, "Operation not permitted (EPERM)"),
        (_read_only, "Read-only file system (EROFS)"),
        (_no_write_permission, "Permission denied (EACCES)"),
    ],
)
def test_deploy_into_a_store_that_refuses_is_one_line_and_the_store_is_unchanged(
    platform: dict[str, str],
    model: Path,
    tmp_path: Path,
    fault: Callable[[Path], AbstractContextManager[Path]],
    cause: str,
) -> None:
    with fault(tmp_path) as store:
        before = fingerprint(store)
        env = {**platform, "KOLD_STORE": store.as_uri()}
        prefix = _without_dac_override() if fault is _no_write_permission else []
        result = kold("deploy", str(model), "--name", "tiny", env=env, prefix=prefix)
        assert result.returncode == 1, (result.stdout, result.stderr)
        assert "Traceback" not in result.stderr, result.stderr
        errors = [line for line in result.stderr.splitlines() if line.startswith("kold: error:")]
        assert len(errors) == 1, result.stderr
        assert errors[0].startswith(f"kold: error: cannot write {store}/snapshots/") and cause in errors[0]
        assert result.stderr.rstrip().endswith(errors[0])  # the last word, after the progress lines
        assert fingerprint(store) == before
    listed = kold("ls", env=platform)
    assert listed.returncode == 0 and "tiny" not in listed.stdout  # nothing was deployed
