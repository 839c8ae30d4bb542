"""Gradient verification: reports against control models and finite differences.

Three questions a user writing a new recurrence asks, each answered with one
call:

* `compare`: does my step, run through the engine, give the outputs, loss and
  gradients of a trusted full-sequence Keras model (`SimpleRNN`, `GRU`,
  `LSTM`, a stack of them, any user model) with the same weights?
* `numerical`: do the engine's analytic gradients agree with float64 finite
  differences (`tf.test.compute_gradient`)? No control model needed.
* `gradient_horizon`: how far back in time (and down a stack) does the
  gradient of a loss reach, with full BPTT and with a truncation window?

`compare` and `numerical` return a `GradientReport`: one row per compared
quantity, printable as a table, serialisable with `to_dict`, and
`assert_ok()` for tests. Run `python -m stepper.verify --cell=gru` for a
report on a built-in cell.
"""

import dataclasses
import functools
from typing import Any, Callable, Mapping, Sequence

from absl import app
from absl import flags
import keras
import numpy as np
import tensorflow as tf

from stepper import _checks
from stepper._nonfinite import Finding, NonfiniteReport, find_nonfinite
from stepper import engine
from stepper import steps as steps_lib
from stepper.bidirectional import bidirectional

Nest = Any

# Finite differences cannot reach the float64 analytic tolerance: the central
# difference error is ~eps_64 * |loss| / epsilon + epsilon**2 * |f'''|, about
# 1e-10 for epsilon = 1e-6, so the comparison allows 1e-6 (normwise).
_NUMERICAL_RTOL = 1e-6
_STATUS = {True: "ok", False: "FAIL"}


def default_tolerance(dtype: Any) -> float:
  """Relative tolerance for a dtype: float64 1e-10, else 1e-5."""
  return 1e-10 if tf.as_dtype(dtype) == tf.float64 else 1e-5


@dataclasses.dataclass(frozen=True)
class Row:
  """One compared quantity of a `GradientReport`.

  Errors are normwise: `max_rel_error = max |actual - expected| /
  max |expected|`, so tiny entries of a large tensor do not fail on noise.
  The row passes if `max_abs_error <= atol + rtol * max |expected|`.

  Attributes:
    name: What was compared, e.g. `grad gru_cell/kernel` or `outputs`.
    kind: `"output"`, `"loss"`, `"gradient"` or `"weight"`.
    max_abs_error: `max |actual - expected|` (`inf` if one side is missing).
    max_rel_error: `max_abs_error / max |expected|`.
    cosine: Cosine similarity of the flattened tensors (1 if both are 0).
    rtol: Relative (normwise) tolerance used.
    atol: Absolute tolerance used.
    ok: Whether the row passes.
    note: Why a row failed beyond its numbers (e.g. a missing gradient), or
      what was sampled.
  """
  name: str
  kind: str
  max_abs_error: float
  max_rel_error: float
  cosine: float
  rtol: float
  atol: float
  ok: bool
  note: str = ""


class GradientReport:
  """Rows of compared quantities, each with its errors and pass/fail.

  >>> report = stepper.verify.compare(cell, keras.layers.GRU(
  ...     8, return_sequences=True), x)
  >>> report.ok, [row.name for row in report.failures]
  (True, [])
  >>> print(report)   # an aligned table
  """

  def __init__(self, title: str, rows: Sequence[Row]):
    self.title = title
    self.rows = list(rows)

  @property
  def ok(self) -> bool:
    """Whether every row passes."""
    return all(row.ok for row in self.rows)

  @property
  def failures(self) -> list[Row]:
    """The failing rows."""
    return [row for row in self.rows if not row.ok]

  def row(self, name: str) -> Row:
    """The row called `name`.

    Raises:
      KeyError: If no row has that name.
    """
    for row in self.rows:
      if row.name == name:
        return row
    raise KeyError(f"No row {name!r}; rows are {[r.name for r in self.rows]}.")

  def to_dict(self) -> dict:
    """A JSON-serialisable dict: title, ok and every row's fields."""
    return {"title": self.title, "ok": self.ok,
            "rows": [dataclasses.asdict(row) for row in self.rows]}

  def assert_ok(self) -> None:
    """Raises `AssertionError` listing every failing row (and the table)."""
    if self.ok:
      return
    lines = [f"  {r.name}: max |err| {r.max_abs_error:.3g} > atol "
             f"{r.atol:g} + rtol {r.rtol:g} * max |expected| (rel "
             f"{r.max_rel_error:.3g}, cosine {r.cosine:.6f}){_note(r)}"
             for r in self.failures]
    raise AssertionError(f"{len(lines)} of {len(self.rows)} rows fail in "
                         f"{self.title}:\n" + "\n".join(lines) +
                         f"\n\n{self}")

  def __str__(self) -> str:
    header = ("quantity", "max|err|", "max rel", "cosine", "rtol", "status")
    body = [(r.name, f"{r.max_abs_error:.3e}", f"{r.max_rel_error:.3e}",
             f"{r.cosine:.9f}", f"{r.rtol:.0e}", _STATUS[r.ok] + _note(r))
            for r in self.rows]
    widths = [max(len(line[i]) for line in [header] + body)
              for i in range(len(header) - 1)]
    lines = ["  ".join(cell.ljust(w) if i == 0 else cell.rjust(w)
                       for i, (cell, w) in enumerate(zip(line, widths)))
             + "  " + line[-1] for line in [header] + body]
    verdict = "PASS" if self.ok else f"FAIL ({len(self.failures)} rows)"
    return f"{self.title}: {verdict}\n" + "\n".join(lines)

  def __repr__(self) -> str:
    return (f"GradientReport({self.title!r}, {len(self.rows)} rows, "
            f"ok={self.ok})")


