"""The step adapter: a Keras model, a Keras RNN cell or a callable -> `Step`.

stepper accepts three kinds of step and turns each into a `Step`, the one
internal form the engine (and everything built on it) calls:

1. A Keras functional model with inputs `[x_t, *states]` and outputs
   `[y_t, *new_states]` (each may be a nest). A model with a single input and
   output is a step without state.
2. A Keras RNN cell: anything with `state_size` whose call is
   `cell(x_t, states, training=...) -> (y_t, new_states)`.
3. A plain callable `(x_t, states) -> (y_t, new_states)`, optionally taking a
   `training` keyword. Its states cannot be inferred: pass `initial_states`.

Nothing outside this module distinguishes the three.
"""

import inspect
import weakref
from typing import Any, Callable

import keras
import tensorflow as tf

from stepper import _checks
from stepper import _dropout
from stepper import _hoist

Nest = Any


class Step:
  """A step normalised to `(x_t, states, training) -> (y_t, new_states)`.

  Attributes:
    name: Human-readable name for error messages.
    state_specs: Nest of `tf.TensorSpec` with a leading (usually `None`) batch
      dimension, or `None` when the step does not declare its states.
    input_spec: Nest of `tf.TensorSpec` for `x_t`, or `None` if undeclared.
    module: The wrapped Keras model/cell, or any object with
      `trainable_variables`/`variables` (for a composite step), or `None`.
  """

  def __init__(self, fn: Callable[..., tuple[Nest, Nest]], *, name: str,
               state_specs: Nest | None = None,
               input_spec: Nest | None = None,
               initial_state_fn: Callable[[tf.Tensor], Nest] | None = None,
               start_fn: Callable[..., Callable] | None = None,
               module: Any = None,
               split_fn: Callable[[Any], _hoist.Split | None] | None = None):
    self._fn = fn
    self._start_fn = start_fn
    self._split_fn = split_fn
    self.name = name
    self.state_specs = state_specs
    self.input_spec = input_spec
    self._initial_state_fn = initial_state_fn
    self.module = module
    self._spec_cache = {}

  def __call__(self, x_t: Nest, states: Nest,
               training: bool | tf.Tensor | None = None) -> tuple[Nest, Nest]:
    """One time step: `x_t` leaves `[batch, ...]`, states like `state_specs`."""
    return self._fn(x_t, states, training)

  def start(self, batch_size: int | tf.Tensor,
            training: bool | tf.Tensor | None = None) -> Callable:
    """Called once per engine run, before the loop; returns the per-step
    function `(x_t, states, training) -> (y_t, new_states)` for this run.

    The default is the step itself. A step that needs per-sequence context
    drawn once and used at every step (e.g. variational dropout masks) builds
    it here.
    """
    if self._start_fn is None:
      return self
    return self._start_fn(batch_size, training)

  def split(self, training: bool | tf.Tensor | None = None
            ) -> _hoist.Split | None:
    """The step cut into its input half and the rest, for hoisting.

    The engine runs `split.project` once over the whole input sequence
    before its loop and `split.core` (a `Step` taking the projected `x_t`)
    at every step. Built-in Keras cells, functional step models (see
    `stepper._hoist`) and `stepper.steps.split` steps split.

    Args:
      training: The run's training flag.

    Returns:
      `_hoist.Split(project, core)` with `core` a `Step`, or None where the
      step does not split.
    """
    if self._split_fn is None:
      return None
    halves = self._split_fn(training)
    if halves is None:
      return None
    return _hoist.Split(halves.project,
                        self._core_step(halves.core, halves.module,
                                        halves.draws), draws=halves.draws)

  def _core_step(self, core: Any, module: Any, drawn: bool) -> "Step":
    if isinstance(core, Step):
      return core

    def start(batch_size, training):
      if not drawn:  # What the whole step draws per run.
        self.start(batch_size, training)
      return core_step

    core_step = Step(lambda x, s, training: core(x, s, training),
                     name=f"{self.name} (recurrent half)",
                     state_specs=self.state_specs,
                     initial_state_fn=self._initial_state_fn, start_fn=start,
                     module=module)
    return core_step

  @property
  def trainable_variables(self) -> list[tf.Variable]:
    return list(getattr(self.module, "trainable_variables", []))

  @property
  def variables(self) -> list[tf.Variable]:
    return list(getattr(self.module, "variables", []))

  def initial_state(self, batch_size: int | tf.Tensor) -> Nest:
    """Default states for `batch_size` rows (usually zeros).

    Raises:
      ValueError: If the step does not declare its states (a plain callable).
    """
    if self._initial_state_fn is None:
      raise ValueError(
          f"Cannot infer the initial states of {self.name}: a plain callable "
          "does not declare its states. Pass `initial_states` explicitly.")
    return self._initial_state_fn(batch_size)

  def output_spec(self, x_spec: Nest, state_specs: Nest,
                  training: Any = None) -> tuple[Nest, Nest]:
    """Specs of `(y_t, new_states)` for the given input and state specs.

    The step is traced once, abstractly, in a scratch graph (no step runs);
    the result is cached per input/state signature.
    """
    if isinstance(training, tf.Tensor):
      training = None  # Output shapes do not depend on the training flag.
    key = (_signature(x_spec), _signature(state_specs), training)
    if key not in self._spec_cache:
      concrete = tf.function(
          lambda x, s: self(x, s, training),
          autograph=False).get_concrete_function(x_spec, state_specs)
      self._spec_cache[key] = tf.nest.map_structure(
          lambda t: tf.TensorSpec(t.shape, t.dtype),
          concrete.structured_outputs)
    return self._spec_cache[key]


