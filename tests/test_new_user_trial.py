"""Issue 10 checked again, as a new user would: every command pushed with signals, bad
output paths, bad input files and broken model configs. Each test failed on the code
before its fix: SIGTERM ended runs without saving or saying so, a system error was a
traceback, an output path in /proc or a device passed the checks (`--output /dev/full`
replaced the device node), `random:config.json` skipped the config checks, ...
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import hsd_jax
from hsd_jax import cli, data, io
from hsd_jax.errors import HsdError
from tests.conftest import one_line, run_cli

REPO = Path(__file__).resolve().parents[1]
PROMPTS = ["one", "two words", "three little words", "four"]


@pytest.fixture(scope="module")
def model(text_model_dir):
    return text_model_dir


@pytest.fixture
def prompt_file(tmp_path):
    src = tmp_path / "in.txt"
    src.write_text("\n".join(PROMPTS) + "\n")
    return src


def spawn(*argv, cwd: Path, **popen) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "JAX_PLATFORMS": "cpu"}
    return subprocess.Popen([sys.executable, "-m", "hsd_jax.cli", *map(str, argv)], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen)


def wait_for(condition, proc: subprocess.Popen, seconds: float = 240) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        if proc.poll() is not None:
            pytest.fail(f"the command ended ({proc.returncode}) first: {proc.stderr.read()}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail("timed out")
        time.sleep(0.1)


# --- SIGTERM is Ctrl-C, with its own exit code ------------------------------------------

SIGTERM_IN_A_COMMAND = """
import os, signal, sys, time
import hsd_jax.commands.schedule
from hsd_jax import cli

def terminated(args):
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(60)  # the handler raises long before this ends
    return 0

hsd_jax.commands.schedule.run = terminated
code = cli.main(["schedule", "vanilla"])
print(signal.getsignal(signal.SIGTERM) is signal.SIG_DFL)  # given back after the command
sys.exit(code)
"""


def test_sigterm_in_any_command_is_one_line_and_exit_143(tmp_path):
    # In a process of its own: before the fix, SIGTERM killed whatever process ran the command.
    proc = subprocess.run([sys.executable, "-c", SIGTERM_IN_A_COMMAND], cwd=tmp_path, capture_output=True,
                          text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == cli.TERMINATED == 143, proc.stderr
    assert proc.stderr == "hsd-jax schedule: interrupted\n" and proc.stdout == "True\n"


def test_sigterm_during_generate_keeps_the_rows_and_resume_finishes(model, tmp_path):
    prompts = tmp_path / "many.txt"
    prompts.write_text("".join(f"prompt {i}\n" for i in range(400)))
    out = tmp_path / "out.jsonl"
    argv = ["generate", "--model", model, "--input-file", prompts, "--output", out, "--batch-size", "1",
            "--max-new-tokens", "8", "--no-eos"]
    proc = spawn(*argv, cwd=tmp_path)
    wait_for(lambda: io.partial_path(out).exists(), proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    assert "Traceback" not in err and "rows are safe in" in err and "--resume" in err, err
    saved = io.read_jsonl_rows(io.partial_path(out))
    assert saved and [r["prompt"] for r in saved] == [f"prompt {i}" for i in range(len(saved))]
    assert not out.exists()


def test_sigterm_during_training_saves_the_step_it_reached_and_resume_continues_from_it(model, tmp_path):
    pairs = data.write_jsonl([(f"cat dog {i}", f"the cat sees dog {i}.") for i in range(2000)], tmp_path / "p.jsonl")
    out = tmp_path / "run"
    argv = ["train", "--model", model, "--train-file", pairs, "--output", out, "--batch-size", "2", "--epochs", "5",
            "--save-every", "100000", "--log-every", "1", "--no-progress"]
    proc = spawn(*argv, cwd=tmp_path)
    log = out / "train_log.jsonl"
    wait_for(lambda: log.exists() and len(log.read_text().splitlines()) >= 3, proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    # Before the fix every step since the last --save-every was lost: "no checkpoint was written yet".
    steps = [json.loads(line)["step"] for line in log.read_text().splitlines()]
    reached = steps[-1]
    assert steps == list(range(1, reached + 1)) and reached < 5000
    assert "Traceback" not in err and f"last intact checkpoint is step {reached} " in err and "--resume" in err, err
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [str(reached)]

    proc = spawn(*argv, "--resume", "--max-steps", reached + 2, cwd=tmp_path)
    _, err = proc.communicate(timeout=240)
    assert proc.returncode == 0, err
    assert f"from step {reached}" in err
    assert [json.loads(line)["step"] for line in log.read_text().splitlines()] == list(range(1, reached + 3))


def test_an_ignored_sigint_leaves_training_running(model, tmp_path):
    # A script's `hsd-jax train ... &` starts with SIGINT ignored: stopping there (and
    # exporting a model of half the steps as if finished) would be a surprise.
    pairs = data.write_jsonl([(f"cat dog {i}", f"the cat sees dog {i}.") for i in range(200)], tmp_path / "p.jsonl")
    out = tmp_path / "run"
    proc = spawn("train", "--model", model, "--train-file", pairs, "--output", out, "--batch-size", "2",
                 "--epochs", "1", "--log-every", "1", "--no-progress", cwd=tmp_path,
                 preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    log = out / "train_log.jsonl"
    wait_for(lambda: log.exists() and len(log.read_text().splitlines()) >= 3, proc)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=240)
    assert proc.returncode == 0, err
    assert [json.loads(line)["step"] for line in log.read_text().splitlines()][-1] == 100


SIGTERM_INSIDE_A_SAVE = """
import os, signal, sys
import orbax.checkpoint as ocp
from hsd_jax import cli

