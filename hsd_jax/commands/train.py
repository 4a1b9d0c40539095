"""`hsd-jax train`: fine-tune (full or LoRA) or train from random weights (GPT-2 or Phi).

The flags are built from `hsd_jax.train.TrainConfig`, one per field (`batch_size` ->
`--batch-size`): the type from the field's annotation, the default from the field, the
help, metavar, choices and the rest from its `setting` metadata. `config_from_args` turns
the parsed flags back into a TrainConfig.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import types
import typing

from hsd_jax.errors import HsdError


def register(subparsers) -> None:
    from hsd_jax.train import TrainConfig  # numpy at most: JAX is imported when a run starts

    parser = subparsers.add_parser(
        "train",
        help="fine-tune a GPT-2 / Phi model (full or LoRA) on source -> target pairs",
        description="Train on (source, target) pairs written as the prompt 'SOURCE =' then ' TARGET<eos>', "
        "with the loss on the target tokens only (hsd_jax.data.format_source is the prompt to generate from). "
        "Optax AdamW (linear warm-up and decay, gradient clipping), data parallel over all devices, Orbax "
        "checkpoints in OUTPUT/checkpoints, a log in OUTPUT/train_log.jsonl; OUTPUT ends as a Hugging Face "
        "model folder (LoRA merged). See train/README.md.",
    )
    add_settings(parser, TrainConfig)
    parser.set_defaults(func=run)


def flag(field: dataclasses.Field) -> str:
    """The option of a setting: --NAME, or --no-NAME for a bool that defaults to True."""
    name = field.name.replace("_", "-")
    return f"--no-{name}" if field.default is True else f"--{name}"


def add_settings(parser: argparse.ArgumentParser, settings_type) -> None:
    """One option per field of the dataclass `settings_type`, in field order: a field without a
    default is required, fields with the same `one_of` form a group (listed together, where its
    first field is) that needs exactly one, and every other option's help ends with its default."""
    hints = typing.get_type_hints(settings_type)
    fields = dataclasses.fields(settings_type)
    added = set()
    for field in fields:
        group = field.metadata["one_of"]
        if group is None:
            _add_option(parser, field, hints[field.name])
        elif group not in added:
            added.add(group)
            holder = parser.add_mutually_exclusive_group(required=True)
            for member in fields:
                if member.metadata["one_of"] == group:
                    _add_option(holder, member, hints[member.name])


def _add_option(holder, field: dataclasses.Field, hint) -> None:
    meta, kind = field.metadata, _value_type(hint, field.name)
    required = field.default is dataclasses.MISSING
    options = dict(dest=field.name, default=None if required else field.default)
    if kind is bool:
        options["action"] = "store_false" if field.default else "store_true"
        text, shown = ("no " if field.default else "") + meta["help"], "off"
    else:
        if kind in (int, float):
            options["type"] = kind
        elif kind is tuple:
            if meta["nargs"]:
                options["nargs"] = meta["nargs"]
            elif not meta["sep"]:
                raise TypeError(f"setting {field.name}: a tuple takes nargs or sep")
        options.update({k: meta[k] for k in ("metavar", "choices") if meta[k] is not None})
        text, shown = meta["help"], meta["shown_default"] or _shown(field.default)
    if required:
        options["required"] = True
    elif not meta["one_of"]:  # a group's options are chosen among, and have no default
        text = f"{text} (default: {shown})"
    options["help"] = text.replace("%", "%%")  # argparse formats help with %
    holder.add_argument(flag(field), **options)


def config_from_args(args: argparse.Namespace, settings_type):
    """The settings the parsed flags give (`add_settings`' options): a `sep` list split and
    stripped, a `nargs` list as a tuple."""
    values = {}
    for field in dataclasses.fields(settings_type):
        value, meta = getattr(args, field.name), field.metadata
        if value is not None and meta["sep"]:
            value = tuple(part.strip() for part in value.split(meta["sep"]) if part.strip())
            if not value:
                raise HsdError(f"{flag(field)} is empty; give a list such as {meta['example']}")
        elif value is not None and meta["nargs"]:
            value = tuple(value)
        values[field.name] = value
    return settings_type(**values)


def _value_type(hint, name: str) -> type:
    """int, float, str, bool or tuple: the annotation without its `| None`."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        kinds = [k for k in typing.get_args(hint) if k is not type(None)]
        hint = kinds[0] if len(kinds) == 1 else hint
    kind = typing.get_origin(hint) or hint
    if kind not in (int, float, str, bool, tuple):
        raise TypeError(f"setting {name}: no command-line flag for the type {hint}")
    return kind


def _shown(value) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def run(args: argparse.Namespace) -> int:
    from hsd_jax.train import Interrupted, TrainConfig, train  # JAX is imported here, not at `--help`

    cfg = config_from_args(args, TrainConfig)
    try:
        result = train(cfg)
    except Interrupted as stop:  # Ctrl-C: one line naming the checkpoint to resume from
        print(f"hsd-jax train: {stop}", file=sys.stderr)
        return 130
    print(summary(result, cfg.max_steps))
    return 0


def summary(result, max_steps: int | None) -> str:
    """The one line a run ends with."""
    out, step, total = result.output, result.steps, result.schedule_steps
    if result.already_done and step >= total:
        return f"the run in {out} already finished at step {step} of {total}; nothing to do"
    if result.already_done:
        return (f"the run in {out} is already at step {step} of {total} and --max-steps is {max_steps}; "
                f"nothing to do (raise --max-steps above {step} to continue)")
    if not result.losses:  # a resume after a failed export: the model written, no step to train
        return f"wrote the model of step {step}, where the run had stopped; model folder: {out}"
    last = max(result.losses)
    warm = f" (still in warm-up, which lasts {result.warmup_steps} of the {total} steps)" \
        if last <= result.warmup_steps else ""
    return (f"trained to step {step} ({result.trainable_params:,} trainable parameters); last loss "
            f"{result.losses[last]:.4f} at learning rate {result.learning_rates[last]:.2e}{warm}; "
            f"model folder: {out}")
