"""Keras dropout cells (`dropout`, `recurrent_dropout`) with `training=True`.

Reference: `keras.layers.RNN` over the same cell objects, started from the
same `SeedGenerator` states: stepper draws the masks as Keras does (once per
run, before the loop, from the cell's own generator), so outputs, gradients
and the generators' states afterwards are those of Keras.
"""

from absl.testing import parameterized
import keras
import numpy as np
import tensorflow as tf

import stepper
from stepper import testing

BATCH, TIME, FEATURES = 3, 5, 4


def _x(seed=0):
  return tf.constant(np.random.default_rng(seed).standard_normal(
      (BATCH, TIME, FEATURES)), tf.float32)


def _cells(cell):
  return list(cell.cells) if hasattr(cell, "cells") else [cell]


def _gru():
  return keras.layers.GRUCell(3, dropout=0.5, recurrent_dropout=0.3)


def _lstm():
  return keras.layers.LSTMCell(3, dropout=0.4, recurrent_dropout=0.5)


def _stacked():
  return keras.layers.StackedRNNCells([
      _gru(), keras.layers.SimpleRNNCell(2, dropout=0.3,
                                         recurrent_dropout=0.6)])


def _input_dropout_cell(kind):
  cell = {"gru": lambda: keras.layers.GRUCell(3, dropout=0.5),
          "lstm": lambda: keras.layers.LSTMCell(3, dropout=0.4),
          "simple_rnn": lambda: keras.layers.SimpleRNNCell(3, dropout=0.3)
          }[kind]()
  cell.build((None, FEATURES))
  return cell


class _SameSeeds:
  """Runs functions from the same `SeedGenerator` states of `cells`."""

  def __init__(self, cells):
    self._cells = cells
    self._states = [c.seed_generator.state.numpy() for c in cells]

  def run(self, fn, *args):
    for cell, state in zip(self._cells, self._states):
      cell.seed_generator.state.assign(state)
    result = fn(*args)
    return result, [c.seed_generator.state.numpy() for c in self._cells]


def _loss_and_grads(run, variables):
  """`x -> (outputs, grads of sum(outputs ** 2) w.r.t. [x, *variables])`."""
  def fn(x):
    with tf.GradientTape() as tape:
      tape.watch(x)
      outputs = run(x)
      loss = tf.reduce_sum(tf.square(outputs))
    return outputs, tape.gradient(loss, [x] + variables)
  return fn


