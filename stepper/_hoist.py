"""Hoisting: a step's input half, computed for every time step at once.

Part of a recurrent step depends on `x_t` alone: `x_t @ kernel` in a Keras
cell, the `Dense`/`LayerNormalization` layers a step model applies to `x_t`
before it meets the state. Run per step, that work is a chain of small
`[batch, features] x [features, k * units]` matmuls (and as many in the
backward pass, plus the kernel's gradient accumulated step by step). Hoisted,
it is one `[time * batch, features] x [features, k * units]` matmul before the
loop, and the kernel's gradient one matmul after it; the loop runs only the
recurrent half. cuDNN and Keras' fused kernels do the same for their own
cells; this module does it for the steps stepper runs.

A split is `(project, core)`:

* `project(x, training, time_axis)` maps the whole input sequence (a nest of
  `[time, batch, ...]` leaves, or `[batch, time, ...]` with `time_axis=1`)
  to the projected sequence, in the same layout;
* `core(p_t, states, training) -> (y_t, new_states)` is the rest of the step.

`core(project(x)[t], states)` equals `step(x[t], states)` up to float
rounding (the sums are grouped differently): the tests hold the two to
float64 1e-10 and float32 1e-5.

Only what is known to be per-example and deterministic is hoisted: the three
built-in Keras cells (exact classes; a subclass may change `call`), and in a
functional step model the layers listed in `_PER_EXAMPLE_LAYERS` and the
elementwise `keras.ops` in `_ELEMENTWISE_OPS` whose inputs come from `x_t`
alone. Dropout, batch normalization, random layers, `Lambda` and any other
layer stay in the loop.
"""

import weakref
from typing import Any, Callable, NamedTuple

import keras
import tensorflow as tf

from stepper import _dropout
from stepper import _fastpath

Nest = Any


class Split(NamedTuple):
  """A step cut in two: its input half `project`, its recurrent half `core`.

  Attributes:
    project: `(x, training, time_axis) -> projected`, both nests of whole
      sequences in the same layout.
    core: The rest of the step, `(p_t, states, training) -> (y_t,
      new_states)`.
    module: What the core reads: an object with `trainable_variables` and
      `variables`, or None when the core is a `Step` (which knows them).
      Engines that declare the loop's variables (remat's custom gradient)
      must not list the input half's (it runs outside the loop).
    draws: Whether `project` draws what the whole step draws once per run
      (a dropout cell's input mask), so the core's run must not draw again.
  """
  project: Callable[[Nest, Any, int], Nest]
  core: Any
  module: Any = None
  draws: bool = False


class Variables:
  """A `module`: the variables one half of a split step reads."""

  def __init__(self, trainable: list, non_trainable: list):
    self.trainable_variables = list(trainable)
    self.variables = list(trainable) + list(non_trainable)


def over_sequence(fn: Callable[[Nest], Nest], x: Nest) -> Nest:
  """Applies a per-example `fn` to every step of `x` in one call.

  The two leading axes (time and batch, either order) are merged into one
  batch of `time * batch` rows, `fn` runs once, and the axes are split again.

  Args:
    fn: Maps a nest of `[n, ...]` leaves to a nest of `[n, ...]` leaves, row
      by row (no op may mix rows).
    x: Nest of `[time, batch, ...]` (or `[batch, time, ...]`) leaves.

  Returns:
    `fn`'s result with the two leading axes restored, `[time, batch, ...]`
    (or `[batch, time, ...]`).
  """
  flat = tf.nest.flatten(x)
  lead = tf.shape(flat[0])[:2]
  static_lead = flat[0].shape[:2]

  def merge(v):
    return tf.reshape(v, tf.concat([[-1], tf.shape(v)[2:]], 0))

  def split(v):
    out = tf.reshape(v, tf.concat([lead, tf.shape(v)[1:]], 0))
    out.set_shape(static_lead.concatenate(v.shape[1:]))
    return out

  merged = tf.nest.pack_sequence_as(x, [merge(v) for v in flat])
  for m, v in zip(tf.nest.flatten(merged), flat):
    m.set_shape(tf.TensorShape([None]).concatenate(v.shape[2:]))
  return tf.nest.map_structure(split, fn(merged))


# ---------------------------------------------------------------- Keras cells

