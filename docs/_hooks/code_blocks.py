"""mkdocs hook: docstring examples and diagrams render as code blocks.

stepper's docstrings hold their doctests in the text, as Python's own do,
not under an `Examples:` heading, and draw diagrams in literal blocks
introduced by `::`; in Markdown a `>>>` line would be a triple blockquote
and a diagram's `[0 1]` a link. This Markdown preprocessor fences

* each run of lines that starts with `>>>` (up to the next blank line: the
  prompts, `...` continuations and the expected output) as `pycon`;
* the indented block after a line ending in `::` as `text` (the `::`
  becomes `:`).

It is added to the Markdown extensions before mkdocstrings reads them, so it
applies to docstrings and pages alike; lines inside fences are left alone.
"""

import re

import markdown
import mkdocs.plugins

_FENCE = re.compile(r"^\s*(```|~~~)")


def _indent(line):
  return len(line) - len(line.lstrip())


def _fenced(language, lines, indent, fence_indent):
  """`lines` less `indent`, in a fence at `fence_indent`."""
  body = [line[len(indent):] if line.startswith(indent) else line.lstrip()
          for line in lines]
  return (["", fence_indent + "```" + language]
          + [fence_indent + line for line in body]
          + [fence_indent + "```", ""])


def _doctest(lines, i):
  """The `>>>` run starting at `i`, fenced, and the index after it."""
  end = i
  while end < len(lines) and lines[end].strip():
    end += 1
  indent = lines[i][:_indent(lines[i])]
  return _fenced("pycon", lines[i:end], indent, indent), end


def _literal(lines, i):
  """The literal block after the `::` line `i`, fenced; the index after."""
  base = _indent(lines[i])
  start = i + 1
  while start < len(lines) and not lines[start].strip():
    start += 1
  if start == len(lines) or _indent(lines[start]) <= base:
    return [lines[i]], i + 1
  end = start
  while end < len(lines) and (not lines[end].strip()
                              or _indent(lines[end]) > base):
    end += 1
  while not lines[end - 1].strip():
    end -= 1
  head = lines[i].rstrip()[:-1]  # `...::` reads `...:`.
  indent = lines[start][:_indent(lines[start])]
  return [head] + _fenced("text", lines[start:end], indent,
                          lines[i][:base]), end


class _Preprocessor(markdown.preprocessors.Preprocessor):

  def run(self, lines):
    out, fenced, i = [], False, 0
    while i < len(lines):
      line = lines[i]
      if _FENCE.match(line):
        fenced = not fenced
      if not fenced and line.lstrip().startswith(">>>"):
        block, i = _doctest(lines, i)
      elif not fenced and line.rstrip().endswith("::"):
        block, i = _literal(lines, i)
      else:
        block, i = [line], i + 1
      out += block
    return out


class CodeBlocksExtension(markdown.Extension):

  def extendMarkdown(self, md):  # pylint: disable=invalid-name
    # Ahead of the fenced-code preprocessors, which then fence these blocks.
    md.preprocessors.register(_Preprocessor(md), "stepper_code_blocks", 40)


@mkdocs.plugins.event_priority(100)  # Before mkdocstrings copies the list.
def on_config(config):
  config.markdown_extensions.append(CodeBlocksExtension())
  return config
