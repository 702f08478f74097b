"""Gateway overhead: a warm function called directly on its runtime against through the gateway.

One run starts, on loopback:
- a runtime (`python -m kold runtime serve --snapshot URI --port P`, OMP_NUM_THREADS=1, cache tiers off);
- a private redis-server on a free port (the registry), and the gateway app under uvicorn in a
  subprocess, with a function of the same snapshot deployed (`wait: true`) and warmed, so the
  gateway routes to its own READY instance of that snapshot.

Measured with max_tokens=1 (`/v1/completions`, non-streamed), alternating direct and gateway:
- latency: N sequential requests per path, one keep-alive client each, direct and gateway requests
  interleaved: p50 / p99 (ms), and the gateway's added ms;
- throughput: C closed-loop workers (kold loadgen's client, a keep-alive connection each) for D seconds: requests/s, ratio.
Medians over R repetitions. Targets: added p50 < 2 ms; throughput through the gateway >= 0.8x direct.

    .venv/bin/python bench/gateway.py --requests 200 --clients 8 --duration 5 --reps 3
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import psutil
from common import free_port, log

from kold.loadgen.client import Client
from kold.loadgen.schedule import PlannedRequest
from kold.loadgen.target import Target

NAME = "bench"
RUNTIME = {"max_batch": 4, "max_seq_len": 128}
PROMPT = "The weights of a cold function"
REQUEST = PlannedRequest(at_s=0.0, function=NAME, prompt_tokens=0, max_tokens=1)

GATEWAY = r"""
import sys, logging
from pathlib import Path
from typing import Any
import redis, uvicorn
from kold.gateway.app import build_app, server_config
from kold.gateway.pool import InstancePool
from kold.gateway.registry import Registry
redis_port, port, logs = int(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3])
registry = Registry(redis.Redis(host="127.0.0.1", port=redis_port), prefix="kold-bench:")
app = build_app(registry, InstancePool(logs), require_keys=False)
uvicorn.Server(server_config(app, "127.0.0.1", port)).run()  # as `kold up` serves it
"""


def wait_http(url: str, proc: subprocess.Popen[bytes], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}")
        try:
            if httpx.get(url, timeout=1, trust_env=False).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.05)
    raise RuntimeError(f"{what} not ready within {timeout_s}s")


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def percentile(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(q * (len(s) - 1))))]


def _client(base: str) -> Client:
    """kold loadgen's client (the one the benchmarks share): non-streamed completions, keep-alive."""
    return Client(Target(f"{base}/v1", api="completions", stream=False), max_connections=None, timeout_s=60, stall_s=60)


async def _timed(client: Client) -> float:
    """One request's latency in ms (it must succeed)."""
    record = await client.send(REQUEST, PROMPT, origin=time.perf_counter(), scheduled=time.perf_counter())
    if record.error is not None or record.latency_s is None:
        raise RuntimeError(f"{client.target.url}: {record.error} {record.error_detail or ''}")
    return record.latency_s * 1000


def latency(direct: str, gateway: str, n: int) -> dict[str, tuple[float, float]]:
    """p50, p99 in ms of n sequential requests per path, one keep-alive client each, interleaved.

    Direct and gateway requests alternate (which goes first alternates too), so a burst of noise on
    the 2 shared cores lands on both paths alike instead of on whichever ran during it.
    """

    async def run() -> dict[str, list[float]]:
        times: dict[str, list[float]] = {"direct": [], "gateway": []}
        async with _client(direct) as c_direct, _client(gateway) as c_gateway:
            order = [("direct", c_direct), ("gateway", c_gateway)]
            for i in range(n + 5):
                for label, client in order if i % 2 else order[::-1]:
                    dt = await _timed(client)
                    if i >= 5:  # after 5 warm-up requests
                        times[label].append(dt)
        return times

    times = asyncio.run(run())
    return {k: (percentile(v, 0.5), percentile(v, 0.99)) for k, v in times.items()}


