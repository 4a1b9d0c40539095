"""The paper's experiment: decode a dataset under several schedules, score each, tabulate.

`evaluate` returns one row per schedule with Avg. Layer, R-1, R-2, R-L, BLEU-1,
BERTScore and speed; `markdown_table` prints them like the paper's tables and
`hsd_jax.plots.plot_quality_vs_layers` draws quality against layers run.

`evaluate_to_folder` is what `hsd-jax eval` and `hsd-jax demo` run: it checks every
schedule and the BERTScore backbone before decoding anything, then writes each row's
predictions and scores (and the table, plot and results.json so far) as soon as the
row exists, so an interrupted evaluation keeps its finished rows and `resume=True`
continues it. Without references (`references=None`, a test split whose references are
withheld) it is *blind*: the same decoding, predictions and resume, but no scores; the
rows (Avg. Layer, tokens/s, predictions file) go to manifest.json, for scoring elsewhere.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from pathlib import Path
from typing import Iterator, Sequence

from hsd_jax import distributed
from hsd_jax.data import encode_source
from hsd_jax.errors import HsdError
from hsd_jax.generate import generate_batched
from hsd_jax.io import write_json, write_jsonl, write_text
from hsd_jax.metrics import BertScorer, all_metrics
from hsd_jax.models.modules import LanguageModel
from hsd_jax.plots import plot_quality_vs_layers
from hsd_jax.schedules import expand_groups, resolve

METRICS = ("R-1", "R-2", "R-L", "BLEU-1", "BERTScore")
RESULTS, TABLE, PLOT, PREDICTIONS = "results.json", "table.md", "quality_vs_layers.png", "predictions"
MANIFEST = "manifest.json"  # a blind evaluation's rows, in place of results.json


@dataclasses.dataclass
class EvalResult:
    """One schedule's scores on one dataset."""

    method: str  # display name, e.g. "HSD(s=1, 0-20)"
    spec: str  # canonical schedule spec
    avg_layers: float
    scores: dict[str, float]  # keys from METRICS (BERTScore may be absent; none when blind)
    tokens_per_second: float
    predictions: list[str]

    def row(self) -> dict:
        return {"method": self.method, "spec": self.spec, "avg_layers": self.avg_layers, **self.scores,
                "tokens_per_second": self.tokens_per_second}

    @classmethod
    def from_row(cls, row: dict, predictions: list[str]) -> EvalResult:
        return cls(method=row["method"], spec=row["spec"], avg_layers=row["avg_layers"],
                   scores={m: row[m] for m in METRICS if m in row}, tokens_per_second=row["tokens_per_second"],
                   predictions=predictions)


def group_references(pairs: Sequence[tuple[str, str]]) -> tuple[list[str], list[list[str]]]:
    """Unique sources in first-seen order, each with all of its references.

    CommonGen and E2E repeat a source once per reference; the paper scores one
    prediction per source against all of them.
    """
    refs: dict[str, list[str]] = {}
    for source, target in pairs:
        refs.setdefault(source, []).append(target)
    return list(refs), list(refs.values())


def resolve_all(lm: LanguageModel, schedules: Sequence, max_new_tokens: int) -> list:
    """Every schedule (row groups such as "paper" expanded) checked against the model's depth."""
    specs = expand_groups(schedules, lm.config.num_layers)
    if not specs:
        raise HsdError("no schedules to evaluate")
    resolved = [resolve(spec, num_layers=lm.config.num_layers, max_new_tokens=max_new_tokens) for spec in specs]
    seen: dict[str, str] = {}
    for sched, spec in zip(resolved, specs):
        if sched.spec in seen:
            raise HsdError(f"schedules {seen[sched.spec]!r} and {spec!r} are the same ({sched.spec}); list it once")
        seen[sched.spec] = spec
    return resolved


