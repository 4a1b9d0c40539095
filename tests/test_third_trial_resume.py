"""Resumes the third new-user trial could not do (issue 36): a run folder moved with its
inputs, or resumed from another directory, continues; a run whose loss became nan continues
at a lower learning rate from its last good checkpoint, or from step 0 when it has none.

Every run is a random 2-layer, width-32 GPT-2 from a config.json with a byte-level BPE of
300 tokens, on 32 short pairs, batch 4: 8 steps an epoch.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

from hsd_jax import cli, data

PAIRS = [
    ("dog frisbee catch throw", "A dog leaps to catch a frisbee."),
    ("ski mountain skier", "A skier skis down the mountain."),
    ("cat sit mat", "The cat sits on the mat."),
    ("bread bake oven", "She bakes bread in the oven."),
] * 8
CONFIG = {"model_type": "gpt2", "n_layer": 2, "n_embd": 32, "n_head": 2, "n_positions": 64, "vocab_size": 300}
SETTINGS = ["--tokenizer", "bpe:300", "--batch-size", "4", "--epochs", "1", "--learning-rate", "1e-3",
            "--warmup-steps", "0", "--devices", "1", "--no-progress"]


def project(folder: Path) -> Path:
    """A folder holding the inputs (config.json, pairs.jsonl) and, later, the run in run/."""
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(CONFIG))
    data.write_jsonl(PAIRS, folder / "pairs.jsonl")
    return folder


def train(where: Path, *extra) -> int:
    """`hsd-jax train` on the inputs in `where`, into where/run, all named as given (relative or not)."""
    args = ["train", "--model", f"random:{where / 'config.json'}", "--train-file", str(where / "pairs.jsonl"),
            *SETTINGS, *map(str, extra), "--output", str(where / "run")]
    return cli.main(args)


def steps(run: Path) -> list[int]:
    from hsd_jax.train import read_log

    return [r["step"] for r in read_log(run)]


def test_a_run_folder_moved_with_its_inputs_resumes_from_anywhere(tmp_path, monkeypatch, capsys):
    """The demo's case: the inputs and the run in one folder, started with relative paths,
    then moved and resumed with absolute ones from another directory."""
    monkeypatch.chdir(tmp_path)
    project(Path("demo"))
    assert train(Path("demo"), "--max-steps", 2, "--save-every", 2) == 0
    moved = tmp_path / "elsewhere" / "demo"
    moved.parent.mkdir()
    shutil.move("demo", moved)
    monkeypatch.chdir("/")
    capsys.readouterr()
    assert train(moved, "--max-steps", 4, "--save-every", 2, "--resume") == 0
    assert f"resuming {moved / 'run'} from step 2" in capsys.readouterr().err
    assert steps(moved / "run") == [1, 2, 3, 4]


def finished_run(tmp_path: Path) -> Path:
    where = project(tmp_path / "p")
    assert train(where, "--max-steps", 1) == 0
    return where


def test_a_copy_of_the_inputs_elsewhere_is_still_another_input(tmp_path, capsys):
    """A run moved away from its inputs, resumed on a copy of them at a third place: neither the
    same path nor the same path from the run folder, so refused (the path is what a setting says)."""
    where = finished_run(tmp_path)
    (tmp_path / "q").mkdir()
    shutil.move(where / "run", tmp_path / "q" / "run")
    copy = project(tmp_path / "r")
    capsys.readouterr()
    assert cli.main(["train", "--model", f"random:{copy / 'config.json'}", "--train-file", str(copy / "pairs.jsonl"),
                     *SETTINGS, "--max-steps", "1", "--resume", "--output", str(tmp_path / "q" / "run")]) == 2
    err = capsys.readouterr().err
    assert "--resume must repeat the settings" in err and "model: " in err and "train_file: " in err


def test_a_run_recorded_with_relative_paths_still_resumes_from_where_it_was_started(tmp_path, monkeypatch, capsys):
    """Runs before this fix recorded random:CONFIG as given on the command line, relative."""
    monkeypatch.chdir(tmp_path)
    where = finished_run(Path("."))
    record = json.loads((where / "run" / "run.json").read_text())
    record["settings"]["model"] = "random:p/config.json"
    del record["inputs_from_run_folder"]
    (where / "run" / "run.json").write_text(json.dumps(record))
    assert train(where, "--max-steps", 1, "--resume") == 0
    assert "is already at step 1 of 8" in capsys.readouterr().out


def test_a_nan_without_a_checkpoint_is_followed_by_a_lower_rate_and_resume(tmp_path, capsys):
    where = project(tmp_path / "p")
    assert train(where, "--learning-rate", "1e30") == 2  # the last --learning-rate counts
    message = capsys.readouterr().err
    assert re.match(r"hsd-jax train: error: the training loss became (nan|inf) at step \d+; ", message), message
    assert "no checkpoint was written yet; lower --learning-rate, then --resume" in message
    assert not list((where / "run" / "checkpoints").iterdir())

    capsys.readouterr()
    assert train(where, "--learning-rate", "1e-3", "--resume") == 0  # what the line says to do
    err = capsys.readouterr().err
    assert "starting from step 0 with other optimiser settings (--learning-rate 1e+30 then, 0.001 now)" in err
    assert steps(where / "run") == list(range(1, 9))
    assert json.loads((where / "run" / "run.json").read_text())["settings"]["learning_rate"] == 1e-3


def test_a_nan_after_checkpoints_resumes_from_the_last_good_one_at_a_lower_rate(tmp_path, monkeypatch, capsys):
    """The loss of step 6 is made nan: the weights of step 5 gave it, so step 5's checkpoint
    goes, and a lower learning rate resumes from step 4's."""
    import hsd_jax.train as train_lib

    where = project(tmp_path / "p")
    write = train_lib._StepLog.write

    def nan_at_step_6(self, step, metrics, *args, **kwargs):
        if step == 6 and self.run.cfg.learning_rate > 1e-3:
            metrics = {**metrics, "loss": float("nan")}
        return write(self, step, metrics, *args, **kwargs)

    monkeypatch.setattr(train_lib._StepLog, "write", nan_at_step_6)
    capsys.readouterr()
    assert train(where, "--learning-rate", "2e-3", "--save-every", 1, "--keep-checkpoints", 3) == 2
    run = where / "run"
    assert capsys.readouterr().err == (
        "hsd-jax train: error: the training loss became nan at step 6 (the checkpoint of step 5, whose weights gave it, is removed); the "
        f"last intact checkpoint is step 4 ({run / 'checkpoints' / '4'}); lower --learning-rate, then --resume "
        "continues from it\n")

    capsys.readouterr()
    assert train(where, "--learning-rate", "1e-3", "--save-every", 1, "--keep-checkpoints", 3, "--resume") == 0
    err = capsys.readouterr().err
    assert f"resuming {run} from step 4 with other optimiser settings (--learning-rate 0.002 then, 0.001 now)" in err
    assert steps(run) == list(range(1, 9))


