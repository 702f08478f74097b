"""Restore destinations: where chunks land, on the CPU or on a GPU, behind one interface.

The pipeline (`pipeline.py`) reads each chunk into the view a `Destination` hands out, verifies it and
commits it. Two destinations:

- `HostDestination` (CPU): the view *is* the final place in one aligned host buffer; commit is free.
- `StagedDestination` (GPU): the view is a slot of a ring of pinned host buffers; commit enqueues an
  async host-to-device copy into ONE device allocation and returns the slot once its copy is done,
  so reads of the next chunks overlap the copies of the previous ones.

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
    """What the staged path needs from a device: memory, async copies and completion events."""

    def alloc_device(self, nbytes: int) -> None: ...

    def alloc_pinned(self, nbytes: int) -> tuple[memoryview, int]: ...

    def register_host(self, address: int, nbytes: int, *, read_only: bool = False) -> None: ...

    def unregister_host(self, address: int) -> None: ...

    def copy_to_device_async(self, src_address: int, dst_offset: int, nbytes: int, stream: int) -> CopyEvent: ...

    def synchronize(self) -> None: ...

    def release_host(self) -> None: ...

    def device_tensor(self, nbytes: int) -> torch.Tensor: ...

    @property
    def num_streams(self) -> int: ...


class StagedDestination:
    """GPU-style restore through a ring of pinned slots and async copies into one device buffer.

    A slot's pinned memory is allocated the first time a reader takes the slot, in that reader's
    thread: pinning costs real time (cudaHostAlloc ran at 1.5 GB/s on an H100 host, registering an
    anonymous mapping at ~20 GB/s), and done lazily it overlaps with the other readers' reads instead
    of delaying the first read by the whole ring's cost.
    """

    def __init__(self, engine: CopyEngine, nbytes: int, slot_size: int, slots: int) -> None:
        self.engine = engine
        self.nbytes = nbytes
        engine.alloc_device(nbytes)
        self._slot_size = slot_size
        self._slots: list[tuple[memoryview, int] | None] = [None] * slots
        self._free: queue.SimpleQueue[int] = queue.SimpleQueue()
        for i in range(slots):
            self._free.put(i)
        self._pending: list[CopyEvent | None] = [None] * slots
        self._held: dict[int, int] = {}  # chunk index -> slot index
        self._lock = threading.Lock()
        self._first_copy: float | None = None
        self._last_done = 0.0
        self._extra_events: list[CopyEvent] = []

    def acquire(self, chunk: ChunkEntry) -> memoryview:
        slot = self._free.get()
        event = self._pending[slot]
        if event is not None:
            event.synchronize()  # the slot's previous copy must be done before we overwrite it
            self._pending[slot] = None
        memory = self._slots[slot]
        if memory is None:  # this thread owns the slot until it commits it: no other writer
            memory = self._slots[slot] = self.engine.alloc_pinned(self._slot_size)
        with self._lock:
            self._held[chunk.index] = slot
        return memory[0][: chunk.size]

    def commit(self, chunk: ChunkEntry, view: memoryview) -> None:
        with self._lock:
            slot = self._held.pop(chunk.index)
            if self._first_copy is None:
                self._first_copy = time.perf_counter()
        memory = self._slots[slot]
        assert memory is not None  # acquire() allocated it
        self._pending[slot] = self.engine.copy_to_device_async(
            memory[1], chunk.offset, chunk.size, slot % self.engine.num_streams
        )
        self._free.put(slot)

    def commit_external(self, chunk: ChunkEntry, address: int) -> None:
        """Copy a chunk that already sits in registered host memory (the shm tier): no staging copy."""
        with self._lock:
            if self._first_copy is None:
                self._first_copy = time.perf_counter()
            stream = chunk.index % self.engine.num_streams
        event = self.engine.copy_to_device_async(address, chunk.offset, chunk.size, stream)
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

    def release_staging(self) -> None:
        """Free the pinned ring once every copy is done (`finish`), off the caller's critical path:
        unpinning hundreds of MB takes milliseconds the restore's caller need not wait for."""
        threading.Thread(target=self.engine.release_host, name="kold-unpin", daemon=True).start()

    def tensor(self) -> torch.Tensor:
        return self.engine.device_tensor(self.nbytes)

    @property
    def copy_seconds(self) -> float:
        return 0.0 if self._first_copy is None else max(0.0, self._last_done - self._first_copy)


# -- the CPU twin ---------------------------------------------------------------------------------


class _FutureEvent:
    def __init__(self, future: Future[None]) -> None:
        self._future = future

    def synchronize(self) -> None:
        self._future.result()


class HostCopyEngine:
    """The staged protocol on the CPU: "device" memory is a host buffer, each stream a copy thread.

    ctypes.memmove releases the GIL, so copies run in parallel with the readers like DMA would.
    """

    def __init__(self, streams: int = 2) -> None:
        self._streams = [ThreadPoolExecutor(1, thread_name_prefix=f"kold-copy{i}") for i in range(streams)]
        self._device: mmap.mmap | None = None
        self._device_address = 0
        self._pinned: list[mmap.mmap] = []
        self._last: list[Future[None] | None] = [None] * streams

    @property
    def num_streams(self) -> int:
        return len(self._streams)

    def alloc_device(self, nbytes: int) -> None:
        self._device = alloc_host(nbytes)
        self._device_address = buffer_address(self._device)

    def alloc_pinned(self, nbytes: int) -> tuple[memoryview, int]:
        buf = alloc_host(nbytes)
        self._pinned.append(buf)
        return memoryview(buf), buffer_address(buf)

    def register_host(self, address: int, nbytes: int, *, read_only: bool = False) -> None:
        pass  # host memory needs no registration on the CPU

    def unregister_host(self, address: int) -> None:
        pass

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

    def release_host(self) -> None:
        pass  # the staging buffers are plain mappings, freed with this engine


