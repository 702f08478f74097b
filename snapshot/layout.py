"""The order tensors are laid out in a snapshot: the order a forward pass needs them.

Why: a restore delivers the blob roughly front to back (readers take chunks in order), so with the
embeddings first, then the numbered blocks in numeric order (layer 2 before layer 10, unlike the
lexicographic order of safetensors files), then everything else (final norm, LM head), a runtime
can start computing on the first layers while the later ones are still arriving. The order is only
a layout hint: every reader finds each tensor by its offset, so a snapshot laid out otherwise (an
older one) restores the same, it just overlaps less.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

_NUMBER = re.compile(r"(\d+)")
_EMBEDDING = re.compile(r"(^|[._])(embed|embedding|embeddings|wte|wpe|tok_embeddings)([._]|$)")


def natural_key(name: str) -> tuple[object, ...]:
    """`layers.2` before `layers.10`: digit runs compare as numbers."""
    return tuple(int(part) if part.isdigit() else part for part in _NUMBER.split(name))


def execution_key(name: str) -> tuple[int, tuple[object, ...]]:
    """Embeddings first, numbered blocks next (in numeric order), the rest (norms, heads) last."""
    if _EMBEDDING.search(name):
        group = 0
    elif _NUMBER.search(name):
        group = 1
    else:
        group = 2
    return group, natural_key(name)


def execution_order(names: Iterable[str]) -> list[str]:
    return sorted(names, key=execution_key)
