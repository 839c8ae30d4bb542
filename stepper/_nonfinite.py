"""`find_nonfinite`: the first time step, batch row and leaf where a NaN or
an Inf appears, in the forward and in the backward pass.

A NaN loss says nothing about where it started: after one non-finite step
every later state (and, backwards, every earlier gradient) is non-finite
too. This runs the step once through `stepper.model_rnn`, keeping every
step's state and the gradient flowing into every step's state, and reports
where each quantity first stops being finite.

The gradient flowing into the state entering step `t` is `dL/dd_t`, where a
zero `d_t` is added to that state inside the step: the same trick as
`stepper.verify.gradient_horizon`.
"""

import dataclasses
from typing import Any, Callable

import numpy as np
import tensorflow as tf

from stepper import _checks
from stepper import engine
from stepper import steps as steps_lib

Nest = Any

_FORWARD = "forward"
_BACKWARD = "backward"


@dataclasses.dataclass(frozen=True)
class Finding:
  """Where one quantity first stops being finite.

  Attributes:
    pass_name: `"forward"` or `"backward"`.
    kind: `"input"`, `"output"` or `"state"` (forward: the state after step
      `step`); `"state gradient"` (backward: the gradient flowing into the
      state entering step `step`) or `"input gradient"`.
    leaf: The nest path, e.g. `outputs`, `states[1]['c']`.
    step: The time step: the first non-finite one in the forward pass; in
      the backward pass (which runs from the last step to the first) the
      last one.
    rows: The batch rows non-finite at `step`, ascending.
    value: A non-finite value seen there: `"nan"`, `"inf"` or `"-inf"`.
  """
  pass_name: str
  kind: str
  leaf: str
  step: int
  rows: tuple[int, ...]
  value: str

  @property
  def row(self) -> int:
    """The first batch row non-finite at `step`."""
    return self.rows[0]


class NonfiniteReport:
  """The findings of `find_nonfinite`: one per non-finite leaf.

  >>> report = stepper.verify.find_nonfinite(
  ...     keras.layers.GRUCell(4), tf.fill([2, 3, 1], float("inf")))
  >>> report.first("forward").step, report.ok
  (0, False)
  >>> print(report)  # a table of every finding
  find_nonfinite(cell 'gru_cell...'): 1 non-finite quantities
  pass quantity leaf step rows value
  forward input inputs 0 0,1 inf
  """

  def __init__(self, title: str, time: int, findings: list[Finding]):
    self.title = title
    self.time = time
    self.findings = list(findings)

  @property
  def ok(self) -> bool:
    """Whether everything was finite."""
    return not self.findings

  def first(self, pass_name: str = _FORWARD) -> Finding | None:
    """The earliest finding of a pass (in that pass's order), or `None`.

    Forward: the smallest step, inputs before outputs before states at one
    step. Backward: the largest step (the backward pass runs backwards).

    Raises:
      ValueError: If `pass_name` is not "forward" or "backward".
    """
    if pass_name not in (_FORWARD, _BACKWARD):
      raise ValueError(f"`pass_name` must be 'forward' or 'backward'; got "
                       f"{pass_name!r}.")
    found = [f for f in self.findings if f.pass_name == pass_name]
    if not found:
      return None
    if pass_name == _FORWARD:
      return min(found, key=lambda f: f.step)
    return max(found, key=lambda f: f.step)

  def to_dict(self) -> dict:
    """A JSON-serialisable dict: title, ok, time and every finding."""
    first = {p: (dataclasses.asdict(self.first(p)) if self.first(p) else None)
             for p in (_FORWARD, _BACKWARD)}
    return {"title": self.title, "ok": self.ok, "time": self.time,
            "first": first,
            "findings": [dataclasses.asdict(f) for f in self.findings]}

  def __str__(self) -> str:
    if self.ok:
      return f"{self.title}: every value finite over {self.time} steps"
    header = ("pass", "quantity", "leaf", "step", "rows", "value")
    body = [(f.pass_name, f.kind, f.leaf, str(f.step), _rows_str(f.rows),
             f.value) for f in self.findings]
    widths = [max(len(line[i]) for line in [header] + body)
              for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(line, widths))
             for line in [header] + body]
    return (f"{self.title}: {len(self.findings)} non-finite quantities\n" +
            "\n".join(line.rstrip() for line in lines))

  def __repr__(self) -> str:
    return (f"NonfiniteReport({self.title!r}, {len(self.findings)} "
            f"findings, ok={self.ok})")


