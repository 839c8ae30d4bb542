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
from stepper import masking
from stepper import remat as remat_lib
from stepper import steps as steps_lib

Nest = Any


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
    training: Passed to the step at every call.
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
    TypeError: For a non-float input to a step that needs floats, or a state
      of the wrong dtype.
  """
  step = steps_lib.as_step(step)
  _checks.check_positive_int(unroll, "unroll")
  remat_lib.check_remat(remat)
  if parallel_iterations is not None:
    _checks.check_positive_int(parallel_iterations, "parallel_iterations")
  flat_x, batch, time = _flat_inputs(step, inputs, time_major)
  x_structure = tf.nest.map_structure(lambda _: 0, inputs)
  states = _initial_states(step, initial_states, batch)
  controls = masking.prepare(
      mask=mask, sequence_length=sequence_length, resets=resets,
      zero_output_for_mask=zero_output_for_mask, batch=batch.value,
      time=time.value, time_major=time_major)
  x_spec = tf.nest.pack_sequence_as(
      x_structure, [_step_spec(x, time_major) for x in flat_x])
  y_spec = _output_spec(step, x_spec, states, training)

  reverse_rows = reverse and controls.lengths is not None
  # The remat engine reads the inputs in the caller's layout; the loop (and
  # reversing rows) reads them time-major.
  in_layout = remat is not None and not reverse_rows
  if not time_major and not in_layout:
    flat_x = [_swap_batch_time(x) for x in flat_x]
  if reverse_rows:  # Reverse each row's valid part, then run forward.
    flat_x = [_reverse_rows(x, controls.lengths) for x in flat_x]
    controls = controls._replace(resets=None if controls.resets is None else
                                 _reverse_rows(controls.resets,
                                               controls.lengths))
  loop = _Loop(step, x_structure, y_spec, states, controls,
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
      sequence = _reverse_rows(sequence, controls.lengths)
    return sequence if time_major else _swap_batch_time(sequence)

  if return_sequences:
    outputs = tf.nest.map_structure(finish, outputs)
  if not return_all_states:
    return outputs, final_states
  return outputs, final_states, tf.nest.map_structure(finish, all_states)


class _Dim:
  """A dimension: its static value (or None) and a value usable in ops."""

  def __init__(self, static: int | None, dynamic: tf.Tensor):
    self.static = static
    self.value = static if static is not None else dynamic


def _swap_batch_time(x: tf.Tensor) -> tf.Tensor:
  return tf.transpose(x, [1, 0] + list(range(2, x.shape.rank)))


def _reverse_rows(x: tf.Tensor, lengths: tf.Tensor) -> tf.Tensor:
  """Reverses each row's first `lengths[b]` steps of time-major `x`."""
  return tf.reverse_sequence(x, lengths, seq_axis=0, batch_axis=1)


def _step_spec(x: tf.Tensor, time_major: bool) -> tf.TensorSpec:
  """The spec of one step of `x`: its shape without the time axis."""
  time_axis = 0 if time_major else 1
  return tf.TensorSpec(
      x.shape[:time_axis].concatenate(x.shape[time_axis + 1:]), x.dtype)


def _flat_inputs(step: steps_lib.Step, inputs: Nest,
                 time_major: bool) -> tuple[list, _Dim, _Dim]:
  """Validates `inputs`; returns their flat leaves, batch and time."""
  inputs = tf.nest.map_structure(tf.convert_to_tensor, inputs)
  flat = tf.nest.flatten(inputs)
  if not flat:
    raise ValueError("`inputs` is empty; expected a tensor or a nest of "
                     "tensors [batch, time, ...].")
  names = _checks.leaf_paths(inputs, "inputs")
  layout = "[time, batch, ...]" if time_major else "[batch, time, ...]"
  for x, name in zip(flat, names):
    _checks.check_rank_at_least(x, 3, name, layout)
  b, t = (1, 0) if time_major else (0, 1)
  batch = _checks.merge_dim([(n, x.shape[b]) for n, x in zip(names, flat)],
                            "batch size")
  time = _checks.merge_dim([(n, x.shape[t]) for n, x in zip(names, flat)],
                           "number of time steps")
  if batch is None and len(flat) > 1:
    for name, x in zip(names[1:], flat[1:]):
      _checks.dynamic_assert_equal(
          tf.shape(x)[b], tf.shape(flat[0])[b],
          f"{name} and {names[0]} have different batch sizes.")
  _check_input_spec(step, inputs, names,
                    [_step_spec(x, time_major) for x in flat])
  return flat, _Dim(batch, _size(flat[0], b)), _Dim(time, _size(flat[0], t))


