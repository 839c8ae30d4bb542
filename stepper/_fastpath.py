"""Engine fast paths that change how fast the loop runs, never what it computes.

Two mechanisms, found by profiling the engine's `tf.while_loop`:

1. `weights_read_once(step)`: the step's trainable Keras variables are read
   once, before the loop, and the loop body sees those tensors instead of a
   `ReadVariableOp` per step (a `keras.StatelessScope` maps each variable to
   its value). Graph mode saves the reads; under XLA it also stops the
   backward pass from stacking a copy of every weight per step (an
   accumulator of `[time, *weight.shape]`).
2. `output_array(spec, size, batch)`: under XLA, per-step outputs go into a
   preallocated `[time, batch, ...]` buffer through a `tf.custom_gradient`
   write whose backward pass returns only that step's slice of the incoming
   gradient. The gradient of `TensorArray.write` (a `TensorListSetItem`
   zeroing one slot) costs XLA two full copies of the `[time, batch, ...]`
   gradient on every backward step, so time grew with `time ** 2`.

3. `layer_dtype_scope(layer)`: Keras' autocast scope for a layer whose
   arithmetic runs outside its `__call__` (hoisting's input half and
   recurrent half of a Keras cell), so its weights are read in the dtype
   `__call__` would read them in.

4. `handles_from(variables, handles)`: not a speed-up but the one other
   reach into TensorFlow internals, kept here with the rest: `stepper.remat`
   recomputes segments inside a gradient function and needs the variables'
   forward-graph handles there.

`disabled()` turns 1 and 2 off: tests compare the two engines for exact
equality and the benchmark reports before/after numbers.

One visible difference: a layer that adds a loss inside the step (an
activity regularizer, `add_loss`) gets a clear `ValueError` while the loop is
traced; the plain engine let the per-step tensor escape the loop and failed
later with an `InaccessibleTensorError` where the loss was used.
"""

import contextlib
from typing import Any, Iterator

import keras
# Private APIs, for want of public ones: Keras' autocast scope (which
# `Layer.__call__` enters; Keras exports no way to enter it), whether an outer
# stateless scope is active, whether the graph is being built for XLA
# (`tf.function(jit_compile=True)`, also Keras' `jit_compile=True`), and
# XLA's own DynamicUpdateSlice (jax2tf relies on the same module).
from keras.src.backend.common import variables as keras_variables
from keras.src.backend.common.stateless_scope import in_stateless_scope
import tensorflow as tf
from tensorflow.compiler.tf2xla.python import xla as tfxla  # pylint: disable=g-direct-tensorflow-import
from tensorflow.python.ops import control_flow_util  # pylint: disable=g-direct-tensorflow-import

_enabled = True


@contextlib.contextmanager
def disabled() -> Iterator[None]:
  """Runs the plain engine: no weight hoisting, `TensorArray` outputs."""
  global _enabled
  previous, _enabled = _enabled, False
  try:
    yield
  finally:
    _enabled = previous


class _ReadOnceScope(keras.StatelessScope):
  """Maps variables to values read once; assignments still happen.

  `keras.StatelessScope` records every `assign` in the scope instead of
  applying it. Keras dropout advances a `SeedGenerator` state variable at
  every call, so recording would freeze the masks and lose the updates:
  here assignments go to the variable as they do outside any scope.
  """

  def __init__(self, state_mapping):
    super().__init__(state_mapping, collect_losses=True)

  def add_update(self, update):
    variable, value = update
    variable._direct_assign(value)  # pylint: disable=protected-access

  def add_loss(self, loss):
    raise ValueError(
        "A layer of the step added a loss (an activity regularizer or "
        "`add_loss`) inside stepper's loop; a per-step loss tensor cannot "
        "leave the loop. Return the penalty as part of the step's output and "
        "add it to the loss outside.")


def layer_dtype_scope(layer: keras.layers.Layer
                      ) -> contextlib.AbstractContextManager:
  """The autocast scope `layer.__call__` would run its `call` in.

  Keras casts float variables as they are read to the dtype of the active
  autocast scope, which `Layer.__call__` sets to the layer's compute dtype
  under a mixed policy (float32 weights read as float16) and resets for a
  float32 layer called inside a mixed-precision one. Code that does a
  layer's arithmetic outside its `__call__` enters this scope to read the
  weights as the layer would. The rules are those of Keras 3's
  `Layer.__call__`.

  Args:
    layer: A Keras layer.

  Returns:
    A context manager (a null one where `__call__` would change nothing).
  """
  current = keras_variables.get_autocast_scope()
  dtype = layer.compute_dtype
  if current is not None:
    if not layer.autocast or not keras.backend.is_float_dtype(dtype):
      return keras_variables.AutocastScope(None)
    if current.dtype != dtype:
      return keras_variables.AutocastScope(dtype)
  elif dtype != layer.variable_dtype:
    return keras_variables.AutocastScope(dtype)
  return contextlib.nullcontext()


def weights_read_once(step: Any) -> contextlib.AbstractContextManager:
  """A scope in which `step`'s trainable Keras variables are read once.

  Gradients are unchanged: the tape records each variable's one read, and
  the loop's tensors flow from it. Only trainable variables are mapped:
  non-trainable state (seed generators, moving statistics) is read and
  written per step as before. Eager execution (no loop graph) and an outer
  stateless scope (whose mapping must win) get no hoisting.

  Args:
    step: A `stepper.Step`.

  Returns:
    A context manager to trace the loop in.
  """
  return read_once(step.trainable_variables)[0]


