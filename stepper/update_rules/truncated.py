"""`TBPTT`: truncated BPTT(k2; k1), an update every `k1` steps.

Every window has the same static size, so the update compiles with XLA:
the batch is padded in front with `k2 - k1 - offset` steps and at the end
up to a multiple of `k1`, and update `j` runs steps `[j*k1, j*k1 + k2)` of
the padded batch (a gather of `k2` steps at a run-time offset: XLA compiles
it, as it compiles any slice whose size is static). Padded steps are masked
(`model_rnn`'s `mask`: the state passes through them unchanged) and weigh
nothing in the loss, so update `j` equals `stepper.tbptt`'s update `j`::

  padded step     0 1 2 | 3 4 5 6 7 | 8 9       k1 = 2, k2 = 5, time = 7
  front/end pad   p p p                 p       (k2 - k1 = 3 in front)
  update 0       [. . . L L]                    loss on steps 0-1
  update 1           [. . . L L]                loss on steps 2-3
  update 3                   [. . . L p]        loss on step 6

The first `k1` steps of a window give the state entering the next window
(a constant there); its last `k1` steps are the loss steps. A batch that
needs no padding (a stream's batch whose length is a multiple of `k1`, with
the whole overlap of history in front: every batch of `stepper.data.streams`
with `k1 == k2`) runs unmasked.
"""

from typing import Any

import tensorflow as tf

from stepper import _loop
from stepper import engine
from stepper import streaming
from stepper.update_rules import rule

Nest = Any


