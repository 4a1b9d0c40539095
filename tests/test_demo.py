"""`hsd-jax demo --smoke`, both families: the offline pipeline end to end (data, BPE, the plain
model, the schedule-aware fine-tune, both evaluations and their comparison), models that
transformers decodes as hsd-jax does, and a demo that continues where SIGTERM stopped it."""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hsd_jax.cli import main
from hsd_jax.demo import AWARE, FAMILIES, MARKER, PLAIN, SMOKE, _prepare, aware_schedules, paper_hsd, schedules

REPO = Path(__file__).resolve().parents[1]


def run_smoke(out: Path, *extra: str) -> tuple[int, str, str]:
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        code = main(["demo", "--smoke", "--no-progress", "--output", str(out), *extra])
    return code, stdout.getvalue(), stderr.getvalue()


@pytest.fixture(scope="module", params=FAMILIES)
def smoke(request, tmp_path_factory):
    """(family, folder, what it printed) of one smoke demo per family."""
    out = tmp_path_factory.mktemp(f"demo_{request.param}") / "demo"
    code, printed, err = run_smoke(out, "--family", request.param)
    assert code == 0, err
    return request.param, out, printed


def rows(folder: Path) -> list[dict]:
    return json.loads((folder / "eval" / "results.json").read_text())["rows"]


def test_both_models_are_evaluated_on_the_same_rows_and_compared(smoke):
    family, out, printed = smoke
    comparison = (out / "comparison.md").read_text()
    assert all(line in printed for line in comparison.splitlines()[2:])  # the table and the summary
    assert "plain model: vanilla R-L" in printed and "schedule-aware fine-tune: vanilla R-L" in printed
    assert "CALM at the paper's lambda 0.02 exits" in printed
    assert (out / "quality_vs_layers.png").stat().st_size > 1000
    assert "hsd-jax generate --model" in printed and json.loads((out / "timings.json").read_text())["total"] > 0

    specs = [r["spec"] for r in rows(out / PLAIN)]
    assert specs == [r["spec"] for r in rows(out / AWARE)]
    assert len(specs) == len(schedules(SMOKE, family)) and set(paper_hsd(SMOKE)) <= set(specs)
    for label in (PLAIN, AWARE):
        vanilla, *skipping = rows(out / label)
        assert vanilla["avg_layers"] == SMOKE.layers
        assert all(r["avg_layers"] < SMOKE.layers for r in skipping if not r["spec"].startswith("calm"))
        assert all(r["avg_layers"] <= SMOKE.layers for r in skipping)
        assert all(0 <= r["R-L"] <= 100 for r in skipping)
        assert len(list((out / label / "eval" / "predictions").glob("*.jsonl"))) == len(specs)
    assert "schedule_aware" in str(out / AWARE)


def test_the_models_are_the_familys_own_and_the_fine_tune_is_schedule_aware(smoke):
    family, out, _ = smoke
    plain = json.loads((out / PLAIN / "model" / "config.json").read_text())
    assert plain["model_type"] == family
    if family == "phi":  # the family's own code paths: rotary on part of each head
        assert plain["partial_rotary_factor"] == 0.5 and "n_embd" not in plain
    aware = json.loads((out / AWARE / "model" / "run.json").read_text())["settings"]
    assert aware["model"] == str(out / PLAIN / "model")
    assert aware["skip_aware"] == aware_schedules(SMOKE) and aware["skip_aware_joint"]
    assert aware["skip_aware_distill"] == 1.0 and aware["learning_rate"] < SMOKE.learning_rate


