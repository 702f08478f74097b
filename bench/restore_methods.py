"""The restore methods the benchmark compares, as run inside one fresh worker process each.

Every method is a `prepare(spec) -> load` factory: `prepare` does what a real cold start would already
have done or what must not be timed (imports, the memcpy source buffer, page-cache eviction happens
in the worker right after it), and the returned `load()` is the timed part. `load()` must hand back
tensors in memory the process owns: loaders that return lazy mmap views (safetensors, torch.load with
mmap=True) are followed by `clone()`, exactly as a server that keeps the weights would have to.

Everything that touches kold's own API is in `_kold_load` (and `_kold_shm_cache`), so adapting the
benchmark to a change of that API is a one-function edit.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

Tensors = Mapping[str, torch.Tensor]
Load = Callable[[], Tensors]

PAGE = 4096


class Skip(Exception):  # noqa: N818  (a verdict, not an error: the method cannot run here yet)
    """Raised by `prepare` when a method cannot run (library or kold API missing)."""


@dataclass(frozen=True)
class Spec:
    """Everything a worker needs to find its inputs; built by the parent, passed as JSON."""

    model_files: list[str]  # the safetensors shards
    tensor_bytes: int  # sum of every tensor's nbytes: the bytes a restore must deliver
    pt_path: str = ""
    tensors_path: str = ""
    kold_local_uri: str = ""
    kold_local_files: list[str] = field(default_factory=list)  # the snapshot's objects on disk
    kold_s3_uri: str = ""
    kold_shm_dir: str = ""
    kold_shm_huge_dir: str = ""  # a huge-page tmpfs mounted by the parent (root only), else empty
    kold_pool_dir: str = ""  # the node's host pool, filled by the parent (huge-page tmpfs when root)
    s3_endpoint: str = ""
    s3_bucket: str = ""
    s3_keys: list[str] = field(default_factory=list)  # the safetensors shards, uploaded
    s3_sizes: list[int] = field(default_factory=list)
    s3_files: list[str] = field(default_factory=list)  # the S3 server's files behind s3_keys
    kold_s3_files: list[str] = field(default_factory=list)  # ... and behind kold_s3_uri
    device: str = "cpu"  # where every method must deliver the tensors: "cpu" or "cuda"
    dry_run: bool = False  # workers stop right before their first CUDA call (bench/gpu_run.sh's dry run)

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> Spec:
        return cls(**json.loads(text))


@dataclass(frozen=True)
class Method:
    name: str
    tier: str  # "limit" | "hot" | "cold" | "s3": which numbers it is compared with
    owner: str  # "limit" | "peer" | "kold"
    inputs: str  # files the parent warms (hot, s3) or the worker evicts (cold): see `input_files`
    prepare: Callable[[Spec], Load]
    about: str
    devices: tuple[str, ...] = ("cpu", "cuda")  # the limits are per device; every loader runs on both

    def runs_on(self, device: str) -> bool:
        return device.split(":", maxsplit=1)[0] in self.devices

    @property
    def cold(self) -> bool:
        return self.tier == "cold"


def input_files(spec: Spec, inputs: str) -> list[str]:
    return {
        "safetensors": spec.model_files,
        "pt": [spec.pt_path],
        "tensors": [spec.tensors_path],
        "kold": spec.kold_local_files,
        "s3-shards": spec.s3_files,
        "s3-kold": spec.kold_s3_files,
    }.get(inputs, [])


# --- the machine's limits ------------------------------------------------------------------------


def _memcpy(spec: Spec, *, fresh: bool) -> Load:
    src = torch.empty(spec.tensor_bytes, dtype=torch.uint8).fill_(1)
    dst = None if fresh else torch.empty(spec.tensor_bytes, dtype=torch.uint8).fill_(0)

    def load() -> Tensors:
        out = torch.empty(spec.tensor_bytes, dtype=torch.uint8) if dst is None else dst
        out.copy_(src)  # torch's copy kernel: vectorised, split over the intra-op threads
        return {"buffer": out}

    return load


def _h2d(spec: Spec, *, pinned: bool) -> Load:
    """The host-to-device limit: one copy of the model's bytes from (pinned or pageable) host memory
    into a device buffer allocated beforehand. Pinned is what the DMA engines run at; pageable is what
    a plain `tensor.to("cuda")` of ordinary host memory gets (the driver stages it)."""
    src = torch.empty(spec.tensor_bytes, dtype=torch.uint8, pin_memory=pinned).fill_(1)
    dst = torch.empty(spec.tensor_bytes, dtype=torch.uint8, device=spec.device)
    # One untimed copy first: the first DMA from a fresh pinned buffer also maps it for the GPU (it
    # ran at 23 GB/s against 54 after, on an H100); the limit is the bandwidth, not that set-up.
    dst.copy_(src, non_blocking=pinned)
    torch.cuda.synchronize()

    def load() -> Tensors:
        dst.copy_(src, non_blocking=pinned)
        torch.cuda.synchronize()
        return {"buffer": dst}

    return load


def to_device(tensors: Mapping[str, torch.Tensor], device: str) -> dict[str, torch.Tensor]:
    """Move each tensor to `device` as a loader's user would (`tensor.to`), one at a time."""
    return {k: v.to(device) for k, v in tensors.items()}


