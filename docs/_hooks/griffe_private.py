"""griffe extension: private keyword arguments stay out of the API reference.

A public function may take a keyword its own package passes and users must
not (`model_rnn(..., _reset_to=...)`, for `stepper.chunking`). Its signature
and its `Args:` entry on the reference page would read like API; this drops
parameters whose name starts with `_` from both, before mkdocstrings
renders them.
"""

import re

import griffe


def without_private_args(docstring):
  """`docstring` less each `Args:` entry `_name: ...` with its lines."""
  lines, out, skip_indent = docstring.split("\n"), [], None
  for line in lines:
    indent = len(line) - len(line.lstrip())
    if skip_indent is not None:
      if line.strip() and indent <= skip_indent:
        skip_indent = None
      else:
        continue
    if re.match(r"\s*_\w+( \(.*\))?:", line):
      skip_indent = indent
      continue
    out.append(line)
  return "\n".join(out)


class DropPrivateParameters(griffe.Extension):

  def on_function_instance(self, *, func, **kwargs):
    private = [p.name for p in func.parameters if p.name.startswith("_")
               and p.name not in ("_", "__")]
    for name in private:
      del func.parameters[name]
    if private and func.docstring is not None:
      func.docstring.value = without_private_args(func.docstring.value)
