"""Memory-efficient backpropagation through time: checkpointed segments.

Backpropagating through the engine's `tf.while_loop` keeps every step's
activations, so memory grows linearly with the number of steps `T`. With
`model_rnn(..., remat=k)` the run is cut into segments of `k` steps instead
(Gruslys et al., "Memory-Efficient Backpropagation Through Time", 2016; what
`jax.checkpoint` around a scan body does). One `tf.custom_gradient` covers
the whole run: its forward pass runs the segments in a `tf.while_loop` and
keeps only each segment's starting carry; its backward pass is a second loop
over the segments in reverse, re-running each from its saved carry under a
`tf.GradientTape` and backpropagating that segment's slice of the incoming
gradients. Peak memory goes from `T` steps' activations to `T / k` carries
plus two segments' activations (`k ~ sqrt(T)` minimises the sum) for one
extra forward pass. Inputs and incoming gradients are sliced a segment at a
time, in the caller's layout: what stays sequence-sized is what the caller
asked for (the outputs, their gradient, the inputs' gradient).

The per-step logic (masks, resets, sequence lengths, output selection) is the
engine's own step body (`_loop.Loop.run_segment`), so the gradients are those
of the plain engine: same operations, same order. The recomputation reads the
step's weights once per segment (`_fastpath.read_once`), as the plain engine
does once per run: under XLA a read per step would be stacked per step.

Replay: variables the step writes (the `SeedGenerator` state behind Keras
dropout, a `tf.random.Generator`, batch-norm moving statistics) are rewound
to their segment-start values before a segment is recomputed and put back
afterwards, so the recomputation draws the same dropout masks and leaves the
variables as the forward pass left them. Stateful random ops without a
variable (`tf.random.uniform`) cannot be replayed and are refused.
"""

import math
from typing import Any

import numpy as np
import tensorflow as tf

from stepper import _fastpath
from stepper import _loop

Nest = Any

SQRT = "sqrt"

# Stateful random ops whose state lives in the kernel, not in a variable, so
# a recomputation cannot draw the same numbers again.
_UNREPLAYABLE_OPS = frozenset({
    "Multinomial", "ParameterizedTruncatedNormal", "RandomGamma",
    "RandomPoisson", "RandomPoissonV2", "RandomShuffle",
    "RandomStandardNormal", "RandomUniform", "RandomUniformInt",
    "TruncatedNormal"})
# Ops that take a variable's handle without writing the variable.
_READ_ONLY_OPS = frozenset({"ReadVariableOp", "ResourceGather",
                            "ResourceGatherNd", "VariableShape",
                            "VarIsInitializedOp"})


def check_remat(remat: Any) -> None:
  """Validates `model_rnn`'s `remat` argument.

  Args:
    remat: `None`, `"sqrt"` or a positive int (steps per segment).

  Raises:
    TypeError: If `remat` is neither `None`, a string nor an int.
    ValueError: If `remat` is another string or an int < 1.
  """
  if remat is None or (isinstance(remat, str) and remat == SQRT):
    return
  expected = ("`remat` must be None (keep every step's activations), "
              f"{SQRT!r} (segments of ~sqrt(time) steps) or a positive int "
              "(steps per recomputed segment)")
  if isinstance(remat, str):
    raise ValueError(f"{expected}; got the string {remat!r}.")
  if isinstance(remat, bool) or not isinstance(remat, (int, np.integer)):
    raise TypeError(f"{expected}; got {remat!r} of type "
                    f"{type(remat).__name__}.")
  if remat < 1:
    raise ValueError(f"{expected}; got {remat!r}.")


def segment_length(remat: int | str, n_steps: int | tf.Tensor
                   ) -> int | tf.Tensor:
  """Steps per segment: `remat` itself, or `ceil(sqrt(n_steps))` for "sqrt".

  Args:
    remat: A value accepted by `check_remat`, other than `None`.
    n_steps: Number of steps the loop runs (an int when static).

  Returns:
    A positive int, or an int32 scalar tensor when `n_steps` is dynamic and
    `remat` is "sqrt".
  """
  if remat != SQRT:
    return int(remat)
  if isinstance(n_steps, int):
    return math.isqrt(n_steps - 1) + 1 if n_steps > 1 else 1
  root = tf.math.ceil(tf.sqrt(tf.cast(n_steps, tf.float64)))
  return tf.maximum(tf.cast(root, tf.int32), 1)


