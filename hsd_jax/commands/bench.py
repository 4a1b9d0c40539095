"""`hsd-jax bench`: side-by-side decode speed, transformers against hsd-jax, vanilla against schedules."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from hsd_jax.commands import DefaultsShown
from hsd_jax.errors import HsdError


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "bench",
        help="side-by-side speed benchmarks: transformers vs hsd-jax eager/compiled/static, schedules vs vanilla",
        description="Time text generation with random-weight GPT-2 / Phi-2 architectures (nothing is downloaded): "
        "transformers' PyTorch generate against hsd-jax's eager, compiled and static modes, and vanilla against "
        "SkipDecode and HSD with the measured speedup next to the ideal one (weight bytes read per token), "
        "against the memory roofline measured in the same run. Medians of --repeats rounds after a warm-up; "
        "compile time reported apart; EOS disabled, so every run makes exactly --new-tokens tokens. "
        "Suites are defined in hsd_jax/bench/suites.py (installed with the package), with the targets the "
        "report prints figures against; docs/benchmarks.md explains every column.",
        formatter_class=DefaultsShown,
    )
    # An option left out takes the suite's value: its argparse default is None, and its help
    # says what that stands for, "(default: the suite's)" (`DefaultsShown`).
    p.add_argument("--suite", default="quick",
                   help="quick (GPT-2 small, prompt 32, batch 1, a few minutes on CPU), full, gpu, devices or devices-gpu "
                   "(1 against all local devices), speculative, calm (docs/benchmarks.md)")
    p.add_argument("--model", nargs="+", metavar="ARCH",
                   help="architectures: gpt2, gpt2-medium, gpt2-large, phi-2, or tiny-gpt2 and tiny-phi for tests "
                   "(default: the suite's)")
    p.add_argument("--prompt", nargs="+", type=int, metavar="N",
                   help="prompt lengths in tokens (default: the suite's)")
    p.add_argument("--batch", nargs="+", type=int, metavar="B", help="batch sizes, in inputs (default: the suite's)")
    p.add_argument("--beams", nargs="+", type=int, metavar="K",
                   help="beam counts, 1 for greedy (default: the suite's)")
    p.add_argument("--schedules", nargs="*", metavar="SPEC",
                   help="schedules to compare with vanilla, as specs or presets; the flag alone for vanilla only "
                   "(default: the suite's)")
    p.add_argument("--runners", nargs="+", choices=["transformers", "transformers-static", "eager", "compiled", "static",
                                                    "devices"],
                   help="what vanilla runs under; schedules run under compiled and static, and devices runs compiled "
                   "on every local device, each the case's batch, against one device (default: the suite's)")
    p.add_argument("--repeats", type=int, help="timed rounds per case (default: the suite's, or 3)")
    p.add_argument("--new-tokens", type=int,
                   help="tokens generated per input (default: the suite's, or 64)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], help="weights dtype (default: the suite's)")
    p.add_argument("--json", type=Path, metavar="PATH",
                   help="where to write the results, atomically, after every case (default: runs/bench/SUITE.json)")
    p.add_argument("--suites-file", type=Path, metavar="PY",
                   help="a Python file defining SUITES (and SCHEDULES) in the form of hsd_jax/bench/suites.py "
                   "(default: the package's suites)")
    p.add_argument("--max-seconds", type=float,
                   help="skip the cases that would end past this many seconds (by the suite's estimates; else those that "
                   "would start after it) (default: no limit)")
    p.add_argument("--threads", type=int, metavar="N",
                   help="CPU threads for XLA and PyTorch alike, printed with the table (default: every CPU the "
                   "process may use)")
    p.add_argument("--dry-run", action="store_true",
                   help="tiny models of the same families and 1 repeat: checks that a suite runs, in seconds")
    p.add_argument("--quiet", action="store_true", help="no progress lines, only the table")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from hsd_jax import bench  # JAX and transformers load here, so `hsd-jax --help` stays fast
    from hsd_jax.io import check_output_file

    suites, schedules = bench.load_suites(args.suites_file)
    if args.max_seconds is not None and args.max_seconds < 0:
        raise HsdError(f"--max-seconds must be 0 or more, got {args.max_seconds}; leave it out for no limit")
    if args.suite not in suites:
        raise HsdError(f"unknown suite {args.suite!r}; the suites file defines {', '.join(suites)}")
    suite = suites[args.suite]
    for name in ("repeats", "new_tokens"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise HsdError(f"--{name.replace('_', '-')} must be at least 1, got {value}")
    for name in ("prompt", "batch", "beams"):
        if any(v < 1 for v in getattr(args, name) or ()):
            raise HsdError(f"--{name} values must be at least 1")
    cases = bench.build_cases(suite, schedules, models=args.model, prompts=args.prompt, batches=args.batch,
                              beams=args.beams, runners=args.runners, schedule_specs=args.schedules,
                              dtype=args.dtype, new_tokens=args.new_tokens, dry_run=args.dry_run)
    repeats = 1 if args.dry_run and args.repeats is None else (args.repeats or suite.get("repeats", 3))
    custom = any(getattr(args, a) is not None for a in ("model", "prompt", "batch", "beams", "schedules", "runners"))
    name = args.suite + ("-custom" if custom else "") + ("-dry-run" if args.dry_run else "")
    path = args.json or Path("runs") / "bench" / f"{name}.json"
    check_output_file(path, flag="--json")  # before the timing runs: a bad path must not cost them
    log = (lambda msg: None) if args.quiet else (lambda msg: print(msg, flush=True))
    before = _modified(path)  # an earlier run's file is not this run's results
    try:
        result = bench.run_suite(cases, repeats, json_path=path, log=log, suite=name, max_seconds=args.max_seconds,
                                 targets=suite.get("targets", ()), threads=args.threads)
    except KeyboardInterrupt:  # run_suite writes the JSON after every case: say where the finished ones are
        kept = f"the finished cases are in {path}" if _modified(path) != before else "no case had finished"
        print(f"hsd-jax bench: interrupted; {kept}", file=sys.stderr)
        return 130
    bench.print_table(result)
    print(f"wrote {path}")
    return 0


def _modified(path: Path) -> int | None:
    try:
        return path.stat().st_mtime_ns
    except OSError:
        return None
