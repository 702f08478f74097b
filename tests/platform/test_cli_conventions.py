"""The `kold` command's conventions, as a user or a script meets them (real subprocesses, no platform):
exit status 1 for errors and 2 for usage errors; a closed pipe ends quietly; data alone on stdout;
and the CLI's modules import without `kold.cli` (no cycle through the command line)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from kold.errors import EXIT_BROKEN_PIPE


def kold(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "kold", *args], capture_output=True, text=True, timeout=120, env=env, check=False
    )


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    env = {**os.environ, "KOLD_HOME": str(tmp_path / "home"), "KOLD_CACHE_SHM_DIR": str(tmp_path / "shm")}
    env.pop("KOLD_GATEWAY_URL", None)
    return env


@pytest.fixture(scope="module")
def snapshot_uri(tmp_path_factory: pytest.TempPathFactory) -> str:
    from kold.modelgen import write_random_model
    from kold.snapshot import build_snapshot

    root = tmp_path_factory.mktemp("conventions")
    model = write_random_model(root / "model", "llama", "tiny")
    return build_snapshot(model, (root / "store").as_uri()).uri


@pytest.mark.parametrize(
    "args",
    [
        ("model", "make-tiny", "/etc/passwd"),  # the user's mistake, found by the command: an error
        ("snapshot", "restore", "not-a-uri"),
        ("--url", "http://127.0.0.1:{port}", "ls"),  # no platform answers
        ("describe", "tiny", "--url", "http://127.0.0.1:{port}"),
    ],
)
def test_errors_exit_1_in_one_line(env: dict[str, str], args: tuple[str, ...]) -> None:
    port = str(_free_port())
    result = kold(*(a.replace("{port}", port) for a in args), env=env)
    assert result.returncode == 1, (result.returncode, result.stderr)
    assert result.stderr.startswith("kold: error: ") and result.stderr.count("\n") == 1, result.stderr


def test_a_url_that_does_not_answer_is_named_with_where_it_came_from(env: dict[str, str]) -> None:
    port = _free_port()
    flag = kold("ls", "--url", f"http://127.0.0.1:{port}", env=env)
    assert f"no kold platform answers at http://127.0.0.1:{port} (from --url)" in flag.stderr
    variable = kold("keys", "ls", env={**env, "KOLD_GATEWAY_URL": f"http://127.0.0.1:{port}"})
    assert f"http://127.0.0.1:{port} (from KOLD_GATEWAY_URL" in variable.stderr
    # --url before the command, as a global flag, and after it: the same
    both = kold("--url", f"http://127.0.0.1:{port}", "invoke", "tiny", "hi", env=env)
    assert f"http://127.0.0.1:{port} (from --url)" in both.stderr


@pytest.mark.parametrize(
    "args",
    [
        ("ls", "--no-such-flag"),
        ("invoke", "tiny"),  # the prompt is missing
        ("describe", "tiny", "-o", "xml"),
        ("invoke", "tiny", "hi", "--chat", "--completion"),
        ("deploy", "/definitely/not/here", "--name", "x"),  # an argument of the wrong form
    ],
)
def test_usage_errors_exit_2(env: dict[str, str], args: tuple[str, ...]) -> None:
    result = kold(*args, env=env)
    assert result.returncode == 2 and "usage: kold" in result.stderr and "Traceback" not in result.stderr


def test_a_bad_setting_exits_1(env: dict[str, str]) -> None:
    result = kold("ls", env={**env, "KOLD_CACHE_SHM_BYTES": "lots"})
    assert result.returncode == 1 and "invalid KOLD_* setting" in result.stderr and "Traceback" not in result.stderr


def _with_closed_stdout(args: tuple[str, ...], env: dict[str, str]) -> tuple[int, str]:
    """Run kold with stdout a pipe whose reader has gone before kold writes, as `| head -1` leaves it."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "kold", *args],
            stdout=write_end,
            stderr=subprocess.PIPE,
            text=True,
            timeout=120,
            env=env,
            check=False,
        )
    finally:
        os.close(write_end)
    return proc.returncode, proc.stderr


@pytest.mark.parametrize("fmt", [("--json",), ("-o", "json"), ("-o", "yaml")])
@pytest.mark.parametrize("buffered", [True, False])
def test_a_closed_pipe_ends_quietly(
    env: dict[str, str], snapshot_uri: str, fmt: tuple[str, ...], buffered: bool
) -> None:
    """Buffered (a shell's default), the write fails when stdout is flushed; unbuffered, at the print itself."""
    env = {k: v for k, v in env.items() if k != "PYTHONUNBUFFERED"} | ({} if buffered else {"PYTHONUNBUFFERED": "1"})
    status, stderr = _with_closed_stdout(("snapshot", "inspect", snapshot_uri, *fmt), env)
    assert stderr == "" and status == EXIT_BROKEN_PIPE


def test_inspect_prints_json_and_yaml(env: dict[str, str], snapshot_uri: str) -> None:
    as_json = kold("snapshot", "inspect", snapshot_uri, "-o", "json", env=env)
    as_yaml = kold("snapshot", "inspect", snapshot_uri, "-o", "yaml", env=env)
    alias = kold("snapshot", "inspect", snapshot_uri, "--json", env=env)
    assert as_json.returncode == as_yaml.returncode == 0, as_yaml.stderr
    assert yaml.safe_load(as_yaml.stdout) == yaml.safe_load(as_json.stdout)  # JSON is YAML
    assert alias.stdout == as_json.stdout
    assert yaml.safe_load(as_yaml.stdout)["uri"] == snapshot_uri


def test_snapshot_build_prints_the_uri_alone(env: dict[str, str], tmp_path: Path) -> None:
    from kold.modelgen import write_random_model

    model = write_random_model(tmp_path / "model", "llama", "tiny")
    store = (tmp_path / "store").as_uri()
    built = kold("snapshot", "build", str(model), "--to", store, env=env)
    assert built.returncode == 0, built.stderr
    assert built.stdout.startswith(f"{store}/snapshots/") and built.stdout.count("\n") == 1  # URI=$(kold ...)
    assert "published" in built.stderr


def test_the_cli_modules_do_not_import_the_command_line(env: dict[str, str]) -> None:
    """The cycle kold.cli -> kold.commands.* -> kold.cli is gone: each imports without kold.cli."""
    modules = [
        "kold.commands.model",
        "kold.commands.platform",
        "kold.commands.runtime",
        "kold.commands.snapshot",
        "kold.commands.demo",
        "kold.platform_client",
        "kold.localredis",
    ]
    code = f"import importlib, sys\nfor m in {modules!r}:\n    importlib.import_module(m)\nprint('kold.cli' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert result.stdout.strip() == "False"


def test_the_runtime_entry_handles_argv_and_errors_as_kold_does(capsys: pytest.CaptureFixture[str]) -> None:
    """The fork template starts instances through kold.commands.runtime.main: the same argv, the same statuses."""
    from kold.commands.runtime import main

    assert main(["runtime", "serve", "--snapshot", "not-a-uri", "--port", "0"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("kold: error: ") and "not a snapshot URI" in err and err.count("\n") == 1
    with pytest.raises(SystemExit) as usage:
        main(["runtime", "serve"])  # --snapshot is required
    assert usage.value.code == 2
