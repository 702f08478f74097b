"""The host pool `kold up` keeps by default: sized from the deployed functions, grown and shrunk as
they come and go, seen by the instances, cleaned up by `kold down`, and off when asked.

Against real things: a redis-server, a file store, tmpfs directories (a huge-page tmpfs that kold
mounts when the tests run as root, /dev/shm otherwise), `kold up` subprocesses and their instances."""

from __future__ import annotations

import gc
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
import redis

from kold.gateway.registry import Registry, RuntimeSpec, ScalingSpec
from kold.hostpool_auto import (
    MOUNT_DIR,
    STATE_FILE,
    HostPoolKeeper,
    Place,
    RegistryDemands,
    prepare_place,
    scratch_pool,
)
from kold.snapshot.hostmem import huge_page_backed
from kold.snapshot.hostpool import HUGE_PAGE, HostPool

pytestmark = pytest.mark.timeout(300)
MiB = 1 << 20


@pytest.fixture(scope="module")
def snapshot_uri(tmp_path_factory: pytest.TempPathFactory) -> str:
    from kold.modelgen import write_random_model
    from kold.snapshot import build_snapshot

    root = tmp_path_factory.mktemp("pool-model")
    return build_snapshot(write_random_model(root / "tiny", "llama", "tiny", seed=5), (root / "store").as_uri()).uri


@pytest.fixture
def registry(redis_url: str) -> Iterator[Registry]:
    client = redis.Redis.from_url(redis_url, socket_connect_timeout=1)
    registry = Registry(client, prefix=f"kold-pool-test-{uuid.uuid4().hex}:")
    yield registry
    keys = list(client.scan_iter(match=registry.prefix + "*", count=1000))
    if keys:
        client.delete(*keys)
    client.close()


def _unmount_if_mounted(path: Path) -> None:
    if os.path.ismount(path):
        subprocess.run(["umount", str(path)], capture_output=True, check=False)


@pytest.fixture
def shm_place(tmp_path: Path) -> Iterator[Place]:
    """The pool's place as `kold up` makes it where it may not mount: a private /dev/shm directory."""
    place = prepare_place(tmp_path / "home", 64 * MiB, may_mount=False)
    yield place
    HostPool(place.directory).clear()
    shutil.rmtree(place.directory, ignore_errors=True)


def deploy(registry: Registry, name: str, uri: str, max_instances: int, device: str = "cpu") -> None:
    rev = registry.create_revision(
        name, uri, scaling=ScalingSpec(max_instances=max_instances), runtime=RuntimeSpec(device=device)
    )
    registry.set_traffic(name, rev.revision_id)


def keeper_for(place: Place, registry: Registry, home: Path, said: list[str], budget: int = 64 * MiB) -> HostPoolKeeper:
    home.mkdir(parents=True, exist_ok=True)
    return HostPoolKeeper(
        place,
        RegistryDemands(registry),
        budget=budget,
        node_memory=1 << 40,
        shm_tier_bytes=0,
        state_file=home / STATE_FILE,
        say=said.append,
    )


def sizes(pool: HostPool) -> list[int]:
    return [s.size for s in pool.segments()]


def test_the_pool_follows_the_deployed_functions_and_keeps_a_held_segment(
    shm_place: Place, registry: Registry, snapshot_uri: str, tmp_path: Path
) -> None:
    said: list[str] = []
    home = tmp_path / "home"
    keeper = keeper_for(shm_place, registry, home, said)
    pool = keeper.pool
    assert shm_place.directory.parent == Path("/dev/shm") and not shm_place.mounted

    keeper.sync_once()
    assert sizes(pool) == [] and not said  # nothing deployed, nothing to say

    deploy(registry, "tiny", snapshot_uri, max_instances=2)
    deploy(registry, "gpu", snapshot_uri, max_instances=3, device="cuda")  # restores through a pinned ring
    keeper.sync_once()
    assert sizes(pool) == [HUGE_PAGE, HUGE_PAGE]  # the tiny snapshot rounds up to one huge page
    assert said[-1] == "host pool: added 2 x 2.0 MiB (tiny); now 2 segments, 4.0 MiB of 64.0 MiB"
    keeper.sync_once()
    assert len(said) == 1  # an unchanged pool says nothing

    # every command with this home finds the pool, and the status names who keeps it
    state = json.loads((home / STATE_FILE).read_text())
    assert state["directory"] == str(shm_place.directory) and state["planned"] == "2 x 2.0 MiB (tiny)"

    held = pool.claim(MiB)  # an instance restored into one
    assert held is not None
    registry.delete_function("tiny")
    keeper.sync_once()
    assert [s.in_use for s in pool.segments()] == [True]  # the free one went, the held one stays
    assert said[-2] == "host pool: removed 1 x 2.0 MiB; now 1 segments, 2.0 MiB of 64.0 MiB"
    assert said[-1] == "host pool: 1 x 2.0 MiB no longer planned stay while instances hold them"
    held[:4] = b"kold"  # its memory is still the instance's
    held.close()
    keeper.sync_once()
    assert sizes(pool) == [] and said[-1] == "host pool: removed 1 x 2.0 MiB; now empty (no CPU function is deployed)"

    keeper.close()
    assert not shm_place.directory.exists() and not (home / STATE_FILE).exists()


