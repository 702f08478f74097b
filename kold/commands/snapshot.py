"""`kold snapshot build|inspect|restore|prefetch|pool`.

`build` prints the snapshot URI alone on stdout (`URI=$(kold snapshot build ./m)`); `inspect` and
`restore` take `-o json|yaml`; progress, summaries and hints go to stderr (kold/output.py).
"""

from __future__ import annotations

import argparse
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kold.errors import CLIError
from kold.output import add_output_option, human_bytes, note, print_data
from kold.progress import ByteProgress, chunk_counter
from kold.settings import Settings

if TYPE_CHECKING:
    from kold.snapshot.hostpool import HostPool


def register(top: Any) -> None:
    parser = top.add_parser("snapshot", help="build, inspect, restore and prefetch weight snapshots")
    sub = parser.add_subparsers(dest="snapshot_command", required=True, metavar="SUBCOMMAND")

    build = sub.add_parser(
        "build", help="publish a model (Hugging Face directory, .gguf file or Hub id) as a snapshot (stdout: its URI)"
    )
    build.add_argument(
        "model", type=model_spec, metavar="MODEL", help="a Hugging Face directory, a .gguf file or owner/name"
    )
    build.add_argument("--to", dest="store", help="store URI (default: KOLD_STORE or the local store)")
    build.add_argument("--chunk-size", default="32MiB", help="chunk size (default 32MiB)")
    build.add_argument("--revision", help="a Hub id's branch, tag or commit (default: main)")
    build.add_argument(
        "--dtype", choices=("bfloat16", "float16", "float32"), help="what a GGUF is dequantized to (default bfloat16)"
    )
    build.set_defaults(handler=cmd_build)

    inspect = sub.add_parser("inspect", help="show a snapshot's id, tensors, chunks and files")
    inspect.add_argument("uri", metavar="URI")
    inspect.add_argument("--tensors", action="store_true", help="list every tensor")
    add_output_option(inspect)  # the manifest
    inspect.set_defaults(handler=cmd_inspect)

    restore = sub.add_parser("restore", help="restore a snapshot and print the phase timings")
    restore.add_argument("uri", metavar="URI")
    restore.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default cpu)")
    verify = restore.add_mutually_exclusive_group()
    verify.add_argument("--verify", dest="verify", action="store_true", default=None, help="check every chunk")
    verify.add_argument("--no-verify", dest="verify", action="store_false", help="check no chunk")
    restore.add_argument("--readers", type=int, help="parallel readers (default: by source)")
    restore.add_argument("--no-cache", action="store_true", help="neither read nor fill the node cache tiers")
    add_output_option(restore)  # the stats
    restore.set_defaults(handler=cmd_restore)

    prefetch = sub.add_parser("prefetch", help="warm this node's cache tiers with a snapshot")
    prefetch.add_argument("uri", metavar="URI")
    prefetch.set_defaults(handler=cmd_prefetch)

    pool = sub.add_parser("pool", help="this node's pre-faulted host memory for CPU restores (KOLD_HOST_POOL_DIR)")
    pool_sub = pool.add_subparsers(dest="pool_command", required=True, metavar="ACTION")
    fill = pool_sub.add_parser("fill", help="add segments, every page faulted in now")
    fill.add_argument("--size", required=True, help="bytes per segment, at least the largest snapshot (e.g. 3GiB)")
    fill.add_argument("--count", type=int, default=1, help="segments to add: instances that restore at once")
    fill.set_defaults(handler=cmd_pool_fill)
    pool_sub.add_parser("status", help="list the segments and which are in use").set_defaults(handler=cmd_pool_status)
    pool_sub.add_parser("clear", help="remove every segment no instance holds").set_defaults(handler=cmd_pool_clear)


def model_spec(text: str) -> str:
    """An argparse type for a model argument (`kold snapshot build`, `kold deploy`): a directory, a
    .gguf file or something shaped like a Hub id, checked without reading it (else a usage error)."""
    from kold.snapshot.errors import ModelSourceError
    from kold.snapshot.resolve import spec_kind

    try:
        spec_kind(text)
    except ModelSourceError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def cmd_build(args: argparse.Namespace, settings: Settings) -> int:
    from kold.settings import parse_size
    from kold.snapshot import build_snapshot
    from kold.snapshot.resolve import resolve_model

    store = args.store or settings.store_uri
    chunk_size = parse_size(args.chunk_size)
    with ByteProgress(f"build {Path(args.model).name}") as progress:
        model = resolve_model(args.model, revision=args.revision, dtype=args.dtype, progress=progress)
        result = build_snapshot(model, store, chunk_size=chunk_size, s3=settings.s3_options(), progress=progress)
    m = result.manifest
    state = "published" if result.uploaded else "already in the store: nothing uploaded"
    note(f"snapshot {m.id} {state}")
    note(f"  {len(m.tensors)} tensors, {m.data_size / 1e6:,.1f} MB in {m.num_chunks} chunks, {result.seconds:.2f}s")
    print(result.uri)
    return 0


