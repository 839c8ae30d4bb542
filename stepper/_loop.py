"""The engine's `tf.while_loop` and the tensor helpers its users share.

A private module with public names (chex's `asserts_internal` style): the
engine (`model_rnn`), `stepper.remat`, `stepper.chunking` and `stepper.tbptt`
import it; it imports none of them. `Loop` owns the step body: masks, resets,
sequence lengths, output selection. `Loop.run` drives it over a whole
sequence; `Loop.run_segment` over a few given steps (remat recomputes its
segments with it), both through `Loop.steps`.
"""

from typing import Any, NamedTuple

import tensorflow as tf

from stepper import _fastpath

Nest = Any


def unconverted(fn):
  """Marks a public entry point whose code AutoGraph must leave as it is.

  stepper builds its graphs with explicit `tf.while_loop`/`tf.cond`, so
  AutoGraph has nothing to convert in it; but a `tf.function` (Keras' `fit`
  among them) transpiles every function its code calls, and it does so
  again on each trace: 40-170 stepper functions, 60-75% of the trace time
  of a small `model_rnn` gradient measured here. A step is called exactly
  as before (AutoGraph never converted it: the step's abstract trace runs
  before the loop, outside any converted code).

  Args:
    fn: The function.

  Returns:
    `fn`, run with AutoGraph off (`tf.autograph.experimental.do_not_convert`).
  """
  return tf.autograph.experimental.do_not_convert(fn)


class Dim:
  """A dimension: its static value (or None) and a value usable in ops."""

  def __init__(self, static: int | None, dynamic: tf.Tensor):
    self.static = static
    self.value = static if static is not None else dynamic


def size(x: tf.Tensor, axis: int) -> int | tf.Tensor:
  """`x.shape[axis]` if static, else `tf.shape(x)[axis]` (the eager op costs
  ~60 µs per call)."""
  return x.shape[axis] if x.shape[axis] is not None else tf.shape(x)[axis]


def swap_batch_time(x: tf.Tensor) -> tf.Tensor:
  """`[batch, time, ...]` <-> `[time, batch, ...]`."""
  return tf.transpose(x, [1, 0] + list(range(2, x.shape.rank)))


def reverse_rows(x: tf.Tensor, lengths: tf.Tensor) -> tf.Tensor:
  """Reverses each row's first `lengths[b]` steps of time-major `x`."""
  return tf.reverse_sequence(x, lengths, seq_axis=0, batch_axis=1)


def step_spec(x: tf.Tensor, time_major: bool) -> tf.TensorSpec:
  """The spec of one step of `x`: its shape without the time axis."""
  time_axis = 0 if time_major else 1
  return tf.TensorSpec(
      x.shape[:time_axis].concatenate(x.shape[time_axis + 1:]), x.dtype)


def select(keep: tf.Tensor, new: tf.Tensor, old: tf.Tensor) -> tf.Tensor:
  """Row-wise `keep ? new : old`; `keep` is `[batch]`."""
  keep = tf.reshape(keep, [-1] + [1] * (new.shape.rank - 1))
  return tf.where(keep, new, old)


def zeros(spec: tf.TensorSpec, batch: tf.Tensor) -> tf.Tensor:
  """Zeros `[batch, ...]` shaped like one step's value `spec`."""
  if not spec.shape[1:].is_fully_defined():
    raise ValueError(f"The step's output has shape {spec.shape}; its "
                     "non-batch dimensions must be known statically.")
  return tf.zeros(tf.concat([[batch], spec.shape[1:]], 0), spec.dtype)


def merge_leading_dims(x: tf.Tensor) -> tf.Tensor:
  """`[a, b, ...]` -> `[a * b, ...]`, the static tail kept."""
  merged = tf.reshape(x, tf.concat([[-1], tf.shape(x)[2:]], 0))
  a, b = x.shape[0], x.shape[1]
  merged.set_shape(tf.TensorShape([a * b if a is not None and b is not None
                                   else None]).concatenate(x.shape[2:]))
  return merged