_CELLS = (keras.layers.SimpleRNNCell, keras.layers.GRUCell,
          keras.layers.LSTMCell)


def cell_split(cell: Any, training: Any) -> Split | None:
  """The split of a built-in Keras cell, or None where it does not apply.

  The input half is Keras' own: `x @ kernel` and the bias the cell adds on
  the input side.

  Args:
    cell: Any object; only a built `SimpleRNNCell`, `GRUCell` or `LSTMCell`
      (exact class) without dropout splits.
    training: The run's training flag (unused without dropout).

  Both halves run in the autocast scope the cell's `__call__` would enter
  (`_fastpath.layer_dtype_scope`): a float32 cell called inside a
  mixed-precision layer (whose scope casts float32 weights to float16 as
  they are read) still reads float32 weights, as its `__call__` would.

  A cell with input `dropout` run with `training=True` splits too: its
  input half draws the run's input mask from the cell's own seed generator,
  as `keras.layers.RNN` does before its loop, and applies it to every step
  (`x_t * mask`: Keras' variational dropout, one mask per run).

  Returns:
    The `Split`, or None for any other object, an unbuilt cell, a cell
    computing in half precision (a mixed policy: one `[time * batch]`-row
    float16 sum rounds unlike Keras' per-step ones, and under float16 loss
    scaling the kernel's one-matmul gradient overflowed where Keras' did
    not, so the LossScaleOptimizer skipped a step Keras took), and, when
    `training` is True, a cell with `recurrent_dropout` or with `dropout`
    and `implementation=1` (Keras applies a row of the mask per gate
    there); a dropout cell with a tensor `training` (the draw would need a
    `tf.cond`). With `training` False or None Keras applies no dropout and
    an LSTM or GRU cell splits as without it (a `SimpleRNNCell` draws its
    mask even then, so it does not split).
  """
  if type(cell) not in _CELLS or not cell.built:
    return None
  if cell.compute_dtype != cell.variable_dtype:
    return None
  dropout = _dropout_split(cell, training)
  if dropout is None:
    return None
  if isinstance(cell, keras.layers.LSTMCell):
    core = _lstm_core(cell)
  elif isinstance(cell, keras.layers.GRUCell):
    core = _gru_core(cell)
  else:
    core = _simple_core(cell)
  recurrent = [cell.recurrent_kernel]
  if (cell.use_bias and isinstance(cell, keras.layers.GRUCell)
      and cell.reset_after):
    recurrent.append(cell.bias)  # Its recurrent half, bias[1].
  return Split(_cell_project(cell, dropout), _in_dtype_scope(cell, core),
               Variables(recurrent, []),  # The core reads no other.
               draws=dropout)


def _cast(value, dtype):
  """`value` in `dtype` when it is a float of another dtype, as Keras'
  `__call__` converts a layer's float arguments."""
  value = tf.convert_to_tensor(value)
  if value.dtype.is_floating and value.dtype != dtype:
    return tf.cast(value, dtype)
  return value


def _in_dtype_scope(cell, core: Callable) -> Callable:
  """`core` run as the cell's `__call__` runs `call`: arguments in the
  cell's compute dtype, weights read in its autocast scope."""
  def scoped(p, states, training):
    with _fastpath.layer_dtype_scope(cell):
      dtype = cell.compute_dtype
      return core(_cast(p, dtype), [_cast(s, dtype) for s in states],
                  training)

  return scoped


def _dropout_split(cell, training) -> bool | None:
  """Whether the cell's input half applies an input dropout mask (True),
  has no dropout to apply (False), or cannot split (None)."""
  if not (cell.dropout > 0 or cell.recurrent_dropout > 0):
    return False
  if tf.is_tensor(training):
    return None
  if training is not True:
    # Keras' SimpleRNNCell draws its mask even when not training (a seed
    # consumed per call); the others leave dropout alone.
    return None if isinstance(cell, keras.layers.SimpleRNNCell) else False
  if cell.recurrent_dropout > 0:
    return None
  if cell.dropout >= 1 or getattr(cell, "implementation", 2) == 1:
    return None  # No mask applied / a row of the mask per gate (Keras').
  return True


def _input_bias(cell) -> tf.Tensor | None:
  if not cell.use_bias:
    return None
  if isinstance(cell, keras.layers.GRUCell) and cell.reset_after:
    return cell.bias[0]  # bias[1] is added to the recurrent half.
  return cell.bias


