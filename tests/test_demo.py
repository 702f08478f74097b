"""`kold demo`'s restores are labelled with what ran: the hot step is hot, the cold step's O_DIRECT is
reported, the pool step says it restored into a host pool segment because the restore says so; and
its platform part shows a cold start restoring into the pool `kold up` keeps by default."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from kold.commands.demo import destination_label, page_cache_state, print_summary, restore_from_local_store
from kold.modelgen import write_random_model
from kold.snapshot import build_snapshot
from kold.snapshot.store import data_key


@pytest.fixture(scope="module")
def published(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path]:
    """A tiny model published to a local store: its snapshot URI and data file."""
    root = tmp_path_factory.mktemp("demo")
    result = build_snapshot(write_random_model(root / "m", "llama", "tiny", seed=5), (root / "store").as_uri())
    return result.uri, root / "store" / data_key(result.manifest.id)


def test_the_hot_step_reads_through_the_page_cache_and_again_into_the_pool(
    published: tuple[str, Path], tmp_path: Path
) -> None:
    uri, data = published
    steps: list[tuple[str, dict[str, Any]]] = []
    restore_from_local_store(uri, data, lambda label, stats: steps.append((label, stats)), pool_root=tmp_path / "pool")
    (cold_label, cold), (hot_label, hot), (pool_label, pooled), (ring_label, ring) = steps
    # the cold read went around the page cache (this filesystem does O_DIRECT: test_direct_io.py) ...
    assert cold["direct_io"] and cold_label.startswith("local store, cold page cache (0% resident), O_DIRECT")
    # ... and the hot one did not: the demo read the file through the page cache in between
    assert not hot["direct_io"], hot
    assert hot_label == "local store, hot page cache (100% resident), read through the page cache"
    # the same read again, into a segment of a pool placed as `kold up` places its own
    assert pool_label == hot_label and pooled["pooled"] and not hot["pooled"]
    assert destination_label(pooled) == "host pool segment (pre-faulted)"
    assert destination_label(hot) == destination_label(cold) == "fresh memory"
    assert not ring["direct_io"] and ring_label.endswith(
        "read through the page cache, GPU-style pinned ring (CPU twin)"
    )
    assert page_cache_state(data) == "hot page cache (100% resident)"
    # the scratch pool is gone (its mount, when root could make one, too)
    mount = tmp_path / "pool" / "host-pool"
    assert not os.path.ismount(mount) and not (mount.exists() and any(mount.iterdir()))


def test_a_pool_restore_that_claimed_no_segment_is_labelled_fresh_and_has_no_ratio(
    capsys: pytest.CaptureFixture[str],
) -> None:
    def stats(total_s: float, pooled: bool) -> dict[str, Any]:
        return {"total_s": total_s, "gbps": 1.0, "pooled": pooled, "mapped": False, "pinned_in_place": False}

    same = "local store, hot page cache (100% resident), read through the page cache"
    print_summary([(same, stats(0.020, False)), (same, stats(0.010, True))])
    out = capsys.readouterr().out
    assert re.search(r"host pool segment \(pre-faulted\) +10\.0 ", out), out
    assert "the same read into pre-faulted memory took 10.0 ms, into fresh memory 20.0 ms: 2.0x faster" in out

    print_summary([(same, stats(0.020, False)), (same, stats(0.010, False))])  # the pool had no free segment
    out = capsys.readouterr().out
    assert "pre-faulted" not in out and out.count("fresh memory") == 2, out


def run_demo(tmp_path: Path, *args: str, timeout: float) -> dict[int, str]:
    """`kold demo --size tiny ARGS` as a user runs it; its output, one block per numbered step."""
    env = {**os.environ, "KOLD_HOME": str(tmp_path / "home")}
    done = subprocess.run(
        [sys.executable, "-m", "kold", "demo", "--size", "tiny", "--workdir", str(tmp_path / "work"), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    blocks = re.split(r"\n(?=\[\d+\] )", done.stdout)
    return {int(b[1 : b.index("]")]): b for b in blocks if re.match(r"\[\d+\] ", b)}


def test_kold_demo_prints_what_each_restore_did(tmp_path: Path) -> None:
    """The command itself, as a user runs it (no S3, no platform part)."""
    step = run_demo(tmp_path, "--no-serve", "--no-s3", timeout=240)
    assert step[3].startswith("[3] restore: local store, cold page cache (0% resident), O_DIRECT; into fresh memory\n")
    assert "O_DIRECT (the file was not in the page cache)" in step[3]  # the phase table's fetch line
    hot = "local store, hot page cache (100% resident), read through the page cache"
    assert step[4].startswith(f"[4] restore: {hot}; into fresh memory\n")
    assert "O_DIRECT" not in step[4]  # neither in the label nor in the phase table
    assert step[5].startswith(f"[5] restore: {hot}; into host pool segment (pre-faulted)\n")
    assert "source store, into a host pool segment" in step[5]  # the phase table's, from the same stats
    assert step[7].startswith("[7] restore: shm tier, mapped, no copy; into the shm tier's pages (mapped)\n")
    summary = step[7][step[7].index("restore summary") :]
    assert re.search(rf"{re.escape(hot)} +fresh memory +\d+\.\d ", summary), summary
    assert re.search(rf"{re.escape(hot)} +host pool segment \(pre-faulted\) +\d+\.\d ", summary), summary
    assert re.search(
        r"the same read into pre-faulted memory took [\d.]+ ms, into fresh memory [\d.]+ ms: [\d.]+x (faster|slower)",
        summary,
    ), summary


@pytest.mark.redis
@pytest.mark.timeout(300)
def test_kold_demo_platform_part_restores_the_cold_start_into_the_pool(tmp_path: Path) -> None:
    """The whole platform part (no S3): the cold start's instance holds a segment of the pool `kold up`
    keeps, describe says so, and each invoke says the mode it sent."""
    step = run_demo(tmp_path, "--no-s3", timeout=280)
    up, cold, status, warm, described = (step[n] for n in (8, 10, 11, 12, 13))
    assert up.startswith("[8] $ kold up --detach")
    assert "has 4 free segment(s) for it" in step[9]  # the wait before the cold start: --max-instances 4
    assert cold.startswith("[10] $ kold invoke llama-tiny 'The cold start of a function' --completion")
    assert "\ncold (completion): first token" in cold
    assert status.startswith("[11] $ kold snapshot pool status") and "4 segments" in status
    assert "1 in use" in status, status
    assert warm.startswith("[12] $ kold invoke llama-tiny 'Say hello' --chat") and " (chat): first token" in warm
    instances = described[described.index("Instances") :]
    assert re.search(r"llama-tiny-00001-2 +ready .* store→pool ", instances), instances
    assert "→pool: restored into a segment of the node's pre-faulted host pool" in instances
    assert step[15].startswith("[15] $ kold down")
