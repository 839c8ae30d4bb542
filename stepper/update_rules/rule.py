"""What every update rule gets (`Context`) and shares (`UpdateRule`).

A rule turns the next batch of a dataset into optimizer updates. The
`Trainer` builds one `Context` (the model, loss, optimizer, strategy and
options) and one rule; the rule's base class holds the arithmetic every rule
shares: running a per-replica update under the strategy (`run_update`),
clipping and applying a replica's share of the gradient (`apply`), and the
summed loss of a run (`loss_sum`).
"""

import collections
import dataclasses
from typing import Any, Callable

import keras
import tensorflow as tf

from stepper import _loop
from stepper import engine
from stepper import steps as steps_lib
from stepper import streaming

Nest = Any
Update = tuple[tf.Tensor, tf.Tensor]  # (loss, grad_norm) of one update.

SUM = tf.distribute.ReduceOp.SUM


@dataclasses.dataclass
class Context:
  """What an update rule gets from the `Trainer`.

  Attributes:
    model: The step the engine runs (with the head inside when the head
      mixes time steps; see `head`).
    head: A per-step head applied to the loop's whole output sequence after
      the loop, or None.
    loss: `loss(y_true, y_pred) -> per-example loss` (`_targets`).
    optimizer: The Keras optimizer (maybe a `LossScaleOptimizer`).
    strategy: The `tf.distribute.Strategy` whose replicas run the updates.
    clip: The global-norm clip, or None.
    jit_compile: Compile the loss-and-gradient computation with XLA.
    hoist: Passed to `model_rnn` (the step's input half before the loop).
    global_step: The trainer's update counter (a variable).
    traces: Counts traces per compiled function (`Trainer.trace_counts`).
    trainable: The variables the updates differentiate (set once built).
    targets_per_step: `(inputs, targets) -> bool`, whether the targets are
      per step (raises a ValueError when they fit neither layout).
  """
  model: steps_lib.Step
  head: Any
  loss: Callable
  optimizer: keras.optimizers.Optimizer
  strategy: tf.distribute.Strategy
  clip: float | None
  jit_compile: bool
  hoist: bool
  global_step: tf.Variable
  traces: collections.Counter
  targets_per_step: Callable
  trainable: list | None = None