def read_once(variables: list) -> tuple[contextlib.AbstractContextManager,
                                        dict[int, tf.Tensor]]:
  """A scope in which the Keras `variables` are read once, and the reads.

  Args:
    variables: Keras variables (others are ignored).

  Returns:
    `(scope, reads)`: `reads` maps `id` of each underlying `tf.Variable`
    (what a `tf.custom_gradient` sees) to the tensor the scope hands out for
    it; empty, with a null scope, where `weights_read_once` would not hoist.
  """
  variables = [v for v in variables if isinstance(v, keras.Variable)]
  if (not _enabled or not variables or tf.executing_eagerly()
      or in_stateless_scope()):
    return contextlib.nullcontext(), {}
  # Read in the variables' own dtype: the scope hands the mapped value to
  # each reader through the reader's autocast scope (a float32 read cast to
  # float16 here would reach a float32 layer's arithmetic rounded).
  with keras_variables.AutocastScope(None):
    mapping = [(v, tf.identity(v.value)) for v in variables]
  reads = {id(v._value): value  # pylint: disable=protected-access
           for v, value in mapping}
  return _ReadOnceScope(mapping), reads


@contextlib.contextmanager
def handles_from(variables: list[tf.Variable],
                 handles: list[tf.Tensor]) -> Iterator[None]:
  """Reads and writes `variables` through forward-graph `handles` meanwhile.

  A gradient function inside a `tf.while_loop` cannot capture a variable's
  eager handle: while_v2 only resolves captures that come from the forward
  loop body ("... is in list of internal_captures but not in
  internal_capture_to_output", also why `tf.recompute_grad` fails in graph
  loops). So while `stepper.remat` recomputes a segment, each variable uses
  the handle its forward body captured. `_handle` is a private attribute of
  TensorFlow's resource variables, for want of a public way to rebind one;
  restored on exit.

  Args:
    variables: `tf.Variable`s the recomputation reads or writes.
    handles: Their handles as the forward graph captured them (`[]`, eagerly:
      nothing to rebind).
  """
  if not handles:
    yield
    return
  saved = [v._handle for v in variables]  # pylint: disable=protected-access
  for variable, handle in zip(variables, handles):
    # An identity in the current (gradient) graph: what the tape watches is
    # what the ops read.
    variable._handle = tf.identity(handle)  # pylint: disable=protected-access
  try:
    yield
  finally:
    for variable, handle in zip(variables, saved):
      variable._handle = handle  # pylint: disable=protected-access


def in_xla() -> bool:
  """Whether the current graph is being compiled with XLA."""
  return control_flow_util.GraphOrParentsInXlaContext(
      tf.compat.v1.get_default_graph())


class SequenceBuffer(tf.experimental.ExtensionType):
  """A `[time, batch, ...]` buffer with `TensorArray`'s `write`/`stack`.

  Every slot must be written exactly once and the buffer must start as
  zeros: the gradient of `write` passes the incoming gradient through to the
  previous buffer unchanged instead of zeroing the written slot (which would
  copy the whole buffer); the only extra gradient reaches the initial zeros,
  a constant.
  """
  values: tf.Tensor

  def write(self, index: tf.Tensor, value: tf.Tensor) -> "SequenceBuffer":
    return SequenceBuffer(_write(self.values, value, index))

  def stack(self) -> tf.Tensor:
    return self.values


@tf.custom_gradient
def _write(values: tf.Tensor, value: tf.Tensor, index: tf.Tensor):
  # An XLA DynamicUpdateSlice, updated in place. `tensor_scatter_nd_update`
  # would add a bounds check that reads the buffer too, which stops XLA
  # from updating in place: a full copy per step.
  start = tf.concat([[index], tf.zeros([value.shape.rank], index.dtype)], 0)
  updated = tfxla.dynamic_update_slice(values, value[None], start)

  def grad(d_updated):
    return d_updated, tf.gather(d_updated, index), None

  return updated, grad


def output_array(spec: tf.TensorSpec, size: Any,
                 batch: tf.Tensor) -> tf.TensorArray | SequenceBuffer:
  """A per-step output array: a `SequenceBuffer` under XLA, else a
  `tf.TensorArray` (faster in graph mode, where the loop does not copy
  TensorArray gradients).

  Args:
    spec: Spec of one step's value, `[batch, ...]`.
    size: Number of steps: an int for the buffer; a tensor keeps a
      `TensorArray` (XLA needs static sizes anyway).
    batch: Batch size, a scalar tensor.
  """
  if _enabled and isinstance(size, int) and in_xla():
    shape = tf.concat([[size, batch], spec.shape[1:]], 0)
    return SequenceBuffer(tf.zeros(shape, spec.dtype))
  return tf.TensorArray(spec.dtype, size=size, element_shape=spec.shape)


def keras_producer(tensor: Any) -> tuple[Any, list] | None:
  """The operation that computed a symbolic Keras tensor, and its inputs.

  For `stepper._hoist`'s walk of a functional step model: Keras 3 lists a
  model's layers (`model.operations`) but exposes no public link from a
  `KerasTensor` to the call that produced it, so this reads the graph
  metadata `keras.Function` itself walks (`_keras_history`,
  `_inbound_nodes`).

  Args:
    tensor: A `KerasTensor` of a functional model.

  Returns:
    `(operation, input_tensors)`, or None for a model input (or a tensor
    with no history).
  """
  history = getattr(tensor, "_keras_history", None)
  if history is None or history[0] is None:
    return None
  operation, node_index, _ = history
  nodes = operation._inbound_nodes  # pylint: disable=protected-access
  node = nodes[node_index]
  if node.is_input:
    return None
  return operation, list(node.input_tensors)
