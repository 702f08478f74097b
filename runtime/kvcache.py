"""`KVCache`: preallocated keys and values, one slot per running sequence.

Each layer owns two tensors `[num_slots, num_kv_heads, max_seq_len, head_dim]`, allocated once when
the engine starts: a decode step never allocates cache memory, and the memory an instance needs is
known up front. On the CPU the tensors are views of one anonymous mapping, zero-filled by the kernel
page by page on first write (see `KVCache.__init__`): allocation is free at a cold start, and memory
is committed as sequences use it. A sequence holds one slot from
its prefill to its last token; the slot's stale contents from a previous occupant are never read,
because attention masks every position past the row's own.
"""

from __future__ import annotations

import mmap
import threading

import torch

from kold.runtime.config import ModelConfig


class NoFreeSlotError(RuntimeError):
    """Every slot is taken (the engine admits no more sequences than it has slots)."""


class KVCache:
    """Per-layer K/V tensors plus the free-slot bookkeeping."""

    def __init__(
        self,
        config: ModelConfig,
        num_slots: int,
        max_seq_len: int,
        dtype: torch.dtype,
        device: torch.device | str = "cpu",
    ) -> None:
        if num_slots < 1 or max_seq_len < 1:
            raise ValueError(f"KVCache needs num_slots >= 1 and max_seq_len >= 1, got {num_slots}, {max_seq_len}")
        self.num_slots = num_slots
        self.max_seq_len = max_seq_len
        self.dtype = dtype
        self.device = torch.device(device)
        shape = (num_slots, config.num_key_value_heads, max_seq_len, config.head_dim)
        layers = config.num_hidden_layers
        if self.device.type == "cpu":
            # One anonymous mapping: the kernel hands out zeroed pages on first touch, so allocating costs
            # nothing and a slot's memory is faulted in as its positions are written. `torch.zeros` of the
            # 1b model's 369 MB cache took 0.1-0.5 s of page faults at start (2-core VM), on the critical
            # path of a cold start; a prefill now touches a few pages per layer. The memory is reserved
            # (address space, counted by overcommit accounting), not committed, until used.
            nbytes = self.bytes_needed(config, num_slots, max_seq_len, dtype)
            self._mapping = mmap.mmap(-1, max(nbytes, mmap.PAGESIZE), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
            flat = torch.frombuffer(self._mapping, dtype=torch.uint8, count=nbytes)  # a view, no copy
            both = flat.view(dtype).view(2, layers, *shape)
            self.keys, self.values = list(both[0].unbind(0)), list(both[1].unbind(0))
        else:
            self.keys = [torch.zeros(shape, dtype=dtype, device=self.device) for _ in range(layers)]
            self.values = [torch.zeros(shape, dtype=dtype, device=self.device) for _ in range(layers)]
        self._free = list(range(num_slots - 1, -1, -1))  # a stack: pop() hands out slot 0 first
        self._lock = threading.Lock()

    @staticmethod
    def bytes_needed(config: ModelConfig, num_slots: int, max_seq_len: int, dtype: torch.dtype) -> int:
        """The memory the cache will take, for sizing num_slots x max_seq_len before allocating."""
        per_layer = num_slots * config.num_key_value_heads * max_seq_len * config.head_dim
        return 2 * config.num_hidden_layers * per_layer * torch.empty((), dtype=dtype).element_size()

    @property
    def num_free(self) -> int:
        return len(self._free)

    def allocate(self) -> int:
        with self._lock:
            if not self._free:
                raise NoFreeSlotError(f"all {self.num_slots} KV cache slots are in use")
            return self._free.pop()

    def free(self, slot: int) -> None:
        with self._lock:
            if not 0 <= slot < self.num_slots or slot in self._free:
                raise ValueError(f"slot {slot} is not allocated")
            self._free.append(slot)

    def write(self, layer: int, slots: torch.Tensor, positions: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store k/v `[B, kv_heads, T, head_dim]` at (slots[b], positions[b, t])."""
        index = (slots[:, None].expand_as(positions), slice(None), positions)
        # advanced indices around a slice put the indexed dims first: [B, T, kv_heads, head_dim]
        self.keys[layer][index] = k.transpose(1, 2)
        self.values[layer][index] = v.transpose(1, 2)

    def read(self, layer: int, rows: int | torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values `[B, kv_heads, length, head_dim]` of positions 0..length-1 of each slot.

        `rows` is one slot number (a view, no copy: the prefill path) or a LongTensor of slots
        (gathered: the batched decode path).
        """
        if isinstance(rows, int):
            return self.keys[layer][rows : rows + 1, :, :length], self.values[layer][rows : rows + 1, :, :length]
        return self.keys[layer][rows, :, :length], self.values[layer][rows, :, :length]
