"""Snapshot build benchmark: time and peak memory of publishing a model, in a fresh process.

The builder streams: two passes (hash, then upload) over one reused chunk buffer, so its peak RSS
should stay near the interpreter's own footprint plus a chunk, whatever the model's size. This
prints both, beside the model size, for a `file://` store (and an S3 store on loopback with --s3).

    .venv/bin/python bench/build.py --size 1b
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

OUT = Path(__file__).resolve().parent / "out"


def _vm_hwm() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def _vm_rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def worker(model_dir: str, store_uri: str, endpoint: str) -> None:
    """One build in this process; prints a JSON line."""
    from kold.snapshot import S3Options, build_snapshot

    before = _vm_rss()
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    started = time.perf_counter()
    result = build_snapshot(Path(model_dir), store_uri, s3=S3Options(endpoint_url=endpoint) if endpoint else None)
    seconds = time.perf_counter() - started
    print(
        json.dumps(
            {
                "seconds": seconds,
                "rss_before": before,
                "peak_rss": _vm_hwm(),
                "data_size": result.manifest.data_size,
                "chunk_size": result.manifest.chunk_size,
                "uploaded": result.uploaded,
            }
        )
    )


def run(model_dir: Path, store_uri: str, endpoint: str = "", env: dict[str, str] | None = None) -> dict[str, float]:
    proc = subprocess.run(
        [sys.executable, __file__, "--worker", str(model_dir), store_uri, endpoint],
        capture_output=True,
        text=True,
        check=True,
        env=env,
    )
    result: dict[str, float] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="1b", help="tiny, small or 1b (default)")
    parser.add_argument("--s3", action="store_true", help="also publish to an S3 server on loopback")
    parser.add_argument("--worker", nargs=3, metavar=("MODEL_DIR", "STORE", "ENDPOINT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(*args.worker)
        return 0

    import os

    from kold.modelgen import write_random_model

    model_dir = OUT / args.size / "model"
    if not (model_dir / "config.json").is_file():
        print(f"generating the {args.size} model in {model_dir}", flush=True)
        write_random_model(model_dir, "llama", args.size)
    rows = []
    with tempfile.TemporaryDirectory(dir=OUT) as tmp:
        store = Path(tmp) / "store"
        print("building to a file:// store (fresh process) ...", flush=True)
        rows.append(("file://, new", run(model_dir, store.as_uri())))
        print("building again (same id: nothing uploaded) ...", flush=True)
        rows.append(("file://, again", run(model_dir, store.as_uri())))
        if args.s3:
            from kold.locals3 import LocalS3Server

            with LocalS3Server(Path(tmp) / "s3") as server:
                server.create_bucket("build")
                env = {**os.environ, **server.env()}
                print("building to S3 on loopback ...", flush=True)
                rows.append(("s3://, new", run(model_dir, "s3://build/bench", server.endpoint_url, env)))
        shutil.rmtree(store, ignore_errors=True)

    print(
        f"\n{'build':<16} {'seconds':>8} {'GB/s':>6} {'peak RSS MB':>12} {'+RSS MB':>8} {'model MB':>9} {'chunk MB':>9}"
    )
    for label, r in rows:
        gbps = r["data_size"] / r["seconds"] / 1e9
        print(
            f"{label:<16} {r['seconds']:>8.2f} {gbps:>6.2f} {r['peak_rss'] / 1e6:>12.0f} "
            f"{(r['peak_rss'] - r['rss_before']) / 1e6:>8.0f} {r['data_size'] / 1e6:>9.0f} {r['chunk_size'] / 1e6:>9.1f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
