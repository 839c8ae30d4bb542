"""Argument validation (and naming) shared by the public entry points.

Every check raises `ValueError`/`TypeError` naming the argument, what was
expected and what was received. Static checks run at trace time where shapes
are known; `dynamic_assert_equal` covers dimensions only known at run time.
"""

from typing import Any, Callable, Sequence

import keras
import numpy as np
import tensorflow as tf


def leaf_paths(structure: Any, name: str) -> list[str]:
  """Readable names of every leaf of `structure`, e.g. `inputs['a'][1]`."""
  paths = []
  for path, _ in keras.tree.flatten_with_path(structure):
    paths.append(name + "".join(f"[{p!r}]" for p in path))
  return paths


def state_input_names(specs: Any) -> list[str]:
  """`the step's state input 1`, `... input 0['c']` for every state leaf."""
  names = []
  for path, _ in keras.tree.flatten_with_path(specs):
    if not isinstance(specs, (list, tuple)) or hasattr(specs, "_fields"):
      path = (0,) + tuple(path)
    names.append(f"the step's state input {path[0]}" +
                 "".join(f"[{p!r}]" for p in path[1:]))
  return names


def nesting(structure: Any) -> Any:
  """`structure` with every leaf replaced by '.': its nesting, for messages."""
  return tf.nest.map_structure(lambda _: ".", structure)


def check_same_nesting(given: Any, expected: Any,
                       message: Callable[[], str]) -> None:
  """Raises `ValueError(message())` unless `given` nests like `expected`.

  `message` is a callable so that a passing check formats nothing.
  """
  try:
    tf.nest.assert_same_structure(given, expected, check_types=False)
  except (ValueError, TypeError):
    raise ValueError(message()) from None


def shape_str(shape: tf.TensorShape | Sequence[int | None]) -> str:
  shape = tf.TensorShape(shape)
  if shape.rank is None:
    return "<unknown rank>"
  return str(tuple(shape.as_list()))


def check_positive_int(value: Any, name: str) -> int:
  if isinstance(value, bool) or not isinstance(value, int) or value < 1:
    raise ValueError(f"`{name}` must be a positive integer, got {value!r}.")
  return value


def check_rank_at_least(tensor: tf.Tensor, rank: int, name: str,
                        layout: str) -> None:
  if tensor.shape.rank is None:
    raise ValueError(f"{name} has unknown rank; expected rank >= {rank} "
                     f"({layout}).")
  if tensor.shape.rank < rank:
    raise ValueError(
        f"{name} has shape {shape_str(tensor.shape)} (rank "
        f"{tensor.shape.rank}); expected rank >= {rank} ({layout}).")


def merge_dim(dims: list[tuple[str, int | None]], what: str) -> int | None:
  """Returns the common static value of `dims` or raises naming the culprits.

  Args:
    dims: `(name, size)` pairs; `None` sizes are unknown and always agree.
    what: What the dimension is, e.g. "batch size".

  Returns:
    The known size, or `None` if no pair knows it.

  Raises:
    ValueError: If two known sizes differ.
  """
  known = [(n, d) for n, d in dims if d is not None]
  if not known:
    return None
  first_name, first = known[0]
  for n, d in known[1:]:
    if d != first:
      raise ValueError(
          f"{what} of {n} is {d}, but {first_name} has {what} {first}; "
          f"every input, state and mask must agree on the {what}.")
  return first


def dynamic_assert_equal(a: tf.Tensor, b: tf.Tensor, message: str) -> list:
  """A run-time equality check for graph mode (a no-op in XLA)."""
  if isinstance(a, int) and isinstance(b, int):
    if a != b:
      raise ValueError(message)
    return []
  return [tf.debugging.assert_equal(a, b, message=message)]


def is_float(dtype: tf.DType) -> bool:
  return tf.as_dtype(dtype).is_floating


def check_spec_compatible(value: tf.Tensor, spec: tf.TensorSpec, name: str,
                          expected_name: str, fix: str) -> None:
  """Shape/dtype agreement of a tensor with a step's declared spec."""
  if not value.shape.is_compatible_with(spec.shape):
    raise ValueError(
        f"{name} has shape {shape_str(value.shape)} but {expected_name} "
        f"expects {shape_str(spec.shape)}. {fix}")
  if value.dtype != spec.dtype:
    raise TypeError(
        f"{name} has dtype {value.dtype.name} but {expected_name} expects "
        f"{spec.dtype.name}. {fix}")


