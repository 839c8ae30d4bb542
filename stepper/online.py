"""Online gradients: the weights' influence on the state, carried forward.

Truncated BPTT is one answer to "the sequence is too long to backpropagate
through"; the other carries the influence of the weights on the state,
`M_t = ds_t/dtheta`, forward in time, so a gradient is ready at every step
with no stored history. `gradients` runs any step the engine runs (a Keras
cell, a functional step model, a callable, a `stepper.stack`) with one of:

* `"bptt"`: a `GradientTape` over `stepper.model_rnn`, the exact reference.
* `"rtrl"` (Williams & Zipser 1989): exact; carries `M` `[batch, state,
  params]`, `O(state^2 params)` per row and step.
* `"snap1"` (Menick et al., ICLR 2021): SnAp-1 carries `M` only at the
  entries one step reaches (the pattern of `ds_t/dtheta`, probed once at
  random points) and propagates them with the diagonal of `ds_t/ds_{t-1}`,
  both computed compressed by colouring (a few Jacobian products per step).
  Exact for elementwise recurrences (IndRNN, minGRU, LRU: Zucchet et al.,
  NeurIPS 2023); otherwise biased. Carries `[batch, kept]`, `kept` a small
  multiple of `params`. Measured: 4.7 BPTT steps per step on a 16-unit GRU,
  2.0 on a minGRU (`stepper._influence.Snap1`).
* `"uoro"` (Tallec & Ollivier, ICLR 2018): an unbiased rank-one estimate;
  carries `[batch, state]` and `[batch, params]`.

How each computes its Jacobians: `stepper._influence` (the rules) and
`stepper._sparsity` (SnAp-1's patterns and colourings). Every method returns
the total loss (the mean over unmasked steps and rows, as `stepper.Trainer`
takes it) and its gradient with the weights held fixed over the sequence;
online methods run the whole sequence in one `tf.while_loop` inside a
compiled function that is traced once per step, loss, method and shape
(the seed is a tensor: a new seed does not retrace).

Measured cost per step: docs/guides/online.md (`python -m benchmarks.online
--cost`).
"""

import secrets
import weakref
from typing import Any, Callable, NamedTuple, Sequence

import keras
import numpy as np
import tensorflow as tf

from stepper import _checks
from stepper import _influence
from stepper import _inputs
from stepper import _loop
from stepper import _sparsity
from stepper import _targets
from stepper import _train_args
from stepper import engine
from stepper import masking
from stepper import steps as steps_lib

Nest = Any

__all__ = ["DEFAULT_MAX_INFLUENCE", "METHODS", "Estimator", "Run",
           "gradients"]

METHODS = ("bptt", "rtrl", "snap1", "uoro")
DEFAULT_MAX_INFLUENCE = 2 ** 24  # 16.8M numbers: 134 MB in float64.


class Run(NamedTuple):
  """What `Estimator.run` returns, sums not means (a Trainer sums over
  replicas).

  Attributes:
    loss_sum: The per-example loss summed over unmasked (row, step) pairs.
    count: Their number, in the loss's dtype.
    grad_sum: The gradient of `loss_sum`, one tensor per variable.
    final_states: The states after the last step, nested like the step's.
    carry: The estimator's carried influence after the last step: RTRL's
      `[M]` `[batch, state, params]`, SnAp-1's `[batch, kept]`, UORO's
      `[s~ [batch, state], theta~ [batch, params]]` (`[]` for bptt).
  """
  loss_sum: tf.Tensor
  count: tf.Tensor
  grad_sum: list
  final_states: Nest
  carry: list


def check_method(method: Any, allowed: Sequence[str] = METHODS) -> str:
  """`method`, one of `allowed` (case-sensitive).

  Raises:
    ValueError: Naming `method`, the received and the allowed values.
  """
  if not isinstance(method, str) or method not in allowed:
    raise ValueError(f"`method` must be one of {list(allowed)} "
                     f"(case-sensitive); got {method!r}.")
  return method


def check_seed(seed: Any) -> int | None:
  """`None` or an int (numpy ints included), as a Python int.

  Raises:
    TypeError: Naming `seed`, for a bool, a float or anything else.
  """
  if seed is None:
    return None
  if isinstance(seed, (bool, np.bool_)) or not isinstance(
      seed, (int, np.integer)):
    raise TypeError(f"`seed` must be an int (or None for fresh draws); got "
                    f"{seed!r} of type {type(seed).__name__}.")
  return int(seed)


