"""mkdocs hook: the notebooks in `notebooks/`, executed, with their outputs.

Outputs are kept out of git (`tests/notebooks_test.py`), so the build
executes each notebook top to bottom (nbclient, the `python3` kernel, two at
a time, each in a scratch directory) and hands the executed copy to
mkdocs-jupyter as `notebooks/<name>.ipynb`. A cell that raises fails the
build, naming the notebook: this is the test that the notebooks run.

Executed copies are kept under `build/notebooks/`, keyed by a hash of the
notebook and of every source file of the package, so `mkdocs serve`
re-executes a notebook only when it or the code changed.
`STEPPER_DOCS_EXECUTE=0` renders the notebooks without outputs instead.
"""

import concurrent.futures
import hashlib
import os
import pathlib
import re
import tempfile

import mkdocs.plugins
from mkdocs.exceptions import PluginError
from mkdocs.structure.files import File
import nbclient
import nbformat

_KEY = "stepper_docs_source_hash"
# nbconvert's template loads MathJax from a CDN on every notebook page, and
# mermaid.js when a cell outputs a diagram; the notebooks hold neither, and
# the site must fetch nothing from the network.
_CDN_SCRIPTS = (
    re.compile(r"<!-- Load mathjax -->.*?<!-- End of mathjax "
               r"configuration -->", re.DOTALL),
    re.compile(r'<script type="module">(?:(?!</script>).)*?mermaid.*?'
               r"</script>", re.DOTALL),
)


def _root(config):
  return pathlib.Path(config.config_file_path).parent


def _source_hash(root, notebook):
  digest = hashlib.sha256(notebook.read_bytes())
  for path in sorted((root / "stepper").rglob("*.py")):
    digest.update(path.read_bytes())
  return digest.hexdigest()


def _cached(path, key):
  if not path.exists():
    return False
  return nbformat.read(path, as_version=4).metadata.get(_KEY) == key


def _execute(source, target, key):
  notebook = nbformat.read(source, as_version=4)
  with tempfile.TemporaryDirectory() as scratch:
    try:
      nbclient.NotebookClient(
          notebook, timeout=600, kernel_name="python3",
          resources={"metadata": {"path": scratch}}).execute()
    except nbclient.exceptions.CellExecutionError as error:
      raise PluginError(f"{source.name} raised while executing:\n{error}")
  notebook.metadata[_KEY] = key
  target.parent.mkdir(parents=True, exist_ok=True)
  nbformat.write(notebook, target)


@mkdocs.plugins.event_priority(100)  # Before mkdocs-jupyter's on_files.
def on_files(files, config):
  root = _root(config)
  sources = sorted((root / "notebooks").glob("*.ipynb"))
  if os.environ.get("STEPPER_DOCS_EXECUTE", "1") == "0":
    rendered = {source: source for source in sources}
  else:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    rendered = {source: root / "build" / "notebooks" / source.name
                for source in sources}
    jobs = [(source, target, _source_hash(root, source))
            for source, target in rendered.items()]
    jobs = [job for job in jobs if not _cached(job[1], job[2])]
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
      for future in [pool.submit(_execute, *job) for job in jobs]:
        future.result()
  for source, path in rendered.items():
    # A File with a source directory, not File.generated: mkdocs-jupyter's
    # wrapper finds the notebook through `src_dir`.
    files.append(File(f"notebooks/{source.name}", src_dir=str(path.parent.parent),
                      dest_dir=config.site_dir,
                      use_directory_urls=config.use_directory_urls))
  return files


def on_page_content(html, page, config, files):
  if page.file.src_uri.endswith(".ipynb"):
    for script in _CDN_SCRIPTS:
      html = script.sub("", html)
  return html
