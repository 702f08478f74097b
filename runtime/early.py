"""Serving behind the restore: the model computes each layer as soon as that layer's weights land.

Why: on a small CPU node a cold start is a ~1 s restore followed by a ~0.7 s prefill for the request
that woke the instance. Snapshots lay tensors out in forward order (kold.snapshot.layout) and a CPU
restore fills one host buffer front to back, so the model can be bound to that buffer before it is
full and run its forward pass layer by layer behind the restore, waiting only where it catches up.
The first token then comes shortly after the LM head lands instead of a whole prefill later.

`LayerGate` is the wait: the model calls it before its embeddings, before each decoder layer and
before its final norm and head (`LlamaForCausalLM.gate`), and it blocks until every byte that stage
reads is in place (`RestoreProgress.wait_until`). Once the restore is over the loader removes it.
If the restore fails, the gate raises and the forward fails its requests, not the engine.
"""

from __future__ import annotations

import re
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from kold.runtime.model import LlamaForCausalLM
    from kold.snapshot.manifest import Manifest
    from kold.snapshot.progress import RestoreProgress

_LAYER = re.compile(r"^model\.layers\.(\d+)\.")


def stage_of(name: str, num_layers: int) -> int:
    """0: embeddings; 1..num_layers: decoder layer i-1; num_layers + 1: the rest (final norm, head)."""
    if name.startswith("model.embed_tokens."):
        return 0
    m = _LAYER.match(name)
    if m is not None and int(m.group(1)) < num_layers:
        return int(m.group(1)) + 1
    return num_layers + 1


class LayerGate:
    """`gate(stage)` returns once every byte the forward pass reads up to that stage has landed."""

    def __init__(self, model: LlamaForCausalLM, manifest: Manifest, progress: RestoreProgress) -> None:
        self.progress = progress
        n = len(model.model.layers)
        ends = {t.name: t.end for t in manifest.tensors}
        need = [0] * (n + 2)
        for name, _ in [*model.named_parameters(), *model.named_buffers()]:  # tied weights listed once
            if name in ends:
                stage = stage_of(name, n)
                need[stage] = max(need[stage], ends[name])
        for s in range(1, n + 2):  # a stage runs after the ones before it: waits are monotone, and the
            # last (norm and head) covers every tensor the model reads
            need[s] = max(need[s], need[s - 1])
        self.need = need
        self.waited_s = 0.0

    def __call__(self, stage: int) -> None:
        offset = self.need[stage]
        if self.progress.landed_bytes() >= offset:
            return
        started = time.perf_counter()
        self.progress.wait_until(offset)
        self.waited_s += time.perf_counter() - started
