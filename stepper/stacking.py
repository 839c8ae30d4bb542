"""`stack`: several steps advancing together, bottom to top, at each time step.

A stack is itself a `Step`, so the engine runs every layer inside its single
`tf.while_loop`: at time `t` layer 0 reads `x_t`, layer `i + 1` reads layer
`i`'s output, and gradients flow both through time and through depth. The
stacked state is the tuple of the layers' states, by position.
"""

from typing import Any, Callable, Sequence

import numpy as np
import tensorflow as tf

from stepper import _checks
from stepper import steps as steps_lib

Nest = Any


def stack(steps: Sequence[Any], *, residual: bool | Sequence[bool] = False,
          return_all_outputs: bool = False, dropout: float = 0.0,
          seed: int | None = None) -> steps_lib.Step:
  """Composes steps into one deep step that advances every layer per step.

  >>> deep = stepper.stack([keras.layers.LSTMCell(8),
  ...                       keras.layers.GRUCell(8)], residual=(False, True))
  >>> x = tf.random.normal([4, 20, 3])
  >>> outputs, final_states = stepper.model_rnn(deep, x)
  >>> outputs.shape, final_states[1][0].shape   # GRU layer's state
  (TensorShape([4, 20, 8]), TensorShape([4, 8]))

  Args:
    steps: Non-empty list of steps (Keras step models, Keras RNN cells,
      callables or `Step`s, mixed), bottom first. Layer `i + 1` reads layer
      `i`'s output `y_t`, so its input must match that output.
    residual: Add each layer's input to its output (`y_i = f_i(x_i) + x_i`).
      A bool for every layer, or one bool per layer (e.g. `(False, True)` when
      layer 0 changes the width). The input and output of a residual layer
      must have the same nesting, shapes and dtypes.
    return_all_outputs: If True, `y_t` is the tuple of every layer's output
      (deep supervision, attention over layers); else the top layer's.
    dropout: Variational dropout rate in `[0, 1)`, applied between layers:
      on each layer's input from the layer below (not on the raw inputs of
      layer 0, not on the stack's output), to every floating leaf, scaled by
      `1 / (1 - dropout)`. One mask per sequence (per batch row), drawn once
      per engine call and used at every time step. Only with a truthy
      `training`; `training=False` or `None` means no dropout. A residual
      adds the layer's input before dropout (as `ResidualWrapper(
      DropoutWrapper(cell))` did in TF 1).
    seed: Seed of the dropout mask generator (`None`: non-deterministic).

  Returns:
    A `Step` usable anywhere a step is. Its states are the tuple of the
    layers' states; `initial_states` passed to the engine must be a tuple
    with one entry per layer, and `final_states[i]` is layer `i`'s state.
    `state_specs` is `None` when a layer does not declare its states (a plain
    callable); pass `initial_states` then.

  Raises:
    TypeError: If `steps` is not a list/tuple or a step cannot be adapted,
      or `residual`/`dropout`/`seed` has the wrong type.
    ValueError: If `steps` is empty, `dropout` lies outside `[0, 1)`, or
      `residual` has the wrong length. At trace time: if a residual layer's
      input and output disagree, or the states are not one entry per layer.
  """
  layers = _check_steps(steps)
  _check_seed(seed)
  return Stack(list(steps), layers, _check_residual(residual, len(layers)),
               bool(return_all_outputs), _check_rate(dropout), seed)


