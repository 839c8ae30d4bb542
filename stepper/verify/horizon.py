"""`gradient_horizon`: how far back in time (and down a stack) the gradient
of one step's loss reaches, with full BPTT and with a truncation window.
"""

import dataclasses
from typing import Any, Callable

import numpy as np
import tensorflow as tf

from stepper import _checks
from stepper import engine
from stepper import steps as steps_lib
from stepper.verify import _common

Nest = Any


@dataclasses.dataclass
class Horizon:
  """How far back the gradient of one step's loss reaches.

  Lag `k` is `k` steps before the loss step `t = loss_at`: `input_norms[k]`
  is `||dL_t / dx_{t-k}||` and `state_norms[k]` is `||dL_t / s_{t-k}||`
  where `s_{t-k}` is the state entering step `t-k` (the state after step
  `t-k-1`; `s_0` is the initial state). Norms are Frobenius norms over the
  batch and all leaves.

  Attributes:
    loss_at: The loss step `t` (non-negative).
    lags: `[t + 1]` ints `0..t`.
    input_norms: `[t + 1]` with full BPTT.
    state_norms: `[t + 1]` with full BPTT.
    state_norms_by_entry: `[n_entries, t + 1]`: per top-level state entry
      (for a stack: per layer, the vertical flow; for an LSTM cell: h and c).
    window: The truncation window, or `None`.
    boundaries: Steps `b <= t` before which a window of `window` steps
      (chunks `[0, window)`, `[window, 2 window)`, ...) cuts the gradient.
    truncated_input_norms: `input_norms` with those cuts: zero beyond the
      last boundary.
    truncated_state_norms: `state_norms` with those cuts. The state norm at
      a boundary is the gradient that reaches it and is dropped.
    truncated_state_norms_by_entry: `state_norms_by_entry` with those cuts.
    lost_share: `{b: share}` for every boundary: the share of the weight
      gradient `g` of `L_t` that flows across `b`, `||g - g_cut_at_b|| /
      ||g||` (what truncating there loses; `nan` for a step without
      trainable variables).
  """
  loss_at: int
  lags: np.ndarray
  input_norms: np.ndarray
  state_norms: np.ndarray
  state_norms_by_entry: np.ndarray
  window: int | None = None
  boundaries: list = dataclasses.field(default_factory=list)
  truncated_input_norms: np.ndarray | None = None
  truncated_state_norms: np.ndarray | None = None
  truncated_state_norms_by_entry: np.ndarray | None = None
  lost_share: dict = dataclasses.field(default_factory=dict)

  def to_dict(self) -> dict:
    """A JSON-serialisable dict (arrays as lists)."""
    return {k: (v.tolist() if isinstance(v, np.ndarray) else v)
            for k, v in dataclasses.asdict(self).items()}


def _perturbed_step(inner: steps_lib.Step) -> steps_lib.Step:
  """A step reading `(x_t, d_t, cut_t)`: its incoming states are cut (no
  gradient) where `cut_t`, then `d_t` (zeros) is added, so `dL/dd_t` is the
  gradient w.r.t. the state entering step `t`."""

  def wrap(call):
    def fn(x, states, training):
      x_t, d_t, cut_t = x
      flat = [tf.where(tf.reshape(cut_t, [-1] + [1] * (s.shape.rank - 1)),
                       tf.stop_gradient(s), s) + d
              for s, d in zip(tf.nest.flatten(states), tf.nest.flatten(d_t))]
      return call(x_t, tf.nest.pack_sequence_as(states, flat), training)
    return fn

  return steps_lib.wrap_call(inner, wrap, name=inner.name, module=inner.module)


def _horizon_run(step: steps_lib.Step, inputs: Nest, states: Nest,
                 cuts: np.ndarray, loss_at: int, loss: Callable):
  """Per-time gradient norms of the inputs and states, and weight grads."""
  batch = tf.shape(tf.nest.flatten(inputs)[0])[0]
  time = tf.nest.flatten(inputs)[0].shape[1]
  d = tf.nest.map_structure(
      lambda s: tf.zeros(tf.concat([[batch, time], tf.shape(s)[1:]], 0),
                         s.dtype), states)
  cut = tf.broadcast_to(tf.constant(cuts)[None, :, None], [batch, time, 1])
  with tf.GradientTape() as tape:
    tape.watch([inputs, d])
    outputs = engine.model_rnn(step, (inputs, d, cut), states)[0]
    variables = step.trainable_variables  # Built by now.
    value = loss(tf.nest.map_structure(lambda y: y[:, loss_at], outputs))
  dx, dd, dv = tape.gradient(
      value, [inputs, d, variables],
      unconnected_gradients=tf.UnconnectedGradients.ZERO)

  def per_time(grads):  # [time]: norm over batch and features of each step.
    squares = [tf.reduce_sum(tf.square(tf.reshape(
        tf.transpose(g, [1, 0] + list(range(2, g.shape.rank))), [time, -1])),
        axis=1) for g in tf.nest.flatten(grads)]
    return np.sqrt(tf.add_n(squares).numpy())[:loss_at + 1][::-1]

  entries = dd if isinstance(dd, (list, tuple)) else [dd]
  by_entry = np.stack([per_time(e) for e in entries])
  weights = (np.concatenate([np.ravel(g) for g in dv]) if dv else
             np.zeros([0]))
  return per_time(dx), per_time(dd), by_entry, weights


