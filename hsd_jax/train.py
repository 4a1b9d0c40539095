"""Fine-tuning (full or LoRA) and from-scratch training with Optax and Orbax.

    from hsd_jax.train import TrainConfig, train
    result = train(TrainConfig(model="gpt2", train_file="pairs.jsonl", mode="lora", output="runs/x"))

What a run does, in order:
  1. locks the output folder for its lifetime (a second run into it is refused) and checks
     it: a folder holding another run needs `resume=True`;
  2. loads the model (a Hugging Face folder / hub id, or `random:<preset|config.json>`
     for weights drawn at random by the model family's initialiser: GPT-2 sizes, or a
     GPT-2 or Phi config.json) and its tokenizer;
  3. reads and tokenises the pairs (`hsd_jax.data`: prompt format, loss on the target);
  4. builds a data-parallel mesh over the local devices (all processes' devices when
     `jax.distributed` was initialised), replicates the weights and shards each batch;
  5. runs one jitted step per batch: AdamW with linear warm-up and linear decay,
     global-norm clipping, optional bfloat16 compute on float32 master weights;
  6. logs each step to `OUTPUT/train_log.jsonl`, checkpoints with Orbax under
     `OUTPUT/checkpoints` (atomic; `resume=True` restores the latest and replays the
     same batches, so the losses equal an uninterrupted run's);
  7. exports OUTPUT as a Hugging Face folder (LoRA merged into the weights).

In the code: `train` checks the settings and does 1 (`_output_lock`, `_prepare_output`),
`_setup` does 2-4 and builds what the loop needs (a `_Run`: data, model, mesh, compiled
steps, the state, restored on a resume), `_loop` does 5-6 (`_StepLog` writes each step)
and `_export` does 7.

Settings: each `TrainConfig` field is a `setting` whose metadata holds its help, the
details of its `hsd-jax train` flag (the CLI builds its flags from the fields) and whether
a resume must repeat it (`RUN_SETTINGS`, recorded in OUTPUT/run.json).

The learning-rate schedule spans `epochs` over the whole data set; `max_steps` only
stops early, so a run cut into pieces with `max_steps` and `resume` follows the same
schedule as one run.

Schedule-aware training (`skip_aware`): a batch may train under a skip schedule. The
loss then takes a per-position layer mask `batch["active"]` (L, B, T), passed to
`forward(active=...)`, under which the teacher-forced forward computes exactly what
decoding the target under that schedule computes (`skip_aware_active`; a test checks
it against the compiled decoder).
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import functools
import hashlib
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from hsd_jax import data as data_lib
from hsd_jax import distributed
from hsd_jax.errors import HsdError
from hsd_jax.io import check_output_dir, write_json, write_text
from hsd_jax.progress import progress

RUN_FILE = "run.json"
LOG_FILE = "train_log.jsonl"
CHECKPOINTS = "checkpoints"
LOCK_FILE = ".lock"  # held (flock) by the live run; the OS drops it when the process dies
# Orbax writes a checkpoint to "<step>.orbax-checkpoint-tmp[-<time>]" and renames it when complete.
ORBAX_TMP = ".orbax-checkpoint-tmp"

# GPT-2 sizes for `random:<name>` (the OpenAI checkpoints' shapes).
GPT2_PRESETS = {
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768),
    "gpt2-small": dict(n_layer=12, n_head=12, n_embd=768),
    "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024),
    "gpt2-large": dict(n_layer=36, n_head=20, n_embd=1280),
    "gpt2-xl": dict(n_layer=48, n_head=25, n_embd=1600),
}

def setting(default: Any = dataclasses.MISSING, *, help: str, resume: bool = False, metavar: str | None = None,
            shown_default: str | None = None, choices: tuple | None = None, nargs: str | None = None,
            sep: str | None = None, one_of: str | None = None, example: str | None = None):
    """A `TrainConfig` field and what `hsd-jax train` makes of it (hsd_jax/commands/train.py).

    The flag is `--` + the name with `-` for `_` (a bool that defaults to True is turned off
    by `--no-NAME`, its help then reads "no " + help); its type is the field's annotation.
      help           what the setting does (the flag's help; the CLI adds "(default: ...)")
      resume         a `--resume` must repeat it: run.json records it and a resume compares
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
    `--resume` must repeat it (`RUN_SETTINGS`)."""

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
        "and decayed linearly to 0", resume=True, metavar="LR", shown_default="5e-5")
    weight_decay: float = setting(0.0, help="AdamW decoupled weight decay on kernels and embeddings (not biases, "
                                  "norm scales)", resume=True, metavar="W")
    warmup_steps: int | None = setting(
        None, help="linear warm-up steps from 0 to --learning-rate; a short run may never leave warm-up (the "
        "progress bar and summary show the rate)", resume=True, metavar="N", shown_default="6% of the schedule")
    max_grad_norm: float = setting(1.0, help="global-norm clipping", resume=True, metavar="G")
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
    resume: bool = setting(False, help="continue the run in --output from its last checkpoint")
    devices: int | None = setting(None, help="use only the first N local devices (one process)", metavar="N",
                                  shown_default="all")
    log_every: int = setting(1, help="steps between log lines", metavar="N")
    save_every: int = setting(500, help="steps between checkpoints; one is always written at the end", metavar="N")
    keep_checkpoints: int = setting(2, help="checkpoints kept, at least 1", metavar="N")
    progress: bool = setting(True, help="progress bar on process 0 (a plain line every 10 s in a log)")


# The settings run.json records and a --resume must repeat (the rest may change).
RUN_SETTINGS = tuple(f.name for f in dataclasses.fields(TrainConfig) if f.metadata["resume"])


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


class Interrupted(KeyboardInterrupt):
    """Ctrl-C during a run; the message names the intact checkpoint a `--resume` continues from."""


# ---------------------------------------------------------------- model


def random_gpt2(spec: str, tokenizer, seed: int):
    """A LanguageModel with random weights, of any family in `hsd_jax.models.FAMILIES`
    (the name is older than that). The weights are drawn as transformers initialises the
    architecture (`hsd_jax.models.init_params`: normal(0, initializer_range), and for
    GPT-2 the residual projections at initializer_range / sqrt(2 L)). `spec` is a
    GPT2_PRESETS name or a config.json path; the file's `model_type` (GPT-2 when it names
    none, or "phi") picks the family, whose `CONFIG_DEFAULTS` fill the keys it leaves out."""
    import jax

    from hsd_jax.checkpoint import LanguageModel, _check_built_config, _check_config, _read_json
    from hsd_jax.models import FAMILIES, init_params

    if spec in GPT2_PRESETS:
        overrides = {"model_type": "gpt2", **GPT2_PRESETS[spec]}
    elif Path(spec).is_file():
        overrides = _read_json(Path(spec))  # a JSON object, or one line saying what the file is
    else:
        raise HsdError(f"random:{spec}: give a GPT-2 size ({', '.join(GPT2_PRESETS)}) or a config.json path")
    model_type = overrides.get("model_type", "gpt2")
    if not isinstance(model_type, str) or model_type not in FAMILIES:
        raise HsdError(f"random weights are drawn for model_type {' or '.join(map(repr, FAMILIES))}, and {spec} "
                       f"has model_type {model_type!r}")
    fam = FAMILIES[model_type]
    hf = {**fam.config_defaults, **overrides}
    eos = data_lib.eos_id(tokenizer)
    hf["bos_token_id"] = hf["eos_token_id"] = eos
    # The checks a loaded folder's config.json gets, so a bad size is one line, not a crash in JAX.
    where = Path(spec) if spec not in GPT2_PRESETS else Path(f"random:{spec}")
    _check_config(hf, fam, where)
    std = hf.get("initializer_range")
    if std is not None and (isinstance(std, bool) or not isinstance(std, (int, float)) or not 0 <= std < math.inf):
        raise HsdError(f"initializer_range in {where} is {std!r}, not a standard deviation (e.g. 0.02)")
    if len(tokenizer) > hf["vocab_size"]:
        raise HsdError(f"the tokenizer has {len(tokenizer)} tokens but the config's vocab_size is "
                       f"{hf['vocab_size']}; set vocab_size to at least {len(tokenizer)}")
    problems = fam.check_supported(hf)
    if problems:
        raise HsdError(f"config options hsd-jax does not implement: {', '.join(problems)}")
    config = fam.config_from_hf(hf)
    _check_built_config(config, where)
    params = init_params(config, jax.random.key(seed), initializer_range=std or 0.02)
    return LanguageModel(config=config, params=params, tokenizer=tokenizer, hf_config=hf, source=f"random:{spec}")


BPE_PREFIX = "bpe:"


def _learned_tokenizer(spec: str, train_pairs):
    """`bpe:N`: a byte-level BPE of N tokens learned on the training pairs (deterministic,
    so a resumed run learns the same one; the data fingerprint would notice otherwise)."""
    from hsd_jax import tokenizer as tokenizer_lib

    try:
        vocab_size = int(spec[len(BPE_PREFIX):])
    except ValueError:
        raise HsdError(f"--tokenizer {spec}: write bpe:N with N the vocabulary size, e.g. bpe:4096") from None
    if vocab_size < tokenizer_lib.MIN_VOCAB:  # named here as the user wrote it (train_bpe has no flag)
        raise HsdError(f"--tokenizer {spec}: a byte-level BPE needs at least {tokenizer_lib.MIN_VOCAB} tokens "
                       "(256 bytes and the EOS), e.g. bpe:4096")
    return tokenizer_lib.train_bpe(tokenizer_lib.pair_texts(train_pairs), vocab_size)


def _load_model(cfg: TrainConfig, train_pairs):
    from hsd_jax.checkpoint import _load_tokenizer, _resolve_folder, load

    tokenizer = None
    if cfg.tokenizer and cfg.tokenizer.startswith(BPE_PREFIX):
        tokenizer = _learned_tokenizer(cfg.tokenizer, train_pairs)
    elif cfg.tokenizer:
        tokenizer = _load_tokenizer(_resolve_folder(cfg.tokenizer))  # a folder or a hub id
        if tokenizer is None:
            raise HsdError(f"{cfg.tokenizer} holds no tokenizer files (tokenizer.json or vocab.json + merges.txt)")
    if cfg.model.startswith("random:"):
        if tokenizer is None:
            raise HsdError("random weights need a tokenizer: pass --tokenizer FOLDER (e.g. a GPT-2 model folder)")
        return random_gpt2(cfg.model[len("random:"):], tokenizer, cfg.seed)
    lm = load(cfg.model, tokenizer=tokenizer is None)
    if tokenizer is not None:
        lm.tokenizer = tokenizer
    if lm.tokenizer is None:
        raise HsdError(f"{cfg.model} has no tokenizer files; pass --tokenizer FOLDER")
    return lm


# ---------------------------------------------------------------- data


def _train_pairs(cfg: TrainConfig):
    if bool(cfg.dataset) == bool(cfg.train_file):
        raise HsdError("give exactly one of --dataset NAME or --train-file FILE")
    if cfg.train_file:
        pairs = data_lib.read_pairs(cfg.train_file, cfg.source_field, cfg.target_field)
    elif cfg.source_field or cfg.target_field:
        raise HsdError("--source-field/--target-field apply to --train-file; a named dataset has its own fields")
    else:
        pairs = data_lib.load_dataset_pairs(cfg.dataset, cfg.split)
    return pairs[: cfg.limit] if cfg.limit else pairs


def _eval_pairs(cfg: TrainConfig):
    if cfg.eval_file:
        pairs = data_lib.read_pairs(cfg.eval_file, cfg.source_field, cfg.target_field)
    elif cfg.eval_split:
        if not cfg.dataset:
            raise HsdError("--eval-split needs --dataset; with --train-file pass --eval-file")
        pairs = data_lib.load_dataset_pairs(cfg.dataset, cfg.eval_split)
    else:
        return None
    return pairs[: cfg.eval_limit] if cfg.eval_limit else pairs


# ---------------------------------------------------------------- loss and step


def token_nll(params, config, batch, distill: float = 0.0):
    """(sum of target-token NLL, number of target tokens) of a batch.

    Position t predicts token t + 1, counted where `loss_mask[t + 1]`. An optional
    `batch["active"]` (L, B, T) bool runs layer l at (b, t) only where True; an optional
    `batch["row_weight"]` (B,) weighs each row's tokens (both sums).

    `distill` > 0 reads the batch as a joint one (the full model's rows, then the same rows
    under a schedule): the second half's loss is (1 - distill) x the reference token's NLL
    + distill x the cross-entropy against the first half's predicted distribution, which
    is held fixed (self-distillation: the skipping path learns what the full model says).
    """
    import jax.numpy as jnp
    import optax

    from hsd_jax.models import forward

    tokens = batch["tokens"]
    logits, _ = forward(params, config, tokens, batch["attention_mask"], active=batch.get("active"))
    nll = optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], tokens[:, 1:])  # (B, T-1)
    if distill:
        import jax

        half = tokens.shape[0] // 2
        teacher = jax.nn.softmax(jax.lax.stop_gradient(logits[:half, :-1]))
        soft = optax.softmax_cross_entropy(logits[half:, :-1], teacher)
        nll = jnp.concatenate([nll[:half], (1 - distill) * nll[half:] + distill * soft])
    weight = batch["loss_mask"][:, 1:].astype(jnp.float32)
    if "row_weight" in batch:
        weight = weight * batch["row_weight"][:, None]
    return jnp.sum(nll * weight), jnp.sum(weight)


def _compute_params(trainable, frozen, mode: str, lora_scale: float, bf16: bool):
    import jax
    import jax.numpy as jnp

    from hsd_jax import lora

    params = lora.merge(frozen, trainable, lora_scale) if mode == "lora" else trainable
    if bf16:
        params = jax.tree.map(lambda x: x.astype(jnp.bfloat16) if jnp.issubdtype(x.dtype, jnp.floating) else x,
                              params)
    return params


def make_steps(config, tx, mode: str, lora_scale: float, bf16: bool, mesh, distill: float = 0.0):
    """(train_step, eval_step), jitted: weights replicated over `mesh`, batches split on "data"
    (data parallel: XLA all-reduces the gradients). `distill`: see `token_nll` (training only)."""
    import jax
    import jax.numpy as jnp
    import optax
    from jax.sharding import NamedSharding, PartitionSpec as P

    replicated = NamedSharding(mesh, P())

    def train_step(state, frozen, batch):
        def loss_of(trainable):
            total, count = token_nll(_compute_params(trainable, frozen, mode, lora_scale, bf16), config, batch,
                                     distill)
            return total / jnp.maximum(count, 1.0), count

        (loss, count), grads = jax.value_and_grad(loss_of, has_aux=True)(state["trainable"])
        updates, opt_state = tx.update(grads, state["opt_state"], state["trainable"])
        new = {"step": state["step"] + 1, "trainable": optax.apply_updates(state["trainable"], updates),
               "opt_state": opt_state}
        return new, {"loss": loss, "grad_norm": optax.tree.norm(grads), "target_tokens": count}

    def eval_step(trainable, frozen, batch):
        return token_nll(_compute_params(trainable, frozen, mode, lora_scale, bf16), config, batch)

    # Inputs keep the shardings they were placed with (`batch_sharding`), outputs stay replicated.
    train = jax.jit(train_step, out_shardings=(replicated, replicated), donate_argnums=0)
    evaluate = jax.jit(eval_step, out_shardings=replicated)
    return train, evaluate


def batch_sharding(mesh, key: str):
    """Batch arrays split their batch axis over "data": axis 0, or 1 for the (L, B, T) `active` mask."""
    from jax.sharding import NamedSharding, PartitionSpec as P

    return NamedSharding(mesh, P(None, "data") if key == "active" else P("data"))


def make_optimizer(learning_rate: float, total_steps: int, warmup_steps: int | None = None,
                   weight_decay: float = 0.0, max_grad_norm: float = 1.0):
    """AdamW, linear warm-up to the learning rate then linear decay to 0, global-norm clipping.

    Returns (tx, schedule); warmup_steps None means 6% of total_steps.
    """
    import jax
    import optax

    warmup = warmup_length(total_steps, warmup_steps)
    schedule = optax.join_schedules(
        [optax.linear_schedule(0.0, learning_rate, max(warmup, 1)),
         optax.linear_schedule(learning_rate, 0.0, max(total_steps - warmup, 1))],
        boundaries=[warmup],
    ) if warmup else optax.linear_schedule(learning_rate, 0.0, max(total_steps, 1))

    def decay_mask(tree):  # no weight decay on biases and norm scales
        return jax.tree_util.tree_map_with_path(lambda path, _: path[-1].key not in ("bias", "scale"), tree)

    tx = optax.chain(
        optax.clip_by_global_norm(max_grad_norm),
        optax.adamw(schedule, b1=0.9, b2=0.999, eps=1e-8, weight_decay=weight_decay, mask=decay_mask),
    )
    return tx, schedule


def warmup_length(total_steps: int, warmup_steps: int | None) -> int:
    """The warm-up steps: `warmup_steps`, or 6% of the schedule when None."""
    return min(warmup_steps if warmup_steps is not None else int(0.06 * total_steps), total_steps)


@functools.lru_cache(maxsize=4)
def _compiled(config, optimizer: tuple, mode: str, lora_scale: float, bf16: bool, devices: tuple,
              distill: float = 0.0):
    """(tx, schedule, train_step, eval_step), reused by runs with the same settings in one
    process (a resume, a test suite), so jit's compiled programs are reused too."""
    from jax.sharding import Mesh

    tx, schedule = make_optimizer(*optimizer)
    mesh = Mesh(np.array(devices), ("data",))
    return (tx, schedule, *make_steps(config, tx, mode, lora_scale, bf16, mesh, distill))


