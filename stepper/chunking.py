"""Carrying state across chunks of a long sequence: keep or cut the gradient.

Keras `stateful=True` layers keep their state in variables, so a
`tf.GradientTape` around two chunks silently loses the gradient across the
boundary. Here the choice is explicit:

* `run_chunks(..., gradient="through")`: the chunks run one after another in
  one `tf.while_loop`, carrying the state as a tensor; outputs, final states
  and every gradient equal one full-sequence `model_rnn` call.
* `run_chunks(..., gradient="truncate")`: the state passed between chunks goes
  through `tf.stop_gradient` (truncated BPTT with window `chunk_size`)::

      chunk 0        chunk 1        chunk 2
      x0 x1 x2  |s|  x3 x4 x5  |s|  x6 x7
      <--grad--  X   <--grad--  X   <--grad-    X: stop_gradient on the state

* `StatefulRunner`: the state lives in non-trainable variables between
  calls (a stream longer than one batch); saved by `tf.train.Checkpoint`.
  No gradient crosses calls.

`stepper.tbptt` builds Williams & Peng's BPTT(k2; k1) on the same pieces.
"""

from typing import Any

import tensorflow as tf

from stepper import _checks
from stepper import _inputs
from stepper import _loop
from stepper import engine
from stepper import masking
from stepper import remat as remat_lib
from stepper import steps as steps_lib

Nest = Any

_GRADIENTS = ("through", "truncate")


@_loop.unconverted
def run_chunks(
    step: Any,
    inputs: Nest,
    chunk_size: int,
    initial_states: Nest | None = None,
    *,
    gradient: str = "through",
    training: bool | tf.Tensor | None = None,
    mask: tf.Tensor | None = None,
    sequence_length: tf.Tensor | None = None,
    zero_output_for_mask: bool = False,
    resets: tf.Tensor | None = None,
    time_major: bool = False,
    unroll: int = 1,
    swap_memory: bool = False,
    remat: int | str | None = None,
    hoist: bool = False,
) -> tuple[Nest, Nest]:
  """Runs `step` over `inputs` chunk by chunk, carrying the state.

  The time axis is split into chunks of `chunk_size` steps (the last may be
  shorter); each chunk is one `model_rnn` run started from the previous
  chunk's final state. The full chunks run inside one `tf.while_loop` and
  a shorter last chunk after it, so under `tf.function` a dynamic `time`
  does not retrace per number of chunks.

  >>> cell = keras.layers.GRUCell(8)
  >>> x = tf.random.normal([4, 20, 3])
  >>> with tf.GradientTape() as tape:
  ...   y, states = stepper.run_chunks(cell, x, 6, gradient="truncate")
  ...   loss = tf.reduce_mean(y ** 2)
  >>> grads = tape.gradient(loss, cell.trainable_variables)  # TBPTT, k = 6

  Masking semantics are those of one full run: `mask` carries states and the
  previous output forward across chunk boundaries; `sequence_length` is cut
  into per-chunk lengths; `resets` set a row back to `initial_states` (not
  to the chunk's starting state).

  Under XLA (`jit_compile=True`) `time` must be static.

  Args:
    step: A Keras step model, a Keras RNN cell or a callable (see
      `stepper.steps`).
    inputs: Tensor or nest, each leaf `[batch, time, ...]` (`[time, batch,
      ...]` with `time_major=True`).
    chunk_size: Steps per chunk, a positive int.
    initial_states: Nest like the step's states, each `[batch, ...]`.
      Defaults to the step's initial (zero) state.
    gradient: `"through"`: gradients flow across chunk boundaries, exactly as
      in one full run. `"truncate"`: the state entering chunks 1, 2, ... is a
      constant (`tf.stop_gradient`); chunk 0 still reaches `initial_states`.
    training: Passed to the step at every call.
    mask: bool `[batch, time]`, as in `model_rnn`.
    sequence_length: int `[batch]`, as in `model_rnn`. Exclusive with `mask`.
    zero_output_for_mask: Output zeros, not the previous output, where masked.
    resets: bool `[batch, time]`: where True, the row's state is set back to
      `initial_states` right before that step. No gradient crosses a reset.
    time_major: Whether `inputs`, `mask`, `resets` and the outputs are
      `[time, batch, ...]`.
    unroll: Passed to `model_rnn` for every chunk.
    swap_memory: Passed to `model_rnn` for every chunk.
    remat: Passed to `model_rnn` for every chunk: recompute each chunk's
      activations in segments in the backward pass (`stepper.remat`).
    hoist: Passed to `model_rnn` for every chunk: each chunk's input half
      is computed for its steps at once before its loop.

  Returns:
    `(outputs, final_states)` as from `model_rnn`: `outputs` nests like
    `y_t`, each leaf `[batch, time, ...]`; `final_states` like the states.

  Raises:
    ValueError: If `chunk_size` is not a positive int, `gradient` is unknown,
      or the inputs, states or masking arguments are malformed (as in
      `model_rnn`).
  """
  step = steps_lib.as_step(step)
  _checks.check_positive_int(chunk_size, "chunk_size")
  # Here, not only in `model_rnn`: no chunk runs on an empty sequence.
  _checks.check_positive_int(unroll, "unroll")
  remat_lib.check_remat(remat)
  _checks.check_bool(hoist, "hoist")
  if gradient not in _GRADIENTS:
    raise ValueError(f"`gradient` must be one of {_GRADIENTS}; got "
                     f"{gradient!r}.")
  flat_x, batch, time = _inputs.time_major_inputs(step, inputs, time_major)
  states = _inputs.initial_states(step, initial_states, batch)
  controls = masking.prepare(
      mask=mask, sequence_length=sequence_length, resets=resets,
      zero_output_for_mask=zero_output_for_mask, batch=batch.value,
      time=time.value, time_major=time_major)
  chunks = _Chunks(step, inputs, flat_x, states, controls, chunk_size,
                   time.value, cut=gradient == "truncate",
                   engine_kwargs=dict(training=training, unroll=unroll,
                                      swap_memory=swap_memory, remat=remat,
                                      hoist=hoist))
  outputs, final_states = chunks.run()
  if controls.mask is not None and not controls.zero_output:
    outputs = tf.nest.map_structure(
        lambda y: _carry_forward(y, controls.mask), outputs)
  sequence_shape = tf.TensorShape([time.static, batch.static])
  outputs = tf.nest.map_structure(
      lambda y: _finish(y, sequence_shape, time_major), outputs)
  return outputs, final_states


