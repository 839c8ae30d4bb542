"""Memory-efficient backpropagation through time: checkpointed segments.

Backpropagating through the engine's `tf.while_loop` keeps every step's
activations, so memory grows linearly with the number of steps `T`. With
`model_rnn(..., remat=k)` the loop runs over segments of `k` steps instead
(Gruslys et al., "Memory-Efficient Backpropagation Through Time", 2016; what
`jax.checkpoint` around a scan body does). Each segment is one
`tf.custom_gradient` function: its forward pass keeps only its input carry
(the states at every k-th step) and drops the activations inside; its
backward pass re-runs the segment from the saved carry under a fresh
`tf.GradientTape` and backpropagates the incoming gradients through it. Peak
memory goes from `T` steps' activations to `T / k` carries plus `k` steps'
activations (`k ~ sqrt(T)` minimises the sum) for one extra forward pass.

The per-step logic (masks, resets, sequence lengths, output selection) is the
engine's own `_Loop._one_step`, so the gradients are those of the plain
engine: same operations, same order.

Replay: variables the step writes (the `SeedGenerator` state behind Keras
dropout, a `tf.random.Generator`, batch-norm moving statistics) are rewound
to their segment-start values before a segment is recomputed and put back
afterwards, so the recomputation draws the same dropout masks and leaves the
variables as the forward pass left them. Stateful random ops without a
variable (`tf.random.uniform`) cannot be replayed and are refused.
"""

import contextlib
import copy
import math
from typing import Any

import numpy as np
import tensorflow as tf

from stepper import engine

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


def run(loop: "engine._Loop", flat_x: list[tf.Tensor],
        n_steps: int | tf.Tensor, time: "engine._Dim", unroll: int,
        remat: int | str) -> tuple[Nest, Nest, Nest | None]:
  """`loop.run`, with each segment of steps recomputed in the backward pass.

  Args:
    loop: The engine's loop, configured for the whole run.
    flat_x: Flat inputs, each time-major `[time, batch, ...]`.
    n_steps: Steps to run (`max(sequence_length)` with sequence lengths).
    time: The time dimension of `flat_x`.
    unroll: Steps per iteration of the loop inside each segment.
    remat: Steps per segment, or "sqrt" (see `segment_length`).

  Returns:
    `(outputs, final_states, all_states)` exactly as `loop.run` returns them.
  """
  batch = tf.shape(flat_x[0])[1]
  call = loop._step.start(batch, loop._training)
  controls = {name: value for name, value in (("mask", loop._controls.mask),
                                               ("resets", loop._controls.resets))
              if value is not None}
  if loop._reverse:  # Run the reversed sequence forward; reverse back below.
    flat_x = [tf.reverse(x, [0]) for x in flat_x]
    controls = {name: tf.reverse(v, [0]) for name, v in controls.items()}
  segments = _Segments(loop, call, unroll, flat_x, controls)
  outputs, all_states, final_states = segments.run(
      flat_x, controls, n_steps, segment_length(remat, n_steps), time)
  if loop._reverse:
    outputs = [tf.reverse(y, [0]) for y in outputs]
    all_states = [tf.reverse(s, [0]) for s in all_states]
  pack = tf.nest.pack_sequence_as
  return (pack(loop._y_spec, outputs), pack(loop._states, final_states),
          pack(loop._states, all_states) if all_states else None)


