"""`StepRNN`: the engine as a Keras layer, a drop-in for `keras.layers.RNN`.

Keras attaches masks (`keras.layers.Masking`, `Embedding(mask_zero=True)`)
to the tensors flowing between layers; `StepRNN` receives that mask in `call`
and hands it to `stepper.model_rnn`, so masked steps are skipped exactly as
in `keras.layers.RNN`.
"""

from typing import Any

import keras
import tensorflow as tf

from stepper import _checks
from stepper import engine
from stepper import stacking
from stepper import steps as steps_lib

Nest = Any


@keras.saving.register_keras_serializable(package="stepper")
class StepRNN(keras.layers.Layer):
  """Runs a one-step model over the time axis, like `keras.layers.RNN`.

  >>> model = keras.Sequential([
  ...     keras.Input((None, 3)),
  ...     keras.layers.Masking(0.),
  ...     stepper.StepRNN(keras.layers.GRUCell(8, dropout=0.2)),
  ... ])
  >>> model(tf.random.normal([4, 20, 3]), training=True).shape
  TensorShape([4, 20, 8])

  What `keras.layers.RNN` code can rely on: its arguments (but
  `return_sequences` defaults to True here), `.cell`,
  `get_initial_state()`, bare `initial_state` tensors, `return_state`
  (`(outputs, *states)`, a stack's states one entry per layer, nested as
  Keras nests them), `stateful=True` with `reset_states()` (to zeros; the
  states in float32 variables under a mixed policy), dropout cells with
  `training=True`, masks (passed on unreversed after `go_backwards`),
  `compute_output_shape`, mixed precision (outputs and states in the layer's
  compute dtype) and `.keras` saving. A `stepper.stack` as the step exposes
  every layer's weights to Keras.

  Args:
    step: A Keras RNN cell (a list of cells: a `StackedRNNCells`, as in
      Keras), a functional step model with inputs `[x_t, *states]` and
      outputs `[y_t, *new_states]`, a `stepper.stack` of such steps, or a
      callable `(x_t, states) -> (y_t, new_states)` (a
      callable needs `initial_state` at call time and cannot be serialized).
    return_sequences: Return every output, `[batch, time, ...]`, or only the
      last one, `[batch, ...]`: the output at the last step run, i.e. the
      last valid output, or zeros with `zero_output_for_mask=True` where
      that step is masked (as `keras.layers.RNN`).
    return_state: Also return the final states: the layer returns the tuple
      `(outputs, *final_states)`. In a stack a cell's states nest as its
      `get_initial_state` nests them (a one-state cell without one: a bare
      tensor), and symbolically (`compute_output_shape`, functional models)
      as its `state_size` (an int: a bare tensor), both as Keras.
    go_backwards: Run from the last step to the first and, as
      `keras.layers.RNN(go_backwards=True)` does, return the sequence in
      reversed time order.
    stateful: Keras' stateful RNN: the final states of a call are the
      initial states of the next; the first call starts from the step's
      initial state and `reset_states()` sets them to zeros. The states live
      in variables (of the layer's variable dtype, float32 under a mixed
      policy, as Keras'), so the batch size must be fixed
      (`keras.Input(batch_size=...)`) and no gradient flows from one call
      into the previous ones.
      For the exact gradient across chunks of a long sequence, use
      `stepper.run_chunks`, or `stepper.StatefulRunner` for streaming.
    zero_output_for_mask: Output zeros (not the previous output) at masked
      steps.
    unroll: Steps per loop iteration (see `stepper.model_rnn`); Keras'
      `True` unrolls every step (the time dimension must be known), `False`
      is 1.
    hoist: Compute the step's input half for all steps before the loop (see
      `stepper.model_rnn`; off by default, as there).
    reverse_output_mask: With `go_backwards=True` and
      `return_sequences=True`, pass on to the next layer the input mask
      reversed like the returned sequence. `keras.layers.RNN` passes the
      input mask on unchanged (the default here), so on padded rows it no
      longer marks the padding of its reversed outputs: the next layer
      skips the wrong steps. Set this to mask the steps the outputs really
      hold padding at.
    **kwargs: `keras.layers.Layer` arguments (`name`, `dtype`, ...). The
      dtype defaults to the step's dtype policy when the step is a layer.

  Call arguments:
    sequences: `[batch, time, ...]`, or a nest of such tensors.
    mask: bool `[batch, time]`, usually set by Keras from an upstream layer.
    initial_state: States nested like the step's states, each `[batch, ...]`
      (a bare tensor or a flat list is accepted, as Keras accepts them).
    training: Passed to the step.

  Raises:
    TypeError: If `hoist` or `reverse_output_mask` is not a bool.
    ValueError: At build, if `stateful=True` and the batch size is unknown;
      at call, if a stateful layer gets another batch size.
  """

  def __init__(self, step: Any, return_sequences: bool = True,
               return_state: bool = False, go_backwards: bool = False,
               stateful: bool = False, zero_output_for_mask: bool = False,
               unroll: int | bool = 1, hoist: bool = False,
               reverse_output_mask: bool = False, **kwargs):
    _checks.check_bool(hoist, "hoist")
    _checks.check_bool(reverse_output_mask, "reverse_output_mask")
    if isinstance(step, (list, tuple)):  # As keras.layers.RNN.
      step = keras.layers.StackedRNNCells(step)
    if isinstance(step, keras.layers.Layer) and "dtype" not in kwargs:
      kwargs["dtype"] = step.dtype_policy
    super().__init__(**kwargs)
    self.step = step
    # Keras tracks the weights of the layers a stack holds through this list.
    self._stack_layers = (_keras_layers(step)
                          if isinstance(step, stacking.Stack) else [])
    self.return_sequences = return_sequences
    self.return_state = return_state
    self.go_backwards = go_backwards
    self.stateful = stateful
    self.zero_output_for_mask = zero_output_for_mask
    self.unroll = unroll
    self.hoist = hoist
    self.reverse_output_mask = reverse_output_mask
    self.supports_masking = True
    self.states = None  # Variables, with `stateful=True`, once built.
    self._num_states = None  # Learned at call time for a plain callable.

  def build(self, sequences_shape, initial_state_shape=None):
    step = steps_lib.as_step(self.step)
    if hasattr(self.step, "state_size") and not self.step.built:
      # A cell builds from one step's shape: the input's without time.
      self.step.build(_step_shape(sequences_shape))
    elif isinstance(self.step, stacking.Stack) and step.state_specs:
      # Tracing the stack once builds every layer (before weights load).
      step.output_spec(self._x_spec(sequences_shape), step.state_specs)
    if self.stateful:
      self._create_state_variables(sequences_shape)

  def call(self, sequences: Nest, mask: Any = None,
           initial_state: Nest | None = None,
           training: bool | None = None) -> Nest:
    step = steps_lib.as_step(self.step)
    if self.stateful:
      self._check_stateful_batch(sequences)
      if initial_state is None:
        initial_state = tf.nest.pack_sequence_as(
            step.state_specs, [tf.convert_to_tensor(v) for v in self.states])
    if initial_state is not None:
      initial_state = _as_states(step, initial_state)
    outputs, states = engine.model_rnn(
        self.step, sequences, initial_state, mask=_first_mask(mask),
        reverse=self.go_backwards, return_sequences=self.return_sequences,
        zero_output_for_mask=self.zero_output_for_mask,
        unroll=self._unroll(sequences), training=training, hoist=self.hoist)
    if self.go_backwards and self.return_sequences:
      outputs = tf.nest.map_structure(lambda y: tf.reverse(y, [1]), outputs)
    if (not self.return_sequences and self.zero_output_for_mask
        and _first_mask(mask) is not None):
      outputs = self._zero_if_last_step_masked(outputs, _first_mask(mask))
    if self.stateful:
      for variable, state in zip(self.states, tf.nest.flatten(states)):
        variable.assign(tf.cast(state, variable.dtype))
    # As keras.layers.RNN: results in the layer's compute dtype.
    outputs, states = tf.nest.map_structure(self._cast, (outputs, states))
    self._num_states = len(_top(states))
    if not self.return_state:
      return outputs
    return (outputs, *_top(states))  # A tuple, as keras.layers.RNN.

  def compute_output_spec(self, sequences: Nest, initial_state: Nest = None,
                          mask: Any = None, training: Any = None) -> Nest:
    """Keras tensors like `call`'s results, from one abstract step.

    A plain callable declares no states: Keras then traces `call`.
    """
    step = steps_lib.as_step(self.step)
    if step.state_specs is None:
      return keras.Operation.compute_output_spec(
          self, sequences, initial_state=initial_state, mask=mask,
          training=training)
    flat = tf.nest.flatten(sequences)
    x_spec = tf.nest.pack_sequence_as(
        sequences, [tf.TensorSpec(_step_shape(x.shape), self._float(x.dtype))
                 for x in flat])
    batch, time = flat[0].shape[0], flat[0].shape[1]
    y_spec, state_spec = step.output_spec(x_spec, step.state_specs)
    leading = (batch, time) if self.return_sequences else (batch,)
    tensor = lambda spec, lead: keras.KerasTensor(
        lead + tuple(spec.shape[1:]), dtype=self._float(spec.dtype))
    outputs = tf.nest.map_structure(lambda s: tensor(s, leading), y_spec)
    if not self.return_state:
      return outputs
    states = tf.nest.map_structure(lambda s: tensor(s, (batch,)), state_spec)
    return (outputs, *_declared_nesting(self.step, _top(states)))

  def compute_output_shape(self, sequences_shape,
                           initial_state_shape=None) -> Nest:
    """Shapes like `call`'s results: `(batch, time, units)` (or `(batch,
    units)`), then with `return_state` the states' shapes, nested as
    returned."""
    inputs = tf.nest.map_structure(
        lambda shape: keras.KerasTensor(shape, dtype=self.compute_dtype),
        sequences_shape, check_types=False) if _is_nested_shape(
            sequences_shape) else keras.KerasTensor(sequences_shape,
                                                    dtype=self.compute_dtype)
    return tf.nest.map_structure(lambda t: t.shape,
                                 self.compute_output_spec(inputs))

  def compute_mask(self, inputs: Nest, mask: Any = None) -> Any:
    """The input mask for returned sequences (as Keras, unreversed with
    `go_backwards` unless `reverse_output_mask`), else None; None for every
    returned state."""
    mask = _first_mask(mask)
    if mask is None or not self.return_sequences:
      output_mask = None
    elif self.go_backwards and self.reverse_output_mask:
      output_mask = keras.ops.flip(mask, 1)
    else:
      output_mask = mask
    if not self.return_state:
      return output_mask
    return [output_mask] + [None] * self._state_count()

  @property
  def cell(self) -> Any:
    """The step, as given (a list of cells as a `StackedRNNCells`): Keras'
    `RNN.cell` for a cell, and the step model, `stepper.stack` or callable
    itself otherwise (what advances one time step, whatever its kind)."""
    return self.step

  def get_initial_state(self, batch_size: int | tf.Tensor) -> list:
    """The states a call starts from without `initial_state`, as Keras'.

    Args:
      batch_size: Rows (an int or a scalar integer tensor).

    Returns:
      A list with one entry per top-level state (`[h, c]` for an LSTM cell,
      one entry per layer for a stack), each `[batch_size, ...]`: the cell's
      `get_initial_state` (zeros where it has none), zeros for a step
      model's state inputs, each layer's for a stack.

    Raises:
      ValueError: If the step is a plain callable, which declares no states
        (pass `initial_state` when calling the layer).
    """
    return _top(steps_lib.as_step(self.step).initial_state(batch_size))

  def reset_states(self, to_initial_state: bool = False) -> None:
    """Keras' alias of `reset_state`."""
    self.reset_state(to_initial_state)

  def reset_state(self, to_initial_state: bool = False) -> None:
    """Sets a stateful layer's states to zeros, as `keras.layers.RNN`.

    Does nothing for a layer that is not stateful or not built yet (its
    first call starts from the step's initial state), as Keras.

    Args:
      to_initial_state: Set them to the step's initial state instead
        (`get_initial_state()`). Keras resets to zeros even where the cell's
        `get_initial_state` is not zero (a learned initial state), so a
        stateful layer starts its first sequence there and every sequence
        after a reset at zeros; with True every sequence starts where the
        first did.

    Raises:
      TypeError: If `to_initial_state` is not a bool.
    """
    _checks.check_bool(to_initial_state, "to_initial_state")
    if self.states is None:
      return
    if not to_initial_state:
      for variable in self.states:
        variable.assign(keras.ops.zeros(variable.shape, variable.dtype))
      return
    initial = tf.nest.flatten(self.get_initial_state(self.states[0].shape[0]))
    for variable, value in zip(self.states, initial):
      variable.assign(tf.cast(value, variable.dtype))

  def _create_state_variables(self, sequences_shape) -> None:
    batch = tf.nest.flatten(sequences_shape)[0] if _is_nested_shape(
        sequences_shape) else sequences_shape[0]
    step = steps_lib.as_step(self.step)
    if batch is None:
      raise ValueError(
          f"{self.name}: stateful=True needs a fixed batch size (the states "
          "live in variables), but the input shape is "
          f"{tuple(sequences_shape)}. Give it one, e.g. keras.Input(shape, "
          "batch_size=32), or pass stateful=False.")
    if step.state_specs is None:
      raise ValueError(
          f"{self.name}: stateful=True needs a step that declares its states "
          f"(a Keras cell, step model or stack); {step.name} does not.")
    if self.states is not None:
      return
    # Not attributes Keras tracks: the carried states are no weights (they
    # are not saved), as in keras.layers.RNN. Floating states are kept in
    # the variable dtype (float32 under mixed_float16, as Keras), so the
    # carry between calls is not rounded to float16.
    self.states = _Untracked([
        keras.Variable(value, trainable=False,
                       dtype=(self.variable_dtype if value.dtype.is_floating
                              else value.dtype), name="rnn_state")
        for value in tf.nest.flatten(step.initial_state(batch))])

  def _zero_if_last_step_masked(self, outputs: Nest, mask: Any) -> Nest:
    """Keras' last output with `zero_output_for_mask`: the output at the
    last step run, zeros where that step is masked (`outputs` holds each
    row's last valid output)."""
    mask = tf.cast(mask, tf.bool)
    last = mask[:, :1] if self.go_backwards else mask[:, -1:]
    keep = tf.reduce_all(last, axis=1)  # True for no steps: zeros anyway.
    return tf.nest.map_structure(
        lambda y: tf.where(tf.reshape(keep, [-1] + [1] * (y.shape.rank - 1)),
                           y, tf.zeros_like(y)), outputs)

  def _check_stateful_batch(self, inputs: Nest) -> None:
    expected = self.states[0].shape[0]
    actual = tf.nest.flatten(inputs)[0].shape[0]
    if actual is not None and actual != expected:
      raise ValueError(
          f"{self.name} is stateful with batch size {expected} (its states' "
          f"rows), but the inputs have batch size {actual}. Feed batches of "
          f"{expected} rows, or call reset_states() on a new layer.")

  def _unroll(self, inputs: Nest) -> int:
    if self.unroll is False:
      return 1
    if self.unroll is not True:
      return self.unroll
    time = tf.nest.flatten(inputs)[0].shape[1]
    if time is None:
      raise ValueError(
          f"{self.name}: unroll=True unrolls every step, so the number of "
          "time steps must be known; pass an int unroll (steps per loop "
          "iteration) instead.")
    return max(time, 1)

  def _float(self, dtype) -> tf.DType:
    dtype = tf.as_dtype(dtype)
    return tf.as_dtype(self.compute_dtype) if dtype.is_floating else dtype

  def _cast(self, x: tf.Tensor) -> tf.Tensor:
    return tf.cast(x, self._float(x.dtype))

  def _x_spec(self, sequences_shape) -> Nest:
    return tf.nest.map_structure(
        lambda shape: tf.TensorSpec(_step_shape(shape), self.compute_dtype),
        sequences_shape, check_types=False) if _is_nested_shape(
            sequences_shape) else tf.TensorSpec(
                _step_shape(sequences_shape), self.compute_dtype)

  def _state_count(self) -> int:
    specs = steps_lib.as_step(self.step).state_specs
    if specs is not None:
      return len(_top(specs))
    if self._num_states is None:
      raise ValueError(
          f"{self.name} cannot tell how many states its step "
          f"{self.step!r} has before it is called: a plain callable does "
          "not declare its states.")
    return self._num_states

  def get_config(self) -> dict:
    """The layer's config, with the step serialized by Keras.

    Raises:
      TypeError: If the step is not a Keras layer or a stack of them (a
        plain callable cannot be serialized).
    """
    config = super().get_config()
    config.update(
        step=_serialize_step(self.step, self.name),
        return_sequences=self.return_sequences,
        return_state=self.return_state, go_backwards=self.go_backwards,
        stateful=self.stateful,
        zero_output_for_mask=self.zero_output_for_mask, unroll=self.unroll,
        hoist=self.hoist, reverse_output_mask=self.reverse_output_mask)
    return config

  @classmethod
  def from_config(cls, config: dict) -> "StepRNN":
    config = dict(config)
    config["step"] = _deserialize_step(config["step"])
    return cls(**config)


