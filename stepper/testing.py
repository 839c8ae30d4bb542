"""Assertions and run modes for test suites of step models.

>>> stepper.testing.assert_nests_close(grads, control_grads, rtol=1e-5)

`MODES` is a list of `(name, mode)` pairs for
`absl.testing.parameterized.named_parameters`; `in_mode(fn, mode)` runs `fn`
eagerly, under `tf.function`, or under `tf.function(jit_compile=True)`.
"""

from typing import Any, Callable

import keras
import numpy as np
import tensorflow as tf

Nest = Any

EAGER = "eager"
FUNCTION = "function"
XLA = "xla"
MODES = ((EAGER, EAGER), (FUNCTION, FUNCTION), (XLA, XLA))


def in_mode(fn: Callable, mode: str) -> Callable:
  """Returns `fn` to run eagerly (`"eager"`), as a `tf.function`
  (`"function"`) or compiled with XLA (`"xla"`).

  Raises:
    ValueError: For an unknown mode.
  """
  if mode == EAGER:
    return fn
  if mode == FUNCTION:
    return tf.function(fn)
  if mode == XLA:
    return tf.function(fn, jit_compile=True)
  raise ValueError(f"`mode` must be one of {[m for m, _ in MODES]}; got "
                   f"{mode!r}.")


def default_tolerance(dtype: Any) -> float:
  """Relative tolerance for a dtype: float64 1e-10, else 1e-5."""
  return 1e-10 if tf.as_dtype(dtype) == tf.float64 else 1e-5


def _path_names(structure: Nest, name: str) -> list[str]:
  return [name + "".join(f"[{p!r}]" for p in path)
          for path, _ in keras.tree.flatten_with_path(structure)]


def assert_nests_close(actual: Nest, expected: Nest, *,
                       rtol: float | None = None, atol: float = 0.0,
                       name: str = "actual") -> None:
  """Asserts two nests have the same structure and all-close leaves.

  Every bad leaf is reported with its path and worst error, e.g.
  `grads[2]: max |err| 3e-03 > atol 0 + rtol 1e-05 * |expected|`.

  Args:
    actual: Nest of tensors/arrays (`None` leaves must match `None`).
    expected: Nest like `actual`: the independent reference.
    rtol: Relative tolerance; default by dtype (`default_tolerance`).
    atol: Absolute tolerance.
    name: Name of `actual` in messages.

  Raises:
    AssertionError: If structures differ or any leaf is not close.
  """
  try:
    tf.nest.assert_same_structure(actual, expected, check_types=False)
  except (ValueError, TypeError) as e:
    raise AssertionError(f"{name} is not nested like the reference: {e}")
  problems = []
  names = _path_names(actual, name)
  for path, a, e in zip(names, tf.nest.flatten(actual),
                        tf.nest.flatten(expected)):
    if a is None or e is None:
      if (a is None) != (e is None):
        problems.append(f"{path}: one side is None "
                        f"(actual {a is None}, expected {e is None})")
      continue
    a = np.asarray(a)
    e = np.asarray(e)
    if a.shape != e.shape:
      problems.append(f"{path}: shape {a.shape} != expected {e.shape}")
      continue
    tol = rtol if rtol is not None else default_tolerance(
        tf.as_dtype(a.dtype) if a.dtype.kind == "f" else tf.float32)
    a64, e64 = a.astype(np.float64), e.astype(np.float64)
    err = np.abs(a64 - e64)
    bound = atol + tol * np.abs(e64)
    if not np.all(err <= bound) or np.any(np.isnan(a64) != np.isnan(e64)):
      worst = int(np.argmax(err - bound)) if err.size else 0
      problems.append(
          f"{path}: max |err| {err.max():.3g} > atol {atol:g} + rtol "
          f"{tol:g} * |expected| (worst at flat index {worst}: actual "
          f"{a64.flat[worst]:.8g}, expected {e64.flat[worst]:.8g})")
  if problems:
    raise AssertionError(
        f"{len(problems)} leaf/leaves not close:\n  " + "\n  ".join(problems))
