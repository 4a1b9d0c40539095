"""Clears the outputs and execution counts of notebooks (default: every one beside this
file), as they are committed; needs only nbformat (the `test` extra), not nbconvert.

    python notebooks/clear_outputs.py [NOTEBOOK ...]
"""

import sys
from pathlib import Path

import nbformat


def clear(path: Path) -> None:
    nb = nbformat.read(path, as_version=4)
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
            cell.metadata.pop("execution", None)  # run times nbclient and JupyterLab record
    nbformat.write(nb, path)


if __name__ == "__main__":
    paths = [Path(a) for a in sys.argv[1:]] or sorted(Path(__file__).parent.glob("*.ipynb"))
    for path in paths:
        clear(path)
        print(f"cleared {path}")
