"""Two step models, one run forward and one backward.

`bidirectional` (a function) and `Bidirectional` (a Keras layer over two
`StepRNN`s) have the semantics of `keras.layers.Bidirectional`: the backward
run starts at the last step (with `sequence_length`, at each row's real last
step), its outputs are returned in the input's time order, and the two
directions' outputs are merged by `merge_mode`.
"""

from typing import Any, Callable

import keras
import tensorflow as tf

from stepper import _checks
from stepper import _loop
from stepper import engine
from stepper import layers

Nest = Any

_MERGES: dict[str | None, Callable[[tf.Tensor, tf.Tensor], tf.Tensor] | None]
_MERGES = {
    "concat": lambda f, b: tf.concat([f, b], axis=-1),
    "sum": tf.add,
    "mul": tf.multiply,
    "ave": lambda f, b: (f + b) / 2,
    None: None,
}


@_loop.unconverted
def bidirectional(
    forward_step: Any,
    backward_step: Any,
    inputs: Nest,
    initial_states: tuple[Nest, Nest] | None = None,
    *,
    sequence_length: tf.Tensor | None = None,
    mask: tf.Tensor | None = None,
    merge_mode: str | None = "concat",
    return_sequences: bool = True,
    time_major: bool = False,
    training: bool | tf.Tensor | None = None,
) -> tuple[Nest, tuple[Nest, Nest]]:
  """Runs `forward_step` forward and `backward_step` backward over `inputs`.

  >>> x = tf.random.normal([4, 20, 3])
  >>> outputs, (fw_states, bw_states) = stepper.bidirectional(
  ...     keras.layers.GRUCell(8), keras.layers.GRUCell(8), x,
  ...     sequence_length=[20, 7, 3, 0])
  >>> outputs.shape
  TensorShape([4, 20, 16])

  Args:
    forward_step: A step (see `stepper.model_rnn`) run from the first step.
    backward_step: A step run from the last (valid) step to the first.
    inputs: Tensor or nest, each leaf `[batch, time, ...]` (`[time, batch,
      ...]` with `time_major=True`).
    initial_states: `(forward_states, backward_states)`, each nested like its
      step's states, each leaf `[batch, ...]`; or `None` for the steps'
      defaults.
    sequence_length: int `[batch]`: `tf.nn.dynamic_rnn` semantics; the
      backward run reverses only each row's valid part and outputs are zero
      from each row's length on. Exclusive with `mask`.
    mask: bool `[batch, time]` (`[time, batch]` with `time_major`): Keras
      masking. As in `keras.layers.Bidirectional`, masked steps output zeros
      when returning sequences, and carry states forward.
    merge_mode: How the directions' outputs combine, leaf by leaf: `'concat'`
      (on the last axis), `'sum'`, `'mul'`, `'ave'`, or `None` for the pair
      `[forward_outputs, backward_outputs]`.
    return_sequences: If False, each direction returns only its last
      (valid) output, `[batch, ...]`: for the backward run that is the
      output at the first step.
    time_major: Whether `inputs`, `mask` and the returned sequences are
      `[time, batch, ...]`.
    training: Passed to both steps at every call.

  Returns:
    `(outputs, (forward_final_states, backward_final_states))`: `outputs` is
    the merged output, nested like `y_t`, each leaf `[batch, time, ...]` (or
    `[batch, ...]` without `return_sequences`); with `merge_mode=None` it is
    `[forward_outputs, backward_outputs]`. Keras' `return_state=True` list is
    `[outputs, *forward_final_states, *backward_final_states]`.

  Raises:
    ValueError: For an unknown `merge_mode`, `initial_states` that are not a
      pair, outputs of different shapes for `'sum'`, `'mul'` or `'ave'`, or
      any error of `stepper.model_rnn`.
    TypeError: If the directions' outputs differ in dtype (`merge_mode` not
      `None`).
  """
  if merge_mode not in _MERGES:
    raise ValueError(
        f"`merge_mode` must be one of {list(_MERGES)}; got {merge_mode!r}.")
  if initial_states is None:
    initial_states = (None, None)
  elif not isinstance(initial_states, (list, tuple)) or len(
      initial_states) != 2:
    got = (f"a {type(initial_states).__name__} of length "
           f"{len(initial_states)}" if isinstance(initial_states, (list, tuple))
           else f"a {type(initial_states).__name__}")
    raise ValueError("`initial_states` must be None or a pair "
                     f"(forward_states, backward_states); got {got}.")
  # Keras' Bidirectional forces `zero_output_for_mask=return_sequences`.
  kwargs = dict(sequence_length=sequence_length, mask=mask,
                zero_output_for_mask=return_sequences,
                return_sequences=return_sequences, time_major=time_major,
                training=training)
  forward, forward_states = engine.model_rnn(
      forward_step, inputs, initial_states[0], **kwargs)
  backward, backward_states = engine.model_rnn(
      backward_step, inputs, initial_states[1], reverse=True, **kwargs)
  merge = _MERGES[merge_mode]
  if merge is None:
    outputs = [forward, backward]
  else:
    tf.nest.map_structure(lambda f, b: _check_mergeable(merge_mode, f, b),
                          forward, backward)
    outputs = tf.nest.map_structure(merge, forward, backward)
  return outputs, (forward_states, backward_states)