def _note(row: Row) -> str:
  return f" ({row.note})" if row.note else ""


def _compare_values(name: str, kind: str, actual: Any, expected: Any,
                    rtol: float, atol: float, note: str = "") -> Row:
  """A `Row` for `actual` against the reference `expected` (either may be
  `None`: a missing gradient)."""
  if actual is None or expected is None:
    if actual is None and expected is None:
      return Row(name, kind, 0.0, 0.0, 1.0, rtol, atol, True,
                 "no gradient on either side")
    side = "step" if actual is None else "reference"
    return Row(name, kind, float("inf"), float("inf"), 0.0, rtol, atol, False,
               f"no gradient on the {side} side")
  a = np.asarray(tf.convert_to_tensor(actual), np.float64).ravel()
  e = np.asarray(tf.convert_to_tensor(expected), np.float64).ravel()
  if a.shape != e.shape:
    return Row(name, kind, float("inf"), float("inf"), 0.0, rtol, atol, False,
               f"{a.size} values vs {e.size} in the reference")
  max_abs = float(np.max(np.abs(a - e))) if a.size else 0.0
  scale = float(np.max(np.abs(e))) if e.size else 0.0
  max_rel = max_abs / scale if scale else (0.0 if max_abs == 0 else np.inf)
  norms = np.linalg.norm(a) * np.linalg.norm(e)
  if norms:
    cosine = float(np.dot(a, e) / norms)
  else:
    cosine = 1.0 if not (a.any() or e.any()) else 0.0
  ok = bool(max_abs <= atol + rtol * scale) and not np.isnan(max_abs)
  return Row(name, kind, max_abs, float(max_rel), cosine, rtol, atol, ok, note)


# ----------------------------------------------------------------- inputs --


def _float_inputs(value: Nest, name: str, dtype: tf.DType | None) -> Nest:
  """Converts a nest to tensors of `dtype` (default: its own float dtype).

  Raises:
    TypeError: For a non-floating leaf: gradients need floats.
  """
  value = tf.nest.map_structure(tf.convert_to_tensor, value)
  for path, leaf in zip(_checks.leaf_paths(value, name),
                        tf.nest.flatten(value)):
    if not leaf.dtype.is_floating:
      raise TypeError(
          f"{path} has dtype {leaf.dtype.name}; gradient verification needs "
          f"floating {name} (the gradient w.r.t. them is compared). Cast "
          f"them, e.g. tf.cast({name}, 'float32').")
  if dtype is None:
    return value
  return tf.nest.map_structure(lambda x: tf.cast(x, dtype), value)


def _resolve_dtype(dtype: Any, inputs: Nest) -> tf.DType:
  if dtype is not None:
    dtype = tf.as_dtype(dtype)
    if not dtype.is_floating:
      raise TypeError(f"`dtype` must be a floating dtype; got {dtype.name}.")
    return dtype
  return tf.nest.flatten(inputs)[0].dtype


def _check_variable_dtypes(variables: Sequence[tf.Variable], owner: str,
                           dtype: tf.DType) -> None:
  for v in variables:
    if tf.as_dtype(v.dtype) != dtype:
      raise ValueError(
          f"{owner} variable {_var_name(v)!r} has dtype "
          f"{tf.as_dtype(v.dtype).name}, but "
          f"the comparison runs in {dtype.name}. Build the {owner} with "
          f"dtype={dtype.name!r} (e.g. keras.layers.GRUCell(8, "
          f"dtype={dtype.name!r})).")


def _var_name(v: tf.Variable) -> str:
  return getattr(v, "path", None) or v.name