def run(loop: _loop.Loop, flat_x: list[tf.Tensor],
        n_steps: int | tf.Tensor, time: _loop.Dim, unroll: int,
        remat: int | str, time_major: bool = True
        ) -> tuple[Nest, Nest, Nest | None]:
  """`loop.run`, with each segment of steps recomputed in the backward pass.

  Args:
    loop: The engine's loop, configured for the whole run.
    flat_x: Flat inputs, each `[time, batch, ...]` (or `[batch, time, ...]`
      when not `time_major`). They are read a segment at a time, never
      copied whole.
    n_steps: Steps to run (`max(sequence_length)` with sequence lengths).
    time: The time dimension of `flat_x`.
    unroll: Steps per iteration of the loop inside each segment.
    remat: Steps per segment, or "sqrt" (see `segment_length`).
    time_major: The layout of `flat_x`.

  Returns:
    `(outputs, final_states, all_states)` exactly as `loop.run` returns them
    (sequences time-major).
  """
  batch = tf.shape(flat_x[0])[1 if time_major else 0]
  call = loop.step.start(batch, loop.training)
  controls = {name: value for name, value in (("mask", loop.controls.mask),
                                               ("resets", loop.controls.resets))
              if value is not None}
  if loop.reverse:  # Run the reversed sequence forward; reverse back below.
    controls = {name: tf.reverse(v, [0]) for name, v in controls.items()}
  inputs = _Inputs(flat_x, time_major, loop.reverse, time)
  k = segment_length(remat, n_steps)
  segments = _Segments(loop, call, unroll, inputs, controls, batch)
  outputs, all_states, final_states = segments.run(n_steps, k, time)
  if loop.reverse:
    if loop.return_sequences:  # (Else `outputs` is the last, `[batch, ...]`.)
      outputs = [tf.reverse(y, [0]) for y in outputs]
    all_states = [tf.reverse(s, [0]) for s in all_states]
  pack = tf.nest.pack_sequence_as
  return (pack(loop.y_spec, outputs), pack(loop.states, final_states),
          pack(loop.states, all_states) if all_states else None)


class _Inputs:
  """Slices of the inputs, time-major and in the order the loop runs."""

  def __init__(self, flat_x: list[tf.Tensor], time_major: bool, reverse: bool,
               time: _loop.Dim):
    self.flat = list(flat_x)
    self._axis = 0 if time_major else 1
    self._reverse = reverse
    self._time = time
    # Per-step specs, `[batch, ...]`.
    self.step_specs = [_loop.step_spec(x, time_major) for x in flat_x]

  def rows(self, x: tf.Tensor, start, n) -> tf.Tensor:
    """Steps `start .. start + n` (in running order) of `x`, `[n, batch, ...]`.
    """
    if self._reverse:
      start = self._time.value - start - n
    rows = _time_slice(x, start, n, self._axis)
    if self._axis:
      rows = _loop.swap_batch_time(rows)
    return tf.reverse(rows, [0]) if self._reverse else rows

  def layout(self, rows: tf.Tensor) -> tf.Tensor:
    """Time-major rows of all steps, in running order, in the inputs' layout.
    """
    if self._reverse:
      rows = tf.reverse(rows, [0])
    return _loop.swap_batch_time(rows) if self._axis else rows