class DropoutCellTest(tf.test.TestCase, parameterized.TestCase):

  def assert_same_as_keras(self, step, cell, mode, hoisted=False, **kwargs):
    x = _x()
    layer = keras.layers.RNN(cell, return_sequences=True)
    layer(x)  # Builds the cell.
    seeds = _SameSeeds(_cells(cell))
    variables = cell.trainable_variables
    (expected, expected_grads), expected_seeds = seeds.run(testing.in_mode(
        _loss_and_grads(lambda x: layer(x, training=True), variables), mode),
                                                           x)
    (outputs, grads), seeds_after = seeds.run(testing.in_mode(
        _loss_and_grads(lambda x: stepper.model_rnn(
            step, x, training=True, hoist=hoisted, **kwargs)[0], variables),
        mode), x)
    if hoisted:
      # The input half for all steps in one matmul: float32 sums grouped
      # otherwise than Keras' per-step ones, hence a normwise bound (see
      # `assert_nests_close`): an elementwise 1e-5 with a 1e-6 floor failed
      # under XLA on another CPU (1.34e-6 > 1.31e-6). Not float64: Keras
      # draws float32 dropout masks for a float64 cell (its Mul fails).
      testing.assert_nests_close([outputs, grads],
                                 [expected, expected_grads], rtol=1e-5,
                                 normwise=True)
    else:
      # Same ops on the same masks: bitwise equal forward; the gradients
      # too without remat (remat sums a segment's gradients in another
      # order).
      self.assertAllEqual(outputs, expected)
      testing.assert_nests_close(grads, expected_grads,
                                 rtol=1e-6 if kwargs else 0, atol=1e-7)
    self.assertAllEqual(seeds_after, expected_seeds)
    # Dropout is on: the run differs from the one without it.
    self.assertNotAllClose(outputs, stepper.model_rnn(step, x)[0])

  @parameterized.named_parameters(
      ("gru_eager", _gru, "eager"), ("lstm_eager", _lstm, "eager"),
      ("stacked_rnn_cells_eager", _stacked, "eager"))
  def test_cell_matches_keras_rnn(self, make_cell, mode):
    cell = make_cell()
    self.assert_same_as_keras(cell, cell, mode)

  @parameterized.named_parameters(
      ("gru_eager", "gru", "eager", {}),
      ("lstm_function_unroll", "lstm", "function", dict(unroll=2)),
      ("simple_rnn_xla", "simple_rnn", "xla", {}),
      ("lstm_remat", "lstm", "eager", dict(remat=2)))
  def test_input_dropout_is_hoisted_like_keras_rnn(self, kind, mode, kwargs):
    # Input dropout only: the input half draws the run's mask from the
    # cell's generator (as Keras does before its loop) and applies it to
    # every step before the one [time * batch] matmul.
    cell = _input_dropout_cell(kind)
    self.assertTrue(stepper.steps.as_step(cell).split(True).draws)
    self.assert_same_as_keras(cell, cell, mode, hoisted=True, **kwargs)

  def test_hoisted_input_dropout_with_reverse_and_mask(self):
    cell = _input_dropout_cell("gru")
    x = _x()
    mask = tf.constant(np.random.default_rng(3).random((BATCH, TIME)) > 0.3)
    seeds = _SameSeeds([cell])
    runs = [seeds.run(_loss_and_grads(lambda x, hoist=hoist: stepper.model_rnn(
        cell, x, training=True, reverse=True, mask=mask, hoist=hoist)[0],
                                      cell.trainable_variables), x)
            for hoist in (True, False)]
    (hoisted, seeds_hoisted), (per_step, seeds_per_step) = runs
    testing.assert_nests_close(hoisted, per_step, rtol=1e-5, normwise=True)
    self.assertAllEqual(seeds_hoisted, seeds_per_step)

  def test_what_does_not_split_with_dropout(self):
    as_step = stepper.steps.as_step
    both = keras.layers.GRUCell(3, dropout=0.5, recurrent_dropout=0.2)
    simple = keras.layers.SimpleRNNCell(3, dropout=0.5)
    per_gate = keras.layers.LSTMCell(3, dropout=0.5, implementation=1)
    for cell in (both, simple, per_gate):
      cell.build((None, FEATURES))
    self.assertIsNone(as_step(both).split(True))  # Recurrent dropout.
    self.assertIsNotNone(as_step(both).split(False))  # Keras applies none.
    self.assertIsNone(as_step(simple).split(False))  # Draws even then.
    self.assertIsNone(as_step(per_gate).split(True))  # A mask row per gate.
    self.assertIsNone(as_step(both).split(tf.constant(True)))

  def test_remat_replays_the_masks_of_keras_rnn(self):
    cell = _stacked()
    self.assert_same_as_keras(cell, cell, "eager", remat=2)

  def test_stack_matches_keras_stacked_rnn_cells(self):
    bottom, top = _gru(), _lstm()
    self.assert_same_as_keras(stepper.stack([bottom, top]),
                              keras.layers.StackedRNNCells([bottom, top]),
                              "eager")

  def test_step_model_masks_are_keras_masks_fixed_within_a_run(self):
    # A functional step model around a GRUCell draws the masks keras.layers.
    # RNN(cell) draws (same shapes, same generator), so its runs equal
    # Keras' exactly: one mask for every step of a run, a fresh one per run.
    cell = _gru()
    x_t, h = keras.Input((FEATURES,)), keras.Input((3,))
    y, new_h = cell(x_t, [h])
    model = keras.Model([x_t, h], [y, new_h[0]])
    self.assert_same_as_keras(model, cell, "eager")

  @parameterized.named_parameters(*testing.MODES[1:])
  def test_runs_in_a_row_draw_fresh_masks(self, mode):
    cell = _gru()
    run = testing.in_mode(
        lambda x: stepper.model_rnn(cell, x, training=True)[0], mode)
    x = _x()
    first, second, third = run(x), run(x), run(x)
    self.assertNotAllClose(first, second)
    self.assertNotAllClose(second, third)
    # Nothing stays cached on the cell: Keras' own layer still works after.
    keras.layers.RNN(cell)(x, training=True)

  def test_training_false_uses_no_mask(self):
    cell = _lstm()
    x = _x()
    expected = keras.layers.RNN(cell, return_sequences=True)(x)
    self.assertAllClose(stepper.model_rnn(cell, x, training=False)[0],
                        expected, rtol=1e-6, atol=1e-7)

  def test_run_chunks(self):
    cell = _gru()
    x = _x()

    def run(x):
      with tf.GradientTape() as tape:
        outputs, _ = stepper.run_chunks(cell, x, 2, training=True)
        loss = tf.reduce_sum(outputs)
      return outputs, tape.gradient(loss, cell.trainable_variables)

    outputs, grads = run(x)
    self.assertEqual(outputs.shape, (BATCH, TIME, 3))
    self.assertNotAllClose(outputs, run(x)[0])
    self.assertTrue(all(np.all(np.isfinite(g)) for g in grads))


if __name__ == "__main__":
  tf.test.main()