def test_transformers_loads_each_model_and_greedy_decodes_the_same_tokens(smoke):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import hsd_jax
    from hsd_jax.data import encode_source, format_source

    family, out, _ = smoke
    sources = [json.loads(line)["source"] for line in (out / "data" / "dev.jsonl").read_text().splitlines()]
    sources = list(dict.fromkeys(sources))[:4]
    for label in (PLAIN, AWARE):
        folder = out / label / "model"
        tokenizer = AutoTokenizer.from_pretrained(folder)
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        lm = hsd_jax.load(folder)
        prompts = [tokenizer(format_source(s))["input_ids"] for s in sources]
        assert prompts == [encode_source(lm.tokenizer, s, 128) for s in sources]
        eos = tokenizer.eos_token_id
        ours = hsd_jax.generate(lm, input_ids=prompts, max_new_tokens=SMOKE.max_new_tokens)
        assert ours.avg_layers == SMOKE.layers
        for prompt, tokens in zip(prompts, ours.sequences):
            ids = torch.tensor([prompt])
            with torch.no_grad():
                theirs = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                        max_new_tokens=SMOKE.max_new_tokens, eos_token_id=eos,
                                        pad_token_id=eos)[0, len(prompt):].tolist()
            if eos in theirs:
                theirs = theirs[: theirs.index(eos) + 1]
            assert tokens == theirs, (family, label)


def test_a_rerun_prints_a_finished_demo_again_and_other_settings_need_overwrite(smoke):
    family, out, printed = smoke
    log = (out / PLAIN / "model" / "train_log.jsonl").read_text()
    code, again, err = run_smoke(out, "--family", family)
    assert code == 0 and "continuing the demo" in err
    assert (out / "comparison.md").read_text().splitlines()[2] in again
    assert (out / PLAIN / "model" / "train_log.jsonl").read_text() == log  # nothing retrained

    other = FAMILIES[1 - FAMILIES.index(family)]
    code, _, err = run_smoke(out, "--family", other)
    assert code == 2 and "--overwrite" in err and f"family {family!r} there" in err


def test_overwrite_removes_only_what_a_demo_wrote(tmp_path):
    out = tmp_path / "demo"
    (out / PLAIN / "model").mkdir(parents=True)
    (out / PLAIN / "model" / "config.json").write_text("{}")
    (out / "model").mkdir()  # an older demo's layout
    (out / MARKER).write_text("{}")
    (out / "my_notes.txt").write_text("mine")
    _prepare(out, {"family": "gpt2"}, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == [MARKER, "my_notes.txt"]


def test_an_older_demo_needs_overwrite(tmp_path):
    out = tmp_path / "demo"
    out.mkdir()
    (out / MARKER).write_text(json.dumps({"smoke": True, "seed": 0, "size": {}}))
    with pytest.raises(Exception, match="--overwrite"):
        _prepare(out, {"family": "gpt2", "smoke": True, "seed": 0, "size": {"layers": 12}}, overwrite=False)


def test_a_demo_stopped_by_sigterm_while_training_continues_from_its_checkpoint(tmp_path):
    out = tmp_path / "demo"
    log = out / PLAIN / "model" / "train_log.jsonl"
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "JAX_PLATFORMS": "cpu"}
    proc = subprocess.Popen([sys.executable, "-m", "hsd_jax.cli", "demo", "--smoke", "--no-progress", "--output",
                             str(out)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 600
    while not (log.exists() and log.read_text().count("\n") >= 2):  # log lines every 10 steps
        assert proc.poll() is None, proc.stderr.read()
        assert time.monotonic() < deadline, "the demo never logged two lines"
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 143, err
    assert f"hsd-jax demo --smoke --output {out}` continues it" in err
    stopped = [json.loads(line)["step"] for line in log.read_text().splitlines()]
    total = SMOKE.epochs * -(-SMOKE.num_train // SMOKE.batch_size)
    assert stopped[-1] < total and not (out / AWARE).exists()

    code, printed, err = run_smoke(out)
    assert code == 0, err
    resumed = re.search(r"resuming \S+ from step (\d+)", err)  # the checkpoint SIGTERM wrote, not step 0
    assert resumed and stopped[-1] <= int(resumed.group(1)) < total, err
    steps = [json.loads(line)["step"] for line in log.read_text().splitlines()]
    assert steps == sorted(set(steps)) and steps[-1] == total  # each step logged once: none ran twice
    assert json.loads((out / AWARE / "eval" / "results.json").read_text())["complete"]
