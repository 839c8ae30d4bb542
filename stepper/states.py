"""`TrainableState`: a learned initial state, broadcast over the batch."""

from typing import Any

import keras
import tensorflow as tf

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

  def call(self, inputs: Any) -> Nest:
    """Returns the states broadcast to the batch of `inputs`.

    Args:
      inputs: An int batch size, or a tensor/nest whose leaves are
        `[batch, ...]` (e.g. the sequence about to be run).

    Returns:
      A nest like the step's states, each leaf `[batch, ...]`.
    """
    if isinstance(inputs, int):
      batch = inputs
    else:
      batch = tf.shape(tf.nest.flatten(inputs)[0])[0]
    flat = [tf.broadcast_to(v, tf.concat([[batch], tf.shape(v)], 0))
            for v in self._values]
    return tf.nest.pack_sequence_as(self._structure, flat)

  def initial_state(self, batch_size: int | tf.Tensor) -> Nest:
    """The states for `batch_size` rows."""
    return self.call(batch_size)
