"""Tests for `stepper.run_chunks` and `stepper.StatefulRunner`.

References: a Keras built-in layer run over the full sequence (independent
of the engine), per-chunk Keras runs from stop-gradient states, Keras'
own `stateful=True` layer (seed 003, case 1), and, for the masking arguments
whose contract is "same as one full run", `stepper.model_rnn` itself.
"""

import os

from absl.testing import parameterized
import keras
import numpy as np
import tensorflow as tf

import stepper
from stepper import testing

BATCH, TIME, FEATURES, UNITS = 3, 7, 3, 4
_MODES = testing.MODES  # eager, tf.function, XLA
_CHUNK_SIZES = (("size_1", 1), ("size_2_uneven", 2), ("size_3_uneven", 3),
                ("size_7_whole", 7), ("size_10_longer", 10))


def _gru(seed=0):
  """A float64 Keras GRU layer (the reference) and its cell (the step)."""
  keras.utils.set_random_seed(seed)
  layer = keras.layers.GRU(UNITS, return_sequences=True, return_state=True,
                           dtype="float64")
  layer.build((BATCH, None, FEATURES))
  return layer, layer.cell


def _data(seed=1, time=TIME):
  rng = np.random.default_rng(seed)
  x = tf.constant(rng.normal(size=(BATCH, time, FEATURES)))
  s0 = tf.constant(rng.normal(size=(BATCH, UNITS)))
  return x, s0


def _with_grads(fn, x, s0, variables):
  """`fn(x, s0) -> (y, final)` plus the gradients of a loss on both.

  Returns `(y, [final], grads)`: Keras layers return a GRU's state bare.
  """
  with tf.GradientTape() as tape:
    tape.watch([x, s0])
    y, final = fn(x, s0)
    final = tf.nest.flatten(final)
    loss = tf.reduce_sum(tf.sin(y)) + tf.reduce_sum(final[0] ** 2)
  return y, final, tape.gradient(loss, [x, s0] + variables)


