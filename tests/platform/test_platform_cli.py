"""`kold up|deploy|invoke|describe|rollback|keys|down` as a user runs them, against a real platform:
a `kold up --detach` process (its own private redis-server), real runtime instances, real HTTP.

The platform runs on a free port, not 8080, and the commands find it as a user's do: from the state
`kold up` wrote under KOLD_HOME, with no KOLD_GATEWAY_URL set."""

from __future__ import annotations

import json
import os
import queue
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.timeout(300)


def kold(*args: str, env: dict[str, str], timeout: float = 240) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "kold", *args], capture_output=True, text=True, timeout=timeout, env=env, check=False
    )


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    port = _free_port()
    return {
        **os.environ,
        "KOLD_HOME": str(tmp_path / "home"),
        "KOLD_CACHE_SHM_DIR": str(tmp_path / "shm"),
        "KOLD_CACHE_DISK_BYTES": "0",
        "KOLD_TEST_PORT": str(port),
        "OMP_NUM_THREADS": "1",
    }
    # the commands must find the platform from `kold up`'s state, not from the variable
    for name in ("KOLD_GATEWAY_URL", "KOLD_API_KEY", "KOLD_REDIS_URL"):
        env.pop(name, None)
    return env


def test_commands_without_a_platform_say_so(env: dict[str, str]) -> None:
    nobody = {**env, "KOLD_GATEWAY_URL": f"http://127.0.0.1:{env['KOLD_TEST_PORT']}"}  # not 8080: it may be in use
    for args in (("ls",), ("describe", "tiny"), ("invoke", "tiny", "hi"), ("keys", "ls"), ("rm", "tiny")):
        result = kold(*args, env=nobody)
        assert result.returncode == 1, args
        assert "start it with `kold up`" in result.stderr and "Traceback" not in result.stderr
        assert "(from KOLD_GATEWAY_URL" in result.stderr
    down = kold("down", env=env)
    assert down.returncode == 0 and "no kold platform is running" in down.stdout


@pytest.mark.parametrize(
    ("args", "message", "status"),
    [
        (("deploy", ".", "--name", "Bad_Name"), "lowercase letters", 1),
        (("deploy", ".", "--name", "ok", "--target", "knative"), "pods cannot read it", 1),
        (("deploy", "/definitely/not/here", "--name", "ok"), "not a directory", 2),  # a usage error
        (("up", "--port", "0"), "not a port number", 1),
        (("describe", "Bad_Name"), "lowercase letters", 1),
        (("logs", "../keys", "--follow"), "lowercase letters", 1),
        (("logs", "tiny", "--tail", "-1"), "must be >= 0", 1),
        (("invoke", "tiny", "hi", "--temperature", "3"), "between 0 and 2", 1),
        (("keys", "revoke", "../functions/tiny"), "is not a key id", 1),
    ],
)
def test_bad_input_is_one_line(env: dict[str, str], args: tuple[str, ...], message: str, status: int) -> None:
    """Exit 1 for an error, 2 for a usage error (argparse's), as kubectl and kn do."""
    result = kold(*args, env=env)
    assert result.returncode == status and message in result.stderr and "Traceback" not in result.stderr


@pytest.fixture
def platform(env: dict[str, str]) -> Iterator[dict[str, str]]:
    """`kold up --detach`, with a host pool of one segment that its instances inherit."""
    from kold.snapshot import HostPool

    pool = HostPool(Path("/dev/shm") / f"kold-test-platform-pool-{uuid.uuid4().hex[:8]}")
    pool.fill(1, 2 << 20)
    env = {**env, "KOLD_HOST_POOL_DIR": str(pool.directory)}
    up = kold("up", "--detach", "--port", env["KOLD_TEST_PORT"], env=env, timeout=90)
    assert up.returncode == 0, up.stderr
    home = Path(env["KOLD_HOME"])
    state = json.loads((home / "platform.json").read_text())
    assert state["url"] == f"http://127.0.0.1:{env['KOLD_TEST_PORT']}" and state["log_path"] == str(
        home / "platform.log"
    )
    redis_port = int(re.fullmatch(r"redis://127\.0\.0\.1:(\d+)/0", state["redis_url"])[1])  # type: ignore[index]
    try:
        again = kold("up", "--detach", "--port", str(_free_port()), env=env, timeout=90)
        assert again.returncode == 1 and f"already running at {state['url']}" in again.stderr
        yield env
    finally:
        try:
            down = kold("down", env=env, timeout=90)
            assert down.returncode == 0, down.stderr
            # `kold down` leaves nothing behind: the private redis-server is stopped, the state removed
            deadline = time.monotonic() + 15
            while _accepts(redis_port):
                assert time.monotonic() < deadline, "the private redis-server outlived `kold down`"
                time.sleep(0.1)
            assert not (home / "platform.json").exists()
        finally:
            shutil.rmtree(pool.directory, ignore_errors=True)  # after `kold down`: no instance holds it


