"""Issue 36's wrapper-script items: every script under train/ and eval/ answers --help,
refuses a bad command line in one line before doing anything, and passes a signal on to
its child and ends after it (checked against a stub `hsd-jax` first on PATH: no real
training); eval/score_blind.py ends in one line; a blind evaluation's manifest names the
weights' hash and where it ran."""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import eval_script, make_gpt2

ROOT = Path(__file__).resolve().parents[1]
NOT_HERE = {"eval/bench_gpu.sh"}  # checked with the GPU benchmark's own tests
SCRIPTS = sorted(
    rel for rel in (p.relative_to(ROOT).as_posix()
                    for folder in ("train", "eval") for ext in ("sh", "py") for p in (ROOT / folder).glob(f"*.{ext}"))
    if rel not in NOT_HERE and rel != "train/lib.sh" and not Path(rel).name.startswith("_"))  # sourced / imported
SHELL = [s for s in SCRIPTS if s.endswith(".sh")]
NO_ARGS_NEEDED = {"train/gpt2_large_full.sh", "train/phi2_lora.sh", "eval/bench_calm.py"}
ONLY_FLAGS_PASSED_ON = {"train/gpt2_large_full.sh", "train/phi2_lora.sh"}  # any flag is hsd-jax train's

# A stand-in for hsd-jax that records its arguments and pid, then sleeps: it traps nothing,
# so a SIGTERM ends it as it would end a process that does not handle it.
STUB = """#!/bin/sh
printf '%s\\n' "$@" > "$STUB_DIR/args"
echo $$ > "$STUB_DIR/pid.tmp" && mv "$STUB_DIR/pid.tmp" "$STUB_DIR/pid"
exec sleep "$STUB_SLEEP"
"""


