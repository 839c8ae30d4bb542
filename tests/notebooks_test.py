"""Executes every notebook in `notebooks/` top to bottom; checks they are stripped.

Notebooks are documentation: one that raises fails the suite. Outputs are
kept out of git (they would go stale): a committed notebook with outputs or
execution counts fails `test_notebooks_are_stripped`.
"""

import pathlib

import nbformat
from nbclient import NotebookClient
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


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_top_to_bottom(path, tmp_path):
  notebook = nbformat.read(path, as_version=4)
  NotebookClient(notebook, timeout=600, kernel_name="python3",
                 resources={"metadata": {"path": str(tmp_path)}}).execute()
  errors = [output for cell in notebook.cells if cell.cell_type == "code"
            for output in cell.outputs if output.output_type == "error"]
  assert not errors, errors