def _time_major_inputs(step: steps_lib.Step, inputs: Nest,
                       time_major: bool) -> tuple[list, _Dim, _Dim]:
  """Validates `inputs`; returns flat time-major leaves, batch and time."""
  flat, batch, time = _flat_inputs(step, inputs, time_major)
  return ([x if time_major else _swap_batch_time(x) for x in flat], batch,
          time)


def _size(x: tf.Tensor, axis: int) -> int | tf.Tensor:
  """`x.shape[axis]` if static, else `tf.shape(x)[axis]` (the eager op costs
  ~60 µs per call)."""
  return x.shape[axis] if x.shape[axis] is not None else tf.shape(x)[axis]


def _check_input_spec(step: steps_lib.Step, inputs: Nest, names: list[str],
                      step_specs: list[tf.TensorSpec]) -> None:
  """Inputs against a step model's declared `x_t` input (when it has one)."""
  if step.input_spec is None:
    return
  try:
    tf.nest.assert_same_structure(inputs, step.input_spec, check_types=False)
  except (ValueError, TypeError):
    raise ValueError(
        f"`inputs` is nested as {_checks.nesting(inputs)}"
        f" but {step.name} expects x_t nested as "
        f"{_checks.nesting(step.input_spec)}.") from None
  for name, x, spec in zip(names, step_specs,
                           tf.nest.flatten(step.input_spec)):
    if _checks.is_float(spec.dtype) and not _checks.is_float(x.dtype):
      raise TypeError(f"{name} has dtype {x.dtype.name} but {step.name} "
                      f"expects floating inputs ({spec.dtype.name}).")
    if not x.shape.is_compatible_with(spec.shape):
      raise ValueError(
          f"{name} has per-step shape {_checks.shape_str(x.shape)} "
          f"([batch, ...] after removing time) but {step.name} expects x_t of "
          f"shape {_checks.shape_str(spec.shape)}.")


def _initial_states(step: steps_lib.Step, initial_states: Nest | None,
                    batch: _Dim) -> Nest:
  """Default or validated initial states, nested like the step's states."""
  if initial_states is None:
    return step.initial_state(batch.value)
  initial_states = tf.nest.map_structure(tf.convert_to_tensor, initial_states)
  specs = step.state_specs
  if specs is not None:
    n_given = len(initial_states) if isinstance(initial_states,
                                                (list, tuple)) else 1
    n_expected = len(specs) if isinstance(specs, (list, tuple)) else 1
    try:
      tf.nest.assert_same_structure(initial_states, specs, check_types=False)
    except (ValueError, TypeError):
      raise ValueError(
          f"`initial_states` has {n_given} state(s) nested as "
          f"{_checks.nesting(initial_states)}, but "
          f"{step.name} expects {n_expected} nested as "
          f"{_checks.nesting(specs)}.") from None
    initial_states = tf.nest.pack_sequence_as(
        specs, tf.nest.flatten(initial_states))
    names = _checks.leaf_paths(specs, "initial_states")
    expected = _checks.state_input_names(specs)
    for state, spec, name, exp in zip(tf.nest.flatten(initial_states),
                                      tf.nest.flatten(specs), names, expected):
      _checks.check_spec_compatible(
          state, spec, name, exp,
          "Pass states shaped like the step's state inputs.")
  names = _checks.leaf_paths(initial_states, "initial_states")
  for name, state in zip(names, tf.nest.flatten(initial_states)):
    if state.shape.rank == 0:
      raise ValueError(f"{name} is a scalar; states must be [batch, ...].")
    _checks.merge_dim([("inputs", batch.static), (name, state.shape[0])],
                      "batch size")
    if batch.static is None or state.shape[0] is None:
      _checks.dynamic_assert_equal(
          tf.shape(state)[0], batch.value,
          f"{name} and the inputs have different batch sizes.")
  return initial_states


