"""Training runs lose nothing and end in one clear line (issue 10).

A live run locks its folder; a resume checks the base weights, drops a torn log line,
clears unfinished Orbax saves and does nothing when the run is over; Ctrl-C and a full
disk name the checkpoint a --resume continues from; the learning rate is shown.

Every run is a 2-layer, width-32 GPT-2 with the GPT-2 tokenizer on 32 short pairs,
batch 4 (8 steps an epoch, 16 in all), with the same optimizer settings everywhere, so
the one compiled step is reused by every run of the module.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from hsd_jax import cli, data
from tests.conftest import make_gpt2

PAIRS = [
    ("dog frisbee catch throw", "A dog leaps to catch a frisbee."),
    ("ski mountain skier", "A skier skis down the mountain."),
    ("cat sit mat", "The cat sits on the mat."),
    ("bread bake oven", "She bakes bread in the oven."),
] * 8
SETTINGS = ["--batch-size", "4", "--epochs", "2", "--learning-rate", "1e-3", "--warmup-steps", "4", "--devices", "1",
            "--save-every", "2", "--no-progress"]

HOLD_LOCK = """
import fcntl, os, sys, time
handle = open(sys.argv[1], "a+")
fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
handle.truncate(0); handle.write(str(os.getpid())); handle.flush()
print("locked", flush=True)
time.sleep(600)
"""


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny2")
    make_gpt2(folder, layers=2, vocab=50257, tokenizer=True)
    return folder


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    return data.write_jsonl(PAIRS, tmp_path_factory.mktemp("pairs") / "pairs.jsonl")


def train_cli(model, pairs, out, *extra) -> int:
    args = ["train", "--model", str(model), "--train-file", str(pairs), *SETTINGS, *map(str, extra),
            "--output", str(out)]
    try:
        return cli.main(args)
    except KeyboardInterrupt:  # would stop pytest itself
        pytest.fail("KeyboardInterrupt escaped the train command")


@pytest.fixture(scope="module")
def two_steps(model, pairs, tmp_path_factory):
    """A run stopped after 2 of 16 steps (a checkpoint at step 2); tests work on copies."""
    out = tmp_path_factory.mktemp("runs") / "two"
    assert train_cli(model, pairs, out, "--max-steps", 2) == 0
    return out


def copy_of(run: Path, tmp_path: Path) -> Path:
    target = tmp_path / "run"
    shutil.copytree(run, target, ignore=shutil.ignore_patterns(".lock"))
    return target


def log_steps(out: Path) -> list[int]:
    from hsd_jax.train import read_log

    return [r["step"] for r in read_log(out)]


# ---------------------------------------------------------------- 1. the lock on --output


def test_a_folder_in_use_by_a_live_run_is_refused_and_a_killed_run_leaves_no_lock(two_steps, model, pairs,
                                                                                   tmp_path, capsys):
    out = copy_of(two_steps, tmp_path)
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(out / ".lock")], stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert train_cli(model, pairs, out, "--max-steps", 3, "--resume") == 2
        err = capsys.readouterr().err
        assert f"in use by another training run (process {holder.pid})" in err and len(err.splitlines()) == 1
        assert log_steps(out) == [1, 2]  # nothing was written
    finally:
        holder.kill()  # SIGKILL: the OS drops its lock
        holder.wait()
    assert train_cli(model, pairs, out, "--max-steps", 3, "--resume") == 0
    assert log_steps(out) == [1, 2, 3]


def test_a_failed_start_leaves_no_folder_behind(model, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert cli.main(["train", "--model", str(model), "--train-file", str(empty), *SETTINGS,
                     "--output", str(tmp_path / "new")]) == 2
    assert not (tmp_path / "new").exists()


# ---------------------------------------------------------------- 2. the base weights


def test_resume_refuses_changed_base_weights(pairs, tmp_path, capsys):
    base = tmp_path / "base"
    make_gpt2(base, layers=2, vocab=50257, tokenizer=True)
    out = tmp_path / "run"
    assert train_cli(base, pairs, out, "--max-steps", 1) == 0
    assert len(json.loads((out / "run.json").read_text())["base_weights"]["sha256"]) == 64
    make_gpt2(base, layers=2, vocab=50257, tokenizer=True, seed=1)  # the same path, other weights
    capsys.readouterr()
    assert train_cli(base, pairs, out, "--max-steps", 2, "--resume") == 2
    err = capsys.readouterr().err
    assert "base model's weights differ" in err and "layers/attn/c_attn/kernel" in err, err
    assert log_steps(out) == [1]


# ---------------------------------------------------------------- 3. --keep-checkpoints 0


def test_keep_checkpoints_zero_is_refused(model, pairs, tmp_path, capsys):
    assert train_cli(model, pairs, tmp_path / "run", "--keep-checkpoints", 0) == 2
    assert "--keep-checkpoints must be at least 1" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------- 4. nothing left to do


def test_resume_of_a_finished_run_says_so_and_keeps_the_model(model, pairs, tmp_path, capsys):
    out = tmp_path / "run"
    assert train_cli(model, pairs, out) == 0
    written = (out / "model.safetensors").stat().st_mtime_ns
    capsys.readouterr()
    assert train_cli(model, pairs, out, "--resume") == 0
    printed = capsys.readouterr().out
    assert printed.strip() == f"the run in {out} already finished at step 16 of 16; nothing to do", printed
    assert (out / "model.safetensors").stat().st_mtime_ns == written


# ---------------------------------------------------------------- 5. torn log, corrupt run.json


def test_a_torn_last_log_line_is_dropped_with_a_note(two_steps, model, pairs, tmp_path, capsys):
    out = copy_of(two_steps, tmp_path)
    with (out / "train_log.jsonl").open("a") as log:
        log.write('{"step": 3, "epoch": 0.37')  # killed mid-write
    assert log_steps(out) == [1, 2]
    assert train_cli(model, pairs, out, "--max-steps", 3, "--resume") == 0
    assert "torn" in capsys.readouterr().err
    assert log_steps(out) == [1, 2, 3]


def test_a_corrupt_run_file_is_one_clear_line(two_steps, model, pairs, tmp_path, capsys):
    out = copy_of(two_steps, tmp_path)
    (out / "run.json").write_text('{"settings": {"model": ')
    assert train_cli(model, pairs, out, "--max-steps", 3, "--resume") == 2
    err = capsys.readouterr().err
    assert f"{out / 'run.json'} is not valid JSON" in err and "--output" in err and len(err.splitlines()) == 1


# ---------------------------------------------------------------- 6. unfinished Orbax saves


def test_resume_removes_unfinished_checkpoints(two_steps, model, pairs, tmp_path, capsys):
    out = copy_of(two_steps, tmp_path)
    stale = out / "checkpoints" / "4.orbax-checkpoint-tmp-1712345678"
    (stale / "state").mkdir(parents=True)
    (stale / "state" / "half").write_text("x")
    assert train_cli(model, pairs, out, "--max-steps", 3, "--resume") == 0
    assert not stale.exists()
    assert "4.orbax-checkpoint-tmp-1712345678" in capsys.readouterr().err
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["2", "3"]


# ---------------------------------------------------------------- 7. Ctrl-C, a full disk


def test_ctrl_c_names_the_intact_checkpoint_and_exits_130(model, pairs, tmp_path, monkeypatch, capsys):
    from hsd_jax import train as train_lib

    compiled = train_lib._compiled

    def interrupted_at_the_fourth_step(*args):
        tx, schedule, train_step, eval_step = compiled(*args)
        calls = []

        def step(*a):
            calls.append(1)
            if len(calls) == 4:
                raise KeyboardInterrupt
            return train_step(*a)

        return tx, schedule, step, eval_step

    monkeypatch.setattr(train_lib, "_compiled", interrupted_at_the_fourth_step)
    out = tmp_path / "run"
    assert train_cli(model, pairs, out) == 130
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    assert "last intact checkpoint is step 2" in err and "--resume" in err, err
    monkeypatch.undo()
    assert train_cli(model, pairs, out, "--max-steps", 4, "--resume") == 0
    assert log_steps(out) == [1, 2, 3, 4]


def test_a_full_disk_while_exporting_names_the_intact_checkpoint(model, pairs, tmp_path, monkeypatch, capsys):
    from hsd_jax import checkpoint

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(checkpoint, "save_pretrained", full_disk)
    out = tmp_path / "run"
    assert train_cli(model, pairs, out, "--max-steps", 2) == 2
    err = capsys.readouterr().err
    assert "No space left on device" in err and "last intact checkpoint is step 2" in err, err
    assert len(err.splitlines()) == 1 and (out / "checkpoints" / "2").is_dir()
    monkeypatch.undo()
    assert train_cli(model, pairs, out, "--max-steps", 2, "--resume") == 0  # writes the model it could not
    assert "wrote the model of step 2" in capsys.readouterr().out
    assert (out / "model.safetensors").is_file()


# ---------------------------------------------------------------- 8. the learning rate is visible


def test_the_learning_rate_is_shown_next_to_the_loss(model, pairs, tmp_path, monkeypatch, capsys):
    from hsd_jax import train as train_lib

    postfixes = []

    class Bar:
        def update(self, n):
            pass

        def set_postfix(self, **kwargs):
            postfixes.append(kwargs)

        def close(self):
            pass

    monkeypatch.setattr(train_lib, "_progress", lambda enabled, start, stop: Bar())
    assert train_cli(model, pairs, tmp_path / "run", "--max-steps", 2) == 0
    assert [p["lr"] for p in postfixes] == ["0.00e+00", "2.50e-04"]  # steps 1, 2 of a 4-step warm-up from 0
    summary = capsys.readouterr().out
    assert "last loss" in summary and "at learning rate 2.50e-04 (still in warm-up, which lasts 4 of the 16 steps)" \
        in summary, summary


def test_help_says_how_long_warm_up_is(capsys):
    with pytest.raises(SystemExit):
        cli.main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "peak AdamW learning rate, reached after warm-up (6% of the schedule unless --warmup-steps)" in text
