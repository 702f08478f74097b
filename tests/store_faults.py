"""Real filesystem faults for the tests of publishing into a `file://` store: a full disk (a tiny
tmpfs), an immutable directory (`chattr +i`), a read-only mount, and a fingerprint of a store to
show that a failed publish left it exactly as it was.

They are the kernel's own refusals, not patched functions: mounting and `chattr +i` need root
(CAP_SYS_ADMIN, CAP_LINUX_IMMUTABLE), which the test machines have. Without it these tests fail
with a message saying so: a skip would hide that they never ran (tests/skip_policy.py).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest


def require_root() -> None:
    if os.geteuid() != 0:
        pytest.fail("this test makes real filesystem faults (mount, chattr +i): run it as root")


def fingerprint(root: Path) -> dict[str, str]:
    """Every path under `root`: a file's sha256, "dir" for a directory. Equal fingerprints: the
    same tree, byte for byte (an empty directory a failed publish left behind counts too)."""
    found = {}
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).as_posix()
        found[rel] = "dir" if path.is_dir() else hashlib.sha256(path.read_bytes()).hexdigest()
    return found


def _run(*argv: str) -> None:
    result = subprocess.run(argv, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        pytest.fail(f"{' '.join(argv)} failed: {result.stderr.strip()}")


@contextmanager
def tiny_tmpfs(path: Path, size: str = "64k") -> Iterator[Path]:
    """A tmpfs of `size` mounted at `path` (created): a disk that fills up after a few pages."""
    require_root()
    path.mkdir(parents=True, exist_ok=True)
    _run("mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path))
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True, check=False)


@contextmanager
def immutable(path: Path) -> Iterator[Path]:
    """`chattr +i path`: nothing may be created, removed or renamed in it, even by root (EPERM)."""
    require_root()
    if shutil.which("chattr") is None:
        pytest.fail("chattr is not installed (Debian: e2fsprogs)")
    _run("chattr", "+i", str(path))
    try:
        yield path
    finally:
        subprocess.run(["chattr", "-i", str(path)], capture_output=True, check=False)


@contextmanager
def read_only(path: Path) -> Iterator[Path]:
    """`path` bind-mounted over itself read-only: every write under it is EROFS."""
    require_root()
    _run("mount", "--bind", str(path), str(path))
    try:
        _run("mount", "-o", "remount,bind,ro", str(path))
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True, check=False)
