"""Every code block in the README and the docs runs as written, or is listed here with the
reason it is not run, and then at least its command line is checked: an `hsd-jax` command
parses, a shell script exists, is executable and parses (`bash -n`), a Python script has
the flags it is given. A new block fails until it runs or is listed. Every relative link in those files leads to a file, and every `#anchor` to a heading.

The blocks run offline in a folder where the names they use are tiny local models: `gpt2`
(12 layers, 32 wide, the real GPT-2 tokenizer), the demo's and the CommonGen model's
folders (links to it), and a `pairs.jsonl`. A local folder comes before a hub id, as in
transformers, so `hsd_jax.load("gpt2")` reads it, and HF_HUB_OFFLINE=1 makes any other
hub access fail at once.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import make_gpt2

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent  # hsd-jax and python of this environment


def doc_files() -> list[str]:
    files = ["README.md", *(f"docs/{p.name}" for p in sorted((ROOT / "docs").glob("*.md"))),
             "train/README.md", "notebooks/README.md", "schedules/README.md",
             *(str(p.relative_to(ROOT)) for p in sorted((ROOT / "eval" / "results").rglob("README.md")))]
    return [f for f in files if (ROOT / f).is_file()]


# Commands that are not run, with why; the test checks their command line instead. A key is
# a whole command as the docs write it (comments dropped, spaces collapsed), or a prefix
# ending in "*" for a recipe script whose every use needs what the reason says.
HUB = "needs the Hugging Face hub"
NOT_RUN: dict[str, str] = {
    "pip install -e . && hsd-jax demo":
        "installs, then trains for 4 minutes; tests/test_demo.py runs the same pipeline with --smoke",
    'pip install -e ".[test]" && python -m pytest -q': "the test suite itself",
    'pip install -e ".[notebooks]"': "installs from a package index",
    "jupyter lab notebooks/": "starts an interactive server; tests/test_notebooks.py executes the notebooks",
    "DATASET=common_gen train/gpt2_large_full.sh": f"fine-tunes GPT-2 large for hours on a GPU; {HUB}",
    "hsd-jax eval --model runs/gpt2-large-common_gen --dataset common_gen --output results/common_gen":
        f"decodes CommonGen dev with GPT-2 large; {HUB}",
    # docs/benchmarks.md
    "hsd-jax bench": "times GPT-2 small for about 4 minutes",
    "hsd-jax bench --suite full": "times GPT-2 up to large and Phi-2 for hours",
    "eval/bench_gpu.sh": "the GPU suite",
    "eval/bench_gpu.sh --dry-run": "about 1.5 minutes; tests/test_bench.py builds the suite's dry-run cases",
    "hsd-jax bench --model gpt2-medium --prompt 32 --batch 1 8 --beams 1 --schedules hsd:s=1,min=0,max=12 "
    "--runners compiled static --repeats 5 --json out.json": f"times GPT-2 medium; {HUB}",
    # docs/multihost.md
    "export JAX_COORDINATOR_ADDRESS=host0:12355 JAX_NUM_PROCESSES=2 JAX_PROCESS_ID=0": "one of two hosts",
    "hsd-jax generate --model runs/cnn-model --input-file articles.txt --output summaries.jsonl "
    "--schedule hsd-s1-20 --num-beams 4 --batch-size 16": "the second half of a two-host run",
    "srun --nodes=4 --ntasks-per-node=1 --gpus-per-node=8 hsd-jax eval --model runs/cnn-model "
    "--dataset cnn_dailymail --split test --output results/cnn": f"a SLURM cluster; {HUB}",
    "for i in 0 1; do JAX_PLATFORMS=cpu XLA_FLAGS=--xla_force_host_platform_device_count=2 "
    "JAX_COORDINATOR_ADDRESS=localhost:12355 JAX_NUM_PROCESSES=2 JAX_PROCESS_ID=$i hsd-jax generate --model M "
    "--input-file in.txt --output out.jsonl --batch-size 1 & done; wait":
        "a fixed port; tests/test_data_parallel.py runs two processes the same way on a free port",
    # train/README.md
    "hsd-jax train --model gpt2-large --dataset xsum --eval-split validation --eval-every 2000 --mode full "
    "--batch-size 16 --bf16 --output runs/xsum": f"fine-tunes GPT-2 large on XSum; {HUB}",
    "hsd-jax train --model random:gpt2-medium --tokenizer gpt2 --dataset common_gen --output runs/scratch":
        f"trains GPT-2 medium on CommonGen; {HUB}",
    "hsd-jax train --model random:train/gpt2_commongen_small.json --tokenizer bpe:4096 --dataset common_gen "
    "--output runs/small": f"80 minutes of training on CommonGen; {HUB}",
    "hsd-jax train --model gpt2 --dataset common_gen --skip-aware paper --skip-aware-prob 0.5 --output runs/aware":
        f"CommonGen; {HUB}",
    "hsd-jax train --model gpt2 --dataset common_gen *": f"CommonGen; {HUB}",
    "hsd-jax train --model runs/aware-joint*": "continues the CommonGen runs above",
    "hsd-jax train ... *": "its arguments are elided (...)",
    # eval/results/*/README.md: the CommonGen recipes, hours of training and decoding each
    "train/commongen_*": f"trains on CommonGen for an hour or more; {HUB}",
    "eval/commongen_*": f"decodes CommonGen with a model trained by the recipes; {HUB}",
    "for run in *": "decodes CommonGen with the models of the recipes above",
    "hsd-jax eval --model MODEL --dataset common_gen *": f"CommonGen dev; {HUB}",
    "python eval/score_blind.py DEV_BLIND *": "scores the blind run above",
    "python eval/compare_runs.py *": "compares evaluation folders the recipes write",
    "python eval/speculative_acceptance.py *": "decodes CommonGen dev with the reproduction's models",
    # docs/holdout.md: issue 37's candidate, step by step
    "hsd-jax eval --model runs/cg/plain *": "decodes CommonGen dev's selection half with the rebuilt plain model",
    "python eval/holdout_report.py runs/cg/*": "rescoring the runs of the steps above",
    # eval/results/commongen_views/README.md: the candidate's selection-half figures
    "python eval/holdout_report.py eval/results/commongen_views/*": "rescores the committed selection-half runs",
    # eval/results/commongen_onpolicy_proxy/README.md
    "python eval/holdout_report.py eval/results/commongen_onpolicy_proxy/*": "rescores the committed proxy runs",
    "python eval/draft_agreement.py *": "decodes CommonGen dev's selection half with the candidate; "
        "tests/test_draft_agreement.py measures a tiny model",
    "python eval/interpolate_weights.py --base runs/cg/plain *": "mixes the CommonGen runs' weights; "
        "tests/test_interpolate_weights.py mixes two tiny models",
    "hsd-jax eval --model runs/cg/wise-0.1 *": "decodes CommonGen dev's selection half with the mixed model",
    # eval/results/demo_skip_aware_views/README.md
    "hsd-jax train --model D/plain/model *": "fine-tunes a finished demo's plain model (D) for minutes; "
        "tests/test_draft_training.py trains --skip-aware-view draft and both on a tiny model",
}

# Fenced blocks without a language: program output and formats, not commands. Key: the first line.
TEXT_BLOCKS: dict[str, str] = {
    "hsd-jax bench: quick on cpu, medians of 5": "the quick suite's report",
    "hsd-jax bench: quick-custom on cpu, medians of 2": "a custom run's report",
    '"<source> =" + " <target>" + <eos>          e.g.  "dog frisbee catch throw =" " A dog leaps to catch a frisbee." '
    "<|endoftext|>": "the training pair format",
}

SHELL_LANGS = {"bash", "sh", "shell", "console"}


@dataclass(frozen=True)
class Block:
    file: str
    line: int  # of the opening fence
    lang: str
    text: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}"


FENCE = re.compile(r"^(\s*)(```+)\s*([\w+-]*)\s*$")


def blocks(rel: str) -> list[Block]:
    found, current = [], None
    for number, line in enumerate((ROOT / rel).read_text().splitlines(), 1):
        match = FENCE.match(line)
        if current is None:
            if match:
                current = (number, match.group(1), match.group(2), match.group(3).lower(), [])
        elif match and match.group(2) == current[2] and not match.group(3):
            found.append(Block(rel, current[0], current[3], "\n".join(current[4]) + "\n"))
            current = None
        else:
            current[4].append(line[len(current[1]):] if line.startswith(current[1]) else line)
    assert current is None, f"{rel}:{current[0]}: a code block is never closed"
    return found


ALL_BLOCKS = [b for f in doc_files() for b in blocks(f)]


def commands(block: Block) -> list[str]:
    """A shell block's commands, one string each: continuation lines joined, a `for` loop
    kept whole (its lines apart), comments dropped, spaces collapsed."""
    out, pending = [], ""
    for line in block.text.splitlines():
        line = re.sub(r"(^|\s)#.*$", "", line).rstrip()
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line, pending = " ".join((pending + line).split()), ""
        if not line:
            continue
        if out and out[-1].startswith("for ") and not re.search(r"(^|;|\s)done(;|\s|$)", out[-1]):
            out[-1] += "\n" + line  # inside an unfinished for loop
        else:
            out.append(line)
    return out


def listed(command: str, key: str) -> bool:
    flat = " ".join(command.split())
    return flat == key or (key.endswith("*") and flat.startswith(key[:-1]))


def not_run_reason(command: str) -> str | None:
    return next((reason for key, reason in NOT_RUN.items() if listed(command, key)), None)


def simple_commands(command: str) -> list[list[str]]:
    """The argument lists a command runs: split at ; && || | &, loop keywords and leading
    VAR=value assignments dropped."""
    lex = shlex.shlex(command.replace("\n", " ; "), posix=True, punctuation_chars=True)
    lex.whitespace_split, lex.commenters = True, ""
    argvs, argv = [], []
    for token in [*lex, ";"]:
        if token in (";", "&&", "||", "|", "&"):
            argvs.append(argv)
            argv = []
        elif not argv and (token in ("do", "then", "else") or re.fullmatch(r"[A-Za-z_]\w*=.*", token)):
            continue
        else:
            argv.append(token)
    return [a for a in argvs if a and a[0] not in ("for", "done", "fi")]


# --- the checks for a command that is not run ------------------------------------------------


def check_hsd_jax(args: list[str]) -> None:
    from hsd_jax.cli import build_parser

    parser = build_parser()
    (sub_action,) = [a for a in parser._actions if a.dest == "command"]
    assert args and args[0] in sub_action.choices, f"no hsd-jax command {args[:1]}"
    options = sub_action.choices[args[0]]._option_string_actions
    unknown = [t for t in args[1:] if t.startswith("--") and t.split("=")[0] not in options]
    assert not unknown, f"hsd-jax {args[0]} has no option {unknown}"
    if "..." in args:  # elided arguments: the flags are all there is to check
        return
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            parser.parse_args(args)
        except SystemExit as exit_:
            assert exit_.code == 0, err.getvalue()


def check_script(path: str, args: list[str]) -> None:
    script = ROOT / path
    assert script.is_file(), f"{path} does not exist"
    assert os.access(script, os.X_OK), f"{path} is not executable"
    proc = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert proc.returncode == 0, f"{path} does not parse: {proc.stderr}"


def check_python(args: list[str]) -> None:
    if args[:2] == ["-m", "pytest"]:
        return
    script = ROOT / args[0]
    assert script.is_file(), f"{args[0]} does not exist"
    proc = subprocess.run([sys.executable, str(script), "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    flags = set(re.findall(r"--[\w-]+", proc.stdout))
    unknown = [t for t in args[1:] if t.startswith("--") and t.split("=")[0] not in flags]
    assert not unknown, f"{args[0]} has no option {unknown}"


def check_command(argv: list[str]) -> None:
    program, args = argv[0], argv[1:]
    if program == "hsd-jax":
        check_hsd_jax(args)
    elif program.endswith(".sh"):
        check_script(program, args)
    elif program in ("python", "python3"):
        check_python(args)
    elif program == "srun":  # its own options, then the command it starts
        rest = [i for i, a in enumerate(args) if not a.startswith("-")]
        assert rest, "srun without a command"
        check_command(args[rest[0]:])
    elif program in ("pip", "export", "wait", "jupyter"):
        pass  # nothing of this project's to check
    else:
        raise AssertionError(f"{program}: a program this test does not know; say how to check it")


# --- where the blocks run -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def playground(tmp_path_factory) -> Path:
    """The folder a block's copy runs in: the names the docs use, as tiny local models."""
    root = tmp_path_factory.mktemp("playground")
    make_gpt2(root / "gpt2", layers=12, vocab=50257, n_positions=256, tokenizer=True)
    for link in ("runs/commongen_small", "hsd-jax-demo/schedule_aware/model"):
        (root / link).parent.mkdir(parents=True, exist_ok=True)
        (root / link).symlink_to(os.path.relpath(root / "gpt2", (root / link).parent))
    pairs = [("dog frisbee catch throw", "A dog leaps to catch a frisbee."),
             ("cat sofa sleep", "A cat sleeps on the sofa."), ("boy ball kick", "A boy kicks a ball.")]
    (root / "pairs.jsonl").write_text("".join(json.dumps({"source": s, "target": t}) + "\n" for s, t in pairs))
    return root