class RunChunksThroughTest(tf.test.TestCase, parameterized.TestCase):

  @parameterized.named_parameters(
      (f"{m}_{c}", mode, size) for m, mode in _MODES for c, size in _CHUNK_SIZES)
  def test_through_matches_keras_full_run(self, mode, chunk_size):
    layer, cell = _gru()
    x, s0 = _data()
    variables = cell.trainable_variables
    expected = _with_grads(
        lambda x, s0: tuple(layer(x, initial_state=[s0])), x, s0, variables)
    actual = testing.in_mode(lambda: _with_grads(
        lambda x, s0: stepper.run_chunks(cell, x, chunk_size, [s0]),
        x, s0, variables), mode)()
    testing.assert_nests_close(actual, expected)

  def test_through_matches_keras_full_run_with_stacked_steps(self):
    keras.utils.set_random_seed(2)
    cells = [keras.layers.GRUCell(UNITS, dtype="float64"),
             keras.layers.SimpleRNNCell(UNITS, dtype="float64")]
    reference = keras.Sequential([
        keras.layers.RNN(cells[0], return_sequences=True, dtype="float64"),
        keras.layers.RNN(cells[1], return_sequences=True, dtype="float64")])
    x, _ = _data()
    reference(x)  # Builds the cells, shared with the stacked step.
    deep = stepper.stack(cells)
    variables = reference.trainable_variables

    def grads_of(run):
      with tf.GradientTape() as tape:
        tape.watch(x)
        y = run()
        loss = tf.reduce_sum(tf.sin(y))
      return y, tape.gradient(loss, [x] + variables)

    expected = grads_of(lambda: reference(x))
    actual = tf.function(lambda: grads_of(
        lambda: stepper.run_chunks(deep, x, 3)[0]))()
    testing.assert_nests_close(actual, expected)

  @parameterized.named_parameters(
      ("carry_forward", False, 2, "function"),
      ("carry_forward_chunk_3", False, 3, "function"),
      ("carry_forward_xla", False, 3, "xla"),
      ("zero_output", True, 3, "function"))
  def test_through_with_mask_matches_full_run(self, zero_output, chunk_size,
                                              mode):
    _, cell = _gru()
    x, s0 = _data()
    # Row 0 starts masked (zeros before its first valid step), row 1 has a
    # whole masked chunk (the carried output crosses two boundaries).
    mask = tf.constant([[False, False, True, True, False, True, False],
                        [True, False, False, False, False, False, True],
                        [True, True, True, True, True, True, True]])
    variables = cell.trainable_variables
    expected = _with_grads(lambda x, s0: stepper.model_rnn(
        cell, x, [s0], mask=mask, zero_output_for_mask=zero_output),
                           x, s0, variables)
    actual = testing.in_mode(lambda: _with_grads(
        lambda x, s0: stepper.run_chunks(
            cell, x, chunk_size, [s0], mask=mask,
            zero_output_for_mask=zero_output), x, s0, variables), mode)()
    testing.assert_nests_close(actual, expected)
    # The carried output reaches across the chunk boundary: row 1, step 5
    # repeats step 0.
    self.assertAllEqual(actual[0][1, 5], actual[0][1, 0] if not zero_output
                        else tf.zeros([UNITS], tf.float64))

  @parameterized.named_parameters(*_MODES)
  def test_through_with_sequence_length_matches_full_run(self, mode):
    _, cell = _gru()
    x, s0 = _data()
    lengths = tf.constant([0, 4, 7])
    variables = cell.trainable_variables
    expected = _with_grads(lambda x, s0: stepper.model_rnn(
        cell, x, [s0], sequence_length=lengths), x, s0, variables)
    actual = testing.in_mode(lambda: _with_grads(
        lambda x, s0: stepper.run_chunks(cell, x, 3, [s0],
                                         sequence_length=lengths),
        x, s0, variables), mode)()
    testing.assert_nests_close(actual, expected)

  def test_truncate_with_sequence_length_under_xla(self):
    _, cell = _gru()
    x, s0 = _data()
    lengths = tf.constant([0, 4, 7])
    run = lambda: _with_grads(
        lambda x, s0: stepper.run_chunks(cell, x, 3, [s0], gradient="truncate",
                                         sequence_length=lengths),
        x, s0, cell.trainable_variables)
    testing.assert_nests_close(testing.in_mode(run, testing.XLA)(),
                               testing.in_mode(run, testing.FUNCTION)())

  def test_time_major_matches_batch_major(self):
    _, cell = _gru()
    x, s0 = _data()
    y, final = stepper.run_chunks(cell, tf.transpose(x, [1, 0, 2]), 3, [s0],
                                  time_major=True)
    y_ref, final_ref = stepper.run_chunks(cell, x, 3, [s0])
    testing.assert_nests_close((tf.transpose(y, [1, 0, 2]), final),
                               (y_ref, final_ref))

  def test_dynamic_time_does_not_retrace_per_number_of_chunks(self):
    layer, cell = _gru()
    traces = []

    @tf.function(input_signature=[
        tf.TensorSpec([None, None, FEATURES], tf.float64)])
    def run(x):
      traces.append(1)
      return stepper.run_chunks(cell, x, 3)[0]

    for time in (0, 2, 3, 7, 11):
      x, _ = _data(time=time)
      expected = layer(x)[0] if time else tf.zeros([BATCH, 0, UNITS],
                                                    tf.float64)
      testing.assert_nests_close(run(x), expected)
    self.assertLen(traces, 1)


