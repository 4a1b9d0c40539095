"""Every notebook in notebooks/ runs top to bottom (on a tiny local model)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import make_gpt2

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_runs(path, tmp_path, monkeypatch):
    import nbformat
    from nbclient import NotebookClient

    model = tmp_path / "model"
    make_gpt2(model, layers=4, vocab=50257, tokenizer=True)
    monkeypatch.setenv("HSD_NOTEBOOK_MODEL", str(model))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    nb = nbformat.read(path, as_version=4)
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.output_type == "error"]
    assert not errors
