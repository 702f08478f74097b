"""`kold snapshot ...` as a user runs it: real subprocesses, readable output, one-line errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest


def kold(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "kold", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **(env or {})},
        check=False,
    )


@pytest.fixture
def cli_env(tmp_path: Path) -> dict[str, str]:
    return {
        "KOLD_HOME": str(tmp_path / "home"),
        "KOLD_CACHE_SHM_DIR": str(tmp_path / "shm"),
        "KOLD_CACHE_SHM_BYTES": "1GiB",
    }


def test_build_inspect_restore_prefetch(tiny_model: Path, tmp_path: Path, cli_env: dict[str, str]) -> None:
    store = (tmp_path / "store").as_uri()
    built = kold("snapshot", "build", str(tiny_model), "--to", store, "--chunk-size", "64KiB", env=cli_env)
    assert built.returncode == 0, built.stderr
    uri = built.stdout.strip()  # the URI alone: URI=$(kold snapshot build ...)
    assert uri.startswith(store + "/snapshots/") and "\n" not in uri
    assert "published" in built.stderr

    again = kold("snapshot", "build", str(tiny_model), "--to", store, "--chunk-size", "64KiB", env=cli_env)
    assert "nothing uploaded" in again.stderr and again.stdout.strip() == uri

    inspected = kold("snapshot", "inspect", uri, "--tensors", env=cli_env)
    assert inspected.returncode == 0, inspected.stderr
    assert "model.layers.0.self_attn.q_proj.weight" in inspected.stdout and "config.json" in inspected.stdout
    doc = json.loads(kold("snapshot", "inspect", uri, "--json", env=cli_env).stdout)
    assert doc["id"] == uri.rsplit("/", 1)[1] and doc["version"] == 1

    restored = kold("snapshot", "restore", uri, "--verify", env=cli_env)
    assert restored.returncode == 0, restored.stderr
    for phase in ("metadata", "fetch", "host->device", "verify", "total"):
        assert phase in restored.stdout
    stats = json.loads(kold("snapshot", "restore", uri, "--json", env=cli_env).stdout)
    assert stats["source_tier"] == "shm"  # the first restore filled the tier

    prefetched = kold("snapshot", "prefetch", uri, env=cli_env)
    assert prefetched.returncode == 0 and "shm" in prefetched.stdout


@pytest.mark.parametrize(
    ("args", "message", "status"),
    [
        (("snapshot", "restore", "file:///nowhere/snapshots/0123456789abcdef0123456789abcdef"), "is not in", 1),
        (("snapshot", "restore", "not-a-uri"), "is not a snapshot URI", 1),
        (("snapshot", "inspect", "ftp://x/snapshots/0123456789abcdef0123456789abcdef"), "unsupported store scheme", 1),
        (("snapshot", "build", "/definitely/not/here"), "not a directory", 2),  # a usage error (argparse's)
        (("snapshot", "restore", "file:///x/snapshots/0123456789abcdef0123456789abcdef", "--device", "tpu"), "", 1),
    ],
)
def test_bad_input_is_one_line_not_a_traceback(
    args: tuple[str, ...], message: str, status: int, cli_env: dict[str, str]
) -> None:
    """Exit 1 for an error, 2 for a usage error, as kubectl and kn do."""
    result = kold(*args, env=cli_env)
    assert result.returncode == status
    assert "Traceback" not in result.stderr
    assert message in result.stderr


def test_bad_setting_is_reported(cli_env: dict[str, str]) -> None:
    result = kold("snapshot", "prefetch", "x", env={**cli_env, "KOLD_CACHE_SHM_BYTES": "lots"})
    assert result.returncode == 1 and "KOLD_" in result.stderr and "Traceback" not in result.stderr


def test_make_tiny_writes_a_loadable_model(tmp_path: Path, cli_env: dict[str, str]) -> None:
    out = tmp_path / "m"
    result = kold("model", "make-tiny", str(out), env=cli_env)
    assert result.returncode == 0, result.stderr
    assert (out / "config.json").is_file() and (out / "model.safetensors").is_file()
    refused = kold("model", "make-tiny", str(out), env=cli_env)
    assert refused.returncode == 1 and "not empty" in refused.stderr


def test_the_phase_table_says_when_the_file_was_read_with_o_direct(capsys: pytest.CaptureFixture[str]) -> None:
    from kold.commands.snapshot import print_phase_table
    from kold.snapshot.restorer import RestoreStats

    stats = RestoreStats("ab" * 16, "cpu", "store", 1 << 20)
    stats.readers, stats.total_s = 8, 0.01
    for direct in (True, False):
        stats.direct_io = direct
        print_phase_table(stats.as_dict())
        fetch = next(line for line in capsys.readouterr().out.splitlines() if line.strip().startswith("fetch"))
        assert "8 readers" in fetch and ("O_DIRECT" in fetch) is direct
