"""`hsd-jax eval`: the paper's table and plot for one model on one dataset."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from hsd_jax.errors import HsdError

# The paper's rows: vanilla, CALM (two λ), SkipDecode (two windows), six HSD settings.
PAPER = ("vanilla", "calm-0.02", "calm-0.005", "skipdecode-10-20", "skipdecode-10-24", "hsd-s1-20", "hsd-s2-20",
         "hsd-s1-14", "hsd-s2-14", "hsd-s1-10", "hsd-s2-10")


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "eval",
        help="decode a dataset under several schedules; write the paper's table, a plot and predictions",
        description="Decode the sources of a dataset under each schedule and report Avg. Layer, ROUGE-1/2/L, "
        "BLEU-1 and BERTScore. Sources that repeat (one row per reference) are decoded once and scored "
        "against all their references.",
    )
    p.add_argument("--model", required=True, help="a model fine-tuned with 'hsd-jax train' (folder or hub id)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--dataset", help="common_gen, e2e_nlg, xsum, cnn_dailymail or healthcaremagic")
    src.add_argument("--eval-file", type=Path, help=".jsonl/.csv file of source/target pairs")
    p.add_argument("--split", default="validation", help="dataset split (default validation)")
    p.add_argument("--source-field", default=None)
    p.add_argument("--target-field", default=None)
    p.add_argument("--schedules", nargs="+", default=["paper"], metavar="SPEC",
                   help="specs or presets, space-separated; 'paper' = the paper's 11 rows (needs >= 24 layers)")
    p.add_argument("--limit", type=int, help="evaluate only the first N sources")
    p.add_argument("--num-beams", type=int, default=4, help="the paper uses 4")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--mode", choices=["compiled", "static", "eager"], default="compiled")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--no-bertscore", action="store_true", help="skip BERTScore (it needs its own model)")
    p.add_argument("--bertscore-model", help="bert-score model name or local folder (default roberta-large)")
    p.add_argument("--bertscore-layers", type=int, help="layer of --bertscore-model to use")
    p.add_argument("--metric", default="R-L", help="metric on the plot's y axis (default R-L)")
    p.add_argument("--output", type=Path, required=True, help="folder for results.json, table.md, plot, predictions")
    p.set_defaults(func=run)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "-", text).strip("-").lower()


def run(args: argparse.Namespace) -> int:
    import hsd_jax
    from hsd_jax import data
    from hsd_jax.evaluate import evaluate, group_references, markdown_table, plot_quality_vs_layers
    from hsd_jax.io import write_json, write_jsonl, write_text

    schedules = [spec for s in args.schedules for spec in (PAPER if s == "paper" else [s])]
    if args.dataset:
        pairs = data.load_dataset_pairs(args.dataset, args.split)
        name = f"{args.dataset}/{args.split}"
    else:
        pairs = data.read_pairs(args.eval_file, args.source_field, args.target_field)
        name = args.eval_file.name
    sources, references = group_references(pairs)
    if args.limit:
        sources, references = sources[: args.limit], references[: args.limit]
    lm = hsd_jax.load(args.model, dtype=args.dtype)
    results = evaluate(lm, sources, references, schedules, num_beams=args.num_beams,
                       max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, mode=args.mode,
                       with_bertscore=not args.no_bertscore, bertscore_model=args.bertscore_model,
                       bertscore_layers=args.bertscore_layers)
    if args.metric not in results[0].scores:
        raise HsdError(f"--metric {args.metric!r} is not among {', '.join(results[0].scores)}")

    title = f"{Path(str(args.model)).name} on {name} ({len(sources)} sources, beam {args.num_beams})"
    table = markdown_table(results, title)
    out = args.output
    for r in results:
        write_jsonl(out / "predictions" / f"{_slug(r.method)}.jsonl",
                    ({"source": s, "prediction": p, "references": refs}
                     for s, p, refs in zip(sources, r.predictions, references)))
    write_json(out / "results.json", {"model": str(args.model), "dataset": name, "num_sources": len(sources),
                                      "num_beams": args.num_beams, "max_new_tokens": args.max_new_tokens,
                                      "rows": [r.row() for r in results]})
    write_text(out / "table.md", table)
    plot_quality_vs_layers(results, out / "quality_vs_layers.png", metric=args.metric, title=title)
    print(table)
    print(f"wrote {out / 'results.json'}, {out / 'table.md'}, {out / 'quality_vs_layers.png'} and predictions/")
    return 0