def fresh_copy(playground: Path, tmp_path: Path) -> Path:
    folder = tmp_path / "work"
    shutil.copytree(playground, folder, symlinks=True)
    return folder


def run(argv: list[str], cwd: Path, label: str) -> None:
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", "HF_HUB_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    proc = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{label} failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"


# --- the tests ------------------------------------------------------------------------------------


def test_every_block_is_run_or_listed_and_every_listing_is_used():
    assert ALL_BLOCKS, "no code blocks found"
    used, problems = set(), []
    for block in ALL_BLOCKS:
        if block.lang in ("", "text"):
            first = block.text.splitlines()[0] if block.text.strip() else ""
            if first in TEXT_BLOCKS:
                used.add(first)
            else:
                problems.append(f"{block}: a block without a language; run it (```bash, ```python) or list "
                                f"its first line in TEXT_BLOCKS: {first!r}")
        elif block.lang in SHELL_LANGS:
            for command in commands(block):
                used.update(key for key in NOT_RUN if listed(command, key))
        elif block.lang != "python":
            problems.append(f"{block}: a ```{block.lang} block: this test runs python and shell blocks")
    problems += [f"NOT_RUN lists {key!r}, which no doc has any more" for key in NOT_RUN if key not in used]
    problems += [f"TEXT_BLOCKS lists {key!r}, which no doc has any more" for key in TEXT_BLOCKS if key not in used]
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("block", [b for b in ALL_BLOCKS if b.lang == "python"], ids=str)
def test_python_block_runs_as_written(block, playground, tmp_path):
    folder = fresh_copy(playground, tmp_path)
    (folder / "snippet.py").write_text(block.text)
    run([sys.executable, "snippet.py"], folder, str(block))