class TBPTT(rule.UpdateRule):
  """Truncated BPTT(k2; k1) (Williams & Peng): an update every `k1` steps,
  backpropagating `k2` steps; update `j` is `stepper.tbptt`'s update `j`.

  Online: update `j + 1` runs with the weights update `j` set. Alone, each
  batch holds independent sequences: the state is carried from window to
  window within the batch and starts from the initial state at the next
  batch. Driven by a `Stream`, the batch continues the last one: its first
  updates run again through the `overlap = k2 - k1` steps before it. The
  gradient is that of the loss scaled by `optimizer.scale_loss` (a
  `LossScaleOptimizer` under mixed precision), unscaled by `apply`.

  >>> rule = stepper.update_rules.TBPTT(None, k1=2, k2=5)
  >>> rule.k1, rule.overlap
  (2, 3)
  """

  static_time = True

  def __init__(self, context: rule.Context, *, k1: int, k2: int):
    super().__init__(context)
    self.k1, self.k2 = k1, k2
    self.overlap = k2 - k1
    # Tensors, not the iterator: the window index is an argument, so every
    # update of every sequence of one shape reuses one trace.
    self._update_function = tf.function(self._update_step,
                                        reduce_retracing=True)
    self._start = tf.function(self._replica_start, reduce_retracing=True)
    self._grads = None  # Set by `build` (XLA or not).
    self._indices = {}  # int -> its tensor: no eager op per update.

  def build(self, element_spec: tuple) -> None:
    del element_spec  # Traced per spec by `tf.function`.
    self._grads = tf.function(self._window_grads, jit_compile=True) if (
        self.context.jit_compile) else self._window_grads

  def train_batch(self, iterator) -> list[rule.Update]:
    element = next(iterator)
    time = int(self.context.strategy.experimental_local_results(
        element[1])[0].shape[1])
    updates, _ = self.run_batch(element, self._start(element[1]), 0, time)
    return updates

  def run_batch(self, element: tuple, carry: Nest, offset: int,
                time: int) -> tuple[list[rule.Update], Nest]:
    # Padding only where a window would start before the batch's first
    # step or end after its last (a Python bool: at most two traces).
    padded = offset != self.overlap or time % self.k1 != 0
    updates = []
    for j in range(-(-time // self.k1)):
      loss, grad_norm, carry = self._update_function(
          element, carry, self._index(j), self._index(offset), padded)
      updates.append((loss, grad_norm))
    return updates, carry

  def _index(self, i: int) -> tf.Tensor:
    if i not in self._indices:
      self._indices[i] = tf.constant(i)
    return self._indices[i]

  def _replica_start(self, targets: tf.Tensor) -> Nest:
    return self.context.strategy.run(
        lambda t: self.initial_carry(tf.shape(t)[0]), (targets,))

  def _update_step(self, element: tuple, states: Nest, j: tf.Tensor,
                   offset: tf.Tensor, padded: bool) -> tuple:
    return self.run_update(
        lambda *args: self._replica_update(*args, padded=padded), element,
        states, j, offset)

  def _replica_update(self, element: tuple, states: Nest, j: tf.Tensor,
                      offset: tf.Tensor, padded: bool):
    """Update `j` on this replica's rows, applied: this replica's share of
    the global mean loss, the gradient norm and the next window's states."""
    ctx = tf.distribute.get_replica_context()
    self.context.targets_per_step(*element[:2])  # Checks their shape.
    loss_sum, count, grads, next_states = self._grads(
        *self._padded(element, offset, padded), states, j)
    total = ctx.all_reduce(rule.SUM, count)
    grad_norm = self.apply([g / tf.cast(total, g.dtype) for g in grads])
    return loss_sum / total, grad_norm, next_states

  def _padded(self, element: tuple, offset: tf.Tensor, padded: bool
              ) -> tuple:
    """The batch time-major, padded (if `padded`) so that every window has
    `k2` steps.

    Returns:
      `(inputs, targets, resets, mask)`, each `[steps, rows, ...]`; `mask`
      (False on padded steps) is None where nothing is padded: a batch
      whose length is a multiple of `k1` with the whole overlap in front.
    """
    inputs, targets, resets = *element[:2], streaming.resets_of(element)
    if not padded:
      return (tf.nest.map_structure(_loop.swap_batch_time, inputs),
              _loop.swap_batch_time(targets),
              None if resets is None else _loop.swap_batch_time(resets), None)
    steps = tf.shape(targets)[1]
    front = self.overlap - offset
    end = tf.math.floormod(offset - steps, self.k1)

    def pad(t):  # The edge steps repeated: real values, never used.
      t = _loop.swap_batch_time(t)
      return tf.concat([tf.repeat(t[:1], front, axis=0), t,
                        tf.repeat(t[-1:], end, axis=0)], 0)

    mask = tf.concat([tf.zeros([front], tf.bool), tf.ones([steps], tf.bool),
                      tf.zeros([end], tf.bool)], 0)
    mask = tf.broadcast_to(mask[:, None], [tf.shape(mask)[0],
                                           tf.shape(targets)[0]])
    if resets is not None:  # No reset on a padded step.
      resets = tf.logical_and(pad(resets), mask)
    return tf.nest.map_structure(pad, inputs), pad(targets), resets, mask

  def _window_grads(self, inputs: Nest, targets: tf.Tensor,
                    resets: tf.Tensor | None, mask: tf.Tensor | None,
                    states: Nest, j: tf.Tensor):
    """Update `j`'s loss sum, count and gradient of the (scaled) sum, and
    the states entering window `j + 1`; every argument time-major, padded,
    the window's entering `states` a constant."""
    context = self.context
    k1, overlap = self.k1, self.overlap
    begin = j * k1
    window = lambda t, at, n: tf.gather(t, tf.range(n) + at, axis=0)
    reset_to = context.model.initial_state(tf.shape(targets)[1])

    def segment(states, at, n):
      controls = {} if resets is None else dict(
          resets=window(resets, at, n), _reset_to=reset_to)
      if mask is not None:
        controls["mask"] = window(mask, at, n)
      return engine.model_rnn(
          context.model,
          tf.nest.map_structure(lambda t: window(t, at, n), inputs), states,
          time_major=True, training=True, hoist=context.hoist, **controls)

    states = tf.nest.map_structure(tf.stop_gradient, states)
    with tf.GradientTape() as tape:
      outputs, next_states = segment(states, begin, k1)
      if overlap:  # The loss steps are the window's last k1.
        tail, _ = segment(next_states, begin + k1, overlap)
        outputs = tf.concat([outputs, tail], 0)[overlap:]
      at = begin + overlap
      loss_sum, count = self.summed_loss(
          _loop.merge_leading_dims(window(targets, at, k1)),
          self.apply_head(_loop.merge_leading_dims(outputs), training=True),
          None if mask is None else tf.reshape(window(mask, at, k1), [-1]))
      # Scaled by a keras.optimizers.LossScaleOptimizer (mixed_float16),
      # whose `apply` unscales; 1 for every other optimizer.
      scaled = context.optimizer.scale_loss(loss_sum)
    grads = tape.gradient(scaled, context.trainable)
    grads = [tf.zeros(v.shape, v.dtype) if g is None
             else tf.convert_to_tensor(g)
             for g, v in zip(grads, context.trainable)]
    return (loss_sum, count, grads,
            tf.nest.map_structure(tf.stop_gradient, next_states))