def _cell_project(cell, dropout: bool) -> Callable:
  """The cell's input half; with `dropout`, the run's input mask applied
  first (drawn here, once per run)."""
  def project(x, training, time_axis):
    del training  # Decided by `cell_split`.
    with _fastpath.layer_dtype_scope(cell):
      x = _cast(x, cell.compute_dtype)  # As Keras' __call__ casts x_t.
      if dropout:
        batch = tf.shape(x)[1 - time_axis]
        (mask, _), = _dropout.draw([cell], batch)
        x = x * tf.expand_dims(mask, time_axis)
      kernel = tf.convert_to_tensor(cell.kernel)
      projected = over_sequence(lambda rows: tf.matmul(rows, kernel), x)
      bias = _input_bias(cell)
      return projected if bias is None else projected + bias

  return project


def _lstm_core(cell) -> Callable:
  def core(p, states, training):
    del training
    h, c = states
    z = p + tf.matmul(h, tf.convert_to_tensor(cell.recurrent_kernel))
    z0, z1, z2, z3 = tf.split(z, 4, axis=1)
    i = cell.recurrent_activation(z0)
    f = cell.recurrent_activation(z1)
    c = f * c + i * cell.activation(z2)
    o = cell.recurrent_activation(z3)
    h = o * cell.activation(c)
    return h, [h, c]

  return core


def _gru_core(cell) -> Callable:
  units = cell.units

  def core(p, states, training):
    del training
    h = states[0]
    kernel = tf.convert_to_tensor(cell.recurrent_kernel)
    x_z, x_r, x_h = tf.split(p, 3, axis=-1)
    if cell.reset_after:
      inner = tf.matmul(h, kernel)
      if cell.use_bias:
        inner = inner + cell.bias[1]
      r_z, r_r, r_h = tf.split(inner, 3, axis=-1)
    else:
      inner = tf.matmul(h, kernel[:, :2 * units])
      r_z, r_r = tf.split(inner, 2, axis=-1)
    z = cell.recurrent_activation(x_z + r_z)
    r = cell.recurrent_activation(x_r + r_r)
    if cell.reset_after:
      r_h = r * r_h
    else:
      r_h = tf.matmul(r * h, kernel[:, 2 * units:])
    hh = cell.activation(x_h + r_h)
    h = z * h + (1 - z) * hh
    return h, [h]

  return core


def _simple_core(cell) -> Callable:
  def core(p, states, training):
    del training
    h = states[0]
    out = p + tf.matmul(h, tf.convert_to_tensor(cell.recurrent_kernel))
    if cell.activation is not None:
      out = cell.activation(out)
    return out, [out]

  return core


# ------------------------------------------------------ functional step models

_PER_EXAMPLE_LAYERS = (
    keras.layers.Dense, keras.layers.EinsumDense, keras.layers.Embedding,
    keras.layers.LayerNormalization, keras.layers.Activation,
    keras.layers.ReLU, keras.layers.LeakyReLU, keras.layers.ELU,
    keras.layers.Softmax, keras.layers.Add, keras.layers.Subtract,
    keras.layers.Multiply, keras.layers.Average, keras.layers.Maximum,
    keras.layers.Minimum, keras.layers.Concatenate, keras.layers.Identity,
    keras.layers.Rescaling, keras.layers.Reshape, keras.layers.Flatten)

# `keras.ops` applied to KerasTensors become operations of these classes
# (`x * 2`, `keras.ops.tanh(x)`): elementwise, so row by row.
_ELEMENTWISE_OPS = frozenset({
    "Abs", "Absolute", "Add", "Cos", "Divide", "Elu", "Exp", "Gelu",
    "LeakyRelu", "Log", "Maximum", "Minimum", "Multiply", "Negative",
    "Power", "Relu", "Selu", "Sigmoid", "Silu", "Sin", "Softplus", "Sqrt",
    "Square", "Subtract", "Tanh", "TrueDivide"})


