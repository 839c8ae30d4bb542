"""`Stream`: a rule whose batches continue each other (`stream=True`)."""

from typing import Any

import tensorflow as tf

from stepper import streaming
from stepper.update_rules import rule

Nest = Any


class Stream(rule.UpdateRule):
  """Drives another rule over a stream: row `b` of every batch continues
  row `b` of the last (`stepper.streaming` states the semantics).

  The carried values (the inner rule's `initial_carry`, then what its
  `run_batch` returns) and the `overlap` steps of history cross batches in
  a `streaming.StreamState`, which checkpoints them.

  >>> inner = stepper.update_rules.TBPTT(None, k1=4, k2=6)
  >>> rule = stepper.update_rules.Stream(inner)
  >>> rule.carries, rule.k1, rule.overlap
  (True, 4, 2)
  """

  carries = True

  def __init__(self, inner: rule.UpdateRule):
    super().__init__(inner.context)
    self.inner = inner
    self.k1, self.overlap = inner.k1, inner.overlap
    self._stream = None  # Set by `build`: the context exists then.
    self._start = tf.function(self._replica_start, reduce_retracing=True)

  def _replica_start(self, targets: tf.Tensor) -> Nest:
    return self.context.strategy.run(
        lambda t: self.inner.initial_carry(tf.shape(t)[0]), (targets,))

  def build(self, element_spec: tuple) -> None:
    self.inner.build(element_spec)
    if self._stream is None:
      self._stream = streaming.StreamState(
          self.context.strategy, k1=self.k1, overlap=self.overlap)
      self._stream.build(self.inner.initial_carry(1), element_spec)

  def check_spec(self, spec: tuple, name: str) -> None:
    streaming.check_stream_spec(spec, self.k1, name)

  def train_batch(self, iterator) -> list[rule.Update]:
    element, carry, offset, time = self._stream.begin(next(iterator))
    if carry is None:  # Each replica's initial carry for its rows.
      carry = self._start(element[1])
    updates, carry = self.inner.run_batch(element, carry, offset, time)
    self._stream.end(element, carry, time)
    return updates

  def reset(self) -> None:
    if self._stream is not None:
      self._stream.reset()

  def checkpoint_parts(self) -> dict:
    return {} if self._stream is None else self._stream.checkpoint_parts()

  def save(self) -> None:
    self._stream.save()

  def restore(self) -> None:
    self._stream.restore()
