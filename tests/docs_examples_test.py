"""The ```python examples of the documentation pages run, as the docstrings' do.

Each page is one session: its ```python blocks run top to bottom in one
namespace (a page's first block sets up what its later ones use), in a
scratch working directory, from the same seed. A page whose example stops
working fails here, naming the page and the block.
"""

import pathlib
import re
import textwrap

import keras
import pytest

DOCS = pathlib.Path(__file__).resolve().parent.parent / "docs"
_BLOCK = re.compile(r"^```python\n(.*?)^```", re.DOTALL | re.MULTILINE)


def python_blocks(text):
  return [textwrap.dedent(block) for block in _BLOCK.findall(text)]


PAGES = sorted(path for path in DOCS.rglob("*.md")
               if python_blocks(path.read_text(encoding="utf-8")))


def test_pages_with_examples_are_found():
  names = {path.relative_to(DOCS).as_posix() for path in PAGES}
  assert {"getting-started.md", "guides/variable-length.md",
          "guides/chunks.md"} <= names, names


@pytest.mark.parametrize("page", PAGES,
                         ids=lambda p: p.relative_to(DOCS).as_posix())
def test_page_examples_run(page, tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)  # Examples may save models, logs, checkpoints.
  keras.utils.set_random_seed(0)
  namespace = {"__name__": f"docs_example_{page.stem}"}
  for i, block in enumerate(python_blocks(page.read_text(encoding="utf-8"))):
    try:
      exec(compile(block, f"{page.name}[block {i}]", "exec"), namespace)  # pylint: disable=exec-used
    except Exception as error:
      raise AssertionError(
          f"{page.relative_to(DOCS)}: python block {i} raised "
          f"{type(error).__name__}: {error}\n{block}") from error