def _per_example(operation: Any) -> bool:
  """Whether `operation` is deterministic and computes row by row."""
  if type(operation) in _PER_EXAMPLE_LAYERS:
    if getattr(operation, "activity_regularizer", None) is not None:
      return False  # Its loss would be added outside the loop.
    if isinstance(operation, keras.layers.Embedding):
      return not operation.mask_zero  # The mask would not cross the cut.
    axis = getattr(operation, "axis", -1)  # Softmax, LayerNorm, Concatenate.
    axes = axis if isinstance(axis, (list, tuple)) else [axis]
    return 0 not in axes
  if isinstance(operation, keras.layers.Layer):
    return False
  return (type(operation).__module__.startswith("keras.src.ops.")
          and type(operation).__name__ in _ELEMENTWISE_OPS)


def _top_level(structure: Nest) -> list:
  if isinstance(structure, (list, tuple)) and not hasattr(structure, "_fields"):
    return list(structure)
  return [structure]


_MODEL_SPLITS = weakref.WeakKeyDictionary()


def model_split(model: keras.Model) -> Split | None:
  """The split of a functional step model with inputs `[x_t, *states]`.

  Every tensor that the model computes from `x_t` alone through per-example
  layers is hoisted; the loop runs the rest of the graph. Both halves are
  functional models over the same layers (shared weights), built once per
  model.

  Returns:
    The `Split` (its projection a list of tensors), or None when nothing
    but `x_t` itself would be hoisted, the model declares a fixed batch
    size, or it runs a Keras RNN cell with dropout.
  """
  if model not in _MODEL_SPLITS:
    _MODEL_SPLITS[model] = _model_split(model)
  return _MODEL_SPLITS[model]


def _has_dropout_cells(model: keras.Model) -> bool:
  """Whether a Keras RNN cell with dropout runs in the model (its masks are
  drawn per run by the whole step's `start`, which the core does not
  replay yet)."""
  layers = list(model.operations)
  while layers:
    layer = layers.pop()
    layers.extend(getattr(layer, "cells", []))  # StackedRNNCells.
    if hasattr(layer, "get_dropout_mask") and (
        getattr(layer, "dropout", 0) or getattr(layer, "recurrent_dropout", 0)):
      return True
  return False


def _model_split(model: keras.Model) -> Split | None:
  inputs = _top_level(model.input)
  x_leaves = tf.nest.flatten(inputs[0])
  if any(x.shape[0] is not None for x in x_leaves):
    return None  # A fixed batch size would reject `time * batch` rows.
  if _has_dropout_cells(model):
    return None
  outputs = tf.nest.flatten(model.output)
  cut = _cut(x_leaves, outputs)
  if all(any(t is x for x in x_leaves) for t in cut):
    return None
  project_model = keras.Model(inputs[0], cut, name=f"{model.name}_projection")
  # Each output once: Keras cannot cut a graph that returns a tensor twice
  # (a step model's `[h, h, c]`).
  unique = list({id(t): t for t in outputs}.values())
  where = [next(i for i, u in enumerate(unique) if u is t) for t in outputs]
  core_model = keras.Model([*cut, *inputs[1:]], unique,
                           name=f"{model.name}_core")

  def project(x, training, time_axis):
    del time_axis  # Row by row: either layout.
    return over_sequence(lambda v: tf.nest.flatten(
        project_model(v, training=training)), x)

  def core(p, states, training):
    flat = tf.nest.flatten(core_model([*p, *states], training=training))
    out = _top_level(tf.nest.pack_sequence_as(model.output,
                                              [flat[i] for i in where]))
    return out[0], list(out[1:])

  return Split(project, core, core_model)


def _cut(x_leaves: list, outputs: list) -> list:
  """The tensors computed from `x_t` alone that the rest of the graph reads
  (or that are outputs): the projection's outputs."""
  from_x = {}

  def x_only(tensor) -> bool:
    key = id(tensor)
    if key not in from_x:
      if any(tensor is x for x in x_leaves):
        from_x[key] = True
      else:
        producer = _fastpath.keras_producer(tensor)
        from_x[key] = (producer is not None and _per_example(producer[0])
                       and bool(producer[1])
                       and all(x_only(t) for t in producer[1]))
    return from_x[key]

  cut, seen = [], set()

  def visit(tensor):
    if id(tensor) in seen:
      return
    seen.add(id(tensor))
    if x_only(tensor):
      cut.append(tensor)
      return
    producer = _fastpath.keras_producer(tensor)
    for t in producer[1] if producer is not None else []:
      visit(t)

  for output in outputs:
    visit(output)
  return cut
