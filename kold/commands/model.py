"""`kold model make-tiny`: a random Hugging Face model directory (weights, config, tokenizer), made locally."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from kold.settings import Settings


def register(top: Any) -> None:
    parser = top.add_parser("model", help="make models to try kold with")
    sub = parser.add_subparsers(dest="model_command", required=True, metavar="SUBCOMMAND")
    make = sub.add_parser(
        "make-tiny", help="write a random model directory with a trained tokenizer (seeded, deterministic)"
    )
    make.add_argument("out", type=Path, metavar="OUT")
    make.add_argument("--arch", default="llama", help="llama (default), mistral, qwen2 or qwen3")
    make.add_argument("--size", default="tiny", help="tiny (a few MB), small (~60 MB) or 1b (TinyLlama shapes, 2.2 GB)")
    make.add_argument("--seed", type=int, default=0)
    make.set_defaults(handler=cmd_make_tiny)


def cmd_make_tiny(args: argparse.Namespace, settings: Settings) -> int:
    from kold.errors import CLIError
    from kold.modelgen import ARCHS, SIZES, model_nbytes, model_shape, write_random_model
    from kold.progress import ByteProgress

    if args.arch not in ARCHS:
        raise CLIError(f"unknown architecture {args.arch!r} (choose from {', '.join(ARCHS)})")
    if args.size not in SIZES:
        raise CLIError(f"unknown size {args.size!r} (choose from {', '.join(SIZES)})")
    out: Path = args.out
    if out.exists() and not out.is_dir():
        raise CLIError(f"{out} exists and is not a directory: choose a new directory")
    if out.exists() and any(out.iterdir()):
        raise CLIError(f"{out} exists and is not empty: choose a new directory")
    total = model_nbytes(args.arch, args.size)
    done = [0]
    with ByteProgress(f"make {args.arch} {args.size}") as progress:

        def step(nbytes: int) -> None:
            done[0] += nbytes
            progress("generate", done[0], total)

        write_random_model(out, args.arch, args.size, seed=args.seed, progress=step)
    vocab = model_shape(args.arch, args.size).vocab_size
    print(
        f"wrote a random {args.size} {args.arch} model ({total / 1e6:,.1f} MB bf16, "
        f"{vocab:,}-token BPE tokenizer) to {out}"
    )
    return 0