def test_an_unreadable_snapshot_keeps_its_segments_until_it_can_be_read(
    shm_place: Place, registry: Registry, snapshot_uri: str, tmp_path: Path
) -> None:
    said: list[str] = []
    keeper = keeper_for(shm_place, registry, tmp_path / "home", said)
    deploy(registry, "tiny", snapshot_uri, max_instances=1)
    keeper.sync_once()
    assert sizes(keeper.pool) == [HUGE_PAGE]
    missing = snapshot_uri.rsplit("/", 1)[0] + "/" + "0" * 32  # a store that lost the snapshot
    deploy(registry, "gone", missing, max_instances=1)
    keeper.sync_once()
    assert sizes(keeper.pool) == [HUGE_PAGE]  # tiny's segment stays; nothing is taken on half knowledge
    assert any(line.startswith("host pool: gone: cannot read its snapshot's size") for line in said), said
    keeper.close()


def test_a_budget_too_small_for_the_model_says_so_once(
    shm_place: Place, registry: Registry, snapshot_uri: str, tmp_path: Path
) -> None:
    said: list[str] = []
    keeper = keeper_for(shm_place, registry, tmp_path / "home", said, budget=HUGE_PAGE)
    deploy(registry, "tiny", snapshot_uri, max_instances=3)
    keeper.sync_once()
    keeper.sync_once()
    assert sizes(keeper.pool) == [HUGE_PAGE]
    assert said.count("host pool: tiny: 1 of 3 segments; the 2.0 MiB budget is spent") == 1, said
    keeper.close()


def test_kold_down_leaves_a_held_segment_and_says_so(shm_place: Place, registry: Registry, tmp_path: Path) -> None:
    said: list[str] = []
    keeper = keeper_for(shm_place, registry, tmp_path / "home", said)
    HostPool(shm_place.directory).fill(2, MiB)
    held = keeper.pool.claim(MiB)
    assert held is not None
    keeper.close()
    assert "1 segments are still held by running processes" in said[-1]
    assert [s.in_use for s in keeper.pool.segments()] == [True]  # the free one was removed
    held.close()


def test_the_place_is_a_huge_page_tmpfs_when_kold_may_mount_one(tmp_path: Path) -> None:
    home = tmp_path / "home"
    place = prepare_place(home, 8 * MiB, may_mount=os.geteuid() == 0)
    try:
        if place.mounted:  # root, and the mount worked
            assert place.directory == home / MOUNT_DIR and os.path.ismount(place.directory)
            assert huge_page_backed(place.directory)
            again = prepare_place(home, 16 * MiB, may_mount=True)  # a `kold up` after one that was killed
            assert again == place
            assert "size=16384k" in _mount_options(place.directory)
        else:
            assert place.directory.parent == Path("/dev/shm") and place.why_not_mounted
    finally:
        _unmount_if_mounted(home / MOUNT_DIR)
        if not place.mounted:
            shutil.rmtree(place.directory, ignore_errors=True)


def test_a_scratch_pool_takes_a_restore_and_leaves_nothing_behind(snapshot_uri: str, tmp_path: Path) -> None:
    from kold.snapshot import restore

    with scratch_pool(tmp_path / "demo", MiB) as pool:
        directory = pool.directory
        snap = restore(snapshot_uri, pool=pool)
        assert snap.stats.pooled and [s.in_use for s in pool.segments()] == [True]
        del snap
        gc.collect()
    assert not directory.exists()  # unmounted (or out of /dev/shm) and removed


def _mount_options(path: Path) -> str:
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields = line.split()
        if fields[4] == str(path):
            return fields[-1]
    return ""


# -- `kold up` as a user runs it -------------------------------------------------------------------


