"""The paper's experiment: decode a dataset under several schedules, score each, tabulate.

`evaluate` returns one row per schedule with Avg. Layer, R-1, R-2, R-L, BLEU-1,
BERTScore and speed; `markdown_table` prints them like the paper's tables and
`plot_quality_vs_layers` draws quality against layers run, one series per method.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Sequence

from hsd_jax.checkpoint import LanguageModel
from hsd_jax.data import encode_source
from hsd_jax.errors import HsdError
from hsd_jax.generate import generate_batched
from hsd_jax.io import atomic_path
from hsd_jax.metrics import all_metrics
from hsd_jax.schedules import resolve

METRICS = ("R-1", "R-2", "R-L", "BLEU-1", "BERTScore")


@dataclasses.dataclass
class EvalResult:
    """One schedule's scores on one dataset."""

    method: str  # display name, e.g. "HSD(s=1, 0-20)"
    spec: str  # canonical schedule spec
    avg_layers: float
    scores: dict[str, float]  # keys from METRICS (BERTScore may be absent)
    tokens_per_second: float
    predictions: list[str]

    def row(self) -> dict:
        return {"method": self.method, "spec": self.spec, "avg_layers": self.avg_layers, **self.scores,
                "tokens_per_second": self.tokens_per_second}


def group_references(pairs: Sequence[tuple[str, str]]) -> tuple[list[str], list[list[str]]]:
    """Unique sources in first-seen order, each with all of its references.

    CommonGen and E2E repeat a source once per reference; the paper scores one
    prediction per source against all of them.
    """
    refs: dict[str, list[str]] = {}
    for source, target in pairs:
        refs.setdefault(source, []).append(target)
    return list(refs), list(refs.values())


def evaluate(
    lm: LanguageModel,
    sources: Sequence[str],
    references: Sequence[Sequence[str]],
    schedules: Sequence[str],
    *,
    num_beams: int = 4,
    max_new_tokens: int = 64,
    batch_size: int = 8,
    mode: str = "compiled",
    with_bertscore: bool = True,
    bertscore_model: str | None = None,
    bertscore_layers: int | None = None,
) -> list[EvalResult]:
    """Decodes `sources` (formatted as training prompts) under each schedule and scores them."""
    if lm.tokenizer is None:
        raise HsdError("evaluation needs the model's tokenizer; load a folder with tokenizer files")
    if len(sources) != len(references):
        raise HsdError(f"{len(sources)} sources but {len(references)} reference lists")
    if not sources:
        raise HsdError("nothing to evaluate: the dataset is empty")
    room = lm.config.max_position - max_new_tokens
    prompts = [encode_source(lm.tokenizer, s, room) for s in sources]
    results = []
    for spec in schedules:
        sched = resolve(spec, num_layers=lm.config.num_layers, max_new_tokens=max_new_tokens)
        out = generate_batched(lm, prompts, batch_size=batch_size, desc=sched.name, schedule=sched,
                               num_beams=num_beams, max_new_tokens=max_new_tokens, mode=mode)
        texts = [t.strip() for t in out.texts]
        scores = all_metrics(texts, references, with_bertscore=with_bertscore, bertscore_model=bertscore_model,
                             bertscore_layers=bertscore_layers)
        results.append(EvalResult(method=sched.name, spec=sched.spec, avg_layers=out.avg_layers, scores=scores,
                                  tokens_per_second=out.tokens_per_second, predictions=texts))
    return results


def markdown_table(results: Sequence[EvalResult], title: str = "") -> str:
    """The paper's table layout: Avg. Layer then the quality metrics, one row per method."""
    metrics = [m for m in METRICS if all(m in r.scores for r in results)]
    header = ["method", "Avg. Layer", *metrics, "tokens/s"]
    lines = [f"**{title}**", ""] if title else []
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in results:
        cells = [r.method, f"{r.avg_layers:.2f}", *(f"{r.scores[m]:.2f}" for m in metrics),
                 f"{r.tokens_per_second:.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _family(method: str) -> str:
    return method.split("(")[0].strip() or method


def plot_quality_vs_layers(results: Sequence[EvalResult], path: str | Path, metric: str = "R-L",
                           title: str = "") -> Path:
    """Quality (`metric`) against Avg. Layer: one series per method family; atomic PNG."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 4))
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    families: dict[str, list[EvalResult]] = {}
    for r in results:
        families.setdefault(_family(r.method), []).append(r)
    for name, rows in families.items():
        rows = sorted(rows, key=lambda r: r.avg_layers)
        ax.plot([r.avg_layers for r in rows], [r.scores[metric] for r in rows], marker="o", label=name)
    ax.set_xlabel("Avg. Layer (layers run per generated token)")
    ax.set_ylabel(metric)
    ax.set_title(title or f"{metric} against layers run")
    ax.grid(alpha=0.3)
    ax.legend()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight")
    return Path(path)