class RunChunksTruncateTest(tf.test.TestCase, parameterized.TestCase):

  @parameterized.named_parameters(
      (f"{m}_{c}", mode, size) for m, mode in _MODES
      for c, size in _CHUNK_SIZES[:4])
  def test_truncate_matches_separate_tapes_per_chunk(self, mode, chunk_size):
    layer, cell = _gru()
    x, s0 = _data()
    targets = tf.constant(np.random.default_rng(3).normal(
        size=(BATCH, TIME, UNITS)))
    variables = [s0] + cell.trainable_variables

    def total_loss(y, t):  # Sums over chunks: the reference splits it.
      return tf.reduce_sum((y - t) ** 2) / (BATCH * TIME)

    # Reference: one Keras run and one tape per chunk, the state entering
    # chunks 1, 2, ... cut by hand.
    expected_grads = [tf.zeros_like(v) for v in variables]
    state = s0
    for start in range(0, TIME, chunk_size):
      stop = min(start + chunk_size, TIME)
      with tf.GradientTape() as tape:
        tape.watch(s0)
        y, state = layer(x[:, start:stop], initial_state=[state])
        loss = total_loss(y, targets[:, start:stop])
      expected_grads = [e if g is None else g + e for g, e in zip(
          tape.gradient(loss, variables), expected_grads)]
      state = tf.stop_gradient(state)

    def run():
      with tf.GradientTape() as tape:
        tape.watch(s0)
        y, _ = stepper.run_chunks(cell, x, chunk_size, [s0],
                                  gradient="truncate")
        loss = total_loss(y, targets)
      return tape.gradient(loss, variables)

    actual_grads = testing.in_mode(run, mode)()
    testing.assert_nests_close(actual_grads, expected_grads)
    if chunk_size < TIME:  # The cut changes the gradient: the test can fail.
      full = testing.in_mode(lambda: _with_grads(
          lambda x, s0: stepper.run_chunks(cell, x, chunk_size, [s0]),
          x, s0, cell.trainable_variables), mode)()
      self.assertNotAllClose(full[2][2], actual_grads[1])

  def test_truncate_keeps_forward_values(self):
    layer, cell = _gru()
    x, s0 = _data()
    y, (final,) = stepper.run_chunks(cell, x, 2, [s0], gradient="truncate")
    testing.assert_nests_close((y, final), tuple(layer(x, initial_state=[s0])))

  def test_stateful_keras_case_1_matches_truncate_not_through(self):
    """Seed 003, case 1: Keras `stateful=True` over two halves in one tape.

    Its outputs and loss equal the full run, its gradients do not: the state
    variable cuts them at the boundary. `run_chunks` reproduces both.
    """
    keras.utils.set_random_seed(3)
    x = tf.constant(np.random.default_rng(1).normal(size=(2, 3, 4)))
    x_2 = y_2 = tf.concat([x, x], axis=1)  # (2, 6, 4)
    stateful = keras.layers.SimpleRNN(4, return_sequences=True,
                                      stateful=True, dtype="float64")
    stateful.build((2, 3, 4))
    cell = stateful.cell
    mse = lambda y: tf.reduce_mean((y_2 - y) ** 2)

    with tf.GradientTape() as tape:
      outs = tf.concat([stateful(x), stateful(x)], axis=1)
      loss_stateful = mse(outs)
    grads_stateful = tape.gradient(loss_stateful, cell.trainable_variables)

    def chunked(gradient):
      with tf.GradientTape() as tape:
        y, _ = stepper.run_chunks(cell, x_2, 3, gradient=gradient)
        loss = mse(y)
      return y, loss, tape.gradient(loss, cell.trainable_variables)

    full = keras.layers.SimpleRNN(4, return_sequences=True, dtype="float64")
    full.build((2, 6, 4))
    full.set_weights(stateful.get_weights())
    with tf.GradientTape() as tape:
      outs_full = full(x_2)
      loss_full = mse(outs_full)
    grads_full = tape.gradient(loss_full, full.trainable_variables)

    testing.assert_nests_close(outs, outs_full)  # Same forward...
    self.assertNotAllClose(grads_stateful[0], grads_full[0])  # ...cut grads.
    testing.assert_nests_close(chunked("truncate"),
                               (outs, loss_stateful, grads_stateful))
    testing.assert_nests_close(chunked("through"),
                               (outs_full, loss_full, grads_full))


class RunChunksErrorsTest(tf.test.TestCase, parameterized.TestCase):

  @parameterized.named_parameters(
      ("zero", 0), ("negative", -2), ("float", 1.5), ("bool", True))
  def test_run_chunks_raises_on_bad_chunk_size(self, chunk_size):
    _, cell = _gru()
    x, _ = _data()
    for mode in ("eager", "function"):
      with self.assertRaisesRegex(ValueError,
                                  r"`chunk_size` must be a positive integer"):
        testing.in_mode(lambda: stepper.run_chunks(cell, x, chunk_size),
                        mode)()

  def test_run_chunks_raises_on_unknown_gradient(self):
    _, cell = _gru()
    x, _ = _data()
    with self.assertRaisesRegex(ValueError, r"`gradient` must be one of.*"
                                r"'through'.*'truncate'.*got 'cut'"):
      stepper.run_chunks(cell, x, 2, gradient="cut")

  @parameterized.named_parameters(*_MODES)
  def test_run_chunks_raises_on_mismatched_state_shape(self, mode):
    _, cell = _gru()
    x, _ = _data()
    bad = tf.zeros([BATCH, UNITS + 1], tf.float64)
    with self.assertRaisesRegex(
        ValueError, r"initial_states\[0\] has shape \(3, 5\) but the step's "
        r"state input 0 expects \(None, 4\)"):
      testing.in_mode(lambda: stepper.run_chunks(cell, x, 2, [bad]), mode)()

  def test_run_chunks_raises_on_mask_of_wrong_shape(self):
    _, cell = _gru()
    x, _ = _data()
    with self.assertRaisesRegex(ValueError, r"`mask` has shape \(3, 6\)"):
      stepper.run_chunks(cell, x, 2, mask=tf.ones([BATCH, TIME - 1], tf.bool))


