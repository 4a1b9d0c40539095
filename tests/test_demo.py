"""`hsd-jax demo --smoke`: the offline pipeline end to end (data, BPE, training, evaluation)."""

from __future__ import annotations

import json

from hsd_jax.cli import main
from hsd_jax.demo import SMOKE, schedules


def test_demo_smoke_runs_end_to_end(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--smoke", "--no-progress", "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    table = (out / "eval" / "table.md").read_text()
    assert table in printed and "hsd-jax generate --model" in printed
    assert (out / "eval" / "quality_vs_layers.png").stat().st_size > 1000
    assert (out / "model" / "config.json").exists() and (out / "model" / "tokenizer.json").exists()

    rows = json.loads((out / "eval" / "results.json").read_text())["rows"]
    assert len(rows) == len(schedules(SMOKE)) == 8
    vanilla, *skipping = rows
    assert vanilla["avg_layers"] == SMOKE.layers
    static = [r for r in skipping if not r["spec"].startswith("calm")]
    calm = [r["avg_layers"] for r in skipping if r["spec"].startswith("calm")]
    assert all(r["avg_layers"] < SMOKE.layers for r in static)
    # CALM exits only where the briefly trained smoke model is confident: the lower lambda does
    assert max(calm) <= SMOKE.layers and min(calm) < SMOKE.layers
    assert all(0 <= r["R-L"] <= 100 for r in rows)
    assert len(list((out / "eval" / "predictions").glob("*.jsonl"))) == 8

    # a second run into the same folder needs --overwrite
    assert main(["demo", "--smoke", "--no-progress", "--output", str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err


def test_overwrite_removes_only_what_a_demo_wrote(tmp_path):
    from hsd_jax.demo import MARKER, _prepare

    out = tmp_path / "demo"
    (out / "model").mkdir(parents=True)
    (out / "model" / "config.json").write_text("{}")
    (out / MARKER).write_text("{}")
    (out / "my_notes.txt").write_text("mine")
    _prepare(out, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == ["my_notes.txt"]