def _check_mergeable(merge_mode: str, forward: tf.Tensor,
                     backward: tf.Tensor) -> None:
  """The two directions' outputs must agree in dtype, and in shape (all
  but the last axis for `'concat'`)."""
  got = (f"forward outputs {_checks.shape_str(forward.shape)} "
         f"{forward.dtype.name}, backward outputs "
         f"{_checks.shape_str(backward.shape)} {backward.dtype.name}")
  if forward.dtype != backward.dtype:
    raise TypeError(f"`merge_mode`={merge_mode!r} needs both directions' "
                    f"outputs in one dtype; got {got}. Build both steps in "
                    "the same dtype.")
  f_shape, b_shape = forward.shape, backward.shape
  alike = "shaped alike"
  if merge_mode == "concat":
    f_shape, b_shape = f_shape[:-1], b_shape[:-1]
    alike += " but for the last axis"
  if not f_shape.is_compatible_with(b_shape):
    raise ValueError(f"`merge_mode`={merge_mode!r} needs both directions' "
                     f"outputs {alike}; got {got}. Use steps of the same "
                     "width, `merge_mode='concat'` or `None`.")


@keras.saving.register_keras_serializable(package="stepper")
class Bidirectional(keras.layers.Bidirectional):
  """`keras.layers.Bidirectional` over `stepper.StepRNN` layers.

  >>> layer = stepper.Bidirectional(
  ...     stepper.StepRNN(keras.layers.LSTMCell(8)), merge_mode="sum")
  >>> layer(tf.random.normal([4, 20, 3])).shape
  TensorShape([4, 20, 8])

  Keras' own wrapper, constructor and behaviour: the backward layer is a
  copy of `layer` with `go_backwards=True` (or `backward_layer`), masks
  reach both directions, `zero_output_for_mask` follows `return_sequences`,
  `return_state=True` returns `[outputs, *forward_states,
  *backward_states]`, an `initial_state` list is split in halves (forward
  first), and the layer serializes.

  Args:
    layer: The forward `stepper.StepRNN`; it is copied through its config.
    merge_mode: `"concat"`, `"sum"`, `"mul"`, `"ave"` or `None` (a list of
      both directions' outputs).
    weights: Initial weights, forward then backward (as Keras').
    backward_layer: Optional `stepper.StepRNN` for the backward direction
      (with `go_backwards=True`); it must agree with `layer` on
      `return_sequences`, `return_state` and `stateful`.
    **kwargs: `keras.layers.Layer` arguments.

  Raises:
    TypeError: If `layer` or `backward_layer` is not a `stepper.StepRNN`.
    ValueError: For an unknown `merge_mode`, or layers that run in the same
      direction or disagree on `return_sequences`, `return_state` or
      `stateful` (Keras' checks, which name the attribute).
  """

  def __init__(self, layer: layers.StepRNN, merge_mode: str | None = "concat",
               weights: list | None = None,
               backward_layer: layers.StepRNN | None = None, **kwargs):
    for name, value in (("layer", layer), ("backward_layer", backward_layer)):
      if value is not None and not isinstance(value, layers.StepRNN):
        raise TypeError(
            f"`{name}` must be a stepper.StepRNN; got "
            f"{type(value).__name__}. For keras.layers.RNN layers, use "
            "keras.layers.Bidirectional.")
    super().__init__(layer, merge_mode=merge_mode, weights=weights,
                     backward_layer=backward_layer, **kwargs)