def _mean_square(outputs: Nest) -> tf.Tensor:
  """The default loss: mean squared output, summed over output leaves."""
  return tf.add_n([tf.reduce_mean(tf.square(y))
                   for y in tf.nest.flatten(outputs)])


# -------------------------------------------------------------- weights ----


def _lookup(variables: Sequence[tf.Variable], key: Any, side: str) -> int:
  """Index of the variable named by `key`: an index, a path, a name, or the
  end of a path after a `/` (e.g. `"simple_rnn_cell/bias"`)."""
  if isinstance(key, int) and not isinstance(key, bool):
    if not 0 <= key < len(variables):
      raise ValueError(f"`weight_map` names {side} variable {key}, but the "
                       f"{side} has {len(variables)} trainable variables.")
    return key
  matches = [i for i, v in enumerate(variables)
             if key in (_var_name(v), v.name)
             or _var_name(v).endswith("/" + str(key))]
  if len(matches) != 1:
    raise ValueError(
        f"`weight_map` key {key!r} matches {len(matches)} {side} variables; "
        f"it must match one of {[_var_name(v) for v in variables]} (or be "
        "an index).")
  return matches[0]


def _pair_variables(step_vars: Sequence[tf.Variable],
                    control_vars: Sequence[tf.Variable],
                    weight_map: Mapping[Any, Any] | None) -> list[tuple]:
  """`(step_variable, control_variable)` pairs, by order or by `weight_map`.

  Raises:
    ValueError: Naming the first variable without a counterpart or the first
      pair whose shapes differ.
  """
  if weight_map is None:
    pairs = list(zip(step_vars, control_vars))
    if len(step_vars) != len(control_vars):
      extra = (f"step variable {len(control_vars)} "
               f"{_var_name(step_vars[len(control_vars)])!r}"
               if len(step_vars) > len(control_vars) else
               f"control variable {len(step_vars)} "
               f"{_var_name(control_vars[len(step_vars)])!r}")
      raise ValueError(
          f"Cannot map weights by order: the step has {len(step_vars)} "
          f"trainable variables and the control {len(control_vars)}; "
          f"{extra} has no counterpart. Pass `weight_map`.")
  else:
    pairs = [(step_vars[_lookup(step_vars, s, "step")],
              control_vars[_lookup(control_vars, c, "control")])
             for s, c in dict(weight_map).items()]
    for side, variables, used in (
        ("step", step_vars, [p[0] for p in pairs]),
        ("control", control_vars, [p[1] for p in pairs])):
      missing = [v for v in variables if not any(v is u for u in used)]
      if missing:
        raise ValueError(
            f"`weight_map` leaves {side} variable {_var_name(missing[0])!r} "
            "unmapped; every trainable variable of both models must appear "
            "once so that its gradient can be compared.")
  for i, (s, c) in enumerate(pairs):
    if s.shape != c.shape:
      raise ValueError(
          f"Cannot map weights: step variable {i} {_var_name(s)!r} has shape "
          f"{tuple(s.shape)} but control variable {_var_name(c)!r} has shape "
          f"{tuple(c.shape)}. Check that both models have the same layers "
          "and units, or pass `weight_map`.")
  return pairs


# -------------------------------------------------------------- compare ----


def _step_runner(step: Any, control: Any, inputs: Nest,
                 initial_states: Nest | None, mask: Any):
  """`(run, name, variables)` for a step, or for a `(forward, backward)`
  pair run by `stepper.bidirectional` with the control's `merge_mode`."""
  if isinstance(step, tuple) and len(step) == 2:
    forward, backward = (steps_lib.as_step(s) for s in step)
    merge_mode = getattr(control, "merge_mode", "concat")
    run = lambda: bidirectional(
        forward, backward, inputs, initial_states, mask=mask,
        merge_mode=merge_mode)[0]
    return (run, f"bidirectional({forward.name}, {backward.name})",
            lambda: forward.trainable_variables + backward.trainable_variables)
  adapted = steps_lib.as_step(step)
  run = lambda: engine.model_rnn(adapted, inputs, initial_states, mask=mask)[0]
  return run, adapted.name, lambda: adapted.trainable_variables


def _call_control(control: Callable, inputs: Nest, initial_states: Nest,
                  mask: Any) -> Nest:
  kwargs = {}
  if initial_states is not None:
    kwargs["initial_state"] = initial_states
  if mask is not None:
    kwargs["mask"] = mask
  return control(inputs, **kwargs)