def seed_tensor(seed: int | None) -> tf.Tensor:
  """The `[2]` int64 seed a run takes (`None`: a fresh random one)."""
  if seed is None:
    seed = secrets.randbits(62)
  return tf.constant([seed % 2 ** 63, 0], tf.int64)


class Estimator:
  """One online method for one step, loss and set of variables, compiled once.

  `gradients` builds (and caches) one per configuration; `stepper.Trainer`
  holds one and carries `run`'s `final_states` and `carry` across batches.

  >>> cell = keras.layers.GRUCell(3)
  >>> estimator = stepper.online.Estimator(cell, "mse", method="snap1")
  >>> x, y = tf.random.normal([2, 5, 4]), tf.random.normal([2, 5, 3])
  >>> run = estimator.run(x, y)
  >>> [tuple(c.shape) for c in run.carry]  # [batch, kept]: kept = params
  [(2, 81)]

  Args:
    step: A Keras cell, a functional step model, a callable or a `Step`.
    loss_fn: A Keras loss (object or name) or a callable `(y_true_t,
      y_pred_t) -> [batch]` per-example loss at one step.
    method: `"rtrl"`, `"snap1"` or `"uoro"`.
    head: Optional layer applied to each `y_t`.
    variables: The differentiated variables. Default: the step's trainable
      variables, then the head's. Required for a plain callable.
    training: Passed to the step at every call.
    max_influence: RTRL's limit on `batch * state * params`.

  Raises:
    ValueError: For an unknown method, a plain callable without
      `variables`, or a step the method cannot handle.
  """

  def __init__(self, step: Any, loss_fn: Any, *, method: str,
               head: Any = None, variables: list | None = None,
               training: bool = False,
               max_influence: int = DEFAULT_MAX_INFLUENCE):
    self._method = check_method(method, METHODS[1:])
    self._step = steps_lib.as_step(step)
    self._head = head
    self._model = _train_args.with_head(self._step, head)
    self._loss = _targets.per_example_loss(_checks.check_loss(loss_fn))
    self._given = None if variables is None else list(variables)
    check_variables(self._step, variables)
    self._training = training
    self._max_influence = _checks.check_positive_int(max_influence,
                                                     "max_influence")
    self._patterns = {}
    self.trace_count = 0
    self._compiled = tf.function(self._run, autograph=False)

  @property
  def method(self) -> str:
    return self._method

  def variables(self, inputs: Nest = None, states: Nest = None) -> list:
    """The differentiated variables (building the step on `inputs`' first
    step if it has none yet)."""
    return find_variables(self._step, self._model, self._head, self._given,
                          inputs, states, self._training)

  def run(self, inputs: Nest, targets: tf.Tensor, states: Nest | None = None,
          carry: list | None = None, *, seed: Any = None,
          mask: tf.Tensor | None = None, resets: tf.Tensor | None = None,
          reset_to: Nest | None = None) -> Run:
    """Runs the sequence from `states` and the carried influence `carry`.

    Args:
      inputs: Tensor or nest, each leaf `[batch, time, ...]`.
      targets: `[batch, time, ...]`, one target per step.
      states: The states entering the first step (default: initial).
      carry: The influence entering it (default: zeros, as
        `initial_influence`).
      seed: int or None (UORO's random signs), or an int64 `[2]` tensor.
      mask: bool `[batch, time]`, as in `model_rnn`.
      resets: bool `[batch, time]`, as in `model_rnn`; a reset row's
        influence restarts from zero.
      reset_to: The states a reset sets (default: `states`).

    Returns:
      A `Run`.
    """
    seed = seed if tf.is_tensor(seed) else seed_tensor(check_seed(seed))
    inputs = tf.nest.map_structure(tf.convert_to_tensor, inputs)
    flat, batch, time = _inputs.flat_inputs(self._model, inputs, False)
    states = _inputs.initial_states(self._model, states, batch)
    variables = self.variables(inputs, states)
    if not variables:
      raise ValueError(
          f"No variables to differentiate: {self._step.name} has no "
          "trainable variables. Pass `variables=[...]`.")
    targets = check_targets(targets, self._model, inputs, states,
                            self._training, batch, time)
    controls = masking.prepare(mask=mask, sequence_length=None,
                               resets=resets, zero_output_for_mask=False,
                               batch=batch.value, time=time.value,
                               time_major=False)
    reset_to = states if reset_to is None else reset_to
    self._check_step(states, variables, batch)
    layout = _influence.Layout(states, variables)
    if carry is None:
      carry = self.initial_influence(inputs, states)
    out = self._compiled(inputs, targets, states, reset_to, list(carry),
                         seed, controls.mask, controls.resets)
    loss_sum, count, grad, final, new_carry = out
    return Run(loss_sum, count, layout.split(grad),
               tf.nest.pack_sequence_as(states, tf.nest.flatten(final)),
               list(new_carry))

  def initial_influence(self, input_spec: Nest, states: Nest) -> list:
    """The zero influence for the rows of `states` (what `run` starts from
    without a `carry`).

    Args:
      input_spec: The inputs (tensors or `tf.TensorSpec`s), each leaf
        `[batch, time, ...]`: SnAp-1's pattern depends on their shape.
      states: The states, nested like the step's, each `[batch, ...]`.
    """
    layout = _influence.Layout(states, self.variables())
    batch = tf.shape(tf.nest.flatten(states)[0])[0]
    return self._rule(layout, input_spec, states).zeros(batch)

  def _check_step(self, states: Nest, variables: list, batch) -> None:
    """A method that cannot handle the step says which and why."""
    for path, s in zip(_checks.leaf_paths(states, "state"),
                       tf.nest.flatten(states)):
      if not s.dtype.is_floating:
        raise ValueError(
            f"`method` {self._method!r} cannot handle {self._step.name}: "
            f"{path} has dtype {s.dtype.name}; the influence dState/dParams "
            "needs floating states. Use method='bptt'.")
      if not s.shape[1:].is_fully_defined():
        raise ValueError(
            f"`method` {self._method!r} cannot handle {self._step.name}: "
            f"{path} has shape {_checks.shape_str(s.shape)}; the influence "
            "needs the non-batch dimensions of every state statically.")
    for v in variables:
      if not tf.as_dtype(v.dtype).is_floating:
        raise ValueError(f"`variables` holds {v.name} of dtype "
                         f"{tf.as_dtype(v.dtype).name}; gradients need "
                         "floating variables.")
    if self._method == "rtrl" and isinstance(batch.static, int):
      layout = _influence.Layout(states, variables)
      size = batch.static * layout.state_size * layout.param_size
      if size > self._max_influence:
        raise ValueError(
            f"`method` 'rtrl' would hold an influence [batch, state, "
            f"params] = [{batch.static}, {layout.state_size}, "
            f"{layout.param_size}] of {size} numbers, above "
            f"`max_influence` = {self._max_influence}. Raise "
            "`max_influence`, or use 'snap1' or 'uoro'.")

  def _rule(self, layout: _influence.Layout, inputs: Nest, states: Nest):
    step_fn = _influence.StepCall(
        self._model, layout, self._loss_rows,
        tf.nest.map_structure(lambda _: 0, inputs), self._training)
    return self._rule_for(step_fn, inputs, states)

  def _rule_for(self, fn: _influence.StepCall, inputs: Nest, states: Nest):
    if self._method == "rtrl":
      return _influence.Rtrl(fn)
    if self._method == "uoro":
      return _influence.Uoro(fn)
    return _influence.Snap1(fn, self.patterns(fn, inputs, states))

  def patterns(self, fn: _influence.StepCall, inputs: Nest,
               states: Nest) -> _sparsity.Patterns:
    """SnAp-1's patterns, probed once per input and state signature."""
    flat = tf.nest.flatten(inputs)
    key = (tuple((tuple(x.shape[2:]), x.dtype) for x in flat),
           tuple(tuple(s.shape[1:]) for s in tf.nest.flatten(states)),
           tuple(id(v) for v in fn.layout.variables))
    if key not in self._patterns:
      specs = [tf.TensorSpec([None] + x.shape[2:].as_list(), x.dtype)
               for x in flat]
      self._patterns[key] = _sparsity.probe(
          _influence.exact_jacobians(fn), specs, fn.layout.state_size,
          fn.layout.state_dtype)
    return self._patterns[key]

  def _loss_rows(self, target: tf.Tensor, y: tf.Tensor) -> tf.Tensor:
    """The per-row loss `[batch]` of one step (extra dimensions averaged,
    as `Trainer` averages every element)."""
    rows = tf.convert_to_tensor(self._loss(target, y))
    if rows.shape.rank and rows.shape.rank > 1:
      rows = tf.reduce_mean(rows, axis=list(range(1, rows.shape.rank)))
    return rows

  def _run(self, inputs, targets, states, reset_to, carry, seed, mask,
           resets):
    self.trace_count += 1  # Runs only while tracing.
    flat_x = [_loop.swap_batch_time(x) for x in tf.nest.flatten(inputs)]
    batch, time = _loop.size(flat_x[0], 1), _loop.size(flat_x[0], 0)
    variables = self.variables()
    layout = _influence.Layout(states, variables)
    call = self._model.start(batch, self._training)
    fn = _influence.StepCall(call, layout, self._loss_rows,
                             tf.nest.map_structure(lambda _: 0, inputs),
                             self._training)
    rule = self._rule_for(fn, inputs, states)
    x_tas = [_loop.unstack(x, time) for x in flat_x]
    y_ta = _loop.unstack(_loop.swap_batch_time(targets), time)
    mask_ta = None if mask is None else _loop.unstack(mask, time)
    reset_ta = None if resets is None else _loop.unstack(resets, time)
    reset_vec = layout.vector(reset_to)

    def body(t, s, carry, grad, loss):
      x_t = [ta.read(t) for ta in x_tas]
      if reset_ta is not None:
        r = reset_ta.read(t)
        s = _loop.select(r, reset_vec, s)
        carry = [_loop.select(r, tf.zeros_like(c), c) for c in carry]
      keep = None if mask_ta is None else mask_ta.read(t)
      weight = tf.ones([batch], s.dtype) if keep is None else tf.cast(
          keep, s.dtype)
      loss_t, grad_t, s_new, carry_new = rule.step(
          x_t, s, carry, y_ta.read(t), weight, t, seed)
      if keep is not None:
        s_new = _loop.select(keep, s_new, s)
        carry_new = [_loop.select(keep, n, c)
                     for n, c in zip(carry_new, carry)]
      return (t + 1, s_new, carry_new, grad + grad_t,
              loss + tf.cast(loss_t, loss.dtype))

    s0 = layout.vector(states)
    loss_dtype = self._loss_dtype(inputs, targets, states)
    init = (tf.constant(0), s0, list(carry),
            tf.zeros([layout.param_size], layout.param_dtype),
            tf.zeros([], loss_dtype))
    _, s, carry, grad, loss = tf.while_loop(
        lambda t, *_: t < time, body, init, maximum_iterations=time)
    count = (tf.cast(batch * time, loss_dtype) if mask is None else
             tf.reduce_sum(tf.cast(mask, loss_dtype)))
    return loss, count, grad, tf.nest.flatten(layout.states(s)), carry

  def _loss_dtype(self, inputs, targets, states) -> tf.DType:
    flat = tf.nest.flatten(inputs)
    x0 = tf.nest.pack_sequence_as(inputs, [x[:, 0] for x in flat])
    y_spec, _ = self._model.output_spec(
        tf.nest.map_structure(lambda x: tf.TensorSpec(x.shape, x.dtype), x0),
        tf.nest.map_structure(lambda s: tf.TensorSpec(s.shape, s.dtype),
                              states), self._training)
    del targets
    return tf.nest.flatten(y_spec)[0].dtype


