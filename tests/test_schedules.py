"""Schedules: the formulas and numbers of docs/methods.md, KV-gap detection, presets, bad specs, CLI."""

import math
import tomllib
from pathlib import Path

import numpy as np
import pytest

from hsd_jax.cli import main
from hsd_jax.errors import HsdError
from hsd_jax.schedules import PROPAGATE, RUN, SKIP, CalmConfig, Schedule, list_presets, resolve, schedule

REPO = Path(__file__).resolve().parent.parent

# The paper's Avg. Layer column as the spec reproduces it (docs/methods.md): spec -> (avg layers on 36 layers, on 32 layers), T = 72 steps.
AVG_LAYERS = {
    "hsd:s=1,min=0,max=20,T=72": (22.83, 20.83),
    "hsd:s=2,min=0,max=20,T=72": (18.42, 17.10),
    "hsd:s=1,min=0,max=14,T=72": (21.31, 19.31),
    "hsd:s=2,min=0,max=14,T=72": (16.38, 15.07),
    "hsd:s=1,min=0,max=10,T=72": (20.29, 18.29),
    "hsd:s=2,min=0,max=10,T=72": (15.04, 13.71),
    # SkipDecode runs warmup + h(t) layers, whatever the depth.
    "skipdecode:min=10,max=20,T=72": (16.07, 16.07),
    "skipdecode:min=10,max=24,T=72": (18.10, 18.10),
}


@pytest.mark.parametrize("spec", AVG_LAYERS)
@pytest.mark.parametrize("column, num_layers", [(0, 36), (1, 32)])
def test_avg_layers_match_method_table(spec, column, num_layers):
    sched = schedule(spec, num_layers=num_layers, max_new_tokens=72)
    assert sched.avg_layers == pytest.approx(AVG_LAYERS[spec][column], abs=0.005)


def _direct_row(method, t, L, s, h_min, h_max, T, w):
    """executed(t) of docs/methods.md, one step at a time, with plain Python sets."""
    h = round(h_max - (h_max - h_min) * min(t, T) / T)
    executed = set(range(w)) | set(range(L - h, L))
    if method == "hsd":
        executed |= {l for l in range(L - h) if (l + 1) % (s + 1) == 0}
    return [l in executed for l in range(L)]


@pytest.mark.parametrize(
    "method, L, s, h_min, h_max, T, w, steps",
    [
        ("hsd", 36, 1, 0, 20, 72, 0, 80),  # steps past T keep h(T)
        ("hsd", 32, 2, 3, 17, 50, 2, 40),  # steps short of T
        ("hsd", 12, 4, 1, 9, 7, 0, 10),
        ("skipdecode", 36, 0, 10, 24, 72, 1, 72),
        ("skipdecode", 24, 0, 4, 4, 5, 3, 9),  # constant budget
    ],
)
def test_formula_matches_direct_evaluation(method, L, s, h_min, h_max, T, w, steps):
    keys = f"s={s}," if method == "hsd" else ""
    sched = schedule(f"{method}:{keys}min={h_min},max={h_max},T={T},warmup={w}", num_layers=L, max_new_tokens=steps)
    expected = np.array([_direct_row(method, t, L, s, h_min, h_max, T, w) for t in range(steps)])
    np.testing.assert_array_equal(sched.mask, expected)
    assert sched.mask.shape == (steps, L)


def test_defaults_and_canonical_spec():
    hsd = schedule("hsd:s=1,min=0,max=20", num_layers=36, max_new_tokens=50)
    assert hsd.spec == "hsd:s=1,min=0,max=20,T=50,warmup=0"  # T defaults to max_new_tokens
    assert hsd.name == "HSD(s=1, 0-20)"
    skip = schedule(" skipdecode: min=10, max=20 ", num_layers=36, max_new_tokens=72)
    assert skip.spec == "skipdecode:min=10,max=20,T=72,warmup=1"
    assert skip.mask[:, 0].all() and not skip.mask[:, 1].any()  # warmup 1: layer 0 always runs
    vanilla = schedule("vanilla", num_layers=4, max_new_tokens=3)
    assert vanilla.mask.all() and vanilla.avg_layers == 4
    # The canonical spec rebuilds the same schedule.
    again = schedule(hsd.spec, num_layers=36, max_new_tokens=50)
    np.testing.assert_array_equal(again.mask, hsd.mask)


