"""Assertions and run modes for test suites of step models.

>>> grads = [tf.constant([1.0, 2.0]), {"b": tf.constant(3.0)}]
>>> control_grads = [np.array([1.0, 2.0]), {"b": np.array(3.0)}]
>>> stepper.testing.assert_nests_close(grads, control_grads, rtol=1e-5)

`MODES` is a list of `(name, mode)` pairs for
`absl.testing.parameterized.named_parameters`; `in_mode(fn, mode)` runs `fn`
eagerly, under `tf.function`, or under `tf.function(jit_compile=True)`.

`assert_gradients_close` and `GradientTestCase` turn `stepper.verify`
reports into test assertions for a new cell.
"""

from typing import Any, Callable

from absl.testing import parameterized
import numpy as np
import tensorflow as tf

from stepper import _checks
from stepper import verify

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


default_tolerance = verify.default_tolerance


def assert_nests_close(actual: Nest, expected: Nest, *,
                       rtol: float | None = None, atol: float = 0.0,
                       name: str = "actual", normwise: bool = False) -> None:
  """Asserts two nests have the same structure and all-close leaves.

  Every bad leaf is reported with its path and worst error, e.g.
  `grads[2]: max |err| 3e-03 > atol 0 + rtol 1e-05 * |expected|`.

  `normwise=True` bounds each leaf's error by `rtol * max|expected leaf|`
  (the normwise relative error in the max norm) instead of by each entry's
  own size. Use it where two float32 programs sum the same terms in another
  order (XLA fusion, a hoisted matmul, a remat segment): each entry's
  rounding error is then a few ulps of the terms it sums, which are about
  as large as the leaf's largest entries even where cancellation made the
  entry itself small, so an elementwise bound with a fixed absolute floor
  holds on one CPU and fails on the next.

  >>> stepper.testing.assert_nests_close(
  ...     [np.float32([1.0, 1e-6])], [np.float32([1.0, 2e-6])],
  ...     rtol=1e-5, normwise=True)  # 1e-6 <= 1e-5 * max(1.0, 2e-6).

  Args:
    actual: Nest of tensors/arrays (`None` leaves must match `None`).
    expected: Nest like `actual`: the independent reference.
    rtol: Relative tolerance; default by dtype (`default_tolerance`).
    atol: Absolute tolerance.
    name: Name of `actual` in messages.
    normwise: Relative to each leaf's largest `|expected|` entry instead of
      to each entry.

  Raises:
    AssertionError: If structures differ or any leaf is not close.
    TypeError: If `normwise` is not a bool.
  """
  normwise = _checks.check_bool(normwise, "normwise")
  try:
    tf.nest.assert_same_structure(actual, expected, check_types=False)
  except (ValueError, TypeError) as e:
    raise AssertionError(f"{name} is not nested like the reference: {e}")
  problems = []
  names = _checks.leaf_paths(actual, name)
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
    scale = np.abs(e64)
    if normwise and scale.size:
      scale = np.full_like(scale, np.nanmax(scale))
    bound = atol + tol * scale
    if not np.all(err <= bound) or np.any(np.isnan(a64) != np.isnan(e64)):
      worst = int(np.argmax(err - bound)) if err.size else 0
      problems.append(
          f"{path}: max |err| {err.max():.3g} > atol {atol:g} + rtol "
          f"{tol:g} * {'max ' if normwise else ''}|expected| (worst at flat "
          f"index {worst}: actual {a64.flat[worst]:.8g}, expected "
          f"{e64.flat[worst]:.8g})")
  if problems:
    raise AssertionError(
        f"{len(problems)} leaf/leaves not close:\n  " + "\n  ".join(problems))


def assert_gradients_close(step: Any, control: Callable | None, inputs: Nest,
                           **kwargs: Any) -> verify.GradientReport:
  """Asserts a step's outputs, loss and gradients match a reference.

  >>> x = tf.random.normal([2, 6, 3])
  >>> report = stepper.testing.assert_gradients_close(
  ...     keras.layers.GRUCell(4), keras.layers.GRU(4, return_sequences=True),
  ...     x)
  >>> report.ok
  True

  Args:
    step: The step under test (anything `stepper.model_rnn` runs).
    control: A full-sequence Keras layer/model (`stepper.verify.compare`),
      or `None` to check against float64 finite differences
      (`stepper.verify.numerical`; build the step in float64).
    inputs: Floating tensor or nest, each leaf `[batch, time, ...]`.
    **kwargs: Passed to `compare` (e.g. `initial_states`, `mask`, `rtol`,
      `weight_map`) or to `numerical` (e.g. `epsilon`, `max_coordinates`).

  Returns:
    The passing `GradientReport`.

  Raises:
    AssertionError: Listing every failing row, with the report's table.
  """
  if control is None:
    report = verify.numerical(step, inputs, **kwargs)
  else:
    report = verify.compare(step, control, inputs, **kwargs)
  report.assert_ok()
  return report


class GradientTestCase(tf.test.TestCase, parameterized.TestCase):
  """A test case for the gradients of a new step; works with
  `parameterized.named_parameters`.

  >>> from absl.testing import parameterized
  >>> class MyCellTest(stepper.testing.GradientTestCase):
  ...   @parameterized.named_parameters(("f32", "float32"), ("f64", "float64"))
  ...   def test_gradients_match_keras_gru(self, dtype):
  ...     x = self.random_inputs([3, 7, 5], dtype)
  ...     self.assertGradientsClose(
  ...         keras.layers.GRUCell(4, dtype=dtype),
  ...         keras.layers.GRU(4, return_sequences=True, dtype=dtype), x)
  >>> MyCellTest("test_gradients_match_keras_gru_f64").run().wasSuccessful()
  True
  """

  def random_inputs(self, shape: list[int], dtype: Any = "float32",
                    seed: int = 0) -> tf.Tensor:
    """Standard-normal inputs `[batch, time, ...]`, reproducible by `seed`."""
    values = np.random.default_rng(seed).standard_normal(shape)
    return tf.constant(values, dtype=tf.as_dtype(dtype))

  def assertGradientsClose(self, step: Any, control: Callable, inputs: Nest,
                           **kwargs: Any) -> verify.GradientReport:
    """`assert_gradients_close` against a control model."""
    return assert_gradients_close(step, control, inputs, **kwargs)

  def assertGradientsMatchNumerical(self, step: Any, inputs: Nest,
                                    **kwargs: Any) -> verify.GradientReport:
    """`assert_gradients_close` against float64 finite differences."""
    return assert_gradients_close(step, None, inputs, **kwargs)