# ---------------------------------------------------------------- schedule-aware training

_SKIP_AWARE_STREAM = 0x5C1B  # keeps the schedule draws apart from the data order's random stream


def skip_aware_schedules(specs, num_layers: int, max_len: int) -> list:
    """The static schedules a schedule-aware run trains under, resolved for `max_len`
    decode steps (so every target position has a row; a spec's own T fixes its shape).

    A group such as "paper" contributes its SkipDecode and HSD rows (its vanilla row is
    the full-model case, its CALM rows decide at run time and have no mask to train on).
    """
    from hsd_jax import schedules

    rows = []
    for spec in specs:
        grouped = spec in schedules.PAPER_GROUPS
        for row in schedules.expand_groups([spec], num_layers):
            sched = schedules.resolve(row, num_layers=num_layers, max_new_tokens=max_len)
            if isinstance(sched, schedules.CalmConfig) or (grouped and row == "vanilla"):
                if grouped:
                    continue
                raise HsdError(f"--skip-aware {row}: CALM decides its exits at run time, so there is no "
                               "schedule to train under; give SkipDecode / HSD specs, presets or masks")
            if all(s.spec != sched.spec for s in rows):
                rows.append(sched)
    return rows


def draw_schedule(schedules: list, prob: float, seed: int, step: int):
    """The schedule batch `step` trains under, or None (the full model): a pure function of
    (seed, step), so a resumed run draws what an uninterrupted one drew."""
    rng = np.random.default_rng([seed, _SKIP_AWARE_STREAM, step])
    if rng.random() >= prob:
        return None
    return schedules[int(rng.integers(len(schedules)))]


