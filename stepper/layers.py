"""`StepRNN`: the engine as a Keras layer, for `Sequential`/functional models.

Keras attaches masks (`keras.layers.Masking`, `Embedding(mask_zero=True)`)
to the tensors flowing between layers; `StepRNN` receives that mask in `call`
and hands it to `stepper.model_rnn`, so masked steps are skipped exactly as
in `keras.layers.RNN`.
"""

from typing import Any

import keras
import tensorflow as tf

from stepper import engine
from stepper import steps as steps_lib

Nest = Any


@keras.saving.register_keras_serializable(package="stepper")
class StepRNN(keras.layers.Layer):
  """Runs a one-step model over the time axis, like `keras.layers.RNN`.

  >>> model = keras.Sequential([
  ...     keras.Input((None, 3)),
  ...     keras.layers.Masking(0.),
  ...     stepper.StepRNN(keras.layers.GRUCell(8)),
  ... ])
  >>> model(tf.random.normal([4, 20, 3])).shape
  TensorShape([4, 20, 8])

  Args:
    step: A Keras RNN cell, a functional step model with inputs
      `[x_t, *states]` and outputs `[y_t, *new_states]`, or a callable
      `(x_t, states) -> (y_t, new_states)` (a callable needs
      `initial_state` at call time and cannot be serialized).
    return_sequences: Return every output, `[batch, time, ...]`, or only the
      last valid one, `[batch, ...]` (unlike `keras.layers.RNN`, which with
      `zero_output_for_mask=True` returns zeros when the last step is
      masked).
    return_state: Also return the final states: the layer returns
      `[outputs, *final_states]`.
    go_backwards: Run from the last step to the first and, as
      `keras.layers.RNN(go_backwards=True)` does, return the sequence in
      reversed time order.
    zero_output_for_mask: Output zeros (not the previous output) at masked
      steps.
    unroll: Steps per loop iteration (see `stepper.model_rnn`).
    **kwargs: `keras.layers.Layer` arguments (`name`, `dtype`, ...). The
      dtype defaults to the step's dtype policy when the step is a layer.

  Call arguments:
    inputs: `[batch, time, ...]`, or a nest of such tensors.
    mask: bool `[batch, time]`, usually set by Keras from an upstream layer.
    initial_state: States nested like the step's states, each `[batch, ...]`.
    training: Passed to the step.
  """

  def __init__(self, step: Any, return_sequences: bool = True,
               return_state: bool = False, go_backwards: bool = False,
               zero_output_for_mask: bool = False, unroll: int = 1,
               **kwargs):
    if isinstance(step, keras.layers.Layer) and "dtype" not in kwargs:
      kwargs["dtype"] = step.dtype_policy
    super().__init__(**kwargs)
    self.step = step
    self.return_sequences = return_sequences
    self.return_state = return_state
    self.go_backwards = go_backwards
    self.zero_output_for_mask = zero_output_for_mask
    self.unroll = unroll
    self.supports_masking = True
    self._num_states = None  # Learned at call time for a plain callable.

  def build(self, input_shape):
    # A cell builds from one step's shape: the input's without time.
    if hasattr(self.step, "state_size") and not self.step.built:
      self.step.build((input_shape[0],) + tuple(input_shape[2:]))

  def call(self, inputs: Nest, mask: Any = None,
           initial_state: Nest | None = None,
           training: bool | None = None) -> Nest:
    outputs, states = engine.model_rnn(
        self.step, inputs, initial_state, mask=_first_mask(mask),
        reverse=self.go_backwards, return_sequences=self.return_sequences,
        zero_output_for_mask=self.zero_output_for_mask, unroll=self.unroll,
        training=training)
    if self.go_backwards and self.return_sequences:
      outputs = tf.nest.map_structure(lambda y: tf.reverse(y, [1]), outputs)
    if not self.return_state:
      return outputs
    states = tf.nest.flatten(states)
    self._num_states = len(states)
    return [outputs, *states]

  def compute_mask(self, inputs: Nest, mask: Any = None) -> Any:
    """The input mask for returned sequences (reversed with `go_backwards`,
    like the outputs), else None; None for every returned state."""
    mask = _first_mask(mask)
    if mask is None or not self.return_sequences:
      output_mask = None
    else:
      output_mask = keras.ops.flip(mask, 1) if self.go_backwards else mask
    if not self.return_state:
      return output_mask
    return [output_mask] + [None] * self._state_count()

  def _state_count(self) -> int:
    specs = steps_lib.as_step(self.step).state_specs
    if specs is not None:
      return len(tf.nest.flatten(specs))
    if self._num_states is None:
      raise ValueError(
          f"{self.name} cannot tell how many states its step "
          f"{self.step!r} has before it is called: a plain callable does "
          "not declare its states.")
    return self._num_states

  def get_config(self) -> dict:
    """The layer's config, with the step serialized by Keras.

    Raises:
      TypeError: If the step is not a Keras layer (a plain callable cannot
        be serialized).
    """
    if not isinstance(self.step, keras.layers.Layer):
      raise TypeError(
          f"{self.name} cannot be serialized: its step is a "
          f"{type(self.step).__name__}, but only a Keras layer (an RNN cell "
          "or a functional step model) can be serialized. Wrap the callable "
          "in a keras.layers.Layer with get_config to save the model.")
    config = super().get_config()
    config.update(
        step=keras.saving.serialize_keras_object(self.step),
        return_sequences=self.return_sequences,
        return_state=self.return_state, go_backwards=self.go_backwards,
        zero_output_for_mask=self.zero_output_for_mask, unroll=self.unroll)
    return config

  @classmethod
  def from_config(cls, config: dict) -> "StepRNN":
    config = dict(config)
    config["step"] = keras.saving.deserialize_keras_object(config["step"])
    return cls(**config)


def _first_mask(mask: Any) -> tf.Tensor | None:
  """Keras gives one mask per input leaf; every leaf shares the time steps."""
  if mask is None:
    return None
  flat = [m for m in tf.nest.flatten(mask) if m is not None]
  return flat[0] if flat else None