def check_batch_size(value: Any) -> int | tf.Tensor:
  """A batch size: a non-negative int, or a scalar integer tensor (checked
  for sign at run time, before any use, when its value is not known).

  Raises:
    TypeError: For a bool, a float, a string or a non-integer tensor.
    ValueError: For a negative value or a tensor that is not a scalar.
  """
  if isinstance(value, (bool, np.bool_)) or not (
      isinstance(value, (int, np.integer)) or tf.is_tensor(value)
      or isinstance(value, np.ndarray)):
    raise TypeError("`batch_size` must be an int or a scalar integer tensor; "
                    f"got {value!r} of type {type(value).__name__}.")
  if isinstance(value, (int, np.integer)):
    if value < 0:
      raise ValueError(f"`batch_size` must be >= 0; got {value!r}.")
    return int(value)
  value = tf.convert_to_tensor(value)
  if not value.dtype.is_integer:
    raise TypeError("`batch_size` must be an int or a scalar integer tensor; "
                    f"got a tensor of dtype {value.dtype.name}.")
  if value.shape.rank != 0:
    raise ValueError("`batch_size` must be a scalar; got a tensor of shape "
                     f"{shape_str(value.shape)}.")
  static = tf.get_static_value(value)
  if static is not None:
    return check_batch_size(int(static))
  check = tf.debugging.assert_non_negative(
      value, message="`batch_size` must be >= 0.")
  with tf.control_dependencies([check]):
    return tf.identity(value)


def check_loss(loss: Any) -> Any:
  """A loss: a Keras loss object or name (`"mse"`), or a callable
  `(y_true, y_pred) -> loss`. Returns it, a name resolved by Keras.

  Raises:
    ValueError: For a string that is not a Keras loss name.
    TypeError: For anything else that is not callable (e.g. `None`).
  """
  if isinstance(loss, str):
    try:
      return keras.losses.get(loss)
    except ValueError as e:
      raise ValueError(f"`loss` {loss!r} is not a Keras loss name: {e}") from e
  if not callable(loss):
    raise TypeError("`loss` must be a Keras loss (object or name) or a "
                    "callable (y_true, y_pred) -> per-example loss; got "
                    f"{loss!r} of type {type(loss).__name__}.")
  return loss


def gated(value: Any, checks: list) -> Any:
  """`value` (a nest of tensors) made to wait for run-time `checks`.

  An assertion that nothing reads may run after (or while) the ops it
  protects; feeding every use through an identity that depends on it makes
  it fire first.
  """
  if not checks:
    return value
  with tf.control_dependencies(checks):
    return tf.nest.map_structure(tf.identity, value)


def check_bool(value: Any, name: str) -> bool:
  """A Python (or numpy) bool: a string like "no" would read as True."""
  if not isinstance(value, (bool, np.bool_)):
    raise TypeError(f"`{name}` must be a bool; got {value!r} of type "
                    f"{type(value).__name__}.")
  return bool(value)


def check_number(value: Any, name: str, *, positive: bool) -> float:
  """A finite real number, `> 0` (`positive`) or `>= 0` (a tolerance).

  NaN and infinities pass every comparison they should fail (`nan <= 0` is
  False; a clip norm of `inf` gives `inf / inf = nan`), so they are named.

  Raises:
    ValueError: For a bool, a non-number, NaN, an infinity or a value out
      of range.
  """
  bound = "> 0" if positive else ">= 0"
  if (isinstance(value, (bool, np.bool_)) or
      not isinstance(value, (int, float, np.integer, np.floating)) or
      not np.isfinite(value) or value < 0 or (positive and value == 0)):
    raise ValueError(f"`{name}` must be a finite number {bound}; got "
                     f"{value!r}.")
  return float(value)


def check_no_none(value: Any, name: str, expected: str) -> None:
  """Raises naming the first `None` leaf of `value` (or `value` itself)."""
  for path, leaf in zip(leaf_paths(value, name), tf.nest.flatten(value)):
    if leaf is None:
      where = f"`{name}`" if path == name else path
      raise ValueError(f"{where} is None; expected {expected}.")


def unique_by_id(items: Any) -> list:
  """`items` in order, each object once (by identity: TensorFlow variables
  cannot go in a `set`)."""
  seen, unique = set(), []
  for item in items:
    if id(item) not in seen:
      seen.add(id(item))
      unique.append(item)
  return unique
