"""Per-step masks: Keras carry-forward masking, dynamic_rnn sequence lengths.

Two padding semantics meet here:

* Keras `Masking` (`mask`): where a row's mask is False the step is skipped:
  its states are carried forward unchanged and its output repeats the
  previous output (zeros before the first valid step), or is zero with
  `zero_output_for_mask=True`.
* `tf.nn.dynamic_rnn(sequence_length=...)`: outputs are zero at and after each
  row's length and the final states are those at the row's last valid step.
  This is the mask `t < length` with zero outputs, plus two things a mask
  cannot say: the loop stops after `max(sequence_length)` steps, and a
  reversed run reverses only each row's valid part (`tf.reverse_sequence`).

`resets` uses the same `[batch, time]` layout: True sets the row's state back
to its initial state right before that step.
"""

from typing import Any, NamedTuple

import numpy as np
import tensorflow as tf

from stepper import _checks


class StepMasks(NamedTuple):
  """Time-major per-step controls for the engine loop.

  Attributes:
    mask: bool `[time, batch]`, True where the step runs, or `None`.
    resets: bool `[time, batch]`, True where the state is reset, or `None`.
    lengths: int32 `[batch]` sequence lengths, or `None`.
    zero_output: Whether masked steps output zeros (else carry forward).
  """
  mask: tf.Tensor | None
  resets: tf.Tensor | None
  lengths: tf.Tensor | None
  zero_output: bool


def _bool_time_mask(value: Any, name: str, batch: int | None,
                    time: int | None, time_major: bool) -> tf.Tensor:
  """Validates a bool `[batch, time]` (or `[time, batch]`) tensor."""
  layout = "[time, batch]" if time_major else "[batch, time]"
  value = tf.convert_to_tensor(value)
  if value.dtype != tf.bool:
    raise TypeError(f"`{name}` must be a bool tensor {layout}; got dtype "
                    f"{value.dtype.name}.")
  if value.shape.rank != 2:
    raise ValueError(f"`{name}` must have rank 2 {layout}; got shape "
                     f"{_checks.shape_str(value.shape)}.")
  value = value if time_major else tf.transpose(value)
  expected = tf.TensorShape([time, batch])
  if not value.shape.is_compatible_with(expected):
    got = value.shape if time_major else tf.TensorShape(
        [value.shape[1], value.shape[0]])
    want = expected if time_major else tf.TensorShape([batch, time])
    raise ValueError(f"`{name}` has shape {_checks.shape_str(got)} but the "
                     f"inputs need {layout} = {_checks.shape_str(want)}.")
  return value


def _assert_shape(value: tf.Tensor, dims: list[int | tf.Tensor],
                  message: str) -> tf.Tensor:
  """`value`, checked at run time against `dims` unless all are static.

  The shape check runs before any use of the returned tensor (it is a no-op
  under XLA, like every run-time assertion).
  """
  if all(isinstance(d, int) for d in dims) and value.shape.is_fully_defined():
    return value  # The static checks already compared every dimension.
  check = tf.debugging.assert_equal(tf.shape(value), tf.stack(dims),
                                    message=message)
  with tf.control_dependencies([check]):
    return tf.identity(value)


def _lengths(sequence_length: Any, batch: int | None,
             time: int | tf.Tensor) -> tf.Tensor:
  """Validates `sequence_length`: int `[batch]`, `0 <= length <= time`."""
  lengths = tf.convert_to_tensor(sequence_length)
  if not lengths.dtype.is_integer:
    raise TypeError("`sequence_length` must be an integer tensor [batch]; "
                    f"got dtype {lengths.dtype.name}.")
  if lengths.shape.rank != 1:
    raise ValueError("`sequence_length` must have shape [batch]; got "
                     f"{_checks.shape_str(lengths.shape)}.")
  if not lengths.shape.is_compatible_with([batch]):
    raise ValueError(f"`sequence_length` has {lengths.shape[0]} entries but "
                     f"the inputs have batch size {batch}.")
  lengths = tf.cast(lengths, tf.int32)
  # Known values (eager, or constants in a graph) are checked at trace time.
  values = tf.get_static_value(lengths)
  if values is not None and isinstance(time, int):
    if np.any(values < 0) or np.any(values > time):
      raise ValueError(
          f"`sequence_length` must lie in [0, {time}] (the number of time "
          f"steps); got {values.tolist()}.")
  else:  # Checked before any use (e.g. tf.reverse_sequence) can fail first.
    checks = [
        tf.debugging.assert_non_negative(
            lengths, message="`sequence_length` must be non-negative."),
        tf.debugging.assert_less_equal(
            lengths, tf.cast(time, tf.int32),
            message="`sequence_length` must not exceed the number of time "
            "steps.")]
    with tf.control_dependencies(checks):
      lengths = tf.identity(lengths)
  return lengths


def prepare(*, mask: Any, sequence_length: Any, resets: Any,
            zero_output_for_mask: bool, batch: int | tf.Tensor,
            time: int | tf.Tensor, time_major: bool) -> StepMasks:
  """Validates the masking arguments and returns time-major controls.

  Args:
    mask: bool `[batch, time]` or `None`.
    sequence_length: int `[batch]` or `None`.
    resets: bool `[batch, time]` or `None`.
    zero_output_for_mask: Output zeros (not the previous output) where masked.
    batch: Batch size of the inputs (int if static).
    time: Number of time steps (int if static).
    time_major: Whether `mask`/`resets` are `[time, batch]`.

  Returns:
    A `StepMasks`.

  Raises:
    ValueError, TypeError: For bad shapes, dtypes or values, or both `mask`
      and `sequence_length`.
  """
  if mask is not None and sequence_length is not None:
    raise ValueError("Pass either `mask` or `sequence_length`, not both: "
                     "`sequence_length` is a shortcut for a mask with zero "
                     "outputs after each row's end.")
  static_time = time if isinstance(time, int) else None
  static_batch = batch if isinstance(batch, int) else None
  lengths = None
  if sequence_length is not None:
    lengths = _assert_shape(
        _lengths(sequence_length, static_batch, time), [batch],
        "`sequence_length` must have one entry per row of the inputs.")
    mask = tf.sequence_mask(lengths, time)  # [batch, time]
    mask = mask if not time_major else tf.transpose(mask)
    zero_output_for_mask = True
  layout = "[time, batch]" if time_major else "[batch, time]"
  if mask is not None:
    mask = _assert_shape(
        _bool_time_mask(mask, "mask", static_batch, static_time, time_major),
        [time, batch], f"`mask` must be {layout} like the inputs.")
  if resets is not None:
    resets = _assert_shape(
        _bool_time_mask(resets, "resets", static_batch, static_time,
                        time_major),
        [time, batch], f"`resets` must be {layout} like the inputs.")
  return StepMasks(mask, resets, lengths, bool(zero_output_for_mask))