def skip_aware_active(mask: np.ndarray | None, loss_mask: np.ndarray, num_layers: int) -> np.ndarray:
    """(L, B, W) bool: the layers each position of a right-padded batch runs when its
    target is decoded under `mask` (T, L); None runs every layer.

    The prompt is the prefill, which runs every layer (its last position predicts the
    first target token). Target token t is the input of decode step t, which runs
    `mask[t]` (positions past the schedule's end repeat its last row). `forward` then
    lets the hidden state pass skipped layers and still computes their K/V from it:
    state propagation, as in decoding (docs/methods.md).
    """
    b, w = loss_mask.shape
    if mask is None:
        return np.ones((num_layers, b, w), bool)
    prompt_lens = np.argmax(loss_mask, axis=1)  # first target position of each row
    t = np.arange(w)[None, :] - prompt_lens[:, None]  # (B, W): decode step of each position
    active = mask[np.clip(t, 0, mask.shape[0] - 1)]  # (B, W, L)
    active[t < 0] = True
    return np.ascontiguousarray(active.transpose(2, 0, 1))


# ---------------------------------------------------------------- run folder


def _run_settings(cfg: TrainConfig) -> dict:
    settings = {k: getattr(cfg, k) for k in RUN_SETTINGS}
    for key in ("model", "tokenizer", "train_file"):  # the same folder, wherever the run is started from
        value = settings[key]
        if value and not value.startswith("random:") and Path(value).exists():
            settings[key] = str(Path(value).resolve())
    if settings["lora_targets"] is not None:
        settings["lora_targets"] = list(settings["lora_targets"])
    for key in ("skip_aware_joint", "skip_aware_distill"):
        if not settings[key]:
            settings[key] = None  # recorded only when set, so runs from before the flag still resume
    if settings["skip_aware"] is None:
        settings["skip_aware_prob"] = None  # meaningless without schedules (and absent from older runs)
    else:
        settings["skip_aware"] = list(settings["skip_aware"])
    return settings