def _signature(specs: Nest) -> tuple:
  flat = tuple((tuple(s.shape.as_list()) if s.shape.rank is not None else None,
                s.dtype) for s in tf.nest.flatten(specs))
  return flat, str(tf.nest.map_structure(lambda _: 0, specs))


_ADAPTERS = weakref.WeakKeyDictionary()


def as_step(step: Any) -> Step:
  """Adapts a Keras model, a Keras RNN cell or a callable into a `Step`.

  Adapters are cached per object, so calling the engine repeatedly with the
  same model does no repeated work.

  Args:
    step: A `Step`, a functional `keras.Model` with inputs `[x_t, *states]`,
      an object with `state_size` (a Keras RNN cell), or a callable
      `(x_t, states[, training]) -> (y_t, new_states)`.

  Returns:
    The `Step`.

  Raises:
    TypeError: If `step` is none of the above.
    ValueError: If a step model's outputs are not `[y_t, *new_states]` with
      states shaped like its state inputs.
  """
  if isinstance(step, Step):
    return step
  try:
    cached = _ADAPTERS.get(step)
  except TypeError:  # Not weak-referenceable; adapt without caching.
    return _adapt(step)
  if cached is None:
    cached = _adapt(step)
    _ADAPTERS[step] = cached
  return cached


def wrap_call(step: Step, wrapper: Callable[[Callable], Callable], *,
              name: str, input_spec: Nest | None = None,
              initial_state_fn: Callable[[tf.Tensor], Nest] | None = None,
              module: Any = None) -> Step:
  """A `Step` running `wrapper(call)` for each of `step`'s per-step calls.

  `wrapper` maps a per-step function `(x_t, states, training) -> (y_t,
  new_states)` to another; it wraps the step itself and the function
  `step.start` returns for each run, so per-run context (e.g. variational
  dropout masks) is kept. The state specs are `step`'s; what the wrapper may
  change (the input, the variables) is given.

  >>> cell = stepper.as_step(keras.layers.GRUCell(4))
  >>> doubled = stepper.steps.wrap_call(
  ...     cell, lambda call: lambda x, s, training: call(2 * x, s, training),
  ...     name="doubled GRU", initial_state_fn=cell.initial_state)
  >>> x = tf.random.normal([2, 5, 3])
  >>> y, _ = stepper.model_rnn(doubled, x)
  >>> np.allclose(y, stepper.model_rnn(cell, 2 * x)[0])
  True

  Args:
    step: The `Step` to wrap.
    wrapper: Maps a per-step function to the wrapped one.
    name: The new step's name (for messages).
    input_spec: The new step's `x_t` spec, or `None` (undeclared).
    initial_state_fn: Its default states for a batch size, or `None`.
    module: What holds its variables, or `None`.

  Returns:
    The wrapped `Step`.
  """
  return Step(
      wrapper(step), name=name, state_specs=step.state_specs,
      input_spec=input_spec, initial_state_fn=initial_state_fn,
      start_fn=lambda batch, training: wrapper(step.start(batch, training)),
      module=module)


def _adapt(step: Any) -> Step:
  if isinstance(step, keras.Model) and _has_functional_inputs(step):
    return _from_model(step)
  if _is_cell(step):
    return _from_cell(step)
  if callable(step):
    return _from_callable(step)
  raise TypeError(
      "`step` must be a functional keras.Model with inputs [x_t, *states], a "
      "Keras RNN cell (with `state_size`), or a callable "
      f"(x_t, states) -> (y_t, new_states); got {type(step).__name__}.")