@pytest.fixture
def stub(tmp_path):
    bin_dir, state = tmp_path / "bin", tmp_path / "stub"
    bin_dir.mkdir()
    state.mkdir()
    (bin_dir / "hsd-jax").write_text(STUB)
    (bin_dir / "hsd-jax").chmod(0o755)
    # the stub first; then the interpreter running the tests, as `python` (compare_runs.py, the BERTScore lookup)
    path = os.pathsep.join([str(bin_dir), str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    # it sleeps only where a test waits for it to be signalled: a script that runs it by mistake ends
    return {"env": {**os.environ, "PATH": path, "STUB_DIR": str(state), "STUB_SLEEP": "0"}, "state": state}


def command(script: str, *args: str) -> list[str]:
    path = str(ROOT / script)
    return [sys.executable, path, *args] if script.endswith(".py") else [path, *args]


def run_refused(script, args, stub, cwd):
    """Runs a command line that must be refused: exit 2, one line naming the usage, and
    nothing made in the working directory or the repository root, nothing started."""
    before = {cwd: set(os.listdir(cwd)), ROOT: set(os.listdir(ROOT))}
    done = subprocess.run(command(script, *args), cwd=cwd, env=stub["env"], capture_output=True, text=True,
                          timeout=120)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2, (done.returncode, done.stderr)
    assert len(lines) == 1 and "usage:" in lines[0] and Path(script).name in lines[0], done.stderr
    assert done.stdout == ""
    assert {folder: set(os.listdir(folder)) for folder in before} == before
    assert not (stub["state"] / "args").exists(), "the command was started"
    return lines[0]


def test_the_list_of_scripts_is_found():
    assert {"train/commongen_reproduce.sh", "eval/commongen_test.sh", "eval/score_blind.py"} <= set(SCRIPTS)


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_prints_the_usage_and_what_the_script_does(script, stub, tmp_path):
    done = subprocess.run(command(script, "--help"), cwd=tmp_path, env=stub["env"], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("usage:") and Path(script).name in done.stdout.splitlines()[0]
    assert len(done.stdout.splitlines()) > 3  # the description too, not the usage alone


@pytest.mark.parametrize("script", sorted(set(SCRIPTS) - ONLY_FLAGS_PASSED_ON))
def test_an_unknown_flag_is_refused_in_one_line(script, stub, tmp_path):
    line = run_refused(script, ["--version"], stub, tmp_path)
    assert "--version" in line or "required" in line


@pytest.mark.parametrize("script", SCRIPTS)
def test_too_many_arguments_are_refused_in_one_line(script, stub, tmp_path):
    run_refused(script, ["x"] * 6, stub, tmp_path)


@pytest.mark.parametrize("script", sorted(set(SCRIPTS) - NO_ARGS_NEEDED))
def test_missing_arguments_are_refused_in_one_line(script, stub, tmp_path):
    run_refused(script, [], stub, tmp_path)


def test_a_flag_after_the_positionals_is_refused_where_nothing_takes_it(stub, tmp_path):
    line = run_refused("train/commongen_reproduce.sh", ["out", "--contrl"], stub, tmp_path)
    assert "unknown option '--contrl'" in line
    run_refused("train/commongen_schedule_aware_ft.sh", ["model", "out", "--epochs", "1"], stub, tmp_path)
    run_refused("train/commongen_finetune.sh", ["model", "out", "sideways"], stub, tmp_path)


@pytest.fixture
def folders(tmp_path):
    """A model folder and an output folder with spaces in their names, and a plain model's results."""
    model, plain = tmp_path / "my model", tmp_path / "plain results"
    model.mkdir()
    plain.mkdir()
    (plain / "results.json").write_text("{}")
    return {"model": str(model), "out": str(tmp_path / "out dir"), "plain": str(plain)}


# Each shell script, run as far as its first hsd-jax: one through `exec`, the rest through
# train/lib.sh's `run`, some two wrappers deep (reproduce -> commongen_small.sh -> hsd-jax,
# schedule_aware_ft -> commongen_finetune.sh -> hsd-jax, eval/commongen_finetune.sh ->
# eval/commongen_small.sh -> hsd-jax).
ARGS = {
    "train/commongen_finetune.sh": ["{model}", "{out}", "joint"],
    "train/commongen_onpolicy_proxy.sh": ["{model}", "{out}", "3"],
    "train/commongen_reproduce.sh": ["{out}", "--control"],
    "train/commongen_schedule_aware_ft.sh": ["{model}", "{out}"],
    "train/commongen_skip_aware.sh": ["{out}"],
    "train/commongen_small.sh": ["{out}", "--max-steps", "3"],
    "train/gpt2_large_full.sh": [],
    "train/phi2_lora.sh": [],
    "eval/commongen_finetune.sh": ["{model}", "{model}", "{out}"],
    "eval/commongen_skip_aware.sh": ["{model}", "{out}", "{plain}"],
    "eval/commongen_small.sh": ["{model}", "{out}"],
    "eval/commongen_test.sh": ["{model}", "{out}", "--limit", "5"],
}
# Files a script finds in OUT from an earlier run, so that it reaches hsd-jax without CommonGen.
PREPARED = {"train/commongen_onpolicy_proxy.sh": {"train_sources.jsonl": '{"source": "dog frisbee throw"}\n'}}


def test_every_shell_script_has_a_signal_case():
    assert set(ARGS) == set(SHELL)


def start_and_signal(script, folders, stub, tmp_path, sig):
    """Starts the script, waits for the stub hsd-jax to run, signals the script alone; returns
    the script's exit status and the stub's arguments, once the stub is gone."""
    env = {**stub["env"], "STUB_SLEEP": "600", "OUT": folders["out"]}  # OUT: gpt2_large_full.sh's and phi2_lora.sh's
    for name, text in PREPARED.get(script, {}).items():
        Path(folders["out"]).mkdir(exist_ok=True)
        (Path(folders["out"]) / name).write_text(text)
    proc = subprocess.Popen(command(script, *(a.format(**folders) for a in ARGS[script])), cwd=tmp_path, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    pid_file, child = stub["state"] / "pid", None
    try:
        deadline = time.monotonic() + 120
        while not pid_file.exists():
            assert proc.poll() is None, f"{script} ended before starting hsd-jax: {proc.stderr.read()}"
            assert time.monotonic() < deadline, f"{script} did not start hsd-jax"
            time.sleep(0.05)
        child = int(pid_file.read_text())
        proc.send_signal(sig)
        status = proc.wait(timeout=60)
        deadline = time.monotonic() + 10
        while alive(child):
            assert time.monotonic() < deadline, f"{script} ended, but its hsd-jax (pid {child}) still runs"
            time.sleep(0.05)
        return status, (stub["state"] / "args").read_text().splitlines(), proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
        if child and alive(child):
            os.kill(child, signal.SIGKILL)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.mark.parametrize("script", sorted(ARGS))
def test_sigterm_to_a_script_stops_its_hsd_jax_before_the_script_ends(script, folders, stub, tmp_path):
    status, args, _ = start_and_signal(script, folders, stub, tmp_path, signal.SIGTERM)
    # through exec the script is the stub (killed by the signal); through run, it exits with the stub's 143
    assert status in (-signal.SIGTERM, 128 + signal.SIGTERM)
    if script != "train/gpt2_large_full.sh" and script != "train/phi2_lora.sh":
        assert any(a.startswith(folders["out"]) for a in args), args  # a path with spaces arrives whole


@pytest.mark.parametrize("sig, passed_on", [(signal.SIGINT, signal.SIGINT), (signal.SIGHUP, signal.SIGTERM)])
def test_sigint_is_passed_on_and_sighup_as_sigterm(sig, passed_on, folders, stub, tmp_path):
    """SIGHUP becomes SIGTERM, which hsd-jax stops on after saving (a SIGHUP would end it
    outright); the script's status is the child's, and one line says what happened."""
    status, _, err = start_and_signal("train/commongen_reproduce.sh", folders, stub, tmp_path, sig)
    assert status == 128 + passed_on
    assert f"SIG{sig.name[3:]} passed on to train/commongen_small.sh" in err


def test_a_missing_hsd_jax_a_missing_model_and_an_output_file_are_one_line(stub, folders, tmp_path):
    no_hsd_jax = {**stub["env"], "PATH": "/usr/bin:/bin"}
    done = subprocess.run(command("eval/commongen_test.sh", folders["model"], folders["out"]), cwd=tmp_path,
                          env=no_hsd_jax, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and "'hsd-jax' is not on PATH" in done.stderr
    a_file = tmp_path / "a file"
    a_file.write_text("")
    for script, args, said in [("eval/commongen_test.sh", [str(tmp_path / "nothing"), "out"], "does not exist"),
                               ("train/commongen_reproduce.sh", [str(a_file)], "is a file; give a folder"),
                               ("eval/commongen_skip_aware.sh", [folders["model"], "out", folders["model"]],
                                "has no results.json")]:
        done = subprocess.run(command(script, *args), cwd=tmp_path, env=stub["env"], capture_output=True, text=True,
                              timeout=60)
        assert done.returncode == 2 and done.stderr.count("\n") == 1 and said in done.stderr, done.stderr
        assert not (stub["state"] / "args").exists() and not (tmp_path / "out").exists()


def test_relative_paths_are_from_where_the_command_was_given(stub, folders, tmp_path):
    """The scripts cd to the repository root: OUT (and $OUT of gpt2_large_full.sh) are
    resolved first, so a run does not land in the repository."""
    status, args, _ = start_and_signal("train/gpt2_large_full.sh", {**folders, "out": "rel out"}, stub, tmp_path,
                                       signal.SIGTERM)
    assert args[args.index("--output") + 1] == str(tmp_path / "rel out")


# ---------------------------------------------------------------- eval/score_blind.py

@pytest.fixture(scope="module")
def score_blind():
    return eval_script("score_blind").main


def test_score_blind_on_the_withheld_test_split_says_so_in_one_line(score_blind, tmp_path, capsys):
    assert score_blind([str(tmp_path), "--dataset", "common_gen", "--split", "test", "--output", str(tmp_path / "o")]) \
        == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "test references are withheld" in err and "hub" not in err.lower()
    assert not (tmp_path / "o").exists()


def test_score_blind_without_the_hub_is_one_line(score_blind, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # the hub's fast path: no request is sent
    (tmp_path / "manifest.json").write_text(json.dumps({"num_sources": 1, "rows": []}))
    assert score_blind([str(tmp_path), "--dataset", "xsum", "--output", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("eval/score_blind.py: error: HF_HUB_OFFLINE is set") and err.count("\n") == 1
    assert "--eval-file" in err  # score_blind's own flag for local references, not train's --train-file
    assert score_blind([str(tmp_path / "nothing"), "--dataset", "xsum", "--output", str(tmp_path / "o")]) == 2
    assert "has no manifest.json" in capsys.readouterr().err


# ---------------------------------------------------------------- the blind manifest

def test_a_blind_manifest_names_the_weights_hash_and_where_it_ran(tmp_path):
    from hsd_jax.cli import main

    model = tmp_path / "model"
    make_gpt2(model, layers=2, vocab=50257, tokenizer=True)
    inputs = tmp_path / "test.inputs.jsonl"
    inputs.write_text(json.dumps({"source": "dog frisbee catch"}) + "\n")
    out = tmp_path / "blind"
    argv = ["eval", "--model", str(model), "--eval-file", str(inputs), "--blind", "--schedules", "vanilla",
            "--num-beams", "1", "--max-new-tokens", "3", "--batch-size", "1", "--output", str(out)]
    assert main(argv) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["model_sha256"] == hashlib.sha256((model / "model.safetensors").read_bytes()).hexdigest()
    today = datetime.datetime.now(datetime.timezone.utc).date().isoformat()
    assert "jax " in manifest["built_on"] and today in manifest["built_on"]
    assert main([*argv, "--resume"]) == 0  # not compared on --resume: another day or machine still continues
