"""`hsd-jax demo`: the whole pipeline offline, in a few minutes on a laptop CPU.

1. writes a small data-to-text task (`hsd_jax.demo_data`: invented restaurant records
   and sentences, train and dev splits of distinct records);
2. trains a 12-layer model of the chosen family (GPT-2, or Phi: partial rotary embedding,
   attention and MLP in parallel) from random weights on it, with a byte-level BPE learned
   on the training pairs, through `hsd_jax.train` (the code path of `hsd-jax train`):
   the *plain* model;
3. fine-tunes it schedule-aware (the recipe that worked on CommonGen, scaled down: both
   paths on every batch, the skipping path distilled from the full one, at a lower
   learning rate; `train/commongen_schedule_aware_ft.sh`): the *schedule-aware* model;
4. decodes the dev records with each model under the same rows (vanilla, SkipDecode, the
   paper's HSD rows, HSD with layer 0 always run, CALM) with beam 4 and scores them through
   `hsd_jax.evaluate` (the code path of `hsd-jax eval`); then a table of the two models
   side by side, one plot with both, and a summary computed from the numbers.

The folder, `--output`:

    demo.json                        what this demo is (family, size, seed): a rerun continues it
    data/                            train.jsonl, dev.jsonl, model_config.json
    plain/model, plain/eval          the plain model (a Hugging Face folder) and its evaluation
    schedule_aware/model, .../eval   the schedule-aware model and its evaluation
    comparison.md, quality_vs_layers.png
    timings.json                     seconds per stage over all runs of the demo, the runs, and
                                     the versions and cores of the last (`environment`)

Running it again continues an interrupted demo where it stopped: training resumes from the
checkpoint Ctrl-C or SIGTERM wrote, evaluation keeps its finished rows; a finished demo
prints its results again. Nothing is downloaded. Everything follows from the seed.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import sys
import time
from pathlib import Path

from hsd_jax import demo_data
from hsd_jax.errors import HsdError
from hsd_jax.io import check_output_dir, write_json, write_text
from hsd_jax.plots import plot_quality_vs_layers

FAMILIES = ("gpt2", "phi")
MARKER = "demo.json"  # what the demo writes first: a rerun compares it, --overwrite may replace its folder
PLAIN, AWARE = "plain", "schedule_aware"  # one folder per model
COMPARISON, PLOT, TIMINGS = "comparison.md", "quality_vs_layers.png", "timings.json"
# everything a demo writes in its folder (model/ and eval/: an older demo's layout)
PARTS = (MARKER, "data", PLAIN, AWARE, COMPARISON, PLOT, TIMINGS, "model", "eval")


@dataclasses.dataclass(frozen=True)
class DemoSize:
    """How much data, model and training a demo run uses."""

    num_train: int  # training pairs (two renderings per record)
    num_dev: int  # dev records, each with `refs_per_dev` references
    refs_per_dev: int
    layers: int
    width: int
    heads: int
    vocab: int  # BPE tokens learned on the training pairs
    epochs: int  # the plain model
    batch_size: int
    learning_rate: float
    max_length: int  # tokens per training row: above the longest pair, below the 128 a longer one pads to
    aware_pairs: int  # the schedule-aware fine-tune trains on the first of the training pairs
    aware_epochs: int  # both paths on every batch
    aware_batch_size: int  # pairs a step (each trained twice, through every layer and under a schedule)
    aware_learning_rate: float
    aware_weight: float  # the schedule path's share of the fine-tune's loss (--skip-aware-prob)
    max_new_tokens: int
    eval_batch_size: int  # dev records decoded at once (times 4 beams)


# About 4 minutes on an idle 2-core CPU, either family (the README has the measured times).
# Narrow and trained longer beats wide and under-trained here: 64 wide for 4 epochs at 4e-3
# reached vanilla R-L 83 where 128 wide for 2 epochs at 2e-3 reached 64 in about the same
# time. The fine-tune (Phi, seed 0): at 5e-4 on half the pairs the paper's HSD rows kept
# 85-92% of vanilla; at 1e-3 vanilla fell 2 points; after 3 epochs of plain training it
# raised vanilla by 4 (training the plain model had not finished); 7e-4 on three quarters of
# the pairs after 4 epochs kept 93-97% with vanilla within a point.
FULL = DemoSize(num_train=3000, num_dev=40, refs_per_dev=8, layers=12, width=64, heads=4, vocab=1024,
                epochs=4, batch_size=16, learning_rate=4e-3, max_length=96, aware_pairs=2250, aware_epochs=1,
                aware_batch_size=4, aware_learning_rate=7e-4, aware_weight=0.6, max_new_tokens=64,
                eval_batch_size=40)
# Under a minute, for the tests: the same pipeline on a sliver of it.
SMOKE = DemoSize(num_train=400, num_dev=6, refs_per_dev=2, layers=12, width=32, heads=2, vocab=1024,
                 epochs=2, batch_size=16, learning_rate=3e-3, max_length=96, aware_pairs=200, aware_epochs=1,
                 aware_batch_size=16, aware_learning_rate=1e-3, aware_weight=0.6, max_new_tokens=24,
                 eval_batch_size=6)


def model_config(family: str, size: DemoSize) -> dict:
    """The config.json of the demo's random model: the family's own architecture at the demo's
    size (Phi keeps its defaults: rotary embedding on half of each head, attention and MLP in
    parallel from one LayerNorm)."""
    if family == "gpt2":
        return {"model_type": "gpt2", "n_layer": size.layers, "n_embd": size.width, "n_head": size.heads,
                "n_positions": 128, "vocab_size": size.vocab}
    if family == "phi":
        return {"model_type": "phi", "num_hidden_layers": size.layers, "hidden_size": size.width,
                "intermediate_size": 4 * size.width, "num_attention_heads": size.heads,
                "max_position_embeddings": 128, "vocab_size": size.vocab}
    raise HsdError(f"--family must be one of {', '.join(FAMILIES)}, got {family!r}")


# ---------------------------------------------------------------- the rows

PAPER_CALM_LAMBDA = 0.02  # the paper's first CALM row (its second is 0.005)
# CALM where it trades quality for layers on each family's models (per row), found by sweeping
# at seed 0. Phi's: the softmax response at lambda 0.9 and 0.6. GPT-2's lower layers are
# confidently wrong, so the softmax response exits there at any lambda (at 1: 64% of vanilla's
# R-L at 4.7 layers, 13% on the schedule-aware model); hidden-state saturation, or the
# softmax response with no exit before layer 6, trade as CALM should.
CALM_ROWS = {"gpt2": ("calm:lambda=0.995,measure=state", "calm:lambda=0.9,min_exit=6"),
             "phi": ("calm:lambda=0.9", "calm:lambda=0.6")}


def paper_hsd(size: DemoSize) -> list[str]:
    """The paper's six HSD rows, scaled to the demo's depth, as the paper runs them (warm-up 0)."""
    from hsd_jax.schedules import paper_specs

    return [s for s in paper_specs("paper", size.layers) if s.startswith("hsd:")]


def schedules(size: DemoSize, family: str) -> list[str]:
    """The rows of the demo's tables, the same for both models: vanilla; SkipDecode; the paper's
    HSD rows (layer 0 may be skipped); two of them with layer 0 always run; CALM at the paper's
    lambda and at two settings found for the family."""
    from hsd_jax.schedules import paper_specs

    skipdecode = next(s for s in paper_specs("paper", size.layers) if s.startswith("skipdecode:"))
    hsd = paper_hsd(size)
    warm = [hsd[0].replace("warmup=0", "warmup=1"), hsd[-1].replace("warmup=0", "warmup=1")]
    return ["vanilla", skipdecode, *hsd, *warm, f"calm:lambda={PAPER_CALM_LAMBDA:g}", *CALM_ROWS[family]]


def aware_schedules(size: DemoSize) -> list[str]:
    """What the schedule-aware fine-tune trains under: the paper's HSD rows and nested HSD s=2
    at lower budgets, as on CommonGen (`train/commongen_schedule_aware_ft.sh`)."""
    return [*paper_hsd(size), "hsd:s=2,min=0,max=2,T=72", "hsd:s=2,min=0,max=1,T=72"]


# ---------------------------------------------------------------- the run


@dataclasses.dataclass
class DemoResult:
    output: Path
    models: dict[str, Path]  # PLAIN / AWARE -> the model folder
    comparison: str  # the side-by-side table (markdown)
    summary: list[str]  # what the tables show, one line each
    seconds: float  # this run
    timings: dict[str, float]  # stage -> seconds, over every run of this demo (an interrupted one continued)
    total_seconds: float = 0.0  # every run of this demo
    runs: int = 1  # the runs of this demo so far, this one included
    ran_on: str = ""  # versions, device and cores of this run: the figures depend on them


def run_demo(output: str | Path, *, family: str = "gpt2", smoke: bool = False, seed: int = 0,
             overwrite: bool = False, progress: bool = True) -> DemoResult:
    """Runs (or continues) the demo in `output` and returns where things are."""
    size = SMOKE if smoke else FULL
    config = model_config(family, size)  # a bad family fails before the folder is touched
    out = _prepare(Path(output), {"family": family, "smoke": smoke, "seed": seed,
                                  "size": dataclasses.asdict(size)}, overwrite)
    clock = _Clock(out / TIMINGS)
    with clock:
        splits = demo_data.make_splits(seed=seed, num_train=size.num_train, num_dev=size.num_dev,
                                       refs_per_dev=size.refs_per_dev)
        # dev is scored from `splits`; its file is there for the user to read
        demo_data.write_splits(splits, out / "data")
        write_json(out / "data" / "model_config.json", config)

        from hsd_jax.evaluate import group_references

        sources, references = group_references(splits.dev_pairs())
        results = {}
        plain = out / PLAIN / "model"
        clock.timed("train plain", _train, plain, size, seed, progress, dict(
            model=f"random:{out / 'data' / 'model_config.json'}", tokenizer=f"bpe:{size.vocab}",
            epochs=size.epochs, batch_size=size.batch_size, learning_rate=size.learning_rate))
        results[PLAIN] = clock.timed("eval plain", _evaluate, out, PLAIN, family, size, seed, sources, references)
        aware = out / AWARE / "model"
        clock.timed("train schedule-aware", _train, aware, size, seed, progress, dict(
            model=str(plain), limit=size.aware_pairs, epochs=size.aware_epochs, batch_size=size.aware_batch_size,
            learning_rate=size.aware_learning_rate,
            skip_aware=tuple(aware_schedules(size)), skip_aware_prob=size.aware_weight, skip_aware_joint=True,
            skip_aware_distill=1.0))
        results[AWARE] = clock.timed("eval schedule-aware", _evaluate, out, AWARE, family, size, seed, sources,
                                     references)

        rows = {label: [r.row() for r in rs] for label, rs in results.items()}
        comparison = comparison_table(rows, size.layers)
        ran_on = describe(clock.environment)
        summary = summarise(rows, size, family)
        write_text(out / COMPARISON, f"**{family} demo: the plain and the schedule-aware model on "
                   f"{len(sources)} dev records, beam 4**\n\n{comparison}\n" + "\n".join(summary) + "\n\n"
                   f"Ran on {ran_on}.\n")
        plot_quality_vs_layers({shown(label): model_rows for label, model_rows in rows.items()}, out / PLOT,
                               title=f"{family} demo: R-L against layers run, plain (dashed) and schedule-aware")
    return DemoResult(output=out, models={PLAIN: plain, AWARE: aware}, comparison=comparison, summary=summary,
                      seconds=clock.seconds, timings=clock.stages, total_seconds=clock.total, runs=clock.runs,
                      ran_on=ran_on)


class _Clock:
    """The demo's timings.json: seconds per stage and in all, summed over the demo's runs (an
    interrupted demo continued reports the whole time, not its last run's), the number of
    runs, and the environment of the last (the figures depend on it). Rewritten after every
    stage and when the run ends, interrupted too."""

    def __init__(self, path: Path):
        self.path = path
        try:
            before = json.loads(path.read_text())
        except (OSError, ValueError):  # none yet (a new demo), or unreadable: counting starts here
            before = {}
        before = before if isinstance(before, dict) else {}
        self.runs = int(before.get("runs", 1)) + 1 if before else 1
        self.before_total = float(before.get("total", 0.0))
        self.stages = {k: float(v) for k, v in before.items() if isinstance(v, (int, float)) and k not in
                       ("total", "runs")}
        self.environment = environment()
        self.start = time.perf_counter()

    @property
    def seconds(self) -> float:
        return time.perf_counter() - self.start

    @property
    def total(self) -> float:
        return self.before_total + self.seconds

    def timed(self, stage: str, fn, *args):
        t0 = time.perf_counter()
        try:
            return fn(*args)
        finally:
            self.stages[stage] = round(self.stages.get(stage, 0.0) + time.perf_counter() - t0, 1)
            self.save()

    def save(self) -> None:
        write_json(self.path, {**self.stages, "total": round(self.total, 1), "runs": self.runs,
                               "environment": self.environment})

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.save()


def environment() -> dict:
    """What the demo's figures depend on besides the seed: the library versions, the device,
    and the CPU cores the process may use (XLA's thread pool sizes follow them)."""
    import importlib.metadata

    import jax

    versions = {}
    for name in ("jax", "jaxlib", "flax", "optax", "numpy"):
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    device = jax.devices()[0]
    return {**versions, "cpu_cores": cores, "device": f"{device.platform} ({device.device_kind})",
            "xla_flags": os.environ.get("XLA_FLAGS", "")}


def describe(env: dict) -> str:
    """The environment in one line."""
    versions = ", ".join(f"{name} {env[name]}" for name in ("jax", "jaxlib", "flax", "optax", "numpy")
                         if env.get(name))
    flags = f", XLA_FLAGS={env['xla_flags']}" if env.get("xla_flags") else ""
    return f"{versions}; {env['device']}, {env['cpu_cores']} CPU cores{flags}"


def _train(model: Path, size: DemoSize, seed: int, progress: bool, stage: dict) -> None:
    """One training stage into `model`, continued from its checkpoint when an earlier demo
    was interrupted there (and left alone when it finished)."""
    from hsd_jax.train import RUN_FILE, TrainConfig, train

    if model.exists() and not (model / RUN_FILE).exists():
        shutil.rmtree(model)  # stopped before its first record: nothing to continue from
    # A checkpoint only at the end: Ctrl-C / SIGTERM writes one of the step reached.
    train(TrainConfig(output=str(model), train_file=str(model.parents[1] / "data" / demo_data.TRAIN_FILE),
                      max_length=size.max_length, weight_decay=0.01, seed=seed, save_every=10**9, log_every=10,
                      progress=progress, resume=True, **stage))


def _evaluate(out: Path, label: str, family: str, size: DemoSize, seed: int, sources, references):
    from hsd_jax.models.modules import load
    from hsd_jax.evaluate import evaluate_to_folder

    lm = load(out / label / "model", layout="decode")  # it only decodes
    name = "plain" if label == PLAIN else "schedule-aware"
    title = f"{family} demo, {name} model ({size.layers} layers) on {len(sources)} dev records, beam 4"
    # the model named relative to the demo folder: the record says which of the two it was
    return evaluate_to_folder(lm, sources, references, schedules(size, family), out / label / "eval",
                              settings={"model": f"{label}/model", "dataset": "demo dev", "seed": seed},
                              title=title, num_beams=4, max_new_tokens=size.max_new_tokens,
                              batch_size=size.eval_batch_size, resume=True)


def _prepare(out: Path, record: dict, overwrite: bool) -> Path:
    """The demo's folder: new, replaced (`overwrite`), or an earlier run of the same demo to continue."""
    check_output_dir(out)
    if out.exists() and any(out.iterdir()):
        marker = out / MARKER
        if not marker.exists():
            raise HsdError(f"--output {out} is not empty and holds no demo; choose a new folder")
        if not overwrite:
            try:
                previous = json.loads(marker.read_text())
            except ValueError:
                previous = None
            if previous == record:
                print(f"continuing the demo in {out} (--overwrite starts it again)", file=sys.stderr, flush=True)
                return out
            diffs = _differences(previous, record)
            raise HsdError(f"--output {out} holds another demo ({diffs}); pass --overwrite to replace it, "
                           "or choose another --output")
        for part in PARTS:  # only what a demo writes: other files in the folder stay
            path = out / part
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / MARKER, record)
    return out


def _differences(previous, record: dict) -> str:
    if not isinstance(previous, dict):
        return f"{MARKER} is unreadable"
    changed = [key for key in record if previous.get(key) != record[key]]
    if changed == ["size"] or not changed:
        return "an earlier version's sizes"
    return "; ".join(f"{key} {previous.get(key)!r} there, {record[key]!r} now" for key in changed if key != "size")


# ---------------------------------------------------------------- what the two models show


def shown(label: str) -> str:
    """A model's name in tables and plots: its folder's name, in words."""
    return label.replace("_", "-")


def comparison_table(rows: dict[str, list[dict]], num_layers: int, metric: str = "R-L") -> str:
    """The rows of both models side by side: layers run and quality, as a share of each
    model's own vanilla."""
    labels = list(rows)
    by_spec = {label: {r["spec"]: r for r in rs} for label, rs in rows.items()}
    head = " | ".join(f"{shown(label)}: Avg. Layer | {shown(label)}: {metric}" for label in labels)
    lines = [f"| method | {head} | spec |", "|---|" + "---:|---:|" * len(labels) + "---|"]
    first = rows[labels[0]]
    for row in first:
        cells = []
        for label in labels:
            r = by_spec[label].get(row["spec"])
            vanilla = by_spec[label].get("vanilla")
            if r is None:
                cells += ["–", "–"]
                continue
            share = f" ({100 * r[metric] / vanilla[metric]:.0f}%)" if vanilla and vanilla[metric] else ""
            cells += [f"{r['avg_layers']:.2f}", f"{r[metric]:.2f}{share}"]
        lines.append(f"| {row['method']} | " + " | ".join(cells) + f" | `{row['spec']}` |")
    return "\n".join(lines) + "\n"


def summarise(rows: dict[str, list[dict]], size: DemoSize, family: str, metric: str = "R-L") -> list[str]:
    """What the tables show, from their numbers: the paper's HSD rows on each model as a share
    of its vanilla, and why CALM at the paper's lambda exits so early."""
    from hsd_jax.schedules import resolve

    paper = set(paper_hsd(size))
    L = size.layers

    def vanilla(label):
        return next(r for r in rows[label] if r["spec"] == "vanilla")[metric]

    def spread(label, keep):
        picked = [r for r in rows[label] if keep(r["spec"])]
        base = vanilla(label)
        shares = [100 * r[metric] / base if base else 0.0 for r in picked]
        layers = [r["avg_layers"] for r in picked]
        return f"{min(shares):.0f}-{max(shares):.0f}% of it at {min(layers):.1f}-{max(layers):.1f} of {L} layers"

    def warm(spec):
        return spec.startswith("hsd:") and "warmup=1" in spec

    plain, aware = vanilla(PLAIN), vanilla(AWARE)
    lines = [
        f"plain model: vanilla {metric} {plain:.1f}; the paper's HSD rows (layer 0 skipped at most steps) keep "
        f"{spread(PLAIN, paper.__contains__)}, and with layer 0 always run {spread(PLAIN, warm)}.",
        f"schedule-aware fine-tune: vanilla {metric} {aware:.1f} ({aware - plain:+.1f}); the same paper HSD rows "
        f"keep {spread(AWARE, paper.__contains__)}.",
    ]
    labels = list(rows)

    def calm_rows(spec: str) -> list[dict]:
        spec = resolve(spec, num_layers=L, max_new_tokens=size.max_new_tokens).spec
        return [next(r for r in rows[label] if r["spec"] == spec) for label in labels]

    def both(found: list[dict], value) -> str:  # one figure per model
        return " and ".join(value(label, r) for label, r in zip(labels, found))

    def layers(label, r):
        return f"{r['avg_layers']:.1f}"

    def share(label, r):  # (a vanilla at 0, a model that learned nothing, has no shares)
        return f"{100 * r[metric] / vanilla(label):.0f}%" if vanilla(label) else "n/a"

    paper_calm = f"calm:lambda={PAPER_CALM_LAMBDA:g}"
    paper_rows = calm_rows(paper_calm)
    thresholds = resolve(paper_calm, num_layers=L,
                         max_new_tokens=size.max_new_tokens).thresholds(size.max_new_tokens)
    chosen = "; ".join(f"{spec[len('calm:'):]} keeps {both(found, share)} of vanilla at {both(found, layers)} layers"
                       for spec in CALM_ROWS[family] for found in [calm_rows(spec)])
    lines.append(
        f"CALM at the paper's lambda {PAPER_CALM_LAMBDA:g} exits after {both(paper_rows, layers)} of {L} layers "
        f"({metric} {both(paper_rows, lambda label, r: f'{r[metric]:.1f}')}): each token stops at the first layer "
        f"where its top token leads the next by {thresholds.max():.3f} of probability (falling to "
        f"{thresholds.min():.3f}), which these models' lower layers already give; with settings found for them "
        f"({' and '.join(map(shown, labels))}), {chosen}.")
    return lines
