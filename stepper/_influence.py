"""The influence of the weights on the state, carried forward one step at a time.

A private module with public names: the per-step rules of the online
gradient estimators of `stepper.online`. Each sees one step as

    s_t = f(s_{t-1}, x_t; theta),    y_t = g(s_{t-1}, x_t; theta),

with the state flattened to `[batch, state]` (`Layout`) and the weights to
`[params]`, and carries an estimate of the influence `M_t = ds_t/dtheta`
`[batch, state, params]`, which obeys (RTRL, Williams & Zipser 1989)

    M_t = J_t M_{t-1} + I_t,   J_t = ds_t/ds_{t-1},   I_t = ds_t/dtheta|_imm.

The loss `l_t` of step `t` depends on `s_{t-1}` and `theta`, so its gradient
is `dl_t/dtheta|_imm + sum_rows (dl_t/ds_{t-1}) M_{t-1}`.

* `Rtrl` carries `M` itself (exact).
* `Uoro` carries a rank-one `s~ theta~^T` per row (Tallec & Ollivier 2018).
* `Snap1` carries `M` only where one step reaches (Menick et al. 2021).

Every rule's `step` returns `(loss_t, grad_t, s_t, carry_t)`; every carried
tensor has the batch first, so masks and resets select rows generically.
The rows of a batch must not interact inside the step (every Keras cell,
every row-wise model).
"""

import contextlib
import math
from typing import Any, Callable, NamedTuple

import keras
import numpy as np
import tensorflow as tf

from stepper import _sparsity

Nest = Any
_ZERO = tf.UnconnectedGradients.ZERO


class Layout:
  """Flat views of the states, `[batch, state]`, and the weights, `[params]`.

  Args:
    state_structure: The states, nested like the step's (tensors or specs,
      leaves `[batch, ...]` with known non-batch dimensions).
    variables: The differentiated variables.
  """

  def __init__(self, state_structure: Nest, variables: list):
    self._structure = state_structure
    flat = tf.nest.flatten(state_structure)
    self._state_shapes = [s.shape[1:].as_list() for s in flat]
    self._state_sizes = [math.prod(s) for s in self._state_shapes]
    self.state_size = sum(self._state_sizes)
    self.state_dtype = flat[0].dtype
    self.variables = list(variables)
    # What tapes differentiate: a Keras variable's backing `tf.Variable`
    # (tape.jacobian reads `source.dtype`, a string on a Keras variable).
    self.sources = [v.value if isinstance(v, keras.Variable) else v
                    for v in self.variables]
    self._param_shapes = [v.shape.as_list() for v in self.variables]
    self._param_sizes = [math.prod(s) for s in self._param_shapes]
    self.param_size = sum(self._param_sizes)
    self.param_dtype = tf.as_dtype(self.variables[0].dtype)

  def vector(self, states: Nest) -> tf.Tensor:
    """States (nested like the step's) -> `[batch, state]`."""
    flat = tf.nest.flatten(states)
    return tf.concat([tf.reshape(s, [tf.shape(s)[0], n])
                      for s, n in zip(flat, self._state_sizes)], 1)

  def states(self, vector: tf.Tensor) -> Nest:
    """`[batch, state]` -> the states, nested like the step's."""
    parts = tf.split(vector, self._state_sizes, axis=1)
    return tf.nest.pack_sequence_as(self._structure, [
        tf.reshape(p, [-1] + shape)
        for p, shape in zip(parts, self._state_shapes)])

  def params(self, grads: list, lead: int = 0) -> tf.Tensor:
    """Per-variable tensors `[*lead_dims, *var.shape]` -> `[*lead_dims,
    params]` (`lead` leading dimensions kept)."""
    flat = []
    for g in grads:
      lead_shape = tf.shape(g)[:lead]
      flat.append(tf.cast(tf.reshape(g, tf.concat([lead_shape, [-1]], 0)),
                          self.param_dtype))
    return tf.concat(flat, axis=lead)

  def split(self, vector: tf.Tensor) -> list[tf.Tensor]:
    """`[params]` -> one tensor per variable, shaped and typed like it."""
    parts = tf.split(vector, self._param_sizes)
    return [tf.cast(tf.reshape(p, shape), v.dtype) for p, shape, v in
            zip(parts, self._param_shapes, self.variables)]


