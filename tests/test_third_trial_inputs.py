"""Issue 36's input and platform items: a JAX_PLATFORMS this install cannot serve, Ctrl-C
inside a jit compile, numbers from NumPy, float token ids, an EOS outside the vocabulary,
a 10 MB prompt line, --truncate-sources in generate, text that is not text, and the
notebooks' clean-up script."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import make_gpt2
from hsd_jax import cli
from hsd_jax.errors import HsdError

ROOT = Path(__file__).resolve().parents[1]
CUDA_PLUGIN = any(importlib.util.find_spec(f"jax_cuda{v}_plugin") for v in (12, 13))


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    """A tiny GPT-2 (128 positions) with the real GPT-2 tokenizer."""
    folder = tmp_path_factory.mktemp("gpt2_tok")
    make_gpt2(folder, vocab=50257, tokenizer=True)
    return folder


@pytest.fixture(scope="module")
def lm(gpt2_dir):
    import hsd_jax

    return hsd_jax.load(gpt2_dir)


def hsd(*argv, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """`hsd-jax ARGV` as a user runs it: a process of its own, entered as the program."""
    return subprocess.run([sys.executable, "-m", "hsd_jax.cli", *map(str, argv)], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, **(env or {})})


def error_line(result: subprocess.CompletedProcess) -> str:
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    return lines[0]


# --- JAX_PLATFORMS that this install cannot serve ------------------------------------------

@pytest.mark.skipif(CUDA_PLUGIN, reason="the CUDA plugin is installed here")
@pytest.mark.parametrize("command", ["generate", "train", "eval", "demo", "bench"])
def test_cuda_without_the_cuda_plugin_is_one_line(command, tok_dir, tmp_path):
    argv = {
        "generate": ["--model", tok_dir, "--prompt", "hi"],
        "train": ["--model", tok_dir, "--train-file", tmp_path / "pairs.jsonl", "--output", tmp_path / "run"],
        "eval": ["--model", tok_dir, "--eval-file", tmp_path / "pairs.jsonl", "--output", tmp_path / "eval"],
        "demo": ["--output", tmp_path / "demo", "--smoke"],
        "bench": ["--model", "tiny-gpt2"],
    }[command]
    (tmp_path / "pairs.jsonl").write_text(json.dumps({"source": "a b", "target": "x", "references": ["x"]}) + "\n")
    line = error_line(hsd(command, *argv, env={"JAX_PLATFORMS": "cuda"}))
    assert line.startswith(f"hsd-jax {command}: error: JAX_PLATFORMS=cuda asks for an NVIDIA GPU, but this JAX "
                           "install has no CUDA backend"), line
    assert 'pip install -U "jax[cuda13]"' in line and "unset JAX_PLATFORMS" in line


@pytest.mark.skipif(CUDA_PLUGIN, reason="the CUDA plugin is installed here")
@pytest.mark.parametrize("platforms, expected", [
    ("gpu", "asks for an NVIDIA GPU, but this JAX install has no CUDA backend"),
    ("nonsense", "'nonsense' is not a JAX platform; set it to cpu, cuda, rocm or tpu"),
    ("cpu,nonsense", "'nonsense' is not a JAX platform"),
    ("tpu", 'asks for tpu, but JAX cannot start it'),
])
def test_other_platforms_jax_cannot_start_are_one_line(platforms, expected, tok_dir):
    line = error_line(hsd("generate", "--model", tok_dir, "--prompt", "hi", env={"JAX_PLATFORMS": platforms}))
    assert f"JAX_PLATFORMS={platforms}" in line and expected in line and "unset JAX_PLATFORMS" in line, line


@pytest.mark.skipif(CUDA_PLUGIN, reason="the CUDA plugin is installed here")
def test_the_python_api_says_it_too():
    """generate()'s first use of a device says it as an HsdError (the model here is a
    stand-in, since loading one would use a device first)."""
    code = """
