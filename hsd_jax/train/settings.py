"""The settings of a training run: `TrainConfig`, one `setting` per field.

Each field's metadata holds its help, the details of its `hsd-jax train` flag (the CLI
builds its flags from the fields, hsd_jax/commands/train.py) and what a resume does with it
(`RUN_SETTINGS`, recorded in OUTPUT/run.json by `_run_settings`: each must be repeated, but
for `RESUME_MAY_CHANGE`, the optimiser's settings).
`_check_config` refuses values that would fail late or train wrongly, before any work.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

from hsd_jax import data as data_lib
from hsd_jax.errors import HsdError
from hsd_jax.io import check_output_dir


def setting(default: Any = dataclasses.MISSING, *, help: str, resume: bool | str = False, metavar: str | None = None,
            shown_default: str | None = None, choices: tuple | None = None, nargs: str | None = None,
            sep: str | None = None, one_of: str | None = None, example: str | None = None):
    """A `TrainConfig` field and what `hsd-jax train` makes of it (hsd_jax/commands/train.py).

    The flag is `--` + the name with `-` for `_` (a bool that defaults to True is turned off
    by `--no-NAME`, its help then reads "no " + help); its type is the field's annotation.
      help           what the setting does (the flag's help; the CLI adds "(default: ...)")
      resume         True: run.json records it and a `--resume` must repeat it; "may change":
                     run.json records it and a `--resume` may change it (saying so), for the
                     optimiser's settings, which a run that diverged needs to change
      metavar        the flag's value in `--help`
      shown_default  the default as `--help` words it, where the value (None) does not say
      choices        the values the flag accepts
      nargs          "+": the flag takes one or more values (a tuple)
      sep            the flag takes one string of values separated by `sep` (a tuple)
      example        a value of a `sep` list, named when the list is empty
      one_of         a group of settings of which the command line needs exactly one
    """
    metadata = dict(help=help, resume=resume, metavar=metavar, shown_default=shown_default, choices=choices,
                    nargs=nargs, sep=sep, one_of=one_of, example=example)
    return dataclasses.field(default=default, metadata=metadata)


@dataclasses.dataclass
class TrainConfig:
    """Every setting of a run. Each field is a `setting`: its metadata is the help and the
    details of its `hsd-jax train` flag (`batch_size` -> `--batch-size`), and whether a
    `--resume` must repeat it (`RUN_SETTINGS`, `RESUME_MAY_CHANGE`)."""

    model: str = setting(
        help="Hugging Face folder or hub id; or random:gpt2|gpt2-medium|gpt2-large|gpt2-xl|CONFIG.json for random "
        "GPT-2 weights (needs --tokenizer; the config's vocab_size may exceed the tokenizer's)",
        resume=True, metavar="M")
    output: str = setting(help="run folder; ends as a Hugging Face model folder", metavar="DIR")
    tokenizer: str | None = setting(
        None, help="tokenizer folder or hub id; bpe:N learns a byte-level BPE of N tokens on the training pairs "
        "and saves it with the model (for random weights)", resume=True, metavar="DIR", shown_default="the model's")
    dataset: str | None = setting(None, help=f"a known dataset: {', '.join(data_lib.DATASETS)}", resume=True,
                                  metavar="NAME", one_of="data")
    split: str = setting("train", help="split of --dataset", resume=True)
    train_file: str | None = setting(None, help="local .jsonl / .json / .csv / .tsv of pairs", resume=True,
                                     metavar="FILE", one_of="data")
    source_field: str | None = setting(
        None, help="source field of --train-file and --eval-file (a named dataset has its own)", resume=True,
        metavar="F", shown_default="source")
    target_field: str | None = setting(
        None, help="target field of --train-file and --eval-file; a list gives one pair per reference",
        resume=True, metavar="F", shown_default="target")
    limit: int | None = setting(None, help="use only the first N training pairs", resume=True, metavar="N",
                                shown_default="all")
    eval_file: str | None = setting(None, help="validation pairs for a periodic validation loss", metavar="FILE",
                                    shown_default="none")
    eval_split: str | None = setting(None, help="validation split of --dataset (e.g. validation)", metavar="SPLIT",
                                     shown_default="none")
    eval_every: int = setting(0, help="steps between validation losses, when validation data is given",
                              metavar="N", shown_default="0, only at the end")
    eval_limit: int | None = setting(None, help="use only the first N validation pairs", metavar="N",
                                     shown_default="all")
    mode: str = setting("full", help="what trains: every weight, or LoRA adapters", resume=True,
                        choices=("full", "lora"))
    epochs: int = setting(3, help="passes over the data; the schedule spans them", resume=True, metavar="N")
    batch_size: int = setting(8, help="global batch size, all devices", resume=True, metavar="B")
    learning_rate: float = setting(
        5e-5, help="peak AdamW learning rate, reached after warm-up (6% of the schedule unless --warmup-steps) "
        "and decayed linearly to 0", resume="may change", metavar="LR", shown_default="5e-5")
    weight_decay: float = setting(0.0, help="AdamW decoupled weight decay on kernels and embeddings (not biases, "
                                  "norm scales)", resume="may change", metavar="W")
    warmup_steps: int | None = setting(
        None, help="linear warm-up steps from 0 to --learning-rate; a short run may never leave warm-up (the "
        "progress bar and summary show the rate)", resume="may change", metavar="N",
        shown_default="6% of the schedule")
    max_grad_norm: float = setting(1.0, help="global-norm clipping", resume="may change", metavar="G")
    max_steps: int | None = setting(None, help="stop after N steps; the learning-rate schedule still spans --epochs",
                                    metavar="N", shown_default="the end of --epochs")
    max_length: int | None = setting(None, help="tokens per row", resume=True, metavar="T",
                                     shown_default="the model's context")
    lora_rank: int = setting(16, help="LoRA rank r", resume=True, metavar="R")
    lora_alpha: float = setting(32.0, help="LoRA alpha; updates scale by alpha/r", resume=True, metavar="A")
    lora_targets: tuple[str, ...] | None = setting(
        None, help="comma-separated projections, e.g. attn.c_attn,c_proj or q_proj,v_proj", resume=True,
        metavar="LIST", shown_default="every attention and MLP projection", sep=",", example="attn.c_attn,mlp.c_fc")
    seed: int = setting(0, help="data order, initialisation and --skip-aware draws seed", resume=True, metavar="S")
    bf16: bool = setting(False, help="compute in bfloat16 (float32 master weights and loss)", resume=True)
    # Schedule-aware training: each batch trains under one of these schedules, drawn at
    # random, with probability skip_aware_prob, and the full model otherwise (`skip_aware_active`).
    skip_aware: tuple[str, ...] | None = setting(
        None, help="schedule-aware training: train some batches under these skip schedules (specs, presets, masks, "
        "or the group paper), so the model stays good when decoding skips layers; each batch draws one at random "
        "or trains the full model", resume=True, metavar="SPEC", nargs="+", shown_default="none")
    skip_aware_prob: float = setting(
        0.5, help="share of batches trained under a --skip-aware schedule, the rest train every layer (in "
        "joint training, the weight of the schedule's loss)", resume=True, metavar="P")
    # Joint: each batch trains both paths, the full model and one drawn schedule, as two
    # copies of its rows (`_add_skip_schedule`): the same expected loss as drawing one, with
    # every batch's gradient for each path, at twice the compute per step.
    skip_aware_joint: bool = setting(
        False, help="each batch trains both the full model and one drawn schedule (loss: (1 - P) x full + "
        "P x schedule; twice the compute per step) instead of one or the other", resume=True)
    skip_aware_distill: float = setting(
        0.0, help="joint training: the share of the schedule's loss that matches the full model's predicted "
        "distribution instead of the reference token (distils the full model into the skipping path)", resume=True,
        metavar="D")
    # What the schedule's copy of a joint batch computes (`objective.token_nll`): "decode" is
    # plain skip decoding, every position under the schedule; "draft" is a self-speculative
    # draft step, each position under the schedule over the full model's K/V of the earlier
    # ones (`models.draft_forward`), what `generate(draft=...)` runs; "both" averages the two.
    skip_aware_view: str = setting(
        "decode", help="joint training: train the schedule's copy as skip decoding runs it (decode: earlier "
        "positions skipped too), as a self-speculative draft does (draft: earlier positions from the full "
        "model), or both (the mean of the two losses, 1.5x the compute)", resume=True,
        choices=("decode", "draft", "both"))
    resume: bool = setting(False, help="continue the run in --output from its last checkpoint")
    devices: int | None = setting(None, help="use only the first N local devices (one process)", metavar="N",
                                  shown_default="all")
    log_every: int = setting(1, help="steps between log lines", metavar="N")
    save_every: int = setting(500, help="steps between checkpoints; one is always written at the end", metavar="N")
    keep_checkpoints: int = setting(2, help="checkpoints kept, at least 1", metavar="N")
    progress: bool = setting(True, help="progress bar on process 0 (a plain line every 10 s in a log)")


# The settings run.json records; a --resume must repeat them, but for RESUME_MAY_CHANGE.
RUN_SETTINGS = tuple(f.name for f in dataclasses.fields(TrainConfig) if f.metadata["resume"])
# The optimiser's: their state (Adam's moments, the step) does not depend on them, so a run
# whose loss became nan continues from its last checkpoint at a lower learning rate.
RESUME_MAY_CHANGE = tuple(f.name for f in dataclasses.fields(TrainConfig) if f.metadata["resume"] == "may change")
# The settings that may name a file or folder (else a hub id, a preset, bpe:N).
PATH_SETTINGS = ("model", "tokenizer", "train_file")


@dataclasses.dataclass
class TrainResult:
    output: Path
    steps: int  # the step the run ended at
    losses: dict[int, float]  # step -> training loss, for the steps this call ran
    eval_losses: dict[int, float]
    num_train_pairs: int
    trainable_params: int
    learning_rates: dict[int, float] = dataclasses.field(default_factory=dict)  # step -> its learning rate
    schedule_steps: int = 0  # the steps `epochs` make
    warmup_steps: int = 0
    already_done: bool = False  # a resume that found the run at its last step, model written: nothing ran


def input_path(value: str | None) -> tuple[str, Path] | None:
    """(prefix, path) when a `PATH_SETTINGS` value names an existing file or folder: the
    value itself, or a `random:` config.json (prefix "random:"); None for a hub id, a preset, bpe:N."""
    if not value:
        return None
    prefix = "random:" if value.startswith("random:") else ""
    path = Path(value[len(prefix):])
    found = path.is_file() if prefix else path.exists()  # random:gpt2 is a preset, whatever ./gpt2 is
    return (prefix, path) if found else None


def _run_settings(cfg: TrainConfig) -> dict:
    settings = {k: getattr(cfg, k) for k in RUN_SETTINGS}
    for key in PATH_SETTINGS:  # the same file, wherever the run is started from
        found = input_path(settings[key])
        if found and not found[0]:  # (random:CONFIG as given, as runs have always recorded it)
            settings[key] = str(found[1].resolve())
    if settings["lora_targets"] is not None:
        settings["lora_targets"] = list(settings["lora_targets"])
    if settings["skip_aware_view"] == "decode":
        settings["skip_aware_view"] = None  # recorded only when not the default, as the two below
    for key in ("skip_aware_joint", "skip_aware_distill"):
        if not settings[key]:
            settings[key] = None  # recorded only when set, so runs from before the flag still resume
    if settings["skip_aware"] is None:
        settings["skip_aware_prob"] = None  # meaningless without schedules (and absent from older runs)
    else:
        settings["skip_aware"] = list(settings["skip_aware"])
    return settings


def _check_config(cfg: TrainConfig) -> None:
    for field in dataclasses.fields(TrainConfig):  # the flag's choices hold for a TrainConfig made in Python too
        choices = field.metadata["choices"]
        if choices and getattr(cfg, field.name) not in choices:
            allowed = ", ".join(choices[:-1]) + " or " + choices[-1]
            raise HsdError(f"--{field.name.replace('_', '-')} must be {allowed}, got {getattr(cfg, field.name)!r}")
    for name in ("epochs", "batch_size", "log_every", "save_every"):
        if getattr(cfg, name) < 1:
            raise HsdError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(cfg, name)}")
    # 0 must not mean "all" (--limit 0, --max-length 0) nor -1 "all but the last" (pairs[:-1]).
    for name in ("max_steps", "limit", "eval_limit", "max_length", "lora_rank", "devices"):
        value = getattr(cfg, name)
        if value is not None and value < 1:
            raise HsdError(f"--{name.replace('_', '-')} must be at least 1, got {value}")
    if not 0 <= cfg.seed < 2**63:  # numpy's and JAX's generators take non-negative 64-bit seeds
        raise HsdError(f"--seed must be a whole number from 0 to 2**63 - 1, got {cfg.seed}")
    for name in ("eval_every", "warmup_steps"):
        value = getattr(cfg, name)
        if value is not None and value < 0:
            raise HsdError(f"--{name.replace('_', '-')} must be 0 or more, got {value}")
    # A negative learning rate climbs the loss, a negative clip norm flips the gradient: both
    # would train without an error, so they are refused with nan and inf.
    for name, least in (("learning_rate", "above 0"), ("max_grad_norm", "above 0"), ("lora_alpha", "above 0"),
                        ("weight_decay", "0 or more")):
        value = getattr(cfg, name)
        if not math.isfinite(value) or value < 0 or (value == 0 and least == "above 0"):
            raise HsdError(f"--{name.replace('_', '-')} must be a number {least}, got {value}")
    if cfg.keep_checkpoints < 1:  # with none kept, a later --resume would start over and overwrite the model
        raise HsdError(f"--keep-checkpoints must be at least 1, got {cfg.keep_checkpoints}: a run without "
                       "a checkpoint cannot be resumed")
    if cfg.skip_aware is not None:
        if not cfg.skip_aware:
            raise HsdError("--skip-aware needs at least one schedule spec, e.g. --skip-aware paper hsd:s=1,min=0,max=2")
        if not (math.isfinite(cfg.skip_aware_prob) and 0 < cfg.skip_aware_prob <= 1):
            raise HsdError(f"--skip-aware-prob must be above 0 and at most 1 (the share of batches trained under "
                           f"a schedule), got {cfg.skip_aware_prob}")
        if cfg.skip_aware_joint and cfg.skip_aware_prob == 1:
            raise HsdError("--skip-aware-joint with --skip-aware-prob 1 would give the full model's copy no weight; "
                           "give a weight below 1, or drop --skip-aware-joint to train under schedules only")
    elif cfg.skip_aware_joint:
        raise HsdError("--skip-aware-joint needs the schedules to train under: add --skip-aware SPEC [SPEC ...]")
    if not (math.isfinite(cfg.skip_aware_distill) and 0 <= cfg.skip_aware_distill <= 1):
        raise HsdError(f"--skip-aware-distill must be from 0 to 1 (the share of the schedule's loss taken from "
                       f"the full model's predictions), got {cfg.skip_aware_distill}")
    if cfg.skip_aware_view != "decode" and not cfg.skip_aware_joint:
        raise HsdError(f"--skip-aware-view {cfg.skip_aware_view} needs --skip-aware-joint: the draft attends to "
                       "the K/V of the batch's full-model copy")
    if cfg.skip_aware_distill and not cfg.skip_aware_joint:
        raise HsdError("--skip-aware-distill needs --skip-aware-joint: the full model's predictions come from "
                       "the batch's full-model copy")
    if Path(cfg.output).exists() and not Path(cfg.output).is_dir():
        raise HsdError(f"--output {cfg.output} is a file; give a folder")
    check_output_dir(cfg.output)  # under a file, in /proc, not writable: before any work