def _output_spec(step: steps_lib.Step, x_spec: Nest, states: Nest,
                 training: Any) -> Nest:
  """Traces the step abstractly; checks its new states; returns y's spec."""
  state_spec = tf.nest.map_structure(
      lambda s: tf.TensorSpec(s.shape, s.dtype), states)
  try:
    y_spec, new_spec = step.output_spec(x_spec, state_spec, training)
  except (ValueError, TypeError, tf.errors.InvalidArgumentError) as e:
    raise type(e)(
        f"Calling {step.name} on x_t {x_spec} and states {state_spec} "
        f"failed: {e}") from e
  try:
    tf.nest.assert_same_structure(state_spec, new_spec, check_types=False)
  except (ValueError, TypeError):
    raise ValueError(
        f"{step.name} returned new states nested as "
        f"{_checks.nesting(new_spec)} but its states "
        f"are nested as {_checks.nesting(state_spec)}; "
        "a step must return new states like its states.") from None
  names = _checks.leaf_paths(state_spec, "state")
  for name, old, new in zip(names, tf.nest.flatten(state_spec),
                            tf.nest.flatten(new_spec)):
    if not old.shape.is_compatible_with(new.shape) or old.dtype != new.dtype:
      raise ValueError(
          f"{step.name} changes {name} from shape {_checks.shape_str(old.shape)}"
          f" {old.dtype.name} to {_checks.shape_str(new.shape)} "
          f"{new.dtype.name} in one step; a state must keep its shape and "
          "dtype from step to step.")
  return y_spec


def _select(keep: tf.Tensor, new: tf.Tensor, old: tf.Tensor) -> tf.Tensor:
  """Row-wise `keep ? new : old`; `keep` is `[batch]`."""
  keep = tf.reshape(keep, [-1] + [1] * (new.shape.rank - 1))
  return tf.where(keep, new, old)


def _zeros(spec: tf.TensorSpec, batch: tf.Tensor) -> tf.Tensor:
  if not spec.shape[1:].is_fully_defined():
    raise ValueError(f"The step's output has shape {spec.shape}; its "
                     "non-batch dimensions must be known statically.")
  return tf.zeros(tf.concat([[batch], spec.shape[1:]], 0), spec.dtype)