class _Segments:
  """The engine's loop run as checkpointed segments of steps.

  One `tf.custom_gradient` covers the whole run. Its forward pass runs the
  segments in a `tf.while_loop` and saves only each segment's starting carry
  (and the values of the variables the step writes). Its backward pass is a
  second `tf.while_loop` over the segments in reverse: each iteration re-runs
  one segment from its saved carry under a `tf.GradientTape` and
  backpropagates that segment's slice of the incoming gradients. Inputs and
  incoming gradients are read a segment at a time, so besides the results
  (and the input gradient, when the inputs are differentiable) nothing of
  size `[time, batch, ...]` is kept.
  """

  def __init__(self, loop: _loop.Loop, call, unroll: int,
               inputs: _Inputs, controls: dict[str, tf.Tensor],
               batch: tf.Tensor):
    self._loop = loop
    self._call = call
    self._unroll = unroll
    self._inputs = inputs
    self._controls = controls
    self._batch = batch
    self._flat_y_spec = tf.nest.flatten(loop.y_spec)
    self._variables, self._written = _step_variables(loop, call,
                                                     inputs.step_specs)
    self._resets = "resets" in controls
    # Specs of the rows of every returned sequence: outputs, then states.
    self._row_specs = ((self._flat_y_spec if loop.return_sequences else []) +
                       (loop.flat_init if loop.return_all_states else []))
    self._last = ([_loop.zeros(s, batch) for s in self._flat_y_spec]
                  if loop.carry_last else [])

  def run(self, n_steps, k, time):
    """Runs `n_steps` steps in segments of `k`.

    Returns:
      Flat `(outputs, all_states, final_states)`: sequences `[time, batch,
      ...]` (`outputs` is the last output without `return_sequences`).
    """
    loop = self._loop
    plan = _Plan(n_steps, k)
    if plan.static and n_steps == 0:
      sequences = [_fit_time(_no_rows(s, self._batch), s, time)
                   for s in self._row_specs]
      final_states, last = loop.flat_init, self._last
    else:
      # The reset target is an input too: gradients flow to it via resets.
      reset_to = loop.flat_reset if self._resets else []
      groups = [self._inputs.flat, loop.flat_init, reset_to]
      # The variables' handles as this (forward) graph sees them; see
      # `_fastpath.handles_from`. Eager execution needs no such detour.
      handles = ([] if tf.executing_eagerly() else
                 [tf.identity(v.handle) for v in self._variables])

      @tf.custom_gradient
      def segmented(*flat_args):
        x, init, reset_to = _split(flat_args, groups)
        result, saved = self._forward(plan, x, init, reset_to, time)

        def grad_fn(*d_result, variables=None):
          with _fastpath.handles_from(self._variables, handles):
            return self._backward(plan, x, reset_to, saved, time,
                                  _split(d_result, self._result_groups()),
                                  variables or [])

        return tf.nest.flatten(result), grad_fn

      sequences, final_states, last = _split(
          segmented(*tf.nest.flatten(groups)), self._result_groups())
      for new, old in zip(final_states, loop.flat_init):
        new.set_shape(old.shape)
    n_outputs = len(self._flat_y_spec) if loop.return_sequences else 0
    outputs = sequences[:n_outputs] if loop.return_sequences else last
    return outputs, sequences[n_outputs:], final_states

  def _result_groups(self):
    return [self._row_specs, self._loop.flat_init, self._last]

  def _forward(self, plan, x, init, reset_to, time):
    """Runs every segment, keeping only the carries between them.

    Returns:
      `(result, saved)`: `result` is `[sequences, final_states, last]`;
      `saved` holds each segment's starting carry and written variables.
    """
    carry = (list(init), list(self._last))
    row_tas = [plan.array(s.dtype, s.shape, plan.n_full)
               for s in self._row_specs]
    carry_tas = [_array(c, plan.n_full) for c in tf.nest.flatten(carry)]
    snapshot_tas = [_array(v, plan.n_full) for v in self._written]

    def segment(j, n, carry):
      # The carry and the written variables' values before the segment.
      snapshot = self._snapshot(carry)
      with tf.control_dependencies(snapshot):
        rows, states, last = self._loop.run_segment(
            self._call, n, [self._inputs.rows(v, j * plan.k, n) for v in x],
            self._controls_at(plan, j, n), *carry, reset_to, self._unroll)
      return rows, (states, last), snapshot

    def body(j, row_tas, carry_tas, snapshot_tas, carry):
      n = plan.size(j)
      carry_tas = [ta.write(j, c) for ta, c in
                   zip(carry_tas, tf.nest.flatten(carry))]
      rows, carry, snapshot = segment(j, n, carry)
      snapshot_tas = [ta.write(j, s) for ta, s in zip(snapshot_tas, snapshot)]
      row_tas = [ta.write(j, _pad_rows(r, plan.k - n, plan.static_k))
                 for ta, r in zip(row_tas, rows)]
      return j + 1, row_tas, carry_tas, snapshot_tas, carry

    _, row_tas, carry_tas, snapshot_tas, carry = tf.while_loop(
        lambda j, *_: j < plan.n_full, body,
        (0, row_tas, carry_tas, snapshot_tas, carry),
        maximum_iterations=plan.n_full, **self._loop.while_kwargs)
    saved = dict(carries=carry_tas, snapshots=snapshot_tas)
    pieces = [[self._stack(ta, s, plan.n_full)
               for ta, s in zip(row_tas, self._row_specs)]]
    if plan.remainder:
      saved["last_carry"] = tf.nest.flatten(carry)
      rows, carry, saved["last_snapshot"] = segment(
          plan.n_full, plan.remainder, carry)
      pieces.append(rows)
    rows = [tf.concat(p, 0) if len(p) > 1 else p[0] for p in zip(*pieces)]
    sequences = [_fit_time(r, s, time) for r, s in zip(rows, self._row_specs)]
    states, last = carry
    return [sequences, states, last], saved

  def _backward(self, plan, x, reset_to, saved, time, d_result, variables):
    """Backpropagates `d_result` through the segments, last to first.

    Returns:
      `(input_grads, variable_grads)` as `tf.custom_gradient` expects.
    """
    d_sequences, d_states, d_last = d_result
    d_states = _zeros_for_none(d_states, self._loop.flat_init)
    d_last = _zeros_for_none(d_last, self._last)
    # What the forward pass left in the written variables; put back at the end.
    now = [tf.identity(v.read_value()) for v in self._written]
    dx_tas = [plan.array(v.dtype, s.shape, plan.n_segments)
              for v, s in zip(x, self._inputs.step_specs) if _is_float(v)]
    sums = ([tf.zeros_like(r) for r in reset_to] +
            [tf.zeros_like(v) for v in variables])

    def segment(j, n, carry, snapshot, after, d_carry, sums, dx_tas):
      rows = lambda d, spec: (tf.zeros(tf.concat([[n, self._batch],
                                                  spec.shape[1:]], 0),
                                       spec.dtype)
                              if d is None else _time_slice(d, j * plan.k, n))
      d_rows = [rows(d, s) for d, s in zip(d_sequences, self._row_specs)]
      x_rows = [self._inputs.rows(v, j * plan.k, n) for v in x]
      d_carry, dx, d_sums, done = self._segment_grads(
          n, self._controls_at(plan, j, n), carry, x_rows, reset_to,
          snapshot, d_rows, d_carry, variables, after)
      sums = [a + b for a, b in zip(sums, d_sums)]
      dx_tas = [ta.write(j, _pad_rows(d, plan.k - n, plan.static_k))
                for ta, d in zip(dx_tas, dx)]
      return d_carry, sums, dx_tas, done

    # Segment j is recomputed once segment j + 1 has been (`done`) and the
    # gradients of segment j + 2 are through (`d_older`): one segment's
    # recomputation overlaps the previous one's backpropagation, and no more
    # than two segments' activations are alive. The loop's parallel
    # iterations would otherwise recompute up to ten segments ahead.
    d_carry = list(d_states) + list(d_last)
    done = list(d_states) + now
    if plan.remainder:
      d_carry, sums, dx_tas, done = segment(
          plan.n_full, plan.remainder, saved["last_carry"],
          saved["last_snapshot"], done, d_carry, sums, dx_tas)

    def body(i, d_carry, d_older, done, sums, dx_tas):
      j = plan.n_full - 1 - i
      read = lambda tas: [ta.read(j) for ta in tas]
      new_d_carry, sums, dx_tas, done = segment(
          j, plan.size(j), read(saved["carries"]), read(saved["snapshots"]),
          done + d_older, d_carry, sums, dx_tas)
      return i + 1, new_d_carry, d_carry, done, sums, dx_tas

    _, d_carry, _, done, sums, dx_tas = tf.while_loop(
        lambda i, *_: i < plan.n_full, body,
        (0, d_carry, d_carry, done, sums, dx_tas),
        maximum_iterations=plan.n_full, **self._loop.while_kwargs)
    with tf.control_dependencies(d_carry + sums + done):
      restore = [v.assign(c) for v, c in zip(self._written, now)]
    with tf.control_dependencies(restore):
      d_carry = [tf.identity(d) for d in d_carry]
    dx_tas = iter(dx_tas)
    dx = [self._input_grad(next(dx_tas), v, plan, time)
          if _is_float(v) else None for v in x]
    d_init = d_carry[:len(self._loop.flat_init)]
    d_reset = sums[:len(reset_to)]
    return dx + d_init + d_reset, sums[len(reset_to):]

  def _input_grad(self, ta, x, plan, time):
    """One input's gradient, in its layout, from its per-segment array."""
    spec = tf.TensorSpec(ta.element_shape[1:], x.dtype)  # [batch, ...]
    rows = _fit_time(self._stack(ta, spec, plan.n_segments), spec, time)
    return self._inputs.layout(rows)

  def _stack(self, ta, spec, size):
    """`[size * k, batch, ...]` rows from an array of `size` segments."""
    stacked = lambda: _loop.merge_leading_dims(ta.stack())
    if isinstance(size, int):
      return stacked() if size else _no_rows(spec, self._batch)
    return tf.cond(size > 0, stacked, lambda: _no_rows(spec, self._batch))

  def _controls_at(self, plan, j, n):
    return {name: _time_slice(v, j * plan.k, n)
            for name, v in self._controls.items()}

  def _snapshot(self, anchors):
    """The written variables' values, read after `anchors` are computed."""
    with tf.control_dependencies(tf.nest.flatten(anchors)):
      return [tf.identity(v.read_value()) for v in self._written]

  def _segment_grads(self, n, controls, carry, x, reset_to, snapshot, d_rows,
                     d_carry, variables, after):
    """Re-runs one segment from its saved carry and backpropagates through it.

    Args:
      n: The segment's number of steps.
      controls: Its mask and resets rows by name, `[n, batch]`.
      carry: Flat states and last output before the segment.
      x: Its input rows, time-major `[n, batch, ...]`.
      reset_to: The flat reset target.
      snapshot: The written variables' values before the segment.
      d_rows: Gradients of its rows of every returned sequence.
      d_carry: Gradients of the flat states and last output after it.
      variables: Variables to differentiate.
      after: Tensors the recomputation waits for.

    Returns:
      `(d_carry, dx, d_sums, done)`: gradients of the carry before the
      segment, of the float inputs' rows, and of `reset_to` followed by
      `variables`; `done`, the recomputed states and written variables,
      computed once the recomputation is complete.
    """
    # Rewind the written variables once the later segment's recomputation is
    # done with them.
    with tf.control_dependencies(after):
      rewind = [v.assign(s) for v, s in zip(self._written, snapshot)]
    with tf.control_dependencies(list(after) + rewind):
      carry = [tf.identity(c) for c in carry]
      x = [tf.identity(v) for v in x]
      reset_to = [tf.identity(r) for r in reset_to]
    n_states = len(self._loop.flat_init)
    float_x = [v for v in x if _is_float(v)]
    # The weights, read once for the segment (as the plain engine does for
    # the run): XLA would otherwise stack a copy of each per step.
    scope, reads = _fastpath.read_once(self._loop.step.trainable_variables)
    sources = carry + float_x + reset_to + [reads.get(id(v), v)
                                            for v in variables]
    with tf.GradientTape(watch_accessed_variables=False) as tape:
      tape.watch(sources)
      with scope:
        rows, states, last = self._loop.run_segment(
            self._call, n, x, controls, carry[:n_states], carry[n_states:],
            reset_to, self._unroll)
    # Read after the step's own writes: the next (earlier) segment rewinds
    # only then.
    done = [tf.identity(s) for s in states] + self._snapshot(states)
    grads = tape.gradient(
        rows + states + last, sources,
        output_gradients=d_rows + list(d_carry),
        unconnected_gradients=tf.UnconnectedGradients.ZERO)
    n_carry = len(carry)
    return (grads[:n_carry], grads[n_carry:n_carry + len(float_x)],
            grads[n_carry + len(float_x):], done)