def find_variables(step: steps_lib.Step, model: steps_lib.Step, head: Any,
                   given: list | None, inputs: Nest, states: Nest,
                   training: Any) -> list:
  """`given`, or the step's and the head's trainable variables; a step
  without variables yet is built by one call on `inputs`' first step."""
  if given is not None:
    return given
  found = default_variables(step, head)
  unbuilt = head is not None and not getattr(head, "built", True)
  if (not found or unbuilt) and inputs is not None:
    flat = tf.nest.flatten(inputs)
    x0 = tf.nest.pack_sequence_as(inputs, [x[:, 0] for x in flat])
    model(x0, states, training)
    found = default_variables(step, head)
  return found


def default_variables(step: steps_lib.Step, head: Any) -> list:
  """The step's trainable variables, then the head's, each once."""
  return _checks.unique_by_id(
      step.trainable_variables +
      (list(head.trainable_variables) if head is not None else []))


def check_variables(step: steps_lib.Step, variables: Any) -> None:
  """A plain callable declares no variables: `variables` is required.

  Raises:
    ValueError: Naming `variables`, for a callable step without them.
    TypeError: If `variables` is not a list of variables.
  """
  if variables is None:
    if not hasattr(step.module, "trainable_variables"):
      raise ValueError(
          f"`variables` is required for {step.name}: a plain callable does "
          "not declare its variables. Pass `variables=[...]`, the variables "
          "it reads; got None.")
    return
  if not isinstance(variables, (list, tuple)) or not all(
      isinstance(v, (tf.Variable, keras.Variable)) for v in variables):
    raise TypeError(f"`variables` must be a list of variables; got "
                    f"{variables!r}.")