class _Chunks:
  """The chunks: a `tf.while_loop` over the full ones, then the remainder.

  The `time // chunk_size` full chunks are one `[chunks, chunk_size, ...]`
  fold of the inputs, read per iteration from a `tf.TensorArray` (static
  chunk shapes, so XLA compiles it); the `time % chunk_size` remaining steps
  run after the loop, the last chunk.
  """

  def __init__(self, step, inputs, flat_x, states, controls, chunk_size,
               time, *, cut, engine_kwargs):
    self._step = step
    self._x_structure = tf.nest.map_structure(lambda _: 0, inputs)
    self._flat_x = flat_x
    self._states = states
    self._controls = controls
    self._chunk_size = chunk_size
    self._time = time
    self._cut = cut
    self._engine_kwargs = engine_kwargs
    self._n_full = time // chunk_size
    self._folded_steps = self._n_full * chunk_size
    self._y_spec = _inputs.output_spec(
        step, tf.nest.pack_sequence_as(
            self._x_structure,
            [tf.TensorSpec(x.shape[1:], x.dtype) for x in flat_x]),
        states, engine_kwargs["training"])

  def run(self) -> tuple[Nest, Nest]:
    """Returns time-major `(outputs, final_states)`."""
    sequences = {"x": self._flat_x}
    sequences.update({name: [value] for name, value in
                      (("mask", self._controls.mask),
                       ("resets", self._controls.resets))
                      if value is not None})
    # Parts known statically to be empty are not built: no zero-step runs.
    parts, carried, final_states = [], self._states, self._states
    if not _is_zero(self._n_full):
      y_loop, carried, final_states = self._loop(sequences)
      parts.append(y_loop)
    remainder = self._time - self._folded_steps
    if not _is_zero(remainder):
      tail = {name: [v[self._folded_steps:] for v in values]
              for name, values in sequences.items()}
      y_tail, tail_final = self._chunk(carried, tail, self._folded_steps,
                                       remainder)
      parts.append(y_tail)
      # Without a remainder the last full chunk's states are final (not the
      # carried copy, cut under "truncate").
      final_states = tail_final if isinstance(remainder, int) else (
          tf.nest.map_structure(lambda a, b: tf.where(remainder > 0, a, b),
                                tail_final, final_states))
    flat_spec = tf.nest.flatten(self._y_spec)
    outputs = ([tf.concat(leaves, 0) for leaves in zip(*parts)] if parts
               else [self._empty(s) for s in flat_spec])
    return tf.nest.pack_sequence_as(self._y_spec, outputs), final_states

  def _loop(self, sequences: dict) -> tuple[list, Nest, Nest]:
    """The full chunks: flat outputs, the carried and the final states."""
    # TensorArray.read, not x[i]: a slice's gradient is input-sized at
    # every iteration; unstack's gradient is one stack.
    folded = {name: [self._unstack(self._fold(v)) for v in values]
              for name, values in sequences.items()}

    def body(i, carried, final, out_tas):
      del final  # Only the last chunk's final states are returned.
      read = {name: [ta.read(i) for ta in tas] for name, tas in folded.items()}
      y, new_states = self._chunk(carried, read, i * self._chunk_size,
                                  self._chunk_size)
      out_tas = [ta.write(i, y_) for ta, y_ in zip(out_tas, y)]
      return i + 1, self._next(new_states), new_states, out_tas

    flat_spec = tf.nest.flatten(self._y_spec)
    out_tas = [tf.TensorArray(s.dtype, size=self._n_full,
                              element_shape=tf.TensorShape(
                                  [self._chunk_size]).concatenate(s.shape))
               for s in flat_spec]
    _, carried, final_states, out_tas = tf.while_loop(
        lambda i, *_: i < self._n_full, body,
        (0, self._states, self._states, out_tas),
        maximum_iterations=self._n_full)
    return ([self._unfold(ta, s) for ta, s in zip(out_tas, flat_spec)],
            carried, final_states)

  def _next(self, states: Nest) -> Nest:
    """The state passed to the next chunk."""
    return tf.nest.map_structure(tf.stop_gradient, states) if self._cut else (
        states)

  def _chunk(self, states, sequences, start, size) -> tuple[list, Nest]:
    """One `model_rnn` run over a chunk; returns flat time-major outputs."""
    x = tf.nest.pack_sequence_as(self._x_structure, sequences["x"])
    controls = {name: values[0] for name, values in sequences.items()
                if name != "x"}
    if self._controls.lengths is not None:
      # dynamic_rnn semantics per chunk: lengths counted from the chunk start.
      controls = dict(sequence_length=tf.clip_by_value(
          self._controls.lengths - start, 0, size))
    elif "mask" in controls:
      # Carry-forward of outputs across chunks happens after the run.
      controls["zero_output_for_mask"] = True
    y, new_states = engine.model_rnn(
        self._step, x, states, time_major=True, _reset_to=self._states,
        **controls, **self._engine_kwargs)
    return tf.nest.flatten(y), new_states

  def _fold(self, x: tf.Tensor) -> tf.Tensor:
    """`[time, ...]` -> `[time // chunk_size, chunk_size, ...]`."""
    folded = tf.reshape(x[:self._folded_steps], tf.concat(
        [[self._n_full, self._chunk_size], tf.shape(x)[1:]], 0))
    folded.set_shape(tf.TensorShape(
        [self._n_full if isinstance(self._n_full, int) else None,
         self._chunk_size]).concatenate(x.shape[1:]))
    return folded

  def _unstack(self, folded: tf.Tensor) -> tf.TensorArray:
    return tf.TensorArray(folded.dtype, size=self._n_full,
                          element_shape=folded.shape[1:]).unstack(folded)

  def _empty(self, spec: tf.TensorSpec) -> tf.Tensor:
    batch = tf.shape(self._flat_x[0])[1]
    return tf.zeros(tf.concat([[0, batch], spec.shape[1:]], 0), spec.dtype)

  def _unfold(self, ta: tf.TensorArray, spec: tf.TensorSpec) -> tf.Tensor:
    """The loop's outputs `[n_full * chunk_size, batch, ...]`."""
    if isinstance(self._n_full, int):
      stacked = ta.stack()
    else:  # An empty stack needs a fully known element shape.
      stacked = tf.cond(self._n_full > 0, ta.stack,
                        lambda: self._empty(spec)[None])
    return tf.reshape(stacked, tf.concat(
        [[self._folded_steps], tf.shape(stacked)[2:]], 0))


