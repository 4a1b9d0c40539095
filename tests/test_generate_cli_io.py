"""Issue 10 for `hsd-jax generate`: nothing lost, no raw tracebacks.

Rows saved as batches finish and `--resume`, output paths checked before any work,
prompt files read exactly, option errors, the static-mode fallback, Ctrl-C and
closed pipes.
"""

from __future__ import annotations

import importlib
import json
import math
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

import hsd_jax
from hsd_jax import io
from hsd_jax.commands.generate import read_prompts
from hsd_jax.errors import HsdError
from tests.conftest import make_gpt2, run_cli

gen = importlib.import_module("hsd_jax.generate")  # the module; `hsd_jax.generate` is the function

PROMPTS = ["one", "two words", "three little words", "four", "five and more words here"]
DECODE = ["--max-new-tokens", "2", "--no-eos", "--batch-size", "2"]


@pytest.fixture(scope="module")
def gpt2_tok(tmp_path_factory):
    folder = tmp_path_factory.mktemp("gpt2tok")
    make_gpt2(folder, vocab=50257, tokenizer=True)
    return folder


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny")
    make_gpt2(folder, layers=4)
    return hsd_jax.load(folder)


@pytest.fixture
def prompt_file(tmp_path):
    src = tmp_path / "in.txt"
    src.write_text("\n".join(PROMPTS) + "\n")
    return src


def jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


# --- rows saved as batches finish, Ctrl-C, --resume ---------------------------------------

def test_ctrl_c_keeps_the_finished_batches_and_resume_decodes_the_rest(gpt2_tok, prompt_file, tmp_path,
                                                                       monkeypatch, capsys):
    out = tmp_path / "out.jsonl"
    base = ["generate", "--model", gpt2_tok, "--input-file", prompt_file, "--output", out, *DECODE]
    real = gen.generate
    calls = []

    def interrupt_second_batch(*args, **kwargs):
        calls.append(kwargs.get("prompts"))
        if len(calls) == 2:
            # the first batch is on disk, in whole lines, before the second one decodes
            assert [r["prompt"] for r in jsonl(out.with_name("out.jsonl.partial"))] == PROMPTS[:2]
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(gen, "generate", interrupt_second_batch)
    assert run_cli(base) == 130
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert "2 of 5 rows" in err and "--resume" in err
    assert not out.exists()  # the output appears only complete

    assert run_cli(base) == 2  # the interrupted rows are not dropped silently
    err = capsys.readouterr().err
    assert "--resume" in err and "--overwrite" in err

    calls.clear()
    monkeypatch.setattr(gen, "generate", lambda lm, **k: calls.append([lm.tokenizer.decode(ids) for ids in
                                                                       k["input_ids"]]) or real(lm, **k))
    assert run_cli([*base, "--resume"]) == 0
    assert calls == [PROMPTS[2:4], [PROMPTS[4]] * 2]  # only the rest was decoded
    assert not out.with_name("out.jsonl.partial").exists()
    resumed = jsonl(out)

    fresh = tmp_path / "fresh.jsonl"
    assert run_cli(["generate", "--model", gpt2_tok, "--input-file", prompt_file, "--output", fresh, *DECODE]) == 0
    assert resumed == jsonl(fresh)

    calls.clear()  # a finished output: nothing to decode, the model is not even loaded
    assert run_cli([*base, "--resume"]) == 0
    assert calls == [] and jsonl(out) == resumed


def test_resume_refuses_the_rows_of_another_input(gpt2_tok, prompt_file, tmp_path, capsys, no_model_load):
    out = tmp_path / "out.jsonl"
    out.with_name("out.jsonl.partial").write_text(json.dumps({"prompt": "something else", "tokens": [1]}) + "\n")
    base = ["generate", "--model", gpt2_tok, "--input-file", prompt_file, "--output", out, *DECODE]
    assert run_cli([*base, "--resume"]) == 2
    err = capsys.readouterr().err
    assert "belongs to another input" in err and "out.jsonl.partial:1" in err and err.count("\n") == 1

    out.with_name("out.jsonl.partial").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS * 2))
    assert run_cli([*base, "--resume"]) == 2
    assert "10 rows but there are only 5 prompts" in capsys.readouterr().err


def test_overwrite_starts_over(gpt2_tok, prompt_file, tmp_path):
    out = tmp_path / "out.jsonl"
    out.with_name("out.jsonl.partial").write_text(json.dumps({"prompt": "something else"}) + "\n")
    assert run_cli(["generate", "--model", gpt2_tok, "--input-file", prompt_file, "--output", out, *DECODE,
                    "--overwrite"]) == 0
    assert [r["prompt"] for r in jsonl(out)] == PROMPTS


