"""`model_rnn`: a one-step model driven over a sequence in one `tf.while_loop`.

Every step's output is written into a `tf.TensorArray` inside a single
`tf.while_loop`, so a `tf.GradientTape` around the call gets exact
backpropagation through time to the step's weights, the inputs and the
initial states.
"""

from typing import Any

import tensorflow as tf

from stepper import _checks
from stepper import _fastpath
from stepper import _inputs
from stepper import _loop
from stepper import masking
from stepper import remat as remat_lib
from stepper import steps as steps_lib

Nest = Any


@_loop.unconverted
def model_rnn(
    step: Any,
    inputs: Nest,
    initial_states: Nest | None = None,
    *,
    time_major: bool = False,
    reverse: bool = False,
    return_sequences: bool = True,
    return_all_states: bool = False,
    unroll: int = 1,
    parallel_iterations: int | None = None,
    swap_memory: bool = False,
    training: bool | tf.Tensor | None = None,
    mask: tf.Tensor | None = None,
    sequence_length: tf.Tensor | None = None,
    zero_output_for_mask: bool = False,
    resets: tf.Tensor | None = None,
    remat: int | str | None = None,
    hoist: bool = False,
    _reset_to: Nest | None = None,
) -> tuple[Nest, Nest] | tuple[Nest, Nest, Nest]:
  """Runs a one-step model over every time step of `inputs`.

  >>> cell = keras.layers.GRUCell(8)
  >>> x = tf.random.normal([4, 20, 3])
  >>> outputs, final_states = stepper.model_rnn(cell, x)
  >>> outputs.shape, final_states[0].shape
  (TensorShape([4, 20, 8]), TensorShape([4, 8]))

  Args:
    step: Maps `(x_t, states)` to `(y_t, new_states)`: a functional Keras
      model with inputs `[x_t, *states]` and outputs `[y_t, *new_states]`, a
      Keras RNN cell, or a callable (see `stepper.steps`).
    inputs: Tensor or nest, each leaf `[batch, time, ...]` (`[time, batch,
      ...]` with `time_major=True`). `time` may be unknown statically; `0` is
      allowed (no step runs).
    initial_states: Nest like the step's states, each `[batch, ...]`.
      Defaults to the step's initial state (zeros for built-in models and
      cells) with the batch size of `inputs`. Required for a plain callable.
    time_major: Whether `inputs`, `mask`, `resets` and the returned sequences
      are `[time, batch, ...]`.
    reverse: Run from the last step to the first. Outputs are still returned
      in the input's time order: `outputs[:, t]` is the output for
      `inputs[:, t]`. With `sequence_length`, only each row's valid part is
      reversed (like `tf.reverse_sequence`), so the run starts at each row's
      real last step.
    return_sequences: If False, return only the last output, `[batch, ...]`,
      and keep no per-step output buffer. With a mask, this is each row's
      last valid output.
    return_all_states: Also return the state after every step, nested like
      the states, each `[batch, time, ...]`. Masked steps repeat the carried
      state; with `sequence_length` they are zeros from each row's length on.
    unroll: Steps per loop iteration. Any `time` works: the remainder
      `time % unroll` runs in a second, one-step loop.
    parallel_iterations: Passed to `tf.while_loop` (`None`: TensorFlow's
      default, 10). Steps depend on each other through the state, so only
      independent work (input reads, output writes) can overlap.
    swap_memory: Passed to `tf.while_loop`: swap per-step activations to host
      memory (useful for long sequences on GPU). Off by default: it costs
      time and is useless on CPU.
    training: Passed to the step at every call: a Python bool, or a bool
      tensor. Cells branch on it in Python (`if training and
      self.dropout`), so a tensor whose value is unknown when tracing runs
      the loop under a `tf.cond`, once with `True` and once with `False`;
      the step never sees the tensor.
    mask: bool `[batch, time]`: where False the step is skipped for that row:
      states are carried forward; the output is the previous output (zeros
      before the first valid step), or zeros with `zero_output_for_mask`.
    sequence_length: int `[batch]`, the `tf.nn.dynamic_rnn` semantics:
      outputs are zero at and after each row's length, final states are the
      states at each row's last valid step, and the loop stops after
      `max(sequence_length)` steps. Exclusive with `mask`.
    zero_output_for_mask: Output zeros, not the previous output, where masked.
    resets: bool `[batch, time]`: where True, the row's state is set back to
      its initial state right before that step (episode boundaries in a
      packed stream). No gradient flows across a reset.
    remat: Memory-efficient backpropagation (`stepper.remat`): an int `k`
      keeps only the states at every k-th step and recomputes each segment
      of `k` steps in the backward pass (one extra forward pass); `"sqrt"`
      picks `k = ceil(sqrt(steps))` at run time. Same gradients as `None`
      (keep every step's activations). Variables the step writes (dropout
      seeds) are replayed.
    hoist: Compute the step's input half for all steps at once, before the
      loop (one `[time * batch, features] x [features, k * units]` matmul for
      a built-in Keras cell, its input dropout mask applied first; the
      layers a functional step model applies to `x_t` alone; the `project`
      of a `stepper.steps.split` step), and run only the rest in the loop.
      Same results up to float rounding. Steps that do not split run as
      they are (cells with recurrent dropout, cells that compute in half
      precision, layers that may mix rows or draw random numbers). Off by
      default: on CPU TensorFlow's executor already overlaps `x_t @ kernel`
      of later steps with the recurrence, so hoisting measured no faster
      in training and up to 1.24x slower in inference, and under XLA it
      doubles the buffers (docs/guides/performance.md). It is the layout
      cuDNN uses on GPUs, where it is worth measuring.
    _reset_to: Private (for `stepper.chunking`): the states a reset sets,
      nested like the states, when they differ from `initial_states` (a
      chunk starts from the carried state but resets to the run's start).

  Returns:
    `(outputs, final_states)`, or `(outputs, final_states, all_states)` with
    `return_all_states=True`. `outputs` nests like `y_t`, each leaf
    `[batch, time, ...]` (or `[batch, ...]` without `return_sequences`);
    `final_states` nests like the states, each `[batch, ...]`. With `time = 0`
    outputs are empty `[batch, 0, ...]` (zeros `[batch, ...]` without
    `return_sequences`) and `final_states` are the initial states.

  Raises:
    ValueError: If an input has rank < 3, batch sizes or time lengths
      disagree, `initial_states` do not match the step's states, the step
      returns new states shaped unlike its states, or a masking argument is
      malformed.
    TypeError: For a non-float input to a step that needs floats, a state
      of the wrong dtype, or a flag (`reverse`, ...) that is not a bool.
  """
  step = steps_lib.as_step(step)
  for name, flag in (("time_major", time_major), ("reverse", reverse),
                     ("return_sequences", return_sequences),
                     ("return_all_states", return_all_states),
                     ("swap_memory", swap_memory),
                     ("zero_output_for_mask", zero_output_for_mask),
                     ("hoist", hoist)):
    _checks.check_bool(flag, name)
  _checks.check_positive_int(unroll, "unroll")
  remat_lib.check_remat(remat)
  if parallel_iterations is not None:
    _checks.check_positive_int(parallel_iterations, "parallel_iterations")
  flat_x, batch, time = _inputs.flat_inputs(step, inputs, time_major)
  x_structure = tf.nest.map_structure(lambda _: 0, inputs)
  states = _inputs.initial_states(step, initial_states, batch)
  controls = masking.prepare(
      mask=mask, sequence_length=sequence_length, resets=resets,
      zero_output_for_mask=zero_output_for_mask, batch=batch.value,
      time=time.value, time_major=time_major)
  x_spec = tf.nest.pack_sequence_as(
      x_structure, [_loop.step_spec(x, time_major) for x in flat_x])
  y_spec = _inputs.output_spec(step, x_spec, states, training)
  if tf.is_tensor(training):  # The step is built now (by `output_spec`).
    static = tf.get_static_value(training)
    if static is None:
      run = lambda flag: model_rnn(
          step, inputs, initial_states, time_major=time_major,
          reverse=reverse, return_sequences=return_sequences,
          return_all_states=return_all_states, unroll=unroll,
          parallel_iterations=parallel_iterations, swap_memory=swap_memory,
          training=flag, mask=mask, sequence_length=sequence_length,
          zero_output_for_mask=zero_output_for_mask, resets=resets,
          remat=remat, hoist=hoist, _reset_to=_reset_to)
      return tf.cond(tf.convert_to_tensor(training, tf.bool),
                     lambda: run(True), lambda: run(False))
    training = bool(static)

  reverse_rows = reverse and controls.lengths is not None
  # The remat engine reads the inputs in the caller's layout; the loop (and
  # reversing rows) reads them time-major.
  in_layout = remat is not None and not reverse_rows
  if not time_major and not in_layout:
    flat_x = [_loop.swap_batch_time(x) for x in flat_x]
  if reverse_rows:  # Reverse each row's valid part, then run forward.
    flat_x = [_loop.reverse_rows(x, controls.lengths) for x in flat_x]
    controls = controls._replace(resets=None if controls.resets is None else
                                 _loop.reverse_rows(controls.resets,
                                                    controls.lengths))
  split = step.split(training) if hoist else None
  if split is not None:  # The input half, for all steps at once.
    projected = split.project(
        tf.nest.pack_sequence_as(x_structure, flat_x), training,
        1 if in_layout and not time_major else 0)
    step = split.core
    x_structure = tf.nest.map_structure(lambda _: 0, projected)
    flat_x = tf.nest.flatten(projected)
  loop = _loop.Loop(step, x_structure, y_spec, states, controls,
                    reset_to=states if _reset_to is None else _reset_to,
                    training=training, reverse=reverse and not reverse_rows,
                    return_sequences=return_sequences,
                    return_all_states=return_all_states,
                    parallel_iterations=parallel_iterations,
                    swap_memory=swap_memory)
  n_steps = (time.value if controls.lengths is None else
             tf.reduce_max(tf.concat([controls.lengths, [0]], 0)))
  if remat is None:
    with _fastpath.weights_read_once(step):
      outputs, final_states, all_states = loop.run(flat_x, n_steps, time,
                                                   unroll)
  else:
    outputs, final_states, all_states = remat_lib.run(
        loop, flat_x, n_steps, time, unroll, remat,
        time_major=time_major or not in_layout)

  def finish(sequence):
    if reverse_rows:
      sequence = _loop.reverse_rows(sequence, controls.lengths)
    return sequence if time_major else _loop.swap_batch_time(sequence)

  if return_sequences:
    outputs = tf.nest.map_structure(finish, outputs)
  if not return_all_states:
    return outputs, final_states
  return outputs, final_states, tf.nest.map_structure(finish, all_states)