def test_presets_are_nested_and_need_no_kv_propagation():
    presets = list_presets()
    expected = {f"hsd-s{s}-{h}" for s in (1, 2) for h in (20, 14, 10)}
    expected |= {"skipdecode-10-20", "skipdecode-10-24", "calm-0.02", "calm-0.005"}
    assert set(presets) == expected
    for name in presets:
        if name.startswith("calm"):
            continue
        for num_layers in (36, 32):
            sched = schedule(name, num_layers=num_layers, max_new_tokens=100)
            assert sched.is_nested, name
            assert not sched.needs_kv.any(), name
            assert (sched.layer_ops() != PROPAGATE).all(), name


def test_preset_avg_layers_close_to_paper():
    from hsd_jax.schedules import preset_infos

    for name, info in preset_infos().items():
        if name.startswith("calm"):
            continue
        for label, paper in info["paper_avg_layers"].items():
            num_layers = int(label.split("(")[1].rstrip(")"))
            sched = schedule(name, num_layers=num_layers, max_new_tokens=72)
            # docs/methods.md's "within 0.06" compares figures rounded to 2 decimals: 13.71 vs 13.77.
            assert abs(sched.avg_layers - paper) < 0.065, (name, label)


def test_preset_file_path_and_calm_presets():
    by_path = schedule(str(REPO / "schedules" / "hsd-s2-14.json"), num_layers=32, max_new_tokens=72)
    by_name = schedule("hsd-s2-14", num_layers=32, max_new_tokens=72)
    np.testing.assert_array_equal(by_path.mask, by_name.mask)
    calm = resolve("calm-0.005", num_layers=32, max_new_tokens=72)
    assert calm == CalmConfig(lam=0.005, tau=4.0, min_exit=1)
    assert isinstance(resolve("hsd-s1-20", num_layers=36, max_new_tokens=72), Schedule)


def _random_mask(seed, steps=30, layers=8):
    rng = np.random.default_rng(seed)
    mask = rng.random((steps, layers)) < 0.4
    mask[:, 0] |= ~mask.any(axis=1)  # every step runs some layer
    return mask


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_needs_kv_is_the_brute_force_definition(seed):
    mask = _random_mask(seed)
    sched = schedule(mask, num_layers=8, max_new_tokens=30)
    T, L = mask.shape
    brute = np.array([[not mask[t, l] and any(mask[u, l] for u in range(t + 1, T)) for l in range(L)] for t in range(T)])
    assert brute.any()  # the random mask does have KV gaps
    np.testing.assert_array_equal(sched.needs_kv, brute)
    assert not sched.is_nested
    ops = sched.layer_ops()
    assert ops.dtype == np.int8
    np.testing.assert_array_equal(ops == RUN, mask)
    np.testing.assert_array_equal(ops == PROPAGATE, brute)
    np.testing.assert_array_equal(ops == SKIP, ~mask & ~brute)


@pytest.mark.parametrize("spec", ["hsd-s1-20", "skipdecode-10-24", "vanilla", "random"])
def test_segments_reassemble_the_schedule(spec):
    sched = (
        schedule(_random_mask(3), num_layers=8, max_new_tokens=30)
        if spec == "random"
        else schedule(spec, num_layers=36, max_new_tokens=90)
    )
    segments = sched.segments()
    assert segments[0][0] == 0 and segments[-1][1] == sched.max_new_tokens
    rebuilt = np.concatenate([np.repeat(row[None], stop - start, axis=0) for start, stop, row in segments])
    np.testing.assert_array_equal(rebuilt, sched.layer_ops())
    np.testing.assert_array_equal(rebuilt == RUN, sched.mask)
    for (_, stop, row), (start, _, next_row) in zip(segments, segments[1:]):
        assert stop == start and (row != next_row).any()  # maximal: neighbours differ


def test_properties_and_read_only_mask():
    sched = schedule("hsd:s=1,min=0,max=4,T=4", num_layers=8, max_new_tokens=6)
    assert (sched.num_layers, sched.max_new_tokens) == (8, 6)
    np.testing.assert_array_equal(sched.layers_per_step, sched.mask.sum(axis=1))
    assert sched.avg_layers == pytest.approx(sched.mask.sum() / 6)
    with pytest.raises(ValueError):
        sched.mask[0, 0] = False
    source = np.ones((3, 2), dtype=bool)
    user = schedule(source, num_layers=2, max_new_tokens=3)
    source[0] = False  # the schedule holds its own copy
    assert user.mask.all()