def kold(*args: str, env: dict[str, str], timeout: float = 240) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "kold", *args], capture_output=True, text=True, timeout=timeout, env=env, check=False
    )


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def env(tmp_path: Path) -> Iterator[dict[str, str]]:
    port = _free_port()
    home = tmp_path / "home"
    yield {
        **os.environ,
        "KOLD_HOME": str(home),
        "KOLD_CACHE_SHM_BYTES": "0",  # no shm tier: every cold start restores from the store, into the pool
        "KOLD_CACHE_DISK_BYTES": "0",
        "KOLD_HOST_POOL_MAX_BYTES": "64MiB",
        "KOLD_GATEWAY_URL": f"http://127.0.0.1:{port}",
        "KOLD_TEST_PORT": str(port),
        "OMP_NUM_THREADS": "1",
    }
    # whatever the test left: the platform, its mount, its /dev/shm directory
    kold("down", env={**os.environ, "KOLD_HOME": str(home)}, timeout=90)
    _unmount_if_mounted(home / MOUNT_DIR)
    for leftover in Path("/dev/shm").glob("kold-host-pool-*"):
        if (home / STATE_FILE).exists() and str(leftover) in (home / STATE_FILE).read_text():
            shutil.rmtree(leftover, ignore_errors=True)


def wait_for(what: str, check: Callable[[], object], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.3)


def pool_status(env: dict[str, str]) -> str:
    status = kold("snapshot", "pool", "status", env=env, timeout=60)
    assert status.returncode == 0, status.stderr
    return status.stdout


def test_kold_up_fills_a_pool_for_a_deployed_function_and_an_instance_restores_into_it(
    env: dict[str, str], tmp_path: Path
) -> None:
    from kold.modelgen import write_random_model

    home = Path(env["KOLD_HOME"])
    up = kold("up", "--detach", "--port", env["KOLD_TEST_PORT"], env=env, timeout=90)
    assert up.returncode == 0, up.stderr
    log = home / "platform.log"
    started = re.search(r"host pool: up to 64\.0 MiB of pre-faulted memory for CPU restores in (\S+)", log.read_text())
    assert started, log.read_text()
    directory = Path(started.group(1))
    if os.geteuid() == 0:  # kold mounted a huge-page tmpfs for it
        assert directory == home / MOUNT_DIR and os.path.ismount(directory) and huge_page_backed(directory)
    assert "kept by `kold up`" in pool_status(env) and "0 segments" in pool_status(env)

    model = write_random_model(tmp_path / "model", "llama", "tiny")
    deployed = kold("deploy", str(model), "--name", "tiny", "--max-instances", "2", "--idle-timeout", "1", env=env)
    assert deployed.returncode == 0, deployed.stderr
    wait_for("the pool to grow", lambda: "host pool: added 2 x 2.0 MiB (tiny)" in log.read_text())
    assert "2 segments" in pool_status(env)

    # scaled to zero, the next request is a cold start: its instance restores into a segment
    url = env["KOLD_GATEWAY_URL"]

    def live() -> list[object]:
        doc = httpx.get(f"{url}/admin/functions/tiny", timeout=10).json()
        return [i for i in doc.get("instances") or [] if i.get("state") not in ("stopped", "failed")]

    wait_for("scale to zero", lambda: not live())
    invoked = kold("invoke", "tiny", "Hello", "--max-tokens", "4", env=env)
    assert invoked.returncode == 0, invoked.stderr
    status = pool_status(env)
    assert "2 segments" in status and "1 in use" in status, status

    # removed, its instance drains and gives its segment back; then the pool lets both go
    removed = kold("rm", "tiny", env=env)
    assert removed.returncode == 0, removed.stderr
    wait_for("the pool to shrink", lambda: "0 segments" in pool_status(env))
    assert "now empty (no CPU function is deployed)" in log.read_text()

    down = kold("down", env=env, timeout=90)
    assert down.returncode == 0, down.stderr
    assert not directory.exists() or not os.path.ismount(directory)
    assert not (home / STATE_FILE).exists()
    assert re.search(r"host pool: (empty|removed \d+ segments)", log.read_text())


def test_kold_host_pool_off_keeps_no_pool(env: dict[str, str]) -> None:
    env = {**env, "KOLD_HOST_POOL": "off"}
    up = kold("up", "--detach", "--port", env["KOLD_TEST_PORT"], env=env, timeout=90)
    assert up.returncode == 0, up.stderr
    try:
        log = (Path(env["KOLD_HOME"]) / "platform.log").read_text()
        assert "host pool: off (KOLD_HOST_POOL=off): CPU restores fault in fresh memory" in log
        assert not (Path(env["KOLD_HOME"]) / MOUNT_DIR).exists()
        status = kold("snapshot", "pool", "status", env=env)
        assert status.returncode != 0 and "no host pool is configured" in status.stderr
    finally:
        assert kold("down", env=env, timeout=90).returncode == 0
