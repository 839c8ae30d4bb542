"""`TBPTT`: truncated BPTT(k2; k1), an update every `k1` steps."""

from typing import Any

import tensorflow as tf

from stepper import streaming
from stepper import tbptt as tbptt_lib
from stepper.update_rules import rule

Nest = Any


class TBPTT(rule.UpdateRule):
  """Truncated BPTT(k2; k1) (Williams & Peng): an update every `k1` steps,
  backpropagating `k2` steps; `stepper.tbptt` defines each update.

  Online: update `j + 1` runs with the weights update `j` set. Alone, each
  batch holds independent sequences: the state is carried from window to
  window within the batch and starts from the initial state at the next
  batch. Driven by a `Stream`, the batch continues the last one: its first
  updates run again through the `overlap = k2 - k1` steps before it.

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
    self._updater = None  # A `tbptt.Updater`, set by `build`.

  def build(self, element_spec: tuple) -> None:
    del element_spec  # Traced per spec by `tf.function`.
    context = self.context
    self._updater = tbptt_lib.Updater(
        context.model, context.loss, k1=self.k1, k2=self.k2,
        variables=context.trainable, training=True)

  def train_batch(self, iterator) -> list[rule.Update]:
    element = next(iterator)
    time = int(self.context.strategy.experimental_local_results(
        element[1])[0].shape[1])
    updates, _ = self.run_batch(element, self._start(element[1]), 0, time)
    return updates

  def run_batch(self, element: tuple, carry: Nest, offset: int,
                time: int) -> tuple[list[rule.Update], Nest]:
    updates = []
    for j in range(-(-time // self.k1)):
      loss, grad_norm, carry = self._update_function(
          element, carry, tf.constant(j), tf.constant(offset))
      updates.append((loss, grad_norm))
    return updates, carry

  def _replica_start(self, targets: tf.Tensor) -> Nest:
    return self.context.strategy.run(
        lambda t: self.initial_carry(tf.shape(t)[0]), (targets,))

  def _update_step(self, element: tuple, states: Nest, j: tf.Tensor,
                   offset: tf.Tensor) -> tuple:
    return self.run_update(self._replica_update, element, states, j, offset)

  def _replica_update(self, element: tuple, states: Nest, j: tf.Tensor,
                      offset: tf.Tensor):
    """`tbptt.Updater`'s update `j` on this replica's rows, then applied."""
    ctx = tf.distribute.get_replica_context()
    inputs, targets = element[:2]
    self.context.targets_per_step(inputs, targets)  # Checks their shape.
    loss, grads, next_states = self._updater.update(
        inputs, targets, states, j, offset=offset,
        resets=streaming.resets_of(element))
    if loss.dtype.size < 4:  # Mixed precision: report it in float32.
      loss = tf.cast(loss, tf.float32)
    # `loss` is this replica's mean; weight it by its share of the rows.
    rows = tf.cast(tf.shape(targets)[0], loss.dtype)
    share = rows / ctx.all_reduce(rule.SUM, rows)
    grad_norm = self.apply([g * share for g in grads], scaled=False)
    return loss * share, grad_norm, next_states