def gradient_horizon(step: Any, inputs: Nest, *, loss_at: int = -1,
                     initial_states: Nest | None = None,
                     loss: Callable[[Nest], tf.Tensor] | None = None,
                     window: int | None = None) -> Horizon:
  """The norm of the gradient of the loss at one step w.r.t. the states and
  inputs `k` steps earlier, for every `k`, with full BPTT and truncation.

  >>> cell = keras.layers.GRUCell(8)
  >>> h = stepper.verify.gradient_horizon(cell, tf.random.normal([4, 12, 3]),
  ...                                     window=4)
  >>> h.state_norms.shape, h.boundaries  # Lags 0..11; cuts before 4 and 8.
  ((12,), [4, 8])
  >>> bool((h.truncated_state_norms[4:] == 0).all())  # Nothing past a cut.
  True
  >>> sorted(h.lost_share)  # The weight gradient's share lost at each cut.
  [4, 8]

  Args:
    step: Any step (cell, step model, callable, `Step`, stack).
    inputs: Floating tensor or nest, each leaf `[batch, time, ...]`.
    loss_at: The step `t` whose output feeds the loss; negative counts from
      the end.
    initial_states: Nest like the step's states; required for a callable.
    loss: Maps the step's output at `loss_at` (`[batch, ...]` leaves) to a
      scalar. Default: mean squared output.
    window: Truncation window in steps (chunks from the start of the
      sequence), or `None` for full BPTT only.

  Returns:
    A `Horizon`.

  Raises:
    ValueError: If `loss_at` lies outside the sequence, `window` is not a
      positive integer, or the time dimension is not static.
    TypeError: For non-floating inputs.
  """
  inputs = _common.float_inputs(inputs, "inputs", None)
  adapted = steps_lib.as_step(step)
  time = tf.nest.flatten(inputs)[0].shape[1] if tf.nest.flatten(
      inputs)[0].shape.rank else None
  if time is None:
    raise ValueError("gradient_horizon needs inputs with a static time "
                     "dimension [batch, time, ...].")
  if isinstance(loss_at, bool) or not isinstance(loss_at, int) or not (
      -time <= loss_at < time):
    raise ValueError(f"`loss_at` must be an int step in [{-time}, {time}) "
                     f"(the inputs have {time} steps); got {loss_at!r}.")
  loss_at %= time
  if window is not None:
    _checks.check_positive_int(window, "window")
  states = (adapted.initial_state(tf.shape(tf.nest.flatten(inputs)[0])[0])
            if initial_states is None else
            _common.float_inputs(initial_states, "initial_states", None))
  wrapped = _perturbed_step(adapted)
  loss = loss or _common.mean_square
  run = lambda cuts: _horizon_run(wrapped, inputs, states, cuts, loss_at,
                                  loss)
  no_cut = np.zeros([time], bool)
  dx, ds, by_entry, full_weights = run(no_cut)
  horizon = Horizon(loss_at, np.arange(loss_at + 1), dx, ds, by_entry)
  if window is None:
    return horizon
  horizon.window = window
  horizon.boundaries = list(range(window, loss_at + 1, window))
  cuts = no_cut.copy()
  cuts[horizon.boundaries] = True
  (horizon.truncated_input_norms, horizon.truncated_state_norms,
   horizon.truncated_state_norms_by_entry, _) = run(cuts)
  full_norm = np.linalg.norm(full_weights)
  for b in horizon.boundaries:
    one_cut = no_cut.copy()
    one_cut[b] = True
    lost = np.linalg.norm(full_weights - run(one_cut)[3])
    horizon.lost_share[b] = float(lost / full_norm) if full_norm else (
        float("nan"))
  return horizon