def _check_config(cfg: TrainConfig) -> None:
    if cfg.mode not in ("full", "lora"):
        raise HsdError(f"--mode must be full or lora, got {cfg.mode!r}")
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
    if cfg.skip_aware_distill and not cfg.skip_aware_joint:
        raise HsdError("--skip-aware-distill needs --skip-aware-joint: the full model's predictions come from "
                       "the batch's full-model copy")
    if Path(cfg.output).exists() and not Path(cfg.output).is_dir():
        raise HsdError(f"--output {cfg.output} is a file; give a folder")
    check_output_dir(cfg.output)  # under a file, in /proc, not writable: before any work


@contextlib.contextmanager
def _output_lock(out: Path, enabled: bool):
    """Holds an OS lock on OUTPUT/.lock while the run lives, so a second run into the folder
    is refused instead of interleaving its log and checkpoints with this one's. The OS drops
    the lock when the process dies (kill -9 too), so no stale lock is left behind. A folder
    this run created and left empty (it failed before writing) is removed again."""
    try:
        import fcntl
    except ImportError:  # no flock on this platform (Windows): run unlocked
        fcntl = None
    if not enabled or fcntl is None:
        yield
        return
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    lock = out / LOCK_FILE
    with open(lock, "a+") as handle:
        _take_lock(fcntl, handle, lock, out)
        try:
            yield
        finally:
            if created and out.is_dir() and [p.name for p in out.iterdir()] == [LOCK_FILE]:
                lock.unlink()
                out.rmdir()


def _take_lock(fcntl, handle, lock: Path, out: Path) -> None:
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        ours = False
    except OSError as err:  # a file system without locks (some NFS mounts)
        print(f"note: cannot lock {lock} ({err.strerror}), so nothing stops a second run into {out}",
              file=sys.stderr)
        return
    else:  # a run that failed at start removes the file: a lock on the removed file locks nothing
        ours = lock.exists() and os.stat(lock).st_ino == os.fstat(handle.fileno()).st_ino
    if not ours:
        handle.seek(0)
        holder = handle.read().strip() or "unknown"
        raise HsdError(f"--output {out} is in use by another training run (process {holder}); wait for it to "
                       "end, or choose another --output")
    handle.seek(0)
    handle.truncate()
    handle.write(f"{os.getpid()}\n")  # names the holder to a refused run
    handle.flush()


def _prepare_output(cfg: TrainConfig, out: Path) -> dict | None:
    """Checks the output folder; returns the previous run's record when resuming one."""
    run_file = out / RUN_FILE
    busy = out.exists() and any(p.name != LOCK_FILE for p in out.iterdir())
    if not busy:
        return None
    if not run_file.exists():
        raise HsdError(f"--output {out} is not empty and holds no training run; choose a new or empty folder")
    if not cfg.resume:
        raise HsdError(f"--output {out} holds another training run; pass --resume to continue it, "
                       "or choose another --output")
    previous = _read_run_file(run_file)
    now = _run_settings(cfg)
    changed = [k for k in RUN_SETTINGS if previous["settings"].get(k) != now[k]]
    if changed:
        diffs = "; ".join(f"{k}: {previous['settings'].get(k)!r} then, {now[k]!r} now" for k in changed)
        raise HsdError(f"--resume must repeat the settings of the run in {out} ({diffs}); "
                       "pass the same values, or start a new run in another --output")
    return previous


