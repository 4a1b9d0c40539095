"""`hsd-jax demo`: train a small model offline and compare every method on it."""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from hsd_jax.errors import HsdError


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "demo",
        help="offline, a few minutes on a CPU: train a 12-layer GPT-2 on a bundled task, then compare "
        "vanilla, SkipDecode, HSD and CALM in the paper's table",
        description="Writes a small data-to-text task (invented restaurant records, made by hsd_jax.demo_data), "
        "trains a 12-layer GPT-2 from random weights on it with hsd-jax train's code, decodes the dev records "
        "under vanilla, SkipDecode, HSD (two budgets) and CALM (two lambdas) with beam 4, and scores them with "
        "hsd-jax eval's code. Needs no network.",
    )
    p.add_argument("--output", type=Path, default=Path("hsd-jax-demo"),
                   help="folder for the data, the model and the results (default: ./hsd-jax-demo)")
    p.add_argument("--smoke", action="store_true", help="a tiny run of the same pipeline (under a minute)")
    p.add_argument("--seed", type=int, default=0, help="data, initialisation and order seed (default: 0)")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier demo in --output")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from hsd_jax.demo import run_demo
    from hsd_jax.demo_data import format_record

    if not 0 <= args.seed < 2**63:  # before the folder is made: numpy takes non-negative 64-bit seeds
        raise HsdError(f"--seed must be a whole number from 0 to 2**63 - 1, got {args.seed}")
    try:
        result = run_demo(args.output, smoke=args.smoke, seed=args.seed, overwrite=args.overwrite,
                          progress=not args.no_progress)
    except KeyboardInterrupt:  # the demo cannot be resumed: say how to start it again
        again = " ".join(["hsd-jax demo", *(["--smoke"] if args.smoke else []), "--output",
                          shlex.quote(str(args.output)), "--overwrite"])
        print(f"hsd-jax demo: interrupted; the demo in {args.output} is unfinished, and `{again}` runs it again",
              file=sys.stderr)
        return 130
    ev = result.output / "eval"
    print()
    print(result.table)
    print(f"plot:        {ev / 'quality_vs_layers.png'}")
    print(f"predictions: {ev / 'predictions'}/ (one file per schedule)")
    print(f"model:       {result.model} (a Hugging Face folder, with its tokenizer)")
    print(f"took {result.seconds:.0f} s. Decode a record of your own:")
    record = format_record({"name": "The Crimson Lantern", "type": "pub", "food": "Italian", "area": "riverside",
                            "family": "yes"})
    print("  hsd-jax generate --model " + shlex.quote(str(result.model)) + " --seq2seq --num-beams 4 "
          "--schedule hsd:s=1,min=0,max=6,warmup=1 --prompt " + shlex.quote(record))
    return 0
