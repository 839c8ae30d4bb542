"""mkdocs hook: the benchmarks page and the files of `benchmarks/results/`.

The page shows the plots the benchmark apps write next to their JSON
results, served from there as `results/*.png` (not copied into `docs/`).
Every file in `benchmarks/results/` must be named on the page (its "result
files" table says what it holds and which command writes it): a result
added without that is a warning, an error under `mkdocs build --strict`.
"""

import logging
import pathlib

from mkdocs.structure.files import File

PAGE = "benchmarks.md"
log = logging.getLogger("mkdocs.hooks.benchmarks")


def _results(config):
  root = pathlib.Path(config.config_file_path).parent
  return sorted((root / "benchmarks" / "results").iterdir())


def on_files(files, config):
  for path in _results(config):
    if path.suffix == ".png":
      files.append(File.generated(config, f"results/{path.name}",
                                  abs_src_path=str(path)))
  return files


def on_page_markdown(markdown, page, config, files):
  if page.file.src_uri == PAGE:
    for path in _results(config):
      if path.name not in markdown:
        log.warning(f"benchmarks/results/{path.name} is not on {PAGE}: add "
                    "it to the result files table, with the command that "
                    "writes it.")
  return markdown
