"""`prefetch(uri, cache)`: warm a node's cache tiers ahead of demand (`kold snapshot prefetch`).

The fastest tier is filled from the store with the restore pipeline's parallel verified reads; each
slower tier is then filled from the tier above it (a local copy) rather than from the store again.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

from kold.snapshot.cache import NodeCache
from kold.snapshot.manifest import ChunkEntry
from kold.snapshot.pipeline import LOCAL_PIECE_SIZE, ReadSource
from kold.snapshot.plan import default_readers
from kold.snapshot.restorer import _worth_caching, read_files, read_manifest
from kold.snapshot.store import S3Options, data_key, open_store, parse_snapshot_uri


def prefetch(
    uri: str,
    cache: NodeCache,
    *,
    s3: S3Options | None = None,
    readers: int | None = None,
    on_chunk: Callable[[str, ChunkEntry], None] | None = None,
) -> list[str]:
    """Fill every tier that should hold the snapshot; returns the names of tiers that now hold it.

    `on_chunk(tier name, chunk)` is called as each chunk lands in a tier (for progress bars).
    """
    ref = parse_snapshot_uri(uri)
    store = open_store(ref.store_uri, s3)
    manifest = read_manifest(store, ref)
    files = read_files(store, ref, manifest)
    filled: list[str] = []
    source_store = store
    source_tier = "store"
    remote = ref.store_uri.startswith("s3://")
    for tier in cache.tiers:
        if not _worth_caching(tier, ref):
            continue
        reader = source_store.open_reader(data_key(ref.snapshot_id))
        try:
            ok = cache.fill(
                tier,
                manifest,
                files,
                source=ReadSource(reader, source_tier, 0 if remote and source_tier == "store" else LOCAL_PIECE_SIZE),
                readers=readers or default_readers(remote and source_tier == "store"),
                on_chunk=None if on_chunk is None else functools.partial(on_chunk, tier.name),
            )
        finally:
            reader.close()
        if ok:
            filled.append(tier.name)
            source_store, source_tier = tier.store, tier.name
    if cache.lookup(ref.snapshot_id) is not None:  # touch for LRU; report tiers already holding it too
        filled = [t.name for t in cache.tiers if (t.entry_dir(ref.snapshot_id) / "manifest.json").is_file()]
    return filled