def _readinto(spec: Spec) -> Load:
    sizes = [os.path.getsize(f) for f in spec.model_files]
    buffers = [torch.empty(n, dtype=torch.uint8).fill_(0) for n in sizes]  # preallocated and touched

    def load() -> Tensors:
        for path, buf in zip(spec.model_files, buffers, strict=True):
            view = buf.numpy().data
            with open(path, "rb", buffering=0) as f:
                done = 0
                while done < len(view):  # read(2) returns at most ~2 GiB: loop until the file is in
                    n = f.readinto(view[done:])
                    if not n:
                        raise OSError(f"{path}: short read at {done}")
                    done += n
        return {f"file{i}": b for i, b in enumerate(buffers)}

    return load


# --- peers ---------------------------------------------------------------------------------------


def _safetensors(spec: Spec) -> Load:
    from safetensors.torch import load_file

    def load() -> Tensors:
        out: dict[str, torch.Tensor] = {}
        for path in spec.model_files:  # shard by shard, as transformers does: one mapping alive at a time
            if spec.device != "cpu":  # safetensors' own device path: each tensor read and moved in turn
                out.update(load_file(path, device=spec.device))
                continue
            mapped = load_file(path)  # views of a MAP_PRIVATE mmap of the file: lazy until read
            out.update({k: v.clone() for k, v in mapped.items()})
            del mapped
        return out

    return load


def _torch_mmap(spec: Spec) -> Load:
    def load() -> Tensors:
        mapped = torch.load(spec.pt_path, mmap=True, weights_only=True)
        if spec.device != "cpu":
            return to_device(mapped, spec.device)
        return {k: v.clone() for k, v in mapped.items()}

    return load


def _tensorizer(spec: Spec, readers: int) -> Load:
    from tensorizer import TensorDeserializer

    def load() -> Tensors:
        # On CPU tensorizer allocates one torch.empty per tensor and readinto()s it: owned memory. On
        # CUDA it stages through its own pinned buffers.
        with TensorDeserializer(spec.tensors_path, device=spec.device, num_readers=readers) as d:
            return dict(d)

    return load


def _runai(spec: Spec, *, s3: bool) -> Load:
    from runai_model_streamer import SafetensorsStreamer

    if s3:
        paths = [f"s3://{spec.s3_bucket}/{k}" for k in spec.s3_keys]
        if not spec.s3_endpoint:
            raise Skip("no S3 server")
    else:
        paths = list(spec.model_files)

    def load() -> Tensors:
        # owned=True (the default) hands every tensor to the caller, no copy needed to keep it.
        # To a GPU the streamer reads into its host buffers and the caller moves each tensor as it is
        # yielded (how vLLM uses it; a device destination needs its distributed mode).
        with SafetensorsStreamer() as streamer:
            streamer.stream_files(paths, device="cpu")
            if spec.device != "cpu":
                return {name: t.to(spec.device) for name, t in streamer.get_tensors()}
            return dict(streamer.get_tensors())

    return load


class _BufferWriter:
    """A seekable file object over a preallocated buffer, so s3transfer writes each part in place.

    Seekable matters: s3transfer then writes parts at their offsets as they arrive (IOWriteTask) instead
    of queueing them until they can be appended in order.
    """

    def __init__(self, view: memoryview) -> None:
        self._view = view
        self._pos = 0

    def seekable(self) -> bool:
        return True

    def seek(self, pos: int, whence: int = 0) -> int:
        self._pos = pos if whence == 0 else self._pos + pos if whence == 1 else len(self._view) + pos
        return self._pos

    def tell(self) -> int:
        return self._pos

    def write(self, data: bytes) -> int:
        self._view[self._pos : self._pos + len(data)] = data
        self._pos += len(data)
        return len(data)


