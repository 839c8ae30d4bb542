"""`FullBPTT`: one optimizer update per batch, backpropagating all of it."""

from typing import Any

import tensorflow as tf

from stepper import streaming
from stepper.update_rules import rule

Nest = Any


class FullBPTT(rule.UpdateRule):
  """Full backpropagation through time: one update per batch.

  Each batch's loss is the mean over its steps and rows (or over its rows
  for sequence-level targets); its gradient reaches the batch's first step.
  Driven by a `Stream`, the batch starts from the carried state (a constant)
  and leaves its final state to the next (Keras' `stateful=True`).

  >>> rule = stepper.update_rules.FullBPTT(None)
  >>> rule.k1, rule.overlap, rule.allow_sequence_level
  (None, 0, True)
  """

  allow_sequence_level = True

  def __init__(self, context: rule.Context):
    super().__init__(context)
    # The iterator is an argument: one trace per dataset element spec.
    self._train_function = tf.function(self._train_step)
    self._stream_function = tf.function(self._stream_step,
                                        reduce_retracing=True)
    self._grads = None  # Set by `build` (XLA or not).

  def build(self, element_spec: tuple) -> None:
    del element_spec  # Traced per spec by `tf.function`.
    self._grads = tf.function(self._loss_and_grads, jit_compile=True) if (
        self.context.jit_compile) else self._loss_and_grads

  def train_batch(self, iterator) -> list[rule.Update]:
    return [self._train_function(iterator)[:2]]

  def run_batch(self, element: tuple, carry: Nest, offset: int,
                time: int) -> tuple[list[rule.Update], Nest]:
    del offset, time  # No history: the whole batch is one update.
    loss, grad_norm, carry = self._stream_function(element, carry)
    return [(loss, grad_norm)], carry

  def _train_step(self, iterator) -> tuple[tf.Tensor, tf.Tensor]:
    return self.run_update(self._replica_update, *next(iterator))

  def _stream_step(self, element: tuple, states: Nest) -> tuple:
    return self.run_update(self._replica_update, *element[:2],
                           streaming.resets_of(element), states)

  def _replica_update(self, inputs: Nest, targets: tf.Tensor,
                      resets: tf.Tensor | None = None,
                      states: Nest | None = None):
    """One update on this replica's rows, from `states` or the initial state.

    Returns this replica's share of the global mean loss (the shares sum to
    it), the global gradient norm before clipping and the final states.
    """
    ctx = tf.distribute.get_replica_context()
    loss_sum, count, grads, final_states = self._grads(inputs, targets,
                                                       resets, states)
    total = ctx.all_reduce(rule.SUM, count)
    grad_norm = self.apply([None if g is None else g / total for g in grads])
    return loss_sum / total, grad_norm, final_states

  def _loss_and_grads(self, inputs: Nest, targets: tf.Tensor,
                      resets: tf.Tensor | None, states: Nest | None):
    """The loss sum, its count, the sum's gradient, the final states."""
    optimizer = self.context.optimizer
    with tf.GradientTape() as tape:
      loss_sum, count, final_states = self.loss_sum(
          (inputs, targets, resets), states, training=True)
      # Scaled by a keras.optimizers.LossScaleOptimizer (mixed_float16),
      # whose `apply` unscales; 1 for every other optimizer.
      scaled = optimizer.scale_loss(loss_sum)
    return (loss_sum, count, tape.gradient(scaled, self.context.trainable),
            final_states)