def _read_run_file(path: Path) -> dict:
    fix = "restore it, or start a new run in another --output"
    try:
        record = json.loads(path.read_text())
    except ValueError as err:  # JSONDecodeError, UnicodeDecodeError
        raise HsdError(f"{path} is not valid JSON ({err}); {fix}") from None
    if not isinstance(record, dict) or not isinstance(record.get("settings"), dict):
        raise HsdError(f"{path} holds no run settings; {fix}")
    return record


def weights_fingerprint(params) -> dict:
    """{"sha256": of all arrays, "arrays": {path: short digest}}: each array's path, dtype,
    shape and bytes, in path order; the per-array digests let a resume name what changed."""
    import jax

    total, arrays = hashlib.sha256(), {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:  # dict keys in sorted order
        name = "/".join(str(getattr(key, "key", key)) for key in path)
        array = np.ascontiguousarray(np.asarray(leaf))
        digest = hashlib.sha256(f"{name} {array.dtype} {array.shape}".encode())
        digest.update(array.reshape(-1).view(np.uint8))
        arrays[name] = digest.hexdigest()[:16]
        total.update(digest.digest())
    return {"sha256": total.hexdigest(), "arrays": arrays}


def _check_inputs_unchanged(previous: dict, out: Path, data_fingerprint: str, base_weights: dict) -> None:
    """A resume must see the data and base weights the run began with (the settings only name
    them), or its batches and losses would not continue the run's."""
    if previous.get("data_fingerprint") != data_fingerprint:
        raise HsdError(f"the training data differs from the data the run in {out} began with, so the "
                       "batches would not repeat; restore the data, or start a new run in another --output")
    before = previous.get("base_weights")  # absent in runs recorded before it was
    if before is None or before.get("sha256") == base_weights["sha256"]:
        return
    old, new = before.get("arrays", {}), base_weights["arrays"]
    changed = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))
    named = ", ".join(changed[:6]) + (f" and {len(changed) - 6} more" if len(changed) > 6 else "")
    raise HsdError(f"the base model's weights differ from those the run in {out} began with ({named} changed) "
                   f"though --model {previous['settings'].get('model')} is the same; restore those weights, "
                   "or start a new run in another --output")


def _remove_unfinished_checkpoints(folder: Path) -> None:
    """Deletes the temporary folders of saves a stopped run left unfinished: Orbax never reads
    them, and the next save of that step would meet one."""
    for stale in sorted(folder.glob(f"*{ORBAX_TMP}*")) if folder.is_dir() else []:
        print(f"note: removing {stale}, a checkpoint a stopped run left unfinished", file=sys.stderr)
        if stale.is_dir():
            shutil.rmtree(stale)
        else:
            stale.unlink()


def _log_lines(path: Path, note: bool) -> list[tuple[str, dict]]:
    """(line, object) for each line of the log. A torn last line (the run was killed while
    writing it) is dropped; a bad line before the last means other damage, so it is an error."""
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    parsed = []
    for number, line in enumerate(lines, 1):
        try:
            parsed.append((line, json.loads(line)))
        except json.JSONDecodeError:
            if number < len(lines):
                raise HsdError(f"{path}: log line {number} is not JSON; repair or delete that line") from None
            if note:
                print(f"note: dropping the torn last line of {path} (the run was stopped while writing it)",
                      file=sys.stderr)
    return parsed


def _trim_log(path: Path, last_step: int) -> None:
    """Drops log lines past the restored step (the run died after logging, before saving)."""
    if not path.exists():
        return
    keep = [line for line, record in _log_lines(path, note=True) if record["step"] <= last_step]
    write_text(path, "".join(line + "\n" for line in keep))


# ---------------------------------------------------------------- stopping cleanly

_DISK_FULL = (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC))


@contextlib.contextmanager
def _failures_explained(out: Path, manager):
    """Ctrl-C and a full disk end a run in one line naming the checkpoint --resume continues from."""
    try:
        yield
    except KeyboardInterrupt:
        raise Interrupted(f"interrupted; {_resume_hint(out, manager)}") from None
    except Exception as err:
        full = _disk_full(err)
        if full is None:
            raise
        raise HsdError(f"no space left writing to {out} ({full.strerror or full}); free some space: "
                       f"{_resume_hint(out, manager)}") from None


@contextlib.contextmanager
def _signals_deferred(note: str | None = None):
    """Ctrl-C or SIGTERM inside the block takes effect when it ends; the block gets the list
    of the signals caught so far, to finish early. Orbax starts a save's background threads
    inside `save`; interrupted half-way, it no longer tracks them, so `wait_until_finished`
    returns while they still write, and they die at exit with a traceback (and a torn
    checkpoint). With `note` (printed on the first signal), a second signal takes effect
    at once: whoever presses Ctrl-C twice will not wait."""
    import signal

    caught = []
    previous = {}

    def restore():
        for signum, handler in previous.items():
            signal.signal(signum, handler)

    def replay(signum):  # as the handler before ours would have taken it
        handler = previous[signum]
        if callable(handler):
            handler(signum, None)
        elif handler == signal.SIG_DFL:
            signal.raise_signal(signum)

    def on_signal(signum, frame):
        caught.append(signum)
        if note is None:
            return
        if len(caught) == 1:
            print(f"\n{note}", file=sys.stderr, flush=True)
        else:
            restore()
            replay(signum)

    try:
        for signum in (signal.SIGINT, signal.SIGTERM):
            if signal.getsignal(signum) is not signal.SIG_IGN:  # (`cmd &` in a script ignores SIGINT)
                previous[signum] = signal.signal(signum, on_signal)
    except ValueError:  # not the main thread: signals are not ours to handle
        pass
    try:
        yield caught
    finally:
        restore()
    if caught and previous:  # the block ended normally: now the first signal takes effect
        replay(caught[0])


def _disk_full(err: BaseException | None) -> OSError | None:
    """The ENOSPC / EDQUOT error behind `err`, if any (a writer's error may come wrapped)."""
    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, OSError) and err.errno in _DISK_FULL:
            return err
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return None


def _resume_hint(out: Path, manager) -> str:
    step = _intact_step(manager)
    if step is None:
        return f"no checkpoint was written yet, and --resume --output {out} starts again from step 0"
    return (f"the last intact checkpoint is step {step} ({out / CHECKPOINTS / str(step)}), "
            "and --resume continues from it")