save = ocp.CheckpointManager.save

def save_after_a_signal(self, step, *args, **kwargs):
    if step == 4:  # the signal lands while Orbax starts the save's writer threads
        os.kill(os.getpid(), signal.SIGTERM)
    return save(self, step, *args, **kwargs)

ocp.CheckpointManager.save = save_after_a_signal
sys.exit(cli.main(sys.argv[1:]))
"""


def test_sigterm_inside_a_checkpoint_save_finishes_that_save_first(model, tmp_path):
    # Before the fix the interrupt cut the save short: its writer threads outlived
    # `wait_until_finished` and died at exit with a traceback (a flaky CI failure).
    pairs = data.write_jsonl([(f"cat dog {i}", f"the cat sees dog {i}.") for i in range(400)], tmp_path / "p.jsonl")
    out = tmp_path / "run"
    argv = ["train", "--model", model, "--train-file", pairs, "--output", out, "--batch-size", "4",
            "--epochs", "1", "--save-every", "2", "--no-progress"]
    proc = subprocess.run([sys.executable, "-c", SIGTERM_INSIDE_A_SAVE, *map(str, argv)], cwd=tmp_path,
                          capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 143, proc.stderr
    assert "Traceback" not in proc.stderr and "last intact checkpoint is step 4" in proc.stderr, proc.stderr
    assert (out / "checkpoints" / "4").is_dir() and not (out / "checkpoints" / "6").exists()


def test_resume_refuses_rows_made_with_other_options(model, prompt_file, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out.jsonl"
    argv = ["generate", "--model", model, "--input-file", prompt_file, "--output", out, "--batch-size", "2"]
    append = io.JsonlAppender.append

    def interrupted_after_the_first_batch(self, rows):
        if self.written:
            raise KeyboardInterrupt
        append(self, rows)

    monkeypatch.setattr(io.JsonlAppender, "append", interrupted_after_the_first_batch)
    assert run_cli([*argv, "--max-new-tokens", "3"]) == 130
    monkeypatch.setattr(io.JsonlAppender, "append", append)
    capsys.readouterr()
    # was: decoded the rest with 2 tokens and the schedule, under rows of 3 tokens and vanilla
    assert run_cli([*argv, "--max-new-tokens", "2", "--schedule", "hsd:s=1,min=0,max=1", "--resume"]) == 2
    err = one_line(capsys)
    assert "max_new_tokens: 3 then, 2 now" in err and "schedule: 'vanilla' then" in err
    assert len(io.read_jsonl_rows(io.partial_path(out))) == 2
    assert run_cli([*argv, "--max-new-tokens", "3", "--batch-size", "1", "--resume"]) == 0  # batch size may change
    assert len(io.read_jsonl_rows(out)) == 4 and not io.settings_path(out).exists()


def test_a_negative_demo_seed_is_one_line_and_makes_no_folder(tmp_path, capsys):
    assert run_cli(["demo", "--smoke", "--seed", "-1", "--output", tmp_path / "d"]) == 2
    assert "--seed must be a whole number from 0" in one_line(capsys)  # was: a traceback, and a demo folder
    assert not (tmp_path / "d").exists()


def test_an_interrupted_demo_says_how_to_run_it_again(tmp_path, monkeypatch, capsys):
    import hsd_jax.demo

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(hsd_jax.demo, "run_demo", interrupted)
    assert run_cli(["demo", "--smoke", "--output", tmp_path / "d"]) == 130
    # was: "hsd-jax demo: interrupted", and a rerun was refused ("holds an earlier demo"); now a rerun continues it
    assert f"`hsd-jax demo --smoke --output {tmp_path / 'd'}` continues it where it stopped" in one_line(capsys)


def test_a_finished_output_is_not_replaced_without_overwrite(model, prompt_file, tmp_path, capsys):
    out = tmp_path / "out.jsonl"
    out.write_text(json.dumps({"prompt": "hours of decoding"}) + "\n")
    argv = ["generate", "--model", model, "--input-file", prompt_file, "--output", out, "--max-new-tokens", "2"]
    assert run_cli(argv) == 2  # was: replaced without a word, as eval, train and demo never do
    assert "--overwrite" in one_line(capsys) and io.read_jsonl_rows(out) == [{"prompt": "hours of decoding"}]
    assert run_cli([*argv, "--overwrite"]) == 0
    assert [r["prompt"] for r in io.read_jsonl_rows(out)] == PROMPTS


def test_a_closed_pipe_does_not_leave_the_output_file_unfinished(model, prompt_file, tmp_path):
    """`hsd-jax generate ... --output o.jsonl --json | head -1`: the reader leaves, the file is still written
    (it ended at the first print with exit 0, o.jsonl never written and nothing said)."""
    out = tmp_path / "out.jsonl"
    proc = spawn("generate", "--model", model, "--input-file", prompt_file, "--output", out, "--json",
                 "--batch-size", "1", "--max-new-tokens", "2", cwd=tmp_path)
    proc.stdout.close()  # no reader: every write to stdout fails with EPIPE
    err = proc.stderr.read()
    assert proc.wait(timeout=240) == 0 and "Traceback" not in err, err
    assert [r["prompt"] for r in io.read_jsonl_rows(out)] == PROMPTS


def test_a_prompt_too_long_is_found_before_any_batch_decodes(model, tmp_path, monkeypatch, capsys):
    import importlib

    gen = importlib.import_module("hsd_jax.generate")
    prompts = tmp_path / "in.txt"
    prompts.write_text("short\n" * 6 + "word " * 200 + "\n")  # 128 positions: the last cannot fit
    monkeypatch.setattr(gen, "generate", lambda *a, **k: pytest.fail("a batch was decoded"))
    assert run_cli(["generate", "--model", model, "--input-file", prompts, "--output", tmp_path / "out.jsonl",
                    "--batch-size", "2", "--max-new-tokens", "8"]) == 2
    # was: found after decoding the 6 before it
    assert "prompt 7 of 7 is 201 tokens" in one_line(capsys)


def test_a_batch_larger_than_the_file_decodes_only_the_file(model, prompt_file, tmp_path, monkeypatch):
    import importlib

    gen = importlib.import_module("hsd_jax.generate")
    real, sizes = gen.generate, []
    monkeypatch.setattr(gen, "generate", lambda *a, **k: sizes.append(len(k["input_ids"])) or real(*a, **k))
    assert run_cli(["generate", "--model", model, "--input-file", prompt_file, "--output", tmp_path / "o.jsonl",
                    "--batch-size", "50", "--max-new-tokens", "2"]) == 0
    assert sizes == [len(PROMPTS)]  # was: [50], 46 copies of the last prompt decoded for nothing


# --- system errors are one line ---------------------------------------------------------

def test_an_os_error_is_one_line_naming_the_path(monkeypatch, capsys):
    import hsd_jax.commands.schedule

    def denied(args):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), "/data/out.png")

    monkeypatch.setattr(hsd_jax.commands.schedule, "run", denied)
    assert run_cli(["schedule", "vanilla"]) == 2
    assert one_line(capsys) == "hsd-jax schedule: error: /data/out.png: Permission denied\n"


def test_a_full_disk_during_generate_names_the_safe_rows(model, prompt_file, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out.jsonl"
    append = io.JsonlAppender.append

    def full_after_the_first_batch(self, rows):
        if self.written:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self.partial))
        append(self, rows)

    monkeypatch.setattr(io.JsonlAppender, "append", full_after_the_first_batch)
    assert run_cli(["generate", "--model", model, "--input-file", prompt_file, "--output", out,
                    "--batch-size", "2", "--max-new-tokens", "2"]) == 2
    err = one_line(capsys)
    assert "No space left on device" in err and "free some space" in err
    assert "2 of 4 rows are safe in" in err and "--resume" in err
    assert len(io.read_jsonl_rows(io.partial_path(out))) == 2


@pytest.mark.skipif(not Path("/proc/self/mem").exists(), reason="needs Linux /proc")
def test_an_unreadable_prompt_file_is_one_line(tmp_path, capsys, no_model_load):
    assert run_cli(["generate", "--model", tmp_path, "--input-file", "/proc/self/mem"]) == 2
    assert "cannot read input file /proc/self/mem" in one_line(capsys)


def test_a_full_disk_during_eval_names_the_saved_rows_and_resume(model, tmp_path, monkeypatch, capsys):
    import hsd_jax.evaluate

    dev = data.write_jsonl([("cat dog", "a cat and a dog"), ("sun sky", "the sun in the sky")], tmp_path / "dev.jsonl")
    write_jsonl, calls = hsd_jax.evaluate.write_jsonl, []

    def full_at_the_second_row(path, rows):
        calls.append(path)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        write_jsonl(path, rows)

    monkeypatch.setattr(hsd_jax.evaluate, "write_jsonl", full_at_the_second_row)
    assert run_cli(["eval", "--model", model, "--eval-file", dev, "--schedules", "vanilla", "hsd:s=1,min=0,max=1",
                    "--num-beams", "1", "--max-new-tokens", "2", "--no-bertscore", "--output", tmp_path / "ev"]) == 2
    err = one_line(capsys)  # was: "...: No space left on device" alone, with no word of what was kept
    assert "No space left on device" in err and "1 finished row saved" in err and "--resume" in err


# --- output paths -------------------------------------------------------------------------

@pytest.mark.skipif(not Path("/proc/version").exists(), reason="needs Linux /proc")
@pytest.mark.parametrize("path", ["/proc/version", "/proc/hsd-out.jsonl"])
def test_an_output_where_no_file_can_be_made_fails_before_the_model_loads(path, prompt_file, capsys,
                                                                          no_model_load):
    # root passes os.access everywhere, and /proc claims to be writable: only a real file tells
    assert run_cli(["generate", "--model", "m", "--input-file", prompt_file, "--output", path]) == 2
    assert "cannot create a file in /proc" in one_line(capsys)


def test_an_output_that_is_a_pipe_or_device_is_refused_and_left_alone(tmp_path, prompt_file, capsys,
                                                                      no_model_load):
    fifo = tmp_path / "fifo.jsonl"
    os.mkfifo(fifo)  # like /dev/full or a terminal: the atomic rename would replace the node itself
    assert run_cli(["generate", "--model", "m", "--input-file", prompt_file, "--output", fifo]) == 2
    assert "is not a regular file" in one_line(capsys)
    assert fifo.is_fifo()


def test_an_output_through_a_symlink_writes_the_target_and_keeps_the_link(model, tmp_path):
    link, target = tmp_path / "link.jsonl", tmp_path / "target.jsonl"
    link.symlink_to(target.name)
    assert run_cli(["generate", "--model", model, "--prompt", "hi", "--max-new-tokens", "2",
                    "--output", link]) == 0
    assert link.is_symlink() and len(io.read_jsonl_rows(target)) == 1
    io.write_text(link, "x\n")
    assert link.is_symlink() and target.read_text() == "x\n"


def test_stale_temporary_files_of_a_killed_append_are_removed(tmp_path):
    out = tmp_path / "out.jsonl"
    stale = tmp_path / ".out.jsonl.partial.abc123.tmp"  # what kill -9 mid-append leaves
    stale.write_text('{"prompt": "half')
    io.JsonlAppender(out).append([{"prompt": "a"}])
    assert not stale.exists() and io.read_jsonl_rows(io.partial_path(out)) == [{"prompt": "a"}]


@pytest.mark.skipif(not Path("/proc/version").exists(), reason="needs Linux /proc")
def test_schedule_checks_the_plot_path_before_printing(capsys):
    assert run_cli(["schedule", "hsd:s=1,min=0,max=3", "--layers", "4", "--steps", "4",
                    "--plot", "/proc/hsd.png"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and "--plot /proc/hsd.png" in err


def test_bench_checks_the_json_path_before_timing(tmp_path, monkeypatch, capsys):
    from hsd_jax import bench

    monkeypatch.setattr(bench, "run_suite", lambda *a, **k: pytest.fail("the suite ran"))
    (tmp_path / "file").write_text("")
    assert run_cli(["bench", "--dry-run", "--json", tmp_path / "file" / "x.json"]) == 2
    assert "--json" in one_line(capsys)


@pytest.mark.parametrize("argv, message", [
    (["--suites-file", "README.md"], "is not a Python file"),
    (["--max-seconds", "-1"], "--max-seconds must be 0 or more"),
])
def test_bench_option_errors(argv, message, monkeypatch, capsys):
    from hsd_jax import bench

    monkeypatch.setattr(bench, "run_suite", lambda *a, **k: pytest.fail("the suite ran"))
    monkeypatch.chdir(REPO)
    assert run_cli(["bench", "--dry-run", *argv]) == 2
    assert message in one_line(capsys)


def test_schedule_refuses_a_mask_too_large_to_build(capsys):
    # was: 10**10 cells allocated (memory exhausted, or minutes of swapping)
    assert run_cli(["schedule", "vanilla", "--layers", "100000", "--steps", "100000"]) == 2
    assert "is 10,000,000,000 cells" in one_line(capsys)


def test_an_interrupted_bench_names_the_file_with_the_finished_cases(tmp_path, monkeypatch, capsys):
    from hsd_jax import bench

    out = tmp_path / "b.json"

    def one_case_then_interrupted(cases, repeats, json_path, **kwargs):
        io.write_json(json_path, {"cases": ["first"]})
        raise KeyboardInterrupt

    monkeypatch.setattr(bench, "run_suite", one_case_then_interrupted)
    monkeypatch.chdir(REPO)
    assert run_cli(["bench", "--dry-run", "--json", out]) == 130
    assert f"the finished cases are in {out}" in one_line(capsys)  # was: "interrupted" alone


def test_an_empty_prompt_is_counted_from_one(capsys, no_model_load):
    assert run_cli(["generate", "--model", "m", "--prompt", "a", "--prompt", ""]) == 2
    assert "--prompt number 2 of 2 is empty" in one_line(capsys)


# --- numeric flags ------------------------------------------------------------------------

@pytest.mark.parametrize("flag, value, message", [
    ("--limit", "0", "--limit must be at least 1, got 0"),  # was: every pair
    ("--limit", "-1", "--limit must be at least 1, got -1"),  # was: all but the last pair
    ("--eval-limit", "0", "--eval-limit must be at least 1"),
    ("--max-length", "0", "--max-length must be at least 1"),  # was: the model's context
    ("--lora-rank", "0", "--lora-rank must be at least 1"),  # was: ZeroDivisionError
    ("--devices", "0", "--devices must be at least 1"),
    ("--eval-every", "-1", "--eval-every must be 0 or more"),  # was: ignored
    ("--warmup-steps", "-1", "--warmup-steps must be 0 or more"),
    ("--learning-rate", "-1", "--learning-rate must be a number above 0"),  # was: trained uphill
    ("--learning-rate", "nan", "--learning-rate must be a number above 0"),
    ("--max-grad-norm", "0", "--max-grad-norm must be a number above 0"),  # was: every update zeroed
    ("--lora-alpha", "inf", "--lora-alpha must be a number above 0"),
    ("--weight-decay", "-0.1", "--weight-decay must be a number 0 or more"),
    ("--seed", "-1", "--seed must be a whole number from 0"),  # was: numpy's ValueError traceback
])
def test_train_refuses_numbers_that_would_train_wrongly(flag, value, message, tmp_path, capsys):
    assert run_cli(["train", "--model", "m", "--train-file", "p.jsonl", "--output", tmp_path / "run",
                    flag, value]) == 2
    assert message in one_line(capsys)
    assert not (tmp_path / "run").exists()


def test_bertscore_layers_zero_is_refused_not_read_as_the_folders_depth(model):
    from hsd_jax.metrics import BertScorer

    with pytest.raises(HsdError, match="--bertscore-layers must be at least 1, got 0"):
        BertScorer(str(model), 0)  # was: "config.json has no num_hidden_layers; pass --bertscore-layers N"


def test_a_bertscore_folder_that_does_not_exist_is_one_line(tmp_path):
    from hsd_jax.metrics import BertScorer

    with pytest.raises(HsdError, match="is neither a folder nor a hub id"):  # was: HFValidationError
        BertScorer(str(tmp_path / "no" / "such" / "folder"))


@pytest.mark.parametrize("output, message", [
    ("/proc/hsd-run", "cannot create a file in /proc"),  # was: "/proc/hsd-run: No such file or directory"
    ("{file}/run", "which is a file, not a directory"),
])
def test_train_checks_its_output_folder_first(output, message, tmp_path, capsys):
    if output.startswith("/proc") and not Path("/proc/version").exists():
        pytest.skip("needs Linux /proc")
    (tmp_path / "file").write_text("")
    output = output.format(file=tmp_path / "file")
    assert run_cli(["train", "--model", "m", "--train-file", "p.jsonl", "--output", output]) == 2
    assert message in one_line(capsys)


def test_a_bpe_too_small_names_the_flag_as_written(tmp_path, capsys):
    (tmp_path / "p.jsonl").write_text('{"source": "a", "target": "b"}\n')
    assert run_cli(["train", "--model", "random:gpt2", "--tokenizer", "bpe:10", "--train-file", tmp_path / "p.jsonl",
                    "--output", tmp_path / "run"]) == 2
    assert "--tokenizer bpe:10: a byte-level BPE needs at least 257 tokens" in one_line(capsys)  # was: --vocab-size


# --- configs: random:config.json gets a loaded folder's checks ------------------------------

@pytest.fixture(scope="module")
def tokenizer(model):
    return hsd_jax.load(model).tokenizer


@pytest.mark.parametrize("config, message", [
    ({"n_layer": 2.5}, "n_layer in .* is 2.5, not a positive whole number"),
    ({"n_layer": 0}, "n_layer in .* is 0"),
    ({"n_layer": True}, "n_layer in .* is True"),
    ({"n_layer": "2"}, "n_layer in .* is '2'"),
    ({"n_embd": 32, "n_head": 3}, "n_head = 3 does not divide n_embd = 32"),
    ({"n_inner": 0}, "n_inner in .* is 0"),
    ({"vocab_size": "big"}, "vocab_size in .* is 'big'"),
    ({"activation_function": "swish2"}, "activation 'swish2'"),
    ({"layer_norm_epsilon": "x"}, "LayerNorm epsilon"),
    ({"tie_word_embeddings": False}, "tie_word_embeddings=False"),
])
def test_a_random_config_is_checked_like_a_folders(config, message, tokenizer, tmp_path):
    from hsd_jax.train import random_gpt2

    path = tmp_path / "config.json"
    path.write_text(json.dumps({"n_layer": 2, "n_head": 2, "n_embd": 32, "n_positions": 64, **config}))
    with pytest.raises(HsdError, match=message):
        random_gpt2(str(path), tokenizer, 0)


def test_a_random_config_that_is_not_an_object_is_one_line(model, tmp_path, capsys):
    (tmp_path / "config.json").write_text("[1, 2]")
    (tmp_path / "p.jsonl").write_text('{"source": "a", "target": "b"}\n')
    assert run_cli(["train", "--model", f"random:{tmp_path / 'config.json'}", "--tokenizer", model,
                    "--train-file", tmp_path / "p.jsonl", "--output", tmp_path / "run"]) == 2
    assert "holds a JSON list, not an object" in one_line(capsys)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("config, message", [
    ({"activation_function": "swish2"}, "activation 'swish2' in .*config.json"),
    ({"layer_norm_epsilon": "x"}, "LayerNorm epsilon in .*config.json is 'x'"),  # was blamed on the tokenizer
    ({"eos_token_id": 999999}, "eos_token_id in .*config.json is 999999"),  # rows never stopped
    ({"eos_token_id": [1, 2]}, "eos_token_id in .*config.json is \\[1, 2\\]"),
    ({"tie_word_embeddings": False}, "tie_word_embeddings=False"),  # a separate lm_head was ignored
])
def test_a_folder_config_with_values_jax_cannot_use(config, message, model, tmp_path):
    folder = tmp_path / "m"
    shutil.copytree(model, folder)
    hf = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**hf, **config}))
    with pytest.raises(HsdError, match=message):
        hsd_jax.load(folder)


def test_a_hub_error_is_one_line(monkeypatch, capsys):
    import huggingface_hub

    def offline(*args, **kwargs):
        raise OSError("Got: ConnectError: Name or service not known\nAn error happened while trying to locate "
                      "the files on the Hub.\nPlease check your internet connection and try again.")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    assert run_cli(["generate", "--model", "gpt2", "--prompt", "hi"]) == 2
    assert "could not fetch 'gpt2'" in one_line(capsys)  # was: the hub's three lines of advice


# --- data files -------------------------------------------------------------------------

def test_a_csv_from_excel_with_a_byte_order_mark(tmp_path):
    path = tmp_path / "pairs.csv"
    path.write_bytes("\ufeffsource,target\na b,c d\n".encode())
    assert data.read_pairs(path) == [("a b", "c d")]


def test_line_breaks_inside_csv_fields_and_json_strings_are_kept(tmp_path):
    csv_file, jsonl_file = tmp_path / "pairs.csv", tmp_path / "pairs.jsonl"
    csv_file.write_text('source,target\n"two\nlines",x\n"a\u2028b",y\n', newline="")
    assert data.read_pairs(csv_file) == [("two\nlines", "x"), ("a\u2028b", "y")]
    data.write_jsonl([("a\u2028b", "y")], jsonl_file)  # hsd-jax's own file must read back
    assert data.read_pairs(jsonl_file) == [("a\u2028b", "y")]


@pytest.mark.parametrize("content, message", [
    (b'{"source": "\xff", "target": "x"}\n', "is not UTF-8 text"),
    (None, "is not a regular file"),
])
def test_unreadable_data_files_are_one_line(content, message, tmp_path):
    path = tmp_path / "pairs.jsonl"
    if content is None:
        path.mkdir()
    else:
        path.write_bytes(content)
    with pytest.raises(HsdError, match=message):
        data.read_pairs(path)
