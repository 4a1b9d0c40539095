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
import threading
import time
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


# ---------------------------------------------------------------- 9. every write failure is one line (issue 27)

ORBAX_FULL_DISK = ("Failed to write checkpoint: RESOURCE_EXHAUSTED: Error writing local file "
                   "\"{}/ocdbt.process_0/d/1f2e\": No space left on device [os_error_code='28'] "
                   "[source locations='tensorstore/internal/os/file_util_posix.cc:341']")


def only_checkpoints(out: Path) -> list[str]:
    """The finished checkpoints (an unfinished save leaves a temporary folder, not listed)."""
    return sorted((p.name for p in (out / "checkpoints").iterdir() if p.name.isdigit()), key=int)


def test_a_save_failing_in_orbax_s_background_thread_stops_the_run_in_one_line(model, pairs, tmp_path,
                                                                                 monkeypatch, capsys):
    # Orbax writes a checkpoint in a background thread while training goes on; on a full disk
    # TensorStore's ValueError ended that thread, Orbax only logged it (tracebacks) and the run
    # carried on to the next save believing it had a checkpoint.
    from orbax.checkpoint._src.checkpointers import async_checkpointer

    commit = async_checkpointer._background_wait_for_commit_futures

    failing: list = []  # the background thread of the step-4 save

    def full_disk_at_step_4(directory, commit_futures, *args, **kwargs):
        if Path(str(directory)).name == "4":
            failing.append(threading.current_thread())
            for writer in commit_futures:  # as TensorStore's failed writes end, before the error reaches here
                writer.result()
            raise ValueError(ORBAX_FULL_DISK.format(directory))
        return commit(directory, commit_futures, *args, **kwargs)

    monkeypatch.setattr(async_checkpointer, "_background_wait_for_commit_futures", full_disk_at_step_4)
    from hsd_jax import train as train_lib

    compiled = train_lib._compiled

    def step_5_outlasts_the_failed_save(*args):
        tx, schedule, train_step, eval_step = compiled(*args)
        calls = []

        def step(*a):
            calls.append(1)
            if len(calls) == 5:  # the step-4 save has failed by the time step 5 is dispatched
                deadline = time.monotonic() + 120  # however loaded the machine (a fixed sleep was not)
                while not failing and time.monotonic() < deadline:
                    time.sleep(0.01)
                failing[0].join(timeout=max(0.0, deadline - time.monotonic()))
            return train_step(*a)

        return tx, schedule, step, eval_step

    monkeypatch.setattr(train_lib, "_compiled", step_5_outlasts_the_failed_save)
    out = tmp_path / "run"
    assert train_cli(model, pairs, out, "--max-steps", 10) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert "could not write the checkpoint of step 4" in err and "No space left on device" in err, err
    assert "the last intact checkpoint is step 2" in err and "free some space, then --resume" in err, err
    assert only_checkpoints(out) == ["2"] and log_steps(out) == [1, 2, 3, 4]  # stopped at once, not at step 6
    monkeypatch.undo()  # space freed
    assert train_cli(model, pairs, out, "--max-steps", 6, "--resume") == 0
    assert log_steps(out) == [1, 2, 3, 4, 5, 6] and only_checkpoints(out) == ["4", "6"]


def _small_file_system(folder: Path, size: str) -> str | None:
    """Mounts a tmpfs of `size` on `folder`; why it cannot, or None."""
    if not sys.platform.startswith("linux") or os.geteuid() != 0:
        return "mounting a small file system needs root on Linux"
    folder.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)], capture_output=True,
                          text=True)
    return f"cannot mount a tmpfs here ({proc.stderr.strip()})" if proc.returncode else None


def test_a_real_full_disk_during_a_checkpoint_is_one_line_and_resume_completes(model, pairs, tmp_path, capfd):
    # A checkpoint of this model takes 18 MB: step 2's fits in 28 MB, step 4's does not.
    small = tmp_path / "small"
    why = _small_file_system(small, "28m")
    if why:
        pytest.skip(why)
    try:
        out = small / "run"
        assert train_cli(model, pairs, out, "--max-steps", 12) == 2
        err = capfd.readouterr().err
        assert len(err.splitlines()) == 1 and "Traceback" not in err, err
        assert "could not write the checkpoint of step 4" in err and "No space left on device" in err, err
        assert "the last intact checkpoint is step 2" in err and "free some space, then --resume" in err, err
        subprocess.run(["mount", "-o", "remount,size=200m", str(small)], check=True)  # space freed
        assert train_cli(model, pairs, out, "--max-steps", 12, "--resume") == 0
        assert log_steps(out) == list(range(1, 13)) and (out / "model.safetensors").is_file()
    finally:
        subprocess.run(["umount", str(small)], check=False)


def test_a_save_failing_at_once_stops_the_run_in_one_line(model, pairs, tmp_path, monkeypatch, capsys):
    import orbax.checkpoint as ocp

    save = ocp.CheckpointManager.save

    def full_disk_at_step_4(self, step, *args, **kwargs):
        if step == 4:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self.directory))
        return save(self, step, *args, **kwargs)

    monkeypatch.setattr(ocp.CheckpointManager, "save", full_disk_at_step_4)
    out = tmp_path / "run"
    assert train_cli(model, pairs, out, "--max-steps", 10) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "could not write the checkpoint of step 4" in err, err
    assert "the last intact checkpoint is step 2" in err and "free some space, then --resume" in err, err
    assert only_checkpoints(out) == ["2"] and log_steps(out) == [1, 2, 3, 4]