def cmd_inspect(args: argparse.Namespace, settings: Settings) -> int:
    from kold.snapshot.restorer import read_manifest
    from kold.snapshot.store import open_store, parse_snapshot_uri

    ref = parse_snapshot_uri(args.uri)
    manifest = read_manifest(open_store(ref.store_uri, settings.s3_options()), ref)
    if args.output:
        print_data({"id": manifest.id, "uri": ref.uri, **manifest.to_dict()}, args.output)
        return 0
    dtypes: dict[str, int] = {}
    for t in manifest.tensors:
        dtypes[t.dtype] = dtypes.get(t.dtype, 0) + t.nbytes
    print(f"snapshot   {manifest.id}")
    print(f"uri        {ref.uri}")
    print(f"format     v{manifest.version}, alignment {manifest.alignment}")
    print(f"data       {manifest.data_size:,} bytes ({manifest.data_size / 1e9:.3f} GB)")
    print(f"chunks     {manifest.num_chunks} x {manifest.chunk_size >> 20} MiB, xxh3-128 each")
    print(f"tensors    {len(manifest.tensors)} ({', '.join(f'{k} {v / 1e6:,.1f} MB' for k, v in dtypes.items())})")
    print(f"files      {', '.join(f.name for f in manifest.files) or '-'}")
    for key, value in manifest.metadata.items():
        print(f"{key:<10} {value}")
    if args.tensors:
        width = max(len(t.name) for t in manifest.tensors)
        print()
        for t in manifest.tensors:
            print(f"  {t.name:<{width}}  {t.dtype:<8} {t.shape!s:<20} @{t.offset:>14,}  {t.nbytes:>14,} B")
    return 0


def cmd_restore(args: argparse.Namespace, settings: Settings) -> int:
    from kold.snapshot import restore
    from kold.snapshot.restorer import read_manifest
    from kold.snapshot.store import open_store, parse_snapshot_uri

    ref = parse_snapshot_uri(args.uri)
    total = read_manifest(open_store(ref.store_uri, settings.s3_options()), ref).data_size
    with ByteProgress(f"restore {ref.snapshot_id[:12]}") as progress:
        snap = restore(
            args.uri,
            args.device,
            readers=args.readers or settings.restore_readers,
            verify=args.verify,
            cache=None if args.no_cache else settings.node_cache,
            s3=settings.s3_options(),
            on_chunk=chunk_counter(progress, "fetch", total),
            pool=settings.host_pool,
        )
    if args.output:
        print_data(snap.stats.as_dict(), args.output)
    else:
        print_phase_table(snap.stats.as_dict())
    if not snap.wait_cache_fill(0):
        note("filling the node cache tiers ...")
        snap.wait_cache_fill()
    return 0


def print_phase_table(stats: dict[str, Any]) -> None:
    source = stats["source_tier"] + (" (mapped, no copy)" if stats["mapped"] else "")
    source += ", into a host pool segment" if stats.get("pooled") else ""
    print(f"snapshot {stats['snapshot_id']}  device {stats['device']}  source {source}")
    rows = [
        ("metadata", stats["metadata_s"], ""),
        ("fetch", stats["fetch_s"], _fetch_note(stats)),
        ("host->device", stats["h2d_s"], "overlaps fetch" if stats["h2d_s"] else "-"),
        ("verify", stats["verify_s"], "summed over readers, overlaps fetch" if stats["verified"] else "off"),
        ("views", stats["views_s"], ""),
        ("total", stats["total_s"], f"{stats['gbps']:.2f} GB/s"),
    ]
    for name, seconds, remark in rows:
        print(f"  {name:<13} {seconds * 1000:>9.1f} ms  {remark}")
    tiers = ", ".join(f"{k} {v / 1e6:,.1f} MB" for k, v in stats["bytes_by_tier"].items())
    print(
        f"  bytes by tier: {tiers or '-'}"
        + (f"; refetched chunks {stats['refetched_chunks']}" if stats["refetched_chunks"] else "")
    )


