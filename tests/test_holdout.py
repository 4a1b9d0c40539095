"""The selection / report halves of a held-out split (issue 37's protocol): a fixed rule,
independent of concept order, that splits every source with all its references."""

import hashlib
import json

import pytest

from hsd_jax import data
from hsd_jax.errors import HsdError
from tests.conftest import eval_script, needs_shared_data


def test_half_is_the_first_bit_of_the_sorted_words_hash():
    # The rule written out independently: a change to it changes every reported figure.
    for source in ["dog frisbee catch throw", "field look stand", "a", "name[x] food[Thai]"]:
        key = " ".join(sorted(source.split())).encode()
        expected = "report" if hashlib.sha256(key).digest()[0] % 2 else "selection"
        assert data.holdout_half(source) == expected


def test_half_ignores_concept_order_and_spacing():
    assert data.holdout_half("throw dog  catch frisbee") == data.holdout_half("catch dog frisbee throw")


def test_both_halves_occur_and_partition():
    sources = [f"word{i} other{i * 7}" for i in range(400)]
    halves = [data.holdout_half(s) for s in sources]
    assert 150 < halves.count("selection") < 250 and halves.count("report") == 400 - halves.count("selection")


def test_unknown_half_is_refused_naming_the_halves():
    with pytest.raises(HsdError, match="selection, report") as caught:
        data.load_dataset_pairs("common_gen", "validation:test")
    assert "validation:selection" in str(caught.value)


def test_local_file_halves(tmp_path, monkeypatch):
    # A data folder of the shared layout, so the halves are taken from the local reader.
    root = tmp_path / "data"
    (root / "commongen").mkdir(parents=True)
    sets = [f"c{i} d{i} e{i}" for i in range(60)]
    src = [s for s in sets for _ in range(3)]
    tgt = [f"sentence {i} {j}" for i in range(60) for j in range(3)]
    (root / "commongen" / "commongen.dev.src_alpha.txt").write_text("\n".join(src) + "\n")
    (root / "commongen" / "commongen.dev.tgt.txt").write_text("\n".join(tgt) + "\n")
    monkeypatch.setenv("HSD_DATA_DIR", str(root))
    whole = data.load_dataset_pairs("common_gen", "validation")
    selection = data.load_dataset_pairs("common_gen", "dev:selection")
    report = data.load_dataset_pairs("common_gen", "validation:report")
    assert sorted(selection + report) == sorted(whole)
    assert all(data.holdout_half(s) == "selection" for s, _ in selection)
    assert all(data.holdout_half(s) == "report" for s, _ in report)
    # every reference stays with its source
    assert all(sum(s == source for s, _ in selection + report) == 3 for source in sets)
    assert data.load_dataset_sources("common_gen", "validation:report") == \
        [s for s in dict.fromkeys(src) if data.holdout_half(s) == "report"]


@needs_shared_data
def test_commongen_dev_halves_are_balanced():
    pairs = data.load_dataset_pairs("common_gen", "validation")
    sources = set(s for s, _ in pairs)
    selection = set(s for s, _ in data.load_dataset_pairs("common_gen", "validation:selection"))
    report = set(s for s, _ in data.load_dataset_pairs("common_gen", "validation:report"))
    assert selection | report == sources and not selection & report
    assert (len(selection), len(report)) == (496, 497)  # 993 concept sets


def test_hub_concept_lists_fall_in_the_same_half():
    # The hub gives concepts as a list in written order; the shared files alphabetically.
    rows = [{"concepts": ["throw", "dog", "frisbee"], "target": "A dog throws."}]
    (source, _), = data._pairs_from_rows(rows, "concepts", "target", "rows")
    assert data.holdout_half(source) == data.holdout_half("dog frisbee throw")