def _is_cell(step: Any) -> bool:
  """Whether `as_step` adapts `step` as a Keras RNN cell."""
  return (not isinstance(step, Step) and hasattr(step, "state_size") and
          not (isinstance(step, keras.Model) and _has_functional_inputs(step)))


def _has_functional_inputs(model: keras.Model) -> bool:
  try:
    return bool(model.inputs)
  except (AttributeError, ValueError):
    return False


def _spec_of(keras_tensor) -> tf.TensorSpec:
  return tf.TensorSpec(keras_tensor.shape, keras_tensor.dtype)


def _top_level(structure: Nest) -> list:
  """`[x, *states]` for a list/tuple model input or output, else `[x]`."""
  if isinstance(structure, (list, tuple)) and not hasattr(structure, "_fields"):
    return list(structure)
  return [structure]


def _from_model(model: keras.Model) -> Step:
  name = f"step model {model.name!r}"
  inputs = _top_level(model.input)
  outputs = _top_level(model.output)
  if isinstance(model.input, dict):
    raise ValueError(f"{name} takes a dict of inputs; a step model's inputs "
                     "must be a list [x_t, *states].")
  state_specs = [tf.nest.map_structure(_spec_of, s) for s in inputs[1:]]
  if len(outputs) != len(inputs):
    raise ValueError(
        f"{name} has {len(inputs) - 1} state input(s) but {len(outputs)} "
        f"output(s); a step model with inputs [x_t, *states] must return "
        f"[y_t, *new_states] ({len(inputs)} outputs).")
  for i, (state_in, state_out) in enumerate(zip(inputs[1:], outputs[1:])):
    try:
      tf.nest.assert_same_structure(state_in, state_out, check_types=False)
    except (ValueError, TypeError) as e:
      raise ValueError(f"{name}: output {i + 1} (new state {i}) is not "
                       f"nested like state input {i + 1}: {e}") from None
    for a, b in zip(tf.nest.flatten(state_in), tf.nest.flatten(state_out)):
      if (not tf.TensorShape(a.shape).is_compatible_with(b.shape)
          or not _castable(b.dtype, a.dtype)):
        raise ValueError(
            f"{name}: output {i + 1} (new state {i}) has shape "
            f"{_checks.shape_str(b.shape)} and dtype {b.dtype}, but state "
            f"input {i + 1} has shape {_checks.shape_str(a.shape)} and dtype "
            f"{a.dtype}. A step model must return [y_t, *new_states] with "
            "every new state shaped like its state input.")
  n_states = len(inputs) - 1

  def call(x_t, states, training):
    out = model([x_t, *states] if n_states else x_t, training=training)
    out = _top_level(out)
    # Under mixed precision the new states come out in the compute dtype
    # (bfloat16) while the state inputs are float32: the state keeps its
    # input's dtype from step to step.
    new_states = [tf.nest.map_structure(
        lambda new, spec: tf.cast(new, spec.dtype), new, spec)
                  for new, spec in zip(out[1:], state_specs)]
    return out[0], new_states

  fn, start = _with_dropout(call, model)

  def initial_state(batch_size):
    return [tf.nest.map_structure(
        lambda s: tf.zeros(tf.concat([[batch_size], s.shape[1:]], 0), s.dtype),
        spec) for spec in state_specs]

  return Step(fn, name=name, state_specs=state_specs,
              input_spec=tf.nest.map_structure(_spec_of, inputs[0]),
              initial_state_fn=initial_state, start_fn=start, module=model,
              split_fn=lambda training: _hoist.model_split(model))


def _castable(new: Any, state: Any) -> bool:
  """Whether a new state of dtype `new` may carry a state of dtype `state`:
  the same dtype, or two floating dtypes (mixed precision)."""
  new, state = tf.as_dtype(new), tf.as_dtype(state)
  return new == state or (new.is_floating and state.is_floating)


def _cell_state_structure(cell: Any) -> Nest:
  """The sizes of a cell's states, nested as `keras.layers.RNN` nests them:
  a list of one entry per state; for a `StackedRNNCells`, one entry per
  cell, nested as in `_stacked_entry`."""
  if isinstance(cell, keras.layers.StackedRNNCells):
    return [_stacked_entry(c) for c in cell.cells]
  entry = _stacked_entry(cell)
  return entry if _is_list(entry) else [entry]


