"""Evaluations of the same rows side by side: a table of each row's quality in each (and
as a share of each model's own vanilla), and one plot with every run's curves.

    python eval/compare_runs.py RESULTS [RESULTS ...] --labels plain schedule-aware ... --output DIR

Each RESULTS is a folder written by `hsd-jax eval` (its results.json). Rows are matched
by spec; a row that a run lacks gets a dash there. The plot draws each run in its own
colour (the first dashed), each series with its own marker (`hsd_jax.plots`).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # eval/_cli.py, when imported from elsewhere
from _cli import Parser  # noqa: E402


def _rows(folder: Path) -> dict[str, dict]:
    path = folder / "results.json"
    if not path.exists():
        sys.exit(f"compare_runs.py: {path} does not exist; run hsd-jax eval into {folder} first")
    return {r["spec"]: r for r in json.loads(path.read_text())["rows"]}


def _share(row: dict | None, vanilla: dict | None, metric: str) -> str:
    if row is None:
        return "–"
    pct = f" ({100 * row[metric] / vanilla[metric]:.1f}%)" if vanilla and vanilla[metric] else ""
    return f"{row[metric]:.2f}{pct}"


def comparison_table(runs: list[dict], labels: list[str], num_layers: int, metric: str = "R-L") -> str:
    head = " | ".join(f"Avg. Layer ({label}) | {metric} {label}" for label in labels)
    lines = [f"| row | {head} |", "|---|" + "---:|---:|" * len(runs)]
    specs = list(dict.fromkeys(spec for rows in runs for spec in rows))
    for spec in specs:
        cells = []
        for rows in runs:
            r = rows.get(spec)
            cells.append(f"{r['avg_layers']:.2f} ({100 * r['avg_layers'] / num_layers:.0f}%)" if r else "–")
            cells.append(_share(r, rows.get("vanilla"), metric))
        lines.append(f"| `{spec}` | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = Parser(__file__, description=__doc__.splitlines()[0])
    parser.add_argument("results", type=Path, nargs="+", help="hsd-jax eval output folders")
    parser.add_argument("--labels", nargs="+", help="one name per folder (default: the folders' names)")
    parser.add_argument("--layers", type=int, default=12, help="the models' depth, for the percentages (default 12)")
    parser.add_argument("--output", type=Path, required=True)
    args = parser.parse_args(argv)
    labels = args.labels or [folder.name for folder in args.results]
    if len(labels) != len(args.results):
        parser.error(f"--labels names {len(labels)} runs but {len(args.results)} folders were given")
    runs = [_rows(folder) for folder in args.results]
    from hsd_jax.io import write_text
    from hsd_jax.plots import plot_quality_vs_layers

    args.output.mkdir(parents=True, exist_ok=True)
    write_text(args.output / "comparison.md", comparison_table(runs, labels, args.layers))
    name = "_vs_".join(labels).replace("-", "_").replace(" ", "_")
    plot_quality_vs_layers(dict(zip(labels, (list(rows.values()) for rows in runs))), args.output / f"{name}.png",
                           title="R-L against layers run: " + ", ".join(labels)
                           + (f" ({labels[0]} dashed)" if len(labels) > 1 else ""))
    print(f"wrote {args.output / 'comparison.md'} and the plot")
    return 0


if __name__ == "__main__":
    sys.exit(main())
