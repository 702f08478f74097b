"""`kold demo`: the main job in one command, on a fresh machine.

Until the runtime lands this shows the snapshot engine end to end: make a model, publish it (and
publish it again: nothing is re-uploaded), restore it from a cold and a hot page cache, through the
GPU-style pinned ring (its CPU twin here), from the shared-memory tier, and from S3 on loopback,
then print one table of phase timings.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path
from typing import Any

from kold.settings import Settings


def register(top: Any) -> None:
    parser = top.add_parser("demo", help="make a model, publish it, restore it several ways, print the timings")
    parser.add_argument("--size", default="small", help="model size: tiny, small (default) or 1b")
    parser.add_argument("--workdir", type=Path, default=Path(".kold/demo"), help="where models and stores go")
    parser.add_argument("--no-s3", action="store_true", help="skip the S3 (rclone on loopback) part")
    parser.set_defaults(handler=cmd_demo)


def cmd_demo(args: argparse.Namespace, settings: Settings) -> int:
    from kold.commands.snapshot import evict_page_cache, print_phase_table
    from kold.modelgen import write_random_llama
    from kold.snapshot import CacheTier, NodeCache, build_snapshot, prefetch, restore
    from kold.snapshot.store import data_key

    work: Path = args.workdir.resolve()
    model_dir = work / f"model-{args.size}"
    store_root = work / "store"
    if not (model_dir / "config.json").is_file():
        print(f"[1] making a random {args.size} Llama model in {model_dir}")
        shutil.rmtree(model_dir, ignore_errors=True)
        write_random_llama(model_dir, args.size)
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

    def run(label: str, uri: str = first.uri, **kwargs: Any) -> None:
        snap = restore(uri, **kwargs)
        snap.wait_cache_fill()
        results.append((label, snap.stats.as_dict()))
        print(f"\n[{len(results) + 2}] restore: {label}")
        print_phase_table(snap.stats.as_dict())

    evict_page_cache(store_root / data_key(m.id))
    run("local store, cold page cache")
    run("local store, hot page cache")
    run("local store, GPU-style pinned ring (CPU twin)", staging=True)

    shm_root = Path("/dev/shm") / f"kold-demo-{m.id[:8]}"
    cache = NodeCache([CacheTier("shm", shm_root, max(m.data_size * 2, 1 << 20))])
    try:
        prefetch(first.uri, cache)
        run("shm tier (mapped, shared)", cache=cache)
    finally:
        shutil.rmtree(shm_root, ignore_errors=True)

    if not args.no_s3:
        _s3_part(m.id, model_dir, work, run)

    print("\nsummary")
    print(f"  {'restore':<48} {'total ms':>9} {'GB/s':>7}")
    for label, stats in results:
        print(f"  {label:<48} {stats['total_s'] * 1000:>9.1f} {stats['gbps']:>7.2f}")
    return 0


def _s3_part(snapshot_id: str, model_dir: Path, work: Path, run: Any) -> None:
    import os

    from kold.snapshot import S3Options, build_snapshot

    try:
        from kold.locals3 import LocalS3Server
    except ImportError:
        print("\n(skipping S3: kold.locals3 is unavailable)")
        return
    s3_root = work / "s3"
    shutil.rmtree(s3_root, ignore_errors=True)
    try:
        server = LocalS3Server(s3_root)
    except (FileNotFoundError, RuntimeError) as exc:
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
            run("S3 (rclone on loopback)", result.uri, s3=options)
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value
