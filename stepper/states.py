"""`TrainableState`: a learned initial state, broadcast over the batch."""

from typing import Any

import keras
import numpy as np
import tensorflow as tf

from stepper import _checks
from stepper import steps as steps_lib

Nest = Any


class TrainableState(keras.layers.Layer):
  """A learned initial state for a step, shared by every row of a batch.

  Keras has no learned initial state; Sonnet 2 has `snt.TrainableState`.
  One trainable variable per state leaf, shaped like the state without its
  batch dimension and initialised to the step's default (zero) state.

  >>> cell = keras.layers.LSTMCell(8)
  >>> init = stepper.TrainableState(cell)
  >>> x = tf.random.normal([4, 10, 3])
  >>> outputs, states = stepper.model_rnn(cell, x, initial_states=init(x))

  Gradients reach the variables through `model_rnn`.
  """

  def __init__(self, step: Any, initializer: Any = "zeros", **kwargs):
    """Creates the variables.

    Args:
      step: A step whose states are declared (a Keras step model or cell).
      initializer: Keras initializer for every state variable.
      **kwargs: Passed to `keras.layers.Layer`.

    Raises:
      ValueError: If the step's states are not declared (a plain callable) or
        have unknown non-batch dimensions.
    """
    super().__init__(**kwargs)
    adapted = steps_lib.as_step(step)
    if adapted.state_specs is None:
      raise ValueError(f"TrainableState needs a step that declares its "
                       f"states; {adapted.name} does not.")
    self._structure = adapted.state_specs
    self._values = []
    for i, spec in enumerate(tf.nest.flatten(adapted.state_specs)):
      if not spec.shape[1:].is_fully_defined():
        raise ValueError(f"State {i} of {adapted.name} has shape "
                         f"{spec.shape}; its non-batch dimensions must be "
                         "known to learn it.")
      self._values.append(self.add_weight(
          shape=spec.shape[1:], dtype=spec.dtype, initializer=initializer,
          name=f"initial_state_{i}"))

  def __call__(self, inputs: Any, *args, **kwargs) -> Nest:
    # Keras takes only tensors as the first positional argument; a batch
    # size given as a Python int goes straight to `initial_state`.
    if isinstance(inputs, (int, np.integer)):
      return self.initial_state(inputs)
    return super().__call__(inputs, *args, **kwargs)

  def call(self, inputs: Any) -> Nest:
    """Returns the states broadcast to the batch of `inputs`.

    Args:
      inputs: A batch size (an int or a scalar integer tensor), or a
        tensor/nest whose leaves are `[batch, ...]` (e.g. the sequence about
        to be run).

    Returns:
      A nest like the step's states, each leaf `[batch, ...]`.
    """
    flat = tf.nest.flatten(inputs)
    if len(flat) == 1 and (not tf.is_tensor(flat[0]) or
                           flat[0].shape.rank == 0):
      return self.initial_state(flat[0])
    return self._broadcast(tf.shape(flat[0])[0])

  def initial_state(self, batch_size: int | tf.Tensor) -> Nest:
    """The states for `batch_size` rows.

    Args:
      batch_size: A non-negative int or a scalar integer tensor.

    Returns:
      A nest like the step's states, each leaf `[batch_size, ...]`.

    Raises:
      TypeError: If `batch_size` is not an int or integer tensor.
      ValueError: If it is negative or not a scalar
        (`tf.errors.InvalidArgumentError` at run time for a negative tensor).
    """
    return self._broadcast(_checks.check_batch_size(batch_size))

  def _broadcast(self, batch: int | tf.Tensor) -> Nest:
    flat = [tf.broadcast_to(v, tf.concat([[batch], tf.shape(v)], 0))
            for v in self._values]
    return tf.nest.pack_sequence_as(self._structure, flat)
