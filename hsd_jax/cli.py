"""The `hsd-jax` command line.

Each subcommand lives in its own module under `hsd_jax/commands/` and exposes
`register(subparsers)`; the module imports JAX lazily inside its handler so
that `hsd-jax --help` stays instant.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from hsd_jax.errors import HsdError

# Subcommand modules, in the order `--help` lists them.
COMMANDS = ("generate", "schedule", "train", "eval", "bench")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hsd-jax",
        description="Layer-skipping text generation (HSD, SkipDecode, CALM) for GPT-2 and Phi-2 in JAX.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"hsd_jax.commands.{name}")
        except ModuleNotFoundError as err:
            if err.name != f"hsd_jax.commands.{name}":
                raise
            continue  # not written yet
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        return int(args.func(args) or 0)
    except (HsdError, FileNotFoundError) as err:
        print(f"hsd-jax {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