# The blocks whose runs passed, as the commands they ran: a block that only repeats
# another's (train/README.md the README's LoRA run) is not run twice.
PASSED: set[tuple[str, ...]] = set()


@pytest.mark.parametrize("block", [b for b in ALL_BLOCKS if b.lang in SHELL_LANGS], ids=str)
def test_shell_block_runs_or_its_commands_check(block, request, tmp_path):
    """Each command listed in NOT_RUN has its command line checked; the others run as
    written, in order, in one fresh folder."""
    to_run = []
    for command in commands(block):
        if not_run_reason(command) is None:
            to_run.append(command)
            continue
        for argv in simple_commands(command):
            try:
                check_command(argv)
            except AssertionError as err:
                raise AssertionError(f"{block}: `{command}` (not run): {err}") from None
    if not to_run or any(done[:len(to_run)] == tuple(to_run) for done in PASSED):
        return
    folder = fresh_copy(request.getfixturevalue("playground"), tmp_path)
    for command in to_run:
        run(["bash", "-c", command], folder, f"{block}: `{command}`")
    PASSED.add(tuple(to_run))


LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: links and code marks dropped, lower case, punctuation
    removed, spaces to hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading).replace("`", "").strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    in_code = False
    for line in path.read_text().splitlines():
        if FENCE.match(line):
            in_code = not in_code
        elif not in_code and (m := re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)):
            base = slug(m.group(1))
            n = seen.get(base, 0)
            seen[base] = n + 1
            out.add(base if n == 0 else f"{base}-{n}")
    return out


def test_relative_links_lead_to_files_and_headings():
    broken = []
    for rel in doc_files():
        path = ROOT / rel
        in_code = False
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if FENCE.match(line):
                in_code = not in_code
                continue
            if in_code:
                continue
            for target in LINK.findall(re.sub(r"`[^`]*`", "code", line)):  # a code span is no link
                if re.match(r"^[a-z]+:", target):  # http:, https:, mailto:
                    continue
                file_part, _, anchor = target.partition("#")
                dest = (path.parent / file_part).resolve() if file_part else path
                if not dest.exists():
                    broken.append(f"{rel}:{number}: {target} (no such file)")
                elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
                    broken.append(f"{rel}:{number}: {target} (no heading #{anchor} in {dest.relative_to(ROOT)})")
    assert not broken, "\n".join(broken)
