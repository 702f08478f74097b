"""The host pool `kold up` keeps by default: where it lives, and keeping it in step with the functions.

Why: a CPU restore into pre-faulted memory is ~2.5x faster than into fresh memory (docs/benchmarks.md),
but only a user who knew about KOLD_HOST_POOL_DIR got it. Now `kold up` keeps one:

- where: a tmpfs mounted `huge=within_size` at `$KOLD_HOME/host-pool` (2 MiB pages: mapping a segment
  costs a few ms), when it runs as root and the mount works; else a directory on /dev/shm (4 KiB
  pages: no first-touch cost, but mapping 2 GB costs ~0.3-0.8 s of page-table entries);
- what: every few seconds it lists the deployed functions, plans segments from their serving
  revisions' snapshot sizes (kold.snapshot.poolplan) and brings the pool to the plan
  (kold.snapshot.poolsync), in a thread of its own: filling faults in GBs of memory;
- who sees it: the instances, through KOLD_HOST_POOL_DIR in their environment, and
  `kold snapshot pool status`, through a small state file in `$KOLD_HOME`;
- until when: `kold down` removes the segments and unmounts the tmpfs, unless a process still holds
  a segment (then it stays, and says so).

KOLD_HOST_POOL=off turns it off; KOLD_HOST_POOL_DIR set keeps a pool the user manages, untouched.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import json
import os
import subprocess
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kold.output import human_bytes
from kold.snapshot.hostmem import mount_of
from kold.snapshot.hostpool import MEMORY_FILESYSTEMS, HostPool, whole_huge_pages
from kold.snapshot.poolplan import PoolDemand, PoolPlan, plan_pool, pool_limit
from kold.snapshot.poolsync import SyncResult, sync_pool

if TYPE_CHECKING:
    from kold.gateway.registry import Registry
    from kold.settings import Settings
    from kold.snapshot.store import S3Options, Store

STATE_FILE = "host-pool.json"
MOUNT_DIR = "host-pool"
INTERVAL_S = 2.0  # a deploy's segments appear within this; a pass that changes nothing costs a few Redis reads

Say = Callable[[str], None]


# -- where it lives ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Place:
    """The pool's directory; `mounted`: a tmpfs kold mounted there (unmounted at `kold down`)."""

    directory: Path
    mounted: bool
    why_not_mounted: str = ""


def prepare_place(home: Path, limit: int, *, may_mount: bool) -> Place:
    """A directory in memory for the pool: a huge-page tmpfs of `limit` bytes mounted under `home`
    when `may_mount` and the mount works, else a private directory on /dev/shm. OSError (with the
    reason) when neither can be had."""
    why = "mounting a tmpfs needs root"
    if may_mount:
        target = home / MOUNT_DIR
        error = _mount_tmpfs(target, limit)
        if error is None:
            return Place(target, mounted=True)
        why = error
    shm = Path("/dev/shm")
    mount = mount_of(shm) if shm.is_dir() else None
    if mount is None or mount[0] not in MEMORY_FILESYSTEMS:
        raise OSError(f"no huge-page tmpfs ({why}) and /dev/shm is not a tmpfs here")
    # one directory per kold home, so two platforms on a node (or two test runs) never share one
    directory = shm / f"kold-host-pool-{hashlib.sha256(str(home.resolve()).encode()).hexdigest()[:12]}"
    with contextlib.suppress(FileExistsError):
        directory.mkdir(mode=0o700)
    info = directory.lstat()
    # /dev/shm is shared by every user: a directory someone else made (or a link) is not ours to fill
    if not directory.is_dir() or directory.is_symlink() or info.st_uid != os.geteuid():
        raise OSError(f"{directory} exists and is not a directory of this user's")
    return Place(directory, mounted=False, why_not_mounted=why)