class Stack(steps_lib.Step):
  """The `Step` that `stack` returns; use `stack` to make one.

  Attributes:
    steps: The steps as given to `stack` (Keras layers, callables, `Step`s),
      bottom first: what `stepper.StepRNN` tracks and serializes.
    config: The other arguments of `stack`: `residual` (one bool per layer),
      `return_all_outputs`, `dropout` and `seed`.
  """

  def __init__(self, steps: list, layers: list[steps_lib.Step],
               residual: tuple[bool, ...], return_all_outputs: bool,
               rate: float, seed: int | None):
    self.steps = steps
    self.config = dict(residual=list(residual),
                       return_all_outputs=return_all_outputs, dropout=rate,
                       seed=seed)
    body = _Body(layers, residual, return_all_outputs, rate)
    generator = None
    if rate > 0:  # Created eagerly: a Generator owns a variable.
      generator = (tf.random.Generator.from_non_deterministic_state()
                   if seed is None else tf.random.Generator.from_seed(seed))

    def split(training):
      # The bottom layer's input half is the stack's (unless layer 0 adds
      # its input to its output: the core would need `x_t` too).
      bottom = None if residual[0] else layers[0].split(training)
      if bottom is None:
        return None
      core_layers = [bottom.core, *layers[1:]]
      core_body = _Body(core_layers, residual, return_all_outputs, rate)
      return bottom._replace(core=steps_lib.Step(
          lambda x, s, tr: core_body(core_layers, None, None, x, s, tr),
          name=f"{self.name} (input half hoisted)",
          state_specs=self.state_specs,
          initial_state_fn=lambda batch: _initial_states(core_layers, batch),
          start_fn=_starter(core_layers, core_body, generator),
          module=steps_lib.Composite(*core_layers)))

    specs = [layer.state_specs for layer in layers]
    super().__init__(
        lambda x, s, tr: body(layers, None, None, x, s, tr),
        name=f"stack of {len(layers)} layers [" +
        ", ".join(layer.name for layer in layers) + "]",
        state_specs=None if any(s is None for s in specs) else tuple(specs),
        input_spec=layers[0].input_spec,
        initial_state_fn=lambda batch: _initial_states(layers, batch),
        start_fn=_starter(layers, body, generator),
        module=steps_lib.Composite(*layers),
        split_fn=split)


def _starter(layers: list[steps_lib.Step], body: "_Body",
             generator: tf.random.Generator | None) -> Callable:
  """The stack's `start`: every layer's, and the run's dropout seeds."""

  def start(batch_size, training):
    calls = [layer.start(batch_size, training) for layer in layers]
    seeds = None
    if generator is not None and len(layers) > 1 and (
        isinstance(training, tf.Tensor) or training):
      # One seed per layer boundary, drawn once per run: every step reuses it.
      seeds = tf.unstack(generator.make_seeds(len(layers) - 1), axis=1)
    return lambda x, s, tr: body(calls, seeds, training, x, s, tr)

  return start