def _output_alignment(step_outputs: Nest, control_outputs: Nest) -> str:
  """`"sequence"` or `"last"` (the control returns only the last step).

  Raises:
    ValueError: If the outputs are nested or shaped differently.
  """
  try:
    tf.nest.assert_same_structure(step_outputs, control_outputs,
                                  check_types=False)
  except (ValueError, TypeError):
    raise ValueError(
        "The step's outputs are nested as "
        f"{_checks.nesting(step_outputs)} but the "
        "control's as "
        f"{_checks.nesting(control_outputs)}.") from None
  pairs = list(zip(tf.nest.flatten(step_outputs),
                   tf.nest.flatten(control_outputs)))
  if all(s.shape == c.shape for s, c in pairs):
    return "sequence"
  if all(s.shape[:1] + s.shape[2:] == c.shape for s, c in pairs):
    return "last"
  s, c = next((s, c) for s, c in pairs if s.shape != c.shape)
  raise ValueError(
      f"The step's outputs have shape {_checks.shape_str(s.shape)} ([batch, "
      f"time, ...]) but the control's have shape {_checks.shape_str(c.shape)};"
      " expected the same shape, or [batch, ...] for a control returning "
      "only the last step. Check `units` and `return_sequences`.")


def _aligned(outputs: Nest, alignment: str) -> Nest:
  if alignment == "sequence":
    return outputs
  return tf.nest.map_structure(lambda y: y[:, -1], outputs)


def _gradients(run: Callable[[], Nest], loss: Callable, watched: list,
               variables: list) -> tuple:
  """Outputs, loss and gradients w.r.t. `watched` tensors and `variables`."""
  with tf.GradientTape() as tape:
    tape.watch(watched)
    outputs = run()
    value = loss(outputs)
  grads = tape.gradient(value, [watched, variables],
                        unconnected_gradients=tf.UnconnectedGradients.NONE)
  return outputs, value, grads[0], grads[1]


def _input_names(inputs: Nest, initial_states: Nest | None) -> list[str]:
  """Row names of the input (and initial state) gradients, leaf by leaf."""
  names = _checks.leaf_paths(inputs, "grad inputs")
  if initial_states is not None:
    names += _checks.leaf_paths(initial_states, "grad initial_states")
  return names


