"""Restore benchmark: kold's snapshot restore against its peers and the machine's limits, in one run.

    .venv/bin/python bench/restore.py                      # 1b (~2.2 GB bf16), every method, 3 runs
    .venv/bin/python bench/restore.py --size small --runs 1 --methods safetensors,kold
    python bench/restore.py --device cuda                   # on a GPU machine: every method to CUDA

Each run of each method is a fresh process (`--worker`), so no method inherits another's allocator
state, mappings or warm imports. Runs go round-robin (run 1 of every method, then run 2, ...) so drift
over the run (page cache, thermal, neighbours) spreads over all methods alike. Hot methods find their
input files in the page cache (the parent reads them just before); cold methods evict them with
POSIX_FADV_DONTNEED right before the timed part.

The timed part is the load call(s), making the result owned memory (clone() after lazy mmap loaders)
and the touch: one byte of every 4 KiB page of every tensor is read (plus each tensor's last byte), so
every page is resident and mapped — reading every *byte* with torch (uint8 sum) runs at ~0.13 GB/s on
this machine and would drown every method in the touch. Interpreter start and imports are not timed.
Nothing is subtracted from any time.

With `--device cuda` every method delivers the tensors in GPU memory (peers the way their users move
them there), the touch samples them on the device and ends with a device-wide synchronize, and the
limits are the host-to-device copy from pinned and from pageable memory. CUDA is initialised in each
worker before the timed part (every method would pay the same for its context).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from common import host_pool, huge_tmpfs  # noqa: E402
from restore_methods import METHODS, PAGE, Skip, Spec, Tensors, fill_kold_shm, input_files  # noqa: E402

DEFAULT_OUT = HERE / "out"
WORKER_TIMEOUT_S = 600
HEARTBEAT_S = 30
TIERS = ("limit", "hot", "cold", "s3")


# --- worker side ---------------------------------------------------------------------------------


def touch(tensors: Tensors) -> tuple[int, int]:
    """Read one byte of every page of every tensor; (bytes, fingerprint of the bytes read).

    The fingerprint depends only on each tensor's contents (samples are taken from each tensor's own
    start), so every method that restores the same model must report the same one. On a GPU the
    samples are summed on the device and read back once (a read-back per tensor cost ~0.1 s for the
    1b model's 200 tensors: noise that would fall on every method but the limits).
    """
    import torch

    total = 0
    parts: list[torch.Tensor] = []
    for t in tensors.values():
        if t.numel() == 0:
            continue
        flat = t.reshape(-1).view(torch.uint8)
        parts.append(flat[::PAGE].sum(dtype=torch.int64) + flat[-1].to(torch.int64))
        total += flat.numel()
    by_device: dict[torch.device, list[torch.Tensor]] = {}
    for p in parts:
        by_device.setdefault(p.device, []).append(p)
    fingerprint = sum(int(torch.stack(ps).sum()) for ps in by_device.values())
    if torch.cuda.is_initialized():
        torch.cuda.synchronize()  # every stream: a loader's copies must be done, not just enqueued
    return total, fingerprint


def reset_peak_rss() -> None:
    """Restart the peak-RSS count here, so the peak is the timed part's, not `import torch`'s.

    Writing 5 to /proc/self/clear_refs resets the memory map's RSS high-water mark (VmHWM).
    """
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")


def peak_rss() -> int:
    """VmHWM, in bytes. Not ru_maxrss: that also keeps the high-water mark of the memory map this
    process replaced at exec, i.e. the parent benchmark's (~320 MB) after fork, which nothing resets.
    """
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def worker(name: str, spec: Spec) -> dict[str, Any]:
    """One timed restore in this (fresh) process."""
    import psutil
    from restore_prep import evict

    if name in ("kold-shm-fill", "kold-shm-huge-fill"):
        fill_kold_shm(spec, huge=name == "kold-shm-huge-fill")
        return {"method": name}
    method = METHODS[name]
    if spec.device != "cpu":
        if spec.dry_run:
            return {"method": name, "skip": "dry run: stopped before the first CUDA call"}
        import torch

        torch.zeros(1, device=spec.device)  # the CUDA context, untimed and the same for every method
    try:
        load = method.prepare(spec)
    except Skip as e:
        return {"method": name, "skip": str(e)}
    if method.cold:
        evict(input_files(spec, method.inputs))
    gc.collect()
    reset_peak_rss()
    base_rss = psutil.Process().memory_info().rss
    started = time.perf_counter()
    tensors = load()
    nbytes, fingerprint = touch(tensors)
    seconds = time.perf_counter() - started
    peak = peak_rss()
    result = {
        "method": name,
        "seconds": seconds,
        "bytes": nbytes,
        "fingerprint": fingerprint,
        "base_rss": base_rss,
        "peak_rss": peak,
        "tensors": len(tensors),
    }
    stats = getattr(load, "stats", None)
    if stats is not None:
        result["kold_stats"] = stats()
    return result


# --- parent side ---------------------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.start = time.perf_counter()

    def log(self, msg: str) -> None:
        elapsed = int(time.perf_counter() - self.start)
        print(f"[{elapsed // 60:3d}m{elapsed % 60:02d}s] {msg}", flush=True)


def run_worker(name: str, spec: Spec, heartbeat: Clock | None = None) -> dict[str, Any]:
    """Run one method in a fresh process; its result line, or {"error": ...}. Logs every 30 s while it runs."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", name, "--spec", spec.to_json()]
    started = time.perf_counter()
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as proc:
        while True:
            try:
                out, err = proc.communicate(timeout=HEARTBEAT_S)
                break
            except subprocess.TimeoutExpired:
                waited = time.perf_counter() - started
                if waited > WORKER_TIMEOUT_S:
                    proc.kill()
                    proc.communicate()
                    return {"method": name, "error": f"timed out after {WORKER_TIMEOUT_S} s"}
                if heartbeat:
                    heartbeat.log(f"          {name} still running ({waited:.0f} s)")
    lines = [ln for ln in out.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (err or out).strip().splitlines()[-15:]
        return {"method": name, "error": f"exit {proc.returncode}: " + "\n".join(tail)}
    result: dict[str, Any] = json.loads(lines[-1])
    return result


def select(spec: str, device: str = "cpu") -> list[str]:
    """Method names from a comma list of names and/or tiers ("hot", "cold", "s3", "limit", "kold", "peer");
    only those that run on `device`."""
    if not spec:
        return [n for n, m in METHODS.items() if m.runs_on(device)]
    names: list[str] = []
    for item in (s.strip() for s in spec.split(",") if s.strip()):
        if item in METHODS:
            picked = [item]
        else:
            picked = [n for n, m in METHODS.items() if item in (m.tier, m.owner) and m.runs_on(device)]
        if not picked:
            raise SystemExit(f"unknown method {item!r}; choose from {', '.join(METHODS)} or {', '.join(TIERS)}")
        names += [n for n in picked if n not in names]
    return [n for n in METHODS if n in names]  # keep the registry's order: limits, hot, cold, s3


def run_all(args: argparse.Namespace) -> int:
    from restore_prep import prepare, s3_server, warm
    from restore_report import Outcome, gpu_targets, machine, plot, table, targets, versions

    clock = Clock()
    names = select(args.methods, args.device)
    wants = {METHODS[n].inputs for n in names}
    kold = any(METHODS[n].owner == "kold" for n in names)
    clock.log(f"restore benchmark: size {args.size}, {args.runs} runs x {len(names)} methods: {', '.join(names)}")
    load_before = os.getloadavg()[0]
    if load_before > 0.5:
        clock.log(f"WARNING: load average {load_before:.2f}: something else is using the CPUs, timings will be noisy")
    spec, chunk, kold_skip = prepare(args.out, args.size, kold=kold, pt="pt" in wants, tensors="tensors" in wants,
                                     log=clock.log)  # fmt: skip
    spec = replace(spec, device=args.device, dry_run=args.dry_run)
    if args.prepare_only:
        clock.log(f"inputs ready in {args.out / args.size}")
        return 0
    clock.log(f"model: {len(spec.model_files)} shards, {spec.tensor_bytes / 1e9:.3f} GB of tensors, to {args.device}")
    outcomes = {n: Outcome(n) for n in names}
    if kold_skip:
        for n in names:
            if METHODS[n].owner == "kold":
                outcomes[n].skipped = kold_skip

    with contextlib.ExitStack() as stack:
        if any(METHODS[n].tier == "s3" for n in names):
            try:
                spec = stack.enter_context(s3_server(args.out, args.size, spec, kold=kold and not kold_skip,
                                                        log=clock.log))  # fmt: skip
            except (ImportError, OSError, RuntimeError) as e:  # no rclone, or it would not start (LocalS3Error)
                for n in names:
                    if METHODS[n].tier == "s3":
                        outcomes[n].skipped = f"no loopback S3 server ({e})"
        if spec.kold_shm_dir:
            stack.callback(shutil.rmtree, spec.kold_shm_dir, True)
        if "kold-shm-huge" in names and spec.kold_local_uri:
            huge_dir = stack.enter_context(
                huge_tmpfs(args.out / args.size / "hugeshm", 2 * spec.tensor_bytes, clock.log)
            )
            spec = replace(spec, kold_shm_huge_dir=str(huge_dir) if huge_dir else "")
        if any(n.startswith("kold-pool") for n in names) and spec.kold_local_uri:
            pool_dir = stack.enter_context(host_pool(args.out / args.size / "pool", spec.tensor_bytes, clock.log))
            spec = replace(spec, kold_pool_dir=str(pool_dir))
        for shm_method in ("kold-shm", "kold-shm-huge"):
            if shm_method in names and not outcomes[shm_method].skipped:
                clock.log(f"filling the tier of {shm_method} (untimed, its own process)")
                filled = run_worker(f"{shm_method}-fill", spec)
                if "error" in filled:
                    outcomes[shm_method].skipped = "filling the shm tier failed: " + filled["error"]
        total = args.runs * len(names)
        done = 0
        for run in range(1, args.runs + 1):
            for name in names:
                done += 1
                outcome = outcomes[name]
                if outcome.skipped:
                    continue
                method = METHODS[name]
                if not method.cold:
                    warm(input_files(spec, method.inputs))
                result = run_worker(name, spec, clock)
                prefix = f"[{done:3d}/{total}] {name:<18} run {run}/{args.runs}"
                if "skip" in result:
                    outcome.skipped = result["skip"]
                    clock.log(f"{prefix}  skipped: {outcome.skipped}")
                elif "error" in result:
                    outcome.errors.append(result["error"])
                    clock.log(f"{prefix}  FAILED: {result['error']}")
                else:
                    outcome.runs.append(result)
                    gbps = result["bytes"] / result["seconds"] / 1e9
                    clock.log(f"{prefix}  {result['seconds']:7.3f} s  {gbps:5.2f} GB/s  "
                              f"peak RSS {result['peak_rss'] / 1e6:6.0f} MB")  # fmt: skip

    date = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    info = {"date": date, "size": args.size, "device": args.device, "runs": args.runs, "tensor_bytes": spec.tensor_bytes,
            "kold_chunk_size": chunk, "machine": machine(), "versions": versions(),
            "load_average": {"start": load_before, "end": os.getloadavg()[0]}}  # fmt: skip
    checks = targets(outcomes, spec.tensor_bytes, chunk) if args.device == "cpu" else gpu_targets(outcomes)
    print()
    print(table(outcomes))
    print("\nx peer = fastest peer of the same tier / this method (limits: vs the fastest hot peer); "
          "+RSS = peak RSS minus RSS before the timed part")  # fmt: skip
    print()
    for c in checks:
        print(f"{c['verdict']:<4}  {c['target']}: {c['detail']}")
    print("\nversions: " + ", ".join(f"{k} {v}" for k, v in info["versions"].items()))

    stem = args.out / (f"restore-{args.size}" + ("" if args.device == "cpu" else f"-{args.device.replace(':', '')}"))
    doc = {**info, "targets": checks, "methods": {
        n: {"tier": METHODS[n].tier, "owner": METHODS[n].owner, "about": METHODS[n].about,
            "median_s": o.median_s if o.ok else None, "gbps": o.gbps if o.ok else None,
            "peak_rss_mb": o.peak_rss_mb if o.ok else None, "delta_rss_mb": o.delta_rss_mb if o.ok else None,
            "skipped": o.skipped, "errors": o.errors, "runs": o.runs}
        for n, o in outcomes.items()}}  # fmt: skip
    stem.with_suffix(".json").write_text(json.dumps(doc, indent=2))
    where = info["machine"].get("gpu_name") or f"{info['machine']['cpus']} cores"
    try:
        plot(outcomes, stem.with_suffix(".png"), f"restore of a {spec.tensor_bytes / 1e9:.2f} GB bf16 Llama "
             f"({args.size}) to {args.device}, median of {args.runs}, {where}, {date}")  # fmt: skip
        clock.log(f"wrote {stem}.json and {stem}.png")
    except ImportError as e:  # matplotlib is in the bench extra; the JSON holds every figure anyway
        clock.log(f"wrote {stem}.json (no plot: {e})")
    return 1 if any(o.errors for o in outcomes.values()) else 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--size", default="1b", choices=["1b", "small", "tiny"], help="generated model (default 1b)")
    p.add_argument("--runs", type=int, default=3, help="fresh-process runs per method; the median is reported")
    p.add_argument("--methods", default="", help=f"comma list of methods or tiers ({', '.join(TIERS)}, kold, peer)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="work and results directory (gitignored)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where the tensors must end up")
    p.add_argument("--list", action="store_true", help="list the methods and exit")
    p.add_argument("--prepare-only", action="store_true", help="make the inputs the methods need, then exit")
    p.add_argument("--dry-run", action="store_true",
                   help="everything but the timed part: each worker stops before its first CUDA call")  # fmt: skip
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--spec", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args.worker, Spec.from_json(args.spec))), flush=True)
        return 0
    if args.list:
        for m in METHODS.values():
            print(f"{m.name:<18} {m.tier:<5} {'/'.join(m.devices):<9} {m.about}")
        return 0
    if args.runs < 1:
        p.error("--runs must be >= 1")
    args.out = args.out.resolve()
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    return run_all(args)


if __name__ == "__main__":
    sys.exit(main())