def test_a_resume_still_refuses_a_changed_setting_that_is_not_the_optimiser_s(tmp_path, capsys):
    where = finished_run(tmp_path)
    capsys.readouterr()
    assert train(where, "--max-steps", 1, "--seed", 1, "--resume") == 2
    assert "seed: 0 then, 1 now" in capsys.readouterr().err


# ---------------------------------------------------------------- the demo


def test_a_demo_moved_and_run_again_from_elsewhere_continues_its_training(tmp_path, monkeypatch):
    """The demo's two training stages as `run_demo` names their inputs (the demo folder given
    relative, the plain model's path for the fine-tune), then the folder moved and each stage
    run again with the folder given absolute from /: each continues, none is refused."""
    import dataclasses

    from hsd_jax import demo, demo_data

    size = dataclasses.replace(demo.SMOKE, num_train=32, width=16, epochs=1, aware_pairs=16)
    monkeypatch.chdir(tmp_path)

    def stages(out: Path, aware_steps: int) -> dict:  # the plain model's 2 steps, then the fine-tune's
        plain = out / demo.PLAIN / "model"
        return {plain: dict(model=f"random:{out / 'data' / 'model_config.json'}", tokenizer=f"bpe:{size.vocab}",
                            epochs=1, batch_size=16, learning_rate=1e-3),
                out / demo.AWARE / "model": dict(model=str(plain), limit=16, epochs=1, batch_size=8,
                                                 learning_rate=1e-3, max_steps=aware_steps)}

    out = demo._prepare(Path("demo"), {"family": "gpt2"}, overwrite=False)
    demo_data.write_splits(demo_data.make_splits(seed=0, num_train=32, num_dev=2, refs_per_dev=1), out / "data")
    (out / "data" / "model_config.json").write_text(json.dumps(demo.model_config("gpt2", size)))
    for model, stage in stages(out, 1).items():  # as if interrupted in the fine-tune
        demo._train(model, size, 0, False, stage)
    moved = tmp_path / "elsewhere" / "demo"
    moved.parent.mkdir()
    shutil.move("demo", moved)
    monkeypatch.chdir("/")
    for model, stage in stages(moved, 2).items():  # refused before the fix
        demo._train(model, size, 0, False, stage)
        assert json.loads((model / "run.json").read_text())["exported_step"] == 2  # (a log line every 10 steps)