def _stacked_entry(cell: Any) -> Nest:
  """A cell's states as one entry of a stack, nested as
  `keras.layers.StackedRNNCells` passes and returns them: as the cell's
  `get_initial_state` nests them, or for a cell without one, a bare state
  for a single `state_size` (an int), a list for a list of sizes.

  So `[h1, [h2, c2]]` for a custom one-state cell under an LSTM cell, but
  `[[h1], [h2, c2]]` for a GRU cell under it (its initial state is `[h]`).
  """
  if isinstance(cell, keras.layers.StackedRNNCells):
    return _cell_state_structure(cell)
  state_size = cell.state_size
  if _is_list(state_size):
    return state_size
  get_initial_state = getattr(cell, "get_initial_state", None)
  if get_initial_state is not None:
    with tf.init_scope():  # Only its nesting is read: no graph ops.
      if tf.nest.is_nested(get_initial_state(batch_size=1)):
        return [state_size]
  return state_size


def _is_list(sizes: Any) -> bool:
  """Whether a `state_size` lists several sizes (a `TensorShape` is one)."""
  return not isinstance(sizes, tf.TensorShape) and tf.nest.is_nested(sizes)


def _size_shape(size) -> list[int | None]:
  return tf.TensorShape(size).as_list()


def as_stack_layer(step: Any) -> Step:
  """Adapts a step as one layer of a `stepper.stack`: as `as_step`, but a
  Keras cell holds its states nested as in `keras.layers.StackedRNNCells`
  (a bare state for a one-state cell without `get_initial_state`, where
  `as_step` gives the one-element list Keras' `RNN` passes a lone cell).

  Args:
    step: Anything `as_step` accepts.

  Returns:
    The `Step`.

  Raises:
    TypeError: As `as_step`, if `step` cannot be adapted.
    ValueError: As `as_step`, for a malformed step model.
  """
  adapted = as_step(step)
  if not _is_cell(step) or _is_list(_stacked_entry(step)):
    return adapted
  try:
    cached = _STACK_LAYERS.get(step)
  except TypeError:  # Not weak-referenceable; adapt without caching.
    return _from_cell(step, bare=True)
  if cached is None:
    cached = _STACK_LAYERS[step] = _from_cell(step, bare=True)
  return cached


_STACK_LAYERS = weakref.WeakKeyDictionary()


def _from_cell(cell: Any, bare: bool = False) -> Step:
  """The `Step` of a cell; `bare`: its one state not wrapped in a list."""
  name = f"cell {getattr(cell, 'name', type(cell).__name__)!r}"
  structure = _stacked_entry(cell) if bare else _cell_state_structure(cell)
  dtype = tf.as_dtype(getattr(cell, "compute_dtype", None) or "float32")
  state_specs = tf.nest.map_structure(
      lambda size: tf.TensorSpec([None] + _size_shape(size), dtype), structure,
      expand_composites=False)

  def call(x_t, states, training):
    # A cell gets a list of states, as from keras.layers.StackedRNNCells.
    output, new_states = cell(x_t, [states] if bare else states,
                              training=training)
    flat = tf.nest.flatten(new_states)
    n_expected = len(tf.nest.flatten(structure))
    if len(flat) != n_expected:
      raise ValueError(f"{name} returned {len(flat)} new state tensor(s) but "
                       f"its state_size declares {n_expected}.")
    return output, tf.nest.pack_sequence_as(structure, flat)

  def initial_state(batch_size):
    if hasattr(cell, "get_initial_state"):
      flat = tf.nest.flatten(cell.get_initial_state(batch_size=batch_size))
      return tf.nest.pack_sequence_as(structure, flat)
    return tf.nest.map_structure(
        lambda s: tf.zeros(tf.concat([[batch_size], s.shape[1:]], 0), s.dtype),
        state_specs)

  fn, start = _with_dropout(call, cell)
  return Step(fn, name=name, state_specs=state_specs,
              initial_state_fn=initial_state, start_fn=start, module=cell,
              split_fn=lambda training: _hoist.cell_split(cell, training))