def check_targets(targets: Any, model: steps_lib.Step, inputs: Nest,
                  states: Nest, training: bool, batch: _loop.Dim,
                  time: _loop.Dim) -> tf.Tensor:
  """Per-step targets `[batch, time, ...]` shaped like the predictions of
  `model` (the step with its head; sparse labels drop the last axis): a
  loss would broadcast `[batch, time, 1]` against `[batch, time, units]`
  silently.

  Raises:
    ValueError: Naming `targets` and both shapes.
  """
  _checks.check_no_none(targets, "targets", "a tensor [batch, time, ...]")
  targets = tf.convert_to_tensor(targets)
  if (targets.shape.rank is None or targets.shape.rank < 2 or
      not targets.shape[:2].is_compatible_with([batch.static, time.static])):
    raise ValueError(
        f"`targets` has shape {_checks.shape_str(targets.shape)}; online "
        f"gradients need one target per step, [batch, time, ...] = "
        f"{_checks.shape_str([batch.static, time.static])}, ...].")
  x_spec = tf.nest.map_structure(
      lambda x: tf.TensorSpec([x.shape[0]] + x.shape[2:].as_list(), x.dtype),
      inputs)
  y_spec = _inputs.output_spec(model, x_spec, states, training)
  if isinstance(y_spec, tf.TensorSpec):  # A nest is the loss's to take.
    try:
      _targets.layout(targets, y_spec.shape, time.static,
                      allow_sequence_level=False)
    except ValueError as e:
      raise ValueError(f"`targets`: {e}") from None
  return targets