def test_masks_are_cut_to_max_new_tokens(tmp_path):
    mask = _random_mask(4, steps=30, layers=8)
    path = tmp_path / "mask.npy"
    np.save(path, mask.astype(np.int64))  # 0/1 integers are accepted too
    sched = schedule(str(path), num_layers=8, max_new_tokens=12)
    assert sched.spec == f"mask:{path}"
    np.testing.assert_array_equal(sched.mask, mask[:12])
    np.testing.assert_array_equal(schedule(f"mask:{path}", num_layers=8, max_new_tokens=12).mask, mask[:12])
    # A Schedule passed in is cut too; a formula one is rebuilt when more steps are needed.
    assert schedule(sched, num_layers=8, max_new_tokens=5).max_new_tokens == 5
    short = schedule("hsd:s=1,min=0,max=6,T=10", num_layers=8, max_new_tokens=10)
    longer = schedule(short, num_layers=8, max_new_tokens=20)
    np.testing.assert_array_equal(longer.mask, schedule(short.spec, num_layers=8, max_new_tokens=20).mask)


BAD_SPECS = [
    ("skipdecode2:min=1,max=2", "unknown schedule.*hsd.*skipdecode"),
    ("hsd:s=1,min=0,max=20,h=3", r"unknown key 'h' for hsd; allowed keys: s, min, max, T, warmup"),
    ("vanilla:T=3", "unknown key 'T' for vanilla; allowed keys: none"),
    ("hsd:min=0,max=20", "hsd needs s"),
    ("skipdecode:min=10", "skipdecode needs max"),
    ("hsd:s=1,min=0,max=2.5", "max must be an integer, got '2.5'"),
    ("hsd:s=1,min=0,max=20,max=10", "given twice"),
    ("hsd:s=1,min,max=20", "expected key=value"),
    ("hsd:s=1,min=12,max=10", "min=12 must not exceed max=10"),
    ("hsd:s=1,min=0,max=37", "max=37 must not exceed the model's 36 layers"),
    ("hsd:s=-1,min=0,max=20", "s=-1 must be >= 0"),
    ("skipdecode:min=-1,max=20", "min=-1 must be >= 0"),
    ("skipdecode:min=1,max=20,warmup=-2", "warmup=-2 must be >= 0"),
    ("skipdecode:min=1,max=20,warmup=40", "warmup=40 must not exceed the model's 36 layers"),
    ("hsd:s=1,min=0,max=20,T=0", "T=0 must be >= 1"),
    ("skipdecode:min=0,max=5,warmup=0", "decode steps 18, 19 run no layer"),
    ("hsd:s=40,min=0,max=5,T=5", r"decode steps 5, 6, 7, 8, 9, \.\.\. run no layer"),
    ("calm:lambda=0.02", "CALM decides its exit layer at run time"),
    ("calm-0.02", "CALM decides its exit layer at run time"),
    ("missing.npy", "mask file missing.npy does not exist"),
    ("missing.json", "preset file missing.json does not exist"),
]


@pytest.mark.parametrize("spec, message", BAD_SPECS)
def test_bad_specs_raise_clear_errors(spec, message):
    with pytest.raises(HsdError, match=message):
        schedule(spec, num_layers=36, max_new_tokens=20)


BAD_MASKS = [
    (np.ones((20, 35), dtype=bool), "35 columns but the model has 36 layers"),
    (np.ones((12, 36), dtype=bool), "12 rows but 20 decode steps"),
    (np.ones(36, dtype=bool), "must be 2-D"),
    (np.full((20, 36), 0.5), "must be boolean.*float64"),
    (np.full((20, 36), 2), r"a mask of integers must hold only 0 and 1, but it holds 2 \(the first at step 0, layer 0\)"),
    (np.vstack([np.ones((3, 36), bool), np.zeros((1, 36), bool), np.ones((16, 36), bool)]), "decode step 3 runs no layer"),
]


@pytest.mark.parametrize("mask, message", BAD_MASKS)
def test_bad_masks_raise_clear_errors(mask, message):
    with pytest.raises(HsdError, match=message):
        schedule(mask, num_layers=36, max_new_tokens=20)


