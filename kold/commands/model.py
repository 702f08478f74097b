"""`kold model make-tiny`: a random Llama-shaped Hugging Face directory, made locally (no downloads)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from kold.settings import Settings


def register(top: Any) -> None:
    parser = top.add_parser("model", help="make models to try kold with")
    sub = parser.add_subparsers(dest="model_command", required=True, metavar="SUBCOMMAND")
    make = sub.add_parser("make-tiny", help="write a random Llama-shaped model directory (seeded)")
    make.add_argument("out", type=Path, metavar="OUT")
    make.add_argument("--size", default="tiny", help="tiny (a few MB), small (~40 MB) or 1b (TinyLlama shapes, 2.2 GB)")
    make.add_argument("--seed", type=int, default=0)
    make.set_defaults(handler=cmd_make_tiny)


def cmd_make_tiny(args: argparse.Namespace, settings: Settings) -> int:
    from kold.cli import CLIError
    from kold.modelgen import SIZES, llama_tensor_specs, write_random_llama
    from kold.progress import ByteProgress

    if args.size not in SIZES:
        raise CLIError(f"unknown size {args.size!r} (choose from {', '.join(SIZES)})")
    if args.out.exists() and any(args.out.iterdir()):
        raise CLIError(f"{args.out} exists and is not empty: choose a new directory")
    total = sum(2 * _numel(shape) for _, shape in llama_tensor_specs(SIZES[args.size]))
    done = [0]
    with ByteProgress(f"make {args.size}") as progress:

        def step(nbytes: int) -> None:
            done[0] += nbytes
            progress("generate", done[0], total)

        write_random_llama(args.out, args.size, seed=args.seed, progress=step)
    print(f"wrote a random {args.size} Llama model ({total / 1e6:,.1f} MB bf16) to {args.out}")
    return 0


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n