class _Loop:
  """The while loop: one step body, run `unroll` steps per iteration."""

  def __init__(self, step, x_structure, y_spec, states, controls, *,
               reset_to, training, reverse, return_sequences, return_all_states,
               parallel_iterations, swap_memory):
    self._step = step
    self._x_structure = x_structure
    self._y_spec = y_spec
    self._states = states
    self._flat_init = tf.nest.flatten(states)
    self._flat_reset = tf.nest.flatten(reset_to)
    self._controls = controls
    self._training = training
    self._reverse = reverse
    self._return_sequences = return_sequences
    self._return_all_states = return_all_states
    self._loop_kwargs = dict(parallel_iterations=parallel_iterations or 10,
                             swap_memory=swap_memory)
    # The carried last output: for carry-forward masking and for
    # return_sequences=False.
    self._carry_last = (return_sequences is False or (
        controls.mask is not None and not controls.zero_output))

  def run(self, flat_x, n_steps, time: _Dim, unroll: int):
    """Runs `n_steps` steps; returns `(outputs, final_states, all_states)`.

    Sequences come back time-major, `[time, batch, ...]`.
    """
    batch = _size(flat_x[0], 1)
    self._call = self._step.start(batch, self._training)
    self._time = time.value
    self._input_tas = [
        tf.TensorArray(x.dtype, size=time.value, element_shape=x.shape[1:])
        .unstack(x) for x in flat_x]
    self._control_tas = {
        name: tf.TensorArray(tf.bool, size=time.value).unstack(value)
        for name, value in (("mask", self._controls.mask),
                            ("resets", self._controls.resets))
        if value is not None}
    flat_y_spec = tf.nest.flatten(self._y_spec)
    # Arrays hold the steps run, padded with zeros to `time` afterwards;
    # under XLA (static shapes) they hold all `time` steps, zero-filled, so
    # a run-time `max(sequence_length)` sizes nothing.
    full = isinstance(time.value, int) and _fastpath.in_xla()
    size = time.value if full else n_steps
    pad = self._controls.lengths is not None and not full
    out_tas = ([_fastpath.output_array(s, size, batch)
                for s in flat_y_spec] if self._return_sequences else [])
    state_tas = ([_fastpath.output_array(s, size, batch)
                  for s in self._flat_init] if self._return_all_states else [])
    last = ([_zeros(s, batch) for s in flat_y_spec]
            if self._carry_last else [])
    carry = (out_tas, state_tas, list(self._flat_init), last)

    # No loop when no step can run: XLA cannot even build a write into a
    # zero-length array.
    if time.static != 0:
      t = 0
      if unroll > 1:
        t, carry = self._while(0, n_steps // unroll * unroll, unroll, carry,
                               maximum_iterations=time.value // unroll)
      _, carry = self._while(t, n_steps, 1, carry,
                             maximum_iterations=time.value if unroll == 1 else
                             unroll - 1)
    out_tas, state_tas, flat_states, last = carry

    if self._return_sequences:
      outputs = [self._stack(ta, s, size, batch, time, pad)
                 for ta, s in zip(out_tas, flat_y_spec)]
    else:
      outputs = last
    all_states = [self._stack(ta, s, size, batch, time, pad)
                  for ta, s in zip(state_tas, self._flat_init)]
    pack = tf.nest.pack_sequence_as
    return (pack(self._y_spec, outputs), pack(self._states, flat_states),
            pack(self._states, all_states) if all_states else None)

  def _while(self, start, stop, k, carry, maximum_iterations):
    def body(t, carry):
      for i in range(k):  # (No `t + 0` op: graph mode pays per op.)
        carry = self._one_step(t + i if i else t, carry)
      return t + k, carry

    return tf.while_loop(lambda t, _: t < stop, body, (start, carry),
                         maximum_iterations=maximum_iterations,
                         **self._loop_kwargs)

  def _one_step(self, t, carry):
    out_tas, state_tas, flat_states, last = carry
    idx = self._time - 1 - t if self._reverse else t
    x_t = tf.nest.pack_sequence_as(
        self._x_structure, [ta.read(idx) for ta in self._input_tas])
    if "resets" in self._control_tas:
      reset = self._control_tas["resets"].read(idx)
      flat_states = [_select(reset, init, s)
                     for init, s in zip(self._flat_reset, flat_states)]
    y, new_states = self._call(
        x_t, tf.nest.pack_sequence_as(self._states, flat_states),
        self._training)
    flat_y = tf.nest.flatten(y)
    flat_new = tf.nest.flatten(new_states)
    for new, old in zip(flat_new, flat_states):
      new.set_shape(old.shape)  # Keeps the loop's shape invariants.
    if "mask" in self._control_tas:
      keep = self._control_tas["mask"].read(idx)
      flat_new = [_select(keep, n, s) for n, s in zip(flat_new, flat_states)]
      if self._carry_last:
        last = [_select(keep, y_, l) for y_, l in zip(flat_y, last)]
      if self._controls.zero_output:
        flat_y = [_select(keep, y_, tf.zeros_like(y_)) for y_ in flat_y]
      else:
        flat_y = last
    elif self._carry_last:
      last = flat_y
    out_tas = [ta.write(idx, y_) for ta, y_ in zip(out_tas, flat_y)]
    step_states = flat_new
    if self._controls.lengths is not None:  # Zero after the end, like the
      step_states = [_select(keep, s, tf.zeros_like(s))  # zero-filled tail.
                     for s in flat_new]
    state_tas = [ta.write(idx, s) for ta, s in zip(state_tas, step_states)]
    return out_tas, state_tas, flat_new, last

  def _stack(self, ta, spec, size, batch, time: _Dim, pad: bool):
    """Stacks an array of `size` steps; `pad` zero-fills it to `time`
    (`sequence_length`: the loop stopped after the longest sequence)."""
    empty = lambda: tf.zeros(tf.concat([[0, batch], spec.shape[1:]], 0),
                             spec.dtype)
    if isinstance(size, int):
      stacked = ta.stack() if size > 0 else empty()
    else:
      stacked = tf.cond(size > 0, ta.stack, empty)
    if pad:
      stacked = tf.pad(stacked, [[0, time.value - size]] +
                       [[0, 0]] * spec.shape.rank)
    stacked.set_shape(tf.TensorShape([time.static]).concatenate(spec.shape))
    return stacked