def iter_evaluate(
    lm: LanguageModel,
    sources: Sequence[str],
    references: Sequence[Sequence[str]] | None,
    schedules: Sequence,
    *,
    num_beams: int = 4,
    max_new_tokens: int = 64,
    batch_size: int = 8,
    mode: str = "compiled",
    bertscorer: BertScorer | None = None,
    devices: int | None = None,
    split_processes: bool = False,
    truncate_sources: bool = False,
) -> Iterator[EvalResult]:
    """Decodes `sources` (as training prompts) under each schedule and yields its scores
    (none when `references` is None: a blind run).

    All schedules are checked before the first is decoded; BERTScore is scored when a
    `bertscorer` is given. `batch_size` is sources per device, `devices` and
    `split_processes` as in `hsd_jax.generate.iter_batches`: split over several processes,
    only process 0 yields the rows (the others decode their share of each). A source too
    long for the context with `max_new_tokens` is an HsdError naming it, before anything
    is decoded, unless `truncate_sources` cuts it from its end as training does.
    """
    if lm.tokenizer is None:
        raise HsdError("evaluation needs the model's tokenizer; load a folder with tokenizer files")
    if references is not None and len(sources) != len(references):
        raise HsdError(f"{len(sources)} sources but {len(references)} reference lists")
    if not sources:
        raise HsdError("nothing to evaluate: the dataset is empty")
    resolved = resolve_all(lm, schedules, max_new_tokens)
    room = lm.config.max_position - max_new_tokens
    if room < 2:
        raise HsdError(f"--max-new-tokens {max_new_tokens} leaves no room for a prompt in the model's "
                       f"{lm.config.max_position}-token context; lower it")
    fix = ("shorten it, lower --max-new-tokens, or pass --truncate-sources to cut long sources from their end "
           "as training does")
    prompts = [encode_source(lm.tokenizer, s, room, cut=truncate_sources, fix=fix,
                             where=f"source {i + 1} of {len(sources)} ({_preview(s)})")
               for i, s in enumerate(sources)]
    for sched in resolved:
        out = generate_batched(lm, prompts, batch_size=batch_size, desc=sched.name, schedule=sched,
                               num_beams=num_beams, max_new_tokens=max_new_tokens, mode=mode, devices=devices,
                               split_processes=split_processes)
        if out is None:  # another process's share, decoded for process 0
            continue
        texts = [t.strip() for t in out.texts]
        scores = {} if references is None else all_metrics(texts, references, bertscorer=bertscorer)
        yield EvalResult(method=sched.name, spec=sched.spec, avg_layers=out.avg_layers, scores=scores,
                         tokens_per_second=out.tokens_per_second, predictions=texts)


def evaluate(lm: LanguageModel, sources: Sequence[str], references: Sequence[Sequence[str]], schedules: Sequence,
             **options) -> list[EvalResult]:
    """Every row of `iter_evaluate`, as a list."""
    return list(iter_evaluate(lm, sources, references, schedules, **options))


# ---------------------------------------------------------------- a results folder


def data_fingerprint(sources: Sequence[str], references: Sequence[Sequence[str]] | None) -> str:
    """A hash of the sources and references: a resumed evaluation must score the same data."""
    data = [list(sources)] if references is None else [list(sources), [list(r) for r in references]]
    return hashlib.sha256(json.dumps(data).encode()).hexdigest()[:16]