def test_bad_schedule_and_calm_inputs():
    with pytest.raises(HsdError, match="for 36 layers but the model has 32"):
        schedule(schedule("vanilla", num_layers=36, max_new_tokens=4), num_layers=32, max_new_tokens=4)
    with pytest.raises(HsdError, match="lambda must be a number, got 'high'"):
        resolve("calm:lambda=high", num_layers=36, max_new_tokens=20)
    with pytest.raises(HsdError, match="lambda must be >= 0"):
        resolve("calm:lambda=-0.1", num_layers=36, max_new_tokens=20)
    with pytest.raises(HsdError, match="tau must be >= 0"):
        resolve("calm:lambda=0.1,tau=-1", num_layers=36, max_new_tokens=20)
    with pytest.raises(HsdError, match="min_exit must be >= 1"):
        resolve("calm:lambda=0.1,min_exit=0", num_layers=36, max_new_tokens=20)
    with pytest.raises(HsdError, match="min_exit=40 is more than the model's 36 layers"):
        resolve("calm:lambda=0.1,min_exit=40", num_layers=36, max_new_tokens=20)
    with pytest.raises(HsdError, match="calm needs lambda"):
        resolve("calm", num_layers=36, max_new_tokens=20)
    with pytest.raises(HsdError, match="unknown key 'lam' for calm; allowed keys: lambda, tau, min_exit"):
        resolve("calm:lam=0.1", num_layers=36, max_new_tokens=20)


def test_calm_threshold_formula():
    calm = resolve("calm:lambda=0.02,tau=4,min_exit=2", num_layers=36, max_new_tokens=50)
    assert calm == CalmConfig(lam=0.02, tau=4.0, min_exit=2)
    assert calm.threshold(0, 50) == pytest.approx(0.9 * 0.02 + 0.1)
    assert calm.threshold(50, 50) == pytest.approx(0.9 * 0.02 + 0.1 * math.exp(-4))
    assert CalmConfig(lam=2.0).threshold(0, 10) == 1.0  # clipped to [0, 1]
    thresholds = calm.thresholds(50)
    assert thresholds.shape == (50,) and (np.diff(thresholds) < 0).all()


def test_presets_ship_in_the_package():
    """pyproject maps schedules/ to hsd_jax.presets and lists every hsd_jax subpackage."""
    setuptools = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert setuptools["package-dir"]["hsd_jax.presets"] == "schedules"
    assert "*.json" in setuptools["package-data"]["hsd_jax.presets"]
    subpackages = {
        ".".join(init.parent.relative_to(REPO).parts) for init in (REPO / "hsd_jax").rglob("__init__.py")
    }
    missing = subpackages - set(setuptools["packages"])
    assert not missing, f"add {sorted(missing)} to [tool.setuptools] packages in pyproject.toml"


def test_cli_prints_and_plots(tmp_path, capsys):
    png = tmp_path / "plots" / "hsd.png"
    assert main(["schedule", "hsd-s1-20", "--layers", "36", "--steps", "72", "--plot", str(png)]) == 0
    out = capsys.readouterr().out
    assert "HSD(s=1, 0-20)" in out and "22.8333" in out and "one step in every 2" in out
    assert png.stat().st_size > 0
    assert not [p for p in png.parent.iterdir() if p != png]  # no temp file left behind

    assert main(["schedule", "--list"]) == 0
    assert "hsd-s2-10" in capsys.readouterr().out
    assert main(["schedule", "calm-0.02", "--layers", "36", "--steps", "72"]) == 0
    assert "no static mask" in capsys.readouterr().out
    assert main(["schedule", "hsd:s=1,min=0", "--layers", "36", "--steps", "72"]) == 2
    assert "hsd needs max" in capsys.readouterr().err


def test_cli_json_shows_kv_propagation(tmp_path, capsys):
    import json

    path = tmp_path / "mask.npy"
    np.save(path, _random_mask(5, steps=10, layers=6))
    assert main(["schedule", str(path), "--layers", "6", "--steps", "10", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    expected = schedule(str(path), num_layers=6, max_new_tokens=10)
    assert info["kv_propagate_cells"] == int(expected.needs_kv.sum()) > 0
    assert info["nested"] is False
    assert np.array_equal(np.array(info["mask"], dtype=bool), expected.mask)
