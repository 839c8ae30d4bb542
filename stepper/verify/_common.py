"""Helpers the verification modules share: inputs, dtypes, names, gradients.

A private module with public names (chex's `asserts_internal` style).
"""

from typing import Any, Callable, Sequence

import tensorflow as tf

from stepper import _checks

Nest = Any


def float_inputs(value: Nest, name: str, dtype: tf.DType | None) -> Nest:
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


def resolve_dtype(dtype: Any, inputs: Nest) -> tf.DType:
  if dtype is not None:
    dtype = tf.as_dtype(dtype)
    if not dtype.is_floating:
      raise TypeError(f"`dtype` must be a floating dtype; got {dtype.name}.")
    return dtype
  return tf.nest.flatten(inputs)[0].dtype


def check_variable_dtypes(variables: Sequence[tf.Variable], owner: str,
                           dtype: tf.DType) -> None:
  for v in variables:
    if tf.as_dtype(v.dtype) != dtype:
      raise ValueError(
          f"{owner} variable {var_name(v)!r} has dtype "
          f"{tf.as_dtype(v.dtype).name}, but "
          f"the comparison runs in {dtype.name}. Build the {owner} with "
          f"dtype={dtype.name!r} (e.g. keras.layers.GRUCell(8, "
          f"dtype={dtype.name!r})).")


def var_name(v: tf.Variable) -> str:
  return getattr(v, "path", None) or v.name


def mean_square(outputs: Nest) -> tf.Tensor:
  """The default loss: mean squared output, summed over output leaves."""
  return tf.add_n([tf.reduce_mean(tf.square(y))
                   for y in tf.nest.flatten(outputs)])



def gradients(run: Callable[[], Nest], loss: Callable, watched: list,
               variables: list) -> tuple:
  """Outputs, loss and gradients w.r.t. `watched` tensors and `variables`."""
  with tf.GradientTape() as tape:
    tape.watch(watched)
    outputs = run()
    value = loss(outputs)
  grads = tape.gradient(value, [watched, variables],
                        unconnected_gradients=tf.UnconnectedGradients.NONE)
  return outputs, value, grads[0], grads[1]


def input_names(inputs: Nest, initial_states: Nest | None) -> list[str]:
  """Row names of the input (and initial state) gradients, leaf by leaf."""
  names = _checks.leaf_paths(inputs, "grad inputs")
  if initial_states is not None:
    names += _checks.leaf_paths(initial_states, "grad initial_states")
  return names