def _mount_tmpfs(target: Path, size: int) -> str | None:
    """Mount (or, if one is there from an earlier run, resize) a huge-page tmpfs at `target`; None
    when done, else why not."""
    try:
        target.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        return f"cannot make {target}: {exc.strerror or exc}"
    options = f"huge=within_size,size={size},mode=0700"
    if os.path.ismount(target):
        mount = mount_of(target)
        if mount is None or mount[0] != "tmpfs":
            return f"{target} is a mount of {mount[0] if mount else 'an unknown filesystem'}, not a tmpfs"
        argv = ["mount", "-o", f"remount,{options}", str(target)]  # left by a `kold up` that was killed
    else:
        argv = ["mount", "-t", "tmpfs", "-o", options, "kold-host-pool", str(target)]
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"`mount` failed: {exc}"
    if done.returncode != 0:
        return f"`mount` failed: {done.stderr.strip() or f'exit status {done.returncode}'}"
    return None


def release_place(place: Place) -> tuple[bool, str]:
    """Remove the pool's segments and, once nothing holds one, unmount its tmpfs (or remove its
    /dev/shm directory); (whether it is all gone, what was done in words)."""
    removed, busy = HostPool(place.directory).clear()
    if busy:
        return False, (
            f"{busy} segments are still held by running processes: {place.directory} stays until they "
            "end (then `kold snapshot pool clear`)"
        )
    words = f"removed {removed} segments" if removed else "empty"
    if place.mounted:
        error = _unmount(place.directory)
        if error is not None:
            return False, f"{words}; cannot unmount {place.directory}: {error}"
        words += f", unmounted {place.directory}"
    with contextlib.suppress(OSError):
        place.directory.rmdir()
    return True, words


@contextlib.contextmanager
def scratch_pool(root: Path, nbytes: int) -> Iterator[HostPool]:
    """A pool of one segment of `nbytes` for a demo or a benchmark, placed as `kold up` places its
    own (a huge-page tmpfs mounted under `root` as root, else /dev/shm), removed afterwards. Free
    every restore made into it before leaving, or its segment (and the mount) stays."""
    place = prepare_place(root, whole_huge_pages(nbytes), may_mount=os.geteuid() == 0)
    pool = HostPool(place.directory)
    try:
        pool.fill(1, nbytes)
        yield pool
    finally:
        gc.collect()  # a restore's tensors left in a reference cycle would still hold the segment
        release_place(place)


