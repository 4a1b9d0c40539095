"""The notebooks in notebooks/: stored without outputs, each with a Colab badge to itself and
one parameters cell, and each running top to bottom offline (HSD_NOTEBOOK_SMOKE=1, on a tiny
local GPT-2 with the real GPT-2 tokenizer)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests.conftest import make_gpt2

NOTEBOOK_DIR = Path(__file__).resolve().parents[1] / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))
IDS = [p.name for p in NOTEBOOKS]
COLAB = "https://colab.research.google.com/github/hsd-jax/hsd-jax/blob/main/notebooks/"
SECONDS_PER_NOTEBOOK = 180  # the budget each notebook's smoke run keeps to on a 2-core CPU


def read(path: Path):
    import nbformat

    return nbformat.read(path, as_version=4)


def test_the_notebooks_are_there():
    assert IDS == ["01_quickstart.ipynb", "02_compiled_vs_eager.ipynb", "03_finetune_and_evaluate.ipynb"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=IDS)
def test_notebook_is_stored_without_outputs(path):
    stale = [i for i, cell in enumerate(read(path).cells) if cell.cell_type == "code"
             and (cell.get("outputs") or cell.get("execution_count") is not None)]
    assert not stale, f"{path.name}: cells {stale} keep outputs or execution counts; clear them before committing"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=IDS)
def test_notebook_opens_with_a_colab_badge_to_itself(path):
    first = read(path).cells[0]
    assert first.cell_type == "markdown"
    assert "colab-badge.svg" in first.source and f"({COLAB}{path.name})" in first.source


@pytest.mark.parametrize("path", NOTEBOOKS, ids=IDS)
def test_notebook_installs_in_colab_and_has_one_parameters_cell(path):
    cells = read(path).cells
    install = next(c for c in cells if c.cell_type == "code")
    assert '"google.colab" in sys.modules' in install.source and "git+https://github.com/hsd-jax/hsd-jax" in install.source
    params = [c for c in cells if "parameters" in c.metadata.get("tags", [])]
    assert len(params) == 1
    assert "HSD_NOTEBOOK_MODEL" in params[0].source and "HSD_NOTEBOOK_SMOKE" in params[0].source


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    """One tiny GPT-2 (4 layers, the real GPT-2 BPE) for every notebook."""
    folder = tmp_path_factory.mktemp("notebook_model")
    make_gpt2(folder, layers=4, vocab=50257, tokenizer=True)
    return folder


@pytest.mark.parametrize("path", NOTEBOOKS, ids=IDS)
def test_notebook_runs(path, tiny_model, tmp_path, monkeypatch):
    from nbclient import NotebookClient

    monkeypatch.setenv("HSD_NOTEBOOK_MODEL", str(tiny_model))
    monkeypatch.setenv("HSD_NOTEBOOK_SMOKE", "1")
    monkeypatch.delenv("MPLBACKEND", raising=False)  # the kernel's inline backend: plots become PNG outputs
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    nb = read(path)
    start = time.perf_counter()
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    seconds = time.perf_counter() - start
    print(f"{path.name}: {seconds:.0f} s")
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert not [o for o in outputs if o.output_type == "error"]
    assert any("image/png" in o.get("data", {}) for o in outputs), f"{path.name} showed no plot"
    assert seconds < 2 * SECONDS_PER_NOTEBOOK, f"{path.name} took {seconds:.0f} s in smoke mode"
