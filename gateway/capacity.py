"""What one node can hold: instances' resource footprints against the node's capacity.

The local platform's stand-in for what Knative gets from Kubernetes' scheduler: each revision asks for
CPUs, memory and GPUs (RuntimeSpec, like a pod's resource requests), the node has so many (detected by
`kold up`, overridable), and an instance that would not fit is not started: its requests wait for room
(an instance scaling in elsewhere) or get 503 with Retry-After at their timeout. On two cores, four CPU
instances of one function made every stream 2-4x slower than one instance alone; refusing the third is
the cure. Pure: no clock, no I/O.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True)
class Footprint:
    """What one instance takes: CPUs (may be fractional), bytes of memory, whole GPUs."""

    cpus: float = 0.0
    memory_bytes: int = 0
    gpus: int = 0

    def __add__(self, other: Footprint) -> Footprint:
        return Footprint(self.cpus + other.cpus, self.memory_bytes + other.memory_bytes, self.gpus + other.gpus)

    def __mul__(self, n: int) -> Footprint:
        return Footprint(self.cpus * n, self.memory_bytes * n, self.gpus * n)


@dataclass(frozen=True)
class NodeCapacity:
    """The node's allocatable resources."""

    cpus: float
    memory_bytes: int
    gpus: int = 0

    def shortfall(self, used: Footprint, want: Footprint) -> str | None:
        """None if `want` fits beside `used`, else what is short, in words."""
        short = []
        if used.cpus + want.cpus > self.cpus + 1e-9:
            short.append(f"{want.cpus:g} CPUs (free {max(0.0, self.cpus - used.cpus):g} of {self.cpus:g})")
        if used.memory_bytes + want.memory_bytes > self.memory_bytes:
            free = max(0, self.memory_bytes - used.memory_bytes)
            short.append(f"{_gib(want.memory_bytes)} memory (free {_gib(free)} of {_gib(self.memory_bytes)})")
        if used.gpus + want.gpus > self.gpus:
            short.append(f"{want.gpus} GPUs (free {max(0, self.gpus - used.gpus)} of {self.gpus})")
        return "; ".join(short) or None

    def never_fits(self, want: Footprint) -> str | None:
        """None if `want` fits on the empty node, else why it never can."""
        return self.shortfall(Footprint(), want)


def total(footprints: Iterable[Footprint]) -> Footprint:
    out = Footprint()
    for f in footprints:
        out = out + f
    return out


def _gib(n: int) -> str:
    return f"{n / (1 << 30):.2f} GiB"