def unstack(x: tf.Tensor, n: int | tf.Tensor) -> tf.TensorArray:
  """`x` `[n, ...]` as a `TensorArray` of `n` steps."""
  return tf.TensorArray(x.dtype, size=n, element_shape=x.shape[1:]).unstack(x)


def step_list(x: tf.Tensor, reverse: bool = False) -> tf.Tensor:
  """`x` `[time, ...]` as a tensor list that `pop` hands out in time order
  (`reverse`: from the last step).

  Why not a `TensorArray` read by index: the gradient of a read
  (`TensorListGetItem`) is a whole new list of `time` slots holding one
  step, added to the accumulated gradient, so backpropagating into an
  input read step by step costs O(time) per step, O(time^2) in all (2x
  the whole run at 1000 steps of a small cell, whenever the inputs need a
  gradient: hoisted projections, the upper layers of a stack). The
  gradient of a pop is one push: O(1) per step.
  """
  if not reverse:  # The list's back is the first step to run.
    x = tf.reverse(x, [0])
  shape = [-1 if d is None else d for d in x.shape[1:]]
  return tf.raw_ops.TensorListFromTensor(
      tensor=x, element_shape=tf.constant(shape, tf.int32))


def pop(handle: tf.Tensor, spec: tf.TensorSpec) -> tuple[tf.Tensor,
                                                        tf.Tensor]:
  """`(rest, x_t)`: the next step of a `step_list` and the list after it."""
  rest, x_t = tf.raw_ops.TensorListPopBack(
      input_handle=handle, element_shape=tf.constant(-1, tf.int32),
      element_dtype=spec.dtype)
  x_t.set_shape(spec.shape)
  return rest, x_t


class _Feed(NamedTuple):
  """What one run's step body reads besides its carry."""
  call: Any  # The step's per-run function (`Step.start`).
  time: int | tf.Tensor  # Steps in the control and output arrays.
  input_lists: list[tf.Tensor]  # `step_list`s popped in running order.
  input_specs: list[tf.TensorSpec]  # One step of each input.
  control_tas: dict[str, tf.TensorArray]  # "mask" and/or "resets" rows.
  flat_reset: list[tf.Tensor]  # The states a reset sets.
  reverse: bool  # Index the arrays from the last step.


