"""Two evaluations of the same rows side by side: a table of each row's quality in both
(and as a share of each model's own vanilla), and one plot with both curves.

    python eval/compare_runs.py RESULTS_A RESULTS_B --labels plain schedule-aware --output DIR

RESULTS_A / RESULTS_B are folders written by `hsd-jax eval` (their results.json). Rows
are matched by spec; a row only one of them has is listed with a dash for the other.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


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


def comparison_table(a: dict, b: dict, labels: tuple[str, str], num_layers: int, metric: str = "R-L") -> str:
    va, vb = a.get("vanilla"), b.get("vanilla")
    lines = [f"| row | Avg. Layer ({labels[0]}) | {metric} {labels[0]} | Avg. Layer ({labels[1]}) | {metric} {labels[1]} |",
             "|---|---:|---:|---:|---:|"]
    for spec in [*a, *[s for s in b if s not in a]]:
        ra, rb = a.get(spec), b.get(spec)
        layers = [f"{r['avg_layers']:.2f} ({100 * r['avg_layers'] / num_layers:.0f}%)" if r else "–" for r in (ra, rb)]
        lines.append(f"| `{spec}` | {layers[0]} | {_share(ra, va, metric)} | {layers[1]} | {_share(rb, vb, metric)} |")
    return "\n".join(lines) + "\n"


def plot(a: dict, b: dict, labels: tuple[str, str], path: Path, metric: str = "R-L") -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from hsd_jax.evaluate import family
    from hsd_jax.io import atomic_path

    fig = Figure(figsize=(7.5, 4.8))
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    colors = {}
    for rows, label, style in ((a, labels[0], "--"), (b, labels[1], "-")):
        families: dict[str, list[dict]] = {}
        for r in rows.values():
            families.setdefault(family(r["method"]), []).append(r)
        for name, group in families.items():
            group = sorted(group, key=lambda r: r["avg_layers"])
            line, = ax.plot([r["avg_layers"] for r in group], [r[metric] for r in group], style, marker="o",
                            color=colors.get(name), label=f"{name} ({label})", alpha=0.9)
            colors.setdefault(name, line.get_color())
    ax.set_xlabel("Avg. Layer (layers run per generated token)")
    ax.set_ylabel(metric)
    ax.set_title(f"{metric} against layers run: {labels[0]} (dashed) and {labels[1]} (solid)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize=8)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("first", type=Path)
    parser.add_argument("second", type=Path)
    parser.add_argument("--labels", nargs=2, default=("first", "second"))
    parser.add_argument("--layers", type=int, default=12, help="the models' depth, for the percentages (default 12)")
    parser.add_argument("--output", type=Path, required=True)
    args = parser.parse_args(argv)
    a, b = _rows(args.first), _rows(args.second)
    labels = tuple(args.labels)
    from hsd_jax.io import write_text

    args.output.mkdir(parents=True, exist_ok=True)
    write_text(args.output / "comparison.md", comparison_table(a, b, labels, args.layers))
    plot(a, b, labels, args.output / f"{labels[0]}_vs_{labels[1]}.png".replace("-", "_"))
    print(f"wrote {args.output / 'comparison.md'} and the plot")
    return 0


if __name__ == "__main__":
    sys.exit(main())
