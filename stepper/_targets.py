"""How `stepper.Trainer` reads its targets against the step's predictions.

A private module with public names: whether targets are per step or
sequence-level (`per_step`, `layout`) and the per-example loss the trainer
averages (`per_example_loss`).
"""

from typing import Any, Callable

import keras
import tensorflow as tf

from stepper import _checks
from stepper import steps as steps_lib

Nest = Any


def inputs_error(name: str, inputs: Nest, model: Any,
                 error: Exception) -> ValueError:
  """The error for a dataset whose inputs the step (with its head) cannot
  take, naming the dataset argument and the inputs' shapes."""
  shapes = tf.nest.map_structure(lambda s: _checks.shape_str(s.shape), inputs)
  return ValueError(
      f"`{name}` inputs have shape {shapes}, but {model.name} fails on one "
      f"step of them ([batch] + their shape after [batch, time]): {error}")


def per_step(model: steps_lib.Step, inputs: Nest, targets: Any,
             allow_sequence_level: bool, name: str = "dataset") -> bool:
  """Whether `targets` are per step (else sequence-level).

  Args:
    model: The step with its head, as the trainer runs it.
    inputs: Tensors or `tf.TensorSpec`s, each leaf `[batch, time, ...]`.
    targets: A tensor or `tf.TensorSpec`.
    allow_sequence_level: Whether sequence-level targets are allowed (not
      with truncated BPTT or in stream mode).
    name: The dataset's argument name, for messages.

  Returns:
    True for per-step targets, False for sequence-level ones.

  Raises:
    ValueError: If the step fails on the inputs, the predictions are
      nested or `targets` fit neither layout.
  """
  flat = tf.nest.flatten(inputs)
  batch, time = flat[0].shape[0], flat[0].shape[1]
  x_spec = tf.nest.map_structure(
      lambda x: tf.TensorSpec([batch] + x.shape[2:].as_list(), x.dtype),
      inputs)
  state_spec = tf.nest.map_structure(
      lambda s: tf.TensorSpec(s.shape, s.dtype),
      model.initial_state(1 if batch is None else batch))
  try:
    y_spec, _ = model.output_spec(x_spec, state_spec, True)
  except (ValueError, TypeError, tf.errors.InvalidArgumentError) as e:
    raise inputs_error(name, inputs, model, e) from e
  if not isinstance(y_spec, tf.TensorSpec):
    raise ValueError(
        f"The predictions are nested ({y_spec}); a Trainer needs one "
        "tensor per step. Add a head that returns one tensor.")
  return layout(targets, y_spec.shape, time,
                allow_sequence_level=allow_sequence_level)


def layout(targets: tf.Tensor, y_shape: tf.TensorShape,
           time: int | None, allow_sequence_level: bool) -> bool:
  """True for per-step targets, False for sequence-level ones."""
  y_shape = tf.TensorShape(y_shape)
  per_step_shape = tf.TensorShape([y_shape[0], time]).concatenate(y_shape[1:])
  sparse = not targets.dtype.is_floating
  layouts = [(True, per_step_shape[:-1] if sparse else per_step_shape)]
  if allow_sequence_level:
    layouts.insert(0, (False, y_shape[:-1] if sparse else y_shape))
  if not sparse:  # A float target may still be a sparse label.
    layouts.append((True, per_step_shape[:-1]))
    if allow_sequence_level:
      layouts.append((False, y_shape[:-1]))
  for is_per_step, shape in layouts:
    if targets.shape.is_compatible_with(shape):
      return is_per_step
  expected = f"per-step targets {_checks.shape_str(per_step_shape)}"
  if allow_sequence_level:
    expected += (f" or sequence-level targets {_checks.shape_str(y_shape)}"
                 " (the last step's prediction)")
  else:
    expected += (" (truncated BPTT needs a target at every step; so does "
                 "stream mode)")
  raise ValueError(
      f"targets have shape {_checks.shape_str(targets.shape)}, which matches "
      f"no prediction: expected {expected}; for sparse labels drop the last "
      f"dimension. The step (with the head) predicts "
      f"{_checks.shape_str(y_shape)} per step.")


def per_example_loss(loss: Any) -> Callable:
  """A callable `(y_true, y_pred) -> per-example loss` (not reduced)."""
  if isinstance(loss, str):
    loss = _checks.check_loss(loss)  # A Keras loss, by name.
  if isinstance(loss, keras.losses.Loss):
    return loss.call  # Unreduced; the trainer takes the mean itself.
  if not callable(loss):
    raise TypeError("`loss` must be a Keras loss or a callable (y_true, "
                    f"y_pred) -> per-example loss; got {type(loss).__name__}.")
  return loss
