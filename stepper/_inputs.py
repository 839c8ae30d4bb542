"""Validation of what a run is given: inputs, initial states, the step's spec.

A private module with public names, shared by `model_rnn`, `stepper.chunking`
and `stepper.tbptt`: each entry point checks its inputs and states the same
way and raises the same messages.
"""

from typing import Any

import tensorflow as tf

from stepper import _checks
from stepper import _loop
from stepper import steps as steps_lib

Nest = Any


def flat_inputs(step: steps_lib.Step, inputs: Nest,
                time_major: bool) -> tuple[list, _loop.Dim, _loop.Dim]:
  """Validates `inputs`; returns their flat leaves, batch and time.

  Args:
    step: The `stepper.Step` the inputs are for.
    inputs: Tensor or nest, each leaf `[batch, time, ...]` (`[time, batch,
      ...]` with `time_major`).
    time_major: The layout of `inputs`.

  Returns:
    `(flat, batch, time)`: the leaves as tensors, in their layout, and the
    two dimensions.

  Raises:
    ValueError: If `inputs` is empty, a leaf has rank < 3, leaves disagree
      on batch or time, or they do not fit the step's declared input.
    TypeError: For a non-float input to a step that needs floats.
  """
  _checks.check_no_none(inputs, "inputs",
                        "a tensor or a nest of tensors [batch, time, ...]")
  if not tf.nest.flatten(inputs):
    raise ValueError(f"`inputs` is empty (got {inputs!r}); expected a tensor "
                     "or a nest of tensors [batch, time, ...].")
  inputs = tf.nest.map_structure(tf.convert_to_tensor, inputs)
  flat = tf.nest.flatten(inputs)
  names = _checks.leaf_paths(inputs, "inputs")
  layout = "[time, batch, ...]" if time_major else "[batch, time, ...]"
  for x, name in zip(flat, names):
    _checks.check_rank_at_least(x, 3, name, layout)
  b, t = (1, 0) if time_major else (0, 1)
  batch = _checks.merge_dim([(n, x.shape[b]) for n, x in zip(names, flat)],
                            "batch size")
  time = _checks.merge_dim([(n, x.shape[t]) for n, x in zip(names, flat)],
                           "number of time steps")
  checks = []  # Run-time checks of what is unknown statically.
  for axis, known, what in ((b, batch, "batch sizes"),
                            (t, time, "numbers of time steps")):
    other = known if known is not None else tf.shape(flat[0])[axis]
    for name, x in zip(names, flat):
      if x.shape[axis] is None and (known is not None or x is not flat[0]):
        checks += _checks.dynamic_assert_equal(
            tf.shape(x)[axis], other,
            f"{name} and the other inputs have different {what} (x: "
            f"{name}'s, y: theirs).")
  _check_input_spec(step, inputs, names,
                    [_loop.step_spec(x, time_major) for x in flat])
  # Every use of the inputs waits for the checks: none races the loop.
  flat = _checks.gated(flat, checks)
  return (flat, _loop.Dim(batch, _loop.size(flat[0], b)),
          _loop.Dim(time, _loop.size(flat[0], t)))


def time_major_inputs(step: steps_lib.Step, inputs: Nest,
                      time_major: bool) -> tuple[list, _loop.Dim, _loop.Dim]:
  """`flat_inputs`, each leaf time-major `[time, batch, ...]`."""
  flat, batch, time = flat_inputs(step, inputs, time_major)
  return ([x if time_major else _loop.swap_batch_time(x) for x in flat],
          batch, time)


def _check_input_spec(step: steps_lib.Step, inputs: Nest, names: list[str],
                      step_specs: list[tf.TensorSpec]) -> None:
  """Inputs against a step model's declared `x_t` input (when it has one)."""
  if step.input_spec is None:
    return
  _checks.check_same_nesting(
      inputs, step.input_spec,
      lambda: f"`inputs` is nested as {_checks.nesting(inputs)} but "
      f"{step.name} expects x_t nested as "
      f"{_checks.nesting(step.input_spec)}.")
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


