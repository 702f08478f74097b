"""`kold demo`: the main job in one command, on a fresh machine.

Make a model, publish it (and publish it again: nothing is re-uploaded), restore it from a cold and
a hot page cache, through the GPU-style pinned ring (its CPU twin here), from the shared-memory tier
and from S3 on loopback (one table of phase timings), then serve it with the runtime: invoke it
cold (the request waits for the restore) and warm, print the cold-start breakdown, and stop it with
SIGTERM. (Until the local platform lands, "deploy" is `kold runtime serve` on the snapshot.)
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path
from typing import Any

from kold.cli import CLIError
from kold.settings import Settings


def register(top: Any) -> None:
    parser = top.add_parser("demo", help="make a model, publish it, restore it several ways, print the timings")
    parser.add_argument("--size", default="small", help="model size: tiny, small (default) or 1b")
    parser.add_argument("--workdir", type=Path, default=Path(".kold/demo"), help="where models and stores go")
    parser.add_argument("--no-s3", action="store_true", help="skip the S3 (rclone on loopback) part")
    parser.add_argument("--no-serve", action="store_true", help="skip serving and invoking the model")
    parser.set_defaults(handler=cmd_demo)


def cmd_demo(args: argparse.Namespace, settings: Settings) -> int:
    from kold.commands.snapshot import evict_page_cache, print_phase_table
    from kold.modelgen import write_random_llama
    from kold.snapshot import CacheTier, NodeCache, build_snapshot, prefetch, restore
    from kold.snapshot.store import data_key

    work: Path = args.workdir.resolve()
    model_dir = work / f"model-{args.size}"
    store_root = work / "store"
    if not (model_dir / "tokenizer.json").is_file():
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

    print("\nrestore summary")
    print(f"  {'restore':<48} {'total ms':>9} {'GB/s':>7}")
    for label, stats in results:
        print(f"  {label:<48} {stats['total_s'] * 1000:>9.1f} {stats['gbps']:>7.2f}")

    if not args.no_serve:
        return _serve_part(first.uri, work, len(results) + 3)
    return 0


def _serve_part(uri: str, work: Path, step: int) -> int:
    """Start a runtime on the snapshot, invoke it cold then warm, print the breakdown, stop it."""
    import os
    import signal
    import socket
    import subprocess
    import sys
    import time

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    log_path = work / "runtime.log"
    # cache tiers off, one torch thread: a plain store restore, comparable from machine to machine
    env = {**os.environ, "KOLD_CACHE_SHM_BYTES": "0", "KOLD_CACHE_DISK_BYTES": "0", "OMP_NUM_THREADS": "1"}
    print(f"\n[{step}] serving it: kold runtime serve --snapshot {uri} --port {port}  (log: {log_path})")
    started = time.perf_counter()
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen(
            [sys.executable, "-m", "kold", "runtime", "serve", "--snapshot", uri, "--port", str(port)],
            env=env,
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
    try:
        messages = [{"role": "user", "content": "Say something about cold starts."}]
        print(f"\n[{step + 1}] invoke, cold (the request is sent at once and waits for the restore)")
        cold = _invoke(port, uri.rsplit("/", 1)[1], messages, started, proc)
        print(f"\n    first token {cold['first_token_s'] * 1000:.0f} ms after the process started")
        for key, value in sorted(cold["headers"].items()):
            print(f"    {key}: {value}")
        print(f"\n[{step + 2}] invoke, warm")
        warm = _invoke(port, uri.rsplit("/", 1)[1], messages, time.perf_counter(), proc)
        print(f"\n    first token {warm['first_token_s'] * 1000:.0f} ms after the request; "
              f"{warm['tokens']} tokens in {warm['total_s'] * 1000:.0f} ms; cold-start headers: "
              f"{'none (warm)' if not any('cold' in k for k in warm['headers']) else warm['headers']}")  # fmt: skip
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            code = proc.wait()
    print(f"\n[{step + 3}] SIGTERM: the runtime drained and exited with status {code}")
    return 0 if code == 0 else 1


def _invoke(port: int, model: str, messages: list[dict[str, str]], since: float, proc: Any) -> dict[str, Any]:
    """One streamed chat completion; prints the text as it arrives."""
    import json
    import time

    import httpx

    body = {
        "model": model,
        "messages": messages,
        "max_tokens": 24,
        "stream": True,
        "temperature": 0,
        "stream_options": {"include_usage": True},  # the last chunk says how many tokens were generated
    }
    deadline = time.perf_counter() + 300
    while True:
        try:
            with (
                httpx.Client(timeout=300) as client,
                client.stream("POST", f"http://127.0.0.1:{port}/v1/chat/completions", json=body) as resp,
            ):
                if resp.status_code != 200:
                    raise CLIError(f"the runtime answered {resp.status_code}: {resp.read().decode()[:300]}")
                first: float | None = None
                tokens = 0
                print("    ", end="", flush=True)
                for line in resp.iter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    chunk = json.loads(line[6:])
                    if chunk.get("usage"):
                        tokens = int(chunk["usage"]["completion_tokens"])
                    if not chunk["choices"]:
                        continue
                    delta = chunk["choices"][0]["delta"].get("content") or ""
                    if delta and first is None:  # the role-only opening chunk carries no token
                        first = time.perf_counter() - since
                    print(delta, end="", flush=True)
                headers = {k: v for k, v in resp.headers.items() if k.lower().startswith("x-kold")}
                return {
                    "first_token_s": first or 0.0,
                    "total_s": time.perf_counter() - since,
                    "tokens": tokens,
                    "headers": headers,
                }
        except httpx.ConnectError:
            if proc.poll() is not None or time.perf_counter() > deadline:
                raise CLIError("the runtime did not start: see its log") from None
            time.sleep(0.01)


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
