"""The char LM's text: the stdlib's `*.py` files, split by whole files.

`stdlib_split` shuffles the files with a fixed seed, cuts each to a bounded
excerpt and holds whole excerpts out for validation; `training_ids` orders the
training excerpts by the experiment's seed. No flags: tests import it.
"""

import glob
import os
import string
import sysconfig

import numpy as np

# Printable ASCII (tabs and newlines included); id 0 is "any other".
_ALPHABET = string.printable
VOCAB = len(_ALPHABET) + 1


def stdlib_split(excerpt: int, val_chars: int,
                 split_seed: int) -> tuple[list[str], str]:
  """The stdlib's `*.py` files, shuffled, cut to excerpts, split by file.

  Args:
    excerpt: At most this many characters per file, starting at a line
      drawn at random (the whole file if shorter).
    val_chars: Validation takes whole excerpts from the front of the shuffled
      list until it has at least this many characters.
    split_seed: Seeds the shuffle and the excerpts' starts.

  Returns:
    `(train_excerpts, validation_text)`.

  Raises:
    ValueError: If the validation takes every file.
  """
  root = sysconfig.get_paths()["stdlib"]
  paths = sorted(glob.glob(os.path.join(root, "*.py")))
  rng = np.random.default_rng(split_seed)
  excerpts = []
  for i in rng.permutation(len(paths)):
    with open(paths[i], encoding="utf-8", errors="replace") as f:
      text = f.read()
    if len(text) > excerpt:
      start = int(rng.integers(0, len(text) - excerpt + 1))
      start = text.rfind("\n", 0, start) + 1  # The start of that line.
      text = text[start:start + excerpt]
    excerpts.append(text)
  size = np.cumsum([len(e) for e in excerpts])
  cut = int(np.searchsorted(size, val_chars)) + 1
  if cut >= len(excerpts):
    raise ValueError(f"val_chars={val_chars} takes all {len(excerpts)} files "
                     f"({size[-1]} characters) of {root}; pass fewer.")
  return excerpts[cut:], "".join(excerpts[:cut])


def encode(text: str) -> np.ndarray:
  """Character ids, int32 `[len(text)]`."""
  ids = {c: i + 1 for i, c in enumerate(_ALPHABET)}
  return np.array([ids.get(c, 0) for c in text], np.int32)


def training_ids(excerpts: list[str], seed: int, n: int) -> np.ndarray:
  """`n` ids: the excerpts in an order drawn from `seed`, reshuffled for
  each further pass."""
  rng = np.random.default_rng(seed)
  parts, size = [], 0
  while size < n:
    for i in rng.permutation(len(excerpts)):
      parts.append(excerpts[i])
      size += len(excerpts[i])
  return encode("".join(parts)[:n])


def next_symbol(ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """`(inputs, targets)` predicting each id from those before it."""
  return ids[:-1], ids[1:]