def test_saves_are_confirmed_at_the_first_check_after_they_end():
    """`_Saves.check` (run every step) raises as soon as a save has ended without its checkpoint."""
    from hsd_jax.train.stopping import SaveFailed, _Saves

    class Manager:
        steps, in_progress, error = [2], True, None

        def save(self, step, args):
            pass

        def is_saving_in_progress(self):
            return self.in_progress

        def wait_until_finished(self):
            if self.error:
                raise self.error

        def reload(self):
            pass

        def all_steps(self):
            return self.steps

    manager = Manager()
    saves = _Saves(manager)
    saves.save(4, state={})
    saves.check()  # still writing: the step goes on
    manager.in_progress, manager.error = False, ValueError(ORBAX_FULL_DISK.format("4"))
    with pytest.raises(SaveFailed) as failed:
        saves.check()
    assert failed.value.step == 4 and failed.value.cause is manager.error
    saves.check()  # reported once
    manager.error = None
    saves.save(6, state={})
    with pytest.raises(SaveFailed, match="step 6"):  # ended without raising, and without its checkpoint
        saves.check(wait=True)


def test_a_full_disk_while_writing_model_safetensors_is_one_line(model, pairs, tmp_path, monkeypatch, capsys):
    import safetensors.numpy
    from safetensors import SafetensorError

    def full_disk(*args, **kwargs):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(safetensors.numpy, "save_file", full_disk)
    out = tmp_path / "run"
    assert train_cli(model, pairs, out, "--max-steps", 2) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "SafetensorError" not in err, err
    assert f"could not write the model to {out} (No space left on device)" in err, err
    assert "the last intact checkpoint is step 2" in err and "--resume writes the model from it" in err, err
    monkeypatch.undo()
    assert train_cli(model, pairs, out, "--max-steps", 2, "--resume") == 0
    assert (out / "model.safetensors").is_file()


def test_bad_lora_targets_leave_no_folder_behind(model, pairs, tmp_path, capsys):
    out = tmp_path / "run"
    assert train_cli(model, pairs, out, "--mode", "lora", "--lora-targets", "q_proj", "--max-steps", 1) == 2
    err = capsys.readouterr().err
    assert "LoRA target 'q_proj' matches no projection" in err and len(err.splitlines()) == 1, err
    assert not out.exists()  # was: OUTPUT/checkpoints, so the corrected command was refused
    assert train_cli(model, pairs, out, "--mode", "lora", "--lora-targets", "c_attn", "--max-steps", 1) == 0


def test_the_model_files_get_the_mode_every_written_file_gets(two_steps):
    umask = os.umask(0o022)
    os.umask(umask)
    modes = {p.name: p.stat().st_mode & 0o777 for p in two_steps.iterdir() if p.is_file() and p.name != ".lock"}
    assert modes["model.safetensors"] == modes["config.json"] == 0o666 & ~umask, modes  # was 0600


def test_an_over_long_pair_is_cut_with_one_note(model, tmp_path, capsys):
    import logging

    gpt2 = shutil.copytree(model, tmp_path / "gpt2")  # with GPT-2's own tokenizer limit, which warns past it
    config = json.loads((gpt2 / "tokenizer_config.json").read_text())
    (gpt2 / "tokenizer_config.json").write_text(json.dumps({**config, "model_max_length": 1024}))
    long_pairs = data.write_jsonl([*PAIRS, ("dog " * 1500, "A dog.")], tmp_path / "long.jsonl")
    warned = []
    handler = logging.Handler()
    handler.emit = lambda record: warned.append(record.getMessage())
    logging.getLogger("transformers").addHandler(handler)
    try:
        assert train_cli(gpt2, long_pairs, tmp_path / "run", "--max-steps", 1) == 0
    finally:
        logging.getLogger("transformers").removeHandler(handler)
    # transformers' warning spoke of indexing errors, which the cut to fit prevents
    assert not [m for m in warned if "indexing errors" in m], warned
    assert (f"note: 1 of the 33 pairs in {long_pairs} does not fit the 128-token context (--max-length, at "
            "most the model's), so the end of its source is cut to fit; the target is kept whole"
            ) in capsys.readouterr().err


def test_the_progress_bar_shows_tokens_per_second_between_log_lines(model, pairs, tmp_path, monkeypatch):
    from hsd_jax import train as train_lib

    shown = []

    class Bar:
        def update(self, n):
            pass

        def set_postfix(self, **kwargs):
            shown.append(kwargs["tok_s"])

        def close(self):
            pass

    monkeypatch.setattr(train_lib, "_progress", lambda enabled, start, stop: Bar())
    assert train_cli(model, pairs, tmp_path / "run", "--max-steps", 3, "--log-every", 4) == 0
    assert len(shown) == 3 and all(float(tok_s) > 0 for tok_s in shown), shown  # was 0 on steps 1 and 2
