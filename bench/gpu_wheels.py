"""What the lent GPU machine lacks, and a Python here that lacks the same (for the dry run).

The machine has no network: every package kold needs there and the image does not hold travels as a
wheel (`bench/gpu_prepare.sh` downloads them). Which ones is computed, not listed by hand: the
closure of kold's own requirements in this checkout's `.venv`, at the versions installed there (the
ones the tests ran with), less the packages the image holds and less the ones the GPU run never
imports (`NOT_ON_THE_GPU_RUN`, with everything only they need).

    .venv/bin/python bench/gpu_wheels.py pins 3.12             # NAME==VERSION, one a line
    .venv/bin/python bench/gpu_wheels.py image-python DIR      # the dry run's device-like Python

The image's package list was read off the machine (the `device` tool's KINDS.md, 2026-11-17).
"""

from __future__ import annotations

import argparse
import importlib.metadata as md
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from packaging.requirements import Requirement

# The image 'cuda' of nvidia-h100-x1 and nvidia-h200, as listed in KINDS.md.
_IMAGE_TEXT = """
absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch build certifi
charset-normalizer chex click cloudpickle cmake colorama contourpy coverage cuda-bindings cuda-core
cuda-pathfinder cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops equinox etils execnet filelock
flatbuffers flax fonttools formulaic frozenlist fsspec gpytorch grpcio h11 h5py hf-xet httpcore httpx
huggingface-hub humanize hypothesis idna imageio iniconfig interface-meta jax jax-cuda13-pjrt
jax-cuda13-plugin jaxlib jaxtyping jinja2 joblib kiwisolver lazy-loader lightning lightning-utilities
linear-operator lineax llvmlite lxml markdown markdown-it-py markupsafe matplotlib mdurl meson ml-dtypes
mpi4py mpmath msgpack multidict multipledispatch mypy-extensions nanobind narwhals networkx ninja numba
numba-cuda numpy numpyro nvidia-cublas nvidia-cuda-cupti nvidia-cuda-nvrtc nvidia-cuda-runtime
nvidia-cudnn-cu13 nvidia-cufft nvidia-cufile nvidia-curand nvidia-cusolver nvidia-cusparse
nvidia-cusparselt-cu13 nvidia-ml-py nvidia-nccl-cu13 nvidia-nvjitlink nvidia-nvshmem-cu13 nvidia-nvtx onnx
onnx-ir onnxruntime onnxscript opencv-python-headless optax opt-einsum opt-einsum-fx optimistix
orbax-checkpoint packaging pandas pathspec patsy peft pillow pip pluggy portalocker prometheus-client
propcache protobuf psutil pyarrow pybind11 py-cpuinfo pygments pyparsing pyproject-hooks pyre-extensions
pytest pytest-benchmark pytest-cov pytest-mock pytest-timeout pytest-xdist python-dateutil
pytorch-lightning pyyaml regex requests rich sacrebleu safetensors scikit-build-core scikit-image
scikit-learn scipy seaborn sentencepiece sentence-transformers setuptools shellingham simplejson six
sortedcontainers statsmodels sympy tabulate tensorboard tensorboard-data-server tensorstore threadpoolctl
tifffile tiktoken timm tokenizers toolz torch torchaudio torchdiffeq torch-geometric torchmetrics
torchvision tqdm transformers treescope triton typer typing-extensions typing-inspect urllib3 uvloop
wadler-lindig werkzeug wheel wrapt xarray xxhash yarl zipp
"""
IMAGE = _IMAGE_TEXT.split()

# kold requires these, but the GPU run (CUDA tests, restore from file:// and shm, the runtime) never
# imports them: S3, the platform's Redis, Kubernetes.
NOT_ON_THE_GPU_RUN = {"boto3", "redis", "kubernetes"}
# Carried even though the image has them: pydantic needs a recent typing-extensions, and an older one
# there would break the import (a newer one breaks nothing).
ALWAYS = {"typing-extensions"}
# What the machine lacks, as read off it (issue 17): the dry run's Python must lack them too, even
# where a package of this .venv that the image also has depends on one of them.
MISSING = {"pydantic", "pydantic-settings", "starlette", "fastapi", "uvicorn", "httptools", "boto3", "redis",
           "kubernetes", "openai", "tensorizer", "runai-model-streamer", "kold"}  # fmt: skip


def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _installed() -> dict[str, md.Distribution]:
    return {norm(d.metadata["Name"]): d for d in md.distributions()}


def _requires(dist: md.Distribution, python: str) -> list[str]:
    """The distribution's requirements that apply to Python `python` ("3.12") without extras."""
    env = {"extra": "", "python_version": python, "python_full_version": python + ".0"}
    out = []
    for text in dist.requires or []:
        req = Requirement(text)
        if req.marker is None or req.marker.evaluate(env):
            out.append(norm(req.name))
    return out


def pins(python: str) -> list[str]:
    """NAME==VERSION of every package the GPU run needs on Python `python` that the image lacks (kold
    itself excluded)."""
    dists = _installed()
    image = {norm(n) for n in IMAGE}
    seen: set[str] = set()
    todo = list(_requires(dists["kold"], python))
    while todo:
        name = todo.pop()
        if name in seen or name in NOT_ON_THE_GPU_RUN:
            continue
        seen.add(name)
        if name in image and name not in ALWAYS:
            continue  # the image's own, with whatever it needs
        if name not in dists:
            raise SystemExit(f"{name} is required but not installed in this Python: run scripts/setup.sh")
        todo += _requires(dists[name], python)
    needed = sorted(n for n in seen if n not in image or n in ALWAYS)
    return [f"{n}=={dists[n].version}" for n in needed]


def image_python(target: Path) -> Path:
    """A Python here that holds what the image holds: this `.venv`'s copies of the image's packages,
    and what those copies need (the image's own copies are other versions, whose needs the image
    meets), never a package the machine lacks or one the wheels bring. So the dry run fails where the
    machine would for a missing wheel. A venv without packages of its own, and a .pth naming a folder
    of links to the chosen distributions' files."""
    dists = _installed()
    python = f"{sys.version_info.major}.{sys.version_info.minor}"
    shipped = {norm(pin.split("==")[0]) for pin in pins(python)}
    excluded = MISSING | shipped | NOT_ON_THE_GPU_RUN
    image: set[str] = set()
    todo = [norm(n) for n in IMAGE]
    while todo:
        name = todo.pop()
        if name in image or name in excluded or name not in dists:
            continue
        image.add(name)
        todo += _requires(dists[name], python)
    shutil.rmtree(target, ignore_errors=True)
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(target)], check=True)
    links = target / "image-site"
    links.mkdir()
    for name, dist in sorted(dists.items()):
        if name not in image:
            continue
        for top in {Path(str(f)).parts[0] for f in dist.files or []}:
            source = Path(str(dist.locate_file(top)))
            if top in ("..", "__pycache__") or top.endswith(".pth") or not source.exists():
                continue
            link = links / top
            if not link.exists():
                link.symlink_to(source)
    (site,) = target.glob("lib/python*/site-packages")
    (site / "kold-image.pth").write_text(str(links) + "\n")
    python = target / "bin" / "python"
    os.utime(python)
    return python


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    pin = sub.add_parser("pins")
    pin.add_argument("python", help="the target's Python version, e.g. 3.12")
    image = sub.add_parser("image-python")
    image.add_argument("target", type=Path)
    args = parser.parse_args()
    if args.command == "pins":
        print("\n".join(pins(args.python)))
    else:
        print(image_python(args.target))
    return 0


if __name__ == "__main__":
    sys.exit(main())