def _intact_step(manager) -> int | None:
    """The newest complete checkpoint, once a save under way has finished (or failed)."""
    try:
        manager.wait_until_finished()
    except Exception:  # a failed save is no checkpoint, and the step below skips it
        pass
    manager.reload()
    return manager.latest_step()


def _export(out: Path, lm, params, record: dict, step: int) -> None:
    """OUTPUT as a Hugging Face folder; run.json then records the step it holds, so a resume
    with nothing left to train leaves it alone (and one after a failed export writes it)."""
    from hsd_jax import checkpoint

    model = checkpoint.LanguageModel(config=lm.config, params=params, tokenizer=lm.tokenizer, hf_config=lm.hf_config)
    checkpoint.save_pretrained(model, out)
    write_json(out / RUN_FILE, {**record, "exported_step": step})


# ---------------------------------------------------------------- the run: setup, loop, export


def train(cfg: TrainConfig) -> TrainResult:
    """Runs (or resumes) a training run; see the module docstring."""
    _check_config(cfg)
    out = Path(cfg.output)
    distributed.maybe_initialize()
    import jax

    with _output_lock(out, enabled=jax.process_index() == 0):
        return _run(cfg, out)


def _run(cfg: TrainConfig, out: Path) -> TrainResult:
    previous = _prepare_output(cfg, out)
    run = _setup(cfg, out, previous)
    if isinstance(run, TrainResult):  # a resume with nothing left to do
        return run
    try:
        with _failures_explained(out, run.manager):
            log = _loop(run)
            if run.lead:
                _export(out, run.lm, run.trained_params(), run.record, run.end)
    finally:
        run.manager.close()  # joins Orbax's writer threads, so none is cut off at exit
    return TrainResult(steps=run.end, losses=log.losses, eval_losses=log.eval_losses,
                       trainable_params=run.record["trainable_params"], learning_rates=log.learning_rates,
                       **run.summary)


@dataclasses.dataclass
class _Run:
    """What the loop needs, built by `_setup`: data, model, mesh, compiled steps and the
    training state (`state` is replaced by each step)."""

    cfg: TrainConfig
    out: Path
    lead: bool  # process 0: writes run.json, the log and the model
    lm: Any  # the loaded model: config, tokenizer, base weights
    train_data: Any  # data_lib.encode_pairs of the training pairs
    eval_data: Any  # ... of the validation pairs, or None
    skip_schedules: list | None  # the schedules of `skip_aware`
    mesh: Any  # 1-D, axis "data"
    steps_per_epoch: int
    start: int  # the step restored (0 for a new run)
    stop: int  # the step this call trains to
    manager: Any  # Orbax CheckpointManager of OUTPUT/checkpoints
    schedule: Any  # optax schedule: step -> learning rate
    train_step: Any
    eval_step: Any
    lora_scale: float
    state: dict  # {"step", "trainable", "opt_state"}, replicated
    frozen: dict  # the base weights under LoRA, {} in full training
    record: dict  # what run.json holds
    summary: dict  # the TrainResult fields known before training

    @property
    def end(self) -> int:
        """The step the run stands at after the loop (a resume past `stop` trains nothing)."""
        return max(self.stop, self.start)

    def to_device(self, batch: dict) -> dict:
        """The global batch, each process contributing its share of the rows (all of them with one
        process; a joint schedule-aware batch has twice `batch_size` rows)."""
        import jax

        def local(key, v):
            axis = 1 if key == "active" else 0
            n = v.shape[axis] // jax.process_count()
            return np.take(v, np.arange(jax.process_index() * n, (jax.process_index() + 1) * n), axis=axis)

        return {k: jax.make_array_from_process_local_data(batch_sharding(self.mesh, k), local(k, v), v.shape)
                for k, v in batch.items()}

    def evaluate(self) -> float:
        """The validation loss of the current weights: mean NLL per target token."""
        total_nll, count = 0.0, 0.0
        size = self.cfg.batch_size
        order = np.argsort(self.eval_data.lengths, kind="stable")  # fixed order, little padding
        for i in range(0, len(order), size):
            batch = data_lib.make_batch(self.eval_data, order[i:i + size], size)
            s, n = self.eval_step(self.state["trainable"], self.frozen, self.to_device(batch))
            total_nll, count = total_nll + float(s), count + float(n)
        return total_nll / max(count, 1.0)

    def trained_params(self):
        """The model's weights now: LoRA merged into the base weights, or the trained ones."""
        from hsd_jax import lora

        if self.cfg.mode == "lora":
            return lora.merge(self.frozen, self.state["trainable"], self.lora_scale)
        return self.state["trainable"]