def _unmount(target: Path) -> str | None:
    try:
        done = subprocess.run(["umount", str(target)], capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return str(exc)
    return None if done.returncode == 0 else done.stderr.strip() or f"exit status {done.returncode}"


# -- what it should hold ---------------------------------------------------------------------------


class RegistryDemands:
    """The deployed functions as the planner sees them: each serving revision's snapshot size (from
    its manifest, read once per snapshot: a snapshot never changes), scaling and device."""

    def __init__(self, registry: Registry, s3: S3Options | None = None) -> None:
        self.registry = registry
        self.s3 = s3
        self._sizes: dict[str, int] = {}
        self._stores: dict[str, Store] = {}

    def __call__(self) -> tuple[list[PoolDemand], list[str]]:
        """(demands, problems): a function whose snapshot size could not be read is left out and
        named in `problems` (the caller then must not shrink the pool on this knowledge)."""
        demands, problems = [], []
        for fn in self.registry.list_functions():
            if fn.serving_revision is None:  # its first revision is still starting
                continue
            rev = self.registry.get_revision(fn.serving_revision)
            if rev is None:
                continue
            try:
                size = self._snapshot_bytes(rev.snapshot_uri, rev.snapshot_id)
            except Exception as exc:  # a store that is down must not stop the others' segments
                problems.append(f"{fn.name}: cannot read its snapshot's size ({exc})")
                continue
            demands.append(PoolDemand(fn.name, size, rev.scaling.max_instances, rev.runtime.device))
        return demands, problems

    def _snapshot_bytes(self, uri: str, snapshot_id: str) -> int:
        if snapshot_id not in self._sizes:
            from kold.snapshot.restorer import read_manifest
            from kold.snapshot.store import open_store, parse_snapshot_uri

            ref = parse_snapshot_uri(uri)
            if ref.store_uri not in self._stores:
                self._stores[ref.store_uri] = open_store(ref.store_uri, self.s3)
            self._sizes[snapshot_id] = read_manifest(self._stores[ref.store_uri], ref).data_size
        return self._sizes[snapshot_id]


# -- keeping it ------------------------------------------------------------------------------------


class HostPoolKeeper:
    """Keeps a pool at `place` in step with `demands()`, in a background thread, and says what it did."""

    def __init__(
        self,
        place: Place,
        demands: Callable[[], tuple[list[PoolDemand], list[str]]],
        *,
        budget: int,
        node_memory: int,
        shm_tier_bytes: int,
        state_file: Path,
        say: Say,
        interval_s: float = INTERVAL_S,
    ) -> None:
        self.place = place
        self.pool = HostPool(place.directory)
        self.demands = demands
        self.budget, self.node_memory, self.shm_tier_bytes = budget, node_memory, shm_tier_bytes
        self.state_file = state_file
        self.say = say
        self.interval_s = interval_s
        self.plan = PoolPlan((), pool_limit(budget, node_memory))
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._said: dict[str, tuple[str, ...]] = {}  # what was last said about each topic, so nothing repeats
        self._state_planned = ""

    @property
    def limit(self) -> int:
        return self.plan.limit

    def instance_env(self) -> dict[str, str]:
        """What instances need in their environment to restore into the pool."""
        return {"KOLD_HOST_POOL_DIR": str(self.place.directory)}

    def describe_place(self) -> str:
        pages = "2 MiB pages" if self.pool.huge_pages else "4 KiB pages"
        if self.place.mounted:
            return f"{self.place.directory} (a tmpfs kold mounted with huge=within_size: {pages})"
        return f"{self.place.directory} ({pages}: no huge-page tmpfs, as {self.place.why_not_mounted})"

    def start(self) -> HostPoolKeeper:
        self.pool.remove_partial_fills()  # a fill killed with an earlier `kold up`
        self.say(
            f"host pool: up to {human_bytes(self.limit)} of pre-faulted memory for CPU restores in "
            f"{self.describe_place()}; it follows the deployed functions (KOLD_HOST_POOL=off turns it off)"
        )
        self._write_state()
        self._thread = threading.Thread(target=self._run, name="kold-host-pool", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.sync_once()
            except Exception as exc:  # Redis away, a store error: say so once, try again next pass
                self._say_once("error", f"host pool: cannot bring it up to date ({type(exc).__name__}: {exc})")
            self._stop.wait(self.interval_s)

    def sync_once(self) -> SyncResult:
        """One pass: plan from the functions deployed now, bring the pool to it, say what changed."""
        demands, problems = self.demands()
        self.plan = plan_pool(
            demands, budget=self.budget, node_memory=self.node_memory, shm_tier_bytes=self.shm_tier_bytes
        )
        # a function whose size is unknown this pass is missing from the plan, not gone: keep its segments
        result = sync_pool(self.pool, self.plan.counts, shrink=not problems, should_stop=self._stop.is_set)
        if result.changed:
            self.say(f"host pool: {self._changes(result)}; now {self.holding()}")
        if result.changed or self.planned() != self._state_planned:
            self._write_state()
        self._say_once("short", *(f"host pool: {line}" for line in self.plan.short))
        self._say_once("problems", *(f"host pool: {line}" for line in problems))
        self._say_once(
            "held",
            *(
                f"host pool: {n} x {human_bytes(size)} no longer planned stay while instances hold them"
                for size, n in sorted(result.held_surplus.items())
            ),
        )
        self._say_once("error", *([f"host pool: {result.error}"] if result.error else []))
        return result

    def holding(self) -> str:
        """What the pool holds now, in words: `2 segments, 4.0 MiB of 5.79 GiB`."""
        segments = self.pool.segments()
        if not segments:
            return "empty" + ("" if self.plan.groups else " (no CPU function is deployed)")
        total = sum(s.size for s in segments)
        return f"{len(segments)} segments, {human_bytes(total)} of {human_bytes(self.limit)}"

    def planned(self) -> str:
        """The plan in words: `2 x 2.0 MiB (tiny), 1 x 4.0 MiB (big)`."""
        if not self.plan.groups:
            return "nothing (no CPU function is deployed)"
        return ", ".join(f"{g.count} x {human_bytes(g.size)} ({', '.join(g.functions)})" for g in self.plan.groups)

    def _changes(self, result: SyncResult) -> str:
        """`added 2 x 2.0 MiB (tiny), removed 1 x 4.0 MiB`: the functions a size is planned for."""
        functions = {g.size: f" ({', '.join(g.functions)})" for g in self.plan.groups}
        parts = [
            f"added {n} x {human_bytes(size)}{functions.get(size, '')}" for size, n in sorted(result.added.items())
        ]
        parts += [f"removed {n} x {human_bytes(size)}" for size, n in sorted(result.removed.items())]
        return ", ".join(parts)

    def close(self) -> None:
        """Stop keeping the pool (`kold down`): remove its segments and, once nothing holds one,
        unmount the tmpfs (or remove the /dev/shm directory) and the state file."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(120)  # a fill stops between segments; one segment is seconds at most
        released, words = release_place(self.place)
        if released:
            self.state_file.unlink(missing_ok=True)
        self.say(f"host pool: {words}")

    def _say_once(self, topic: str, *lines: str) -> None:
        if self._said.get(topic, ()) != lines:
            self._said[topic] = lines
            for line in lines:
                self.say(line)

    def _write_state(self) -> None:
        """The state file `kold snapshot pool status` (and every command's settings) find the pool by."""
        self._state_planned = self.planned()
        state = {
            "directory": str(self.place.directory),
            "mounted": self.place.mounted,
            "limit": self.limit,
            "planned": self._state_planned,
            "pid": os.getpid(),
        }
        temp = self.state_file.with_suffix(".tmp")
        temp.write_text(json.dumps(state, sort_keys=True) + "\n")
        temp.replace(self.state_file)


# -- the CLI's side --------------------------------------------------------------------------------


def start_host_pool(settings: Settings, registry: Registry, say: Say) -> HostPoolKeeper | None:
    """The pool `kold up` keeps under KOLD_HOST_POOL=auto, started; None (having said why) when
    there is none to keep. The caller handles KOLD_HOST_POOL_DIR and KOLD_HOST_POOL=off first."""
    from kold.settings import node_memory

    memory = node_memory()
    limit = pool_limit(settings.host_pool_max_bytes, memory)
    if limit == 0:
        say("host pool: none (KOLD_HOST_POOL_MAX_BYTES=0): CPU restores fault in fresh memory")
        return None
    try:
        place = prepare_place(settings.home, limit, may_mount=os.geteuid() == 0)
    except OSError as exc:
        say(f"host pool: none ({exc}): CPU restores fault in fresh memory")
        return None
    keeper = HostPoolKeeper(
        place,
        RegistryDemands(registry, settings.s3_options()),
        budget=settings.host_pool_max_bytes,
        node_memory=memory,
        shm_tier_bytes=settings.cache_shm_bytes,
        state_file=settings.home / STATE_FILE,
        say=say,
    )
    return keeper.start()


def managed_state(home: Path) -> dict[str, Any] | None:
    """What the `kold up` with this home said about its pool, or None when it keeps none."""
    try:
        state = json.loads((home / STATE_FILE).read_text())
    except (OSError, ValueError):
        return None
    return state if isinstance(state, dict) and isinstance(state.get("directory"), str) else None


def managed_directory(home: Path) -> Path | None:
    state = managed_state(home)
    return Path(state["directory"]) if state is not None else None


def describe_managed(home: Path) -> Sequence[str]:
    """Lines for `kold snapshot pool status` about a pool that `kold up` keeps (none otherwise)."""
    state = managed_state(home)
    if state is None:
        return []
    return [
        f"kept by `kold up` (pid {state.get('pid')}, KOLD_HOST_POOL=auto): up to {human_bytes(int(state['limit']))}, "
        f"planned {state.get('planned')}; it adds and removes segments as functions are deployed and removed"
    ]
