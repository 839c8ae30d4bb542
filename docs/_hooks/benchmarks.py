"""mkdocs hook: the plots of `benchmarks/results/` as `results/*.png`.

The benchmarks page shows the plots the benchmark apps write next to their
JSON results; they are served from where the apps write them, not copied
into `docs/`.
"""

import pathlib

from mkdocs.structure.files import File


def on_files(files, config):
  root = pathlib.Path(config.config_file_path).parent
  for path in sorted((root / "benchmarks" / "results").glob("*.png")):
    files.append(File.generated(config, f"results/{path.name}",
                                abs_src_path=str(path)))
  return files