def _rows_str(rows: tuple[int, ...], shown: int = 6) -> str:
  text = ",".join(str(r) for r in rows[:shown])
  return text + (f",... ({len(rows)})" if len(rows) > shown else "")


_KINDS = ("initial state", "input", "output", "state", "state gradient",
          "input gradient")


def _scan(pass_name: str, kind: str, leaf: str, values: np.ndarray,
          last: bool) -> Finding | None:
  """The finding for `values` `[batch, time, ...]`, or `None` if finite."""
  bad = ~np.isfinite(values)
  bad = bad.reshape(bad.shape[:2] + (-1,)).any(axis=2)  # [batch, time]
  steps = np.flatnonzero(bad.any(axis=0))
  if not steps.size:
    return None
  step = int(steps[-1] if last else steps[0])
  rows = tuple(int(b) for b in np.flatnonzero(bad[:, step]))
  first = values[rows[0], step].ravel()
  value = first[~np.isfinite(first)][0]
  return Finding(pass_name, kind, leaf, step, rows, str(value))


def _with_state_probe(inner: steps_lib.Step) -> steps_lib.Step:
  """A step reading `(x_t, d_t)` that adds `d_t` (zeros) to its incoming
  states: `dL/dd_t` is the gradient flowing into the state entering `t`."""

  def wrap(call):
    def fn(x, states, training):
      x_t, d_t = x
      return call(x_t, tf.nest.map_structure(tf.add, states, d_t), training)
    return fn

  return steps_lib.wrap_call(inner, wrap, name=inner.name, module=inner.module)


def _mean_square(outputs: Nest) -> tf.Tensor:
  return tf.add_n([tf.reduce_mean(tf.square(tf.cast(y, tf.float64)))
                   for y in tf.nest.flatten(outputs)])


def _check_inputs(inputs: Nest) -> tuple[Nest, int, int]:
  """Eager, `[batch, time, ...]` inputs; returns them, batch and time."""
  if not tf.executing_eagerly():
    raise RuntimeError(
        "find_nonfinite runs eagerly (it reads every value back); call it "
        "outside tf.function.")
  if inputs is None:
    raise ValueError("`inputs` is None; expected a tensor or a nest of "
                     "tensors [batch, time, ...].")
  inputs = tf.nest.map_structure(tf.convert_to_tensor, inputs)
  flat = tf.nest.flatten(inputs)
  if not flat:
    raise ValueError("`inputs` is empty; expected a tensor or a nest of "
                     "tensors [batch, time, ...].")
  for x, name in zip(flat, _checks.leaf_paths(inputs, "inputs")):
    _checks.check_rank_at_least(x, 3, name, "[batch, time, ...]")
  return inputs, int(flat[0].shape[0]), int(flat[0].shape[1])


