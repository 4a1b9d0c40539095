"""`hsd-jax demo`: train a small model offline, fine-tune it schedule-aware, compare every method on both."""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from hsd_jax.errors import HsdError

FAMILIES = ("gpt2", "phi")  # hsd_jax.demo.FAMILIES, here without importing it (--help stays instant)


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "demo",
        help="offline, a few minutes on a CPU: train a 12-layer GPT-2 or Phi on a bundled task, fine-tune it "
        "schedule-aware, then compare vanilla, SkipDecode, HSD and CALM on both models",
        description="Writes a small data-to-text task (invented restaurant records, made by hsd_jax.demo_data), "
        "trains a 12-layer model of the chosen family from random weights on it with hsd-jax train's code (the "
        "plain model), fine-tunes it schedule-aware (both paths on every batch, the skipping path distilled from "
        "the full one), decodes the dev records with each under vanilla, SkipDecode, the paper's HSD rows, HSD "
        "with layer 0 always run and CALM, with beam 4, and scores them with hsd-jax eval's code: the two "
        "models side by side, one plot with both. Needs no network. Run again after Ctrl-C or SIGTERM, it "
        "continues where it stopped.",
    )
    p.add_argument("--family", choices=FAMILIES, default="gpt2",
                   help="the model's architecture: GPT-2, or Phi (partial rotary embedding, parallel attention "
                   "and MLP)")
    p.add_argument("--output", type=Path, default=None,
                   help="folder for the data, the models and the results (default: ./hsd-jax-demo for gpt2, "
                   "./hsd-jax-demo-phi for phi); a folder holding the same demo is continued")
    p.add_argument("--smoke", action="store_true", help="a tiny run of the same pipeline (under a minute)")
    p.add_argument("--seed", type=int, default=0, help="data, initialisation and order seed (default: 0)")
    p.add_argument("--overwrite", action="store_true", help="start again, replacing an earlier demo in --output")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def default_output(family: str) -> Path:
    return Path("hsd-jax-demo" if family == "gpt2" else f"hsd-jax-demo-{family}")


def run(args: argparse.Namespace) -> int:
    from hsd_jax.demo import AWARE, COMPARISON, PLAIN, PLOT, run_demo
    from hsd_jax.demo_data import format_record

    if not 0 <= args.seed < 2**63:  # before the folder is made: numpy takes non-negative 64-bit seeds
        raise HsdError(f"--seed must be a whole number from 0 to 2**63 - 1, got {args.seed}")
    output = args.output if args.output is not None else default_output(args.family)
    again = " ".join(["hsd-jax demo", *(["--family", args.family] if args.family != "gpt2" else []),
                      *(["--smoke"] if args.smoke else []), *(["--seed", str(args.seed)] if args.seed else []),
                      "--output", shlex.quote(str(output))])
    try:
        result = run_demo(output, family=args.family, smoke=args.smoke, seed=args.seed, overwrite=args.overwrite,
                          progress=not args.no_progress)
    except KeyboardInterrupt:
        print(f"hsd-jax demo: interrupted; `{again}` continues it where it stopped", file=sys.stderr)
        return 130
    out = result.output
    print()
    print(result.comparison)
    for line in result.summary:
        print(line)
    print()
    print(f"Ran on {result.ran_on}.")
    print()
    print(f"table:       {out / COMPARISON} (each model's own: {PLAIN}/eval/table.md, {AWARE}/eval/table.md)")
    print(f"plot:        {out / PLOT}")
    print(f"predictions: {out / PLAIN / 'eval' / 'predictions'}/, {out / AWARE / 'eval' / 'predictions'}/")
    print(f"models:      {result.models[PLAIN]}, {result.models[AWARE]} (Hugging Face folders, with their "
          "tokenizer)")
    stages = ", ".join(f"{stage} {seconds:.0f} s" for stage, seconds in result.timings.items())
    if result.runs > 1:  # continued: the stages and the total are the demo's, over all its runs
        took = f"took {result.total_seconds:.0f} s over {result.runs} runs (this one {result.seconds:.0f} s; {stages})"
    else:
        took = f"took {result.seconds:.0f} s ({stages})"
    print(f"{took}. Decode a record of your own:")
    record = format_record({"name": "The Crimson Lantern", "type": "pub", "food": "Italian", "area": "riverside",
                            "family": "yes"})
    print("  hsd-jax generate --model " + shlex.quote(str(result.models[AWARE])) + " --seq2seq --num-beams 4 "
          "--schedule hsd:s=2,min=0,max=4,T=72 --prompt " + shlex.quote(record))
    return 0