def _with_dropout(call: Callable, module: Any
                  ) -> tuple[Callable, Callable | None]:
  """`call` with Keras' dropout protocol for the dropout cells `module` calls.

  Returns:
    `(fn, start_fn)` for `Step`. `start_fn` draws every cell's masks once per
    run, before the loop, as `keras.layers.RNN` does, and its per-step
    function hands them to the cells at every step: the same masks at every
    step of a run (also in steps `remat` recomputes), fresh ones next run.
    `fn` (a call outside a run: the abstract trace, a bare step) lets the
    cells draw their own. Both clear the cells' cached masks after each
    call, so none outlives the graph that made it.
  """
  cells = _dropout.dropout_cells(module)
  if not cells:
    return call, None

  def fn(x_t, states, training):
    try:
      return call(x_t, states, training)
    finally:
      _dropout.reset(cells)

  def start(batch_size, training):
    if not (tf.is_tensor(training) or training):
      return fn  # No dropout: nothing to draw.
    masks = _dropout.draw(cells, batch_size)

    def step(x_t, states, training):
      with _dropout.installed(cells, masks):
        return call(x_t, states, training)
    return step

  return fn, start


def _accepts_training(fn: Callable) -> bool:
  try:
    params = inspect.signature(fn).parameters.values()
  except (TypeError, ValueError):
    return False
  return any(p.name == "training" or p.kind == p.VAR_KEYWORD for p in params)


def _from_callable(fn: Callable) -> Step:
  name = f"callable {getattr(fn, '__name__', type(fn).__name__)!r}"
  if _accepts_training(fn):
    call = lambda x, s, training: fn(x, s, training=training)
  else:
    call = lambda x, s, training: fn(x, s)

  def step_fn(x_t, states, training):
    result = call(x_t, states, training)
    if not isinstance(result, (tuple, list)) or len(result) != 2:
      raise ValueError(f"{name} must return a pair (y_t, new_states); got "
                       f"{type(result).__name__}.")
    return tuple(result)

  return Step(step_fn, name=name, module=fn)


def split(project: Callable[..., Nest], core: Any, *,
          name: str | None = None) -> Step:
  """A step `core(project(x_t), states)` whose `project` can run once per
  sequence: `model_rnn(..., hoist=True)` hoists it out of the loop.

  `project` is the step's input half: it must compute each row from that
  row of `x_t` alone, deterministically (a `Dense` layer, an embedding
  lookup, a normalization over features; not dropout, not batch statistics).
  With `hoist=True` the engine calls it once on all steps, with `time *
  batch` rows, before its loop, and the loop runs only `core`. By default
  (`hoist=False`) it runs inside the loop at every step, with the same
  result up to float rounding.

  >>> dense = keras.layers.Dense(8)
  >>> def core(p_t, states):
  ...   h = tf.tanh(p_t + 0.5 * states[0])
  ...   return h, [h]
  >>> step = stepper.steps.split(dense, core)
  >>> x = tf.random.normal([4, 20, 3])
  >>> outputs, _ = stepper.model_rnn(step, x, [tf.zeros([4, 8])], hoist=True)
  >>> outputs.shape
  TensorShape([4, 20, 8])

  Args:
    project: Maps `x_t` (a nest of `[rows, ...]` leaves) to the core's
      input, row by row; may take a `training` keyword. A Keras layer or
      model with weights is trained like the rest of the step.
    core: The rest of the step: anything `stepper.model_rnn` accepts (a
      step model, cell, callable or `Step`) taking the projected `x_t`.
    name: Name for error messages.

  Returns:
    A `Step` with `core`'s states.
  """
  core_step = as_step(core)
  if _accepts_training(project):
    call = lambda x, training: project(x, training=training)
  else:
    call = lambda x, training: project(x)

  def start(batch_size, training):
    core_call = core_step.start(batch_size, training)
    return lambda x, s, tr: core_call(call(x, tr), s, tr)

  def project_sequence(x, training, time_axis):
    del time_axis  # Row by row: either layout.
    return _hoist.over_sequence(lambda rows: call(rows, training), x)

  return Step(
      lambda x, s, training: core_step(call(x, training), s, training),
      name=name or f"split step ({core_step.name})",
      state_specs=core_step.state_specs, start_fn=start,
      initial_state_fn=core_step.initial_state,
      module=Composite(project, core_step),
      split_fn=lambda training: _hoist.Split(project_sequence, core_step))


class Composite:
  """The `module` of a step made of parts (a stack's layers, a split step's
  halves): the variables of every part, each once, in order."""

  def __init__(self, *parts: Any):
    self._parts = parts

  def _unique(self, attr: str) -> list:
    return _checks.unique_by_id(v for part in self._parts
                                for v in getattr(part, attr, []))

  @property
  def trainable_variables(self) -> list:
    return self._unique("trainable_variables")

  @property
  def variables(self) -> list:
    return self._unique("variables")