def evaluate_to_folder(
    lm: LanguageModel,
    sources: Sequence[str],
    references: Sequence[Sequence[str]] | None,
    schedules: Sequence,
    output: str | Path,
    *,
    settings: dict,
    title: str,
    resume: bool = False,
    overwrite: bool = False,
    metric: str = "R-L",
    num_beams: int = 4,
    max_new_tokens: int = 64,
    batch_size: int = 8,
    mode: str = "compiled",
    bertscorer: BertScorer | None = None,
    predictions_only: bool = False,
    devices: int | None = None,
    split_processes: bool = False,
    truncate_sources: bool = False,
    provenance: dict | None = None,
) -> list[EvalResult]:
    """Runs the evaluation into `output`: results.json, table.md, the plot and one predictions
    file per schedule, all rewritten (atomically) after every finished row.

    `settings` (model, dataset, ...) is recorded with the decoding options and a fingerprint
    of the data; `resume=True` keeps the rows of an earlier run with the same settings and
    decodes only the missing ones. Without `resume`, a folder holding another evaluation is
    refused unless `overwrite=True`, which first removes that evaluation's files.
    `predictions_only=True` keeps the dataset's text out of the predictions files (see
    `prediction_rows`), for results published apart from the data.

    `references=None` makes the run blind (see the module doc): manifest.json in place of
    results.json, the table without scores and no plot; predictions files as with
    `predictions_only`. `provenance` (the weights' hash, where and when it ran) goes into the
    manifest as given, beside "model", and is not compared on --resume.

    `devices`, `split_processes` and `truncate_sources` as in `iter_evaluate`. Split over
    several processes, process 0 alone reads and writes `output` (and needs the
    `bertscorer`); the others decode their share of each row and return [].

    A resumed run keeps the finished rows of schedules it does not list (a shorter
    `schedules` than the earlier run's): they stay in results.json, the table and the plot,
    after the listed ones, though only the listed rows are returned.
    """
    out = Path(output)
    blind = references is None
    resolved = resolve_all(lm, schedules, max_new_tokens)  # fail on a bad spec before anything is written
    record = {"settings": {**settings, "num_beams": num_beams, "max_new_tokens": max_new_tokens,
                           "batch_size": batch_size, "mode": mode,
                           "bertscore": None if bertscorer is None else bertscorer.description},
              "data_fingerprint": data_fingerprint(sources, references), "num_sources": len(sources),
              "blind": blind}
    if truncate_sources:  # recorded only when set, so an earlier evaluation without the key still resumes
        record["settings"]["truncate_sources"] = True
    done: dict[str, EvalResult] = {}

    def plan() -> list[str]:
        """The specs still to decode (process 0's decision: it reads what an earlier run left)."""
        if not blind and (metric not in METRICS or (metric == "BERTScore" and bertscorer is None)):
            available = [m for m in METRICS if m != "BERTScore" or bertscorer is not None]
            raise HsdError(f"--metric {metric!r} is not among the scores computed ({', '.join(available)})")
        done.update(_previous_rows(out, record, resume, overwrite))
        return [s.spec for s in resolved if s.spec not in done]

    todo_specs = distributed.lead_decides("eval-plan", plan) if split_processes else plan()
    options = dict(num_beams=num_beams, max_new_tokens=max_new_tokens, batch_size=batch_size, mode=mode,
                   bertscorer=bertscorer, devices=devices, split_processes=split_processes,
                   truncate_sources=truncate_sources)
    if split_processes and not distributed.is_lead():
        todo = [s for s in resolved if s.spec in todo_specs]
        for _ in iter_evaluate(lm, sources, references, todo, **options) if todo else ():
            pass  # yields nothing here: the rows are process 0's
        return []
    results: dict[str, EvalResult] = {}
    listed = {s.spec for s in resolved}
    kept = [r for spec, r in done.items() if spec not in listed]  # finished rows of schedules not listed now

    def save() -> None:
        ordered = [results[s.spec] for s in resolved if s.spec in results]
        complete = len(ordered) == len(resolved)
        ordered += kept
        if blind:  # each row names its predictions file, relative to the manifest
            rows = [{**r.row(), "predictions": _predictions_path(out, r.spec).relative_to(out).as_posix()}
                    for r in ordered]
            write_json(out / MANIFEST, {"model": settings.get("model"), **(provenance or {}), **record,
                                        "complete": complete, "rows": rows})
        else:
            write_json(out / RESULTS, {**record, "complete": complete, "rows": [r.row() for r in ordered]})
            plot_quality_vs_layers({"": [r.row() for r in ordered]}, out / PLOT, metric=metric, title=title)
        write_text(out / TABLE, markdown_table(ordered, title))

    for sched in resolved:
        if sched.spec in done:
            results[sched.spec] = done[sched.spec]
    todo = [s for s in resolved if s.spec not in results]
    if results or kept:
        also = f"; {finished_rows(len(kept))} of schedules not listed now kept" if kept else ""
        print(f"resuming {out}: {len(results)} of {len(resolved)} rows done{also}", flush=True)
    rows = iter_evaluate(lm, sources, references, todo, **options) if todo else []
    for result in rows:
        write_jsonl(_predictions_path(out, result.spec),
                    prediction_rows(sources, references, result.predictions,
                                    with_data=not (predictions_only or blind)))
        results[result.spec] = result
        save()
    if not todo:
        save()
    return [results[s.spec] for s in resolved]


def prediction_rows(sources, references, predictions, *, with_data: bool = True) -> Iterator[dict]:
    """The lines of a predictions file: each source, its prediction and its references; or,
    without the data, the source's position, a hash of its text (to align it with the
    dataset again) and the prediction."""
    if references is None:
        references = [[] for _ in sources]
    for i, (source, prediction, refs) in enumerate(zip(sources, predictions, references)):
        if with_data:
            yield {"source": source, "prediction": prediction, "references": list(refs)}
        else:
            yield {"index": i, "source_sha256": source_sha256(source), "prediction": prediction}