def throughput(base: str, clients: int, duration_s: float) -> float:
    """Requests/s completed by `clients` closed-loop workers (one connection each) for `duration_s`."""

    async def run() -> float:
        async with _client(base) as client:
            await asyncio.gather(*(_timed(client) for _ in range(clients)))  # connect outside the window
            end_at = time.perf_counter() + duration_s
            t0 = time.perf_counter()

            async def worker() -> int:
                done = 0
                while time.perf_counter() < end_at:
                    await _timed(client)
                    done += 1
                return done

            counts = await asyncio.gather(*(worker() for _ in range(clients)))
            return sum(counts) / (time.perf_counter() - t0)

    return asyncio.run(run())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="tiny", help="modelgen size (default tiny)")
    ap.add_argument("--requests", type=int, default=200, help="sequential requests per latency run")
    ap.add_argument("--clients", type=int, default=8, help="concurrent clients for throughput")
    ap.add_argument("--duration", type=float, default=5.0, help="seconds per throughput run")
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()
    redis_bin = shutil.which("redis-server")
    if redis_bin is None:
        print("no redis-server on PATH", file=sys.stderr)
        return 2

    from kold.modelgen import write_random_model
    from kold.snapshot import build_snapshot

    procs: list[subprocess.Popen[bytes]] = []
    files: list[Any] = []
    with tempfile.TemporaryDirectory(prefix="kold-bench-gw-") as tmp_s:
        tmp = Path(tmp_s)
        try:
            log(f"building the {args.size} model snapshot")
            model_dir = write_random_model(tmp / "model", "llama", args.size, seed=1)
            uri = build_snapshot(model_dir, (tmp / "store").as_uri()).uri
            env = {
                **os.environ,
                "OMP_NUM_THREADS": "1",
                "KOLD_CACHE_SHM_BYTES": "0",
                "KOLD_CACHE_DISK_BYTES": "0",
                "KOLD_HOME": str(tmp / "home"),
                "PYTHONUNBUFFERED": "1",
            }
            env.pop("PORT", None)

            rport, rt_port, gw_port = free_port(), free_port(), free_port()
            log(f"starting redis-server on {rport}, the direct runtime on {rt_port}, the gateway on {gw_port}")
            rcmd = [redis_bin, "--port", str(rport), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
            procs.append(subprocess.Popen([*rcmd, "--dir", str(tmp)], stdout=subprocess.DEVNULL))
            rt_cmd = [sys.executable, "-m", "kold", "runtime", "serve", "--snapshot", uri, "--port", str(rt_port)]
            rt_cmd += ["--served-model-name", NAME, "--max-batch", str(RUNTIME["max_batch"])]
            rt_cmd += ["--max-seq-len", str(RUNTIME["max_seq_len"])]
            rt_log = open(tmp / "runtime.log", "wb")  # noqa: SIM115 - closed in the finally below
            files.append(rt_log)
            procs.append(subprocess.Popen(rt_cmd, env=env, stdout=rt_log, stderr=subprocess.STDOUT))
            gw_cmd = [sys.executable, "-c", GATEWAY, str(rport), str(gw_port), str(tmp / "logs")]
            gw_log = open(tmp / "gateway.log", "wb")  # noqa: SIM115
            files.append(gw_log)
            procs.append(subprocess.Popen(gw_cmd, env=env, stdout=gw_log, stderr=subprocess.STDOUT))
            direct = f"http://127.0.0.1:{rt_port}"
            gateway = f"http://127.0.0.1:{gw_port}"
            wait_http(f"{direct}/readyz", procs[1], 300, "runtime")
            wait_http(f"{gateway}/healthz", procs[2], 60, "gateway")
            log("deploying the function through the gateway (wait: true)")
            body = {
                "snapshot_uri": uri,
                "runtime": RUNTIME,
                "scaling": {"request_timeout_s": 300, "max_instances": 1},
                "wait": True,
            }
            r = httpx.post(f"{gateway}/admin/functions/{NAME}/revisions", json=body, timeout=320, trust_env=False)
            if r.status_code != 201:
                raise RuntimeError(f"deploy failed: {r.status_code} {r.text[:300]}")
            latency(direct, gateway, 20)  # warm both

            rows: dict[str, dict[str, list[float]]] = {
                "direct": {"p50": [], "p99": [], "rps": []},
                "gateway": {"p50": [], "p99": [], "rps": []},
            }
            gw_proc = psutil.Process(procs[2].pid)
            cpu_ms: list[float] = []
            for rep in range(args.reps):
                t = gw_proc.cpu_times()
                lat = latency(direct, gateway, args.requests)
                t2 = gw_proc.cpu_times()
                cpu_ms.append((t2.user + t2.system - t.user - t.system) * 1000 / (args.requests + 5))
                log(f"rep {rep + 1}/{args.reps}: the gateway process used {cpu_ms[-1]:.2f} CPU ms per request")
                for label, base in (("direct", direct), ("gateway", gateway)):
                    p50, p99 = lat[label]
                    rps = throughput(base, args.clients, args.duration)
                    rows[label]["p50"].append(p50)
                    rows[label]["p99"].append(p99)
                    rows[label]["rps"].append(rps)
                    log(f"rep {rep + 1}/{args.reps} {label}: p50 {p50:.2f} ms, p99 {p99:.2f} ms, {rps:.1f} req/s")
            desc = httpx.get(f"{gateway}/admin/functions/{NAME}", timeout=10, trust_env=False).json()
            n_inst = sum(1 for i in desc["instances"] if i["state"] == "ready")
        finally:
            for p in reversed(procs):
                stop(p)
            for f in files:
                f.close()

    med = {k: {m: statistics.median(v) for m, v in d.items()} for k, d in rows.items()}
    added_p50 = med["gateway"]["p50"] - med["direct"]["p50"]
    added_p99 = med["gateway"]["p99"] - med["direct"]["p99"]
    ratio = med["gateway"]["rps"] / med["direct"]["rps"]
    print()
    print(
        f"model {args.size}, max_tokens 1, {args.requests} sequential requests, {args.clients} clients x "
        f"{args.duration:g} s, median of {args.reps}; gateway instances READY at the end: {n_inst}"
    )
    print()
    print("| path | p50 ms | p99 ms | req/s |")
    print("|---|---|---|---|")
    for label in ("direct", "gateway"):
        m = med[label]
        print(f"| {label} | {m['p50']:.2f} | {m['p99']:.2f} | {m['rps']:.1f} |")
    print(f"| gateway - direct | +{added_p50:.2f} | +{added_p99:.2f} | {ratio:.2f}x |")
    print()
    print(f"CPU time of the gateway process per proxied request: {statistics.median(cpu_ms):.2f} ms (median)")
    print()
    ok_lat = added_p50 < 2.0
    ok_rps = ratio >= 0.8
    print(f"{'PASS' if ok_lat else 'FAIL'}: added p50 {added_p50:.2f} ms (target < 2 ms)")
    print(f"{'PASS' if ok_rps else 'FAIL'}: throughput through the gateway {ratio:.2f}x direct (target >= 0.8x)")
    return 0 if ok_lat and ok_rps else 1


if __name__ == "__main__":
    sys.exit(main())
