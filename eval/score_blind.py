"""Scores a blind evaluation (`hsd-jax eval --blind`: manifest.json and predictions, no scores)
once references are at hand, into the folder layout `hsd-jax eval` writes (results.json,
table.md, the plot), so eval/compare_runs.py reads it like any other.

    python eval/score_blind.py BLIND_DIR --dataset common_gen --split validation --output DIR \
        [--bertscore-model PATH --bertscore-layers 6]
    python eval/score_blind.py BLIND_DIR --eval-file pairs.jsonl --output DIR

The references are grouped per source as `hsd-jax eval` groups them; each prediction line is
checked against its source (index and the hash of its text) before anything is scored.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # eval/_cli.py, when imported from elsewhere
from _cli import Parser  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = Parser(__file__, description=__doc__.split("\n\n")[0])
    p.add_argument("blind", type=Path, help="a folder written by hsd-jax eval --blind")
    refs = p.add_mutually_exclusive_group(required=True)
    refs.add_argument("--dataset", help="a named dataset (hsd-jax eval's --dataset)")
    refs.add_argument("--eval-file", type=Path, help="a local file of source/target pairs")
    p.add_argument("--split", default="validation")
    p.add_argument("--source-field")
    p.add_argument("--target-field")
    p.add_argument("--bertscore-model", help="bert-score model name or local folder (default: no BERTScore)")
    p.add_argument("--bertscore-layers", type=int)
    p.add_argument("--title", help="the table's title (default: the blind run's model folder name)")
    p.add_argument("--output", type=Path, required=True)
    args = p.parse_args(argv)

    from hsd_jax.errors import HsdError, os_error_text

    try:
        return score(args)
    except (HsdError, OSError) as err:  # one line, as hsd-jax's own errors
        print(f"{p.prog}: error: {err if isinstance(err, HsdError) else os_error_text(err)}", file=sys.stderr)
        return 2


def score(args) -> int:
    from hsd_jax.data import DATASETS, load_dataset_pairs, read_pairs
    from hsd_jax.errors import HsdError
    from hsd_jax.evaluate import (MANIFEST, PLOT, PREDICTIONS, RESULTS, TABLE, EvalResult, data_fingerprint,
                                  group_references, markdown_table, source_sha256)
    from hsd_jax.io import write_json, write_text
    from hsd_jax.plots import plot_quality_vs_layers
    from hsd_jax.metrics import BertScorer, all_metrics

    spec = DATASETS.get(args.dataset)
    if spec is not None and spec.local_sources is not None and args.split.partition(":")[0] == "test":
        # a split the project reads the sources of only (hsd-jax eval --blind): no references anywhere here
        raise HsdError(f"the {args.dataset} test references are withheld: the test set is scored outside the "
                       "project (its leaderboard), so there is nothing to score against here; score a run of "
                       "--split validation, or pass references you hold as --eval-file")
    if not (args.blind / MANIFEST).is_file():
        raise HsdError(f"{args.blind} has no {MANIFEST}; give a folder written by hsd-jax eval --blind")
    manifest = json.loads((args.blind / MANIFEST).read_text())
    pairs = load_dataset_pairs(args.dataset, args.split, file_flag="--eval-file") if args.dataset \
        else read_pairs(args.eval_file, args.source_field, args.target_field)
    name = f"{args.dataset}/{args.split}" if args.dataset else args.eval_file.name
    sources, references = group_references(pairs)
    if manifest["num_sources"] != len(sources):
        raise HsdError(f"{args.blind} holds {manifest['num_sources']} predictions per row, "
                       f"{name} has {len(sources)} sources")
    hashes = [source_sha256(s) for s in sources]
    scorer = BertScorer(args.bertscore_model, args.bertscore_layers) if args.bertscore_model else None
    results = []
    for row in manifest["rows"]:
        lines = [json.loads(line) for line in (args.blind / row["predictions"]).read_text().splitlines() if line]
        if [(x["index"], x["source_sha256"]) for x in lines] != list(enumerate(hashes)):
            raise HsdError(f"{row['predictions']} is not aligned with {name}")
        predictions = [x["prediction"] for x in lines]
        scores = all_metrics(predictions, references, bertscorer=scorer)
        results.append(EvalResult(method=row["method"], spec=row["spec"], avg_layers=row["avg_layers"],
                                  scores=scores, tokens_per_second=row["tokens_per_second"],
                                  predictions=predictions))
        print(f"{row['method']}: R-L {scores['R-L']:.2f}", flush=True)
    out = args.output
    (out / PREDICTIONS).mkdir(parents=True, exist_ok=True)
    if out.resolve() != args.blind.resolve():
        for row in manifest["rows"]:
            shutil.copyfile(args.blind / row["predictions"], out / row["predictions"])
    title = args.title or f"{Path(str(manifest['model'])).name} on {name} " \
                          f"({len(sources)} sources, beam {manifest['settings']['num_beams']})"
    settings = {**manifest["settings"], "dataset": name,
                "bertscore": None if scorer is None else scorer.description}
    write_json(out / RESULTS, {"settings": settings, "data_fingerprint": data_fingerprint(sources, references),
                               "num_sources": len(sources), "blind": False, "scored_from": MANIFEST,
                               "complete": manifest["complete"], "rows": [r.row() for r in results]})
    write_text(out / TABLE, markdown_table(results, title))
    plot_quality_vs_layers({"": [r.row() for r in results]}, out / PLOT, title=title)
    print(markdown_table(results, title))
    return 0


if __name__ == "__main__":
    sys.exit(main())