class _Plan:
  """How `n_steps` steps split into segments of `k`.

  With static sizes (XLA needs them) there are `n_full` segments of `k`
  steps, run in a loop, then one of `remainder` steps after it; otherwise
  `n_full` segments in the loop, the last of which may be shorter.
  """

  def __init__(self, n_steps, k):
    self.n_steps, self.k = n_steps, k
    self.static = isinstance(k, int) and isinstance(n_steps, int)
    if self.static:
      self.n_full, self.remainder = divmod(n_steps, k)
    else:
      self.n_full, self.remainder = (n_steps + k - 1) // k, 0
    self.n_segments = self.n_full + (1 if self.remainder else 0)
    self.static_k = k if isinstance(k, int) else None

  def size(self, j):
    """Steps in full-loop segment `j`: `k`, or fewer for the last one of a
    dynamic run."""
    if self.static:
      return self.k
    return tf.minimum(self.k, self.n_steps - j * self.k)

  def array(self, dtype: tf.DType, step_shape: tf.TensorShape,
            size) -> tf.TensorArray:
    """An array of `size` segments, each `[k, *step_shape]`."""
    return tf.TensorArray(dtype, size=size, element_shape=tf.TensorShape(
        [self.static_k]).concatenate(step_shape))


def _time_slice(x: tf.Tensor, start, n, axis: int = 0) -> tf.Tensor:
  """Steps `start .. start + n` of `x` along its time `axis`.

  A `tf.slice` whose size is spelled out (static where the shape is): with
  static sizes XLA compiles it to one dynamic slice. A size of `-1` would
  depend on the run-time `start`, and XLA would first pad `x` by its own
  size in every dimension (a copy 2 ** rank times `x`).
  """
  begin = [0] * x.shape.rank
  begin[axis] = start
  size = [_loop.size(x, i) for i in range(x.shape.rank)]
  size[axis] = n
  return tf.slice(x, tf.stack(begin), tf.stack(size))


