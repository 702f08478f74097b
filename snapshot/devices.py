"""Restore destinations: where chunks land, on the CPU or on a GPU, behind one interface.

The pipeline (`pipeline.py`) reads each chunk into the view a `Destination` hands out, verifies it and
commits it. Two destinations:

- `HostDestination` (CPU): the view *is* the final place in one aligned host buffer; commit is free.
- `StagedDestination` (GPU): the view is a slot of a ring of pinned host buffers; commit enqueues an
  async host-to-device copy into ONE device allocation and returns the slot once its copy is done,
  so reads of the next chunks overlap the copies of the previous ones. The engine may still be
  starting (CUDA's context) while the first chunks are read.

The staged path talks to a `CopyEngine`: `CudaCopyEngine` (CuPy: pinned memory, CUDA streams,
`memcpyAsync`, DLPack to torch) on a GPU, and `HostCopyEngine`, its CPU twin, which runs the same
ring/event protocol with a copy thread per stream. Tests and CPU benchmarks drive the twin, so the
GPU path's logic is exercised on every machine; only the CuPy calls themselves need a GPU.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import queue
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from kold.snapshot.errors import DeviceUnavailableError
from kold.snapshot.hostmem import alloc_host, buffer_address
from kold.snapshot.manifest import ChunkEntry

if TYPE_CHECKING:
    import mmap

    import torch

log = logging.getLogger("kold.snapshot")


@dataclass(frozen=True)
class DeviceSpec:
    kind: str  # "cpu" | "cuda"
    index: int = 0

    @classmethod
    def parse(cls, text: str) -> DeviceSpec:
        name, _, idx = text.partition(":")
        if name == "cpu" and not idx:
            return cls("cpu")
        if name == "cuda" and (not idx or idx.isdigit()):
            return cls("cuda", int(idx or 0))
        raise ValueError(f"unknown device {text!r} (use cpu, cuda or cuda:N)")

    def __str__(self) -> str:
        return "cpu" if self.kind == "cpu" else f"cuda:{self.index}"


class Destination(Protocol):
    def acquire(self, chunk: ChunkEntry) -> memoryview: ...

    def commit(self, chunk: ChunkEntry, view: memoryview) -> None: ...

    def abandon(self, chunk: ChunkEntry, view: memoryview) -> None: ...

    def finish(self) -> None: ...

    def tensor(self) -> torch.Tensor: ...

    @property
    def copy_seconds(self) -> float: ...


def host_tensor(buf: mmap.mmap | memoryview, nbytes: int) -> torch.Tensor:
    """A uint8 torch tensor over the first `nbytes` of a host buffer, sharing its memory."""
    import torch

    if nbytes == 0:
        return torch.empty(0, dtype=torch.uint8)
    return torch.frombuffer(buf, dtype=torch.uint8, count=nbytes)


class HostDestination:
    """CPU restore: readers write straight into the final buffer."""

    def __init__(self, nbytes: int, buffer: mmap.mmap | None = None) -> None:
        self.nbytes = nbytes
        self.buffer = buffer if buffer is not None else alloc_host(nbytes)
        self._view = memoryview(self.buffer)

    def acquire(self, chunk: ChunkEntry) -> memoryview:
        return self._view[chunk.offset : chunk.end]

    def commit(self, chunk: ChunkEntry, view: memoryview) -> None:
        view.release()

    def abandon(self, chunk: ChunkEntry, view: memoryview) -> None:
        view.release()

    def finish(self) -> None:
        pass

    def release(self) -> None:
        """Drop our view so the buffer can be closed (only for buffers the caller owns)."""
        self._view.release()

    def tensor(self) -> torch.Tensor:
        return host_tensor(self.buffer, self.nbytes)

    @property
    def copy_seconds(self) -> float:
        return 0.0


class CopyEvent(Protocol):
    def synchronize(self) -> None: ...


class CopyEngine(Protocol):
    """What the staged path needs from a device: memory, async copies and completion events.

    `register_host` raises `HostRegisterError` when the driver refuses to page-lock the memory (or
    refuses the read-only flag); the callers fall back, they never pin for writing instead.
    """

    def alloc_device(self, nbytes: int) -> None: ...

    def alloc_pinned(self, nbytes: int) -> tuple[memoryview, int]: ...

    def pin_mapping(self, buf: mmap.mmap, nbytes: int) -> int | None: ...

    def register_host(self, address: int, nbytes: int, *, read_only: bool = False) -> None: ...

    def unregister_host(self, address: int) -> None: ...

    def copy_to_device_async(self, src_address: int, dst_offset: int, nbytes: int, stream: int) -> CopyEvent: ...

    def synchronize(self) -> None: ...

    def release_host(self) -> None: ...

    def device_tensor(self, nbytes: int) -> torch.Tensor: ...

    @property
    def num_streams(self) -> int: ...


class HostRegisterError(DeviceUnavailableError):
    """The driver would not page-lock some host memory (or would not do it read-only). Raised by
    `CopyEngine.register_host` for the restore to fall back on: allocated pinned memory for the ring,
    the staged ring for the shm tier."""


# Host memory whose unpinning failed. It is never unmapped or freed: the driver may still count it as
# registered, and unmapping it would let a later mapping at the same address inherit a stale pin. It
# lives at module level because a list inside the engine or the unpinning thread dies with them, and
# with it the memory's last reference (which unmaps it anyway).
KEPT_HOST_MEMORY: list[object] = []

# Threads that page-lock host memory at once: one CPU walks a 2.2 GB mapping's pages at ~20 GB/s
# (measured for an anonymous mapping on an H100 host); bench/gpu_pin_probe.py measures 1-8 threads.
PIN_THREADS = 4


def keep_host_memory(memory: object, what: str) -> None:
    log.warning("could not unpin %s; keeping it mapped for the life of the process", what, exc_info=True)
    KEPT_HOST_MEMORY.append(memory)


@dataclass
class _Slot:
    view: memoryview  # the slot's bytes (slot_size of them)
    address: int
    pinned: bool
    mapping: mmap.mmap | None = None  # an unpinned slot's own memory, pinned in place at its first commit


def _ready(engine: CopyEngine) -> Future[CopyEngine]:
    future: Future[CopyEngine] = Future()
    future.set_result(engine)
    return future


class StagedDestination:
    """GPU-style restore through a ring of pinned slots and async copies into one device buffer.

    The engine may still be starting when the readers begin (a CUDA context and CuPy's import take
    ~0.3-1 s of a cold start): slots taken before it is up are plain host memory, read into at once,
    and pinned in place at their first commit. Once it is up, a slot is pinned when a reader first
    takes it, in that reader's thread: pinning costs real time (cudaHostAlloc ran at 1.5 GB/s on an
    H100 host, registering an anonymous mapping at ~20 GB/s), and done lazily it overlaps with the
    other readers' reads instead of delaying the first read by the whole ring's cost. The device
    buffer is allocated when the first chunk is committed.
    """

    def __init__(self, engine: CopyEngine | Future[CopyEngine], nbytes: int, slot_size: int, slots: int) -> None:
        self._engine_future = engine if isinstance(engine, Future) else _ready(engine)
        self._engine: CopyEngine | None = None
        self.nbytes = nbytes
        self._slot_size = slot_size
        self._slots: list[_Slot | None] = [None] * slots
        self._free: queue.SimpleQueue[int] = queue.SimpleQueue()
        for i in range(slots):
            self._free.put(i)
        self._pending: list[CopyEvent | None] = [None] * slots
        self._held: dict[int, int] = {}  # chunk index -> slot index
        self._lock = threading.Lock()
        self._first_copy: float | None = None
        self._last_done = 0.0
        self._extra_events: list[CopyEvent] = []

    @property
    def engine(self) -> CopyEngine:
        """The copy engine: waits for it to start (raising what stopped it) and allocates the device
        buffer on first use."""
        if self._engine is None:
            engine = self._engine_future.result()
            with self._lock:
                if self._engine is None:
                    engine.alloc_device(self.nbytes)
                    self._engine = engine
        return self._engine

    @property
    def started(self) -> bool:
        """Whether the engine is up and holds the device buffer (so there is something to wait for)."""
        return self._engine is not None

    def _up(self) -> bool:
        future = self._engine_future
        return self._engine is not None or (future.done() and future.exception() is None)

    def acquire(self, chunk: ChunkEntry) -> memoryview:
        slot = self._free.get()
        event = self._pending[slot]
        if event is not None:
            event.synchronize()  # the slot's previous copy must be done before we overwrite it
            self._pending[slot] = None
        memory = self._slots[slot]
        if memory is None:  # this thread owns the slot until it commits it: no other writer
            memory = self._slots[slot] = self._new_slot()
        with self._lock:
            self._held[chunk.index] = slot
        return memory.view[: chunk.size]

    def _new_slot(self) -> _Slot:
        if self._up():
            view, address = self.engine.alloc_pinned(self._slot_size)
            return _Slot(view, address, pinned=True)
        buf = alloc_host(self._slot_size)
        return _Slot(memoryview(buf)[: self._slot_size], buffer_address(buf), pinned=False, mapping=buf)

    def _pin(self, engine: CopyEngine, slot: _Slot, used: int) -> _Slot:
        """Pin a slot that was taken before the engine was up: in place, or, where the driver will not
        register memory, by moving its `used` bytes into allocated pinned memory."""
        assert slot.mapping is not None
        address = engine.pin_mapping(slot.mapping, self._slot_size)
        if address is not None:
            return _Slot(slot.view, address, pinned=True)
        view, address = engine.alloc_pinned(self._slot_size)
        view[:used] = slot.view[:used]
        return _Slot(view, address, pinned=True)

    def commit(self, chunk: ChunkEntry, view: memoryview) -> None:
        with self._lock:
            slot = self._held.pop(chunk.index)
            if self._first_copy is None:
                self._first_copy = time.perf_counter()
        try:
            engine = self.engine
            memory = self._slots[slot]
            assert memory is not None  # acquire() made it
            if not memory.pinned:
                memory = self._slots[slot] = self._pin(engine, memory, chunk.size)
            self._pending[slot] = engine.copy_to_device_async(
                memory.address, chunk.offset, chunk.size, slot % engine.num_streams
            )
        finally:
            self._free.put(slot)

    def commit_external(self, chunk: ChunkEntry, address: int) -> None:
        """Copy a chunk that already sits in registered host memory (the shm tier): no staging copy."""
        engine = self.engine
        with self._lock:
            if self._first_copy is None:
                self._first_copy = time.perf_counter()
            stream = chunk.index % engine.num_streams
        event = engine.copy_to_device_async(address, chunk.offset, chunk.size, stream)
        with self._lock:
            self._extra_events.append(event)

    def abandon(self, chunk: ChunkEntry, view: memoryview) -> None:
        with self._lock:
            slot = self._held.pop(chunk.index, None)
        if slot is not None:
            self._free.put(slot)

    def finish(self) -> None:
        self.engine.synchronize()
        self._last_done = time.perf_counter()

    def synchronize(self) -> None:
        """Wait for every copy issued so far; nothing to wait for if the engine never started."""
        if self._engine is not None:
            self._engine.synchronize()

    def release_staging(self) -> threading.Thread | None:
        """Free the pinned ring once every copy is done (`finish`/`synchronize`), off the caller's
        critical path: unpinning hundreds of MB takes milliseconds the restore's caller need not wait
        for. Not a daemon thread: the interpreter waits for it at exit, so no thread is still inside
        cudaHostUnregister while the process tears CUDA down."""
        if self._engine is None:
            return None
        thread = threading.Thread(target=self._engine.release_host, name="kold-unpin")
        thread.start()
        return thread

    def tensor(self) -> torch.Tensor:
        return self.engine.device_tensor(self.nbytes)

    @property
    def copy_seconds(self) -> float:
        return 0.0 if self._first_copy is None else max(0.0, self._last_done - self._first_copy)


class _StagingMemory:
    """The ring's page-locked memory, the same for both engines: an anonymous mapping registered in
    place (cudaHostRegister, ~20 GB/s on an H100 host), or, once the driver has refused to register
    memory (a sandbox, a locked-memory limit), memory it allocates page-locked (cudaHostAlloc: 1.5 GB/s
    there, but it works). Subclasses provide `register_host`, `unregister_host` and the allocation."""

    def __init__(self) -> None:
        self._staging_lock = threading.Lock()
        self._registered: list[tuple[mmap.mmap, int]] = []
        self._allocated: list[object] = []
        self.register_refused = False

    def register_host(self, address: int, nbytes: int, *, read_only: bool = False) -> None:
        raise NotImplementedError

    def unregister_host(self, address: int) -> None:
        raise NotImplementedError

    def _alloc_locked(self, nbytes: int) -> tuple[memoryview, int, object]:
        """Allocated page-locked memory: (view, address, what `_free_locked` takes)."""
        raise NotImplementedError

    def _free_locked(self, owner: object) -> None:
        raise NotImplementedError

    def pin_mapping(self, buf: mmap.mmap, nbytes: int) -> int | None:
        """Page-lock `buf` (an anonymous mapping) in place and keep it until `release_host`; its
        address, or None once the driver refuses (the caller then uses `alloc_pinned`)."""
        if self.register_refused:
            return None
        address = buffer_address(buf)
        try:
            self.register_host(address, nbytes)
        except HostRegisterError as exc:
            if not self.register_refused:
                log.warning("pinning the staging ring in place was refused (%s); allocating it pinned instead", exc)
            self.register_refused = True
            return None
        with self._staging_lock:
            self._registered.append((buf, address))
        return address

    def alloc_pinned(self, nbytes: int) -> tuple[memoryview, int]:
        """One slot of page-locked staging memory, kept until `release_host`."""
        if not self.register_refused:
            buf = alloc_host(nbytes)
            address = self.pin_mapping(buf, nbytes)
            if address is not None:
                return memoryview(buf)[:nbytes], address
            buf.close()
        view, address, owner = self._alloc_locked(nbytes)
        with self._staging_lock:
            self._allocated.append(owner)
        return view, address

    def release_host(self) -> None:
        """Unpin and free the staging ring (after `synchronize`); the device buffer stays."""
        with self._staging_lock:
            registered, self._registered = self._registered, []
            allocated, self._allocated = self._allocated, []
        for buf, address in registered:
            try:
                self.unregister_host(address)
            except Exception:  # never unmap memory the driver may still consider registered
                keep_host_memory(buf, "a staging buffer")
                continue
            with contextlib.suppress(BufferError):  # a slot view still alive: unmapped when it dies
                buf.close()
        for owner in allocated:
            try:
                self._free_locked(owner)
            except Exception:
                keep_host_memory(owner, "an allocated staging buffer")


# -- the CPU twin ---------------------------------------------------------------------------------


class _FutureEvent:
    def __init__(self, future: Future[None]) -> None:
        self._future = future

    def synchronize(self) -> None:
        self._future.result()


class HostCopyEngine(_StagingMemory):
    """The staged protocol on the CPU: "device" memory is a host buffer, each stream a copy thread.

    ctypes.memmove releases the GIL, so copies run in parallel with the readers like DMA would.
    Registering is free here; a subclass that refuses it drives the fallbacks a driver would.
    """

    def __init__(self, streams: int = 2) -> None:
        super().__init__()
        self._streams = [ThreadPoolExecutor(1, thread_name_prefix=f"kold-copy{i}") for i in range(streams)]
        self._device: mmap.mmap | None = None
        self._device_address = 0
        self._last: list[Future[None] | None] = [None] * streams

    @property
    def num_streams(self) -> int:
        return len(self._streams)

    def alloc_device(self, nbytes: int) -> None:
        self._device = alloc_host(nbytes)
        self._device_address = buffer_address(self._device)

    def register_host(self, address: int, nbytes: int, *, read_only: bool = False) -> None:
        pass  # host memory needs no registration on the CPU

    def unregister_host(self, address: int) -> None:
        pass

    def _alloc_locked(self, nbytes: int) -> tuple[memoryview, int, object]:
        buf = alloc_host(nbytes)
        return memoryview(buf)[:nbytes], buffer_address(buf), buf

    def _free_locked(self, owner: object) -> None:
        assert isinstance(owner, mmap.mmap)
        with contextlib.suppress(BufferError):
            owner.close()

    def copy_to_device_async(self, src_address: int, dst_offset: int, nbytes: int, stream: int) -> CopyEvent:
        dst = self._device_address + dst_offset

        def copy() -> None:
            ctypes.memmove(dst, src_address, nbytes)

        future = self._streams[stream].submit(copy)
        self._last[stream] = future
        return _FutureEvent(future)

    def synchronize(self) -> None:
        for i, future in enumerate(self._last):
            if future is not None:
                future.result()
                self._last[i] = None

    def device_tensor(self, nbytes: int) -> torch.Tensor:
        assert self._device is not None
        return host_tensor(self._device, nbytes)

    def close(self) -> None:
        for pool in self._streams:
            pool.shutdown(wait=True)


# -- CUDA through CuPy (imported lazily: only GPU restores pay for it) -----------------------------

CUPY_HINT = "pip install 'kold[gpu]' (cupy-cuda12x, CUDA 12) or 'kold[gpu-cuda13]' (cupy-cuda13x, CUDA 13)"


class CudaCopyEngine(_StagingMemory):
    """Pinned host slots, CUDA streams and async H2D copies via CuPy; the result reaches torch by DLPack.

    Registrations run in the engine's own pin threads: a refused cudaHostRegister leaves its error as
    the thread's "last CUDA error", and a thread that later launches torch kernels (the restore's
    caller reads chunks too) would have torch report it as its own.
    """

    def __init__(self, device_index: int, streams: int = 2) -> None:
        super().__init__()
        try:
            import cupy
        except ImportError as exc:
            raise DeviceUnavailableError(f"a CUDA restore needs CuPy: {CUPY_HINT}") from exc
        self._cp: Any = cupy
        self._index = device_index
        try:
            with self._device():
                self._streams = [cupy.cuda.Stream(non_blocking=True) for _ in range(streams)]
        except Exception as exc:  # CuPy raises CUDARuntimeError and friends without a common base
            raise DeviceUnavailableError(f"CUDA device {device_index} is not usable: {exc}") from exc
        self._dev_mem: Any = None
        self._read_only: bool | None = None
        self._pinner = ThreadPoolExecutor(PIN_THREADS, thread_name_prefix="kold-pin")

    def _device(self) -> Any:
        """A new `cupy.cuda.Device` for each `with` block. A Device object keeps the stack of devices it
        replaced on the object, not per thread: one object entered by several threads can restore the
        wrong device on exit, and restores to two GPUs would cross."""
        return self._cp.cuda.Device(self._index)

    @property
    def num_streams(self) -> int:
        return len(self._streams)

    def alloc_device(self, nbytes: int) -> None:
        """cudaMalloc through `cupy.cuda.Memory`, not CuPy's memory pool: freed, a pool block stays
        cached in CuPy, out of torch's sight and out of reach of torch's allocator."""
        with self._device():
            self._dev_mem = self._cp.cuda.MemoryPointer(self._cp.cuda.Memory(max(nbytes, 1)), 0)

    def register_host(self, address: int, nbytes: int, *, read_only: bool = False) -> None:
        """Page-lock host memory for DMA. `read_only` (cudaHostRegisterReadOnly) is for memory the
        copy only reads, such as the shm tier's mapping; refused, it raises `HostRegisterError` rather
        than pinning for writing."""
        if read_only and not self._read_only_supported():
            raise HostRegisterError(f"CUDA device {self._index} does not support cudaHostRegisterReadOnly")
        flags = _HOST_REGISTER_READ_ONLY if read_only else 0

        def register() -> None:
            with self._device():
                self._cp.cuda.runtime.hostRegister(address, nbytes, flags)

        try:
            self._pinner.submit(register).result()
        except self._cp.cuda.runtime.CUDARuntimeError as exc:
            kind = "read-only " if read_only else ""
            raise HostRegisterError(f"cudaHostRegister of {nbytes} bytes {kind}was refused: {exc}") from exc

    def _read_only_supported(self) -> bool:
        if self._read_only is None:
            runtime = self._cp.cuda.runtime
            self._read_only = bool(runtime.deviceGetAttribute(_DEV_ATTR_HOST_REGISTER_READ_ONLY, self._index))
        return self._read_only

    def unregister_host(self, address: int) -> None:
        with self._device():
            self._cp.cuda.runtime.hostUnregister(address)

    def _alloc_locked(self, nbytes: int) -> tuple[memoryview, int, object]:
        with self._device():
            address = int(self._cp.cuda.runtime.hostAlloc(nbytes, 0))
        view = memoryview((ctypes.c_char * nbytes).from_address(address)).cast("B")
        return view, address, address

    def _free_locked(self, owner: object) -> None:
        assert isinstance(owner, int)
        self._cp.cuda.runtime.freeHost(owner)

    def copy_to_device_async(self, src_address: int, dst_offset: int, nbytes: int, stream: int) -> CopyEvent:
        runtime = self._cp.cuda.runtime
        with self._device():
            s = self._streams[stream]
            runtime.memcpyAsync(self._dev_mem.ptr + dst_offset, src_address, nbytes, runtime.memcpyHostToDevice, s.ptr)
            # block=True: a waiting reader sleeps in the driver instead of spinning a core
            event = self._cp.cuda.Event(block=True, disable_timing=True)
            event.record(s)
        result: CopyEvent = event
        return result

    def synchronize(self) -> None:
        with self._device():
            for s in self._streams:
                s.synchronize()

    def device_tensor(self, nbytes: int) -> torch.Tensor:
        """The device buffer as a torch tensor, which from now on is its only owner: the memory goes
        back to the device when the last view of it is freed, not when this engine is."""
        import torch.utils.dlpack

        memptr, self._dev_mem = self._dev_mem, None
        with self._device():
            array = self._cp.ndarray((nbytes,), dtype=self._cp.uint8, memptr=memptr)
            tensor: torch.Tensor = torch.utils.dlpack.from_dlpack(array)
            return tensor

    def close(self) -> None:
        self._pinner.shutdown(wait=True)


_HOST_REGISTER_READ_ONLY = 0x08  # cudaHostRegisterReadOnly (CUDA >= 11.1)
_DEV_ATTR_HOST_REGISTER_READ_ONLY = 113  # cudaDevAttrHostRegisterReadOnlySupported


def make_engine(device: DeviceSpec) -> HostCopyEngine | CudaCopyEngine:
    return CudaCopyEngine(device.index) if device.kind == "cuda" else HostCopyEngine()