class Taped(NamedTuple):
  """One step recorded by `StepCall.taped`."""
  tape: tf.GradientTape  # Persistent: more Jacobians may be taken.
  loss: tf.Tensor  # The weighted loss, summed over rows.
  s_new: tf.Tensor  # s_t, [batch, state].
  projected: tf.Tensor | None  # `project(s_t)`.
  dl_ds: tf.Tensor  # dl/ds_{t-1}, [batch, state].
  dl_dw: tf.Tensor  # dl/dtheta|_imm, [params].
  jvp: tf.Tensor | None  # J tangent, [batch, state].


class StepCall:
  """One step with its loss, on flat states: what every rule evaluates.

  Args:
    call: The step's per-run function `(x_t, states, training) -> (y_t,
      new_states)`.
    layout: The `Layout`.
    loss_rows: `(target_t, y_t) -> [batch]` per-row loss.
    x_structure: The nesting of one step's input.
    training: Passed to the step.
  """

  def __init__(self, call: Callable, layout: Layout, loss_rows: Callable,
               x_structure: Nest, training: Any):
    self.call = call
    self.layout = layout
    self._loss_rows = loss_rows
    self._x_structure = x_structure
    self._training = training

  def next_state(self, flat_x: list, s: tf.Tensor) -> tf.Tensor:
    """`s_t` `[batch, state]` from `s_{t-1}`."""
    _, new = self.call(tf.nest.pack_sequence_as(self._x_structure, flat_x),
                       self.layout.states(s), self._training)
    return self.layout.vector(new)

  def __call__(self, flat_x: list, s: tf.Tensor, target: tf.Tensor,
               weight: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """`(loss, s_t)`: the weighted loss summed over rows, and `s_t`."""
    y, new = self.call(tf.nest.pack_sequence_as(self._x_structure, flat_x),
                       self.layout.states(s), self._training)
    rows = self._loss_rows(target, y)
    return tf.reduce_sum(rows * tf.cast(weight, rows.dtype)), \
        self.layout.vector(new)

  def taped(self, flat_x: list, s: tf.Tensor, target: tf.Tensor,
            weight: tf.Tensor, project: Callable | None = None,
            tangent: tf.Tensor | None = None) -> "Taped":
    """The step under a persistent tape (which also records `project(s_t)`)
    and, given a `tangent` of `s_{t-1}`, forward mode (`J tangent`)."""
    with tf.GradientTape(persistent=True) as tape:
      tape.watch(s)
      with (tf.autodiff.ForwardAccumulator(s, tangent) if tangent is not None
            else contextlib.nullcontext()) as acc:
        loss, s_new = self(flat_x, s, target, weight)
      projected = None if project is None else project(s_new)
    grads = tape.gradient(loss, [s] + self.layout.sources,
                          unconnected_gradients=_ZERO)
    return Taped(tape, loss, s_new, projected, grads[0],
                 self.layout.params(grads[1:]),
                 None if acc is None else acc.jvp(
                     s_new, unconnected_gradients=_ZERO))

  def per_row_jacobian(self, tape: tf.GradientTape, target: tf.Tensor,
                       lead: int) -> tf.Tensor:
    """`d target / dtheta`, `[*target.shape, params]`: per row, as each row
    of `target` depends on its row of the batch only (vectorized)."""
    return self.layout.params(
        tape.jacobian(target, self.layout.sources,
                      unconnected_gradients=_ZERO), lead=lead)


class Rtrl:
  """Exact RTRL: carries `M` `[batch, state, params]`.

  Per step: `J` by `batch_jacobian` (`state` reverse passes, vectorized),
  `I` by `jacobian` (`batch * state` reverse passes, vectorized) and the
  product `J M`, `O(state^2 params)` per row.
  """

  def __init__(self, fn: StepCall):
    self._fn = fn

  def zeros(self, batch) -> list[tf.Tensor]:
    lay = self._fn.layout
    return [tf.zeros(tf.stack([batch, lay.state_size, lay.param_size]),
                     lay.param_dtype)]

  def step(self, flat_x, s, carry, target, weight, t, seed):
    del t, seed
    (m,) = carry
    fn = self._fn
    tape, loss, s_new, _, dl_ds, dl_dw, _ = fn.taped(flat_x, s, target,
                                                     weight)
    jac = tape.batch_jacobian(s_new, s, unconnected_gradients=_ZERO)
    imm = fn.per_row_jacobian(tape, s_new, lead=2)
    m = tf.cast(m, s.dtype)
    grad = dl_dw + tf.cast(tf.einsum("bs,bsp->p", dl_ds, m), dl_dw.dtype)
    m_new = tf.einsum("bij,bjp->bip", jac, m) + tf.cast(imm, s.dtype)
    return loss, grad, s_new, [tf.cast(m_new, fn.layout.param_dtype)]


class Uoro:
  """UORO (Tallec & Ollivier, ICLR 2018): `M ~ s~ theta~^T` per row.

  Per step, with random signs `nu` `[batch, state]`:

      s~ <- rho0 J s~ + rho1 nu,   theta~ <- theta~ / rho0 + nu^T I / rho1,
      rho0 = sqrt(|theta~| / |J s~|),   rho1 = sqrt(|nu^T I| / |nu|),

  (each norm per row, `eps` added) which keeps `E[s~ theta~^T] = M` (the
  cross terms have mean zero: `nu -> -nu` flips them and leaves every rho
  unchanged) while balancing the two factors' norms. `J s~` is one
  forward-mode product, `nu^T I` one reverse pass per row (vectorized).
  Carries `[batch, state]` and `[batch, params]`.
  """

  _EPS = 1e-7

  def __init__(self, fn: StepCall):
    self._fn = fn

  def zeros(self, batch) -> list[tf.Tensor]:
    lay = self._fn.layout
    return [tf.zeros(tf.stack([batch, lay.state_size]), lay.state_dtype),
            tf.zeros(tf.stack([batch, lay.param_size]), lay.param_dtype)]

  def step(self, flat_x, s, carry, target, weight, t, seed):
    s_tilde, w_tilde = carry
    fn = self._fn
    step_seed = tf.random.experimental.stateless_fold_in(seed, t)
    nu = tf.where(tf.random.stateless_uniform(tf.shape(s), step_seed) < 0.5,
                  -tf.ones_like(s), tf.ones_like(s))
    tape, loss, s_new, projected, dl_ds, dl_dw, js = fn.taped(
        flat_x, s, target, weight,
        lambda s_new: tf.reduce_sum(nu * s_new, axis=1), s_tilde)
    nu_imm = fn.per_row_jacobian(tape, projected, lead=1)
    grad = dl_dw + tf.reduce_sum(
        tf.cast(tf.reduce_sum(dl_ds * s_tilde, 1, keepdims=True),
                w_tilde.dtype) * w_tilde, 0)
    norm = lambda v: tf.norm(v, axis=1, keepdims=True)
    eps = self._EPS
    rho0 = tf.sqrt(tf.cast(norm(w_tilde), s.dtype) / (norm(js) + eps)) + eps
    rho1 = tf.sqrt(tf.cast(norm(nu_imm), s.dtype) / (norm(nu) + eps)) + eps
    s_next = rho0 * js + rho1 * nu
    w_next = (w_tilde / tf.cast(rho0, w_tilde.dtype) +
              nu_imm / tf.cast(rho1, w_tilde.dtype))
    return loss, grad, s_new, [s_next, w_next]


class Snap1:
  """SnAp-1 (Menick et al., ICLR 2021), with the diagonal of `J`.

  Keeps `M[s, p]` only at the entries of the immediate Jacobian's pattern
  (the state units parameter `p` reaches in one step), `K` of them, and
  propagates them with the diagonal of the state Jacobian:

      M[s, p] <- J[s, s] M[s, p] + I[s, p]   for (s, p) in the pattern.

  This is RTRL exactly when `J` is diagonal (elementwise recurrences); for a
  dense `J` it drops every path through another unit, including the
  `h`-`c` coupling inside an LSTM unit. Patterns and colourings come from
  `stepper._sparsity` (one probe per step model and shape). Per step: `I`'s
  entries from one vectorized reverse pass per row and row colour (1 for
  GRU/SimpleRNN, 2 for LSTM), `J`'s diagonal from one forward-mode pass over
  `batch * colours` rows (1 colour for an elementwise recurrence, `state`
  for a dense one). Carries `[batch, K]` (`K = params` for GRU and
  SimpleRNN, `1.75 params` for LSTM, whose output gate reaches `h` only).

  Measured (`python -m benchmarks.online --cost`: 16 units, 16 rows, a
  quiet 2-core CPU): a step costs 4.7 BPTT steps on a GRU (a dense `J`, 16
  colours) and 2.0 on a minGRU (a diagonal `J`, 1 colour); peak memory
  8.8x and 2.5x BPTT's over 50 steps, constant in the sequence length.
  """

  def __init__(self, fn: StepCall, patterns: _sparsity.Patterns):
    self._fn = fn
    lay = fn.layout
    rows, cols = np.nonzero(patterns.immediate)  # Row-major: by unit.
    self.kept = len(rows)
    row_colours = _sparsity.row_colouring(patterns.immediate)
    diag_colours = _sparsity.diagonal_colouring(patterns.state)
    self._unit = tf.constant(rows, tf.int32)
    self._param = tf.constant(cols, tf.int32)
    self._imm_index = tf.constant(row_colours[rows] * lay.param_size + cols,
                                  tf.int32)
    self._row_ind = tf.constant(_sparsity.indicators(row_colours),
                                lay.state_dtype)
    self._diag_colours = int(diag_colours.max()) + 1 if rows.size else 1
    self._diag_tangent = tf.constant(
        _sparsity.indicators(diag_colours).T, lay.state_dtype)
    self._diag_index = tf.constant(
        diag_colours * lay.state_size + np.arange(lay.state_size), tf.int32)
    self.row_colours = int(row_colours.max()) + 1 if rows.size else 0
    self.diag_colours = self._diag_colours

  def zeros(self, batch) -> list[tf.Tensor]:
    return [tf.zeros(tf.stack([batch, self.kept]), self._fn.layout.param_dtype)]

  def _diagonal(self, flat_x, s) -> tf.Tensor:
    """`J`'s diagonal `[batch, state]`: one forward-mode pass over the batch
    tiled once per colour, tangent the colour's indicator."""
    c = self._diag_colours
    batch = tf.shape(s)[0]
    tiled_s = tf.tile(s, [c, 1])  # Row `k * batch + b`: colour k, row b.
    tangent = tf.repeat(self._diag_tangent, batch, axis=0)
    tiled_x = [tf.tile(x, tf.concat([[c], tf.ones([x.shape.rank - 1],
                                                  tf.int32)], 0))
               for x in flat_x]
    with tf.autodiff.ForwardAccumulator(tiled_s, tangent) as acc:
      s_new = self._fn.next_state(tiled_x, tiled_s)
    products = acc.jvp(s_new, unconnected_gradients=_ZERO)  # [c*batch, S]
    products = tf.reshape(products, [c, batch, -1])
    products = tf.reshape(tf.transpose(products, [1, 0, 2]), [batch, -1])
    return tf.gather(products, self._diag_index, axis=1)

  def step(self, flat_x, s, carry, target, weight, t, seed):
    del t, seed
    (m,) = carry
    fn = self._fn
    # One reverse pass per row and colour: [batch, colours, params].
    tape, loss, s_new, compressed, dl_ds, dl_dw, _ = fn.taped(
        flat_x, s, target, weight, lambda s_new: s_new @ self._row_ind)
    imm = fn.per_row_jacobian(tape, compressed, lead=2)
    imm = tf.gather(tf.reshape(imm, [tf.shape(s)[0], -1]), self._imm_index,
                    axis=1)  # [batch, K]
    diagonal = tf.cast(tf.gather(self._diagonal(flat_x, s), self._unit,
                                 axis=1), m.dtype)
    per_entry = tf.reduce_sum(
        tf.cast(tf.gather(dl_ds, self._unit, axis=1), m.dtype) * m, 0)
    grad = dl_dw + tf.math.unsorted_segment_sum(
        per_entry, self._param, fn.layout.param_size)
    return loss, grad, s_new, [diagonal * m + imm]


def exact_jacobians(fn: StepCall) -> Callable:
  """`(s [rows, state], flat x) -> (J, I)`: one step's exact Jacobians, for
  `stepper._sparsity.probe`."""

  def jacobians(s, flat_x):
    with tf.GradientTape(persistent=True) as tape:
      tape.watch(s)
      s_new = fn.next_state(flat_x, s)
    jac = tape.batch_jacobian(s_new, s, unconnected_gradients=_ZERO)
    return jac, fn.per_row_jacobian(tape, s_new, lead=2)

  return jacobians