class _Untracked:
  """A list Keras does not track (a plain list attribute would be)."""

  def __init__(self, items: list):
    self._items = items

  def __iter__(self):
    return iter(self._items)

  def __getitem__(self, i):
    return self._items[i]

  def __len__(self) -> int:
    return len(self._items)

  def __add__(self, other) -> tuple:  # `fw.states + bw.states` (Keras).
    return tuple(self._items) + tuple(other)

  def __radd__(self, other) -> tuple:
    return tuple(other) + tuple(self._items)


def _keras_layers(step: Any) -> list:
  """The Keras layers a step is made of (a stack's, recursively)."""
  if isinstance(step, keras.layers.Layer):
    return [step]
  if isinstance(step, stacking.Stack):
    return [layer for s in step.steps for layer in _keras_layers(s)]
  return []


def _serialize_step(step: Any, name: str) -> dict:
  if isinstance(step, keras.layers.Layer):
    return keras.saving.serialize_keras_object(step)
  if isinstance(step, stacking.Stack):
    return {"stack": dict(step.config, steps=[
        _serialize_step(s, name) for s in step.steps])}
  raise TypeError(
      f"{name} cannot be serialized: its step is a {type(step).__name__}, "
      "but only a Keras layer (an RNN cell or a functional step model) or a "
      "stepper.stack of them can be serialized. Wrap the callable in a "
      "keras.layers.Layer with get_config to save the model.")