def _fetch_note(stats: dict[str, Any]) -> str:
    """Readers, and O_DIRECT when the file was cold: a cold read gets more readers (plan.py)."""
    if not stats["readers"]:
        return ""
    return f"{stats['readers']} readers" + (
        ", O_DIRECT (the file was not in the page cache)" if stats.get("direct_io") else ""
    )


def cmd_prefetch(args: argparse.Namespace, settings: Settings) -> int:
    from kold.snapshot import prefetch
    from kold.snapshot.restorer import read_manifest
    from kold.snapshot.store import open_store, parse_snapshot_uri

    ref = parse_snapshot_uri(args.uri)
    total = read_manifest(open_store(ref.store_uri, settings.s3_options()), ref).data_size
    counters: dict[str, Callable[[object], None]] = {}
    lock = threading.Lock()  # reader threads report chunks concurrently
    with ByteProgress(f"prefetch {ref.snapshot_id[:12]}") as progress:

        def on_chunk(tier: str, chunk: object) -> None:
            with lock:
                counter = counters.setdefault(tier, chunk_counter(progress, f"fill {tier} tier", total))
            counter(chunk)

        tiers = prefetch(
            args.uri, settings.node_cache, s3=settings.s3_options(), readers=settings.restore_readers, on_chunk=on_chunk
        )
    where = ", ".join(f"{t.name} ({t.root})" for t in settings.node_cache.tiers if t.name in tiers)
    print(f"snapshot cached in: {where or 'no tier (too large, or every tier disabled)'}")
    from kold.snapshot.hostmem import huge_page_backed

    for tier in settings.node_cache.tiers:
        if tier.name == "shm" and tier.name in tiers and not huge_page_backed(tier.root):
            note(
                f"hint: {tier.root} uses 4 KiB pages; mapping a snapshot from a tmpfs mounted with "
                "huge=within_size is ~10x faster (set KOLD_CACHE_SHM_DIR to such a mount)"
            )
    return 0 if tiers else 1


def evict_page_cache(path: Path) -> None:
    """Drop a file's pages from the page cache, to measure a cold read (drop_caches needs more rights)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def _pool(settings: Settings) -> HostPool:
    from kold.snapshot.errors import HostPoolError

    pool = settings.host_pool
    if pool is None:
        raise HostPoolError(
            "no host pool is configured: `kold up` keeps one (unless KOLD_HOST_POOL=off), or set KOLD_HOST_POOL_DIR "
            "to a directory on a huge-page tmpfs (mount -t tmpfs -o huge=within_size,size=8g tmpfs DIR)"
        )
    return pool


def cmd_pool_fill(args: argparse.Namespace, settings: Settings) -> int:
    from kold.settings import parse_size

    pool = _pool(settings)
    try:
        size = parse_size(args.size)
    except ValueError as exc:
        raise CLIError(f"--size: {exc}") from None
    if not pool.huge_pages:
        note(f"warning: {pool.directory} is not on a huge-page tmpfs: mapping a segment costs a page-table "
             "entry per 4 KiB (~0.3-0.8 s for 2 GB), so the pool saves little over fresh memory")  # fmt: skip
    done = 0

    def made(path: Path) -> None:
        nonlocal done
        done += 1
        print(f"[{done}/{args.count}] {path.name}  {human_bytes(path.stat().st_size)} faulted in", flush=True)

    pool.fill(args.count, size, on_segment=made)
    return cmd_pool_status(args, settings)


def cmd_pool_status(args: argparse.Namespace, settings: Settings) -> int:
    pool = _pool(settings)
    segments = pool.segments()
    pages = "2 MiB pages" if pool.huge_pages else "4 KiB pages"
    print(f"host pool {pool.directory} ({pages}): {len(segments)} segments, "
          f"{human_bytes(sum(s.size for s in segments))}, {sum(s.in_use for s in segments)} in use")  # fmt: skip
    if settings.host_pool_dir is None:  # the pool `kold up` keeps: say so, and what it plans
        from kold.hostpool_auto import describe_managed

        for line in describe_managed(settings.home):
            print(f"  {line}")
    for s in segments:
        print(f"  {s.path.name}  {human_bytes(s.size):>10}  {'in use' if s.in_use else 'free'}")
    return 0


def cmd_pool_clear(args: argparse.Namespace, settings: Settings) -> int:
    removed, busy = _pool(settings).clear()
    print(f"removed {removed} segments" + (f"; {busy} in use stay until their instances end" if busy else ""))
    return 0