def test_holdout_report_scores_each_half_against_its_own_vanilla(tmp_path, monkeypatch, capsys):
    root = tmp_path / "data"
    (root / "commongen").mkdir(parents=True)
    sets = [f"c{i} d{i} e{i}" + (" f" if i % 3 == 0 else "") for i in range(40)]
    (root / "commongen" / "commongen.dev.src_alpha.txt").write_text("\n".join(sets) + "\n")
    (root / "commongen" / "commongen.dev.tgt.txt").write_text("\n".join(f"the c{i} and d{i}" for i in range(40)) + "\n")
    monkeypatch.setenv("HSD_DATA_DIR", str(root))
    run = tmp_path / "run"
    (run / "predictions").mkdir(parents=True)
    rows = [{"method": "Vanilla", "spec": "vanilla", "avg_layers": 12.0},
            {"method": "Same", "spec": "hsd:s=1,min=0,max=4,T=72", "avg_layers": 6.0},
            {"method": "Report wrong", "spec": "hsd:s=2,min=0,max=4,T=72", "avg_layers": 5.0}]
    (run / "results.json").write_text(json.dumps({"rows": rows}))
    from hsd_jax.evaluate import _predictions_path

    def write(spec, predictions):
        lines = [json.dumps({"source": s, "prediction": p, "references": []}) for s, p in zip(sets, predictions)]
        _predictions_path(run, spec).write_text("\n".join(lines) + "\n")

    good = [f"the c{i} and d{i}" for i in range(40)]
    write("vanilla", good)
    write(rows[1]["spec"], good)
    write(rows[2]["spec"], [g if data.holdout_half(s) == "selection" else "nothing" for s, g in zip(sets, good)])
    module = eval_script("holdout_report")
    assert module.main([str(run), "--output", str(tmp_path / "out.md")]) == 0
    table = (tmp_path / "out.md").read_text()
    same = next(line for line in table.splitlines() if line.startswith("| Same"))
    wrong = next(line for line in table.splitlines() if line.startswith("| Report wrong"))
    assert same.count("(100.0%)") == 6  # both halves, both sizes, each half's long sources
    cells = [c.strip() for c in wrong.split("|")[3:5]]
    assert cells[0] == "100.00 (100.0%)" and cells[1] == "0.00 (0.0%)"
    # the choosing lines: one per half, the best row at <= 40% of 12 layers is none of these
    summary = {line.split("|")[2].strip(): line for line in table.splitlines() if line.startswith(f"| {run} |")}
    assert set(summary) == {"selection", "report"}
    assert "| - / - |" in summary["report"]
    # a prediction file for other sources is refused, not scored
    write(rows[1]["spec"], good)
    lines = _predictions_path(run, rows[1]["spec"]).read_text().splitlines()
    _predictions_path(run, rows[1]["spec"]).write_text("\n".join(reversed(lines)) + "\n")
    with pytest.raises(SystemExit, match="not for source"):
        module.main([str(run)])


def test_holdout_report_reads_a_run_on_one_half(tmp_path, monkeypatch):
    """A candidate decoded on the selection half only (`--split validation:selection`): its
    split comes from the run's settings, and its choosing line gives the paper's HSD rows."""
    from hsd_jax.evaluate import _predictions_path
    from hsd_jax.schedules import paper_specs

    root = tmp_path / "data"
    (root / "commongen").mkdir(parents=True)
    sets = [f"c{i} d{i} e{i}" + (" f g" if i % 2 else "") for i in range(60)]
    (root / "commongen" / "commongen.dev.src_alpha.txt").write_text("\n".join(sets) + "\n")
    (root / "commongen" / "commongen.dev.tgt.txt").write_text("\n".join(f"the c{i} and d{i} e{i}" for i in range(60)) + "\n")
    monkeypatch.setenv("HSD_DATA_DIR", str(root))
    half = [s for s in sets if data.holdout_half(s) == "selection"]
    run = tmp_path / "run"
    (run / "predictions").mkdir(parents=True)
    hsd = [spec for spec in paper_specs("paper", 12) if spec.startswith("hsd")]
    rows = [{"method": "Vanilla", "spec": "vanilla", "avg_layers": 12.0},
            {"method": "Deep", "spec": hsd[5], "avg_layers": 6.0},  # 50%: a paper row at <= 60%
            {"method": "Shallow", "spec": hsd[0], "avg_layers": 9.0}]
    settings = {"dataset": "common_gen/validation:selection"}
    (run / "results.json").write_text(json.dumps({"settings": settings, "rows": rows}))
    good = {s: f"the {s.split()[0]} and {s.split()[1]} {s.split()[2]}" for s in half}
    predictions = {"vanilla": good,
                   hsd[5]: {s: g if len(s.split()) < 4 else "the" for s, g in good.items()},  # fails long sets
                   hsd[0]: good}
    for spec, by_source in predictions.items():
        lines = [json.dumps({"source": s, "prediction": by_source[s], "references": []}) for s in half]
        _predictions_path(run, spec).write_text("\n".join(lines) + "\n")
    module = eval_script("holdout_report")
    assert module.main([str(run), "--output", str(tmp_path / "out.md")]) == 0
    table = (tmp_path / "out.md").read_text()
    assert f"| selection ({len(half)}) |" in table and "report (" not in table
    line, = [line for line in table.splitlines() if line.startswith(f"| {run} | selection |")]
    cells = [c.strip() for c in line.split("|")[3:7]]
    assert cells[0] == "100.00"
    # "the" against a 5-word reference: R-L F1 2 x 1 x 0.2 / 1.2 = 1/3 of vanilla's 1 on long sets
    assert cells[1].endswith(" / 33.3% (Deep)") and cells[1].split("%")[0] != "100.0"
    assert cells[2] == cells[1]  # Deep is the one paper row at <= 60% of the layers
    assert cells[3] == "- / -"
