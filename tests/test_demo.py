"""`kold demo`'s restores are labelled with what ran: the hot step is hot, the cold step's O_DIRECT is reported."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from kold.commands.demo import page_cache_state, restore_from_local_store
from kold.modelgen import write_random_model
from kold.snapshot import build_snapshot
from kold.snapshot.store import data_key


@pytest.fixture(scope="module")
def published(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path]:
    """A tiny model published to a local store: its snapshot URI and data file."""
    root = tmp_path_factory.mktemp("demo")
    result = build_snapshot(write_random_model(root / "m", "llama", "tiny", seed=5), (root / "store").as_uri())
    return result.uri, root / "store" / data_key(result.manifest.id)


def test_the_hot_step_reads_through_the_page_cache(published: tuple[str, Path]) -> None:
    uri, data = published
    steps: list[tuple[str, dict[str, Any]]] = []
    restore_from_local_store(uri, data, lambda label, stats: steps.append((label, stats)))
    (cold_label, cold), (hot_label, hot), (ring_label, ring) = steps
    # the cold read went around the page cache (this filesystem does O_DIRECT: test_direct_io.py) ...
    assert cold["direct_io"] and cold_label.startswith("local store, cold page cache (0% resident), O_DIRECT")
    # ... and the hot one did not: the demo read the file through the page cache in between
    assert not hot["direct_io"], hot
    assert hot_label == "local store, hot page cache (100% resident), read through the page cache"
    assert not ring["direct_io"] and ring_label.endswith(
        "read through the page cache, GPU-style pinned ring (CPU twin)"
    )
    assert page_cache_state(data) == "hot page cache (100% resident)"


def test_kold_demo_prints_what_each_restore_did(tmp_path: Path) -> None:
    """The command itself, as a user runs it (no S3, no platform part)."""
    env = {**os.environ, "KOLD_HOME": str(tmp_path / "home")}
    done = subprocess.run(
        [sys.executable, "-m", "kold", "demo", "--no-serve", "--no-s3", "--workdir", str(tmp_path / "work")],
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    blocks = re.split(r"\n(?=\[\d+\] )", done.stdout)  # one per numbered step
    step = {int(b[1 : b.index("]")]): b for b in blocks if re.match(r"\[\d+\] ", b)}
    assert step[3].startswith("[3] restore: local store, cold page cache (0% resident), O_DIRECT\n")
    assert "O_DIRECT (the file was not in the page cache)" in step[3]  # the phase table's fetch line
    assert step[4].startswith("[4] restore: local store, hot page cache (100% resident), read through the page cache\n")
    assert "O_DIRECT" not in step[4]  # neither in the label nor in the phase table
    assert step[6].startswith("[6] restore: shm tier, mapped, no copy\n")
