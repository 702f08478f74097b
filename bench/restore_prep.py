"""The benchmark's inputs, made once in the gitignored work directory and reused by later runs.

`<out>/<size>/model/` is the generated Hugging Face checkpoint; the same state dict is also written as a
torch `.pt` (for `torch.load(mmap=True)`) and a tensorizer `.tensors` file, and published as kold
snapshots (a `file://` store here, and an `s3://` store on a loopback S3 server for the S3 methods).
Every file is fsynced once: `POSIX_FADV_DONTNEED` cannot drop dirty pages, so a cold run of a file
still being written back would silently read the page cache.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

from restore_methods import Skip, Spec, kold_api, safetensors_header

BUCKET = "kold-bench"
MODEL_PREFIX = "model"
READ_CHUNK = 64 << 20

Log = Callable[[str], None]


def fsync(paths: list[Path]) -> None:
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def evict(paths: list[str] | list[Path]) -> None:
    """Drop files from the page cache (`drop_caches` is not available here; this works per file)."""
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)  # dirty pages cannot be dropped
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def warm(paths: list[str] | list[Path]) -> None:
    """Read files once so a hot run finds them in the page cache whatever ran before it."""
    buf = bytearray(READ_CHUNK)
    view = memoryview(buf)
    for p in paths:
        with open(p, "rb", buffering=0) as f:
            while f.readinto(view):
                pass


def _progress_printer(log: Log, what: str, total: int) -> Callable[[int], None]:
    """A progress callback that logs every 10%."""
    state = {"done": 0, "next": 0.1}

    def step(nbytes: int) -> None:
        state["done"] += nbytes
        if total and state["done"] / total >= state["next"]:
            log(f"  {what}: {state['done'] / total:4.0%}")
            state["next"] += 0.1

    return step


def ensure_model(root: Path, size: str, log: Log) -> Path:
    from kold.modelgen import SIZES, tensor_specs, write_random_model

    model_dir = root / "model"
    if (model_dir / "config.json").is_file():
        return model_dir
    tmp = root / "model.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    total = 0
    for _, shape in tensor_specs("llama", SIZES[size]):
        n = 2  # bf16
        for d in shape:
            n *= d
        total += n
    log(f"generating the {size} checkpoint ({total / 1e9:.2f} GB, seeded) in {model_dir}")
    write_random_model(tmp, "llama", size, progress=_progress_printer(log, "generate", total))
    fsync(sorted(tmp.iterdir()))
    tmp.rename(model_dir)
    return model_dir


def shard_paths(model_dir: Path) -> list[Path]:
    return sorted(model_dir.glob("*.safetensors"))


def tensor_bytes(model_dir: Path) -> int:
    """The bytes a restore must deliver: every tensor's data, without the safetensors headers."""
    return sum(
        end - start
        for path in shard_paths(model_dir)
        for start, end in (t["data_offsets"] for t in safetensors_header(str(path)).values())
    )


def _write_atomically(path: Path, write: Callable[[Path], None]) -> Path:
    if path.is_file():
        return path
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    fsync([tmp])
    tmp.rename(path)
    return path


def _state_dict(model_dir: Path) -> dict[str, object]:
    from safetensors.torch import load_file

    sd: dict[str, object] = {}
    for path in shard_paths(model_dir):
        sd.update(load_file(path))
    return sd


def ensure_pt(root: Path, model_dir: Path, log: Log) -> Path:
    import torch

    def write(tmp: Path) -> None:
        log("writing the state dict as a torch .pt (for torch.load(mmap=True))")
        torch.save(_state_dict(model_dir), tmp)

    return _write_atomically(root / "state_dict.pt", write)


def ensure_tensors(root: Path, model_dir: Path, log: Log) -> Path:
    def write(tmp: Path) -> None:
        from tensorizer import TensorSerializer

        log("writing the state dict as a tensorizer .tensors file")
        serializer = TensorSerializer(str(tmp))
        serializer.write_state_dict(_state_dict(model_dir))
        serializer.close()

    return _write_atomically(root / "model.tensors", write)


def build_kold(model_dir: Path, store_uri: str, log: Log, s3_endpoint: str = "") -> tuple[str, int]:
    """Publish the model as a kold snapshot; (snapshot URI, chunk size). Idempotent: same model, same id."""
    build_snapshot, _, s3_options = kold_api()
    started = time.perf_counter()
    kwargs = {"s3": s3_options(endpoint_url=s3_endpoint)} if s3_endpoint else {}
    result = build_snapshot(model_dir, store_uri, **kwargs)
    log(f"kold snapshot {result.ref.uri} ({'built' if result.uploaded else 'reused'}, "
        f"{time.perf_counter() - started:.1f} s)")  # fmt: skip
    return result.ref.uri, int(result.manifest.chunk_size)


