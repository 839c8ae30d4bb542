"""mkdocs hook: the API reference, generated from stepper's own exports.

Every name in `stepper.__all__` gets a page (`reference/stepper.<name>.md`,
one `::: stepper.<name>` directive that mkdocstrings renders from the
docstring), and so does every public module (a module named in
`stepper.__all__`, plus `PUBLIC_MODULES`): one page holding all of its
public names. The pages and their navigation are generated at build time,
so a new export gets its page without anyone writing one.

After the build, `on_post_build` checks the rendered site against the
package as Python sees it: every public name (and every public method a
public class defines) must have an anchor on some reference page, or the
build fails naming it. This catches a name mkdocstrings does not render (a
name griffe cannot see statically, a module missing from the list) and a
public module this hook does not know about.
"""

import html.parser
import importlib
import inspect
import pathlib
import pkgutil
import types

import mkdocs.plugins
from mkdocs.exceptions import PluginError
from mkdocs.structure.files import File

PACKAGE = "stepper"
# Modules users reach as `stepper.<module>.<name>` that are not themselves in
# `stepper.__all__` (`stepper.steps.split`; the Trainer's update rules).
PUBLIC_MODULES = ("stepper.steps", "stepper.update_rules")
NAV_TITLE = "API reference"
# Modules that are scripts, not API: importing them parses flags.
SCRIPTS = ("stepper.demo",)


def _package():
  return importlib.import_module(PACKAGE)


def top_level_names():
  """`stepper.<name>` for each non-module name of `stepper.__all__`."""
  package = _package()
  return [f"{PACKAGE}.{name}" for name in package.__all__
          if not isinstance(getattr(package, name), types.ModuleType)]


def public_modules():
  """The modules documented whole: those in `__all__` and PUBLIC_MODULES."""
  package = _package()
  exported = [getattr(package, name).__name__ for name in package.__all__
              if isinstance(getattr(package, name), types.ModuleType)]
  return sorted(set(exported) | set(PUBLIC_MODULES))


def module_members(module):
  """A module's public names: its `__all__`, else what it defines itself."""
  if hasattr(module, "__all__"):
    return list(module.__all__)
  return [name for name, value in vars(module).items()
          if not name.startswith("_")
          and (inspect.isfunction(value) or inspect.isclass(value))
          and value.__module__ == module.__name__]


def _class_members(path, cls):
  """`path.method` for each public method or property `cls` defines."""
  return [f"{path}.{name}" for name, value in vars(cls).items()
          if not name.startswith("_")
          and (inspect.isfunction(value) or isinstance(
              value, (property, classmethod, staticmethod)))]


def expected_anchors():
  """Every public object path that must have an anchor in the reference."""
  paths = []
  def add(path, obj):
    paths.append(path)
    if inspect.isclass(obj):
      paths.extend(_class_members(path, obj))
  package = _package()
  for path in top_level_names():
    add(path, getattr(package, path.rsplit(".", 1)[1]))
  for name in public_modules():
    module = importlib.import_module(name)
    paths.append(name)
    for member in module_members(module):
      add(f"{name}.{member}", getattr(module, member))
  return paths


def undocumented_modules():
  """Public-looking submodules whose names reach users through no page.

  A submodule without a leading underscore is public by the naming
  convention. It needs no page of its own when everything it defines is
  exported at the top level (`stepper.engine.model_rnn` is
  `stepper.model_rnn`) or it lives inside a documented module; otherwise a
  user could reach a name that has no page.
  """
  package = _package()
  documented = public_modules()
  exported = {id(getattr(package, name)) for name in package.__all__}
  missing = []
  for info in pkgutil.walk_packages(package.__path__, PACKAGE + "."):
    name = info.name
    if (any(part.startswith("_") for part in name.split("."))
        or name in SCRIPTS
        or any(name == d or name.startswith(d + ".") for d in documented)):
      continue
    module = importlib.import_module(name)
    if hasattr(module, "__all__"):
      names = [n for n in module.__all__
               if id(getattr(module, n)) not in exported]
      if names:
        missing.append(f"{name} ({', '.join(names)})")
  return missing


def _page(path):
  return f"reference/{path}.md"


def _summary(obj):
  doc = inspect.getdoc(obj) or ""
  # One table cell: a `|` would end it.
  return doc.split("\n\n", 1)[0].replace("\n", " ").replace("|", "\\|")


def _index():
  package = _package()
  lines = ["# API reference", "",
           "Generated from the docstrings. The names `import stepper` "
           "exports:", "", "| name | summary |", "|---|---|"]
  for path in top_level_names():
    obj = getattr(package, path.rsplit(".", 1)[1])
    lines.append(f"| [`{path}`]({path}.md) | {_summary(obj)} |")
  lines += ["", "Public modules, each on one page:", "",
            "| module | summary |", "|---|---|"]
  for name in public_modules():
    module = importlib.import_module(name)
    lines.append(f"| [`{name}`]({name}.md) | {_summary(module)} |")
  return "\n".join(lines) + "\n"


@mkdocs.plugins.event_priority(50)
def on_config(config):
  """Replaces the nav entry titled NAV_TITLE with the generated pages."""
  entries = [{"Overview": "reference/index.md"},
             {PACKAGE: [{path.split(".", 1)[1]: _page(path)}
                        for path in top_level_names()]}]
  entries += [{name: _page(name)} for name in public_modules()]
  for i, item in enumerate(config.nav or []):
    if isinstance(item, dict) and NAV_TITLE in item:
      config.nav[i] = {NAV_TITLE: entries}
      return config
  raise PluginError(f"mkdocs.yml's nav has no '{NAV_TITLE}' entry for the "
                    "generated reference pages.")


def on_files(files, config):
  files.append(File.generated(config, "reference/index.md", content=_index()))
  for path in top_level_names() + public_modules():
    files.append(File.generated(config, _page(path),
                                content=f"::: {path}\n"))
  return files


class _Ids(html.parser.HTMLParser):

  def __init__(self):
    super().__init__()
    self.ids = set()

  def handle_starttag(self, tag, attrs):
    self.ids.update(value for key, value in attrs if key == "id")


def on_post_build(config):
  """Fails the build when a public name has no anchor in the reference."""
  ids = _Ids()
  for page in pathlib.Path(config.site_dir, "reference").rglob("*.html"):
    ids.feed(page.read_text(encoding="utf-8"))
  missing = [path for path in expected_anchors() if path not in ids.ids]
  modules = undocumented_modules()
  if missing or modules:
    raise PluginError(
        "API reference incomplete. "
        + (f"Public names without a rendered entry: {', '.join(missing)}. "
           if missing else "")
        + (f"Public modules with names exported nowhere: {', '.join(modules)}"
           " (add the module to stepper.__all__ or to PUBLIC_MODULES in "
           "docs/_hooks/reference.py, or export the names). " if modules
           else "")
        + "Every public name needs a docstring griffe can see.")
