"""`kold model`: the models kold can fetch or make (`ls`), where an installed one is (`path`), and
`make-tiny`, a random Hugging Face model directory (weights, config, tokenizer) made locally."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from kold.settings import Settings


def register(top: Any) -> None:
    from kold.output import add_output_option

    parser = top.add_parser("model", help="the models kold can fetch or make")
    sub = parser.add_subparsers(dest="model_command", required=True, metavar="SUBCOMMAND")
    ls = sub.add_parser("ls", help="list the models kold knows: name, kind, size, where it is or how to get it")
    add_output_option(ls)
    ls.set_defaults(handler=cmd_ls)
    path = sub.add_parser(
        "path", help="print an installed model's file (kold deploy $(kold model path smollm2-135m-instruct) ...)"
    )
    path.add_argument("name", metavar="NAME")
    path.set_defaults(handler=cmd_path)
    make = sub.add_parser(
        "make-tiny", help="write a random model directory with a trained tokenizer (seeded, deterministic)"
    )
    make.add_argument("out", type=Path, metavar="OUT")
    make.add_argument("--arch", default="llama", help="llama (default), mistral, qwen2 or qwen3")
    make.add_argument("--size", default="tiny", help="tiny (a few MB), small (~40 MB) or 1b (TinyLlama shapes, 2.2 GB)")
    make.add_argument("--seed", type=int, default=0)
    make.set_defaults(handler=cmd_make_tiny)


def cmd_ls(args: argparse.Namespace, settings: Settings) -> int:
    """stdout: the table (or -o json|yaml); a model's WHERE is its file when installed, else how to get it."""
    from kold.models_catalog import catalog
    from kold.output import print_data

    entries = catalog()
    if args.output:
        rows = [
            {"name": e.name, "kind": e.kind, "size_bytes": e.size_bytes, "path": str(e.path) if e.path else None,
             "how": e.how}
            for e in entries
        ]  # fmt: skip
        print_data(rows, args.output)
        return 0
    table = [("NAME", "KIND", "SIZE", "WHERE")]
    table += [(e.name, e.kind, f"{e.size_bytes / 1e6:,.1f} MB", str(e.path) if e.path else e.how) for e in entries]
    widths = [max(len(row[i]) for row in table) for i in range(3)]
    for row in table:
        print(f"{row[0]:<{widths[0]}}  {row[1]:<{widths[1]}}  {row[2]:>{widths[2]}}  {row[3]}")
    return 0


def cmd_path(args: argparse.Namespace, settings: Settings) -> int:
    """stdout: the installed model's file alone, for `$(...)`."""
    from kold.errors import CLIError
    from kold.models_catalog import PACKAGED, RANDOM_SIZES, find_packaged, packaged

    model = packaged(args.name)
    if model is None:
        if args.name in RANDOM_SIZES:
            raise CLIError(
                f"{args.name} is a random model, made rather than installed: kold model make-tiny OUT --size {args.name}"
            )
        known = ", ".join([m.name for m in PACKAGED] + list(RANDOM_SIZES))
        raise CLIError(f"unknown model {args.name!r} (kold model ls lists them: {known})")
    found = find_packaged(model)
    if found is None:
        raise CLIError(f"{model.name} is not installed: {model.install_command}")
    print(found)
    return 0


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