class _Segments:
  """The engine's loop run as checkpointed segments of steps."""

  def __init__(self, loop: "engine._Loop", call, unroll: int,
               flat_x: list[tf.Tensor], controls: dict[str, tf.Tensor]):
    self._loop = loop
    self._call = call
    self._unroll = unroll
    self._flat_y_spec = tf.nest.flatten(loop._y_spec)
    self._variables, self._written = _step_variables(loop, call, flat_x)
    self._resets = "resets" in controls
    # Specs of the rows of every returned sequence: outputs, then states.
    self._row_specs = ((self._flat_y_spec if loop._return_sequences else []) +
                       (loop._flat_init if loop._return_all_states else []))

  def run(self, flat_x, controls, n_steps, k, time):
    """Runs `n_steps` steps in segments of `k`.

    Returns:
      Flat `(outputs, all_states, final_states)`: sequences `[time, batch,
      ...]` (`outputs` is the last output without `return_sequences`).
    """
    loop = self._loop
    batch = tf.shape(flat_x[0])[1]
    # Inputs as segments of k rows: a TensorArray read's gradient is one
    # write (a gather's is a scatter, which XLA lacks).
    x_segments = [_segments_of(x, k, time.value) for x in flat_x]
    control_segments = {name: _segments_of(v, k, time.value)
                        for name, v in controls.items()}
    last = ([engine._zeros(s, batch) for s in self._flat_y_spec]
            if loop._carry_last else [])

    def segment(j, n, carry):
      cut = lambda ta: ta.read(j) if n is k else ta.read(j)[:n]
      # The backward pass reads the segment's inputs again: the inputs stay
      # in their TensorArray instead of being kept once more per segment.
      read = lambda: ([cut(ta) for ta in x_segments],
                      {name: cut(ta) for name, ta in control_segments.items()})
      ys, all_states, flat_states, last = self._segment(n, read, *carry)
      return ys + all_states, (flat_states, last)

    static = isinstance(k, int) and isinstance(n_steps, int)
    if static:  # Static shapes (XLA needs them): full segments, then the rest.
      n_full, remainder = divmod(n_steps, k)
    else:  # The last segment may be shorter; it is padded to k rows.
      n_full, remainder = (n_steps + k - 1) // k, 0
    carry = (list(loop._flat_init), last)
    pieces = []
    if not isinstance(n_full, int) or n_full > 0:
      rows, carry = self._full_segments(segment, n_full, k, n_steps, batch,
                                        carry)
      pieces.append(rows)
    if remainder:
      rows, carry = segment(n_full, remainder, carry)
      pieces.append(rows)
    final_states, last = carry
    if pieces:
      rows = [tf.concat(p, 0) if len(p) > 1 else p[0] for p in zip(*pieces)]
    else:
      rows = [_no_rows(s, batch) for s in self._row_specs]
    sequences = [_fit_time(r, s, time) for r, s in zip(rows, self._row_specs)]
    n_outputs = len(self._flat_y_spec) if loop._return_sequences else 0
    outputs = sequences[:n_outputs] if loop._return_sequences else last
    return outputs, sequences[n_outputs:], final_states

  def _full_segments(self, segment, n_full, k, n_steps, batch, carry):
    """`n_full` segments of `k` steps (the last one may be shorter) in a loop.

    Returns:
      `(rows, carry)`: every sequence's rows, `[n_full * k, batch, ...]`,
      zero after `n_steps`.
    """
    static_k = k if isinstance(k, int) else None

    def body(j, tas, carry):
      n = k if isinstance(n_steps, int) else tf.minimum(k, n_steps - j * k)
      rows, carry = segment(j, n, carry)
      rows = [_pad_rows(r, k - n, static_k) for r in rows]
      return j + 1, [ta.write(j, r) for ta, r in zip(tas, rows)], carry

    tas = [tf.TensorArray(s.dtype, size=n_full, element_shape=tf.TensorShape(
        [static_k]).concatenate(s.shape)) for s in self._row_specs]
    _, tas, carry = tf.while_loop(
        lambda j, *_: j < n_full, body, (0, tas, carry),
        maximum_iterations=n_full, **self._loop._loop_kwargs)

    def merge(ta, spec):
      stacked = lambda: _merge_leading(ta.stack())
      if isinstance(n_full, int):
        return stacked()
      return tf.cond(n_full > 0, stacked, lambda: _no_rows(spec, batch))

    return [merge(ta, s) for ta, s in zip(tas, self._row_specs)], carry

  def _segment(self, n, read, flat_states, last):
    """`n >= 1` steps from `(flat_states, last)`, recomputed for gradients.

    Args:
      n: Number of steps (an int, or an int32 scalar tensor).
      read: Returns the segment's flat inputs, each `[n, batch, ...]`, and
        its bool `[n, batch]` mask and resets by name.
      flat_states: Flat states before the segment, each `[batch, ...]`.
      last: The carried last output (empty unless the loop carries it).

    Returns:
      Flat `(outputs [n, ...], all_states [n, ...], states, last)`.
    """
    # The reset target is an input too: gradients flow to it through resets.
    reset_to = list(self._loop._flat_reset) if self._resets else []
    x, controls = read()
    groups = [list(flat_states), list(last), list(x), reset_to]
    # The values the step's written variables had when the segment started.
    snapshot = [tf.identity(v.read_value()) for v in self._written]
    # The variables' handles as this (forward) graph sees them; see
    # `_handles_from`. Eager execution needs no such detour.
    handles = ([] if tf.executing_eagerly() else
               [tf.identity(v.handle) for v in self._variables])

    @tf.custom_gradient
    def segment(*flat_args):
      with tf.control_dependencies(snapshot):
        result = self._steps(n, controls, *_split(flat_args, groups))

      def grad_fn(*d_result, variables=None):
        x, controls = read()
        args = _split(flat_args, groups)
        args[2] = x
        with _handles_from(self._variables, handles):
          return self._backward(n, controls, tf.nest.flatten(args), groups,
                                snapshot, d_result, variables or [])

      return tf.nest.flatten(result), grad_fn

    flat_result = segment(*tf.nest.flatten(groups))
    ys, all_states, flat_states, last = tf.nest.pack_sequence_as(
        self._result_structure(), flat_result)
    for new, old in zip(flat_states, groups[0]):
      new.set_shape(old.shape)  # Keeps the outer loop's shape invariants.
    return ys, all_states, flat_states, last

  def _result_structure(self):
    loop = self._loop
    return ([0] * (len(self._flat_y_spec) if loop._return_sequences else 0),
            [0] * (len(loop._flat_init) if loop._return_all_states else 0),
            [0] * len(loop._flat_init),
            [0] * (len(self._flat_y_spec) if loop._carry_last else 0))

  def _steps(self, n, controls, flat_states, last, x, reset_to):
    """The engine's loop body over one segment; no checkpointing inside."""
    seg = copy.copy(self._loop)
    # The segment's own inputs, indexed from 0; the run's per-step function.
    seg._call, seg._time, seg._reverse = self._call, n, False
    seg._flat_reset = reset_to or self._loop._flat_reset
    seg._input_tas = [_unstack(v, n) for v in x]
    seg._control_tas = {name: _unstack(v, n) for name, v in controls.items()}
    new_tas = lambda specs: [
        tf.TensorArray(s.dtype, size=n, element_shape=s.shape) for s in specs]
    carry = (new_tas(self._flat_y_spec) if seg._return_sequences else [],
             new_tas(self._loop._flat_init) if seg._return_all_states else [],
             list(flat_states), list(last))
    t = 0
    if self._unroll > 1:
      t, carry = seg._while(0, n // self._unroll * self._unroll, self._unroll,
                            carry, maximum_iterations=n // self._unroll)
    _, carry = seg._while(t, n, 1, carry, maximum_iterations=(
        n if self._unroll == 1 else self._unroll - 1))
    out_tas, state_tas, flat_states, last = carry
    return ([ta.stack() for ta in out_tas], [ta.stack() for ta in state_tas],
            flat_states, last)

  def _backward(self, n, controls, flat_args, groups, snapshot, d_result,
                variables):
    """Recomputes the segment from its inputs and backpropagates `d_result`.

    Returns:
      `(input_grads, variable_grads)` as `tf.custom_gradient` expects.
    """
    now = [tf.identity(v.read_value()) for v in self._written]
    with tf.control_dependencies(now):
      rewind = [v.assign(s) for v, s in zip(self._written, snapshot)]
    with tf.control_dependencies(rewind):
      inputs = [tf.identity(a) for a in flat_args]
    sources = [s for s in inputs + list(variables) if _is_float(s)]
    with tf.GradientTape(watch_accessed_variables=False) as tape:
      tape.watch(sources)
      result = tf.nest.flatten(
          self._steps(n, controls, *_split(inputs, groups)))
    targets, d_targets = [], []
    for r, d in zip(result, d_result):
      if _is_float(r):
        targets.append(r)
        # A None output gradient would mean "ones" to the tape.
        d_targets.append(tf.zeros_like(r) if d is None else d)
    grads = iter(tape.gradient(
        targets, sources, output_gradients=d_targets,
        unconnected_gradients=tf.UnconnectedGradients.ZERO))
    grads = [next(grads) if _is_float(s) else None
             for s in inputs + list(variables)]
    with tf.control_dependencies([g for g in grads if g is not None]):
      restore = [v.assign(c) for v, c in zip(self._written, now)]
    with tf.control_dependencies(restore):
      grads = [None if g is None else tf.identity(g) for g in grads]
    return grads[:len(inputs)], grads[len(inputs):]


def _is_float(value) -> bool:
  return value.dtype.is_floating or value.dtype.is_complex


def _segments_of(x: tf.Tensor, k, time) -> tf.TensorArray:
  """Time-major `x` zero-padded to whole segments, one `[k, ...]` each."""
  n_segments = (time + k - 1) // k
  padded = tf.pad(x, [[0, n_segments * k - time]] +
                  [[0, 0]] * (x.shape.rank - 1))
  segments = tf.reshape(padded, tf.concat(
      [[n_segments, k], tf.shape(x)[1:]], 0))
  return tf.TensorArray(
      x.dtype, size=n_segments, clear_after_read=False,  # Read twice.
      element_shape=(tf.TensorShape([k if isinstance(k, int) else None])
                     .concatenate(x.shape[1:]))).unstack(segments)


def _unstack(x: tf.Tensor, size) -> tf.TensorArray:
  return tf.TensorArray(x.dtype, size=size,
                        element_shape=x.shape[1:]).unstack(x)


def _split(flat: list, groups: list[list]) -> list[list]:
  """`flat` cut into consecutive lists as long as those of `groups`."""
  out, start = [], 0
  for group in groups:
    out.append(list(flat[start:start + len(group)]))
    start += len(group)
  return out


def _step_variables(loop: "engine._Loop", call, flat_x: list[tf.Tensor]
                    ) -> tuple[list[tf.Variable], list[tf.Variable]]:
  """The variables one step reads and those it writes, found by tracing it.

  Returns:
    `(read, written)`: every variable the step uses, and those it assigns.

  Raises:
    ValueError: If the step draws random numbers from a stateful op that
      keeps its state outside any variable.
  """
  x_spec = tf.nest.pack_sequence_as(
      loop._x_structure,
      [tf.TensorSpec(x.shape[1:], x.dtype) for x in flat_x])
  state_spec = tf.nest.map_structure(
      lambda s: tf.TensorSpec(s.shape, s.dtype), loop._states)
  concrete = tf.function(
      lambda x, s: call(x, s, loop._training),
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
          f"({op.type}) in {loop._step.name}: its recomputation would draw "
          "different numbers. Draw randomness from a variable-backed "
          "generator (keras.random with a SeedGenerator, as Keras dropout "
          "does, or tf.random.Generator), or pass remat=None.")
    if op.type not in _READ_ONLY_OPS:
      for handle in op.inputs:
        variable = by_placeholder.get(id(handle))
        if variable is not None:
          written[id(variable)] = variable
  return list(concrete.variables), list(written.values())


@contextlib.contextmanager
def _handles_from(variables: list[tf.Variable], handles: list[tf.Tensor]):
  """Reads and writes `variables` through forward-graph `handles` meanwhile.

  A gradient function inside a `tf.while_loop` cannot capture a variable's
  eager handle: while_v2 only resolves captures that come from the forward
  loop body ("... is in list of internal_captures but not in
  internal_capture_to_output", also why `tf.recompute_grad` fails in graph
  loops). So while a segment is recomputed, each variable uses the handle
  its forward body captured. A private attribute of TensorFlow's resource
  variables; restored on exit.
  """
  if not handles:
    yield
    return
  saved = [v._handle for v in variables]
  for variable, handle in zip(variables, handles):
    # An identity in the current (gradient) graph: what the tape watches is
    # what the ops read.
    variable._handle = tf.identity(handle)
  try:
    yield
  finally:
    for variable, handle in zip(variables, saved):
      variable._handle = handle


def _pad_rows(rows: tf.Tensor, extra, static_rows: int | None) -> tf.Tensor:
  """`rows` `[n, ...]` followed by `extra` rows of zeros."""
  if not isinstance(extra, int) or extra:
    rows = tf.pad(rows, [[0, extra]] + [[0, 0]] * (rows.shape.rank - 1))
  rows.set_shape(tf.TensorShape([static_rows]).concatenate(rows.shape[1:]))
  return rows


def _merge_leading(x: tf.Tensor) -> tf.Tensor:
  """`[a, b, ...]` -> `[a * b, ...]`."""
  return tf.reshape(x, tf.concat([[-1], tf.shape(x)[2:]], 0))


def _no_rows(spec, batch: tf.Tensor) -> tf.Tensor:
  return tf.zeros(tf.concat([[0, batch], spec.shape[1:]], 0), spec.dtype)


def _fit_time(rows: tf.Tensor, spec, time: "engine._Dim") -> tf.Tensor:
  """Rows `[m, batch, ...]`, zero after the last step, as `[time, ...]`."""
  if rows.shape[0] is None or rows.shape[0] != time.static:
    pad = tf.maximum(time.value - tf.shape(rows)[0], 0)
    rows = tf.pad(rows, [[0, pad]] + [[0, 0]] * spec.shape.rank)
    rows = rows[:time.value]
  rows.set_shape(tf.TensorShape([time.static]).concatenate(spec.shape))
  return rows