def find_nonfinite(step: Any, inputs: Nest, *,
                   initial_states: Nest | None = None,
                   loss: Callable[[Nest], tf.Tensor] | None = None,
                   training: bool | None = None) -> NonfiniteReport:
  """Finds where NaN or Inf first appears, forward and backward.

  Runs `step` over `inputs` with `stepper.model_rnn` (eagerly), keeping the
  state after every step, then the gradient of `loss` w.r.t. the state
  entering every step and w.r.t. every floating input. Each non-finite
  quantity gives one `Finding`: the step where it first stops being finite
  (forward), or the last step where its gradient is non-finite (backward:
  where the backward pass first produces it), and the rows there.

  >>> def step(x_t, states):  # Divides by a state that reaches zero.
  ...   s = states[0] - 1.
  ...   return x_t / s, [s]
  >>> report = stepper.verify.find_nonfinite(
  ...     step, tf.ones([2, 5, 1]), initial_states=[tf.constant([[9.], [2.]])])
  >>> f = report.first("forward"); (f.kind, f.step, f.rows)
  ('output', 1, (1,))

  Args:
    step: Any step (Keras step model, RNN cell, callable, `Step`, stack).
    inputs: Tensor or nest, each leaf `[batch, time, ...]`.
    initial_states: Nest like the step's states, each `[batch, ...]`.
      Defaults to the step's initial state; required for a callable.
    loss: Maps the outputs (nested like `y_t`, each `[batch, time, ...]`)
      to a scalar for the backward pass. Default: the mean squared output.
    training: Passed to the step at every call.

  Returns:
    A `NonfiniteReport`: `first("forward")`, `first("backward")`, `ok`,
    `to_dict()`, and a table when printed.

  Raises:
    ValueError: For malformed inputs or states, as in `model_rnn`.
    RuntimeError: Inside `tf.function`.
  """
  step = steps_lib.as_step(step)
  inputs, batch, time = _check_inputs(inputs)
  if initial_states is None:
    initial_states = step.initial_state(batch)
  if loss is None:
    loss = _mean_square
  states = tf.nest.map_structure(tf.convert_to_tensor, initial_states)
  d = tf.nest.map_structure(
      lambda s: tf.zeros([batch, time] + s.shape[1:].as_list(), s.dtype),
      states)
  watched = [x for x in tf.nest.flatten(inputs) if x.dtype.is_floating]
  with tf.GradientTape() as tape:
    tape.watch([watched, d])
    outputs, _, all_states = engine.model_rnn(
        _with_state_probe(step), (inputs, d), states,
        return_all_states=True, training=training)
    value = loss(outputs)
  d_states, d_inputs = tape.gradient(
      value, [d, watched], unconnected_gradients=tf.UnconnectedGradients.ZERO)
  return NonfiniteReport(
      f"find_nonfinite({step.name})", time,
      _findings(inputs, states, outputs, all_states, d_states, d_inputs))


def _findings(inputs, states, outputs, all_states, d_states,
              d_inputs) -> list[Finding]:
  """Every non-finite quantity, forward in step order, then backward."""
  candidates = []
  for name, s in zip(_checks.leaf_paths(states, "initial_states"),
                     tf.nest.flatten(states)):
    candidates.append((_FORWARD, "initial state", name,
                       s.numpy()[:, None], False))
  float_inputs = []
  for name, x in zip(_checks.leaf_paths(inputs, "inputs"),
                     tf.nest.flatten(inputs)):
    candidates.append((_FORWARD, "input", name, x.numpy(), False))
    if x.dtype.is_floating:
      float_inputs.append(name)
  for kind, prefix, nest, last in (
      ("output", "outputs", outputs, False),
      ("state", "states", all_states, False),
      ("state gradient", "states", d_states, True)):
    for name, v in zip(_checks.leaf_paths(nest, prefix),
                       tf.nest.flatten(nest)):
      candidates.append((_BACKWARD if last else _FORWARD, kind, name,
                         np.asarray(v), last))
  for name, g in zip(float_inputs, d_inputs):
    candidates.append((_BACKWARD, "input gradient", name, np.asarray(g),
                       True))
  findings = [f for f in (_scan(*c) for c in candidates) if f is not None]
  order = lambda f: (f.pass_name != _FORWARD,
                     f.step if f.pass_name == _FORWARD else -f.step,
                     _KINDS.index(f.kind))
  return sorted(findings, key=order)
