"""Retention per held-out half and per source size, from an evaluation's predictions.

    python eval/holdout_report.py RUN_DIR [RUN_DIR ...] [--output FILE.md]

RUN_DIR is a folder that `hsd-jax eval` (scored or --blind) or eval/score_blind.py wrote,
on a whole split or on one of its halves (`--split validation:selection`); the split is
read from the run's own settings (--dataset / --split name it for a run that does not
record it; each prediction's source is checked against the split's). Every row's
predictions are scored again (R-L) on each half the run covers
(`hsd_jax.data.holdout_half`: "selection", where recipes are chosen, and "report", scored
once at the end) and on the sources of each size (words in the source: CommonGen's
concepts per set), each as a share of the same run's vanilla on the same sources.

Then one line a run and half gives the figures the choice of a recipe is made on
(docs/holdout.md, "Choosing"): vanilla's R-L, the lowest share kept by the paper's HSD
rows, the lowest by those of them at no more than 60% of the layers, the best share of any
row at no more than 40% of them, each on the whole half and on its sources of 4 words or
more. Nothing is decoded; nothing is written but --output.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # eval/_cli.py, when imported from elsewhere
from _cli import Parser  # noqa: E402


def _predictions(run: Path, row: dict, sources: list[str]) -> list[str]:
    """The row's predictions in the order of `sources`, after checking each line's source."""
    from hsd_jax.evaluate import _predictions_path, source_sha256

    path = _predictions_path(run, row["spec"])
    lines = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]
    if len(lines) != len(sources):
        raise SystemExit(f"holdout_report.py: {path} has {len(lines)} predictions, the split {len(sources)} sources; "
                         "give a run on the whole split")
    for i, (line, source) in enumerate(zip(lines, sources)):
        if "source" in line:
            same = " ".join(line["source"].split()) == " ".join(source.split())
        else:  # a blind run's line: its index and the first 16 hex digits of its source's SHA-256
            same = line.get("index") == i and line.get("source_sha256") == source_sha256(source)
        if not same:
            raise SystemExit(f"holdout_report.py: line {i + 1} of {path} is not for source {i + 1} of the split")
    return [line["prediction"] for line in lines]


LONG = 4  # "long" sources have this many words or more: the blind test's sets average 4.50, dev's 3.76


def run_split(results: dict, dataset: str, split: str) -> tuple[str, str]:
    """(dataset, split) a run decoded: from its settings ("common_gen/validation:selection"),
    else the flags."""
    recorded = results.get("settings", {}).get("dataset", "")
    if "/" in recorded:
        name, _, recorded_split = recorded.rpartition("/")
        return name, recorded_split
    return dataset, split


def report(run: Path, results: dict, sources: list[str], references: list[list[str]]) -> tuple[str, list[str]]:
    """(the run's table by half and size, its summary lines: one per half it covers)."""
    from hsd_jax.data import HALVES, holdout_half
    from hsd_jax.metrics import rouge
    from hsd_jax.schedules import paper_specs

    rows = results["rows"]
    vanilla = next((r for r in rows if r["method"].lower().startswith("vanilla")), None)
    if vanilla is None:
        raise SystemExit(f"holdout_report.py: {run} has no Vanilla row to measure retention against")
    halves = {half: [i for i, s in enumerate(sources) if holdout_half(s) == half] for half in HALVES}
    groups = {half: idx for half, idx in halves.items() if idx}  # a run on one half covers that one
    for size in sorted({len(s.split()) for s in sources}):
        groups[f"size {size}"] = [i for i, s in enumerate(sources) if len(s.split()) == size]
    for half, idx in halves.items():
        long = [i for i in idx if len(sources[i].split()) >= LONG]
        if long:
            groups[f"{half}, size {LONG}+"] = long

    def rouge_l(predictions, indices):
        return rouge([predictions[i] for i in indices], [references[i] for i in indices])["rougeL"]

    base = _predictions(run, vanilla, sources)
    base_scores = {name: rouge_l(base, idx) for name, idx in groups.items()}
    kept = {}  # spec -> group -> share of vanilla (%)
    header = "| row | Avg. Layer | " + " | ".join(f"{name} ({len(idx)})" for name, idx in groups.items()) + " |"
    lines = [f"### {run}", "", "R-L, and its share of vanilla's on the same sources", "", header,
             "|---|---|" + "---|" * len(groups)]
    for row in rows:
        predictions = base if row is vanilla else _predictions(run, row, sources)
        cells = []
        for name, idx in groups.items():
            score = rouge_l(predictions, idx)
            kept.setdefault(row["spec"], {})[name] = 100 * score / base_scores[name]
            cells.append(f"{score:.2f}" if row is vanilla else f"{score:.2f} ({kept[row['spec']][name]:.1f}%)")
        lines.append(f"| {row['method']} | {row['avg_layers']:.2f} | " + " | ".join(cells) + " |")

    depth = vanilla["avg_layers"]
    paper_hsd = [r for r in rows if r["spec"] in paper_specs("paper", round(depth)) and r["spec"].startswith("hsd")]
    within_60 = [r for r in paper_hsd if r["avg_layers"] <= 0.6 * depth]
    within_40 = [r for r in rows if r is not vanilla and r["avg_layers"] <= 0.4 * depth]

    def cell(chosen, pick, group):
        if not chosen or group not in groups:
            return "-"
        best = pick(chosen, key=lambda r: kept[r["spec"]][group])
        return f"{kept[best['spec']][group]:.1f}% ({best['method']})"

    summary = []
    for half in (h for h in HALVES if h in groups):
        long = f"{half}, size {LONG}+"
        summary.append(f"| {run} | {half} | {base_scores[half]:.2f} | " + " | ".join(
            f"{cell(chosen, pick, half)} / {cell(chosen, pick, long)}"
            for chosen, pick in ((paper_hsd, min), (within_60, min), (within_40, max))) + " |")
    return "\n".join(lines) + "\n", summary


SUMMARY_HEAD = (f"### Choosing (docs/holdout.md): whole half / its sources of {LONG}+ words\n\n"
                "| run | half | vanilla R-L | paper HSD rows, lowest kept | those at <= 60% of the layers, "
                "lowest kept | best row at <= 40% of the layers |\n|---|---|---|---|---|---|")


def main(argv: list[str] | None = None) -> int:
    p = Parser(__file__, description=__doc__.split("\n\n")[0],
               epilog="e.g. python eval/holdout_report.py eval/results/commongen_test/*/dev")
    p.add_argument("runs", type=Path, nargs="+", metavar="RUN_DIR", help="folders written by hsd-jax eval")
    p.add_argument("--dataset", default="common_gen",
                   help="the named dataset of a run that does not record it (default: common_gen)")
    p.add_argument("--split", default="validation",
                   help="its split, whole or a half (default: validation; each line's source is checked)")
    p.add_argument("--output", type=Path, help="also write the tables to this Markdown file")
    args = p.parse_args(argv)
    runs = {}  # run -> its results.json (or a blind run's manifest.json), read before any data is loaded
    for run in args.runs:
        found = next((run / name for name in ("results.json", "manifest.json") if (run / name).is_file()), None)
        if found is None:
            p.error(f"{run} holds neither results.json nor manifest.json: give a folder hsd-jax eval wrote")
        runs[run] = json.loads(found.read_text())

    from hsd_jax.data import load_dataset_pairs
    from hsd_jax.errors import HsdError
    from hsd_jax.evaluate import group_references
    from hsd_jax.io import write_text

    loaded = {}
    tables, summary = [], []
    for run, results in runs.items():
        key = run_split(results, args.dataset, args.split)
        if key not in loaded:
            try:
                loaded[key] = group_references(load_dataset_pairs(*key, file_flag="--eval-file"))
            except HsdError as err:
                raise SystemExit(f"holdout_report.py: {err}") from None
        table, lines = report(run, results, *loaded[key])
        tables.append(table)
        summary += lines
    text = "\n".join(tables) + "\n" + SUMMARY_HEAD + "\n" + "\n".join(summary) + "\n"
    print(text)
    if args.output:
        write_text(args.output, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