def compare(step: Any, control: Callable, inputs: Nest, *,
            loss: Callable[[Nest], tf.Tensor] | None = None,
            initial_states: Nest | None = None, mask: Any = None,
            weight_map: Mapping[Any, Any] | None = None,
            dtype: Any = None, rtol: float | None = None, atol: float = 0.0,
            copy_weights: bool = True) -> GradientReport:
  """Compares a step run by the engine with a full-sequence control model.

  Both run on the same inputs with the same weights; the report compares
  their outputs, their loss and the gradient of the loss w.r.t. every
  trainable variable, the inputs and (if given) the initial states.

  Weights are copied from the step to the control (your step is never
  changed): the i-th trainable variable of the step to the i-th of the
  control, which must agree in count and shapes, or as `weight_map` says.

  >>> cell = keras.layers.GRUCell(8)
  >>> control = keras.layers.GRU(8, return_sequences=True)
  >>> x = tf.random.normal([4, 10, 3])
  >>> stepper.verify.compare(cell, control, x).assert_ok()

  Args:
    step: A step (Keras step model, RNN cell, callable, `Step` or a stack),
      run with `stepper.model_rnn`; or a tuple `(forward_step,
      backward_step)`, run with `stepper.bidirectional` and the control's
      `merge_mode` (for a `keras.layers.Bidirectional` control).
    control: A full-sequence Keras layer or model mapping `inputs` `[batch,
      time, ...]` to outputs `[batch, time, ...]` (or `[batch, ...]`: then
      the step's last output is compared), e.g. `keras.layers.LSTM(8,
      return_sequences=True)` or a `keras.Sequential` stack. It is called as
      `control(inputs, initial_state=..., mask=...)`, the keywords only when
      given.
    inputs: Tensor or nest, each leaf floating `[batch, time, ...]`.
    loss: Maps outputs (nested like the step's) to a scalar. Default: mean
      squared output.
    initial_states: Nest like the step's states, each `[batch, ...]`; passed
      to the control as `initial_state`. Their gradients are compared too.
    mask: bool `[batch, time]`, passed to both (Keras carry-forward masking).
    weight_map: Explicit pairing `{step_key: control_key}`; a key is an index
      into `trainable_variables`, a variable path/name, or a path's unique
      end (e.g. `"gru_cell/bias"`). Every trainable
      variable of both models must appear once.
    dtype: The dtype to run in; inputs and states are cast to it. Both models
      must already be built for it (e.g. `keras.layers.GRUCell(8,
      dtype="float64")`): `compare` does not rebuild models. Default: the
      inputs' dtype. Also picks the default tolerance.
    rtol: Relative (normwise) tolerance; default `default_tolerance(dtype)`
      (float64 1e-10, else 1e-5).
    atol: Absolute tolerance.
    copy_weights: If False, weights are only paired, not copied (the models
      were set up by the caller), and a `weight` row checks each pair's values.

  Returns:
    A `GradientReport` whose "actual" side is the step, reference the control.

  Raises:
    TypeError: For non-floating inputs or dtype.
    ValueError: If the weights cannot be mapped (naming the first mismatch),
      a variable has another dtype than `dtype`, or the outputs differ in
      nesting or shape.
  """
  dtype = _resolve_dtype(dtype, _float_inputs(inputs, "inputs", None))
  inputs = _float_inputs(inputs, "inputs", dtype)
  if initial_states is not None:
    initial_states = _float_inputs(initial_states, "initial_states", dtype)
  run_step, step_name, step_variables = _step_runner(
      step, control, inputs, initial_states, mask)
  run_control = lambda: _call_control(control, inputs, initial_states, mask)
  alignment = _output_alignment(run_step(), run_control())  # Also builds.
  step_vars = step_variables()
  control_vars = list(control.trainable_variables)
  _check_variable_dtypes(step_vars, "step", dtype)
  _check_variable_dtypes(control_vars, "control", dtype)
  pairs = _pair_variables(step_vars, control_vars, weight_map)
  rtol = default_tolerance(dtype) if rtol is None else rtol
  rows = []
  if copy_weights:
    for s, c in pairs:
      c.assign(s)
  else:
    rows += [_compare_values(f"weight {_var_name(s)}", "weight", s, c, rtol,
                             atol) for s, c in pairs]

  loss = loss or _mean_square
  watched = [inputs] + ([] if initial_states is None else [initial_states])
  y_s, loss_s, dx_s, dv_s = _gradients(
      lambda: _aligned(run_step(), alignment), loss, watched,
      [s for s, _ in pairs])
  y_c, loss_c, dx_c, dv_c = _gradients(run_control, loss, watched,
                                       [c for _, c in pairs])
  for name, a, e in zip(_checks.leaf_paths(y_s, "outputs"), tf.nest.flatten(y_s),
                        tf.nest.flatten(y_c)):
    rows.append(_compare_values(name, "output", a, e, rtol, atol))
  rows.append(_compare_values("loss", "loss", loss_s, loss_c, rtol, atol))
  for (s, _), a, e in zip(pairs, dv_s, dv_c):
    rows.append(_compare_values(f"grad {_var_name(s)}", "gradient", a, e,
                                rtol, atol))
  names = _input_names(inputs, initial_states)
  for name, a, e in zip(names, tf.nest.flatten(dx_s), tf.nest.flatten(dx_c)):
    rows.append(_compare_values(name, "gradient", a, e, rtol, atol))
  title = (f"compare {step_name} vs control "
           f"{getattr(control, 'name', type(control).__name__)!r} "
           f"({dtype.name})")
  return GradientReport(title, rows)


# ------------------------------------------------------------ numerical ----


def _sample(size: int, max_coordinates: int,
            rng: np.random.Generator) -> np.ndarray:
  if size <= max_coordinates:
    return np.arange(size)
  return np.sort(rng.choice(size, max_coordinates, replace=False))


def _finite_differences(f: Callable[[np.ndarray], tf.Tensor],
                        base: np.ndarray, coords: np.ndarray,
                        epsilon: float) -> np.ndarray:
  """Central differences of scalar `f(full)` at the `coords` of `base`."""
  flat = base.ravel()

  def partial(sub):
    full = tf.tensor_scatter_nd_update(
        tf.constant(flat), coords[:, None], sub)
    return f(tf.reshape(full, base.shape))

  _, numeric = tf.test.compute_gradient(partial, [flat[coords]],
                                        delta=epsilon)
  return numeric[0].ravel()