_CACHE = weakref.WeakKeyDictionary()


def _estimator(step: steps_lib.Step, loss_fn: Any, method: str, head: Any,
               variables: list | None, training: bool,
               max_influence: int) -> Estimator:
  """One `Estimator` per configuration, kept while the step lives."""
  key = (method, id(loss_fn), id(head),
         None if variables is None else tuple(id(v) for v in variables),
         training, max_influence)
  per_step = _CACHE.setdefault(step, {})
  if key not in per_step:
    # The value holds `loss_fn`, `head` and the variables, so their ids stay
    # theirs while the entry lives.
    per_step[key] = (Estimator(step, loss_fn, method=method, head=head,
                               variables=variables, training=training,
                               max_influence=max_influence),
                     (loss_fn, head, variables))
  return per_step[key][0]


def gradients(step: Any, inputs: Nest, targets: tf.Tensor, loss_fn: Any, *,
              method: str, head: Any = None,
              initial_states: Nest | None = None,
              variables: Sequence[tf.Variable] | None = None,
              seed: int | None = None, mask: tf.Tensor | None = None,
              resets: tf.Tensor | None = None, training: bool = False,
              max_influence: int = DEFAULT_MAX_INFLUENCE
              ) -> tuple[tf.Tensor, list[tf.Tensor]]:
  """The total loss and an estimate of its gradient, weights held fixed.

  >>> cell = keras.layers.GRUCell(3, dtype="float64")
  >>> x = tf.random.normal([2, 5, 4], dtype=tf.float64)
  >>> y = tf.random.normal([2, 5, 3], dtype=tf.float64)
  >>> loss, exact = stepper.online.gradients(cell, x, y, "mse", method="bptt")
  >>> _, rtrl = stepper.online.gradients(cell, x, y, "mse", method="rtrl")
  >>> all(np.allclose(a, b, rtol=1e-10, atol=1e-12)
  ...     for a, b in zip(rtrl, exact))
  True

  Args:
    step: A Keras cell, a functional step model `[x_t, *states] -> [y_t,
      *new_states]`, a callable `(x_t, states) -> (y_t, new_states)` (pass
      `variables` and `initial_states`) or a `stepper.stack`. The rows of a
      batch must not interact inside the step.
    inputs: Tensor or nest, each leaf `[batch, time, ...]`.
    targets: `[batch, time, ...]`: `targets[:, t]` against step `t`'s
      prediction.
    loss_fn: As `Trainer`'s `loss`: a Keras loss (object or name) or a
      callable `(y_true_t, y_pred_t) -> [batch]` per-example loss at one
      step. The total is the mean over unmasked steps and rows.
    method: `"bptt"`, `"rtrl"`, `"snap1"` or `"uoro"` (case-sensitive); see
      the module docstring.
    head: Optional Keras layer applied to each `y_t`.
    initial_states: Nest like the step's states, each `[batch, ...]`;
      constants (no gradient flows into them with the online methods).
      Default: the step's initial state.
    variables: The variables to differentiate; the gradient is aligned
      with them. Default: the step's trainable variables, then the head's.
      Required for a plain callable.
    seed: int (numpy ints too) or None (fresh draws): UORO's random signs.
      Checked for every method; a new seed does not retrace.
    mask: bool `[batch, time]`, Keras semantics: a masked (row, step) is
      not an example of the loss, and its state and influence pass through
      unchanged.
    resets: bool `[batch, time]`: the row's state is set back to the
      initial state before that step, and its influence to zero.
    training: Passed to the step (default False). Online methods need a
      deterministic step: no dropout in training.
    max_influence: The most numbers RTRL's influence `[batch, state,
      params]` may hold (default 2**24, 134 MB in float64); raise it to
      allow a larger RTRL.

  Returns:
    `(loss, grads)`: the scalar total loss and one gradient per variable
    (zeros for a variable the loss does not reach).

  Raises:
    ValueError: For an unknown `method`, a callable without `variables`,
      targets not `[batch, time, ...]`, a step the method cannot handle
      (integer states, unknown state shapes), or an RTRL influence above
      `max_influence`.
    TypeError: For a `seed` that is not an int or None.
  """
  method = check_method(method)
  seed = check_seed(seed)
  _checks.check_bool(training, "training")
  step = steps_lib.as_step(step)
  check_variables(step, variables)
  if variables is not None:
    variables = list(variables)
  if method == "bptt":
    return _bptt(step, inputs, targets, loss_fn, head=head,
                 initial_states=initial_states, variables=variables,
                 mask=mask, resets=resets, training=training)
  estimator = _estimator(step, loss_fn, method, head, variables, training,
                         max_influence)
  run = estimator.run(inputs, targets, initial_states, seed=seed, mask=mask,
                      resets=resets)
  return (tf.math.divide_no_nan(run.loss_sum, run.count),
          [tf.math.divide_no_nan(g, tf.cast(run.count, g.dtype))
           for g in run.grad_sum])


