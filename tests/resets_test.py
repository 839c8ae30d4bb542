"""Tests for `resets=`: episode boundaries inside a packed sequence.

Reference: each episode run on its own by a Keras built-in layer with fresh
initial states (Keras cannot reset inside a sequence).
"""

from absl.testing import parameterized
import keras
import numpy as np
import tensorflow as tf

import stepper
from stepper import testing

BATCH, TIME, FEATURES, UNITS = 2, 7, 3, 4
# Row 0 packs episodes [0, 3) and [3, 7); row 1 packs [0, 2), [2, 5), [5, 7).
_RESETS = np.zeros((BATCH, TIME), bool)
_RESETS[0, 3] = _RESETS[1, 2] = _RESETS[1, 5] = True
_EPISODES = {0: ((0, 3), (3, 7)), 1: ((0, 2), (2, 5), (5, 7))}


def _lstm():
  """A float64 Keras LSTM layer (the reference) and its cell (the step)."""
  keras.utils.set_random_seed(0)
  layer = keras.layers.LSTM(UNITS, return_sequences=True, return_state=True,
                            dtype="float64")
  layer.build((None, None, FEATURES))
  return layer, layer.cell


def _data():
  rng = np.random.default_rng(1)
  x = tf.constant(rng.normal(size=(BATCH, TIME, FEATURES)))
  s0 = [tf.constant(rng.normal(size=(BATCH, UNITS))) for _ in range(2)]
  return x, s0


def _episodes_separately(layer, x, s0):
  """Outputs `[batch, time, units]` and final states, one Keras run per
  episode, each from the row's initial states."""
  rows, finals = [], []
  for row, episodes in _EPISODES.items():
    row_s0 = [s[row:row + 1] for s in s0]
    outs = []
    for start, stop in episodes:
      y, h, c = layer(x[row:row + 1, start:stop], initial_state=row_s0)
      outs.append(y)
    rows.append(tf.concat(outs, axis=1))
    finals.append([h, c])
  return (tf.concat(rows, axis=0),
          [tf.concat([f[i] for f in finals], axis=0) for i in range(2)])


class ResetsTest(tf.test.TestCase, parameterized.TestCase):

  @parameterized.named_parameters(*testing.MODES)
  def test_resets_match_episodes_run_separately(self, mode):
    layer, cell = _lstm()
    x, s0 = _data()
    variables = [*s0, *cell.trainable_variables]

    def with_grads(run):
      with tf.GradientTape() as tape:
        tape.watch(s0)
        y, final = run()
        loss = tf.reduce_sum(tf.sin(y)) + tf.reduce_sum(final[0] ** 2)
      return y, final, tape.gradient(loss, variables)

    expected = with_grads(lambda: _episodes_separately(layer, x, s0))
    actual = testing.in_mode(lambda: with_grads(lambda: stepper.model_rnn(
        cell, x, s0, resets=tf.constant(_RESETS))), mode)()
    testing.assert_nests_close(actual, expected)

  @parameterized.named_parameters(("chunk_1", 1), ("chunk_2", 2),
                                  ("chunk_3_boundary_at_reset", 3),
                                  ("whole", TIME))
  def test_resets_through_run_chunks_match_episodes(self, chunk_size):
    layer, cell = _lstm()
    x, s0 = _data()
    expected = _episodes_separately(layer, x, s0)
    for gradient in ("through", "truncate"):
      actual = stepper.run_chunks(cell, x, chunk_size, s0, gradient=gradient,
                                  resets=tf.constant(_RESETS))
      testing.assert_nests_close(actual, expected)

  def test_no_gradient_crosses_a_reset(self):
    _, cell = _lstm()
    x, s0 = _data()
    with tf.GradientTape(persistent=True) as tape:
      tape.watch(x)
      y, _ = stepper.model_rnn(cell, x, s0, resets=tf.constant(_RESETS))
      after_reset = tf.reduce_sum(y[0, 3:])
    grad = tape.gradient(after_reset, x)
    self.assertAllEqual(grad[0, :3], tf.zeros([3, FEATURES], tf.float64))
    self.assertAllEqual(grad[1], tf.zeros([TIME, FEATURES], tf.float64))
    self.assertNotAllClose(grad[0, 3:], tf.zeros([4, FEATURES], tf.float64))
    # Without the reset the same output does depend on the earlier steps.
    with tf.GradientTape() as tape:
      tape.watch(x)
      y, _ = stepper.model_rnn(cell, x, s0)
      no_reset = tf.reduce_sum(y[0, 3:])
    self.assertNotAllClose(tape.gradient(no_reset, x)[0, :3],
                           tf.zeros([3, FEATURES], tf.float64))

  def test_reset_at_first_step_changes_nothing(self):
    _, cell = _lstm()
    x, s0 = _data()
    resets = tf.constant([[True] + [False] * (TIME - 1)] * BATCH)
    testing.assert_nests_close(
        stepper.model_rnn(cell, x, s0, resets=resets),
        stepper.model_rnn(cell, x, s0))

  @parameterized.named_parameters(*testing.MODES[:2])
  def test_model_rnn_raises_on_resets_of_wrong_dtype(self, mode):
    _, cell = _lstm()
    x, _ = _data()
    resets = tf.constant(_RESETS.astype(np.int32))
    with self.assertRaisesRegex(TypeError, r"`resets` must be a bool tensor "
                                r"\[batch, time\]; got dtype int32"):
      testing.in_mode(lambda: stepper.model_rnn(cell, x, resets=resets),
                      mode)()

  @parameterized.named_parameters(
      ("eager_time", "eager", (BATCH, TIME - 1), r"has shape \(2, 6\)"),
      ("function_time", "function", (BATCH, TIME + 1), r"has shape \(2, 8\)"),
      ("eager_batch", "eager", (BATCH + 1, TIME), r"has shape \(3, 7\)"),
      ("eager_rank", "eager", (BATCH,), r"must have rank 2"))
  def test_model_rnn_raises_on_resets_of_wrong_shape(self, mode, shape,
                                                     message):
    _, cell = _lstm()
    x, _ = _data()
    resets = tf.zeros(shape, tf.bool)
    with self.assertRaisesRegex(ValueError, r"`resets` " + message):
      testing.in_mode(lambda: stepper.model_rnn(cell, x, resets=resets),
                      mode)()

  def test_run_chunks_and_runner_raise_on_resets_of_wrong_shape(self):
    _, cell = _lstm()
    x, _ = _data()
    resets = tf.zeros((BATCH, TIME - 1), tf.bool)
    with self.assertRaisesRegex(ValueError, r"`resets` has shape \(2, 6\)"):
      stepper.run_chunks(cell, x, 2, resets=resets)
    runner = stepper.StatefulRunner(cell, BATCH)
    with self.assertRaisesRegex(ValueError, r"`resets` has shape \(2, 6\)"):
      runner(x, resets=resets)


if __name__ == "__main__":
  tf.test.main()