def numerical(step: Any, inputs: Nest, *, initial_states: Nest | None = None,
              loss: Callable[[Nest], tf.Tensor] | None = None,
              epsilon: float = 1e-6, max_coordinates: int = 24,
              seed: int = 0, rtol: float | None = None,
              atol: float = 0.0) -> GradientReport:
  """Checks the engine's analytic gradients against float64 finite
  differences.

  For every trainable variable of the step, every input leaf and every
  initial state leaf, central differences (`tf.test.compute_gradient`) of
  the loss are compared with the gradient a `tf.GradientTape` gets through
  `stepper.model_rnn`. Cost control: at most `max_coordinates` coordinates
  per tensor, sampled with `seed` (two engine runs each).

  >>> cell = keras.layers.LSTMCell(4, dtype="float64")
  >>> x = tf.random.normal([2, 5, 3], dtype=tf.float64)
  >>> stepper.verify.numerical(cell, x).assert_ok()

  Args:
    step: A step built (or buildable) in float64, e.g. a Keras cell created
      with `dtype="float64"`.
    inputs: Floating tensor or nest, each leaf `[batch, time, ...]`; cast to
      float64.
    initial_states: Nest like the step's states (required for a callable);
      cast to float64. Their gradients are checked too.
    loss: Maps the outputs to a scalar. Default: mean squared output.
    epsilon: Finite-difference step.
    max_coordinates: Most coordinates checked per tensor.
    seed: Seed of the coordinate sampling.
    rtol: Relative (normwise) tolerance; default 1e-6 (finite differences
      are accurate to ~1e-10 relative, not to float64's 1e-16).
    atol: Absolute tolerance.

  Returns:
    A `GradientReport` whose "actual" side is the analytic gradient.

  Raises:
    TypeError: For non-floating inputs or states.
    ValueError: If the step has a variable that is not float64, or
      `max_coordinates` is not a positive integer.
  """
  _checks.check_positive_int(max_coordinates, "max_coordinates")
  inputs = _float_inputs(inputs, "inputs", tf.float64)
  states = (None if initial_states is None else
            _float_inputs(initial_states, "initial_states", tf.float64))
  adapted = steps_lib.as_step(step)
  loss = loss or _mean_square
  run = tf.function(lambda x, s: loss(engine.model_rnn(adapted, x, s)[0]))
  run(inputs, states)  # Builds the step's variables.
  variables = adapted.trainable_variables
  _check_variable_dtypes(variables, "step", tf.float64)
  watched = [inputs] + ([] if states is None else [states])
  _, _, d_watched, d_vars = _gradients(
      lambda: engine.model_rnn(adapted, inputs, states)[0], loss, watched,
      variables)
  rtol = _NUMERICAL_RTOL if rtol is None else rtol
  rng = np.random.default_rng(seed)
  rows = []
  for v, grad in zip(variables, d_vars):
    rows.append(_numerical_row(
        f"grad {_var_name(v)}", v.numpy(), grad,
        lambda value, v=v: _run_with_variable(run, v, value, inputs, states),
        epsilon, max_coordinates, rng, rtol, atol))
  for i, (name, value, grad) in enumerate(zip(
      _input_names(inputs, states), tf.nest.flatten(watched),
      tf.nest.flatten(d_watched))):
    rows.append(_numerical_row(
        name, value.numpy(), grad,
        lambda new, i=i: _run_with_leaf(run, watched, i, new),
        epsilon, max_coordinates, rng, rtol, atol))
  return GradientReport(
      f"numerical {adapted.name} vs float64 finite differences "
      f"(epsilon {epsilon:g})", rows)


def _numerical_row(name, value, grad, f, epsilon, max_coordinates, rng,
                   rtol, atol) -> Row:
  coords = _sample(value.size, max_coordinates, rng)
  numeric = _finite_differences(f, value, coords, epsilon)
  analytic = None if grad is None else np.asarray(grad).ravel()[coords]
  note = (f"{coords.size} of {value.size} coords"
          if coords.size < value.size else "")
  return _compare_values(name, "gradient", analytic, numeric, rtol, atol,
                         note)


def _run_with_variable(run, variable, value, inputs, states) -> tf.Tensor:
  original = variable.numpy()
  variable.assign(value)
  try:
    return run(inputs, states)
  finally:
    variable.assign(original)


def _run_with_leaf(run, watched, index, value) -> tf.Tensor:
  flat = tf.nest.flatten(watched)
  flat[index] = value
  x, *s = tf.nest.pack_sequence_as(watched, flat)
  return run(x, s[0] if s else None)


# ----------------------------------------------------- gradient_horizon ----


