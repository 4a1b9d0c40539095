"""Training settings live in one place: `TrainConfig`'s fields (issue 13).

The `hsd-jax train` flags, their defaults, types and help, and the settings a --resume
must repeat are derived from the fields' `setting` metadata; these tests check that
every field has its flag, that the flags give back the dataclass's defaults and values,
and that run.json's settings are the ones runs have always recorded. No JAX work runs here.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
from pathlib import Path

import numpy as np
import pytest

from hsd_jax import cli, data
from hsd_jax import train as train_lib
from hsd_jax.commands import train as train_command
from hsd_jax.errors import HsdError
from hsd_jax.train import RUN_SETTINGS, TrainConfig

# What `_RUN_KEYS` listed, by hand, before the settings moved into the fields' metadata:
# run.json's "settings" of every run written so far has these keys, in this order.
OLD_RUN_KEYS = ("model", "tokenizer", "dataset", "split", "train_file", "source_field", "target_field", "limit",
                "mode", "epochs", "batch_size", "learning_rate", "weight_decay", "warmup_steps", "max_grad_norm",
                "max_length", "lora_rank", "lora_alpha", "lora_targets", "seed", "bf16", "skip_aware",
                "skip_aware_prob", "skip_aware_joint", "skip_aware_distill", "skip_aware_view")
REQUIRED = ["--model", "m", "--output", "out", "--train-file", "pairs.jsonl"]


def parser() -> argparse.ArgumentParser:
    return cli.build_parser()


def parse(*argv) -> TrainConfig:
    args = parser().parse_args(["train", *map(str, argv)])
    return train_command.config_from_args(args, TrainConfig)


def help_text(capsys) -> str:
    with pytest.raises(SystemExit):
        cli.main(["train", "--help"])
    return capsys.readouterr().out


def test_the_settings_a_resume_repeats_are_the_ones_it_always_did():
    assert RUN_SETTINGS == OLD_RUN_KEYS
    assert not hasattr(train_lib, "_RUN_KEYS")


def test_every_field_has_its_flag_and_the_flags_default_to_the_fields_defaults():
    cfg = parse(*REQUIRED)
    assert cfg == TrainConfig(model="m", output="out", train_file="pairs.jsonl")
    options = {s for a in parser()._subparsers._group_actions[0].choices["train"]._actions for s in a.option_strings}
    for field in dataclasses.fields(TrainConfig):
        name = field.name.replace("_", "-")
        assert (f"--no-{name}" if field.default is True else f"--{name}") in options, field.name
        assert field.metadata["help"], field.name


def test_help_lists_every_flag_with_its_help_and_default(capsys):
    text = help_text(capsys)
    options = text.split("options:")[1]
    entries = {}  # flag -> its help, the lines up to the next option
    for line in filter(str.strip, options.splitlines()):
        if line.lstrip().startswith("-"):
            current = line.split()[0].rstrip(",")
            entries[current] = line
        else:
            entries[current] += " " + line.strip()
    for field in dataclasses.fields(TrainConfig):
        name = field.name.replace("_", "-")
        flag = f"--no-{name}" if field.default is True else f"--{name}"
        entry = " ".join(entries[flag].split())
        assert " ".join(field.metadata["help"].split()) in entry, flag
        chosen = field.default is dataclasses.MISSING or field.metadata["one_of"]
        assert ("(default:" in entry) != bool(chosen), entry  # required / one-of flags have no default
    flat = " ".join(text.split())
    for shown in ("--batch-size B global batch size, all devices (default: 8)", "(default: 5e-5)",
                  "(default: 6% of the schedule)", "(default: every attention and MLP projection)",
                  "(--dataset NAME | --train-file FILE)", "--mode {full,lora}", "--skip-aware SPEC [SPEC ...]",
                  "--no-progress no progress bar"):
        assert shown in flat, shown


def test_every_flag_sets_its_field():
    cfg = parse("--model", "random:gpt2", "--output", "o", "--dataset", "common_gen", "--split", "validation",
                "--tokenizer", "bpe:300", "--source-field", "s", "--target-field", "t", "--limit", 5,
                "--eval-file", "e.jsonl", "--eval-split", "dev", "--eval-every", 3, "--eval-limit", 7,
                "--mode", "lora", "--epochs", 2, "--batch-size", 4, "--learning-rate", "1e-3",
                "--weight-decay", "0.01", "--warmup-steps", 6, "--max-grad-norm", "0.5", "--max-steps", 9,
                "--max-length", 64, "--lora-rank", 4, "--lora-alpha", 8, "--lora-targets", " attn.c_attn, c_proj,",
                "--seed", 11, "--bf16", "--skip-aware", "paper", "hsd:s=1,min=0,max=2", "--skip-aware-prob", "0.25",
                "--skip-aware-joint", "--skip-aware-distill", "0.5", "--skip-aware-view", "draft", "--resume", "--devices", 1,
                "--log-every", 2,
                "--save-every", 10, "--keep-checkpoints", 3, "--no-progress")
    assert cfg == TrainConfig(
        model="random:gpt2", output="o", dataset="common_gen", split="validation", tokenizer="bpe:300",
        source_field="s", target_field="t", limit=5, eval_file="e.jsonl", eval_split="dev", eval_every=3,
        eval_limit=7, mode="lora", epochs=2, batch_size=4, learning_rate=1e-3, weight_decay=0.01, warmup_steps=6,
        max_grad_norm=0.5, max_steps=9, max_length=64, lora_rank=4, lora_alpha=8.0,
        lora_targets=("attn.c_attn", "c_proj"), seed=11, bf16=True, skip_aware=("paper", "hsd:s=1,min=0,max=2"),
        skip_aware_prob=0.25, skip_aware_joint=True, skip_aware_distill=0.5, skip_aware_view="draft", resume=True,
        devices=1, log_every=2,
        save_every=10, keep_checkpoints=3, progress=False)
    changed = {f.name for f in dataclasses.fields(TrainConfig)
               if f.default is dataclasses.MISSING or getattr(cfg, f.name) != f.default}
    assert changed == {f.name for f in dataclasses.fields(TrainConfig)} - {"train_file"}  # the other of the pair
    assert isinstance(cfg.epochs, int) and isinstance(cfg.learning_rate, float)


def test_the_command_line_refuses_what_it_always_refused(capsys):
    with pytest.raises(HsdError, match="--lora-targets is empty; give a list such as attn.c_attn,mlp.c_fc"):
        parse(*REQUIRED, "--lora-targets", " , ")
    for argv in (["--model", "m", "--output", "o"],  # neither --dataset nor --train-file
                 [*REQUIRED, "--dataset", "xsum"],  # both
                 ["--output", "o", "--train-file", "p"],  # no --model
                 ["--model", "m", "--train-file", "p"],  # no --output
                 [*REQUIRED, "--mode", "half"], [*REQUIRED, "--epochs", "two"], [*REQUIRED, "--skip-aware"]):
        with pytest.raises(SystemExit) as stop:
            parse(*argv)
        assert stop.value.code == 2, argv
    err = capsys.readouterr().err
    assert "one of the arguments --dataset --train-file is required" in err
    assert "not allowed with argument" in err


def test_run_json_settings_keep_their_keys_and_values(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("pairs.jsonl").write_text("")
    cfg = TrainConfig(model="random:gpt2", output="o", train_file="pairs.jsonl", tokenizer="bpe:300",
                      lora_targets=("c_proj",), max_steps=3, eval_every=2)
    settings = train_lib._run_settings(cfg)
    assert tuple(settings) == OLD_RUN_KEYS
    assert settings == {
        "model": "random:gpt2", "tokenizer": "bpe:300", "dataset": None, "split": "train",
        "train_file": str((tmp_path / "pairs.jsonl").resolve()), "source_field": None, "target_field": None,
        "limit": None, "mode": "full", "epochs": 3, "batch_size": 8, "learning_rate": 5e-5, "weight_decay": 0.0,
        "warmup_steps": None, "max_grad_norm": 1.0, "max_length": None, "lora_rank": 16, "lora_alpha": 32.0,
        "lora_targets": ["c_proj"], "seed": 0, "bf16": False, "skip_aware": None, "skip_aware_prob": None,
        "skip_aware_joint": None, "skip_aware_distill": None, "skip_aware_view": None}
    aware = train_lib._run_settings(dataclasses.replace(cfg, skip_aware=("paper",), skip_aware_prob=0.3))
    assert aware["skip_aware"] == ["paper"] and aware["skip_aware_prob"] == 0.3


def test_an_old_run_json_still_matches_its_settings():
    """The small CommonGen run was recorded before --skip-aware; its settings still resume."""
    import json

    old = json.loads((Path(__file__).resolve().parents[1] / "eval/results/commongen_small/training/run.json")
                     .read_text())["settings"]
    assert set(old) == set(RUN_SETTINGS) - {"skip_aware", "skip_aware_prob", "skip_aware_joint",
                                          "skip_aware_distill", "skip_aware_view"}
    cfg = TrainConfig(output="o", **{k: tuple(v) if isinstance(v, list) else v for k, v in old.items()})
    now = train_lib._run_settings(cfg)
    assert [k for k in RUN_SETTINGS if old.get(k) != now[k]] == []


def test_batches_resume_where_they_stopped():
    """The loop's batches from step k are those an uninterrupted run meets at step k, across epochs."""
    rng = np.random.default_rng(0)
    tokens = [rng.integers(1, 100, n).astype(np.int32) for n in rng.integers(4, 40, 10)]
    encoded = data.Encoded(tokens, np.full(10, 2, np.int32), 64)
    cfg = TrainConfig(model="m", output="o", batch_size=4, seed=3)

    def batches(start, stop):
        run = types.SimpleNamespace(cfg=cfg, steps_per_epoch=data.steps_per_epoch(10, 4), start=start, stop=stop,
                                    train_data=encoded)
        return list(train_lib._batches(run))

    whole = batches(0, 7)  # 3 batches an epoch: two epochs and a step of the third
    assert [step for step, _ in whole] == list(range(7))
    for cut in (1, 3, 5):
        resumed = batches(0, cut) + batches(cut, 7)
        assert [s for s, _ in resumed] == list(range(7))
        for (_, a), (_, b) in zip(whole, resumed):
            assert all(np.array_equal(a[k], b[k]) for k in a)
    epoch = [b["tokens"][b["attention_mask"][:, 0]] for _, b in whole[:3]]
    assert sorted(map(tuple, (t[t > 0] for rows in epoch for t in rows))) == sorted(map(tuple, tokens))


def test_the_validation_source_names_the_split_or_the_file_and_the_limit(tmp_path):
    from hsd_jax.train.batches import validation_source

    cfg = TrainConfig(model="m", output="o", dataset="common_gen", eval_split="validation:selection")
    assert validation_source(cfg) == "common_gen (validation:selection)"
    limited = dataclasses.replace(cfg, eval_limit=40)
    assert validation_source(limited) == "common_gen (validation:selection), first 40 pairs"
    in_file = TrainConfig(model="m", output="o", train_file="t.jsonl", eval_file=str(tmp_path / "v.jsonl"))
    assert validation_source(in_file) == str(tmp_path.resolve() / "v.jsonl")
    assert validation_source(TrainConfig(model="m", output="o", dataset="common_gen")) is None
