"""eval/interpolate_weights.py: a fine-tune mixed back towards its base (issue 37's probe of
the schedule-aware fine-tune's cost to vanilla)."""

import numpy as np
import pytest

from tests.conftest import eval_script, make_gpt2


@pytest.fixture(scope="module")
def script():
    return eval_script("interpolate_weights")


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """Two models of one architecture with different weights (seeds 0 and 1)."""
    base, tuned = tmp_path_factory.mktemp("base"), tmp_path_factory.mktemp("tuned")
    make_gpt2(base, layers=2, seed=0)
    make_gpt2(tuned, layers=2, seed=1)
    return base, tuned


def leaves(folder):
    import jax

    import hsd_jax

    return jax.tree.leaves(hsd_jax.load(folder, tokenizer=False).params)


@pytest.mark.parametrize("a", [0.0, 0.25, 1.0])
def test_the_written_model_is_the_weighted_sum(script, pair, tmp_path, a):
    base, tuned = pair
    assert script.main(["--base", str(base), "--tuned", str(tuned), "--base-weight", str(a),
                        "--output", str(tmp_path / "mixed")]) == 0
    for got, b, t in zip(leaves(tmp_path / "mixed"), leaves(base), leaves(tuned), strict=True):
        np.testing.assert_allclose(np.asarray(got), a * np.asarray(b) + (1 - a) * np.asarray(t), rtol=1e-6, atol=1e-7)


def test_models_of_different_shapes_and_a_weight_outside_0_1_are_refused(script, pair, tmp_path, capsys):
    base, tuned = pair
    deeper = tmp_path / "deeper"
    make_gpt2(deeper, layers=3)
    assert script.main(["--base", str(deeper), "--tuned", str(tuned), "--base-weight", "0.5",
                        "--output", str(tmp_path / "a")]) == 2
    assert "differ in architecture" in capsys.readouterr().err
    assert script.main(["--base", str(base), "--tuned", str(tuned), "--base-weight", "1.5",
                        "--output", str(tmp_path / "b")]) == 2
    assert "between 0 and 1" in capsys.readouterr().err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