import types
from hsd_jax import generate
from hsd_jax.errors import HsdError
stub = types.SimpleNamespace(config=types.SimpleNamespace(vocab_size=10), tokenizer=None, source="stub")
try:
    generate(stub, input_ids=[[1, 2]])
except HsdError as err:
    print("HsdError:", err)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "JAX_PLATFORMS": "cuda"})
    assert out.stdout.startswith("HsdError: JAX_PLATFORMS=cuda asks for an NVIDIA GPU"), out.stdout + out.stderr


@pytest.mark.skipif(CUDA_PLUGIN, reason="the CUDA plugin is installed here")
def test_loading_a_model_says_it_too(gpt2_dir):
    """hsd_jax.load puts the weights on a device before generate does: the same line there."""
    code = f"""
import hsd_jax
try:
    hsd_jax.load({str(gpt2_dir)!r})
except hsd_jax.HsdError as err:
    print("HsdError:", err)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "JAX_PLATFORMS": "cuda"})
    assert out.stdout.startswith("HsdError: JAX_PLATFORMS=cuda asks for an NVIDIA GPU"), out.stdout + out.stderr


def test_importing_hsd_jax_without_torch_gives_no_transformers_advice():
    """The light install has no torch; `import hsd_jax` made transformers say "PyTorch was
    not found. Models won't be available" (the CLI silenced it; a script did not)."""
    code = "import sys\nsys.modules['torch'] = None  # as on the light install\nimport hsd_jax\nimport transformers\n"
    env = {k: v for k, v in os.environ.items() if k != "TRANSFORMERS_NO_ADVISORY_WARNINGS"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert "PyTorch was not found" not in out.stderr


# --- Ctrl-C inside a jit compile -----------------------------------------------------------

@pytest.mark.parametrize("signum, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_inside_the_jit_compile_exits_with_its_code(signum, code, tok_dir):
    """Interrupted while XLA compiled, the process segfaulted at exit (139) in 2 tries of 4.
    JAX_LOG_COMPILES marks the start of the decode program's XLA compile on stderr; the
    signal goes 0.3 s after it, inside the compile (about 4 s here), which crashed the old
    exit 4 times in 4. A compile that ends sooner still has to exit with `code`."""
    env = {**os.environ, "JAX_LOG_COMPILES": "1", "PYTHONUNBUFFERED": "1"}
    codes = []
    for _ in range(4 if signum == signal.SIGINT else 1):
        proc = subprocess.Popen([sys.executable, "-m", "hsd_jax.cli", "generate", "--model", str(tok_dir),
                                 "--prompt", "hello", "--max-new-tokens", "8"], cwd=ROOT, env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        try:
            for line in proc.stderr:
                if "MLIR module conversion jit(run)" in line:  # lowered: XLA's compile starts now
                    time.sleep(0.3)  # into the compile: the marker is its start, and nothing marks its middle
                    proc.send_signal(signum)
                    break
            else:
                pytest.fail("the decode program's compile was never logged")
            rest = proc.stderr.read()
            proc.wait(timeout=120)
        finally:
            proc.kill()
        codes.append(proc.returncode)
        assert "hsd-jax generate: interrupted" in rest, rest
    assert codes == [code] * len(codes)


def test_main_returns_the_code_when_called_with_arguments():
    """Only the program itself ends at once: a caller of main(argv) (the tests) gets the code back."""
    assert cli.main(["schedule", "vanilla", "--layers", "2", "--steps", "2"]) == 0


# --- numbers and token ids in the Python API ------------------------------------------------

@pytest.mark.parametrize("options, message", [
    (dict(pad_to_multiple_of=0), "pad_to_multiple_of must be a positive integer, got 0"),
    (dict(pad_to_multiple_of=-8), "pad_to_multiple_of must be a positive integer, got -8"),
    (dict(num_beams=True), "num_beams must be a positive integer, got True"),
    (dict(max_new_tokens=4.0), "max_new_tokens must be a positive integer, got 4.0"),
    (dict(input_ids=[[1, 7.5, 3]]), "prompt 0 holds float values (e.g. 7.5), not integer token ids"),
    (dict(input_ids=[[1.0, 2.0]]), "prompt 0 holds float values (e.g. 1.0)"),
    (dict(input_ids=[[1, None]]), "prompt 0 holds NoneType values (e.g. None)"),
    (dict(input_ids=[[True, False]]), "prompt 0 holds bool values"),
    (dict(input_ids=[[1, [2, 3]]]), "prompt 0 is not a flat list of token ids"),
    (dict(input_ids=[1, 2, 3]), "input_ids takes a batch: a list of token lists"),
    (dict(input_ids=np.array([[1.0, 7.5]]), attention_mask=np.ones((1, 2))), "input_ids holds float values (e.g. 7.5)"),
    (dict(input_ids=np.array([[1, 2]]), attention_mask=np.ones((1, 3))), "attention_mask has shape (1, 3)"),
    (dict(eos_token_id=50256), "eos_token_id 50256 is outside the model's vocabulary of 128 tokens (ids 0 to 127)"),
    (dict(eos_token_id=-1), "eos_token_id -1 is outside the model's vocabulary of 128 tokens"),
    (dict(eos_token_id=[1, 2]), "eos_token_id must be one token id (an integer) or None"),
    (dict(pad_token_id=128), "pad_token_id 128 is outside the model's vocabulary of 128 tokens"),
])
def test_bad_numbers_and_token_ids_are_refused(lm, options, message):
    import hsd_jax

    options = {"input_ids": [[1, 2, 3]], "max_new_tokens": 3, **options}
    with pytest.raises(HsdError) as caught:
        hsd_jax.generate(lm, **options)
    assert message in str(caught.value)


def test_numpy_integers_are_numbers(lm):
    import hsd_jax
    from hsd_jax.generate import generate_batched

    ints = hsd_jax.generate(lm, input_ids=[[1, 2, 3]], max_new_tokens=4, num_beams=2, pad_to_multiple_of=8,
                            eos_token_id=5, devices=1)
    numpy = hsd_jax.generate(lm, input_ids=np.array([[1, 2, 3]]), max_new_tokens=np.int64(4),
                             num_beams=np.int32(2), pad_to_multiple_of=np.int64(8), eos_token_id=np.int64(5),
                             devices=np.int64(1))
    assert numpy.sequences == ints.sequences
    batched = generate_batched(lm, [[1, 2], [3]], batch_size=np.int64(2), max_new_tokens=np.int64(2))
    assert batched.sequences == generate_batched(lm, [[1, 2], [3]], batch_size=2, max_new_tokens=2).sequences


def test_text_that_is_not_text_is_refused(tok_dir):
    import hsd_jax

    with pytest.raises(HsdError, match=r"prompt 0 holds '\\ud800' at character 2, which is not text"):
        hsd_jax.generate(hsd_jax.load(tok_dir), prompts=["a\ud800b"], max_new_tokens=2)


# --- long prompts in hsd-jax generate -------------------------------------------------------

def test_a_huge_line_is_refused_by_its_characters(tok_dir, tmp_path, capsys, monkeypatch):
    """A 2 MB line is refused without tokenizing it (a 10 MB one took 3 GB and 24 s)."""
    from transformers import PreTrainedTokenizerBase

    encode = PreTrainedTokenizerBase.encode
    seen = []
    monkeypatch.setattr(PreTrainedTokenizerBase, "encode", lambda self, text, *a, **kw: (
        seen.append(len(text)), encode(self, text, *a, **kw))[1])
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("short\n" + "word " * 400_000 + "\n")
    assert cli.main(["generate", "--model", str(tok_dir), "--input-file", str(prompts)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("hsd-jax generate: error: prompt 2 of 2 "
                          "is 2,000,000 characters, too long for the 64 tokens that fit (a token covers at most 128 "
                          "characters); shorten it, lower --max-new-tokens, or pass --truncate-sources"), err
    assert max(seen, default=0) < 100_000


def test_truncate_sources_keeps_the_start_of_a_prompt(tok_dir, tmp_path, capsys):
    import hsd_jax

    long = "one two three four five six seven eight nine ten " * 40  # 400 words, 128 positions
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(f"a short one\n{long}\n{long * 5000}\n")
    argv = ["generate", "--model", str(tok_dir), "--input-file", str(prompts), "--max-new-tokens", "4", "--json"]
    assert cli.main(argv) == 2
    assert "prompt 2 of 3 is 401 tokens" in capsys.readouterr().err
    assert cli.main([*argv, "--truncate-sources"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["prompt"] for r in rows] == ["a short one", long, long * 5000]
    lm = hsd_jax.load(tok_dir)
    cut = lm.tokenizer.encode(long)[:124]
    expected = hsd_jax.generate(lm, input_ids=[lm.tokenizer.encode("a short one"), cut, cut], max_new_tokens=4)
    assert [r["tokens"] for r in rows] == expected.sequences


def test_truncate_sources_with_seq2seq_keeps_the_separator(tok_dir, capsys):
    import hsd_jax
    from hsd_jax.data import SEPARATOR, encode_source

    long = "dog frisbee catch " * 100
    assert cli.main(["generate", "--model", str(tok_dir), "--prompt", long, "--seq2seq", "--truncate-sources",
                     "--max-new-tokens", "4", "--json"]) == 0
    row = json.loads(capsys.readouterr().out)
    lm = hsd_jax.load(tok_dir)
    ids = encode_source(lm.tokenizer, long, 124)
    assert lm.tokenizer.decode(ids).startswith("dog frisbee catch") and lm.tokenizer.decode(ids).endswith(SEPARATOR)
    assert len(ids) == 124
    assert row["prompt"] == long.strip() + SEPARATOR
    assert row["tokens"] == hsd_jax.generate(lm, input_ids=[ids], max_new_tokens=4).sequences[0]


def test_generate_and_eval_share_the_help_of_truncate_sources(capsys):
    texts = {}
    for command in ("generate", "eval"):
        with pytest.raises(SystemExit):
            cli.main([command, "--help"])
        help_text = " ".join(capsys.readouterr().out.split())
        texts[command] = help_text[help_text.index("--truncate-sources cut"):][:120]
    assert texts["generate"].startswith("--truncate-sources cut a prompt too long for the model's context (with "
                                        "--max-new-tokens) from its end, as training cuts")
    assert texts["eval"].startswith("--truncate-sources cut a source too long for the model's context (with "
                                    "--max-new-tokens) from its end, as training cuts")


def test_a_command_line_prompt_that_is_not_utf8_is_one_line(tok_dir):
    result = subprocess.run([sys.executable, "-m", "hsd_jax.cli", "generate", "--model", str(tok_dir), "--prompt",
                             b"caf\xe9".decode("utf-8", "surrogateescape")], cwd=ROOT, capture_output=True,
                            timeout=300, env={**os.environ, "PYTHONUTF8": "1"})
    lines = result.stderr.decode("utf-8", "replace").strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, lines
    assert "prompt 1 of 1 holds '\\udce9' at character 4, which is not text" in lines[0]


# --- notebooks ----------------------------------------------------------------------------

def test_clear_outputs_leaves_a_notebook_as_committed(tmp_path):
    import nbformat

    source = ROOT / "notebooks" / "01_quickstart.ipynb"
    nb = nbformat.read(source, as_version=4)
    code = next(c for c in nb.cells if c.cell_type == "code")
    code.outputs = [nbformat.v4.new_output("stream", text="hello\n")]
    code.execution_count = 3
    copy = tmp_path / source.name
    nbformat.write(nb, copy)
    subprocess.run([sys.executable, str(ROOT / "notebooks" / "clear_outputs.py"), str(copy)], check=True,
                   capture_output=True)
    assert copy.read_text() == source.read_text()
