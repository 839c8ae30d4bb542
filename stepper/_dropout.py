"""Keras' variational RNN dropout, driven by the engine: one mask per run.

A Keras dropout cell (`GRUCell(dropout=...)`, every cell mixing in Keras'
`DropoutRNNCell`) caches its masks on itself the first time it is called
with `training=True` and uses them until `reset_dropout_mask()`.
`keras.layers.RNN` draws them before its loop, from the first input step and
the first state (`_maybe_config_dropout_masks`), and resets them after it.

stepper does the same per engine run (`Step.start`): `draw` asks each cell
for its masks (the cell's own `get_dropout_mask`, so its `SeedGenerator` is
consumed exactly as Keras consumes it), `installed` hands them to the cell
for the duration of one step call and clears the cache afterwards, so no
mask tensor outlives the graph it was made in (the abstract trace's, a
loop body's) and the next run draws fresh ones.

This module is the one door to two Keras internals: the cells' mask cache
(`_dropout_mask`, `_recurrent_dropout_mask`: Keras has a public getter and
resetter but no setter, and a mask drawn before the loop must be handed back
at every step, including the steps `remat` recomputes after the run), and
`Layer._flatten_layers` (Keras' only way to list the layers a layer owns,
e.g. the cells inside a functional step model).
"""

import contextlib
from typing import Any, Iterator, Sequence

import keras
import tensorflow as tf

# Layers that draw and reset the masks of the cells they own themselves.
_SELF_MANAGED = (keras.layers.RNN, keras.layers.Bidirectional)


def is_dropout_cell(layer: Any) -> bool:
  """Whether `layer` is a Keras dropout cell with a nonzero rate."""
  return (all(hasattr(layer, name) for name in (
      "get_dropout_mask", "get_recurrent_dropout_mask", "reset_dropout_mask",
      "reset_recurrent_dropout_mask"))
          and (getattr(layer, "dropout", 0) or
               getattr(layer, "recurrent_dropout", 0)) > 0)


def dropout_cells(module: Any) -> list:
  """The dropout cells `module` calls: itself, the cells of a
  `StackedRNNCells`, the layers of a model, recursively; not those owned by
  a `keras.layers.RNN` or `Bidirectional` inside it (they manage their own).
  """
  found, seen = [], set()

  def visit(layer):
    if id(layer) in seen or not isinstance(layer, keras.layers.Layer):
      return
    seen.add(id(layer))
    if is_dropout_cell(layer):
      found.append(layer)
    if isinstance(layer, _SELF_MANAGED):
      return
    for child in layer._flatten_layers(include_self=False, recursive=False):
      visit(child)

  visit(module)
  return found


def reset(cells: Sequence[Any]) -> None:
  """Clears the masks cached on `cells`."""
  for cell in cells:
    cell.reset_dropout_mask()
    cell.reset_recurrent_dropout_mask()


def draw(cells: Sequence[Any], batch_size: int | tf.Tensor) -> list:
  """Draws every cell's masks for one run of `batch_size` rows, as
  `keras.layers.RNN` does before its loop.

  The input mask is shaped like one step of the cell's input, the recurrent
  mask like its first state, both in the cell's compute dtype (Keras casts
  the inputs and states to it).

  Returns:
    One `(input_masks, recurrent_masks)` pair per cell, each `None` when its
    rate is 0.

  Raises:
    ValueError: If a cell is not built (its input shape is unknown).
  """
  masks = []
  for cell in cells:
    reset([cell])  # A mask cached by an earlier direct call is stale.
    config = cell.get_build_config() if cell.built else None
    if not config or "input_shape" not in config:
      raise ValueError(
          f"Cannot draw the dropout masks of cell {cell.name!r}: it is not "
          "built, so its input shape is unknown. Call the step once (or "
          "build the cell) before running it with training=True.")
    dtype = cell.compute_dtype
    input_mask = recurrent_mask = None
    if cell.dropout > 0:
      input_mask = cell.get_dropout_mask(
          _ones(batch_size, config["input_shape"][1:], dtype))
    if cell.recurrent_dropout > 0:
      recurrent_mask = cell.get_recurrent_dropout_mask(
          _ones(batch_size, _first_state_shape(cell.state_size), dtype))
    reset([cell])
    masks.append((input_mask, recurrent_mask))
  return masks


@contextlib.contextmanager
def installed(cells: Sequence[Any], masks: list) -> Iterator[None]:
  """Hands `masks` (from `draw`) to `cells` for one call; clears them after.
  """
  for cell, (input_mask, recurrent_mask) in zip(cells, masks):
    cell._dropout_mask = input_mask
    cell._recurrent_dropout_mask = recurrent_mask
  try:
    yield
  finally:
    reset(cells)


def _ones(batch_size, shape, dtype) -> tf.Tensor:
  return tf.ones(tf.concat([[batch_size], tf.constant(list(shape), tf.int32)],
                           0), dtype)


def _first_state_shape(state_size: Any) -> list[int]:
  """The shape (without batch) of a cell's first state, `h` for an LSTM:
  Keras cells draw the recurrent mask from it."""
  if isinstance(state_size, (list, tuple)) and not isinstance(
      state_size, tf.TensorShape):
    state_size = state_size[0]
  return tf.TensorShape(state_size).as_list()