# --- output paths, before any work ------------------------------------------------------

@pytest.fixture
def read_only_dir(tmp_path):
    """A directory no file can be created in, even by root (chattr +i where chmod is not enough)."""
    folder = tmp_path / "ro"
    folder.mkdir()
    if os.geteuid() != 0:
        folder.chmod(0o555)
        yield folder
        folder.chmod(0o755)
        return
    if not shutil.which("chattr") or subprocess.run(["chattr", "+i", folder], capture_output=True).returncode:
        pytest.skip("running as root without chattr +i: no directory is read-only")
    try:
        yield folder
    finally:
        subprocess.run(["chattr", "-i", folder], check=True)


@pytest.mark.parametrize("case", ["read-only", "under-a-file", "a-directory", "the-input"])
def test_bad_output_paths_fail_before_the_model_loads(case, gpt2_tok, prompt_file, tmp_path, request, capsys,
                                                      no_model_load):
    (tmp_path / "a-file").write_text("x")
    (tmp_path / "a-dir").mkdir()
    output = {
        "read-only": lambda: request.getfixturevalue("read_only_dir") / "out.jsonl",
        "under-a-file": lambda: tmp_path / "a-file" / "sub" / "out.jsonl",
        "a-directory": lambda: tmp_path / "a-dir",
        "the-input": lambda: tmp_path / "a-dir" / ".." / prompt_file.name,
    }[case]()
    code = run_cli(["generate", "--model", gpt2_tok, "--input-file", prompt_file, "--output", output, *DECODE])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    expected = {"read-only": "not writable", "under-a-file": "is a file, not a directory",
                "a-directory": "is a directory", "the-input": "is the input file"}[case]
    assert expected in err
    assert prompt_file.read_text() == "\n".join(PROMPTS) + "\n"


def test_check_output_dir(tmp_path, read_only_dir):
    (tmp_path / "a-file").write_text("x")
    io.check_output_dir(tmp_path / "new" / "deeper")  # missing folders are made later
    io.check_output_dir(tmp_path)
    for path, message in [(tmp_path / "a-file", "is a file, not a directory"),
                          (tmp_path / "a-file" / "sub", "is a file, not a directory"),
                          (read_only_dir, "not writable"), (read_only_dir / "sub", "not writable")]:
        with pytest.raises(HsdError, match=message):
            io.check_output_dir(path, flag="--output")