class UpdateRule:
  """The interface of an update rule, and what every rule shares.

  A rule gets a `Context`; the `Trainer` calls `build` once the variables
  exist, then `train_batch` for every batch. A rule that carries something
  across batches (`carries`) holds it between calls, drops it on `reset`,
  and exposes it to checkpoints (`checkpoint_parts`, `save`, `restore`).

  A rule that a `Stream` can drive also implements `run_batch` (one batch
  from given carried values) and `initial_carry`, and sets `k1` (the update
  grid in steps, None: one update per batch) and `overlap` (the steps before
  a batch that its first updates run through again).

  >>> rule = stepper.update_rules.UpdateRule(None)
  >>> rule.carries, rule.k1, rule.overlap
  (False, None, 0)
  """

  carries = False  # Whether state crosses batches (`evaluate` follows).
  allow_sequence_level = False  # Whether `[batch, ...]` targets may be used.
  static_time = False  # Whether batches need a static number of steps.
  k1 = None
  overlap = 0

  def __init__(self, context: Context):
    self.context = context

  # The interface.

  def build(self, element_spec: tuple) -> None:
    """Called once the variables exist, before the first batch."""

  def check_spec(self, spec: tuple, name: str) -> None:
    """Static checks of a training dataset's `element_spec`; raises a
    ValueError naming `name`."""

  def train_batch(self, iterator) -> list[Update]:
    """Trains on the next element of `iterator` (a distributed iterator).

    Returns:
      `(loss, grad_norm)` of each update made, in order: `loss` the mean
      loss of the update's steps and rows, `grad_norm` the global norm of
      its gradient before clipping.

    Raises:
      StopIteration, tf.errors.OutOfRangeError: If `iterator` is exhausted.
    """
    raise NotImplementedError

  def initial_carry(self, batch: int | tf.Tensor) -> Nest:
    """What a stream carries at its start, for `batch` rows (one replica)."""
    return self.context.model.initial_state(batch)

  def run_batch(self, element: tuple, carry: Nest, offset: int,
                time: int) -> tuple[list[Update], Nest]:
    """The updates of one (distributed) batch from the carried values.

    Args:
      element: The batch, with `offset` steps of history in front.
      carry: Per replica, what `initial_carry` or the last call returned.
      offset: Steps in front of the batch's own `time` steps.
      time: The batch's own number of steps.

    Returns:
      `(updates, carry)`: each update's `(loss, grad_norm)` and what the
      next batch continues from.
    """
    raise NotImplementedError

  def reset(self) -> None:
    """Drops what is carried across batches (nothing by default)."""

  def checkpoint_parts(self) -> dict:
    """Trackables a checkpoint holds for this rule (none by default)."""
    return {}

  def save(self) -> None:
    """Copies carried tensors into `checkpoint_parts` before a save."""

  def restore(self) -> None:
    """Sets carried tensors from `checkpoint_parts` after a restore."""

  # Shared by the rules.

  def run_update(self, replica_update: Callable, *args) -> tuple:
    """One optimizer update: `replica_update(*args)` on every replica.

    Returns:
      `(loss, grad_norm, *rest)`: the loss summed over replicas (each
      returns its share of the mean), the gradient norm, and what else
      `replica_update` returns, per replica.
    """
    context = self.context
    context.traces["train"] += 1  # Runs only while tracing.
    loss, grad_norm, *rest = context.strategy.run(replica_update, args)
    # After the update: no count for a call that found the data exhausted.
    with tf.control_dependencies(tf.nest.flatten(loss)):
      context.global_step.assign_add(1)
    return (context.strategy.reduce(SUM, loss, axis=None),
            context.strategy.reduce(tf.distribute.ReduceOp.MEAN, grad_norm,
                                    axis=None), *rest)

  def apply(self, grads: list, scaled: bool = True) -> tf.Tensor:
    """Clips and applies this replica's share of the gradient.

    Each replica's gradient is its share of the global mean's gradient; the
    optimizer sums the shares over replicas. `scaled`: the gradient is that
    of the loss scaled by `optimizer.scale_loss` (a LossScaleOptimizer's
    `apply` divides by its scale; other optimizers' scale is 1). Returns the
    global norm of the unscaled gradient before clipping.
    """
    context = self.context
    ctx = tf.distribute.get_replica_context()
    scale = tf.convert_to_tensor(context.optimizer.scale_loss(1.0))
    if not scaled:
      grads = [None if g is None else g * tf.cast(scale, g.dtype)
               for g in grads]
    grad_norm = _global_norm(grads, ctx)
    grad_norm /= tf.cast(scale, grad_norm.dtype)
    if context.clip is not None:
      factor = context.clip / tf.maximum(grad_norm, context.clip)
      grads = [None if g is None else g * factor for g in grads]
    # Every op of the update, the optimizer's `iterations` increment among
    # them, waits for the gradients: a call that finds the data exhausted
    # fails before it can count an update it never applied.
    with tf.control_dependencies([g for g in grads if g is not None]):
      context.optimizer.apply(grads, context.trainable)
    return grad_norm

  def loss_sum(self, element: tuple, states: Nest | None, training: bool
               ) -> tuple[tf.Tensor, tf.Tensor, Nest]:
    """The summed per-example loss over steps and batch, its count and the
    final states; the run starts from `states` (a constant) or the initial
    state, and resets set the initial state."""
    context = self.context
    inputs, targets, resets = *element[:2], streaming.resets_of(element)
    per_step = context.targets_per_step(inputs, targets)
    # Resets restore the initial state, never the carried `states`.
    reset_to = None if states is None else context.model.initial_state(
        tf.shape(targets)[0])
    outputs, final_states = engine.model_rnn(
        context.model, inputs, states, training=training, resets=resets,
        return_sequences=per_step, hoist=context.hoist, _reset_to=reset_to)
    if per_step:  # Every step is an example for the loss: fold time.
      outputs = _loop.merge_leading_dims(outputs)
      targets = _loop.merge_leading_dims(targets)
    outputs = self.apply_head(outputs, training)
    return (*self.summed_loss(targets, outputs), final_states)

  def apply_head(self, outputs: tf.Tensor, training: bool) -> tf.Tensor:
    """The context's after-the-loop head on `outputs` `[rows, units]` (all
    steps' rows merged: one matmul for a `Dense`), if there is one."""
    head = self.context.head
    return outputs if head is None else head(outputs, training=training)

  def summed_loss(self, targets: tf.Tensor, outputs: tf.Tensor,
                  weights: tf.Tensor | None = None
                  ) -> tuple[tf.Tensor, tf.Tensor]:
    """The per-example loss of `outputs` `[rows, ...]` against `targets`,
    summed, and its count; rows where the bool `weights` `[rows]` is False
    count for nothing."""
    # Mixed precision: the loss in float32, as Keras computes its losses.
    dtype = tf.float32 if outputs.dtype.size < 4 else outputs.dtype
    outputs = tf.cast(outputs, dtype)
    per_example = tf.convert_to_tensor(self.context.loss(targets, outputs))
    per_example = tf.cast(per_example, dtype)
    if weights is None:
      return tf.reduce_sum(per_example), tf.cast(tf.size(per_example), dtype)
    # `where`, not a product: no NaN of an unused row reaches the gradient.
    keep = tf.broadcast_to(tf.reshape(
        weights, [-1] + [1] * (per_example.shape.rank - 1)),
                           tf.shape(per_example))
    return (tf.reduce_sum(tf.where(keep, per_example, 0)),
            tf.reduce_sum(tf.cast(keep, dtype)))


def _global_norm(grads: list, ctx: tf.distribute.ReplicaContext) -> tf.Tensor:
  """The norm of the gradient summed over replicas."""
  grads = [g for g in grads if g is not None]
  if ctx.num_replicas_in_sync > 1:
    grads = ctx.all_reduce(SUM, grads)
  return tf.linalg.global_norm(grads)