def _array(value: tf.Tensor, size) -> tf.TensorArray:
  return tf.TensorArray(value.dtype, size=size, element_shape=value.shape)


def _zeros_for_none(grads, like: list[tf.Tensor]) -> list[tf.Tensor]:
  return [tf.zeros_like(v) if g is None else g for g, v in zip(grads, like)]


def _is_float(value) -> bool:
  return value.dtype.is_floating or value.dtype.is_complex


def _split(flat: list, groups: list[list]) -> list[list]:
  """`flat` cut into consecutive lists as long as those of `groups`."""
  out, start = [], 0
  for group in groups:
    out.append(list(flat[start:start + len(group)]))
    start += len(group)
  return out


def _step_variables(loop: _loop.Loop, call,
                    x_specs: list[tf.TensorSpec]
                    ) -> tuple[list[tf.Variable], list[tf.Variable]]:
  """The variables one step reads and those it writes, found by tracing it.

  Returns:
    `(read, written)`: every variable the step uses, and those it assigns.

  Raises:
    ValueError: If the step draws random numbers from a stateful op that
      keeps its state outside any variable.
  """
  x_spec = tf.nest.pack_sequence_as(loop.x_structure, x_specs)
  state_spec = tf.nest.map_structure(
      lambda s: tf.TensorSpec(s.shape, s.dtype), loop.states)
  concrete = tf.function(
      lambda x, s: call(x, s, loop.training),
      autograph=False).get_concrete_function(x_spec, state_spec)
  by_handle = {id(v.handle): v for v in concrete.variables}
  by_placeholder = {id(internal): by_handle[id(external)]
                    for external, internal in concrete.graph.captures
                    if id(external) in by_handle}
  written = {}
  for op in concrete.graph.get_operations():
    if op.type in _UNREPLAYABLE_OPS:
      raise ValueError(
          f"remat cannot replay the stateful random op {op.name!r} "
          f"({op.type}) in {loop.step.name}: its recomputation would draw "
          "different numbers. Draw randomness from a variable-backed "
          "generator (keras.random with a SeedGenerator, as Keras dropout "
          "does, or tf.random.Generator), or pass remat=None.")
    if op.type not in _READ_ONLY_OPS:
      for handle in op.inputs:
        variable = by_placeholder.get(id(handle))
        if variable is not None:
          written[id(variable)] = variable
  return list(concrete.variables), list(written.values())


def _pad_rows(rows: tf.Tensor, extra, static_rows: int | None) -> tf.Tensor:
  """`rows` `[n, ...]` followed by `extra` rows of zeros."""
  if not isinstance(extra, int) or extra:
    rows = tf.pad(rows, [[0, extra]] + [[0, 0]] * (rows.shape.rank - 1))
  rows.set_shape(tf.TensorShape([static_rows]).concatenate(rows.shape[1:]))
  return rows


def _no_rows(spec, batch: tf.Tensor) -> tf.Tensor:
  return tf.zeros(tf.concat([[0, batch], spec.shape[1:]], 0), spec.dtype)


def _fit_time(rows: tf.Tensor, spec, time: _loop.Dim) -> tf.Tensor:
  """Rows `[m, batch, ...]`, zero after the last step, as `[time, ...]`."""
  if rows.shape[0] is None or rows.shape[0] != time.static:
    pad = tf.maximum(time.value - tf.shape(rows)[0], 0)
    rows = tf.pad(rows, [[0, pad]] + [[0, 0]] * spec.shape.rank)
    rows = rows[:time.value]
  rows.set_shape(tf.TensorShape([time.static]).concatenate(spec.shape))
  return rows