def _setup(cfg: TrainConfig, out: Path, previous: dict | None) -> _Run | TrainResult:
    """Steps 2-4 of the module docstring and what step 5 starts from: model and data, mesh,
    optimizer and compiled steps, the state (restored on a resume), run.json. A resume that
    finds the run over and its model written returns its TrainResult instead."""
    import jax
    import orbax.checkpoint as ocp
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    from hsd_jax import lora

    lead = jax.process_index() == 0
    lm, train_data, eval_data, max_len = _model_and_data(cfg)
    config = lm.config
    skip_schedules = skip_aware_schedules(cfg.skip_aware, config.num_layers, max_len) if cfg.skip_aware else None
    fingerprint, base_weights = train_data.fingerprint(), weights_fingerprint(lm.params)
    if previous is not None:
        _check_inputs_unchanged(previous, out, fingerprint, base_weights)

    # Devices: a 1-D mesh; the global batch splits over it, the weights are replicated.
    devices = _devices(cfg)
    mesh = Mesh(np.array(devices), ("data",))

    spe = data_lib.steps_per_epoch(len(train_data), cfg.batch_size)
    total = cfg.epochs * spe
    stop = min(cfg.max_steps or total, total)
    if lead and cfg.max_steps and cfg.max_steps > total:
        print(f"note: --max-steps {cfg.max_steps} is past the end of {cfg.epochs} epochs; stopping at step {total} "
              "(raise --epochs to train longer)", file=sys.stderr)
    summary = dict(output=out, num_train_pairs=len(train_data), schedule_steps=total,
                   warmup_steps=warmup_length(total, cfg.warmup_steps))

    if lead and previous is not None:
        _remove_unfinished_checkpoints(out / CHECKPOINTS)
    manager = ocp.CheckpointManager(
        (out / CHECKPOINTS).resolve(),
        options=ocp.CheckpointManagerOptions(max_to_keep=cfg.keep_checkpoints, create=True),
    )
    start = (manager.latest_step() or 0) if previous is not None else 0
    if previous is not None and start >= stop and previous.get("exported_step") == start:
        manager.close()  # the run is over and its model written: rewriting it would change nothing
        return TrainResult(steps=start, losses={}, eval_losses={}, already_done=True,
                           trainable_params=int(previous.get("trainable_params", 0)), **summary)

    lora_cfg = lora.LoraConfig(cfg.lora_rank, cfg.lora_alpha, tuple(cfg.lora_targets) if cfg.lora_targets else None)
    optimizer = (cfg.learning_rate, total, cfg.warmup_steps, cfg.weight_decay, cfg.max_grad_norm)
    tx, schedule, train_step, eval_step = _compiled(config, optimizer, cfg.mode, lora_cfg.scale, cfg.bf16,
                                                    tuple(devices), cfg.skip_aware_distill)
    state, frozen = _initial_state(cfg, lm, tx, lora_cfg, NamedSharding(mesh, P()))
    num_trainable = sum(x.size for x in jax.tree.leaves(state["trainable"]))
    if start:
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
        state = manager.restore(start, args=ocp.args.StandardRestore(abstract))
        if lead:
            print(f"resuming {out} from step {start}", file=sys.stderr)
    elif previous is not None and lead:
        print(f"no checkpoint in {out / CHECKPOINTS}; starting from step 0", file=sys.stderr)

    record = {"settings": _run_settings(cfg), "data_fingerprint": fingerprint, "base_weights": base_weights,
              "train_pairs": len(train_data), "steps_per_epoch": spe, "schedule_steps": total,
              "devices": len(devices), "trainable_params": int(num_trainable)}
    if lead:
        write_json(out / RUN_FILE, record)
        _trim_log(out / LOG_FILE, start)
    return _Run(cfg=cfg, out=out, lead=lead, lm=lm, train_data=train_data, eval_data=eval_data,
                skip_schedules=skip_schedules, mesh=mesh,
                steps_per_epoch=spe, start=start, stop=stop, manager=manager, schedule=schedule,
                train_step=train_step, eval_step=eval_step, lora_scale=lora_cfg.scale, state=state, frozen=frozen,
                record=record, summary=summary)


def _model_and_data(cfg: TrainConfig):
    """(model, training data, validation data or None, tokens per row): the pairs read and
    tokenised with the model's (or the given, or the learned) tokenizer."""
    train_pairs = _train_pairs(cfg)
    lm = _load_model(cfg, train_pairs)
    max_len = min(cfg.max_length or lm.config.max_position, lm.config.max_position)
    train_data = data_lib.encode_pairs(lm.tokenizer, train_pairs, max_len,
                                       what=cfg.train_file or f"{cfg.dataset} ({cfg.split})")
    eval_pairs = _eval_pairs(cfg)
    eval_data = data_lib.encode_pairs(lm.tokenizer, eval_pairs, max_len, what="the validation data") \
        if eval_pairs else None
    return lm, train_data, eval_data, max_len


def _devices(cfg: TrainConfig) -> list:
    """The devices the batch is split over: all (of every process), or the first `devices` local ones."""
    import jax

    if cfg.devices is not None and jax.process_count() == 1:
        if not 1 <= cfg.devices <= jax.device_count():
            raise HsdError(f"--devices {cfg.devices}: this machine has {jax.device_count()} devices")
        devices = jax.devices()[: cfg.devices]
    else:
        devices = jax.devices()
    if cfg.batch_size % len(devices):
        raise HsdError(f"--batch-size {cfg.batch_size} must be a multiple of the {len(devices)} devices "
                       "the batch is split over")
    return devices


def _initial_state(cfg: TrainConfig, lm, tx, lora_cfg, replicated) -> tuple[dict, dict]:
    """(state, frozen) on every device: LoRA adapters drawn from the seed over the frozen base
    weights, or every weight trainable and nothing frozen; the optimizer state at its start."""
    import jax

    from hsd_jax import lora

    if cfg.mode == "lora":
        frozen = lm.params
        trainable = lora.init(jax.random.key(cfg.seed), lm.params, lm.config, lora_cfg)
    else:
        frozen, trainable = {}, lm.params
    state = {"step": np.zeros((), np.int32), "trainable": trainable, "opt_state": tx.init(trainable)}
    return _replicate(state, replicated), _replicate(frozen, replicated)


def _loop(run: _Run) -> _StepLog:
    """Steps 5-6: one jitted step per batch from `run.start` to `run.stop`, each step logged;
    the validation loss and a checkpoint when due, both at the last step, and a checkpoint
    of the step reached when Ctrl-C or SIGTERM stops the run."""
    import jax
    import orbax.checkpoint as ocp

    cfg = run.cfg
    log = _StepLog(run)
    pending = None  # the previous step's metrics, read after the next step is dispatched
    # Ctrl-C / SIGTERM ends the run after the step in flight, with a checkpoint of it, so
    # an interrupt loses no finished step. Not across processes: a save is collective, and
    # a signal may reach only one of them.
    stopping = (_signals_deferred("stopping after this step to save a checkpoint; Ctrl-C again stops at once")
                if jax.process_count() == 1 else contextlib.nullcontext([]))
    try:
        with stopping as interrupted:
            for step, batch in _batches(run):
                batch, trained_under = _add_skip_schedule(run, batch, step)
                run.state, metrics = run.train_step(run.state, run.frozen, run.to_device(batch))
                done = step + 1
                if pending is not None:
                    log.write(*pending)
                pending = (done, metrics, int(batch["attention_mask"].sum()), trained_under)
                due_eval = run.eval_data is not None and ((cfg.eval_every and done % cfg.eval_every == 0)
                                                          or done == run.stop)
                due_save = done % cfg.save_every == 0 or done == run.stop
                eval_loss = run.evaluate() if due_eval else None
                stop = bool(interrupted)  # a signal after this read is the next step's to save
                if due_eval or due_save or stop:
                    log.write(*pending, eval_loss=eval_loss)  # the log never lags a checkpoint
                    pending = None
                if due_save or stop:
                    with _signals_deferred():
                        run.manager.save(done, args=ocp.args.StandardSave(run.state))
                    stop = bool(interrupted)  # this step is saved, whenever the signal came
                if stop:
                    break
            if pending is not None:
                log.write(*pending)
            run.manager.wait_until_finished()
        if interrupted:  # the handler before ours returned: still, the run did not finish
            raise KeyboardInterrupt
    finally:
        log.close()
    return log


