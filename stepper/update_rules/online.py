"""`Online`: an update every batch from a forward-carried influence (RTRL,
SnAp-1, UORO; `stepper.online`)."""

from typing import Any

import tensorflow as tf

from stepper import online as online_lib
from stepper import streaming
from stepper.update_rules import rule

Nest = Any


class Online(rule.UpdateRule):
  """Online learning with an estimator of `stepper.online`, over a stream.

  A `Stream` drives it (`Trainer(online=method, stream=True)`). Each batch is
  one optimizer update whose gradient is the estimator's over the batch's
  steps, run from the carried state and influence (RTRL's `M`, SnAp-1's
  kept entries, UORO's rank-one pair), which it leaves to the next batch:
  nothing is cut at a batch boundary. Update `j`'s forward run uses the
  weights update `j - 1` set, while the carried influence keeps what
  earlier weights computed (the online learning of the papers). A reset
  row restarts from the initial state with a zero influence. The carry is
  checkpointed by the `Stream`, so a resumed run is the uninterrupted one
  bit for bit; UORO's random signs are seeded by the update counter.

  >>> rule = stepper.update_rules.Online(None, method="snap1")
  >>> rule.method, rule.k1, rule.overlap
  ('snap1', None, 0)
  """

  def __init__(self, context: rule.Context, *, method: str):
    super().__init__(context)
    self.method = online_lib.check_method(method, online_lib.METHODS[1:])
    self._estimator = None  # Set by `build`: the variables exist then.
    self._estimate = None  # `self._estimator.run`, compiled under XLA.
    self._input_spec = None
    # No autograph: converting the estimator's code costs ~10x its trace.
    self._update_function = tf.function(self._update_step,
                                        reduce_retracing=True,
                                        autograph=False)

  def build(self, element_spec: tuple) -> None:
    if self._estimator is None:
      context = self.context
      # The head (when the Trainer runs it after the loop) at every step:
      # the estimator needs each step's loss.
      self._estimator = online_lib.Estimator(
          context.model, context.loss, method=self.method,
          head=context.head, variables=context.trainable, training=True,
          max_influence=2 ** 62)
      # `jit_compile=True`: XLA compiles the estimator's whole loop over
      # the batch, as the other rules compile their gradient.
      self._estimate = tf.function(
          self._estimator.run, jit_compile=True, autograph=False) if (
              context.jit_compile) else self._estimator.run
    self._input_spec = element_spec[0]

  def train_batch(self, iterator) -> list[rule.Update]:
    raise ValueError("`online` needs `stream=True`: the influence is carried "
                     "from batch to batch.")

  def initial_carry(self, batch: int | tf.Tensor) -> Nest:
    """The initial state and a zero influence for `batch` rows."""
    states = self.context.model.initial_state(batch)
    return states, self._estimator.initial_influence(self._input_spec,
                                                     states)

  def run_batch(self, element: tuple, carry: Nest, offset: int,
                time: int) -> tuple[list[rule.Update], Nest]:
    del offset, time  # No history: one update per batch.
    loss, grad_norm, carry = self._update_function(element, carry)
    return [(loss, grad_norm)], carry

  def _update_step(self, element: tuple, carry: Nest) -> tuple:
    return self.run_update(self._replica_update, element, carry)

  def _replica_update(self, element: tuple, carry: Nest):
    ctx = tf.distribute.get_replica_context()
    inputs, targets = element[:2]
    self.context.targets_per_step(inputs, targets)  # Checks their shape.
    states, influence = carry
    # Resets restore the initial state, never the carried one.
    reset_to = self.context.model.initial_state(tf.shape(targets)[0])
    seed = tf.stack([self.context.global_step.read_value(),
                     tf.constant(0, tf.int64)])
    run = self._estimate(inputs, targets, states, list(influence),
                         seed=seed, resets=streaming.resets_of(element),
                         reset_to=reset_to)
    total = ctx.all_reduce(rule.SUM, run.count)
    grad_norm = self.apply([g / tf.cast(total, g.dtype)
                            for g in run.grad_sum], scaled=False)
    return run.loss_sum / total, grad_norm, (run.final_states, run.carry)
