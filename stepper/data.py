"""Stream batching: one long sequence cut into parallel contiguous streams.

Truncated BPTT over a corpus (a language model, a long sensor record) needs
batches whose rows *continue* the rows of the previous batch, so that the
state carried from batch to batch belongs to the same text. `streams` does
the batching; `Trainer(..., stream=True)` carries the state. For `N = 10`
steps, `batch_size = 2`, `window = 2`::

  sequence  0 1 2 3 4 | 5 6 7 8 9        L = N // batch_size = 5
  stream 0  0 1 2 3 4                    stream b = steps [b*L, (b+1)*L)
  stream 1  5 6 7 8 9
  element   [0 1] [2 3] (4)              element j = steps
            [5 6] [7 8] (9)              [j*window, (j+1)*window) of each

`(4)`/`(9)` form a last shorter element only with `drop_remainder=False`.
Shuffling or rebatching the result breaks the streams; a `tf.data` pipeline
cannot tell, so build stream datasets with this function.
"""

from typing import Any

import tensorflow as tf

from stepper import _checks
from stepper import _loop

Nest = Any


def streams(inputs: Nest, targets: Nest, *, batch_size: int, window: int,
            resets: Any = None,
            drop_remainder: bool = True) -> tf.data.Dataset:
  """Cuts one long sequence into `batch_size` streams, batched by `window`.

  >>> text = np.arange(20)
  >>> ds = stepper.data.streams(text[:-1], text[1:], batch_size=2, window=3)
  >>> x, y = next(iter(ds))
  >>> x.numpy().tolist()  # Steps 0-2 of stream 0, 9-11 of stream 1.
  [[0, 1, 2], [9, 10, 11]]
  >>> len(list(ds))  # 19 steps // 2 streams = 9 steps each: 3 windows.
  3

  Args:
    inputs: Array, tensor or nest of them, each leaf `[N, ...]`: one long
      sequence, step `t` in row `t`.
    targets: Like `inputs` (its own nest and trailing shape), each leaf
      `[N, ...]`.
    batch_size: Number of parallel streams, a positive int `<= N`. Stream
      `b` holds steps `[b*L, (b+1)*L)` with `L = N // batch_size`; the last
      `N % batch_size` steps are dropped.
    window: Steps per element, a positive int.
    resets: Optional bool `[N]`, True where a document starts (the state is
      set back to the initial state right before that step).
    drop_remainder: Drop the last `L % window` steps of every stream (True),
      or keep them as a last, shorter element.

  Returns:
    A `tf.data.Dataset` whose element `j` is `(x, y)`, or `(x, y, resets)`
    with `resets`: `x` nests like `inputs`, each leaf
    `[batch_size, window, ...]` (steps `[j*window, (j+1)*window)` of every
    stream), `y` likewise, `resets` bool `[batch_size, window]`. Lists in
    the nests become tuples (`tf.data` reads a list as one tensor).

  Raises:
    ValueError: If `batch_size`/`window` are not positive ints,
      `batch_size > N`, the leaves disagree on `N`, `resets` is not `[N]`,
      or no element fits (`window > L` with `drop_remainder=True`).
    TypeError: If `resets` is not bool.
  """
  _checks.check_positive_int(batch_size, "batch_size")
  _checks.check_positive_int(window, "window")
  inputs = tf.nest.map_structure(tf.convert_to_tensor, inputs)
  targets = tf.nest.map_structure(tf.convert_to_tensor, targets)
  parts = {"inputs": inputs, "targets": targets}
  if resets is not None:
    parts["resets"] = _check_resets(resets)
  n = _length(parts)
  if batch_size > n:
    raise ValueError(
        f"`batch_size` ({batch_size}) is larger than the sequence's {n} "
        "steps: every stream needs at least one step. Pass batch_size <= "
        f"{n}.")
  length = n // batch_size
  if drop_remainder and window > length:
    raise ValueError(
        f"`window` ({window}) is longer than each stream's {length} steps "
        f"(N = {n} steps // batch_size = {batch_size}), so no element fits. "
        "Pass a smaller window or batch_size, or drop_remainder=False.")
  # Time-major steps [L, batch_size, ...]: tf.data's `batch` then gathers
  # `window` consecutive steps of every stream at once. Flat leaves: tf.data
  # would read a list in the nest as one tensor (so lists become tuples).
  order = _lists_to_tuples((parts["inputs"], parts["targets"]) + (
      (parts["resets"],) if resets is not None else ()))
  flat = [_loop.swap_batch_time(tf.reshape(
      t[:batch_size * length],
      tf.concat([[batch_size, length], tf.shape(t)[1:]], 0)))
          for t in tf.nest.flatten(order)]
  dataset = tf.data.Dataset.from_tensor_slices(tuple(flat)).batch(
      window, drop_remainder=drop_remainder)
  return dataset.map(lambda *leaves: tuple(tf.nest.pack_sequence_as(
      order, [_loop.swap_batch_time(t) for t in leaves])))


def _lists_to_tuples(structure: Nest) -> Nest:
  if isinstance(structure, list):
    structure = tuple(structure)
  if isinstance(structure, tuple) and not hasattr(structure, "_fields"):
    return tuple(_lists_to_tuples(s) for s in structure)
  if isinstance(structure, dict):
    return {k: _lists_to_tuples(v) for k, v in structure.items()}
  return structure


def _check_resets(resets: Any) -> tf.Tensor:
  """`resets` as a bool tensor `[N]`."""
  resets = tf.convert_to_tensor(resets)
  if resets.dtype != tf.bool:
    raise TypeError(f"`resets` must be a bool array [N], True where a "
                    f"document starts; got dtype {resets.dtype.name}.")
  if resets.shape.rank != 1:
    raise ValueError(f"`resets` must have shape [N] (one flag per step); got "
                     f"shape {_checks.shape_str(resets.shape)}.")
  return resets


def _length(parts: dict) -> int:
  """The common number of steps `N` of every leaf, or a ValueError."""
  dims = []
  for name, part in parts.items():
    for path, leaf in zip(_checks.leaf_paths(part, name),
                          tf.nest.flatten(part)):
      _checks.check_rank_at_least(leaf, 1, path, "[N, ...]")
      dims.append((path, leaf.shape[0]))
  if not dims:
    raise ValueError("`inputs` and `targets` have no arrays.")
  first_path, first = dims[0]
  for path, size in dims[1:]:
    if size != first:
      raise ValueError(
          f"{path} has {size} steps but {first_path} has {first}: "
          "`inputs`, `targets` and `resets` are one sequence, every leaf "
          "[N, ...] with the same N.")
  return first