class Loop:
  """The while loop: one step body, run `unroll` steps per iteration.

  Configured once per `model_rnn` call; read-only properties expose the
  configuration to the modules that drive it differently (`stepper.remat`).
  """

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

  step = property(lambda self: self._step, doc="The `stepper.Step`.")
  training = property(lambda self: self._training,
                      doc="The `training` passed to every step call.")
  controls = property(lambda self: self._controls,
                      doc="The run's `masking.Controls`.")
  reverse = property(lambda self: self._reverse,
                     doc="Whether the loop runs from the last step.")
  x_structure = property(lambda self: self._x_structure,
                         doc="The nesting of one step's input.")
  y_spec = property(lambda self: self._y_spec,
                    doc="Spec of one step's output, `[batch, ...]` leaves.")
  states = property(lambda self: self._states,
                    doc="The initial states, nested like the step's states.")
  flat_init = property(lambda self: list(self._flat_init),
                       doc="The initial states, flat.")
  flat_reset = property(lambda self: list(self._flat_reset),
                        doc="The states a reset sets, flat.")
  return_sequences = property(lambda self: self._return_sequences)
  return_all_states = property(lambda self: self._return_all_states)
  carry_last = property(
      lambda self: self._carry_last,
      doc="Whether the carry holds the last output (masks, no sequences).")
  while_kwargs = property(
      lambda self: dict(self._loop_kwargs),
      doc="`parallel_iterations` and `swap_memory` for `tf.while_loop`.")

  def run(self, flat_x, n_steps, time: Dim, unroll: int):
    """Runs `n_steps` steps; returns `(outputs, final_states, all_states)`.

    Sequences come back time-major, `[time, batch, ...]`.
    """
    batch = size(flat_x[0], 1)
    feed = _Feed(
        call=self._step.start(batch, self._training),
        time=time.value,
        input_lists=[step_list(x, self._reverse) for x in flat_x],
        input_specs=[tf.TensorSpec(x.shape[1:], x.dtype) for x in flat_x],
        control_tas={
            name: tf.TensorArray(tf.bool, size=time.value).unstack(value)
            for name, value in (("mask", self._controls.mask),
                                ("resets", self._controls.resets))
            if value is not None},
        flat_reset=self._flat_reset, reverse=self._reverse)
    flat_y_spec = tf.nest.flatten(self._y_spec)
    # Arrays hold the steps run, padded with zeros to `time` afterwards;
    # under XLA (static shapes) they hold all `time` steps, zero-filled, so
    # a run-time `max(sequence_length)` sizes nothing.
    full = isinstance(time.value, int) and _fastpath.in_xla()
    n_rows = time.value if full else n_steps
    pad = self._controls.lengths is not None and not full
    out_tas = ([_fastpath.output_array(s, n_rows, batch)
                for s in flat_y_spec] if self._return_sequences else [])
    state_tas = ([_fastpath.output_array(s, n_rows, batch)
                  for s in self._flat_init] if self._return_all_states else [])
    last = ([zeros(s, batch) for s in flat_y_spec]
            if self._carry_last else [])
    carry = (out_tas, state_tas, list(self._flat_init), last)

    # No loop when no step can run: XLA cannot even build a write into a
    # zero-length array.
    if time.static != 0:
      carry = self.steps(feed, carry, 0, n_steps, unroll,
                         max_steps=time.value)
    out_tas, state_tas, flat_states, last = carry

    if self._return_sequences:
      outputs = [self._stack(ta, s, n_rows, batch, time, pad)
                 for ta, s in zip(out_tas, flat_y_spec)]
    else:
      outputs = last
    all_states = [self._stack(ta, s, n_rows, batch, time, pad)
                  for ta, s in zip(state_tas, self._flat_init)]
    pack = tf.nest.pack_sequence_as
    return (pack(self._y_spec, outputs), pack(self._states, flat_states),
            pack(self._states, all_states) if all_states else None)

  def run_segment(self, call, n, flat_x, controls: dict[str, tf.Tensor],
                  flat_states, last, reset_to, unroll: int):
    """Runs the step body over a few given steps, forward, no checkpoints.

    Args:
      call: The step's per-run function (`self.step.start(...)`).
      n: The segment's number of steps (an int or a scalar tensor).
      flat_x: The segment's flat inputs, time-major `[n, batch, ...]`, in
        running order.
      controls: Its "mask" and/or "resets" rows by name, `[n, batch]`.
      flat_states: Flat states before the segment.
      last: The carried last output before it (`[]` without `carry_last`).
      reset_to: The flat states a reset sets (`[]`: `flat_reset`).
      unroll: Steps per loop iteration.

    Returns:
      Flat `(rows [n, ...], states, last)`: the rows of every returned
      sequence (outputs, then states), the states and the carried last output
      after the segment.
    """
    feed = _Feed(call=call, time=n,
                 input_lists=[step_list(v) for v in flat_x],
                 input_specs=[tf.TensorSpec(v.shape[1:], v.dtype)
                              for v in flat_x],
                 control_tas={name: unstack(v, n)
                              for name, v in controls.items()},
                 flat_reset=reset_to or self._flat_reset, reverse=False)
    new_tas = lambda specs: [
        tf.TensorArray(s.dtype, size=n, element_shape=s.shape) for s in specs]
    carry = (new_tas(tf.nest.flatten(self._y_spec))
             if self._return_sequences else [],
             new_tas(self._flat_init) if self._return_all_states else [],
             list(flat_states), list(last))
    out_tas, state_tas, flat_states, last = self.steps(
        feed, carry, 0, n, unroll, max_steps=n)
    rows = [ta.stack() for ta in out_tas] + [ta.stack() for ta in state_tas]
    return rows, flat_states, last

  def steps(self, feed: _Feed, carry, start, stop, unroll: int, *,
            max_steps):
    """Steps `start .. stop` of `feed`: `unroll` per iteration of one loop,
    the remainder (`< unroll` steps) in a second, one-step loop.

    Args:
      feed: What the body reads (`run` and `run_segment` build it); its
        input lists hold the steps from `start` on.
      carry: `(out_tas, state_tas, flat_states, last)`.
      start: First step, `0` or a scalar.
      stop: One past the last step (an int or a scalar tensor).
      unroll: Steps per iteration of the first loop.
      max_steps: A static bound on `stop - start` (`maximum_iterations`).

    Returns:
      The carry after step `stop - 1`.
    """
    t = start
    lists = list(feed.input_lists)
    if unroll > 1:
      # `stop // unroll * unroll` for the usual `start == 0` (graph mode pays
      # per op).
      end = (stop // unroll * unroll if isinstance(start, int) and start == 0
             else start + (stop - start) // unroll * unroll)
      t, lists, carry = self._while(feed, start, end, unroll, lists, carry,
                                    maximum_iterations=max_steps // unroll)
    _, _, carry = self._while(feed, t, stop, 1, lists, carry,
                              maximum_iterations=max_steps if unroll == 1
                              else unroll - 1)
    return carry

  def _while(self, feed, start, stop, k, lists, carry, maximum_iterations):
    def body(t, lists, carry):
      for i in range(k):  # (No `t + 0` op: graph mode pays per op.)
        lists, carry = self._one_step(feed, t + i if i else t, lists, carry)
      return t + k, lists, carry

    return tf.while_loop(lambda t, *_: t < stop, body, (start, lists, carry),
                         maximum_iterations=maximum_iterations,
                         **self._loop_kwargs)

  def _one_step(self, feed, t, lists, carry):
    out_tas, state_tas, flat_states, last = carry
    idx = feed.time - 1 - t if feed.reverse else t
    popped = [pop(h, s) for h, s in zip(lists, feed.input_specs)]
    lists = [rest for rest, _ in popped]
    x_t = tf.nest.pack_sequence_as(self._x_structure,
                                   [x_t for _, x_t in popped])
    if "resets" in feed.control_tas:
      reset = feed.control_tas["resets"].read(idx)
      flat_states = [select(reset, init, s)
                     for init, s in zip(feed.flat_reset, flat_states)]
    y, new_states = feed.call(
        x_t, tf.nest.pack_sequence_as(self._states, flat_states),
        self._training)
    flat_y = tf.nest.flatten(y)
    flat_new = tf.nest.flatten(new_states)
    for new, old in zip(flat_new, flat_states):
      new.set_shape(old.shape)  # Keeps the loop's shape invariants.
    if "mask" in feed.control_tas:
      keep = feed.control_tas["mask"].read(idx)
      flat_new = [select(keep, n, s) for n, s in zip(flat_new, flat_states)]
      if self._carry_last:
        last = [select(keep, y_, l) for y_, l in zip(flat_y, last)]
      if self._controls.zero_output:
        flat_y = [select(keep, y_, tf.zeros_like(y_)) for y_ in flat_y]
      else:
        flat_y = last
    elif self._carry_last:
      last = flat_y
    out_tas = [ta.write(idx, y_) for ta, y_ in zip(out_tas, flat_y)]
    step_states = flat_new
    if self._controls.lengths is not None:  # Zero after the end, like the
      step_states = [select(keep, s, tf.zeros_like(s))  # zero-filled tail.
                     for s in flat_new]
    state_tas = [ta.write(idx, s) for ta, s in zip(state_tas, step_states)]
    return lists, (out_tas, state_tas, flat_new, last)

  def _stack(self, ta, spec, n_rows, batch, time: Dim, pad: bool):
    """Stacks an array of `n_rows` steps; `pad` zero-fills it to `time`
    (`sequence_length`: the loop stopped after the longest sequence)."""
    empty = lambda: tf.zeros(tf.concat([[0, batch], spec.shape[1:]], 0),
                             spec.dtype)
    if isinstance(n_rows, int):
      stacked = ta.stack() if n_rows > 0 else empty()
    else:
      stacked = tf.cond(n_rows > 0, ta.stack, empty)
    if pad:
      stacked = tf.pad(stacked, [[0, time.value - n_rows]] +
                       [[0, 0]] * spec.shape.rank)
    stacked.set_shape(tf.TensorShape([time.static]).concatenate(spec.shape))
    return stacked
