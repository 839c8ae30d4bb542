"""Sparsity patterns of one step's Jacobians, and colourings that compress them.

A private module with public names, for SnAp-1 (`stepper._influence`). Two
Jacobians of one step `s_t = f(s_{t-1}, x_t; theta)`, per row of the batch:

* the immediate Jacobian `I = ds_t/dtheta` `[state, params]`: which state
  units each parameter reaches in one step;
* the state Jacobian `J = ds_t/ds_{t-1}` `[state, state]`.

`probe` finds both patterns numerically, once per step model and shape: it
evaluates both Jacobians exactly (reverse mode) at random states and inputs
for a few rows, at the current weights, and keeps every entry that is nonzero
in some row. An entry that is structurally nonzero is nonzero at a random
point except on a set of measure zero (a weight that is exactly 0, a ReLU
that is off in every probed row), so the pattern is the step's structural
pattern with probability one for smooth steps; integer inputs (ids) are
probed with zeros and ones only.

The colourings let a few Jacobian products recover every needed entry:

* `row_colouring(I)`: state units whose parameter sets are disjoint share a
  colour, so one vector-Jacobian product with the colour's indicator holds
  each parameter's single entry in that colour (Curtis-Powell-Reid row
  compression). Keras cells: each parameter reaches one unit (GRU,
  SimpleRNN: 1 colour) or a unit's `h` and `c` (LSTM: 2 colours).
* `diagonal_colouring(J)`: units `j != k` with `J[j, k] != 0` or
  `J[k, j] != 0` get different colours, so the Jacobian-vector product with
  a colour's indicator holds `J[j, j]` at every unit `j` of the colour. An
  elementwise recurrence (IndRNN, minGRU, LRU) has 1 colour; a dense one has
  `state` colours (its diagonal costs a full Jacobian).
"""

import concurrent.futures
from typing import Callable, NamedTuple

import numpy as np
import tensorflow as tf


class Patterns(NamedTuple):
  """One step's structural patterns, bool numpy arrays.

  Attributes:
    immediate: `[state, params]`, `ds_t/dtheta` nonzero somewhere.
    state: `[state, state]`, `ds_t/ds_{t-1}` nonzero somewhere.
  """
  immediate: np.ndarray
  state: np.ndarray


def greedy_colouring(conflicts: np.ndarray) -> np.ndarray:
  """Colours the nodes of a graph so that no two neighbours share a colour.

  Largest degree first, each node takes the smallest colour its coloured
  neighbours do not use (Welsh-Powell): at most `max degree + 1` colours.

  >>> conflicts = np.array([[0, 1, 0], [1, 0, 0], [0, 0, 0]], bool)
  >>> greedy_colouring(conflicts).tolist()
  [0, 1, 0]

  Args:
    conflicts: bool `[n, n]`, symmetric; the diagonal is ignored.

  Returns:
    int `[n]`, colours `0 .. k - 1`.
  """
  n = conflicts.shape[0]
  conflicts = conflicts & ~np.eye(n, dtype=bool)
  colours = np.full(n, -1, np.int64)
  for node in np.argsort(-conflicts.sum(1), kind="stable"):
    used = set(colours[conflicts[node]].tolist())
    colour = 0
    while colour in used:
      colour += 1
    colours[node] = colour
  return colours


def row_colouring(immediate: np.ndarray) -> np.ndarray:
  """Colours of state units: units sharing a parameter differ."""
  reach = immediate.astype(np.float64)
  return greedy_colouring(reach @ reach.T > 0)


def diagonal_colouring(state: np.ndarray) -> np.ndarray:
  """Colours of state units: `j`, `k` coupled by `J` in either way differ."""
  return greedy_colouring(state | state.T)


def indicators(colours: np.ndarray) -> np.ndarray:
  """`[n, n_colours]` float: column `c` is 1 at the nodes of colour `c`."""
  n_colours = int(colours.max()) + 1 if colours.size else 0
  return (colours[:, None] == np.arange(n_colours)[None, :]).astype(
      np.float64)


def probe(jacobians: Callable[[tf.Tensor, list], tuple[tf.Tensor, tf.Tensor]],
          x_specs: list[tf.TensorSpec], state_size: int, dtype: tf.DType,
          rows: int = 4, seed: int = 0) -> Patterns:
  """Finds one step's patterns from its exact Jacobians at random points.

  Runs eagerly, also while a function is being traced, so its values can
  decide the traced function's structure.

  Args:
    jacobians: `(states [rows, state], flat x_t) -> (J [rows, state, state],
      I [rows, state, params])`, exact.
    x_specs: One step's flat input specs, `[batch, ...]`.
    state_size: The number of state units.
    dtype: The states' dtype.
    rows: How many random rows to probe.
    seed: Seed of the random points (the probe is deterministic).

  Returns:
    The `Patterns`.
  """
  def evaluate():
    rng = np.random.default_rng(seed)
    x = []
    for spec in x_specs:
      shape = [rows] + spec.shape[1:].as_list()
      if spec.dtype.is_floating:
        x.append(tf.constant(rng.standard_normal(shape), spec.dtype))
      else:
        x.append(tf.constant(rng.integers(0, 2, shape), spec.dtype))
    states = tf.constant(rng.standard_normal([rows, state_size]), dtype)
    state_jac, immediate = jacobians(states, x)
    return Patterns(
        immediate=np.any(np.asarray(immediate) != 0, axis=0),
        state=np.any(np.asarray(state_jac) != 0, axis=0))

  # In a thread of its own: eager there (a fresh thread has no graph), with
  # gradient tapes recording, also while the caller traces a function
  # (`tf.init_scope` would pause every tape).
  with concurrent.futures.ThreadPoolExecutor(1) as pool:
    return pool.submit(evaluate).result()