def _bptt(step, inputs, targets, loss_fn, *, head, initial_states, variables,
          mask, resets, training):
  """The reference: a tape over `model_rnn`, the same loss reduction."""
  check_variables(step, variables)
  model = _train_args.with_head(step, head)
  inputs = tf.nest.map_structure(tf.convert_to_tensor, inputs)
  _, batch, time = _inputs.flat_inputs(model, inputs, False)
  states = _inputs.initial_states(model, initial_states, batch)
  variables = find_variables(step, model, head, variables, inputs, states,
                             training)
  targets = check_targets(targets, model, inputs, states, training, batch,
                          time)
  key = ("bptt", id(loss_fn), id(head), tuple(id(v) for v in variables),
         training)
  per_step = _CACHE.setdefault(step, {})
  if key not in per_step:
    per_example = _targets.per_example_loss(_checks.check_loss(loss_fn))
    per_step[key] = (tf.function(
        lambda *args: _bptt_loss_and_grads(model, per_example, variables,
                                           training, *args),
        autograph=False), (loss_fn, head, variables))
  return per_step[key][0](inputs, targets, states, mask, resets)


def _bptt_loss_and_grads(model, per_example, variables, training, inputs,
                         targets, states, mask, resets):
  with tf.GradientTape() as tape:
    outputs, _ = engine.model_rnn(model, inputs, states, mask=mask,
                                  resets=resets, training=training)
    rows = tf.convert_to_tensor(per_example(
        _loop.merge_leading_dims(targets), _loop.merge_leading_dims(outputs)))
    if rows.shape.rank > 1:
      rows = tf.reduce_mean(rows, axis=list(range(1, rows.shape.rank)))
    if mask is None:
      loss = tf.reduce_mean(rows)
    else:
      weight = tf.cast(tf.reshape(tf.convert_to_tensor(mask), [-1]),
                       rows.dtype)
      loss = tf.math.divide_no_nan(tf.reduce_sum(rows * weight),
                                   tf.reduce_sum(weight))
  grads = tape.gradient(loss, variables,
                        unconnected_gradients=tf.UnconnectedGradients.ZERO)
  return loss, grads
