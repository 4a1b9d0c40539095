"""Retention per held-out half and per source size, from an evaluation's predictions.

    python eval/holdout_report.py RUN_DIR [RUN_DIR ...] [--dataset common_gen] [--split validation]
        [--output FILE.md]

RUN_DIR is a folder that `hsd-jax eval` (scored or --blind) or eval/score_blind.py wrote on
the whole split. Every row's predictions are scored again (R-L) on the split's two fixed
halves (`hsd_jax.data.holdout_half`: "selection", where recipes are chosen, and "report",
scored once at the end) and on the sources of each size (words in the source: CommonGen's
concepts per set), each as a share of the same run's vanilla on the same sources. Nothing
is decoded; nothing is written but --output.
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


def report(run: Path, sources: list[str], references: list[list[str]]) -> str:
    from hsd_jax.data import HALVES, holdout_half
    from hsd_jax.metrics import rouge

    results_file = run / "results.json" if (run / "results.json").exists() else run / "manifest.json"
    if not results_file.exists():
        raise SystemExit(f"holdout_report.py: {run} holds neither results.json nor manifest.json")
    rows = json.loads(results_file.read_text())["rows"]
    vanilla = next((r for r in rows if r["method"].lower().startswith("vanilla")), None)
    if vanilla is None:
        raise SystemExit(f"holdout_report.py: {results_file} has no Vanilla row to measure retention against")
    groups = {half: [i for i, s in enumerate(sources) if holdout_half(s) == half] for half in HALVES}
    for size in sorted({len(s.split()) for s in sources}):
        groups[f"size {size}"] = [i for i, s in enumerate(sources) if len(s.split()) == size]

    def rouge_l(predictions, indices):
        return rouge([predictions[i] for i in indices], [references[i] for i in indices])["rougeL"]

    base = _predictions(run, vanilla, sources)
    base_scores = {name: rouge_l(base, idx) for name, idx in groups.items()}
    header = "| row | Avg. Layer | " + " | ".join(f"{name} ({len(idx)})" for name, idx in groups.items()) + " |"
    lines = [f"### {run}", "", "R-L, and its share of vanilla's on the same sources", "", header,
             "|---|---|" + "---|" * len(groups)]
    for row in rows:
        predictions = base if row is vanilla else _predictions(run, row, sources)
        cells = []
        for name, idx in groups.items():
            score = rouge_l(predictions, idx)
            cells.append(f"{score:.2f}" if row is vanilla else f"{score:.2f} ({100 * score / base_scores[name]:.1f}%)")
        lines.append(f"| {row['method']} | {row['avg_layers']:.2f} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = Parser(__file__, description=__doc__.split("\n\n")[0],
               epilog="e.g. python eval/holdout_report.py eval/results/commongen_test/*/dev")
    p.add_argument("runs", type=Path, nargs="+", metavar="RUN_DIR", help="folders written by hsd-jax eval")
    p.add_argument("--dataset", default="common_gen", help="the named dataset the runs decoded (default: common_gen)")
    p.add_argument("--split", default="validation", help="its split, whole (default: validation)")
    p.add_argument("--output", type=Path, help="also write the tables to this Markdown file")
    args = p.parse_args(argv)
    if ":" in args.split:
        p.error(f"--split {args.split}: give the whole split; this script splits it into its halves")
    for run in args.runs:  # before the data is loaded
        if not any((run / name).is_file() for name in ("results.json", "manifest.json")):
            p.error(f"{run} holds neither results.json nor manifest.json: give a folder hsd-jax eval wrote")

    from hsd_jax.data import load_dataset_pairs
    from hsd_jax.errors import HsdError
    from hsd_jax.evaluate import group_references
    from hsd_jax.io import write_text

    try:
        sources, references = group_references(load_dataset_pairs(args.dataset, args.split, file_flag="--eval-file"))
    except HsdError as err:
        raise SystemExit(f"holdout_report.py: {err}") from None
    text = "\n".join(report(run, sources, references) for run in args.runs)
    print(text)
    if args.output:
        write_text(args.output, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
