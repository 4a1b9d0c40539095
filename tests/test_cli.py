"""The `hsd-jax` command line: help, generate on prompts and files, one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from hsd_jax.cli import main
from tests.conftest import make_gpt2


@pytest.fixture(scope="module")
def gpt2_tok(tmp_path_factory):
    folder = tmp_path_factory.mktemp("gpt2tok")
    make_gpt2(folder, vocab=50257, tokenizer=True)
    return folder


def test_help_lists_the_subcommands():
    out = subprocess.run([sys.executable, "-m", "hsd_jax.cli", "--help"], capture_output=True, text=True, check=True)
    for command in ("generate", "schedule"):
        assert command in out.stdout


def test_generate_prompts(gpt2_tok, capsys):
    code = main(["generate", "--model", str(gpt2_tok), "--prompt", "Hello", "--prompt", "The cat sat on",
                 "--schedule", "hsd:s=1,min=0,max=3", "--max-new-tokens", "5", "--no-eos", "--json"])
    assert code == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["prompt"] for r in rows] == ["Hello", "The cat sat on"]
    for r in rows:
        assert len(r["tokens"]) == 5 and r["layers_per_token"][0] == 5
        assert r["avg_layers"] == pytest.approx(sum(r["layers_per_token"]) / 5)


@pytest.mark.parametrize("suffix", [".txt", ".jsonl"])
def test_generate_file_in_batches(gpt2_tok, tmp_path, capsys, suffix):
    prompts = ["one", "two words", "three little words", "four", "five and more words here"]
    src = tmp_path / f"in{suffix}"
    src.write_text("\n".join(json.dumps({"prompt": p}) if suffix == ".jsonl" else p for p in prompts) + "\n")
    out = tmp_path / "out.jsonl"
    code = main(["generate", "--model", str(gpt2_tok), "--input-file", str(src), "--output", str(out),
                 "--batch-size", "2", "--max-new-tokens", "3", "--no-eos"])
    assert code == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["prompt"] for r in rows] == prompts
    assert all(len(r["tokens"]) == 3 for r in rows)
    assert "Avg. Layer 5.00 of 5" in capsys.readouterr().out
    # batching and padding do not change any output: the same prompts one by one
    for p, r in zip(prompts[:2], rows):
        main(["generate", "--model", str(gpt2_tok), "--prompt", p, "--max-new-tokens", "3", "--no-eos", "--json"])
        assert json.loads(capsys.readouterr().out.splitlines()[0])["tokens"] == r["tokens"]


@pytest.mark.parametrize("argv, message", [
    (["generate", "--model", "m", "--prompt", "x", "--num-beams", "zero"],
     "hsd-jax generate: error: argument --num-beams: invalid int value: 'zero'"),
    (["generate", "--model", "m"], "hsd-jax generate: error: one of the arguments --prompt --input-file is required"),
    (["nosuch"], "hsd-jax: error: argument COMMAND: invalid choice: 'nosuch'"),
])
def test_a_bad_command_line_is_one_line_naming_the_help(argv, message, capsys):
    with pytest.raises(SystemExit) as caught:
        main(argv)
    err = capsys.readouterr().err
    assert caught.value.code == 2 and len(err.splitlines()) == 1, err
    assert err.startswith(message) and err.rstrip().endswith("--help lists the options")


def test_bad_input_is_one_line(gpt2_tok, tmp_path, capsys):
    src = tmp_path / "in.jsonl"
    src.write_text(json.dumps({"text": "hi"}) + "\n")
    code = main(["generate", "--model", str(gpt2_tok), "--input-file", str(src)])
    err = capsys.readouterr().err
    assert code == 2 and "has no field 'prompt'" in err and "Traceback" not in err
    assert main(["generate", "--model", str(tmp_path / "missing"), "--prompt", "x"]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["generate", "--model", str(gpt2_tok), "--prompt", "x", "--schedule", "hsd:q=1"]) == 2
    assert "hsd" in capsys.readouterr().err
