"""`hsd-jax eval`: a table, a plot, predictions and results for several schedules."""

from __future__ import annotations

import json

import pytest

from hsd_jax.cli import main
from hsd_jax.evaluate import group_references
from tests.conftest import make_gpt2


def test_group_references_keeps_order_and_all_references():
    pairs = [("a b", "x"), ("c", "y"), ("a b", "z")]
    assert group_references(pairs) == (["a b", "c"], [["x", "z"], ["y"]])


def test_eval_writes_table_plot_and_predictions(tmp_path, capsys):
    model = tmp_path / "model"
    make_gpt2(model, layers=4, vocab=50257, tokenizer=True)
    rows = [("dog frisbee catch", "The dog catches the frisbee."), ("dog frisbee catch", "A dog jumps for a frisbee."),
            ("cat mat sit", "A cat sits on the mat."), ("sun beach walk", "We walk on the beach in the sun.")]
    src = tmp_path / "dev.jsonl"
    src.write_text("".join(json.dumps({"source": s, "target": t}) + "\n" for s, t in rows))
    out = tmp_path / "eval"
    code = main(["eval", "--model", str(model), "--eval-file", str(src), "--schedules", "vanilla",
                 "hsd:s=1,min=0,max=2", "calm:lambda=0.5", "--num-beams", "2", "--max-new-tokens", "6",
                 "--batch-size", "2", "--no-bertscore", "--output", str(out)])
    assert code == 0
    results = json.loads((out / "results.json").read_text())
    assert results["num_sources"] == 3
    methods = [r["method"] for r in results["rows"]]
    assert len(methods) == 3 and results["rows"][0]["avg_layers"] == 4.0
    assert results["rows"][1]["avg_layers"] < 4.0
    for r in results["rows"]:
        assert {"R-1", "R-2", "R-L", "BLEU-1"} <= set(r) and 0 <= r["R-L"] <= 100
    table = (out / "table.md").read_text()
    assert "| method | Avg. Layer | R-1 | R-2 | R-L | BLEU-1 | tokens/s |" in table
    assert table in capsys.readouterr().out
    assert (out / "quality_vs_layers.png").stat().st_size > 1000
    preds = sorted((out / "predictions").glob("*.jsonl"))
    assert len(preds) == 3
    first = [json.loads(line) for line in preds[0].read_text().splitlines()]
    assert [p["references"] for p in first] == [["The dog catches the frisbee.", "A dog jumps for a frisbee."],
                                               ["A cat sits on the mat."], ["We walk on the beach in the sun."]]


def test_eval_rejects_schedules_deeper_than_the_model(tmp_path, capsys):
    model = tmp_path / "model"
    make_gpt2(model, layers=4, vocab=50257, tokenizer=True)
    src = tmp_path / "dev.jsonl"
    src.write_text(json.dumps({"source": "a", "target": "b"}) + "\n")
    assert main(["eval", "--model", str(model), "--eval-file", str(src), "--no-bertscore",
                 "--output", str(tmp_path / "o")]) == 2  # the paper's presets need >= 24 layers
    assert "error" in capsys.readouterr().err
