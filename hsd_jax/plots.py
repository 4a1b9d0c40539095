"""Quality against layers run: the one plot of an evaluation, a demo and a comparison of runs.

A row is a dict with "method", "spec", "avg_layers" and the metric (an `EvalResult.row()`).
Rows fall in *series* (`series`): vanilla, SkipDecode, and HSD by stride and warm-up, each
a sweep of one method over its budget, drawn as a joined curve; CALM's rows differ in their
settings (lambda, measure, first exit), not in one budget, so they are labelled points.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Mapping, Sequence

CALM = "CALM"
# One marker per series, none alike.
MARKERS = {"Vanilla": "*", "SkipDecode": "s", "HSD, s=1": "o", "HSD, s=2": "v", "HSD w=1, s=1": "P",
           "HSD w=1, s=2": "X", CALM: "^"}


def series(method: str) -> str:
    """The series of a row's method ("HSD(s=2, 0-4, w=1)" -> "HSD w=1, s=2")."""
    name = method.split("(")[0].strip() or method
    warmup = re.search(r"w=(\d+)", method)
    stride = re.search(r"HSD\(s=(\d+)", method)
    if stride:
        return f"HSD{f' w={warmup.group(1)}' if warmup else ''}, s={stride.group(1)}"
    return f"{name}, w={warmup.group(1)}" if warmup else name


def calm_label(spec: str) -> str:
    """A CALM point's label: the settings of its spec that are not CALM's defaults."""
    from hsd_jax.schedules import _KEYS

    def default(part: str) -> bool:
        key, _, value = part.partition("=")
        kind, fallback = _KEYS["calm"].get(key, (str, None))
        return kind(value) == fallback

    return ", ".join(p for p in spec.removeprefix("calm:").split(",") if not default(p)).replace("lambda=", "λ=")


def plot_quality_vs_layers(models: Mapping[str, Sequence[dict]], path: str | Path, metric: str = "R-L",
                           title: str = "") -> Path:
    """`metric` against Avg. Layer for one model or several ({label: rows}), as an atomic PNG.

    One model: a colour per series. Several: a colour per model (the first dashed), a marker
    per series, a legend of each. Each model's vanilla is also a dotted line across."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    from hsd_jax.io import atomic_path

    fig = Figure(figsize=(7.5, 4.8))
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    several = len(models) > 1
    seen: dict[str, str] = {}  # series -> its colour when there is one model
    for i, (label, rows) in enumerate(models.items()):
        style = "--" if several and i == 0 else "-"
        groups: dict[str, list[dict]] = {}
        for r in rows:
            groups.setdefault(series(r["method"]), []).append(r)
        for name, group in groups.items():
            color = f"C{i}" if several else f"C{len(seen)}"
            seen.setdefault(name, color)
            group = sorted(group, key=lambda r: r["avg_layers"])
            ax.plot([r["avg_layers"] for r in group], [r[metric] for r in group],
                    linestyle="none" if name == CALM else style, color=color, marker=MARKERS.get(name, "o"),
                    markersize=7, alpha=0.85)
            if name == CALM:
                for r in group:
                    ax.annotate(calm_label(r["spec"]), (r["avg_layers"], r[metric]), textcoords="offset points",
                                xytext=(5, 4), fontsize=6, color=color)
            if name == "Vanilla":  # the quality every other row of this model is measured against
                ax.axhline(group[0][metric], color=color, linestyle=":", linewidth=1, alpha=0.7)
    kinds = [Line2D([], [], color="0.4" if several else color, linestyle="", marker=MARKERS.get(name, "o"),
                    label=f"{name} (points)" if name == CALM else name) for name, color in seen.items()]
    ax.set_xlabel("Avg. Layer (layers run per generated token)")
    ax.set_ylabel(metric)
    ax.set_title(title or f"{metric} against layers run", fontsize=10)
    ax.grid(alpha=0.3)
    if several:  # beside the axes, so they never hide a point or a label
        ax.add_artist(ax.legend(handles=[Line2D([], [], color=f"C{i}", linestyle="--" if i == 0 else "-",
                                                label=label) for i, label in enumerate(models)],
                                loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize=8, title="model",
                                title_fontsize=8))
    if kinds:
        ax.legend(handles=kinds, loc="upper left", bbox_to_anchor=(1.02, 0.72 if several else 1.0), fontsize=8,
                  title="rows", title_fontsize=8)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight")
    return Path(path)
