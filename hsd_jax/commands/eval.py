"""`hsd-jax eval`: the paper's table and plot for one model on one dataset."""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path

from hsd_jax.errors import HsdError, os_error_text


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "eval",
        help="decode a dataset under several schedules; write the paper's table, a plot and predictions",
        description="Decode the sources of a dataset under each schedule and report Avg. Layer, ROUGE-1/2/L, "
        "BLEU-1, BERTScore and tokens/s. Sources that repeat (one row per reference) are decoded once and "
        "scored against all their references. Every schedule and the BERTScore model are checked before "
        "anything is decoded; each finished row is written at once, and --resume continues an interrupted run.",
    )
    p.add_argument("--model", required=True, help="a model fine-tuned with 'hsd-jax train' (folder or hub id)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--dataset", help="common_gen, e2e_nlg, xsum, cnn_dailymail or healthcaremagic")
    src.add_argument("--eval-file", type=Path, help=".jsonl/.json/.csv/.tsv file of source/target pairs")
    p.add_argument("--split", default="validation",
                   help="dataset split (default: validation); SPLIT:selection or SPLIT:report keeps one fixed "
                   "half of its sources (hsd_jax.data.holdout_half): choose recipes on one, report the other")
    p.add_argument("--source-field", default=None, help="source field of --eval-file (default: source)")
    p.add_argument("--target-field", default=None, help="target field of --eval-file (default: target)")
    p.add_argument("--schedules", nargs="+", default=["paper"], metavar="SPEC",
                   help="specs or presets, space-separated; 'paper' = the paper's 11 rows (their layer counts "
                   "scaled to models under 32 layers, see docs/methods.md), 'paper-hsd-warmup' = its 6 HSD rows "
                   "with layer 0 always run (default: paper)")
    p.add_argument("--limit", type=int, help="evaluate only the first N sources (default: all)")
    p.add_argument("--num-beams", type=int, default=4, help="beams; the paper uses 4 (default: 4)")
    p.add_argument("--max-new-tokens", type=int, default=64, help="(default: 64)")
    p.add_argument("--batch-size", type=int, default=8,
                   help="sources per device in a decoding batch (as hsd-jax generate's; default: 8)")
    p.add_argument("--devices", type=int, metavar="N",
                   help="split each batch over the first N of this process's devices (default: all of them); "
                   "the predictions are the same on any number. Under jax.distributed (several processes, "
                   "docs/multihost.md) the sources are shared out among the processes and process 0 scores "
                   "and writes")
    p.add_argument("--mode", choices=["compiled", "static", "eager"], default="compiled",
                   help="(default: compiled)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="(default: float32)")
    p.add_argument("--no-bertscore", action="store_true",
                   help="skip BERTScore (it needs its own model, and bert-score with torch: pip install "
                   "\"hsd-jax[bertscore]\"; without them it is skipped with a note)")
    p.add_argument("--bertscore-model",
                   help="bert-score model name or local folder (default: roberta-large, from the hub)")
    p.add_argument("--bertscore-layers", type=int,
                   help="layer of --bertscore-model to use (default: bert-score's, or a folder's last)")
    p.add_argument("--metric", default="R-L", help="metric on the plot's y axis (default: R-L)")
    p.add_argument("--truncate-sources", action="store_true",
                   help="cut a source too long for the model's context (with --max-new-tokens) from its end, as "
                   "training cuts it (the lead of an article is kept); without it such a source is refused, "
                   "naming it, as hsd-jax generate refuses a prompt too long")
    p.add_argument("--predictions-only", action="store_true",
                   help="predictions files hold each prediction with its source's index and a hash of its text, "
                   "but not the dataset's sources and references (for results shared without the data)")
    p.add_argument("--blind", action="store_true",
                   help="decode only, for a split whose references are withheld (e.g. --dataset common_gen "
                   "--split test): writes manifest.json (each row's Avg. Layer, tokens/s and predictions file), "
                   "table.md and predictions/ with each input's index, no scores; sources are not grouped, one "
                   "prediction per input row in input order")
    p.add_argument("--output", type=Path, required=True, help="folder for results.json, table.md, plot, predictions")
    again = p.add_mutually_exclusive_group()
    again.add_argument("--resume", action="store_true",
                       help="keep the finished rows of the evaluation in --output and decode the rest")
    again.add_argument("--overwrite", action="store_true",
                       help="replace the evaluation in --output (its files only)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from hsd_jax import distributed
    from hsd_jax.evaluate import MANIFEST, RESULTS

    scoring = [flag for flag, given in (("--metric", args.metric != "R-L"), ("--bertscore-model", args.bertscore_model),
                                        ("--bertscore-layers", args.bertscore_layers is not None)) if given]
    if args.blind and scoring:
        raise HsdError(f"--blind scores nothing, so {', '.join(scoring)} would be ignored; leave it out, and score "
                       "the run once references exist (eval/score_blind.py)")
    if args.limit is not None and args.limit < 1:
        raise HsdError(f"--limit must be at least 1, got {args.limit}; leave it out to evaluate every source")
    for flag in ("num_beams", "max_new_tokens", "batch_size"):
        if getattr(args, flag) < 1:
            raise HsdError(f"--{flag.replace('_', '-')} must be at least 1, got {getattr(args, flag)}")
    if args.devices is not None and args.devices < 1:
        raise HsdError(f"--devices must be at least 1, got {args.devices}; leave it out to use every device")
    distributed.maybe_initialize()  # a launcher's several processes (docs/multihost.md); before JAX's devices
    distributed.local_devices(args.devices)  # too many: said now, not after the model has loaded
    lead = distributed.is_lead()  # process 0 checks, scores and writes; the others only decode
    held = contextlib.ExitStack()  # the output folder's lock (process 0's), held until the command ends
    results_file = args.output / (MANIFEST if args.blind else RESULTS)
    try:
        with held, distributed.together("eval"):  # a process that fails stops the others
            return _evaluate(args, lead, held)
    except KeyboardInterrupt:
        from hsd_jax.evaluate import finished_rows

        saved = _rows_saved(results_file)
        if not lead:
            where = "process 0 keeps the finished rows; run the same command with --resume to continue"
        elif saved:
            where = f"{finished_rows(saved)} saved in {args.output}; run the same command with --resume to continue"
        else:
            where = "no row was finished, so nothing was saved; run the same command again to start"
        print(f"hsd-jax eval: interrupted; {where}", file=sys.stderr)
        return 130
    except OSError as err:  # a full disk mid-run: the finished rows are safe, and --resume keeps them
        if isinstance(err, BrokenPipeError):
            raise
        saved = _rows_saved(results_file)
        if not saved:
            raise HsdError(f"{os_error_text(err)}; no row was finished, so nothing was saved") from err
        from hsd_jax.evaluate import finished_rows

        raise HsdError(f"{os_error_text(err)}; {finished_rows(saved)} saved in {args.output}, and the same "
                       "command with --resume continues") from err


def _open_output(args: argparse.Namespace, held: contextlib.ExitStack) -> None:
    """Checks --output and locks it (OUTPUT/.lock) for this run: a second evaluation into the
    folder is refused, in one line naming this one's process, instead of replacing its rows."""
    from hsd_jax.io import check_output_dir, output_lock

    check_output_dir(args.output)
    held.enter_context(output_lock(args.output / ".lock", args.output, what="evaluation"))


def _evaluate(args: argparse.Namespace, lead: bool, held: contextlib.ExitStack) -> int:
    import hsd_jax
    from hsd_jax import data, distributed
    from hsd_jax.evaluate import MANIFEST, PLOT, RESULTS, TABLE, evaluate_to_folder, group_references
    from hsd_jax.metrics import BERTSCORE_INSTALL, BertScorer, bertscore_available

    distributed.lead_decides("eval-output", lambda: _open_output(args, held))
    name = f"{args.dataset}/{args.split}" if args.dataset else args.eval_file.name
    references = None
    if args.blind:  # one prediction per input row, in order: repeats are not grouped
        sources = data.load_dataset_sources(args.dataset, args.split, file_flag="--eval-file") if args.dataset \
            else data.read_sources(args.eval_file, args.source_field)
    else:
        pairs = data.load_dataset_pairs(args.dataset, args.split, file_flag="--eval-file") if args.dataset \
            else data.read_pairs(args.eval_file, args.source_field, args.target_field)
        sources, references = group_references(pairs)
    if args.limit:
        sources = sources[: args.limit]
        references = None if references is None else references[: args.limit]
    lm = hsd_jax.load(args.model, dtype=args.dtype, layout="decode")  # it only decodes: no stacked copy
    bertscore = not (args.blind or args.no_bertscore)
    if bertscore and args.bertscore_model is None and args.bertscore_layers is None and not bertscore_available():
        # The default install has no bert-score: the other metrics still come, and the note says how to add it.
        if lead:
            print(f"hsd-jax eval: note: BERTScore is skipped: bert-score is not installed ({BERTSCORE_INSTALL} "
                  "adds it; --no-bertscore skips it without this note)", file=sys.stderr, flush=True)
        bertscore = False
    scorer = BertScorer(args.bertscore_model, args.bertscore_layers) if bertscore and lead else None
    title = f"{Path(str(args.model)).name} on {name} ({len(sources)} sources, beam {args.num_beams})"
    settings = {"model": _resolved(args.model), "dataset": name, "dtype": args.dtype}
    evaluate_to_folder(
        lm, sources, references, args.schedules, args.output, settings=settings, title=title,
        resume=args.resume, overwrite=args.overwrite, metric=args.metric, num_beams=args.num_beams,
        max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, mode=args.mode, bertscorer=scorer,
        predictions_only=args.predictions_only, devices=args.devices, split_processes=True,
        truncate_sources=args.truncate_sources, provenance=_provenance(args.model) if args.blind and lead else None)
    if not lead:
        return 0
    print((args.output / TABLE).read_text())  # with the kept rows of schedules this run did not list
    out = args.output
    if args.blind:
        print(f"wrote {out / MANIFEST}, {out / TABLE} and {out / 'predictions'}/ (no scores: blind)")
    else:
        print(f"wrote {out / RESULTS}, {out / TABLE}, {out / PLOT} and {out / 'predictions'}/")
    return 0


def _rows_saved(results_file: Path) -> int:
    try:
        return len(json.loads(results_file.read_text())["rows"])
    except (OSError, ValueError, KeyError):
        return 0


def _provenance(model: str) -> dict:
    """What a blind run's manifest tells whoever scores it elsewhere: the SHA-256 of the
    weights (a local folder's model.safetensors; None for a hub id or other files) and where
    and when the predictions were made."""
    import datetime
    import hashlib

    import flax
    import jax
    import transformers

    weights = Path(model) / "model.safetensors"
    digest = None
    if weights.is_file():
        sha = hashlib.sha256()
        with weights.open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                sha.update(block)
        digest = sha.hexdigest()
    versions = ", ".join(f"{m.__name__} {m.__version__}" for m in (jax, flax, transformers))
    day = datetime.datetime.now(datetime.timezone.utc).date().isoformat()
    return {"model_sha256": digest,
            "built_on": f"{jax.device_count()} x {jax.devices()[0].device_kind} ({versions}), {day}"}


def _resolved(model: str) -> str:
    """A local folder's absolute path (the same model wherever the command runs), else the hub id."""
    path = Path(model)
    return str(path.resolve()) if path.exists() else model