@dataclasses.dataclass
class Horizon:
  """How far back the gradient of one step's loss reaches.

  Lag `k` is `k` steps before the loss step `t = loss_at`: `input_norms[k]`
  is `||dL_t / dx_{t-k}||` and `state_norms[k]` is `||dL_t / s_{t-k}||`
  where `s_{t-k}` is the state entering step `t-k` (the state after step
  `t-k-1`; `s_0` is the initial state). Norms are Frobenius norms over the
  batch and all leaves.

  Attributes:
    loss_at: The loss step `t` (non-negative).
    lags: `[t + 1]` ints `0..t`.
    input_norms: `[t + 1]` with full BPTT.
    state_norms: `[t + 1]` with full BPTT.
    state_norms_by_entry: `[n_entries, t + 1]`: per top-level state entry
      (for a stack: per layer, the vertical flow; for an LSTM cell: h and c).
    window: The truncation window, or `None`.
    boundaries: Steps `b <= t` before which a window of `window` steps
      (chunks `[0, window)`, `[window, 2 window)`, ...) cuts the gradient.
    truncated_input_norms, truncated_state_norms,
    truncated_state_norms_by_entry: As above with those cuts: zero beyond
      the last boundary. The state norm at a boundary is the gradient that
      reaches it and is dropped.
    lost_share: `{b: share}` for every boundary: the share of the weight
      gradient `g` of `L_t` that flows across `b`, `||g - g_cut_at_b|| /
      ||g||` (what truncating there loses; `nan` for a step without
      trainable variables).
  """
  loss_at: int
  lags: np.ndarray
  input_norms: np.ndarray
  state_norms: np.ndarray
  state_norms_by_entry: np.ndarray
  window: int | None = None
  boundaries: list = dataclasses.field(default_factory=list)
  truncated_input_norms: np.ndarray | None = None
  truncated_state_norms: np.ndarray | None = None
  truncated_state_norms_by_entry: np.ndarray | None = None
  lost_share: dict = dataclasses.field(default_factory=dict)

  def to_dict(self) -> dict:
    """A JSON-serialisable dict (arrays as lists)."""
    return {k: (v.tolist() if isinstance(v, np.ndarray) else v)
            for k, v in dataclasses.asdict(self).items()}


def _perturbed_step(inner: steps_lib.Step) -> steps_lib.Step:
  """A step reading `(x_t, d_t, cut_t)`: its incoming states are cut (no
  gradient) where `cut_t`, then `d_t` (zeros) is added, so `dL/dd_t` is the
  gradient w.r.t. the state entering step `t`."""

  def wrap(call):
    def fn(x, states, training):
      x_t, d_t, cut_t = x
      flat = [tf.where(tf.reshape(cut_t, [-1] + [1] * (s.shape.rank - 1)),
                       tf.stop_gradient(s), s) + d
              for s, d in zip(tf.nest.flatten(states), tf.nest.flatten(d_t))]
      return call(x_t, tf.nest.pack_sequence_as(states, flat), training)
    return fn

  return steps_lib.Step(
      wrap(inner), name=inner.name, state_specs=inner.state_specs,
      start_fn=lambda batch, training: wrap(inner.start(batch, training)),
      module=inner.module)


def _horizon_run(step: steps_lib.Step, inputs: Nest, states: Nest,
                 cuts: np.ndarray, loss_at: int, loss: Callable):
  """Per-time gradient norms of the inputs and states, and weight grads."""
  batch = tf.shape(tf.nest.flatten(inputs)[0])[0]
  time = tf.nest.flatten(inputs)[0].shape[1]
  d = tf.nest.map_structure(
      lambda s: tf.zeros(tf.concat([[batch, time], tf.shape(s)[1:]], 0),
                         s.dtype), states)
  cut = tf.broadcast_to(tf.constant(cuts)[None, :, None], [batch, time, 1])
  with tf.GradientTape() as tape:
    tape.watch([inputs, d])
    outputs = engine.model_rnn(step, (inputs, d, cut), states)[0]
    variables = step.trainable_variables  # Built by now.
    value = loss(tf.nest.map_structure(lambda y: y[:, loss_at], outputs))
  dx, dd, dv = tape.gradient(
      value, [inputs, d, variables],
      unconnected_gradients=tf.UnconnectedGradients.ZERO)

  def per_time(grads):  # [time]: norm over batch and features of each step.
    squares = [tf.reduce_sum(tf.square(tf.reshape(
        tf.transpose(g, [1, 0] + list(range(2, g.shape.rank))), [time, -1])),
        axis=1) for g in tf.nest.flatten(grads)]
    return np.sqrt(tf.add_n(squares).numpy())[:loss_at + 1][::-1]

  entries = dd if isinstance(dd, (list, tuple)) else [dd]
  by_entry = np.stack([per_time(e) for e in entries])
  weights = (np.concatenate([np.ravel(g) for g in dv]) if dv else
             np.zeros([0]))
  return per_time(dx), per_time(dd), by_entry, weights