def _batches(run: _Run):
    """(step, batch) for each step from `run.start` to `run.stop`, `step` counting the steps
    before it: each epoch's `batch_plan` (from the seed and the epoch) in order, so a resume
    meets the batches an uninterrupted run would."""
    cfg, spe = run.cfg, run.steps_per_epoch
    epoch, index = divmod(run.start, spe)
    plan = data_lib.batch_plan(run.train_data.lengths, cfg.batch_size, cfg.seed, epoch)
    for step in range(run.start, run.stop):
        if index == spe:
            epoch, index = epoch + 1, 0
            plan = data_lib.batch_plan(run.train_data.lengths, cfg.batch_size, cfg.seed, epoch)
        yield step, data_lib.make_batch(run.train_data, plan[index], cfg.batch_size)
        index += 1


def _add_skip_schedule(run: _Run, batch: dict, step: int) -> tuple[dict, str | None]:
    """With `skip_aware`: (the batch with the layer mask of what step `step` trains under in
    `batch["active"]`, its spec: "vanilla" for the full model); (batch, None) without.

    Joint: the rows twice, the full model's copy then the drawn schedule's, weighted
    1 - P and P (`row_weight`, scaled by 2 so a row's tokens count once on average)."""
    cfg, num_layers = run.cfg, run.lm.config.num_layers
    if run.skip_schedules is None:
        return batch, None
    if cfg.skip_aware_joint:
        sched = draw_schedule(run.skip_schedules, 1.0, cfg.seed, step)
        rows = len(batch["tokens"])
        both = {k: np.concatenate([v, v]) for k, v in batch.items()}
        both["active"] = np.concatenate([skip_aware_active(None, batch["loss_mask"], num_layers),
                                         skip_aware_active(sched.mask, batch["loss_mask"], num_layers)], axis=1)
        p = cfg.skip_aware_prob
        both["row_weight"] = np.repeat(np.float32([2 * (1 - p), 2 * p]), rows)
        return both, f"vanilla+{sched.spec}"
    sched = draw_schedule(run.skip_schedules, cfg.skip_aware_prob, cfg.seed, step)
    batch["active"] = skip_aware_active(None if sched is None else sched.mask, batch["loss_mask"], num_layers)
    return batch, "vanilla" if sched is None else sched.spec


class _StepLog:
    """Where each step's metrics go: the result's dicts, OUTPUT/train_log.jsonl (process 0;
    every `log_every` steps, at the last step and with each validation loss) and the progress bar."""

    def __init__(self, run: _Run):
        self.run = run
        self.losses: dict[int, float] = {}
        self.learning_rates: dict[int, float] = {}
        self.eval_losses: dict[int, float] = {}
        self.bar = _progress(run.cfg.progress and run.lead, run.start, run.stop)
        self.file = (run.out / LOG_FILE).open("a") if run.lead else None
        self.t_last, self.tokens_since = time.perf_counter(), 0  # tokens/s counts since the last line
        self.t_start = self.t_last

    def write(self, step: int, metrics: dict, tokens: int, trained_under: str | None,
              eval_loss: float | None = None) -> None:
        """Records step `step` (reading its metrics waits for it); a loss that is not finite ends the run."""
        cfg = self.run.cfg
        loss = float(metrics["loss"])
        self.losses[step] = loss
        now = time.perf_counter()
        self.tokens_since += tokens
        if not math.isfinite(loss):
            raise HsdError(f"the training loss became {loss} at step {step}; lower --learning-rate "
                           "(or drop --bf16) and resume from the last checkpoint with --resume")
        record = {"step": step, "epoch": round(step / self.run.steps_per_epoch, 4), "loss": loss,
                  "lr": float(self.run.schedule(step - 1)), "grad_norm": float(metrics["grad_norm"]),
                  "target_tokens": int(metrics["target_tokens"])}
        if trained_under is not None:
            record["schedule"] = trained_under
        self.learning_rates[step] = record["lr"]
        if eval_loss is not None:
            self.eval_losses[step] = record["eval_loss"] = eval_loss
        if step % cfg.log_every == 0 or step == self.run.stop or eval_loss is not None:
            record["tokens_per_s"] = round(self.tokens_since / max(now - self.t_last, 1e-9), 1)
            record["elapsed_s"] = round(now - self.t_start, 2)
            self.t_last, self.tokens_since = now, 0
            if self.file is not None:
                self.file.write(json.dumps(record) + "\n")
                self.file.flush()
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{loss:.4f}", lr=f"{record['lr']:.2e}",  # a run still in warm-up shows it
                                 tok_s=f"{record.get('tokens_per_s', 0):.0f}", refresh=False)

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
        if self.bar is not None:
            self.bar.close()


def _replicate(tree: Any, sharding):
    """Places identical host/device values on every device of the mesh (across processes too)."""
    import jax

    if jax.process_count() == 1:
        return jax.device_put(tree, sharding)
    return jax.tree.map(
        lambda x: jax.make_array_from_callback(np.shape(x), sharding, lambda idx: np.asarray(x)[idx]), tree)


def _progress(enabled: bool, start: int, stop: int):
    """tqdm with loss, learning rate, tokens/s and ETA on process 0 (a plain line every 10 s in a log)."""
    return progress(total=stop, initial=start, unit="step", smoothing=0.1) if enabled else None


def read_log(output: str | os.PathLike) -> list[dict]:
    """The objects of OUTPUT/train_log.jsonl, in order (without a torn last line)."""
    return [record for _, record in _log_lines(Path(output) / LOG_FILE, note=False)]