def _accepts(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def test_deploy_invoke_cold_then_warm_describe_and_down(platform: dict[str, str], tmp_path: Path) -> None:
    from kold.modelgen import write_random_model

    url = f"http://127.0.0.1:{platform['KOLD_TEST_PORT']}"  # found from `kold up`'s state: no KOLD_GATEWAY_URL
    model = write_random_model(tmp_path / "model", "llama", "tiny")
    deployed = kold("deploy", str(model), "--name", "tiny", "--idle-timeout", "60", env=platform)
    assert deployed.returncode == 0, deployed.stderr
    # stdout: the function's URLs, at the platform's own port; the status lines: stderr
    assert f"{url}/v1/functions/tiny/v1/chat/completions" in deployed.stdout
    assert "revision tiny-00001 is serving" in deployed.stderr and "is serving" not in deployed.stdout

    listed = kold("ls", env=platform)
    assert listed.returncode == 0 and "tiny-00001" in listed.stdout

    _invoke(platform)
    # the instance restored into the node's host pool, which `kold up` handed down to it
    assert "1 segments (2.0 MiB), 1 free" in (Path(platform["KOLD_HOME"]) / "platform.log").read_text()
    pool = kold("snapshot", "pool", "status", env=platform)
    assert pool.returncode == 0 and "1 segments" in pool.stdout and "1 in use" in pool.stdout, pool.stdout

    described = kold("describe", "tiny", env=platform)
    assert described.returncode == 0, described.stderr
    out = described.stdout
    assert "Name:" in out and f"{url}/v1/functions/tiny/v1/chat/completions" in out and "Serving:" in out
    assert "Instances (1 running):" in out
    (row,) = [line.split() for line in out.splitlines() if line.strip().startswith("tiny-00001-1 ")]
    assert row[1] == "ready" and row[2].isdigit()  # state, port
    assert row[-1].isdigit()  # READY ms, from the runtime's startup event
    doc = json.loads(kold("describe", "tiny", "--json", env=platform).stdout)
    (inst,) = doc["instances"]
    assert inst["id"] == "tiny-00001-1" and inst["state"] == "ready"
    as_yaml = yaml.safe_load(kold("describe", "tiny", "-o", "yaml", env=platform).stdout)
    assert as_yaml["name"] == "tiny" and as_yaml["revisions"] == doc["revisions"]
    _closed_pipe(platform)
    _machine_readable_deploy_and_ls(platform, model, url)

    platform = _keys(platform)
    _logs_and_follow(platform, inst["id"])


def _invoke(env: dict[str, str]) -> None:
    """stdout: the answer alone; stderr: cold or warm, chat or completion, the timings. Chat is the
    default for this model (make-tiny writes a chat template); --completion and --temperature work."""
    first = kold("invoke", "tiny", "Hello", "--completion", "--max-tokens", "8", "--temperature", "0", env=env)
    assert first.returncode == 0, first.stderr
    assert "(completion): first token" in first.stderr and "8 tokens" in first.stderr
    assert "first token" not in first.stdout and "x-kold-" not in first.stdout and first.stdout.endswith("\n")
    again = kold("invoke", "tiny", "Hello", "--completion", "--max-tokens", "8", "--temperature", "0", env=env)
    assert again.stdout == first.stdout  # temperature 0 is greedy: the same answer (the runtime's default is 1.0)
    chat = kold("invoke", "tiny", "Hello", "--max-tokens", "4", env=env)
    assert chat.returncode == 0, chat.stderr
    assert "warm (chat):" in chat.stderr
    forced = kold("invoke", "tiny", "Hello", "--chat", "--max-tokens", "4", env=env)
    assert forced.returncode == 0 and "(chat):" in forced.stderr
    missing = kold("invoke", "nosuch", "Hello", env=env)
    assert missing.returncode == 1 and "does not exist" in missing.stderr and "Traceback" not in missing.stderr


def _closed_pipe(env: dict[str, str]) -> None:
    """`kold describe tiny -o json | head -1`: the first line, and no BrokenPipeError traceback."""
    kold_cmd = shlex.join([sys.executable, "-m", "kold", "describe", "tiny", "-o", "json"])
    piped = subprocess.run(
        ["bash", "-c", f"{kold_cmd} | head -1"], capture_output=True, text=True, timeout=60, env=env, check=False
    )
    assert piped.stdout == "{\n" and piped.stderr == "", piped.stderr
    # the same with the reader gone before kold writes (what `head` leaves when it is quicker)
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        closed = subprocess.run(
            [sys.executable, "-m", "kold", "describe", "tiny", "-o", "json"],
            stdout=write_end,
            stderr=subprocess.PIPE,
            text=True,
            timeout=60,
            env={k: v for k, v in env.items() if k != "PYTHONUNBUFFERED"},
            check=False,
        )
    finally:
        os.close(write_end)
    assert closed.stderr == "" and closed.returncode == 141


def _machine_readable_deploy_and_ls(env: dict[str, str], model: Path, url: str) -> None:
    deployed = kold("deploy", str(model), "--name", "tiny2", "-o", "json", env=env)
    assert deployed.returncode == 0, deployed.stderr
    doc = json.loads(deployed.stdout)
    assert doc["name"] == "tiny2" and doc["revision"] == "tiny2-00001"
    assert doc["chat_completions"] == f"{url}/v1/functions/tiny2/v1/chat/completions"
    assert doc["openai_base_url"] == f"{url}/v1" and doc["snapshot"]["uri"].endswith(doc["snapshot"]["id"])
    listed = yaml.safe_load(kold("ls", "-o", "yaml", env=env).stdout)
    assert {f["name"] for f in listed["functions"]} == {"tiny", "tiny2"}
    assert kold("rm", "tiny2", env=env).returncode == 0


def _keys(env: dict[str, str]) -> dict[str, str]:
    """`keys create` prints the secret alone (KEY=$(kold keys create ...)); `keys ls` a table with a
    header and local times. From the first key on, the gateway demands one: the env with it."""
    none = kold("keys", "ls", env=env)
    assert none.returncode == 0 and none.stdout == "" and "no keys" in none.stderr
    created = kold("keys", "create", "laptop", env=env)
    assert created.returncode == 0, created.stderr
    secret = created.stdout.strip()
    assert secret and "\n" not in secret and "created" in created.stderr
    refused = kold("ls", env=env)  # no key
    assert refused.returncode == 1 and "HTTP 401" in refused.stderr and "KOLD_API_KEY" in refused.stderr
    env = {**env, "KOLD_API_KEY": secret}
    listed = kold("keys", "ls", env=env)
    assert listed.returncode == 0, listed.stderr
    header, row = listed.stdout.splitlines()
    assert header.split() == ["KEY", "ID", "LABEL", "SCOPE", "CREATED"]
    assert row.split()[1:3] == ["laptop", "admin"], row
    assert re.search(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d \(\d+s ago\)", row), row
    (key,) = json.loads(kold("keys", "ls", "-o", "json", env=env).stdout)["keys"]
    assert key["label"] == "laptop" and key["key_id"] == row.split()[0]
    # an invoke-scoped key calls functions but not the admin API
    app = kold("keys", "create", "app", "--scope", "invoke", env=env)
    assert app.returncode == 0 and "invoke key" in app.stderr, app.stderr
    as_app = {**env, "KOLD_API_KEY": app.stdout.strip()}
    denied = kold("ls", env=as_app)
    assert denied.returncode == 1 and "HTTP 403" in denied.stderr and "admin key" in denied.stderr, denied.stderr
    assert kold("invoke", "tiny", "hi", "--max-tokens", "2", env=as_app).returncode == 0
    # the last admin key cannot go while an invoke key remains: one line, exit 1
    last = kold("keys", "revoke", key["key_id"], env=env)
    assert last.returncode == 1 and "last admin key" in last.stderr and "Traceback" not in last.stderr
    return env


def _logs_and_follow(env: dict[str, str], instance_id: str) -> None:
    """`kold logs`, and `kold logs --follow`: a line written after it started arrives; Ctrl-C ends it
    cleanly; a follow stream still open does not hold up `kold down`."""
    logs = kold("logs", "tiny", "--tail", "1000", env=env)
    assert logs.returncode == 0 and f"--- kold: instance {instance_id} starting" in logs.stdout, logs.stderr

    missing = kold("logs", "nosuch", "--follow", env=env, timeout=30)
    assert missing.returncode == 1 and "does not exist" in missing.stderr
    assert "Traceback" not in missing.stderr and len(missing.stderr.strip().splitlines()) == 1

    log_file = Path(env["KOLD_HOME"]) / "logs" / f"{instance_id}.log"
    follow = Following(env)
    try:
        assert follow.lines.get(timeout=30)  # the --tail 1 line: the stream is open
        marker = f"written after the follow began {uuid.uuid4().hex}"
        with open(log_file, "a") as f:
            f.write(marker + "\n")
        follow.wait_for(marker)
        follow.proc.send_signal(signal.SIGINT)
        assert follow.proc.wait(10) == 0
        assert "Traceback" not in follow.stderr()
    finally:
        follow.kill()

    follow = Following(env)
    try:
        assert follow.lines.get(timeout=30)
        down = kold("down", env=env, timeout=60)
        assert down.returncode == 0 and "stopped" in down.stdout, down.stderr
        assert follow.proc.wait(15) == 0  # the platform ended the stream as it shut down
        assert "ended the log stream" in follow.stderr()
    finally:
        follow.kill()


class Following:
    """`kold logs tiny --follow --tail 1` in the background, its stdout lines in a queue."""

    def __init__(self, env: dict[str, str]) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "kold", "logs", "tiny", "--follow", "--tail", "1"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        self.lines: queue.Queue[str] = queue.Queue()
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line)

    def wait_for(self, text: str, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        seen = []
        while time.monotonic() < deadline:
            try:
                seen.append(self.lines.get(timeout=max(0.01, deadline - time.monotonic())))
            except queue.Empty:
                break
            if text in seen[-1]:
                return
        raise AssertionError(f"{text!r} did not arrive; got {seen}")

    def stderr(self) -> str:
        assert self.proc.stderr is not None
        return self.proc.stderr.read()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self.thread.join(10)
