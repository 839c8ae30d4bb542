"""Truncated backpropagation through time: BPTT(k2; k1) of Williams & Peng.

Every `k1` steps one weight update, backpropagating `k2 >= k1` steps. Update
`j` covers the loss steps `[j*k1, min((j+1)*k1, T))`; its gradient reaches
back to step `start_j = max(0, (j+1)*k1 - k2)`: the state entering `start_j`
is a constant. The forward values are those of one long run (the state is
carried exactly). For `k1 = 2, k2 = 3, T = 7`::

  step        0   1   2   3   4   5   6
  update 0   [L   L]                      loss 0-1, backprop to step 0
  update 1       [.   L   L]              loss 2-3, backprop to step 1
  update 2               [.   L   L]      loss 4-5, backprop to step 3
  update 3                       [.   L]  loss 6,   backprop to step 5

  L: the loss at this step is in the update's loss and gradient.
  .: backpropagated through, but its loss is not in this update.
  [: the state entering this step is a constant (no gradient before it).

So `grads_j` holds, for every loss step `t` of update `j`, the gradient of
`loss(targets_t, y_t)` through steps `start_j .. t` only, averaged like
`loss_j`. `k1 == k2` is plain chunked truncation
(`run_chunks(gradient="truncate")` with chunks of `k1`); `k1 == k2 == T` is
full BPTT.

Each update runs its window as two engine segments from the saved state:
`[start_j, start_{j+1})`, whose final state is saved for update `j + 1`, and
`[start_{j+1}, stop_j)`, which update `j + 1` runs again (the `k2 - k1`
overlap). One tape per update, not per step.

Three entry points, the same numbers:

* `Updater(step, loss, k1=..., k2=...)`: compiled once, reused across
  sequences (what a training loop holds): `.updates(x, y)` runs every update
  in one `tf.while_loop`; `.iterate(x, y)` yields them one at a time.
* `updates(...)` and `iterate(...)`: one-off shortcuts building an `Updater`.
"""

from typing import Any, Callable, Iterator, NamedTuple

import tensorflow as tf

from stepper import _checks
from stepper import _inputs
from stepper import _loop
from stepper import engine
from stepper import steps as steps_lib

Nest = Any
Update = tuple[tf.Tensor, list[tf.Tensor]]


class _Sequence(NamedTuple):
  """One validated sequence: time-major inputs and targets, start states."""
  inputs: Nest
  targets: Nest
  states: Nest
  n_updates: int


