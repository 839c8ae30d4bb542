"""`compare`: a step run by the engine against a full-sequence control model.

Both run on the same inputs with the same weights (copied from the step, by
order or by a `weight_map`); the report compares outputs, loss and the
gradients w.r.t. every weight, the inputs and the initial states.
"""

from typing import Any, Callable, Mapping, Sequence

import tensorflow as tf

from stepper import _checks
from stepper import engine
from stepper import steps as steps_lib
from stepper.bidirectional import bidirectional
from stepper.verify import _common
from stepper.verify import report

Nest = Any


def _lookup(variables: Sequence[tf.Variable], key: Any, side: str) -> int:
  """Index of the variable named by `key`: an index, a path, a name, or the
  end of a path after a `/` (e.g. `"simple_rnn_cell/bias"`)."""
  if isinstance(key, int) and not isinstance(key, bool):
    if not 0 <= key < len(variables):
      raise ValueError(f"`weight_map` names {side} variable {key}, but the "
                       f"{side} has {len(variables)} trainable variables.")
    return key
  matches = [i for i, v in enumerate(variables)
             if key in (_common.var_name(v), v.name)
             or _common.var_name(v).endswith("/" + str(key))]
  if len(matches) != 1:
    raise ValueError(
        f"`weight_map` key {key!r} matches {len(matches)} {side} variables; "
        "it must match one of "
        f"{[_common.var_name(v) for v in variables]} (or be an index).")
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
               f"{_common.var_name(step_vars[len(control_vars)])!r}"
               if len(step_vars) > len(control_vars) else
               f"control variable {len(step_vars)} "
               f"{_common.var_name(control_vars[len(step_vars)])!r}")
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
            f"`weight_map` leaves {side} variable "
            f"{_common.var_name(missing[0])!r} "
            "unmapped; every trainable variable of both models must appear "
            "once so that its gradient can be compared.")
  for i, (s, c) in enumerate(pairs):
    if s.shape != c.shape:
      raise ValueError(
          f"Cannot map weights: step variable {i} {_common.var_name(s)!r} has "
          f"shape {tuple(s.shape)} but control variable "
          f"{_common.var_name(c)!r} has shape "
          f"{tuple(c.shape)}. Check that both models have the same layers "
          "and units, or pass `weight_map`.")
  return pairs


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
  _checks.check_same_nesting(
      step_outputs, control_outputs,
      lambda: f"The step's outputs are nested as "
      f"{_checks.nesting(step_outputs)} but the control's as "
      f"{_checks.nesting(control_outputs)}.")
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


def _check_compare_args(control: Any, weight_map: Any, rtol: Any,
                        atol: Any) -> None:
  if not callable(control):
    raise TypeError("`control` must be a full-sequence Keras layer or model "
                    f"(called on the inputs); got {control!r} of type "
                    f"{type(control).__name__}.")
  if weight_map is not None and not isinstance(weight_map, Mapping):
    raise TypeError("`weight_map` must be a dict {step variable: control "
                    "variable} (variables, names or indices); got a "
                    f"{type(weight_map).__name__}: {weight_map!r}.")
  if rtol is not None:
    _checks.check_number(rtol, "rtol", positive=False)
  _checks.check_number(atol, "atol", positive=False)


def compare(step: Any, control: Callable, inputs: Nest, *,
            loss: Callable[[Nest], tf.Tensor] | None = None,
            initial_states: Nest | None = None, mask: Any = None,
            weight_map: Mapping[Any, Any] | None = None,
            dtype: Any = None, rtol: float | None = None, atol: float = 0.0,
            copy_weights: bool = True) -> report.GradientReport:
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
    TypeError: For non-floating inputs or dtype, a `control` that is not
      callable, or a `weight_map` that is not a mapping.
    ValueError: For a negative or non-finite `rtol`/`atol` (every row would
      fail), if the weights cannot be mapped (naming the first mismatch),
      a variable has another dtype than `dtype`, or the outputs differ in
      nesting or shape.
  """
  _check_compare_args(control, weight_map, rtol, atol)
  dtype = _common.resolve_dtype(
      dtype, _common.float_inputs(inputs, "inputs", None))
  inputs = _common.float_inputs(inputs, "inputs", dtype)
  if initial_states is not None:
    initial_states = _common.float_inputs(initial_states, "initial_states",
                                          dtype)
  run_step, step_name, step_variables = _step_runner(
      step, control, inputs, initial_states, mask)
  run_control = lambda: _call_control(control, inputs, initial_states, mask)
  alignment = _output_alignment(run_step(), run_control())  # Also builds.
  step_vars = step_variables()
  control_vars = list(control.trainable_variables)
  _common.check_variable_dtypes(step_vars, "step", dtype)
  _common.check_variable_dtypes(control_vars, "control", dtype)
  pairs = _pair_variables(step_vars, control_vars, weight_map)
  rtol = report.default_tolerance(dtype) if rtol is None else rtol
  rows = []
  if copy_weights:
    for s, c in pairs:
      c.assign(s)
  else:
    rows += [report.compare_values(f"weight {_common.var_name(s)}", "weight",
                                   s, c, rtol, atol) for s, c in pairs]

  loss = loss or _common.mean_square
  watched = [inputs] + ([] if initial_states is None else [initial_states])
  y_s, loss_s, dx_s, dv_s = _common.gradients(
      lambda: _aligned(run_step(), alignment), loss, watched,
      [s for s, _ in pairs])
  y_c, loss_c, dx_c, dv_c = _common.gradients(run_control, loss, watched,
                                       [c for _, c in pairs])
  for name, a, e in zip(_checks.leaf_paths(y_s, "outputs"),
                        tf.nest.flatten(y_s), tf.nest.flatten(y_c)):
    rows.append(report.compare_values(name, "output", a, e, rtol, atol))
  rows.append(report.compare_values("loss", "loss", loss_s, loss_c, rtol, atol))
  for (s, _), a, e in zip(pairs, dv_s, dv_c):
    rows.append(report.compare_values(f"grad {_common.var_name(s)}",
                                      "gradient", a, e, rtol, atol))
  names = _common.input_names(inputs, initial_states)
  for name, a, e in zip(names, tf.nest.flatten(dx_s), tf.nest.flatten(dx_c)):
    rows.append(report.compare_values(name, "gradient", a, e, rtol, atol))
  title = (f"compare {step_name} vs control "
           f"{getattr(control, 'name', type(control).__name__)!r} "
           f"({dtype.name})")
  return report.GradientReport(title, rows)