@pytest.mark.parametrize("umask", [0o022, 0o027, 0o002])
def test_atomic_writes_respect_the_umask(tmp_path, umask):
    old = os.umask(umask)
    try:
        io.write_text(tmp_path / "new.txt", "hi")
        io.write_jsonl(tmp_path / "new.jsonl", [{"a": 1}])
    finally:
        os.umask(old)
    for name in ("new.txt", "new.jsonl"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o666 & ~umask
    existing = tmp_path / "private.txt"  # like open(path, "w"): a file keeps its own mode
    existing.write_text("old")
    existing.chmod(0o600)
    io.write_text(existing, "new")
    assert existing.stat().st_mode & 0o777 == 0o600 and existing.read_text() == "new"


# --- prompt files -------------------------------------------------------------------------

def test_text_prompts_split_at_newlines_only(tmp_path):
    src = tmp_path / "in.txt"
    src.write_bytes("\ufeffa\u2028b\r\n\n  \nc\x0cd\x85e\n".encode())
    assert read_prompts(src, "prompt") == ["a\u2028b", "c\x0cd\x85e"]


@pytest.mark.parametrize("name", ["in.jsonl", "IN.JSONL", "in.Jsonl"])
def test_jsonl_prompts_in_any_case(tmp_path, name):
    src = tmp_path / name
    src.write_bytes(("\ufeff" + json.dumps({"prompt": "a\u2028b"}, ensure_ascii=False) + "\n\n"
                     + json.dumps({"prompt": "c"}) + "\n" + json.dumps("d") + "\n").encode())
    assert read_prompts(src, "prompt") == ["a\u2028b", "c", "d"]


@pytest.mark.parametrize("name", ["in.json", "IN.JSON"])
def test_json_list_prompts(tmp_path, name):
    src = tmp_path / name
    src.write_text(json.dumps([{"prompt": "a"}, "b", {"prompt": "c", "other": 1}]))
    assert read_prompts(src, "prompt") == ["a", "b", "c"]
    src.write_text(json.dumps({"prompt": "a"}))
    with pytest.raises(HsdError, match="list"):
        read_prompts(src, "prompt")
    src.write_text(json.dumps(["a", {"prompt": 3}]))
    with pytest.raises(HsdError, match="item 2: the prompt is int"):
        read_prompts(src, "prompt")


@pytest.mark.parametrize("value", [None, 3, 2.5, ["a"], {"a": "b"}, ""])
def test_a_prompt_that_is_not_text_names_its_line(tmp_path, value):
    src = tmp_path / "in.jsonl"
    # blank lines still count: the bad row is on line 4, as an editor shows it
    src.write_text(json.dumps({"prompt": "fine"}) + "\n\n\n" + json.dumps({"prompt": value}) + "\n")
    with pytest.raises(HsdError, match=r"in\.jsonl:4: the prompt is"):
        read_prompts(src, "prompt")


def test_unreadable_prompt_files_are_one_line(gpt2_tok, tmp_path, capsys, no_model_load):
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("caf\u00e9\n".encode("latin-1"))
    for path, message in [(latin1, "is not UTF-8 text"), (tmp_path, "is a directory")]:
        assert run_cli(["generate", "--model", gpt2_tok, "--input-file", path]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1 and "Traceback" not in err


# --- generation options -----------------------------------------------------------------

@pytest.mark.parametrize("options, message", [
    ({"length_penalty": math.nan}, "length_penalty must be a finite number"),
    ({"length_penalty": math.inf, "num_beams": 2}, "length_penalty must be a finite number"),
    ({"num_beams": 129}, "exceeds the model's vocabulary of 128"),
])
def test_option_errors(tiny, options, message):
    with pytest.raises(HsdError, match=message):
        hsd_jax.generate(tiny, input_ids=[[1, 2, 3]], max_new_tokens=2, **options)


def test_option_errors_on_the_command_line(gpt2_tok, capsys):
    assert run_cli(["generate", "--model", gpt2_tok, "--prompt", "x", "--length-penalty", "nan"]) == 2
    err = capsys.readouterr().err
    assert "length_penalty must be a finite number" in err and err.count("\n") == 1


# --- static mode and many segments --------------------------------------------------------

def many_segments_mask(path: Path, layers: int, steps: int) -> Path:
    rng = np.random.default_rng(0)
    mask = rng.random((steps, layers)) < 0.5
    mask[:, -1] = True
    np.save(path, mask)
    return path


def test_static_mode_falls_back_to_compiled_for_many_segments(tiny, tmp_path):
    mask = many_segments_mask(tmp_path / "mask.npy", 4, 24)
    assert len(hsd_jax.schedule(str(mask), num_layers=4, max_new_tokens=24).segments()) > \
        gen.STATIC_MAX_SEGMENTS
    options = dict(input_ids=[[1, 2, 3]], schedule=str(mask), max_new_tokens=24, eos_token_id=None)
    with pytest.warns(UserWarning, match="segments are too many for static mode"):
        static = hsd_jax.generate(tiny, mode="static", **options)
    assert static.mode == "compiled"
    assert static.sequences == hsd_jax.generate(tiny, mode="compiled", **options).sequences
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a schedule of few segments stays static, silently
        assert hsd_jax.generate(tiny, mode="static", **{**options, "schedule": "hsd:s=1,min=0,max=2"}).mode == "static"


def test_static_fallback_warns_in_one_line(gpt2_tok, tmp_path, capsys):
    mask = many_segments_mask(tmp_path / "mask.npy", 5, 24)
    assert run_cli(["generate", "--model", gpt2_tok, "--prompt", "x", "--schedule", mask, "--mode", "static",
                    "--max-new-tokens", "24", "--no-eos"]) == 0
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "warning:" in err and "compiled mode" in err, err


# --- Ctrl-C and closed pipes anywhere -----------------------------------------------------

def test_ctrl_c_in_any_command_is_one_line(monkeypatch, capsys):
    import hsd_jax.commands.schedule

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(hsd_jax.commands.schedule, "run", interrupted)
    assert run_cli(["schedule", "vanilla"]) == 130
    assert capsys.readouterr().err == "hsd-jax schedule: interrupted\n"


def test_a_closed_pipe_ends_quietly(tmp_path):
    """`hsd-jax schedule ... | head -1`: the reader is gone before the output is written."""
    proc = subprocess.Popen([sys.executable, "-m", "hsd_jax.cli", "schedule", "hsd:s=1,min=0,max=3",
                             "--layers", "4", "--steps", "8"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=Path(__file__).parents[1])
    proc.stdout.close()  # no reader: every write to stdout fails with EPIPE
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 0 and err == ""