def _is_zero(value: int | tf.Tensor) -> bool:
  """Whether `value` is statically known to be zero."""
  return isinstance(value, int) and value == 0


def _carry_forward(y: tf.Tensor, mask: tf.Tensor,
                   initial: tf.Tensor | None = None) -> tf.Tensor:
  """Keras carry-forward masking on time-major outputs that are zero where
  masked: each masked step repeats the row's last valid output (`initial`
  `[batch, ...]`, zeros by default, before the first), across chunk
  boundaries.

  A gather of the valid outputs, so gradients reach exactly the step whose
  output is repeated, as in the engine's carried output.
  """
  time = tf.shape(mask)[0]
  steps = tf.where(mask, tf.range(time)[:, None], -1)  # [time, batch]
  # An initializer: without one, `scan` reads step 0 of an empty sequence.
  last_valid = tf.scan(tf.maximum, steps,
                       initializer=tf.fill(tf.shape(mask)[1:], -1))
  swap = _loop.swap_batch_time
  picked = swap(tf.gather(swap(y), tf.transpose(tf.maximum(last_valid, 0)),
                          axis=1, batch_dims=1))
  seen = tf.reshape(last_valid >= 0, tf.concat(
      [tf.shape(last_valid), tf.ones([y.shape.rank - 2], tf.int32)], 0))
  before = tf.zeros_like(picked) if initial is None else tf.broadcast_to(
      initial, tf.shape(picked))
  return tf.where(seen, picked, before)