class Updater:
  """BPTT(k2; k1) for one step, loss and set of variables, compiled once.

  >>> cell = keras.layers.GRUCell(8)
  >>> updater = stepper.tbptt.Updater(
  ...     cell, keras.losses.MeanSquaredError(), k1=5, k2=8)
  >>> optimizer = keras.optimizers.SGD(0.1)
  >>> batches = [(tf.random.normal([4, 20, 3]), tf.random.normal([4, 20, 8]))]
  >>> for x, y in batches:  # x [batch, time, 3], y [batch, time, 8]
  ...   for loss_j, grads_j in updater.iterate(x, y):
  ...     _ = optimizer.apply_gradients(zip(grads_j, updater.variables))
  >>> int(optimizer.iterations)  # Updates at steps 5, 10, 15, 20.
  4

  `iterate` computes update `j` when it is requested, from the state saved
  by update `j - 1`, so weights changed in between are used from then on
  (online TBPTT, as Williams & Peng intend). Without weight changes it
  yields exactly what `updates` returns. After either, `final_states` is
  the state after the sequence's last step, to continue a stream in the
  next batch (`initial_states=updater.final_states`).
  """

  def __init__(self, step: Any, loss: Callable, *, k1: int, k2: int,
               variables: list[tf.Variable] | None = None,
               training: bool | tf.Tensor | None = None):
    """Validates the window and compiles nothing yet.

    Args:
      step: A Keras step model, a Keras RNN cell or a callable (see
        `stepper.steps`).
      loss: `loss(targets_t, y_t)`: a Keras loss (e.g.
        `keras.losses.MeanSquaredError()` or `"mse"`) or any callable returning
        per-example losses. It is called once per update on the update's
        loss steps merged into the batch (`[steps * batch, ...]`); the mean
        of its result is `loss_j`.
      k1: Steps between updates, a positive int.
      k2: Steps backpropagated per update, an int `>= k1`.
      variables: The variables to differentiate. Defaults to the step's
        trainable variables (looked up at the first call, once built).
      training: Passed to the step at every call.

    Raises:
      ValueError: If `k1`/`k2` are not positive ints, `k2 < k1`, or `loss` is
        an unknown loss name.
      TypeError: If `loss` is not callable.
    """
    self._step = steps_lib.as_step(step)
    self._k1 = _checks.check_positive_int(k1, "k1")
    self._k2 = _checks.check_positive_int(k2, "k2")
    if k2 < k1:
      raise ValueError(
          f"`k2` (steps backpropagated, {k2}) must be >= `k1` (steps between "
          f"updates, {k1}): every loss step of an update is backpropagated. "
          "Use k2 == k1 for plain truncation.")
    self._loss = _checks.check_loss(loss)
    self._given_variables = variables
    self._training = training
    self._update_fn = tf.function(self._update, autograph=False,
                                  reduce_retracing=True)
    self._all_fn = tf.function(self._all_updates, autograph=False)
    self.final_states = None

  @property
  def variables(self) -> list[tf.Variable]:
    """The differentiated variables, in the order of `grads_j`.

    Raises:
      ValueError: If there are none.
    """
    variables = list(self._step.trainable_variables
                     if self._given_variables is None
                     else self._given_variables)
    if not variables:
      raise ValueError(
          f"No variables to differentiate: {self._step.name} has no "
          "trainable variables (yet) and `variables` was not given. Pass "
          "`variables=[...]`.")
    return variables

  def updates(self, inputs: Nest, targets: Nest,
              initial_states: Nest | None = None) -> list[Update]:
    """Every update over one sequence, in one `tf.while_loop`.

    All updates use the current weights (nothing is applied in between).

    Args:
      inputs: Tensor or nest, each leaf `[batch, time, ...]`; `time` must be
        known statically (it sets the number of updates).
      targets: Tensor or nest like the step's outputs, each leaf
        `[batch, time, ...]`.
      initial_states: Nest like the step's states, each `[batch, ...]`.
        Defaults to the step's initial (zero) state. A constant: no gradient
        reaches it.

    Returns:
      One `(loss_j, grads_j)` per update `j = 0 .. ceil(time / k1) - 1`:
      `loss_j` a scalar, `grads_j` a list like `variables` (zeros where a
      variable does not affect the loss).

    Raises:
      ValueError: If `time` is unknown, the targets are not nested and
        shaped like the outputs (`[batch, time, ...]`; integer labels may
        drop the last axis), there are no variables, or as in `model_rnn`.
    """
    sequence = self._prepare(inputs, targets, initial_states)
    losses, grads, self.final_states = self._all_fn(
        sequence.inputs, sequence.targets, sequence.states)
    return [(losses[j], [g[j] for g in grads])
            for j in range(sequence.n_updates)]

  def update(self, inputs: Nest, targets: Nest, states: Nest,
             j: int | tf.Tensor, *, offset: int | tf.Tensor = 0,
             resets: tf.Tensor | None = None,
             reset_to: Nest | None = None
             ) -> tuple[tf.Tensor, list[tf.Tensor], Nest]:
    """Update `j` alone, traceable: for a training loop's compiled step
    (e.g. per replica inside `strategy.run`, where a generator cannot run).

    Args:
      inputs: Tensor or nest, each leaf `[batch, time, ...]`.
      targets: Like the step's outputs, each leaf `[batch, time, ...]`.
      states: The states entering update `j`'s window, i.e. after step
        `max(0, offset + (j + 1) * k1 - k2) - 1` (the initial states for
        the first windows); a constant: no gradient reaches them.
      j: The update's index, a scalar int in `[0, ceil(time / k1))`.
      offset: Steps of `inputs` before the update grid: update `j` takes the
        loss on steps `[offset + j*k1, offset + (j+1)*k1)`. A stream's next
        batch comes with the `offset = k2 - k1` steps before it, which its
        first updates backpropagate through.
      resets: Optional bool `[batch, time]`: where True, the row's state is
        set to `reset_to` right before that step (as in `model_rnn`).
      reset_to: The states a reset sets (defaults to the step's initial
        states), never the window's entering `states`.

    Returns:
      `(loss_j, grads_j, next_states)`: `next_states` enter update `j + 1`'s
      window (pass them to the next call).

    Raises:
      ValueError: If `j` lies outside `[0, ceil(time / k1))` or the targets
        are not shaped like the outputs (`tf.errors.InvalidArgumentError`
        when only known at run time), or as in `model_rnn`.
    """
    flat_x, batch, time = _inputs.time_major_inputs(
        self._step, inputs, time_major=False)
    x = tf.nest.pack_sequence_as(inputs, flat_x)
    targets = self._check_targets(targets, x, states, batch, time)
    j = self._check_update_index(j, time)
    controls = None
    if resets is not None:
      controls = (_loop.swap_batch_time(tf.convert_to_tensor(resets)),
                  self._step.initial_state(batch.value) if reset_to is None
                  else reset_to)
    loss_j, grads, next_states, _ = self._update(x, targets, states, j,
                                                 offset, controls)
    return loss_j, grads, next_states

  def iterate(self, inputs: Nest, targets: Nest,
              initial_states: Nest | None = None) -> Iterator[Update]:
    """Yields the updates over one sequence one at a time, lazily.

    Arguments and errors are those of `updates`; errors are raised here,
    before the first update. `final_states` is set once the last update has
    been yielded.

    Args:
      inputs: As in `updates`.
      targets: As in `updates`.
      initial_states: As in `updates`.

    Returns:
      An iterator of `(loss_j, grads_j)`.
    """
    return self._iterate(self._prepare(inputs, targets, initial_states))

  def _iterate(self, sequence: _Sequence) -> Iterator[Update]:
    states = sequence.states
    for j in range(sequence.n_updates):
      loss_j, grads_j, states, end_states = self._update_fn(
          sequence.inputs, sequence.targets, states, tf.constant(j))
      if j == sequence.n_updates - 1:
        self.final_states = end_states
      yield loss_j, grads_j
    if not sequence.n_updates:
      self.final_states = states

  def _prepare(self, inputs, targets, initial_states) -> _Sequence:
    flat_x, batch, time = _inputs.time_major_inputs(
        self._step, inputs, time_major=False)
    if time.static is None:
      raise ValueError(
          "`inputs` has an unknown number of time steps; tbptt needs it "
          "statically to return one update per k1 steps. Give `inputs` a "
          "static time dimension.")
    states = _inputs.initial_states(
        self._step, initial_states, batch)
    x = tf.nest.pack_sequence_as(inputs, flat_x)
    targets = self._check_targets(targets, x, states, batch, time)
    self._build(x, states)
    return _Sequence(x, targets, states, -(-time.static // self._k1))

  def _check_targets(self, targets: Nest, x: Nest, states: Nest,
                     batch: _loop.Dim, time: _loop.Dim) -> Nest:
    """Targets nested like the outputs, each `[batch, time] + y_t`'s shape
    (integer labels may drop y_t's last axis, or make it 1); returns them
    time-major, gated by the run-time checks of what is unknown statically.

    A loss broadcasts silently: `[batch, time, 1]` targets against
    `[batch, time, units]` outputs, or a batch of 1, give a wrong loss
    rather than an error.
    """
    if targets is None:
      raise ValueError("`targets` is None; expected a tensor or nest like "
                       "the step's outputs, each leaf [batch, time, ...].")
    targets = tf.nest.map_structure(tf.convert_to_tensor, targets)
    x_spec = tf.nest.map_structure(
        lambda t: tf.TensorSpec(t.shape[1:], t.dtype), x)
    y_spec = _inputs.output_spec(self._step, x_spec, states, self._training)
    _checks.check_same_nesting(
        targets, y_spec,
        lambda: f"`targets` is nested as {_checks.nesting(targets)} but the "
        f"step's outputs are nested as {_checks.nesting(y_spec)}.")
    checked = []
    for name, t, y in zip(_checks.leaf_paths(targets, "targets"),
                          tf.nest.flatten(targets), tf.nest.flatten(y_spec)):
      checked.append(_check_target(name, t, y.shape[1:], batch, time))
    return tf.nest.pack_sequence_as(targets, checked)

  def _check_update_index(self, j: int | tf.Tensor,
                          time: _loop.Dim) -> int | tf.Tensor:
    """`j` in `[0, n_updates)`; a run-time check gates it if unknown."""
    n_updates = (time.value + self._k1 - 1) // self._k1
    message = (f"`j` must lie in [0, n_updates) where n_updates = "
               f"ceil(time / k1) (k1 = {self._k1})")
    static_j = j if isinstance(j, int) else tf.get_static_value(j)
    if static_j is not None and isinstance(n_updates, int):
      if not 0 <= static_j < n_updates:
        raise ValueError(f"{message} = {n_updates}; got {int(static_j)}.")
      return j
    j = tf.convert_to_tensor(j)
    checks = [tf.debugging.assert_non_negative(j, message=message + "."),
              tf.debugging.assert_less(j, tf.cast(n_updates, j.dtype),
                                       message=message + ".")]
    with tf.control_dependencies(checks):
      return tf.identity(j)

  def _build(self, x: Nest, states: Nest) -> None:
    """Traces the step once so that a Keras cell has its variables."""
    x_spec = tf.nest.map_structure(
        lambda t: tf.TensorSpec(t.shape[1:], t.dtype), x)
    _inputs.output_spec(self._step, x_spec, states, self._training)
    _ = self.variables  # Raises here, not inside a trace, if there are none.

  def _bounds(self, j: tf.Tensor, time: tf.Tensor, offset=0):
    """Update `j`'s steps: `(start, split, loss_start, stop)`."""
    k1, k2 = self._k1, self._k2
    stop = tf.minimum(offset + (j + 1) * k1, time)
    start = tf.maximum(0, offset + (j + 1) * k1 - k2)
    split = tf.minimum(tf.maximum(0, offset + (j + 2) * k1 - k2), stop)
    return start, split, offset + j * k1, stop

  def _segment(self, x: Nest, states: Nest, begin, end, controls=None):
    """The engine over steps `[begin, end)` of time-major `x`; `controls`
    is `None` or `(resets [time, batch], reset_to)`."""
    # Slices, not a TensorArray: no gradient is taken w.r.t. the inputs.
    x = tf.nest.map_structure(lambda t: t[begin:end], x)
    kwargs = {} if controls is None else dict(
        resets=controls[0][begin:end], _reset_to=controls[1])
    return engine.model_rnn(self._step, x, states, time_major=True,
                            training=self._training, **kwargs)

  def _mean_loss(self, targets: Nest, outputs: Nest) -> tf.Tensor:
    y_true = tf.nest.map_structure(_loop.merge_leading_dims, targets)
    y_pred = tf.nest.map_structure(_loop.merge_leading_dims, outputs)
    return tf.reduce_mean(self._loss(y_true, y_pred))

  def _update(self, x: Nest, targets: Nest, states: Nest, j: tf.Tensor,
              offset=0, controls=None):
    """Update `j` from the state entering its window (a constant).

    Returns:
      `(loss_j, grads_j, next_states, end_states)`: `next_states` enters
      update `j + 1`'s window; `end_states` follow step `stop_j - 1`.
    """
    time = tf.shape(tf.nest.flatten(x)[0])[0]
    start, split, loss_start, stop = self._bounds(j, time, offset)
    states = tf.nest.map_structure(tf.stop_gradient, states)
    with tf.GradientTape() as tape:
      y_head, next_states = self._segment(x, states, start, split, controls)
      y_tail, end_states = self._segment(x, next_states, split, stop,
                                         controls)
      outputs = tf.nest.map_structure(
          lambda a, b: tf.concat([a, b], 0)[loss_start - start:],
          y_head, y_tail)
      loss_j = self._mean_loss(
          tf.nest.map_structure(lambda t: t[loss_start:stop], targets),
          outputs)
    variables = self.variables
    grads = tape.gradient(loss_j, variables)
    grads = [tf.zeros(v.shape, v.dtype) if g is None
             else tf.convert_to_tensor(g) for g, v in zip(grads, variables)]
    stop_gradient = lambda s: tf.nest.map_structure(tf.stop_gradient, s)
    return loss_j, grads, stop_gradient(next_states), stop_gradient(end_states)

  def _all_updates(self, x: Nest, targets: Nest, states: Nest):
    """Every update in one `tf.while_loop`.

    Returns:
      `(losses [n], grads [n, ...] per variable, final_states)`.
    """
    time = tf.shape(tf.nest.flatten(x)[0])[0]
    n_updates = (time + self._k1 - 1) // self._k1
    variables = self.variables

    def body(j, states, end_states, loss_ta, grad_tas):
      del end_states  # Only the last update's are kept.
      loss_j, grads, states, end_states = self._update(x, targets, states, j)
      return (j + 1, states, end_states, loss_ta.write(j, loss_j),
              [ta.write(j, g) for ta, g in zip(grad_tas, grads)])

    loss_ta = tf.TensorArray(self._loss_dtype(targets, x, states),
                             size=n_updates, element_shape=[])
    grad_tas = [tf.TensorArray(v.dtype, size=n_updates, element_shape=v.shape)
                for v in variables]
    _, _, final_states, loss_ta, grad_tas = tf.while_loop(
        lambda j, *_: j < n_updates, body,
        (0, states, states, loss_ta, grad_tas),
        maximum_iterations=n_updates)
    return (loss_ta.stack(), [ta.stack() for ta in grad_tas],
            final_states)

  def _loss_dtype(self, targets: Nest, x: Nest, states: Nest) -> tf.DType:
    """The dtype `loss` returns, from an abstract trace of it alone."""
    x_spec = tf.nest.map_structure(
        lambda t: tf.TensorSpec(t.shape[1:], t.dtype), x)
    y_spec = _inputs.output_spec(self._step, x_spec, states, self._training)
    merged = lambda s: tf.TensorSpec([None] + s.shape[1:], s.dtype)
    concrete = tf.function(self._loss, autograph=False).get_concrete_function(
        tf.nest.map_structure(lambda t: merged(tf.TensorSpec(
            t.shape[1:], t.dtype)), targets),
        tf.nest.map_structure(merged, y_spec))
    return tf.nest.flatten(concrete.structured_outputs)[0].dtype


def updates(step: Any, inputs: Nest, targets: Nest, loss: Callable, *,
            k1: int, k2: int, initial_states: Nest | None = None,
            variables: list[tf.Variable] | None = None,
            training: bool | tf.Tensor | None = None) -> list[Update]:
  """Every update of BPTT(k2; k1) over one sequence, in one graph.

  A shortcut for `Updater(step, loss, ...).updates(inputs, targets, ...)`;
  build an `Updater` once to reuse its compiled function across calls.

  >>> cell = keras.layers.GRUCell(8)
  >>> x, y = tf.random.normal([4, 20, 3]), tf.random.normal([4, 20, 8])
  >>> pairs = stepper.tbptt.updates(
  ...     cell, x, y, keras.losses.MeanSquaredError(), k1=5, k2=8)
  >>> len(pairs)  # Updates at steps 5, 10, 15, 20; each backpropagates 8.
  4

  Args:
    step: As in `Updater`.
    inputs: As in `Updater.updates`.
    targets: As in `Updater.updates`.
    loss: As in `Updater`.
    k1: As in `Updater`.
    k2: As in `Updater`.
    initial_states: As in `Updater.updates`.
    variables: As in `Updater`.
    training: As in `Updater`.

  Returns:
    One `(loss_j, grads_j)` per update (see `Updater.updates`).

  Raises:
    ValueError: As in `Updater` and `Updater.updates`.
  """
  updater = Updater(step, loss, k1=k1, k2=k2, variables=variables,
                    training=training)
  return updater.updates(inputs, targets, initial_states)


def iterate(step: Any, inputs: Nest, targets: Nest, loss: Callable, *,
            k1: int, k2: int, initial_states: Nest | None = None,
            variables: list[tf.Variable] | None = None,
            training: bool | tf.Tensor | None = None) -> Iterator[Update]:
  """Yields the updates of BPTT(k2; k1) one at a time, lazily.

  A shortcut for `Updater(step, loss, ...).iterate(inputs, targets, ...)`:
  apply each update before requesting the next for online TBPTT.

  >>> cell = keras.layers.GRUCell(8)
  >>> x, y = tf.random.normal([4, 20, 3]), tf.random.normal([4, 20, 8])
  >>> cell.build((None, 3))  # Its variables exist before the first update.
  >>> optimizer = keras.optimizers.SGD(0.1)
  >>> for loss_j, grads_j in stepper.tbptt.iterate(
  ...     cell, x, y, keras.losses.MeanSquaredError(), k1=5, k2=8):
  ...   _ = optimizer.apply_gradients(zip(grads_j, cell.trainable_variables))

  Takes the arguments of `updates`, with the same meaning.

  Returns:
    An iterator of `(loss_j, grads_j)` (see `Updater.iterate`).

  Raises:
    ValueError: As in `Updater` and `Updater.updates`, at the call.
  """
  updater = Updater(step, loss, k1=k1, k2=k2, variables=variables,
                    training=training)
  return updater.iterate(inputs, targets, initial_states)


def _check_target(name: str, target: tf.Tensor, y_shape: tf.TensorShape,
                  batch: _loop.Dim, time: _loop.Dim) -> tf.Tensor:
  """One target leaf against its output's per-step shape `y_shape`
  (`[...]` without batch); returns it time-major."""
  _checks.check_rank_at_least(target, 2, name, "[batch, time, ...]")
  for axis, dim, what in ((1, time, "time steps"), (0, batch, "rows")):
    if None not in (target.shape[axis], dim.static) and (
        target.shape[axis] != dim.static):
      raise ValueError(f"{name} has {target.shape[axis]} {what} (shape "
                       f"{_checks.shape_str(target.shape)}) but `inputs` has "
                       f"{dim.static}; targets are [batch, time, ...] like "
                       "the outputs.")
  layouts = [y_shape]
  if target.dtype.is_integer and y_shape.rank:  # Sparse labels.
    layouts += [y_shape[:-1], y_shape[:-1].concatenate([1])]
  expected = tf.TensorShape([batch.static, time.static]).concatenate(y_shape)
  if not any(target.shape.is_compatible_with(
      tf.TensorShape([batch.static, time.static]).concatenate(layout))
             for layout in layouts):
    raise ValueError(
        f"{name} has shape {_checks.shape_str(target.shape)} but the step's "
        f"outputs are [batch, time, ...] = {_checks.shape_str(expected)}; "
        "targets must be shaped like the outputs (integer labels may drop "
        "the last axis). A loss would broadcast the difference silently.")
  checks = []
  for axis, dim, what in ((0, batch, "batch size"),
                          (1, time, "number of time steps")):
    if target.shape[axis] is None or dim.static is None:
      checks += _checks.dynamic_assert_equal(
          tf.shape(target)[axis], dim.value,
          f"{name} and `inputs` have a different {what}.")
  if checks:
    with tf.control_dependencies(checks):
      target = tf.identity(target)
  return _loop.swap_batch_time(target)