def test_a_continued_demo_reports_the_time_of_all_its_runs(tmp_path, monkeypatch, capsys):
    """timings.json sums each stage over the runs (an interrupted stage's time too); the last
    line says the total, the runs and this run's time."""
    import hsd_jax.commands.demo as demo_command
    from hsd_jax import demo

    path = tmp_path / demo.TIMINGS
    first = demo._Clock(path)
    first.timed("train plain", lambda: None)
    first.stages["train plain"] = 100.0  # as if it had trained for 100 s before Ctrl-C
    first.before_total = 120.0
    try:
        with first:
            first.timed("eval plain", _interrupted)
    except KeyboardInterrupt:
        pass
    second = demo._Clock(path)
    with second:
        second.timed("train plain", lambda: None)
    timings = json.loads(path.read_text())
    assert timings["runs"] == 2 and timings["train plain"] == 100.0 and "eval plain" in timings
    assert timings["total"] >= 120 and timings["environment"]["cpu_cores"] >= 1 and timings["environment"]["jax"]

    result = demo.DemoResult(output=tmp_path, models={demo.PLAIN: tmp_path, demo.AWARE: tmp_path}, comparison="",
                             summary=[], seconds=7.0, timings=second.stages, total_seconds=second.total, runs=2)
    monkeypatch.setattr(demo, "run_demo", lambda *args, **kwargs: result)
    assert cli.main(["demo", "--smoke", "--output", str(tmp_path)]) == 0
    assert re.search(r"took 12\d s over 2 runs \(this one 7 s; train plain 100 s, eval plain 0 s\)",
                     capsys.readouterr().out)


def _interrupted():
    raise KeyboardInterrupt


def _drawn(monkeypatch, models, tmp_path):
    """The axes `plots.plot_quality_vs_layers` drew, and its marked lines by marker."""
    from matplotlib.figure import Figure

    from hsd_jax import plots

    saved = []
    monkeypatch.setattr(Figure, "savefig", lambda self, *a, **k: saved.append(self))
    plots.plot_quality_vs_layers(models, tmp_path / "plot.png")
    ax = saved[0].axes[0]
    by_marker = {}
    for line in ax.lines:
        if len(line.get_xdata()) and line.get_marker() not in (None, "None", ""):
            by_marker.setdefault(line.get_marker(), []).append(line)
    return ax, by_marker


def _demo_rows(labels):
    from hsd_jax import demo
    from hsd_jax.schedules import resolve

    specs = [resolve(s, num_layers=12, max_new_tokens=24) for s in demo.schedules(demo.SMOKE, "gpt2")]
    return {label: [{"method": r.name, "spec": r.spec, "avg_layers": 12.0 - j * 0.5, "R-L": 80.0 - j - i}
                     for j, r in enumerate(specs)] for i, label in enumerate(labels)}


def test_the_plot_joins_each_sweep_and_leaves_calm_s_settings_as_labelled_points(tmp_path, monkeypatch):
    from hsd_jax import demo, plots

    ax, by_marker = _drawn(monkeypatch, _demo_rows((demo.PLAIN, demo.AWARE)), tmp_path)
    calm = by_marker[plots.MARKERS[plots.CALM]]
    assert [len(line.get_xdata()) for line in calm] == [3, 3]  # both models' three CALM rows
    assert all(line.get_linestyle() == "None" for line in calm)  # points, not a curve
    assert all(line.get_linestyle() != "None" for m, lines in by_marker.items() if m != "^" for line in lines)
    assert len(set(plots.MARKERS.values())) == len(plots.MARKERS)
    assert {t.get_text() for t in ax.texts} == {"λ=0.02", "λ=0.995, measure=state", "λ=0.9, min_exit=6"}
    assert len(ax.get_legend().get_texts()) == len(by_marker)  # a legend of the rows (and one of the models)


def test_an_evaluation_s_plot_is_the_same_plot_for_one_model(tmp_path, monkeypatch):
    """hsd-jax eval's and score_blind.py's plot: the HSD strides are separate sweeps, CALM's
    rows points, a colour a series (it joined CALM's rows and both strides into one line)."""
    from hsd_jax import plots

    (rows,) = _demo_rows(("model",)).values()
    ax, by_marker = _drawn(monkeypatch, {"": rows}, tmp_path)
    calm, = by_marker[plots.MARKERS[plots.CALM]]
    assert len(calm.get_xdata()) == 3 and calm.get_linestyle() == "None"
    hsd = by_marker[plots.MARKERS["HSD, s=1"]] + by_marker[plots.MARKERS["HSD, s=2"]]
    assert len(hsd) == 2 and all(line.get_linestyle() == "-" for line in hsd)
    lines = [line for lines in by_marker.values() for line in lines]
    assert len({line.get_color() for line in lines}) == len(lines)
    assert plots.series("HSD(s=2, 0-4, w=1)") == "HSD w=1, s=2" and plots.series("SkipDecode(4-8)") == "SkipDecode"


def test_saved_rows_are_counted_in_words_that_agree():
    from hsd_jax.evaluate import finished_rows

    assert finished_rows(1) == "1 finished row" and finished_rows(2) == "2 finished rows"