def initial_states(step: steps_lib.Step, states: Nest | None,
                   batch: _loop.Dim) -> Nest:
  """Default or validated initial states, nested like the step's states.

  Args:
    step: The `stepper.Step` the states are for.
    states: The caller's `initial_states`, or None for the step's default.
    batch: The inputs' batch dimension.

  Returns:
    The states, each `[batch, ...]`, nested like the step's state specs.

  Raises:
    ValueError: If the states do not nest or shape like the step's, a state
      is a scalar, or batch sizes disagree.
    TypeError: For a state of the wrong dtype.
  """
  if states is None:
    return step.initial_state(batch.value)
  _checks.check_no_none(states, "initial_states",
                        "a tensor [batch, ...] for every state")
  states = tf.nest.map_structure(tf.convert_to_tensor, states)
  specs = step.state_specs
  checks = []  # Run-time checks of what is unknown statically.
  if specs is not None:
    n_given = len(states) if isinstance(states, (list, tuple)) else 1
    n_expected = len(specs) if isinstance(specs, (list, tuple)) else 1
    _checks.check_same_nesting(
        states, specs,
        lambda: f"`initial_states` has {n_given} state(s) nested as "
        f"{_checks.nesting(states)}, but {step.name} expects {n_expected} "
        f"nested as {_checks.nesting(specs)}.")
    states = tf.nest.pack_sequence_as(specs, tf.nest.flatten(states))
    names = _checks.leaf_paths(specs, "initial_states")
    expected = _checks.state_input_names(specs)
    for state, spec, name, exp in zip(tf.nest.flatten(states),
                                      tf.nest.flatten(specs), names, expected):
      _checks.check_spec_compatible(
          state, spec, name, exp,
          "Pass states shaped like the step's state inputs.")
      known = spec.shape[1:]
      if known.is_fully_defined() and not state.shape[1:].is_fully_defined():
        checks += [tf.debugging.assert_equal(
            tf.shape(state)[1:], known.as_list(),
            message=f"{name} must be shaped [batch] + {known.as_list()} "
            f"like {exp}; its shape after the batch is:")]
  names = _checks.leaf_paths(states, "initial_states")
  for name, state in zip(names, tf.nest.flatten(states)):
    if state.shape.rank == 0:
      raise ValueError(f"{name} is a scalar; states must be [batch, ...].")
    _checks.merge_dim([("inputs", batch.static), (name, state.shape[0])],
                      "batch size")
    if batch.static is None or state.shape[0] is None:
      checks += _checks.dynamic_assert_equal(
          tf.shape(state)[0], batch.value,
          f"{name} and the inputs have different batch sizes (x: {name}'s, "
          "y: the inputs').")
  return _checks.gated(states, checks)


def output_spec(step: steps_lib.Step, x_spec: Nest, states: Nest,
                training: Any) -> Nest:
  """Traces the step abstractly; checks its new states; returns y's spec.

  Args:
    step: A `stepper.Step`.
    x_spec: Spec of one step's input, leaves `[batch, ...]`.
    states: The states (tensors), nested like the step's states.
    training: Passed to the step.

  Returns:
    The spec of one step's output, leaves `[batch, ...]`.

  Raises:
    ValueError: If calling the step fails with one, or its new states differ
      from its states in nesting, shape or dtype.
    TypeError: If calling the step fails with one.
  """
  state_spec = tf.nest.map_structure(
      lambda s: tf.TensorSpec(s.shape, s.dtype), states)
  try:
    y_spec, new_spec = step.output_spec(x_spec, state_spec, training)
  except (ValueError, TypeError, tf.errors.InvalidArgumentError) as e:
    raise type(e)(
        f"Calling {step.name} on one step of `inputs` (x_t {x_spec}) and "
        f"the states {state_spec} failed: {e}") from e
  _checks.check_same_nesting(
      state_spec, new_spec,
      lambda: f"{step.name} returned new states nested as "
      f"{_checks.nesting(new_spec)} but its states are nested as "
      f"{_checks.nesting(state_spec)}; a step must return new states like "
      "its states.")
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