def snapshot_files(snapshot_uri: str) -> list[str]:
    """The objects of a file:// snapshot on disk (what a cold run must evict)."""
    from urllib.parse import unquote, urlparse

    root = Path(unquote(urlparse(snapshot_uri).path))
    return sorted(str(p) for p in root.rglob("*") if p.is_file())


def prepare(out: Path, size: str, *, kold: bool, pt: bool, tensors: bool, log: Log) -> tuple[Spec, int, str]:
    """Make (or reuse) every local input; (spec, kold chunk size or 0, why kold is unavailable or "")."""
    root = out / size
    root.mkdir(parents=True, exist_ok=True)
    model_dir = ensure_model(root, size, log)
    spec = Spec(model_files=[str(p) for p in shard_paths(model_dir)], tensor_bytes=tensor_bytes(model_dir))
    if pt:
        spec = replace(spec, pt_path=str(ensure_pt(root, model_dir, log)))
    if tensors:
        spec = replace(spec, tensors_path=str(ensure_tensors(root, model_dir, log)))
    chunk, kold_skip = 0, ""
    if kold:
        try:
            uri, chunk = build_kold(model_dir, (root / "kold-store").as_uri(), log)
            files = snapshot_files(uri)
            fsync([Path(f) for f in files])
            spec = replace(spec, kold_local_uri=uri, kold_local_files=files,
                           kold_shm_dir=f"/dev/shm/kold-bench-{size}-{os.getpid()}")  # fmt: skip
        except Skip as e:
            kold_skip = str(e)
    return spec, chunk, kold_skip


@contextlib.contextmanager
def s3_server(out: Path, size: str, spec: Spec, *, kold: bool, log: Log) -> Iterator[Spec]:
    """A loopback S3 server (kold.locals3: `rclone serve s3`) holding the shards and a kold snapshot.

    The server's root persists in `<out>/<size>/s3`, so the kold snapshot is uploaded once. The shards
    are staged into the bucket by hard link (rclone serves the folder as is): the same inode as the
    model's files, hence no second copy in the page cache. The parent warms the server-side files
    before every S3 run, so S3 methods measure the protocol path, not the server's disk.

    Sets, for this process and the workers it starts, the environment every S3 client here needs:
    boto3 and the runai streamer read AWS_ENDPOINT_URL and the AWS_* credentials; runai also needs
    path-style addressing (RUNAI_STREAMER_S3_USE_VIRTUAL_ADDRESSING=0) for a loopback endpoint.
    """
    from kold.locals3 import LocalS3Server

    with LocalS3Server(out / size / "s3") as server:
        env = {
            **server.env(),
            "AWS_ENDPOINT_URL": server.endpoint_url,
            "AWS_REGION": server.env().get("AWS_DEFAULT_REGION", "us-east-1"),
            "AWS_EC2_METADATA_DISABLED": "true",
            "RUNAI_STREAMER_S3_USE_VIRTUAL_ADDRESSING": "0",
            # runai's C++ core logs why a request failed only to its own log: send warnings to stderr,
            # which the parent shows when a run fails
            "RUNAI_STREAMER_LOG_TO_STDERR": "1",
            "RUNAI_STREAMER_LOG_LEVEL": "WARNING",
        }
        saved = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        try:
            folder = server.create_bucket(BUCKET) / MODEL_PREFIX
            folder.mkdir(exist_ok=True)
            staged = []
            for path in map(Path, spec.model_files):
                target = folder / path.name
                if not target.exists():
                    try:
                        os.link(path, target)
                    except OSError:
                        shutil.copyfile(path, target)
                staged.append(target)
            spec = replace(
                spec,
                s3_endpoint=server.endpoint_url,
                s3_bucket=BUCKET,
                s3_keys=[f"{MODEL_PREFIX}/{p.name}" for p in staged],
                s3_sizes=[p.stat().st_size for p in staged],
                s3_files=[str(p) for p in staged],
            )
            log(f"S3 server {server.endpoint_url} serving {server.root}")
            if kold:
                with contextlib.suppress(Skip):
                    uri, _ = build_kold(Path(spec.model_files[0]).parent, f"s3://{BUCKET}/kold", log,
                                        s3_endpoint=server.endpoint_url)  # fmt: skip
                    snapshot_dir = server.root / BUCKET / uri.removeprefix(f"s3://{BUCKET}/")
                    spec = replace(spec, kold_s3_uri=uri, kold_s3_files=snapshot_files(snapshot_dir.as_uri()))
            yield spec
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
