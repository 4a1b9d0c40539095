"""What each step trains on: the pairs, tokenised, in batches, under a skip schedule or not.

`_model_and_data` reads the pairs and tokenises them with the model's tokenizer; `_batches`
yields each step's batch (each epoch's `hsd_jax.data.batch_plan`, from the seed, so a
resume meets the batches an uninterrupted run would); `_add_skip_schedule` gives a batch
the layer mask of the schedule it trains under.

Schedule-aware training (`skip_aware`): a batch may train under a skip schedule. The
loss then takes a per-position layer mask `batch["active"]` (L, B, T), passed to
`forward(active=...)`, under which the teacher-forced forward computes exactly what
decoding the target under that schedule computes (`skip_aware_active`; a test checks
it against the compiled decoder).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from hsd_jax import data as data_lib
from hsd_jax.errors import HsdError
from hsd_jax.train.model import _load_model
from hsd_jax.train.settings import TrainConfig


# ---------------------------------------------------------------- pairs


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


def validation_source(cfg: TrainConfig) -> str | None:
    """What the periodic validation loss is computed on, as run.json and each validation
    log line name it: the file, or the dataset and split, and any --eval-limit; None without."""
    if cfg.eval_file:
        name = str(Path(cfg.eval_file).resolve())
    elif cfg.eval_split:
        name = f"{cfg.dataset} ({cfg.eval_split})"
    else:
        return None
    return f"{name}, first {cfg.eval_limit} pairs" if cfg.eval_limit else name


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


def _model_and_data(cfg: TrainConfig):
    """(model, training data, validation data or None, tokens per row): the pairs read and
    tokenised with the model's (or the given, or the learned) tokenizer."""
    train_pairs = _train_pairs(cfg)
    lm = _load_model(cfg, train_pairs)
    max_len = min(cfg.max_length or lm.config.max_position, lm.config.max_position)
    train_data = _encode(lm.tokenizer, train_pairs, max_len, cfg.train_file or f"{cfg.dataset} ({cfg.split})")
    eval_pairs = _eval_pairs(cfg)
    eval_data = _encode(lm.tokenizer, eval_pairs, max_len, "the validation data") if eval_pairs else None
    return lm, train_data, eval_data, max_len


_TOO_LONG = "sequence-length-is-longer-than-the-specified-maximum"  # transformers' key for its warning


def _encode(tokenizer, pairs, max_len: int, what: str):
    """`hsd_jax.data.encode_pairs`, with one note saying how many pairs did not fit `max_len`
    tokens and so had their sources cut from the end (a target is never cut: one that cannot
    fit is an error). The note replaces transformers' warning about such a text, which speaks
    of indexing errors that the cut prevents."""
    import jax

    warned = getattr(tokenizer, "deprecation_warnings", None)  # transformers shows it once per tokenizer
    warned = warned if isinstance(warned, dict) else {}
    before = warned.get(_TOO_LONG)
    warned[_TOO_LONG] = True  # as if shown already
    try:
        encoded = data_lib.encode_pairs(tokenizer, pairs, max_len, what=what)
    finally:
        if before is None:
            warned.pop(_TOO_LONG)
        else:
            warned[_TOO_LONG] = before
    cut = _cut_sources(tokenizer, pairs, encoded)
    if cut and jax.process_index() == 0:
        print(f"note: {cut} of the {len(pairs):,} pairs in {what} {'does' if cut == 1 else 'do'} not fit the "
              f"{max_len}-token context (--max-length, at most the model's), so the end of "
              f"{'its source is' if cut == 1 else 'their sources are'} cut to fit; the target is kept whole",
              file=sys.stderr)
    return encoded


def _cut_sources(tokenizer, pairs, encoded) -> int:
    """How many rows had their source cut: of the rows that fill the context, those whose
    prompt decodes to less than the whole prompt text."""
    count = 0
    for i in np.flatnonzero(encoded.lengths == encoded.max_len):
        prompt = encoded.tokens[i][: encoded.prompt_lens[i]].tolist()
        shown = tokenizer.decode(prompt, clean_up_tokenization_spaces=False)
        count += len(shown) < len(data_lib.format_source(pairs[i][0]))
    return count


# ---------------------------------------------------------------- batches


def _batches(run):
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


def _add_skip_schedule(run, batch: dict, step: int) -> tuple[dict, str | None]:
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