def gradient_horizon(step: Any, inputs: Nest, *, loss_at: int = -1,
                     initial_states: Nest | None = None,
                     loss: Callable[[Nest], tf.Tensor] | None = None,
                     window: int | None = None) -> Horizon:
  """The norm of the gradient of the loss at one step w.r.t. the states and
  inputs `k` steps earlier, for every `k`, with full BPTT and truncation.

  >>> cell = keras.layers.GRUCell(8)
  >>> h = stepper.verify.gradient_horizon(cell, tf.random.normal([4, 30, 3]),
  ...                                     window=10)
  >>> h.state_norms[:3], h.truncated_state_norms[10:], h.lost_share
  (array([...]), array([0., ...]), {20: 0.03, 10: 0.001})

  Args:
    step: Any step (cell, step model, callable, `Step`, stack).
    inputs: Floating tensor or nest, each leaf `[batch, time, ...]`.
    loss_at: The step `t` whose output feeds the loss; negative counts from
      the end.
    initial_states: Nest like the step's states; required for a callable.
    loss: Maps the step's output at `loss_at` (`[batch, ...]` leaves) to a
      scalar. Default: mean squared output.
    window: Truncation window in steps (chunks from the start of the
      sequence), or `None` for full BPTT only.

  Returns:
    A `Horizon`.

  Raises:
    ValueError: If `loss_at` lies outside the sequence, `window` is not a
      positive integer, or the time dimension is not static.
    TypeError: For non-floating inputs.
  """
  inputs = _float_inputs(inputs, "inputs", None)
  adapted = steps_lib.as_step(step)
  time = tf.nest.flatten(inputs)[0].shape[1] if tf.nest.flatten(
      inputs)[0].shape.rank else None
  if time is None:
    raise ValueError("gradient_horizon needs inputs with a static time "
                     "dimension [batch, time, ...].")
  if isinstance(loss_at, bool) or not isinstance(loss_at, int) or not (
      -time <= loss_at < time):
    raise ValueError(f"`loss_at` must be an int step in [{-time}, {time}) "
                     f"(the inputs have {time} steps); got {loss_at!r}.")
  loss_at %= time
  if window is not None:
    _checks.check_positive_int(window, "window")
  states = (adapted.initial_state(tf.shape(tf.nest.flatten(inputs)[0])[0])
            if initial_states is None else
            _float_inputs(initial_states, "initial_states", None))
  wrapped = _perturbed_step(adapted)
  loss = loss or _mean_square
  run = lambda cuts: _horizon_run(wrapped, inputs, states, cuts, loss_at,
                                  loss)
  no_cut = np.zeros([time], bool)
  dx, ds, by_entry, full_weights = run(no_cut)
  horizon = Horizon(loss_at, np.arange(loss_at + 1), dx, ds, by_entry)
  if window is None:
    return horizon
  horizon.window = window
  horizon.boundaries = list(range(window, loss_at + 1, window))
  cuts = no_cut.copy()
  cuts[horizon.boundaries] = True
  (horizon.truncated_input_norms, horizon.truncated_state_norms,
   horizon.truncated_state_norms_by_entry, _) = run(cuts)
  full_norm = np.linalg.norm(full_weights)
  for b in horizon.boundaries:
    one_cut = no_cut.copy()
    one_cut[b] = True
    lost = np.linalg.norm(full_weights - run(one_cut)[3])
    horizon.lost_share[b] = float(lost / full_norm) if full_norm else (
        float("nan"))
  return horizon


# ------------------------------------------------------------------ CLI ----


_CELLS = {"lstm": (keras.layers.LSTMCell, keras.layers.LSTM),
          "gru": (keras.layers.GRUCell, keras.layers.GRU),
          "simple_rnn": (keras.layers.SimpleRNNCell, keras.layers.SimpleRNN)}


def _define_flags() -> dict:
  """The CLI's flags; defined only when run as a script, so importing
  `stepper.verify` defines no global flags."""
  return {
      "cell": flags.DEFINE_enum("cell", "gru", sorted(_CELLS),
                                "Built-in cell to verify."),
      "units": flags.DEFINE_integer("units", 8, "Units of the cell."),
      "time": flags.DEFINE_integer("time", 12, "Sequence length in steps."),
      "batch": flags.DEFINE_integer("batch", 4, "Batch size."),
      "features": flags.DEFINE_integer("features", 3,
                                       "Input features per step."),
      "dtype": flags.DEFINE_enum("dtype", "float64", ["float32", "float64"],
                                 "Dtype of models and inputs."),
      "seed": flags.DEFINE_integer("seed", 0, "Seed of weights and inputs."),
  }


def _main(holders: dict, argv: Sequence[str]) -> int:
  del argv  # Unused.
  value = {name: holder.value for name, holder in holders.items()}
  keras.utils.set_random_seed(value["seed"])
  cell_cls, layer_cls = _CELLS[value["cell"]]
  cell = cell_cls(value["units"], dtype=value["dtype"])
  control = layer_cls(value["units"], return_sequences=True,
                      dtype=value["dtype"])
  x = tf.random.normal([value["batch"], value["time"], value["features"]],
                       dtype=value["dtype"])
  report = compare(cell, control, x)
  print(report)
  return 0 if report.ok else 1


if __name__ == "__main__":
  _holders = _define_flags()
  app.run(functools.partial(_main, _holders))