_ST_DTYPES = {
    "BF16": torch.bfloat16,
    "F16": torch.float16,
    "F32": torch.float32,
    "F64": torch.float64,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


def safetensors_header(path: str) -> dict[str, Any]:
    """A safetensors file's JSON header (per the format: a little-endian u64 length, then JSON)."""
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        header: dict[str, Any] = json.loads(f.read(length))
    header.pop("__metadata__", None)
    return header


def safetensors_views(buf: torch.Tensor) -> dict[str, torch.Tensor]:
    """Tensors as views of a safetensors file held in `buf` (per the format: u64 length, JSON, data)."""
    raw = buf.numpy()
    (header_len,) = struct.unpack("<Q", raw[:8].tobytes())
    header = json.loads(raw[8 : 8 + header_len].tobytes())
    base = 8 + header_len
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        start, end = info["data_offsets"]
        out[name] = buf[base + start : base + end].view(_ST_DTYPES[info["dtype"]]).view(info["shape"])
    return out


def _boto3(spec: Spec, *, tuned: bool) -> Load:
    import boto3
    from boto3.s3.transfer import TransferConfig
    from botocore.config import Config

    if not spec.s3_endpoint:
        raise Skip("no S3 server")
    # Default: boto3's TransferConfig() (8 MiB parts, 10 threads, 256 KiB io chunks).
    # Tuned: big parts and io chunks cut per-part and per-write Python overhead, which is what bounds
    # boto3 on 2 cores; the connection pool must be at least max_concurrency or threads queue on it.
    cfg = (
        TransferConfig(multipart_chunksize=32 << 20, max_concurrency=8, io_chunksize=4 << 20)
        if tuned
        else TransferConfig()
    )
    client_cfg = Config(max_pool_connections=16) if tuned else None

    def load() -> Tensors:
        # The client is made inside the timed part: every S3 method (runai, kold) pays for its own.
        client = boto3.client("s3", endpoint_url=spec.s3_endpoint, config=client_cfg)
        out: dict[str, torch.Tensor] = {}
        for key, size in zip(spec.s3_keys, spec.s3_sizes, strict=True):
            buf = torch.empty(size, dtype=torch.uint8)
            writer: Any = _BufferWriter(buf.numpy().data)  # duck-typed file object
            client.download_fileobj(spec.s3_bucket, key, writer, Config=cfg)
            out.update(
                to_device(safetensors_views(buf), spec.device) if spec.device != "cpu" else safetensors_views(buf)
            )
        return out

    return load


# --- kold ----------------------------------------------------------------------------------------


def kold_api() -> tuple[Any, Any, Any]:
    """kold's (build_snapshot, restore, S3Options); Skip while the restore API is not in place."""
    try:
        from kold.snapshot import S3Options, build_snapshot, restore
    except ImportError as e:
        raise Skip(f"kold.snapshot.restore not importable yet ({e})") from e
    return build_snapshot, restore, S3Options


def kold_shm_cache(spec: Spec, huge: bool = False) -> Any:
    """kold's node cache with only the shm tier, rooted in a benchmark-owned /dev/shm directory
    (or, with `huge`, in a huge-page tmpfs: how a node is meant to be set up for the shm tier)."""
    try:
        from kold.snapshot import CacheTier, NodeCache
    except ImportError as e:
        raise Skip(f"kold's cache tiers are not importable yet ({e})") from e
    # room for the entry (data blob + small files) with slack: a fill that does not fit is silently skipped
    root = spec.kold_shm_huge_dir if huge else spec.kold_shm_dir
    if not root:
        raise Skip("no huge-page tmpfs (mounting one needs root)" if huge else "no shm directory")
    return NodeCache([CacheTier("shm", Path(root), max_bytes=2 * spec.tensor_bytes + (1 << 30))])


def _kold_load(spec: Spec, mode: str) -> Load:
    """kold's restore in one of its modes: "local" (file:// store), "pool" (the same, into the node's
    pre-faulted host pool), "shm" / "shm-huge" (node cache tier), "s3".

    ADAPT HERE if kold's restore API changes; apart from `restore_prep.build_kold` (which publishes
    the snapshots) nothing else in the benchmark calls kold.snapshot.
    """
    _, restore, s3_options = kold_api()
    if mode == "s3":
        if not (spec.s3_endpoint and spec.kold_s3_uri):
            raise Skip("no S3 server or kold S3 snapshot")
        # region pinned: SigV4 signs it, and the loopback server has no notion of one
        uri, kwargs = spec.kold_s3_uri, {"s3": s3_options(endpoint_url=spec.s3_endpoint, region="us-east-1")}
    elif mode == "shm-huge":
        uri, kwargs = spec.kold_local_uri, {"cache": kold_shm_cache(spec, huge=True)}
    elif mode == "shm":
        # The shm tier was filled by an earlier process (`fill_kold_shm`); here it is a cache hit, which
        # kold serves on the CPU by mapping the shm file (shared by every instance on the node).
        uri, kwargs = spec.kold_local_uri, {"cache": kold_shm_cache(spec)}
    elif mode == "pool":
        # the destination is a segment of the node's pre-faulted host pool, claimed by this restore
        if not spec.kold_pool_dir:
            raise Skip("no host pool was filled")
        from kold.snapshot import HostPool

        uri, kwargs = spec.kold_local_uri, {"cache": None, "pool": HostPool(Path(spec.kold_pool_dir))}
    else:
        uri, kwargs = spec.kold_local_uri, {"cache": None}
    if not uri:
        raise Skip("no kold snapshot was built")
    holder: list[Any] = []
    if spec.device != "cpu":
        import cupy  # noqa: F401  (imported untimed, like every loader's own modules)

    def load() -> Tensors:
        restored = restore(uri, spec.device, **kwargs)
        holder.append(restored)  # the owner of the one buffer outlives the touch
        tensors: Tensors = restored.tensors
        return tensors

    load.stats = lambda: holder[0].stats.as_dict() if holder else {}  # type: ignore[attr-defined]
    return load


def fill_kold_shm(spec: Spec, huge: bool = False) -> None:
    """Populate the shm tier once, untimed, in its own process: the state a second instance finds."""
    _, restore, _ = kold_api()
    restored = restore(spec.kold_local_uri, "cpu", cache=kold_shm_cache(spec, huge=huge))
    if not restored.wait_cache_fill(timeout=600):
        raise RuntimeError("kold's shm cache fill did not finish")


# --- the registry --------------------------------------------------------------------------------


def _all() -> list[Method]:
    m = Method
    cpu, cuda = ("cpu",), ("cuda",)
    return [
        m("memcpy-touched", "limit", "limit", "", lambda s: _memcpy(s, fresh=False),
          "torch copy_ of the model's bytes into memory already faulted in", cpu),
        m("memcpy-fresh", "limit", "limit", "", lambda s: _memcpy(s, fresh=True),
          "torch copy_ into a fresh torch.empty: page-fault bound", cpu),
        m("readinto-hot", "limit", "limit", "safetensors", _readinto,
          "one thread, FileIO.readinto of each shard into a preallocated, touched buffer"),
        m("h2d-pinned", "limit", "limit", "", lambda s: _h2d(s, pinned=True),
          "one copy of the model's bytes, pinned host memory -> device buffer", cuda),
        m("h2d-pageable", "limit", "limit", "", lambda s: _h2d(s, pinned=False),
          "one copy of the model's bytes, pageable host memory -> device buffer", cuda),
        m("safetensors", "hot", "peer", "safetensors", _safetensors, "safetensors.torch.load_file + clone"),
        m("torch-mmap", "hot", "peer", "pt", _torch_mmap, "torch.load(mmap=True, weights_only=True) + clone"),
        m("tensorizer-1", "hot", "peer", "tensors", lambda s: _tensorizer(s, 1), "TensorDeserializer num_readers=1"),
        m("tensorizer-4", "hot", "peer", "tensors", lambda s: _tensorizer(s, 4), "TensorDeserializer num_readers=4"),
        m("runai", "hot", "peer", "safetensors", lambda s: _runai(s, s3=False), "SafetensorsStreamer, local files"),
        m("kold", "hot", "kold", "kold", lambda s: _kold_load(s, "local"), "kold restore, file:// store"),
        m("kold-pool", "hot", "kold", "kold", lambda s: _kold_load(s, "pool"),
          "kold restore, file:// store, into the node's pre-faulted host pool"),
        m("kold-shm", "hot", "kold", "", lambda s: _kold_load(s, "shm"), "kold restore from the shm tier"),
        m("kold-shm-huge", "hot", "kold", "", lambda s: _kold_load(s, "shm-huge"),
          "kold restore from the shm tier on a huge-page tmpfs"),
        m("safetensors-cold", "cold", "peer", "safetensors", _safetensors, "safetensors + clone, evicted"),
        m("torch-mmap-cold", "cold", "peer", "pt", _torch_mmap, "torch.load(mmap) + clone, evicted"),
        m("tensorizer-4-cold", "cold", "peer", "tensors", lambda s: _tensorizer(s, 4), "tensorizer x4, evicted"),
        m("runai-cold", "cold", "peer", "safetensors", lambda s: _runai(s, s3=False), "runai, evicted"),
        m("kold-cold", "cold", "kold", "kold", lambda s: _kold_load(s, "local"), "kold restore, evicted"),
        m("kold-pool-cold", "cold", "kold", "kold", lambda s: _kold_load(s, "pool"), "kold restore into the pool, evicted"),
        m("boto3-default", "s3", "peer", "s3-shards", lambda s: _boto3(s, tuned=False), "download_fileobj, TransferConfig()"),
        m("boto3-tuned", "s3", "peer", "s3-shards", lambda s: _boto3(s, tuned=True), "download_fileobj, 32 MiB x 8"),
        m("runai-s3", "s3", "peer", "s3-shards", lambda s: _runai(s, s3=True), "SafetensorsStreamer from s3://"),
        m("kold-s3", "s3", "kold", "s3-kold", lambda s: _kold_load(s, "s3"), "kold restore from s3://"),
    ]  # fmt: skip


METHODS: dict[str, Method] = {m.name: m for m in _all()}