def _deserialize_step(config: dict) -> Any:
  if "stack" in config:
    config = dict(config["stack"])
    steps = [_deserialize_step(s) for s in config.pop("steps")]
    return stacking.stack(steps, **config)
  return keras.saving.deserialize_keras_object(config)


def _as_states(step: steps_lib.Step, initial_state: Nest) -> Nest:
  """`initial_state` nested like the step's states, in their dtypes.

  Keras accepts a bare tensor for a one-state cell and a flat list for
  nested states, and converts the states to the cell's compute dtype.
  """
  specs = step.state_specs
  if specs is None:
    return initial_state
  flat = tf.nest.flatten(initial_state)
  flat_specs = tf.nest.flatten(specs)
  if len(flat) == len(flat_specs):
    flat = [tf.cast(s, spec.dtype) if spec.dtype.is_floating and
            tf.as_dtype(tf.convert_to_tensor(s).dtype).is_floating else s
            for s, spec in zip(flat, flat_specs)]
    return tf.nest.pack_sequence_as(specs, flat)
  return initial_state  # The engine names the mismatch.


def _declared_nesting(step: Any, entries: list) -> list:
  """The top-level states nested as `keras.layers.RNN.compute_output_shape`
  nests them: bare where a stacked cell's `state_size` is one int.

  Keras' symbolic tensors (and so a functional model's outputs) follow the
  `state_size`s, while its call nests each cell's states as the cell's
  `get_initial_state` does: `[h]` for a built-in GRU cell in a stack. The
  layer does both, as Keras; other stack entries keep their nesting.
  """
  if isinstance(step, keras.layers.StackedRNNCells):
    cells = step.cells
  elif isinstance(step, stacking.Stack):
    cells = step.steps
  else:
    return entries
  return [entry[0] if _one_size(getattr(cell, "state_size", None)) and
          isinstance(entry, list) and len(entry) == 1 else entry
          for cell, entry in zip(cells, entries)]


def _one_size(state_size: Any) -> bool:
  """Whether a `state_size` declares one state (an int or a shape)."""
  return state_size is not None and (
      isinstance(state_size, tf.TensorShape) or
      not tf.nest.is_nested(state_size))


def _top(states: Nest) -> list:
  """The top-level entries of a state nest: Keras' `[outputs, *states]`."""
  return list(states) if isinstance(states, (list, tuple)) else [states]


def _step_shape(sequences_shape) -> tuple:
  """One step's shape: the sequence's without its time axis."""
  shape = tuple(sequences_shape)
  return (shape[0],) + shape[2:]


def _is_nested_shape(shape: Any) -> bool:
  """Whether `shape` is a nest of shapes rather than one shape."""
  if isinstance(shape, dict):
    return True
  return isinstance(shape, (list, tuple)) and any(
      isinstance(s, (list, tuple, dict)) for s in shape)


def _first_mask(mask: Any) -> tf.Tensor | None:
  """Keras gives one mask per input leaf; every leaf shares the time steps."""
  if mask is None:
    return None
  flat = [m for m in tf.nest.flatten(mask) if m is not None]
  return flat[0] if flat else None
