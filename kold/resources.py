"""The node's capacity and an instance's memory request: what the local platform's pool schedules by.

Capacity is detected (the CPUs this process may run on, bounded by a cgroup quota; physical memory,
bounded by a cgroup limit; NVIDIA devices under /dev) and each part can be overridden with
KOLD_NODE_CPUS / KOLD_NODE_MEMORY / KOLD_NODE_GPUS. An instance's memory request defaults to its
weights plus its KV cache when every slot is full, the most it commits.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from kold.gateway.capacity import NodeCapacity
from kold.settings import Settings


def detect_cpus() -> float:
    try:
        cpus = float(len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        cpus = float(os.cpu_count() or 1)
    try:  # cgroup v2: "max 100000" or "<quota> <period>"
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()
        if quota != "max":
            cpus = min(cpus, int(quota) / int(period))
    except (OSError, ValueError):
        pass
    return cpus


def detect_memory() -> int:
    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        memory = 8 << 30
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit != "max":
            memory = min(memory, int(limit))
    except (OSError, ValueError):
        pass
    return memory


def detect_gpus() -> int:
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    devices = [p for p in Path("/dev").glob("nvidia*") if re.fullmatch(r"nvidia\d+", p.name)]
    if visible is not None:
        return min(len(devices), len([d for d in visible.split(",") if d.strip()]))
    return len(devices)


def node_capacity(settings: Settings) -> NodeCapacity:
    """The node's capacity: detected, each part overridden by its setting when set."""
    return NodeCapacity(
        cpus=settings.node_cpus if settings.node_cpus is not None else detect_cpus(),
        memory_bytes=settings.node_memory if settings.node_memory is not None else detect_memory(),
        gpus=settings.node_gpus if settings.node_gpus is not None else detect_gpus(),
    )


def instance_memory(
    config_json: Mapping[str, Any] | None, weights_bytes: int, max_batch: int, max_seq_len: int | None
) -> int:
    """Weights plus a full KV cache (2 x layers x KV heads x head dim x context x slots, in the weights'
    element size), from the model's config (a resolved model's `config`: a GGUF has no directory to
    read config.json from); the weights alone when there is none or it cannot tell."""
    from kold.runtime.config import ModelConfig, context_length

    if config_json is None:
        return weights_bytes
    try:
        config = ModelConfig.from_hf(config_json)
    except ValueError:
        return weights_bytes
    context = context_length(config, max_seq_len)
    element = 4 if config.dtype == "float32" else 2
    kv = 2 * config.num_hidden_layers * config.num_key_value_heads * config.head_dim * context * max_batch * element
    return weights_bytes + kv