class _Body:
  """One time step of the stack, bottom to top."""

  def __init__(self, layers, residual, return_all_outputs, rate):
    self._layers = layers
    self._residual = residual
    self._return_all = return_all_outputs
    self._rate = rate

  def __call__(self, calls: Sequence[Callable], seeds: list | None,
               run_training: Any, x_t: Nest, states: Nest,
               training: Any) -> tuple[Nest, tuple]:
    """`calls[i]` is layer i's per-step function; `seeds[i]` (one per layer
    boundary) seeds the dropout mask on layer i + 1's input, or `None`."""
    self._check_states(states)
    outputs, new_states = [], []
    h = x_t
    for i, (call, state) in enumerate(zip(calls, states)):
      layer_in = h
      if seeds is not None and i > 0:
        layer_in = self._drop(h, seeds[i - 1], run_training)
      y, new = call(layer_in, state, training)
      if self._residual[i]:
        y = self._add_residual(i, h, y)
      outputs.append(y)
      new_states.append(new)
      h = y
    return (tuple(outputs) if self._return_all else h), tuple(new_states)

  def _check_states(self, states: Nest) -> None:
    n = len(self._layers)
    if not isinstance(states, (list, tuple)) or len(states) != n:
      got = (f"{len(states)} entries" if isinstance(states, (list, tuple))
             else type(states).__name__)
      raise ValueError(
          f"The states of a stack of {n} layers must be a tuple with one "
          f"entry per layer, by position; got {got}. Pass "
          f"`initial_states=(states_0, ..., states_{n - 1})`.")

  def _drop(self, h: Nest, seed: tf.Tensor, training: Any) -> Nest:
    """Applies the run's fixed mask: a stateless draw with the same seed at
    every step gives the same mask (no per-run mask shapes needed)."""
    def drop_leaf(j, leaf):
      if not leaf.dtype.is_floating:
        return leaf
      leaf_seed = tf.random.experimental.stateless_fold_in(seed, j)
      keep = tf.random.stateless_uniform(tf.shape(leaf), leaf_seed,
                                         dtype=leaf.dtype) >= self._rate
      mask = tf.cast(keep, leaf.dtype) / (1.0 - self._rate)
      if isinstance(training, tf.Tensor):
        mask = tf.where(tf.cast(training, tf.bool), mask, tf.ones_like(mask))
      return leaf * mask

    flat = tf.nest.flatten(h)
    return tf.nest.pack_sequence_as(
        h, [drop_leaf(j, leaf) for j, leaf in enumerate(flat)])

  def _add_residual(self, i: int, layer_in: Nest, y: Nest) -> Nest:
    name = f"stack layer {i} ({self._layers[i].name})"
    _checks.check_same_nesting(
        layer_in, y,
        lambda: f"residual: {name} gets an input nested as "
        f"{_checks.nesting(layer_in)} but returns an output nested as "
        f"{_checks.nesting(y)}; they cannot be added. Set residual=False for "
        "this layer.")
    for a, b in zip(tf.nest.flatten(layer_in), tf.nest.flatten(y)):
      if not a.shape.is_compatible_with(b.shape) or a.dtype != b.dtype:
        raise ValueError(
            f"residual: {name} has input shape {_checks.shape_str(a.shape)} "
            f"{a.dtype.name} but output shape {_checks.shape_str(b.shape)} "
            f"{b.dtype.name}; a residual layer's output must be shaped like "
            "its input. Set residual=False for this layer, e.g. "
            "residual=(False, True, ...).")
    return tf.nest.map_structure(lambda a, b: a + b, layer_in, y)


def _initial_states(layers: list[steps_lib.Step], batch_size) -> tuple:
  states = []
  for i, layer in enumerate(layers):
    try:
      states.append(layer.initial_state(batch_size))
    except ValueError as e:
      raise ValueError(
          f"Cannot infer the initial states of stack layer {i}: {e} Pass "
          f"`initial_states` with one entry per layer ({len(layers)}), by "
          "position.") from None
  return tuple(states)


def _check_steps(steps: Any) -> list[steps_lib.Step]:
  if not isinstance(steps, (list, tuple)):
    raise TypeError(f"`steps` must be a list or tuple of steps, bottom first; "
                    f"got {type(steps).__name__}.")
  if not steps:
    raise ValueError("`steps` is empty; a stack needs at least one step.")
  return [steps_lib.as_stack_layer(s) for s in steps]


def _check_residual(residual: Any, n: int) -> tuple[bool, ...]:
  if isinstance(residual, bool):
    return (residual,) * n
  if (not isinstance(residual, (list, tuple))
      or not all(isinstance(r, bool) for r in residual)):
    raise TypeError(f"`residual` must be a bool or a list of {n} bools (one "
                    f"per layer); got {residual!r}.")
  if len(residual) != n:
    raise ValueError(f"`residual` has {len(residual)} entries but the stack "
                     f"has {n} layers; pass one bool per layer.")
  return tuple(residual)


def _check_rate(dropout: Any) -> float:
  if isinstance(dropout, bool) or not isinstance(dropout, (int, float)):
    raise TypeError(f"`dropout` must be a float in [0, 1); got {dropout!r}.")
  if not 0 <= dropout < 1:
    raise ValueError(f"`dropout` must lie in [0, 1); got {dropout!r}.")
  return float(dropout)


def _check_seed(seed: Any) -> None:
  if seed is not None and (isinstance(seed, bool) or
                           not isinstance(seed, (int, np.integer))):
    raise TypeError(f"`seed` must be None or an int; got {seed!r} of type "
                    f"{type(seed).__name__}.")