# -- CUDA through CuPy (imported lazily: only GPU restores pay for it) -----------------------------


class CudaCopyEngine:
    """Pinned host slots, CUDA streams and async H2D copies via CuPy; the result reaches torch by DLPack."""

    def __init__(self, device_index: int, streams: int = 2) -> None:
        try:
            import cupy
        except ImportError as exc:
            raise DeviceUnavailableError("a CUDA restore needs CuPy: pip install 'kold[gpu]' (cupy-cuda12x)") from exc
        try:
            self._cp: Any = cupy
            self._device = cupy.cuda.Device(device_index)
            with self._device:
                self._streams = [cupy.cuda.Stream(non_blocking=True) for _ in range(streams)]
        except Exception as exc:  # CuPy raises CUDARuntimeError and friends without a common base
            raise DeviceUnavailableError(f"CUDA device {device_index} is not usable: {exc}") from exc
        self._dev_mem: Any = None
        self._pinned: list[tuple[mmap.mmap, int]] = []  # staging mappings and their registered addresses
        self._pin_lock = threading.Lock()

    @property
    def num_streams(self) -> int:
        return len(self._streams)

    def alloc_device(self, nbytes: int) -> None:
        with self._device:
            self._dev_mem = self._cp.cuda.alloc(max(nbytes, 1))

    def alloc_pinned(self, nbytes: int) -> tuple[memoryview, int]:
        """Staging memory: an anonymous mapping registered with CUDA (page-locked, DMA-able).

        Not cudaHostAlloc (CuPy's `alloc_pinned_memory`): on an H100 host that ran at 1.5 GB/s, so a
        576 MiB ring cost 0.4 s, most of a 2 GB restore; registering a mapping ran at ~20 GB/s.
        """
        buf = alloc_host(nbytes)
        address = buffer_address(buf)
        self.register_host(address, nbytes)
        with self._pin_lock:
            self._pinned.append((buf, address))
        return memoryview(buf)[:nbytes], address

    def register_host(self, address: int, nbytes: int, *, read_only: bool = False) -> None:
        """Page-lock host memory for DMA. `read_only` (cudaHostRegisterReadOnly) is for mappings the
        copy only reads, such as the shm tier's private file mapping: without it the driver pins
        for writing, which makes the kernel copy every page of a private mapping (copy-on-write)."""
        runtime = self._cp.cuda.runtime
        with self._device:
            if read_only:
                try:
                    runtime.hostRegister(address, nbytes, _HOST_REGISTER_READ_ONLY)
                    return
                except Exception:  # older drivers or devices without the flag: pin for writing
                    log.debug("cudaHostRegisterReadOnly refused; registering for writing", exc_info=True)
            runtime.hostRegister(address, nbytes, 0)

    def unregister_host(self, address: int) -> None:
        with self._device:
            self._cp.cuda.runtime.hostUnregister(address)

    def release_host(self) -> None:
        """Unpin and free the staging ring (after `synchronize`); the device buffer stays."""
        with self._pin_lock:
            pinned, self._pinned = self._pinned, []
        for buf, address in pinned:
            try:
                self.unregister_host(address)
            except Exception:  # never unmap memory the driver may still consider registered
                log.warning("could not unregister a staging buffer; keeping it", exc_info=True)
                continue
            with contextlib.suppress(BufferError):  # a slot view still alive: unmapped when it dies
                buf.close()

    def copy_to_device_async(self, src_address: int, dst_offset: int, nbytes: int, stream: int) -> CopyEvent:
        runtime = self._cp.cuda.runtime
        with self._device:
            s = self._streams[stream]
            runtime.memcpyAsync(self._dev_mem.ptr + dst_offset, src_address, nbytes, runtime.memcpyHostToDevice, s.ptr)
            event = self._cp.cuda.Event(disable_timing=True)
            event.record(s)
        result: CopyEvent = event
        return result

    def synchronize(self) -> None:
        with self._device:
            for s in self._streams:
                s.synchronize()

    def device_tensor(self, nbytes: int) -> torch.Tensor:
        import torch.utils.dlpack

        with self._device:
            array = self._cp.ndarray((nbytes,), dtype=self._cp.uint8, memptr=self._dev_mem)
            tensor: torch.Tensor = torch.utils.dlpack.from_dlpack(array)
            return tensor

    def close(self) -> None:
        pass


_HOST_REGISTER_READ_ONLY = 0x08  # cudaHostRegisterReadOnly (CUDA >= 11.1)


def make_engine(device: DeviceSpec) -> HostCopyEngine | CudaCopyEngine:
    return CudaCopyEngine(device.index) if device.kind == "cuda" else HostCopyEngine()
