"""The notebooks in `notebooks/` are committed stripped of their outputs.

Notebooks are documentation: the docs build executes every one top to bottom
and renders it with its outputs (`docs/_hooks/notebooks.py`, run by
`tests/docs_test.py`), so one that raises fails the suite. Outputs are kept
out of git (they would go stale): a committed notebook with outputs or
execution counts fails `test_notebooks_are_stripped`.
"""

import pathlib

import nbformat
import pytest

NOTEBOOKS = sorted(
    (pathlib.Path(__file__).parent.parent / "notebooks").glob("*.ipynb"))


def test_there_are_notebooks():
  assert NOTEBOOKS, "notebooks/ holds no notebook"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebooks_are_stripped(path):
  notebook = nbformat.read(path, as_version=4)
  dirty = [i for i, cell in enumerate(notebook.cells)
           if cell.cell_type == "code" and (cell.outputs or
                                            cell.execution_count)]
  assert not dirty, (f"{path.name}: cells {dirty} carry outputs; strip them "
                     "(jupyter nbconvert --clear-output --inplace)")