def source_sha256(source: str) -> str:
    """What a blind predictions line names its source by: the first 16 hex digits of the
    SHA-256 of its text (the scripts that score or rescore such lines check it)."""
    return hashlib.sha256(source.encode()).hexdigest()[:16]


def finished_rows(count: int) -> str:
    """The count in words: "1 finished row", "2 finished rows" (the messages about saved rows)."""
    return f"{count} finished row{'' if count == 1 else 's'}"


def _preview(text: str, width: int = 40) -> str:
    """The start of a source, to find it in the data by."""
    text = " ".join(text.split())
    return repr(text if len(text) <= width else text[:width] + "...")


def _predictions_path(out: Path, spec: str) -> Path:
    return out / PREDICTIONS / f"{re.sub(r'[^A-Za-z0-9.]+', '-', spec).strip('-').lower()}.jsonl"


def _previous_rows(out: Path, record: dict, resume: bool, overwrite: bool) -> dict[str, EvalResult]:
    """The finished rows an earlier evaluation in `out` left (spec -> result), after the checks."""
    results_file = out / (MANIFEST if record["blind"] else RESULTS)
    other = out / (RESULTS if record["blind"] else MANIFEST)
    if out.exists() and not out.is_dir():
        raise HsdError(f"--output {out} is a file; give a folder")
    if overwrite:
        _remove_results(out)
        return {}
    if other.exists():
        kind = "a scored" if record["blind"] else "a blind"
        raise HsdError(f"--output {out} holds {kind} evaluation ({other.name}); choose another folder, or "
                       "pass --overwrite to replace it")
    if not results_file.exists():
        if resume:
            print(f"no earlier evaluation in {out}; starting a new one", flush=True)
        return {}
    if not resume:
        raise HsdError(f"--output {out} holds an earlier evaluation; pass --resume to continue it, "
                       "--overwrite to replace it, or choose another folder")
    try:
        previous = json.loads(results_file.read_text())
        rows = previous["rows"]
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise HsdError(f"{results_file} is not a readable evaluation ({err}); pass --overwrite to start over") \
            from None
    then = {**(previous.get("settings") or {}), "data": previous.get("data_fingerprint")}
    now = {**record["settings"], "data": record["data_fingerprint"]}
    changed = [key for key in now if then.get(key) != now[key]]
    if changed:
        diffs = "; ".join(f"{key}: {then.get(key)!r} then, {now[key]!r} now" for key in changed)
        raise HsdError(f"--resume must repeat the evaluation in {out} ({diffs}); pass the same options "
                       "and data, or --overwrite to start over")
    done = {}
    for row in rows:
        path = _predictions_path(out, row["spec"])
        if path.exists():  # a row counts only with its predictions
            predictions = [json.loads(line)["prediction"] for line in path.read_text().splitlines() if line]
            if len(predictions) == record["num_sources"]:
                done[row["spec"]] = EvalResult.from_row(row, predictions)
    return done


def _remove_results(out: Path) -> None:
    """Removes what an evaluation writes (and nothing else) from `out`."""
    for name in (RESULTS, MANIFEST, TABLE, PLOT):
        (out / name).unlink(missing_ok=True)
    if (out / PREDICTIONS).is_dir():
        for path in (out / PREDICTIONS).glob("*.jsonl"):
            path.unlink()


# ---------------------------------------------------------------- table and plot


def markdown_table(results: Sequence[EvalResult], title: str = "") -> str:
    """The paper's table layout: Avg. Layer then the quality metrics, one row per method,
    with the exact spec each row ran (the paper's rows are scaled to shallow models)."""
    metrics = [m for m in METRICS if results and all(m in r.scores for r in results)]
    header = ["method", "Avg. Layer", *metrics, "tokens/s", "spec"]
    lines = [f"**{title}**", ""] if title else []
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in results:
        cells = [r.method, f"{r.avg_layers:.2f}", *(f"{r.scores[m]:.2f}" for m in metrics),
                 f"{r.tokens_per_second:.1f}", f"`{r.spec}`"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