def _stream(seed=4, time=9):
  x, _ = _data(seed=seed, time=time)
  return x


class StatefulRunnerTest(tf.test.TestCase, parameterized.TestCase):

  @parameterized.named_parameters(*_MODES)
  def test_stream_matches_keras_long_run(self, mode):
    layer, cell = _gru()
    x = _stream()
    runner = stepper.StatefulRunner(cell, BATCH)
    call = testing.in_mode(lambda chunk: runner(chunk, training=False), mode)
    outputs = [call(x[:, a:b]) for a, b in ((0, 2), (2, 5), (5, 9))]
    expected_y, expected_final = layer(x)
    testing.assert_nests_close(tf.concat(outputs, axis=1), expected_y)
    testing.assert_nests_close(runner.states, [expected_final])

  def test_reset_rows_match_running_the_rows_separately(self):
    layer, cell = _gru()
    x = _stream()
    runner = stepper.StatefulRunner(cell, BATCH)
    first = runner(x[:, :4])
    runner.reset_states(where=tf.constant([True, False, True]))
    second = runner(x[:, 4:])
    # Rows 0 and 2: a new stream from zeros; row 1 continues.
    testing.assert_nests_close(
        tf.concat([first, second], axis=1)[1], layer(x)[0][1])
    fresh, fresh_final = layer(x[:, 4:])
    testing.assert_nests_close(tf.gather(second, [0, 2]),
                               tf.gather(fresh, [0, 2]))
    testing.assert_nests_close(tf.gather(runner.states[0], [0, 2]),
                               tf.gather(fresh_final, [0, 2]))
    runner.reset_states()
    self.assertAllEqual(runner.states[0], tf.zeros([BATCH, UNITS], tf.float64))

  def test_resets_argument_matches_full_run_with_resets(self):
    _, cell = _gru()
    x = _stream()
    s0 = _data()[1]
    resets = tf.constant(np.random.default_rng(5).random((BATCH, 9)) < 0.3)
    runner = stepper.StatefulRunner(cell, BATCH, initial_states=[s0])
    outputs = [runner(x[:, a:b], resets=resets[:, a:b])
               for a, b in ((0, 4), (4, 9))]
    expected = stepper.model_rnn(cell, x, [s0], resets=resets)
    testing.assert_nests_close((tf.concat(outputs, axis=1), runner.states),
                               expected)

  @parameterized.named_parameters(*_MODES)
  def test_mask_across_calls_matches_one_masked_run(self, mode):
    _, cell = _gru()
    x = _stream()
    s0 = _data()[1]
    mask = np.random.default_rng(6).random((BATCH, 9)) < 0.5
    mask[0, :5] = False  # No valid step in the first two calls.
    mask[1, 2:7] = False  # A whole masked call after valid steps.
    mask = tf.constant(mask)
    runner = stepper.StatefulRunner(cell, BATCH, initial_states=[s0])
    call = testing.in_mode(
        lambda chunk, m: runner(chunk, training=False, mask=m), mode)
    outputs = [call(x[:, a:b], mask[:, a:b])
               for a, b in ((0, 2), (2, 5), (5, 7), (7, 9))]
    expected = stepper.model_rnn(cell, x, [s0], mask=mask)
    testing.assert_nests_close((tf.concat(outputs, axis=1), runner.states),
                               expected)

  def test_mask_after_reset_repeats_zeros_like_a_new_stream(self):
    _, cell = _gru()
    x = _stream()
    mask = tf.constant([[True] * 4 + [False, True] * 2 + [True]] * BATCH)
    runner = stepper.StatefulRunner(cell, BATCH)
    runner(x[:, :4], mask=mask[:, :4])
    runner.reset_states(where=tf.constant([True, False, True]))
    second = runner(x[:, 4:], mask=mask[:, 4:])
    fresh = stepper.model_rnn(cell, x[:, 4:], mask=mask[:, 4:])[0]
    whole = stepper.model_rnn(cell, x, mask=mask)[0]
    testing.assert_nests_close(tf.gather(second, [0, 2]),
                               tf.gather(fresh, [0, 2]))
    testing.assert_nests_close(second[1], whole[1, 4:])

  def test_masked_stream_resumes_bit_identical_from_checkpoint(self):
    _, cell = _gru()
    x = _stream()
    mask = tf.constant([[True, True, True, False, False, False, True, False,
                         True]] * BATCH)
    runner = stepper.StatefulRunner(cell, BATCH)
    runner(x[:, :4], mask=mask[:, :4])
    path = tf.train.Checkpoint(runner=runner).save(
        os.path.join(self.get_temp_dir(), "masked"))
    uninterrupted = runner(x[:, 4:], mask=mask[:, 4:])
    resumed_runner = stepper.StatefulRunner(cell, BATCH)
    tf.train.Checkpoint(runner=resumed_runner).restore(path)
    resumed = resumed_runner(x[:, 4:], mask=mask[:, 4:])
    self.assertAllEqual(resumed, uninterrupted)
    self.assertNotAllClose(resumed[:, :2], tf.zeros_like(resumed[:, :2]))

  def test_checkpoint_resume_is_bit_identical(self):
    _, cell = _gru()
    x = _stream()
    runner = stepper.StatefulRunner(cell, BATCH)
    runner(x[:, :3])
    runner(x[:, 3:5])
    path = tf.train.Checkpoint(runner=runner).save(
        os.path.join(self.get_temp_dir(), "stream"))
    uninterrupted = runner(x[:, 5:])

    _, cell_copy = _gru(seed=7)  # Other weights until copied.
    cell_copy.set_weights(cell.get_weights())
    resumed_runner = stepper.StatefulRunner(cell_copy, BATCH)
    tf.train.Checkpoint(runner=resumed_runner).restore(path).assert_consumed()
    resumed = resumed_runner(x[:, 5:])
    self.assertAllEqual(resumed, uninterrupted)
    self.assertAllEqual(resumed_runner.states[0], runner.states[0])

  def test_state_variables_are_not_trainable(self):
    _, cell = _gru()
    runner = stepper.StatefulRunner(cell, BATCH)
    self.assertEmpty(runner.trainable_variables)
    self.assertLen(runner.variables, 1)
    self.assertEqual(runner.variables[0].shape, (BATCH, UNITS))

  def test_no_gradient_crosses_calls(self):
    _, cell = _gru()
    x = _stream()
    runner = stepper.StatefulRunner(cell, BATCH)
    with tf.GradientTape() as tape:
      tape.watch(x)
      runner(x[:, :3])
      loss = tf.reduce_sum(runner(x[:, 3:]))
    grad = tape.gradient(loss, x)
    self.assertAllEqual(grad[:, :3], tf.zeros_like(grad[:, :3]))
    self.assertNotAllClose(grad[:, 3:], tf.zeros_like(grad[:, 3:]))

  @parameterized.named_parameters(*_MODES)
  def test_runner_raises_on_batch_size_mismatch(self, mode):
    _, cell = _gru()
    runner = stepper.StatefulRunner(cell, BATCH)
    x = _stream()[:2]
    with self.assertRaisesRegex(
        ValueError, r"chunk has batch size 2 .* but this StatefulRunner "
        r"carries 3 streams \(batch_size=3\)"):
      testing.in_mode(runner, mode)(x)

  def test_runner_raises_on_bad_reset_where(self):
    _, cell = _gru()
    runner = stepper.StatefulRunner(cell, BATCH)
    with self.assertRaisesRegex(ValueError, r"`where` must have shape "
                                r"\[batch_size\] = \(3,\); got \(2,\)"):
      runner.reset_states(where=tf.constant([True, False]))
    with self.assertRaisesRegex(TypeError, r"`where` must be a bool tensor"
                                r".*got dtype int32"):
      runner.reset_states(where=tf.constant([1, 0, 1]))

  def test_runner_raises_on_bad_batch_size_or_states(self):
    _, cell = _gru()
    with self.assertRaisesRegex(ValueError,
                                r"`batch_size` must be a positive integer"):
      stepper.StatefulRunner(cell, 0)
    with self.assertRaisesRegex(ValueError, r"initial_states\[0\] has shape "
                                r"\(3, 5\) but the step's state input 0"):
      stepper.StatefulRunner(cell, BATCH,
                             initial_states=[tf.zeros([BATCH, UNITS + 1],
                                                      tf.float64)])


if __name__ == "__main__":
  tf.test.main()
