"""`kold demo`: the main job in one command, on a fresh machine.

Make a model, publish it (and publish it again: nothing is re-uploaded), restore it from a cold and
a hot page cache, the hot one again into a host pool segment (pre-faulted memory, placed as `kold up`
places its own) beside fresh memory, through the GPU-style pinned ring (its CPU twin here), from the
shared-memory tier and from S3 on loopback (one table of phase timings); each restore is labelled
from what it reports (the tier it read, O_DIRECT or the page cache, a mapping, a pool segment) and
from the page cache as measured before it, never from what the demo meant to happen; then the local
platform as a user drives it: `kold up` (with its default host pool), `kold deploy`, wait for scale
to zero, `kold invoke` cold as a completion (the request is held while an instance restores into the
pool), `kold snapshot pool status`, `kold invoke` warm as a chat, `kold describe`, `kold logs`,
`kold down`.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shlex
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kold.errors import CLIError
from kold.settings import Settings


def register(top: Any) -> None:
    parser = top.add_parser("demo", help="make a model, publish it, restore it several ways, print the timings")
    # small (40 MB) by default: big enough that page faults, and so the host pool, show in the timings
    # (tiny's 0.3 MB restores are noise), small enough that the demo stays quick on 2 cores
    parser.add_argument("--size", default="small", help="model size: tiny, small (default) or 1b")
    parser.add_argument("--workdir", type=Path, default=Path(".kold/demo"), help="where models and stores go")
    parser.add_argument("--no-s3", action="store_true", help="skip the S3 (rclone on loopback) part")
    parser.add_argument("--no-serve", action="store_true", help="skip the platform part (up, deploy, invoke, down)")
    parser.set_defaults(handler=cmd_demo)


# what each restore step hands on: its label and its stats (RestoreStats.as_dict())
Report = Callable[[str, dict[str, Any]], None]


def page_cache_state(path: Path) -> str:
    """How much of `path` is in the page cache, measured (mincore) the way a restore measures it."""
    from kold.snapshot.filestore import COLD_RESIDENT_MAX
    from kold.snapshot.hostmem import resident_fraction

    fd = os.open(path, os.O_RDONLY)
    try:
        fraction = resident_fraction(fd, os.fstat(fd).st_size)
    finally:
        os.close(fd)
    if fraction is None:
        return "page cache unknown"
    word = "cold" if fraction < COLD_RESIDENT_MAX else "hot" if fraction >= 0.9 else "partly cached"
    return f"{word} page cache ({fraction:.0%} resident)"


def read_through_page_cache(path: Path) -> None:
    """Read a file once through the page cache (buffered reads, bytes thrown away), so the next read is hot.

    Why the demo needs it: a cold restore reads with O_DIRECT, which never fills the page cache, so
    the file is as cold after it as before.
    """
    chunk = memoryview(bytearray(8 << 20))
    with open(path, "rb", buffering=0) as f:
        while f.readinto(chunk):
            pass


def restore_label(stats: dict[str, Any], store: str, page_cache: str | None = None) -> str:
    """What a restore did, in words, from what it reports: the tier it read, and whether it mapped the
    data, read it with O_DIRECT or through the page cache. `page_cache`: the data file's state measured
    just before (local files only)."""
    tier = stats["source_tier"]
    if tier != "store":
        how = (
            "mapped, no copy"
            if stats["mapped"]
            else "O_DIRECT"
            if stats["direct_io"]
            else "read through the page cache"
        )
        return f"{tier} tier, {how}"
    if page_cache is None:  # a remote store: neither the page cache nor O_DIRECT is involved
        return store
    return f"{store}, {page_cache}, " + ("O_DIRECT" if stats["direct_io"] else "read through the page cache")


def destination_label(stats: dict[str, Any]) -> str:
    """Where a restore put the bytes, from what it reports: a host pool segment (memory faulted in
    ahead of time), the shm tier's own pages (mapped, or pinned in place), else memory it allocated
    and faulted in during the restore."""
    if stats.get("pooled"):
        return "host pool segment (pre-faulted)"
    if stats.get("mapped"):
        return "the shm tier's pages (mapped)"
    if stats.get("pinned_in_place"):
        return "the shm tier's pages (pinned)"
    return "fresh memory"


def restore_step(uri: str, store: str, page_cache: str | None = None, **kwargs: Any) -> tuple[str, dict[str, Any]]:
    """One restore of the demo (its cache fill finished): its label (`restore_label`) and stats."""
    from kold.snapshot import restore

    snap = restore(uri, **kwargs)
    snap.wait_cache_fill()
    stats = snap.stats.as_dict()
    label = restore_label(stats, store, page_cache)
    if kwargs.get("staging"):  # asked for, not decided by the restore: staging=True always takes the ring
        label += ", GPU-style pinned ring (CPU twin)"
    return label, stats


def restore_from_local_store(uri: str, data_path: Path, report: Report, pool_root: Path | None = None) -> None:
    """The local store's restores: with the data file out of the page cache, then in it (into fresh
    memory, then, given `pool_root`, into a host pool segment), then through the pinned ring. The file
    is read through the page cache in between: the cold restore used O_DIRECT and left it as cold as
    it found it."""
    from kold.commands.snapshot import evict_page_cache

    evict_page_cache(data_path)
    report(*restore_step(uri, "local store", page_cache_state(data_path)))
    read_through_page_cache(data_path)
    label, hot = restore_step(uri, "local store", page_cache_state(data_path))
    report(label, hot)
    if pool_root is not None:
        restore_into_pool(uri, data_path, pool_root, hot["data_bytes"], report)
    report(*restore_step(uri, "local store", page_cache_state(data_path), staging=True))


def restore_into_pool(uri: str, data_path: Path, root: Path, nbytes: int, report: Report) -> None:
    """The hot restore again, into a pool of one segment placed as `kold up` places its own (a
    huge-page tmpfs under `root` as root, else /dev/shm) and removed afterwards: the same read, so
    the difference to the fresh-memory restore is the memory alone. Says so, and goes on, when no
    pool can be had here."""
    from kold.hostpool_auto import scratch_pool
    from kold.output import human_bytes
    from kold.snapshot.errors import HostPoolError

    with contextlib.ExitStack() as stack:
        try:
            pool = stack.enter_context(scratch_pool(root, nbytes))
        except (OSError, HostPoolError) as exc:
            print(f"\n(skipping the host pool: {exc})")
            return
        pages = "2 MiB pages" if pool.huge_pages else "4 KiB pages"
        sizes = ", ".join(human_bytes(s.size) for s in pool.segments())
        print(f"\n    a host pool as `kold up` keeps one: a segment of {sizes} faulted in ahead of time in "
              f"{pool.directory} ({pages})")  # fmt: skip
        # the label says what the restore reports: a pool segment only if it claimed one
        report(*restore_step(uri, "local store", page_cache_state(data_path), pool=pool))


def print_summary(results: list[tuple[str, dict[str, Any]]]) -> None:
    """The restores side by side; and, for a read done into both fresh memory and a pool segment,
    what the pre-faulted memory saved."""
    width = max(len(label) for label, _ in results)
    into = [destination_label(stats) for _, stats in results]
    into_width = max(len("into"), *(len(d) for d in into))
    print("\nrestore summary")
    print(f"  {'restore':<{width}} {'into':<{into_width}} {'total ms':>9} {'GB/s':>7}")
    for (label, stats), where in zip(results, into, strict=True):
        print(f"  {label:<{width}} {where:<{into_width}} {stats['total_s'] * 1000:>9.1f} {stats['gbps']:>7.2f}")
    for label, pooled in results:
        fresh = next((s for lbl, s in results if lbl == label and destination_label(s) == "fresh memory"), None)
        if not pooled.get("pooled") or fresh is None or pooled["total_s"] <= 0:
            continue
        ratio = fresh["total_s"] / pooled["total_s"]
        how = f"{ratio:.1f}x faster" if ratio >= 1 else f"{1 / ratio:.1f}x slower"
        print(
            f"  the same read into pre-faulted memory took {pooled['total_s'] * 1000:.1f} ms, into fresh memory "
            f"{fresh['total_s'] * 1000:.1f} ms: {how}"
        )


def cmd_demo(args: argparse.Namespace, settings: Settings) -> int:
    from kold.commands.snapshot import print_phase_table
    from kold.modelgen import write_random_model
    from kold.snapshot import CacheTier, NodeCache, build_snapshot, prefetch
    from kold.snapshot.store import data_key

    work: Path = args.workdir.resolve()
    model_dir = work / f"model-{args.size}"
    store_root = work / "store"
    if not (model_dir / "tokenizer.json").is_file():
        print(f"[1] making a random {args.size} Llama model in {model_dir}")
        shutil.rmtree(model_dir, ignore_errors=True)
        write_random_model(model_dir, "llama", args.size)
    else:
        print(f"[1] reusing the {args.size} model in {model_dir}")

    print("[2] publishing it as a snapshot to a local store")
    first = build_snapshot(model_dir, store_root.as_uri())
    again = build_snapshot(model_dir, store_root.as_uri())
    m = first.manifest
    print(f"    {first.uri}")
    print(
        f"    {len(m.tensors)} tensors, {m.data_size / 1e6:,.1f} MB, {m.num_chunks} chunks of {m.chunk_size >> 20} MiB"
    )
    print(f"    published again: same id={again.manifest.id == m.id}, uploaded again={again.uploaded}")

    results: list[tuple[str, dict[str, Any]]] = []

    def report(label: str, stats: dict[str, Any]) -> None:
        results.append((label, stats))
        print(f"\n[{len(results) + 2}] restore: {label}; into {destination_label(stats)}")
        print_phase_table(stats)

    data_path = store_root / data_key(m.id)
    restore_from_local_store(first.uri, data_path, report, pool_root=work / "pool")

    shm_root = Path("/dev/shm") / f"kold-demo-{m.id[:8]}"
    cache = NodeCache([CacheTier("shm", shm_root, max(m.data_size * 2, 1 << 20))])
    try:
        prefetch(first.uri, cache)
        # the shm tier's label if the restore read it; the local store's, truthfully, if it did not
        report(*restore_step(first.uri, "local store", page_cache_state(data_path), cache=cache))
    finally:
        shutil.rmtree(shm_root, ignore_errors=True)

    if not args.no_s3:
        _s3_part(model_dir, work, report)

    print_summary(results)

    if not args.no_serve:
        return _platform_part(model_dir, work, len(results) + 3, f"llama-{args.size}")
    return 0


def _platform_part(model_dir: Path, work: Path, step: int, name: str) -> int:
    """The local platform, as a user drives it: up (with the host pool it keeps by default), deploy,
    invoke cold (a completion) and, while that instance holds its pool segment, `snapshot pool
    status`, invoke warm (a chat), describe, logs, down.

    What a user types runs as `kold` commands (their output is the demo); what the demo itself needs
    to know (has the function scaled to zero, does the pool have a free segment for its cold start?)
    it asks the gateway's admin API through PlatformClient, and the pool's directory as `kold snapshot
    pool status` does, rather than parsing a command's output.
    """
    import socket
    import subprocess
    import sys
    import time

    from kold.platform_client import PlatformClient

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    home = work / "platform"
    gateway_url = f"http://127.0.0.1:{port}"
    env = {
        **os.environ,
        "KOLD_HOME": str(home),
        "KOLD_GATEWAY_URL": gateway_url,
        "KOLD_CACHE_SHM_BYTES": "0",  # cold starts restore from the store, so the breakdown shows a real restore
        "KOLD_CACHE_DISK_BYTES": "0",
        "OMP_NUM_THREADS": "1",
    }
    env.pop("KOLD_REDIS_URL", None)  # the platform starts its own redis-server under KOLD_HOME
    env.pop("KOLD_API_KEY", None)  # a fresh loopback platform has no keys
    # the default fast path: `kold up` keeps a host pool of its own, whatever this shell points at
    env.pop("KOLD_HOST_POOL_DIR", None)
    env.pop("KOLD_HOST_POOL", None)

    def kold(label: str, *argv: str) -> None:
        print(f"\n[{label}] $ kold {shlex.join(argv)}", flush=True)
        # stderr too, in order: commands print their status and timings there (stdout is their data)
        done = subprocess.run(
            [sys.executable, "-m", "kold", *argv],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            check=False,
        )
        print(done.stdout, end="", flush=True)
        if done.returncode != 0:
            raise CLIError(f"`kold {shlex.join(argv)}` failed: {done.stdout.strip()}")

    kold(f"{step}", "up", "--detach", "--port", str(port))
    client = PlatformClient(gateway_url, timeout_s=30.0)
    try:
        kold(f"{step + 1}", "deploy", str(model_dir), "--name", name, "--idle-timeout", "3")
        print("\n    waiting for the function to scale to zero (idle timeout 3 s) ...", flush=True)
        deadline = time.monotonic() + 60
        while True:
            described = client.request("GET", f"/admin/functions/{name}") or {}
            live = [i for i in described.get("instances") or [] if i.get("state") not in ("stopped", "failed")]
            pool = free_pool_segments(home)
            if not live and (pool is None or pool[1] > 0):
                print("    no instance is running: the next request is a cold start")
                print(
                    "    the platform keeps no host pool: its restore faults in fresh memory"
                    if pool is None
                    else f"    the host pool {pool[0]} has {pool[1]} free segment(s) for it"
                )
                break
            if time.monotonic() >= deadline:
                print(
                    f"    still {len(live)} instance(s) and {pool[1] if pool else 0} free host pool segment(s) "
                    "after 60 s: the next request may be warm, or restore into fresh memory"
                )
                break
            time.sleep(0.5)
        kold(f"{step + 2}", "invoke", name, "The cold start of a function", "--completion", "--max-tokens", "16")
        # right after the cold start, while its instance lives: the segment it restored into is in use
        kold(f"{step + 3}", "snapshot", "pool", "status")
        kold(f"{step + 4}", "invoke", name, "Say hello", "--chat", "--max-tokens", "16")
        kold(f"{step + 5}", "describe", name)
        kold(f"{step + 6}", "logs", name, "--tail", "2")
    finally:
        client.close()
        kold(f"{step + 7}", "down")
    return 0


def free_pool_segments(home: Path) -> tuple[Path, int] | None:
    """The host pool the platform under `home` keeps, and how many of its segments no process holds
    now (what `kold snapshot pool status` reads); None when it keeps none."""
    from kold.hostpool_auto import managed_directory
    from kold.snapshot.hostpool import HostPool

    directory = managed_directory(home)
    if directory is None:
        return None
    return directory, sum(not s.in_use for s in HostPool(directory).segments())


def _s3_part(model_dir: Path, work: Path, report: Report) -> None:
    from kold.locals3 import LocalS3Error, LocalS3Server
    from kold.snapshot import S3Options, build_snapshot

    s3_root = work / "s3"
    shutil.rmtree(s3_root, ignore_errors=True)
    try:
        server = LocalS3Server(s3_root).start()  # rclone is found (or not) here, not in the constructor
    except LocalS3Error as exc:
        print(f"\n(skipping S3: {exc})")
        return
    with server:
        server.create_bucket("kold")
        saved = {k: os.environ.get(k) for k in server.env()}
        os.environ.update(server.env())
        try:
            options = S3Options(endpoint_url=server.endpoint_url)
            result = build_snapshot(model_dir, "s3://kold/demo", s3=options)
            print(f"\n    published to {result.uri} through rclone serve s3 on loopback")
            report(*restore_step(result.uri, "S3 (rclone on loopback)", s3=options))
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value