def _finish(y: tf.Tensor, sequence_shape: tf.TensorShape,
            time_major: bool) -> tf.Tensor:
  """Restores the static `[time, batch]` shape lost in the loop."""
  y.set_shape(sequence_shape.concatenate(y.shape[2:]))
  return y if time_major else _loop.swap_batch_time(y)


class StatefulRunner(tf.Module):
  """Runs a step chunk by chunk, keeping the state in variables between calls.

  For streams longer than one batch (Keras' cross-batch `stateful=True`): row
  `b` of every call continues row `b` of the previous call. The state is held
  in non-trainable variables `[batch_size, ...]`, so `tf.train.Checkpoint`
  saves and restores it; resuming from a checkpoint continues the stream
  bit for bit. Gradients flow within a call, never across calls (the state
  read at the start of a call is a constant): use `run_chunks` to keep them.

  >>> runner = stepper.StatefulRunner(keras.layers.GRUCell(8), batch_size=4)
  >>> for chunk in tf.split(tf.random.normal([4, 30, 3]), 3, axis=1):
  ...   y = runner(chunk, training=True)
  >>> runner.reset_states(where=tf.constant([True, False, False, False]))
  >>> import tempfile
  >>> path = tf.train.Checkpoint(runner=runner).save(tempfile.mkdtemp())
  """

  def __init__(self, step: Any, batch_size: int,
               initial_states: Nest | None = None, name: str | None = None):
    """Creates the state variables, set to `initial_states`.

    Args:
      step: A Keras step model, a Keras RNN cell or a callable (see
        `stepper.steps`).
      batch_size: Rows in every chunk (the number of parallel streams).
      initial_states: Nest like the step's states, each `[batch_size, ...]`:
        the start of every stream and what resets restore. Defaults to the
        step's initial (zero) state; required for a plain callable.
      name: Module name.

    Raises:
      ValueError: If `batch_size` is not a positive int or `initial_states`
        do not match the step's states.
    """
    super().__init__(name=name)
    self._step = steps_lib.as_step(step)
    self._batch_size = _checks.check_positive_int(batch_size, "batch_size")
    batch = _loop.Dim(batch_size, tf.constant(batch_size))
    initial = _inputs.initial_states(self._step, initial_states, batch)
    self._initial = tf.nest.map_structure(tf.convert_to_tensor, initial)
    self._state_variables = [
        tf.Variable(s, trainable=False, name=f"state_{i}")
        for i, s in enumerate(tf.nest.flatten(self._initial))]
    # Created at the first call, once the outputs' shapes are known.
    self._last_output_variables = None

  @property
  def batch_size(self) -> int:
    return self._batch_size

  @property
  def states(self) -> Nest:
    """The carried states, nested like the step's states, `[batch, ...]`."""
    return tf.nest.pack_sequence_as(
        self._initial, [v.value() for v in self._state_variables])

  @_loop.unconverted
  def __call__(self, chunk: Nest, training: bool | tf.Tensor | None = None,
               *, mask: tf.Tensor | None = None,
               resets: tf.Tensor | None = None) -> Nest:
    """Runs the step over `chunk` from the carried states; updates them.

    Args:
      chunk: Tensor or nest, each leaf `[batch_size, time, ...]`.
      training: Passed to the step at every call.
      mask: bool `[batch_size, time]`, Keras masking across calls, as in
        one `model_rnn(mask=...)` run over the whole stream: where False the
        step is skipped, the state carried unchanged and the output repeats
        the row's last valid output, from this or an earlier call (zeros
        before the first valid step). Keras' `stateful=True` layers restart
        that repetition from zeros at every call; here it continues. The
        last outputs are carried (in variables, so checkpointed) from the
        first call given a `mask`: pass one from a stream's first call
        (all True where nothing is masked).
      resets: bool `[batch_size, time]`: where True, the row's state is set
        back to the initial states right before that step.

    Returns:
      The outputs, nested like `y_t`, each leaf `[batch_size, time, ...]`.

    Raises:
      ValueError: If the chunk's batch size is not `batch_size`, or as in
        `model_rnn`.
    """
    chunk = self._check_batch(chunk)
    outputs, new_states = engine.model_rnn(
        self._step, chunk, self.states, training=training, mask=mask,
        zero_output_for_mask=True, resets=resets, _reset_to=self._initial)
    last = self._last_outputs(outputs, create=mask is not None)
    if mask is not None:
      swap = _loop.swap_batch_time
      time_major_mask = tf.transpose(tf.convert_to_tensor(mask))
      outputs = tf.nest.map_structure(
          lambda y, l: swap(_carry_forward(swap(y), time_major_mask,
                                           l.value())), outputs, last)
    for variable, value in zip(self._state_variables,
                               tf.nest.flatten(new_states)):
      variable.assign(value)
    if last is not None and tf.nest.flatten(outputs)[0].shape[1] != 0:
      for variable, y in zip(tf.nest.flatten(last), tf.nest.flatten(outputs)):
        variable.assign(y[:, -1])
    return outputs

  def _last_outputs(self, outputs: Nest, create: bool) -> Nest | None:
    """The variables holding each row's last valid output (for masking
    across calls); with `create`, made (zeros) if they do not exist yet.

    Created by the first masked call, not before: a runner never given a
    mask holds (and checkpoints) exactly the step's states.
    """
    if self._last_output_variables is None and create:
      with tf.init_scope():  # Outside any trace: created once.
        self._last_output_variables = [
            tf.Variable(tf.zeros([self._batch_size] + y.shape[2:].as_list(),
                                 y.dtype), trainable=False,
                        name=f"last_output_{i}")
            for i, y in enumerate(tf.nest.flatten(outputs))]
    if self._last_output_variables is None:
      return None
    return tf.nest.pack_sequence_as(outputs, self._last_output_variables)

  def reset_states(self, where: tf.Tensor | None = None) -> None:
    """Sets the states back to the initial states.

    Args:
      where: bool `[batch_size]`: reset only these rows (streams that ended;
        the others continue). `None` resets every row.

    Raises:
      TypeError: If `where` is not bool.
      ValueError: If `where` is not `[batch_size]`.
    """
    if where is not None:
      where = tf.convert_to_tensor(where)
      if where.dtype != tf.bool:
        raise TypeError(f"`where` must be a bool tensor [batch_size] = "
                        f"[{self._batch_size}]; got dtype {where.dtype.name}.")
      if not where.shape.is_compatible_with([self._batch_size]):
        raise ValueError(f"`where` must have shape [batch_size] = "
                         f"({self._batch_size},); got "
                         f"{_checks.shape_str(where.shape)}.")
      if not where.shape.is_fully_defined():
        where = _checks.gated(where, [tf.debugging.assert_equal(
            tf.shape(where), [self._batch_size],
            message=f"`where` must have shape [batch_size] = "
            f"({self._batch_size},); its shape is:")])
    pairs = list(zip(self._state_variables, tf.nest.flatten(self._initial)))
    # A new stream has no valid output yet: masking repeats zeros.
    pairs += [(v, tf.zeros_like(v)) for v in
              self._last_output_variables or []]
    for variable, value in pairs:
      variable.assign(value if where is None else
                      _loop.select(where, value, variable))

  def _check_batch(self, chunk: Nest) -> Nest:
    """`chunk`'s batch sizes against `batch_size`: statically, else by
    run-time checks that gate the returned chunk."""
    chunk = tf.nest.map_structure(tf.convert_to_tensor, chunk)
    checks = []
    for name, x in zip(_checks.leaf_paths(chunk, "chunk"),
                       tf.nest.flatten(chunk)):
      if x.shape.rank is None or x.shape.rank < 1:
        continue  # The engine names a bad rank.
      if x.shape[0] is None:
        checks += _checks.dynamic_assert_equal(
            tf.shape(x)[0], self._batch_size,
            f"{name} has a batch size other than this StatefulRunner's "
            f"batch_size={self._batch_size} (x: the chunk's).")
      elif x.shape[0] != self._batch_size:
        raise ValueError(
            f"{name} has batch size {x.shape[0]} (shape "
            f"{_checks.shape_str(x.shape)}), but this StatefulRunner "
            f"carries {self._batch_size} streams (batch_size="
            f"{self._batch_size}). Pass chunks of {self._batch_size} rows "
            "or build a runner for the new batch size.")
    return _checks.gated(chunk, checks)
