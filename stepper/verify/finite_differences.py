"""`numerical`: the engine's analytic gradients against float64 finite
differences (`tf.test.compute_gradient`); no control model needed.
"""

from typing import Any, Callable

import numpy as np
import tensorflow as tf

from stepper import _checks
from stepper import engine
from stepper import steps as steps_lib
from stepper.verify import _common
from stepper.verify import report

Nest = Any

# Finite differences cannot reach the float64 analytic tolerance: the central
# difference error is ~eps_64 * |loss| / epsilon + epsilon**2 * |f'''|, about
# 1e-10 for epsilon = 1e-6, so the comparison allows 1e-6 (normwise).
_NUMERICAL_RTOL = 1e-6


def _sample(size: int, max_coordinates: int,
            rng: np.random.Generator) -> np.ndarray:
  if size <= max_coordinates:
    return np.arange(size)
  return np.sort(rng.choice(size, max_coordinates, replace=False))


def _finite_differences(f: Callable[[np.ndarray], tf.Tensor],
                        base: np.ndarray, coords: np.ndarray,
                        epsilon: float) -> np.ndarray:
  """Central differences of scalar `f(full)` at the `coords` of `base`."""
  flat = base.ravel()

  def partial(sub):
    full = tf.tensor_scatter_nd_update(
        tf.constant(flat), coords[:, None], sub)
    return f(tf.reshape(full, base.shape))

  _, numeric = tf.test.compute_gradient(partial, [flat[coords]],
                                        delta=epsilon)
  return numeric[0].ravel()


def numerical(step: Any, inputs: Nest, *, initial_states: Nest | None = None,
              loss: Callable[[Nest], tf.Tensor] | None = None,
              epsilon: float = 1e-6, max_coordinates: int = 24,
              seed: int = 0, rtol: float | None = None,
              atol: float = 0.0) -> report.GradientReport:
  """Checks the engine's analytic gradients against float64 finite
  differences.

  For every trainable variable of the step, every input leaf and every
  initial state leaf, central differences (`tf.test.compute_gradient`) of
  the loss are compared with the gradient a `tf.GradientTape` gets through
  `stepper.model_rnn`. Cost control: at most `max_coordinates` coordinates
  per tensor, sampled with `seed` (two engine runs each).

  >>> cell = keras.layers.LSTMCell(2, dtype="float64")
  >>> x = tf.random.normal([2, 4, 3], dtype=tf.float64)
  >>> stepper.verify.numerical(cell, x, max_coordinates=8).assert_ok()

  Args:
    step: A step built (or buildable) in float64, e.g. a Keras cell created
      with `dtype="float64"`.
    inputs: Floating tensor or nest, each leaf `[batch, time, ...]`; cast to
      float64.
    initial_states: Nest like the step's states (required for a callable);
      cast to float64. Their gradients are checked too.
    loss: Maps the outputs to a scalar. Default: mean squared output.
    epsilon: Finite-difference step.
    max_coordinates: Most coordinates checked per tensor.
    seed: Seed of the coordinate sampling.
    rtol: Relative (normwise) tolerance; default 1e-6 (finite differences
      are accurate to ~1e-10 relative, not to float64's 1e-16).
    atol: Absolute tolerance.

  Returns:
    A `GradientReport` whose "actual" side is the analytic gradient.

  Raises:
    TypeError: For non-floating inputs or states.
    ValueError: If the step has a variable that is not float64,
      `max_coordinates` is not a positive integer, `epsilon` is not a
      positive finite number, or `rtol`/`atol` are negative or not finite
      (every row would fail).
  """
  _checks.check_positive_int(max_coordinates, "max_coordinates")
  _checks.check_number(epsilon, "epsilon", positive=True)
  if rtol is not None:
    _checks.check_number(rtol, "rtol", positive=False)
  _checks.check_number(atol, "atol", positive=False)
  inputs = _common.float_inputs(inputs, "inputs", tf.float64)
  states = (None if initial_states is None else
            _common.float_inputs(initial_states, "initial_states", tf.float64))
  adapted = steps_lib.as_step(step)
  loss = loss or _common.mean_square
  run = tf.function(lambda x, s: loss(engine.model_rnn(adapted, x, s)[0]))
  run(inputs, states)  # Builds the step's variables.
  variables = adapted.trainable_variables
  _common.check_variable_dtypes(variables, "step", tf.float64)
  watched = [inputs] + ([] if states is None else [states])
  _, _, d_watched, d_vars = _common.gradients(
      lambda: engine.model_rnn(adapted, inputs, states)[0], loss, watched,
      variables)
  rtol = _NUMERICAL_RTOL if rtol is None else rtol
  rng = np.random.default_rng(seed)
  rows = []
  for v, grad in zip(variables, d_vars):
    rows.append(_numerical_row(
        f"grad {_common.var_name(v)}", v.numpy(), grad,
        lambda value, v=v: _run_with_variable(run, v, value, inputs, states),
        epsilon, max_coordinates, rng, rtol, atol))
  for i, (name, value, grad) in enumerate(zip(
      _common.input_names(inputs, states), tf.nest.flatten(watched),
      tf.nest.flatten(d_watched))):
    rows.append(_numerical_row(
        name, value.numpy(), grad,
        lambda new, i=i: _run_with_leaf(run, watched, i, new),
        epsilon, max_coordinates, rng, rtol, atol))
  return report.GradientReport(
      f"numerical {adapted.name} vs float64 finite differences "
      f"(epsilon {epsilon:g})", rows)


def _numerical_row(name, value, grad, f, epsilon, max_coordinates, rng,
                   rtol, atol) -> report.Row:
  coords = _sample(value.size, max_coordinates, rng)
  numeric = _finite_differences(f, value, coords, epsilon)
  analytic = None if grad is None else np.asarray(grad).ravel()[coords]
  note = (f"{coords.size} of {value.size} coords"
          if coords.size < value.size else "")
  return report.compare_values(name, "gradient", analytic, numeric, rtol, atol,
                         note)


def _run_with_variable(run, variable, value, inputs, states) -> tf.Tensor:
  original = variable.numpy()
  variable.assign(value)
  try:
    return run(inputs, states)
  finally:
    variable.assign(original)


def _run_with_leaf(run, watched, index, value) -> tf.Tensor:
  flat = tf.nest.flatten(watched)
  flat[index] = value
  x, *s = tf.nest.pack_sequence_as(watched, flat)
  return run(x, s[0] if s else None)
