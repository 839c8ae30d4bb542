"""Tests for `stepper.tbptt` (BPTT(k2; k1)) against a brute-force reference.

The reference calls the Keras cell step by step in Python (no engine) under
one tape per update, replacing the state entering step
`max(0, (j+1)*k1 - k2)` by a `tf.stop_gradient` copy, and differentiates the
mean loss over exactly the update's steps `[j*k1, min((j+1)*k1, T))`.
"""

from absl.testing import parameterized
import keras
import numpy as np
import tensorflow as tf

import stepper
from stepper import testing

BATCH, TIME, FEATURES, UNITS = 2, 7, 3, 4
_WINDOWS = (
    ("k1_2_k2_2_plain", 2, 2),
    ("k1_2_k2_3_overlap", 2, 3),
    ("k1_3_k2_5_overlap_uneven", 3, 5),
    ("k1_1_k2_4_every_step", 1, 4),
    ("k1_3_k2_3_uneven", 3, 3),
    ("k1_2_k2_9_longer_than_time", 2, 9),
)


def _mse(y_true, y_pred):
  """Per-example squared error, `[rows]`."""
  return tf.reduce_mean((y_true - y_pred) ** 2, axis=-1)


def _problem(seed=0):
  keras.utils.set_random_seed(seed)
  cell = keras.layers.GRUCell(UNITS, dtype="float64")
  cell.build((None, FEATURES))
  rng = np.random.default_rng(seed)
  x = tf.constant(rng.normal(size=(BATCH, TIME, FEATURES)))
  y = tf.constant(rng.normal(size=(BATCH, TIME, UNITS)))
  s0 = tf.constant(rng.normal(size=(BATCH, UNITS)))
  return cell, x, y, s0


def _brute_force_update(cell, x, y, s0, j, k1, k2):
  """`(loss_j, grads_j)` by definition, one Python step at a time."""
  time = x.shape[1]
  start, stop = max(0, (j + 1) * k1 - k2), min((j + 1) * k1, time)
  with tf.GradientTape() as tape:
    state, losses = s0, []
    for t in range(stop):
      if t == start:
        state = tf.stop_gradient(state)
      y_t, (state,) = cell(x[:, t], [state])
      if t >= j * k1:
        losses.append(tf.reduce_mean(_mse(y[:, t], y_t)))
    loss = tf.add_n(losses) / len(losses)
  return loss, tape.gradient(loss, cell.trainable_variables)


def _brute_force(cell, x, y, s0, k1, k2):
  n_updates = -(-x.shape[1] // k1)
  return [_brute_force_update(cell, x, y, s0, j, k1, k2)
          for j in range(n_updates)]


class TbpttTest(tf.test.TestCase, parameterized.TestCase):

  @parameterized.named_parameters(*_WINDOWS)
  def test_updates_match_brute_force(self, k1, k2):
    cell, x, y, s0 = _problem()
    expected = _brute_force(cell, x, y, s0, k1, k2)
    actual = stepper.tbptt.updates(cell, x, y, _mse, k1=k1, k2=k2,
                                   initial_states=[s0])
    testing.assert_nests_close(actual, expected)

  @parameterized.named_parameters(*_WINDOWS[:3])
  def test_update_one_at_a_time_in_tf_function_matches_brute_force(
      self, k1, k2):
    cell, x, y, s0 = _problem()
    expected = _brute_force(cell, x, y, s0, k1, k2)
    updater = stepper.tbptt.Updater(cell, _mse, k1=k1, k2=k2)
    update = tf.function(updater.update)
    states, actual = [s0], []
    for j in range(len(expected)):
      loss_j, grads_j, states = update(x, y, states, tf.constant(j))
      actual.append((loss_j, grads_j))
    testing.assert_nests_close(actual, expected)

  @parameterized.named_parameters(*_WINDOWS[:3])
  def test_updates_inside_tf_function_match_brute_force(self, k1, k2):
    cell, x, y, s0 = _problem()
    expected = _brute_force(cell, x, y, s0, k1, k2)
    actual = tf.function(lambda: stepper.tbptt.updates(
        cell, x, y, _mse, k1=k1, k2=k2, initial_states=[s0]))()
    testing.assert_nests_close(actual, expected)

  @parameterized.named_parameters(*_WINDOWS[1:3])
  def test_iterate_matches_brute_force(self, k1, k2):
    cell, x, y, s0 = _problem()
    expected = _brute_force(cell, x, y, s0, k1, k2)
    actual = list(stepper.tbptt.iterate(cell, x, y, _mse, k1=k1, k2=k2,
                                        initial_states=[s0]))
    testing.assert_nests_close(actual, expected)

  def test_keras_loss_matches_brute_force(self):
    cell, x, y, s0 = _problem()
    # float64: a Keras loss computes in floatx (float32) unless told.
    loss = keras.losses.MeanSquaredError(dtype="float64")
    actual = stepper.tbptt.updates(cell, x, y, loss, k1=3, k2=4,
                                   initial_states=[s0])
    testing.assert_nests_close(actual, _brute_force(cell, x, y, s0, 3, 4))

  def test_whole_sequence_window_matches_keras_full_bptt(self):
    cell, x, y, s0 = _problem()
    layer = keras.layers.GRU(UNITS, return_sequences=True, dtype="float64")
    layer.build((BATCH, None, FEATURES))
    layer.set_weights(cell.get_weights())
    with tf.GradientTape() as tape:
      loss = tf.reduce_mean(_mse(y, layer(x, initial_state=[s0])))
    expected = [(loss, tape.gradient(loss, layer.trainable_variables))]
    actual = stepper.tbptt.updates(cell, x, y, _mse, k1=TIME, k2=TIME,
                                   initial_states=[s0])
    testing.assert_nests_close(actual, expected)

  def test_plain_truncation_matches_run_chunks_truncate(self):
    cell, x, y, s0 = _problem()
    k = 3
    updates = stepper.tbptt.updates(cell, x, y, _mse, k1=k, k2=k,
                                    initial_states=[s0])
    # Summing per-update losses weighted by their steps gives the loss
    # over the whole sequence; its truncated gradient is the same sum.
    weights = [min(k, TIME - j * k) / TIME for j in range(len(updates))]
    with tf.GradientTape() as tape:
      out, _ = stepper.run_chunks(cell, x, k, [tf.stop_gradient(s0)],
                                  gradient="truncate")
      loss = tf.reduce_mean(_mse(y, out))
    expected = tape.gradient(loss, cell.trainable_variables)
    actual = [tf.add_n([w * g[i] for w, (_, g) in zip(weights, updates)])
              for i in range(len(expected))]
    testing.assert_nests_close(actual, expected)

  def test_overlap_changes_the_gradients(self):
    cell, x, y, s0 = _problem()
    plain = stepper.tbptt.updates(cell, x, y, _mse, k1=2, k2=2,
                                  initial_states=[s0])
    overlap = stepper.tbptt.updates(cell, x, y, _mse, k1=2, k2=4,
                                    initial_states=[s0])
    testing.assert_nests_close(overlap[0], plain[0])  # Nothing before 0.
    testing.assert_nests_close(overlap[1][0], plain[1][0])  # Same forward.
    self.assertNotAllClose(overlap[1][1][0], plain[1][1][0])

  def test_updater_is_reusable_and_keeps_final_states(self):
    cell, x, y, s0 = _problem()
    updater = stepper.tbptt.Updater(cell, _mse, k1=2, k2=3)
    expected = _brute_force(cell, x, y, s0, 2, 3)
    for _ in range(2):
      testing.assert_nests_close(list(updater.iterate(x, y, [s0])), expected)
      testing.assert_nests_close(updater.updates(x, y, [s0]), expected)
    testing.assert_nests_close(updater.final_states,
                               stepper.model_rnn(cell, x, [s0])[1])

  def test_iterate_applies_each_update_before_the_next(self):
    """Online TBPTT: update j+1 uses the weights after update j."""
    cell, x, y, s0 = _problem()
    reference_cell, _, _, _ = _problem(seed=5)
    reference_cell.set_weights(cell.get_weights())
    k1, k2, rate = 2, 3, 0.5

    def sgd(variables, grads):
      for v, g in zip(variables, grads):
        v.assign_sub(rate * g)

    actual = []
    for loss_j, grads_j in stepper.tbptt.iterate(cell, x, y, _mse, k1=k1,
                                                 k2=k2, initial_states=[s0]):
      actual.append((loss_j, grads_j))
      sgd(cell.trainable_variables, grads_j)

    # Reference: each window from the state saved by the previous update,
    # computed with the weights of that update.
    expected, saved = [], s0
    for j in range(-(-TIME // k1)):
      start = max(0, (j + 1) * k1 - k2)
      split = min(max(0, (j + 2) * k1 - k2), min((j + 1) * k1, TIME))
      with tf.GradientTape() as tape:
        state, losses = tf.stop_gradient(saved), []
        for t in range(start, min((j + 1) * k1, TIME)):
          if t == split:
            next_saved = state
          y_t, (state,) = reference_cell(x[:, t], [state])
          if t >= j * k1:
            losses.append(tf.reduce_mean(_mse(y[:, t], y_t)))
        if split == min((j + 1) * k1, TIME):
          next_saved = state
        loss = tf.add_n(losses) / len(losses)
      grads = tape.gradient(loss, reference_cell.trainable_variables)
      expected.append((loss, grads))
      sgd(reference_cell.trainable_variables, grads)
      saved = next_saved
    testing.assert_nests_close(actual, expected)
    self.assertNotAllClose(actual[-1][0],
                           _brute_force(*_problem(), k1, k2)[-1][0])


class TbpttErrorsTest(tf.test.TestCase, parameterized.TestCase):

  def test_updates_raises_on_k2_less_than_k1(self):
    cell, x, y, _ = _problem()
    with self.assertRaisesRegex(ValueError, r"`k2` \(steps backpropagated, 2\)"
                                r" must be >= `k1` \(steps between updates, 3\)"):
      stepper.tbptt.updates(cell, x, y, _mse, k1=3, k2=2)

  @parameterized.named_parameters(("k1_zero", 0, 2, "k1"),
                                  ("k2_negative", 1, -1, "k2"),
                                  ("k1_float", 1.5, 2, "k1"))
  def test_updater_raises_on_bad_window(self, k1, k2, name):
    cell, _, _, _ = _problem()
    with self.assertRaisesRegex(ValueError,
                                rf"`{name}` must be a positive integer"):
      stepper.tbptt.Updater(cell, _mse, k1=k1, k2=k2)

  def test_updates_raises_on_targets_of_other_length(self):
    cell, x, y, _ = _problem()
    with self.assertRaisesRegex(ValueError, r"targets has 6 time steps .* "
                                r"but `inputs` has 7"):
      stepper.tbptt.updates(cell, x, y[:, :6], _mse, k1=2, k2=2)

  def test_updates_raises_on_unknown_time(self):
    cell, _, _, _ = _problem()

    @tf.function(input_signature=[
        tf.TensorSpec([BATCH, None, FEATURES], tf.float64),
        tf.TensorSpec([BATCH, None, UNITS], tf.float64)])
    def run(x, y):
      return stepper.tbptt.updates(cell, x, y, _mse, k1=2, k2=2)

    with self.assertRaisesRegex(ValueError, r"`inputs` has an unknown number "
                                r"of time steps"):
      run(*_problem()[1:3])

  def test_updates_raises_without_variables(self):
    _, x, y, s0 = _problem()
    step = lambda x_t, states: (tf.tile(x_t[:, :1], [1, UNITS]), states)
    with self.assertRaisesRegex(ValueError, r"No variables to differentiate"
                                r".*Pass `variables=\[...\]`"):
      stepper.tbptt.updates(step, x, y, _mse, k1=2, k2=2,
                            initial_states=[s0])

  @parameterized.named_parameters(*testing.MODES[:2])
  def test_updates_raises_on_mismatched_state_shape(self, mode):
    cell, x, y, _ = _problem()
    bad = [tf.zeros([BATCH, UNITS + 1], tf.float64)]
    with self.assertRaisesRegex(ValueError, r"initial_states\[0\] has shape "
                                r"\(2, 5\) but the step's state input 0"):
      testing.in_mode(lambda: stepper.tbptt.updates(
          cell, x, y, _mse, k1=2, k2=2, initial_states=bad), mode)()


class TbpttTargetsTest(tf.test.TestCase):
  """Loss names and sparse labels are accepted; the checks that reject
  broadcasting targets (tests/bad_input_test.py) reject nothing valid."""

  def test_loss_name_matches_the_per_example_mse(self):
    cell, x, y, s0 = _problem()
    by_name = stepper.tbptt.updates(cell, x, y, "mse", k1=3, k2=4,
                                    initial_states=[s0])
    # (Not a MeanSquaredError object: it computes in float32.)
    by_hand = stepper.tbptt.updates(cell, x, y, _mse, k1=3, k2=4,
                                    initial_states=[s0])
    testing.assert_nests_close(by_name, by_hand, rtol=1e-12)

  def test_sparse_integer_labels_match_one_hot_labels(self):
    cell, x, _, s0 = _problem()
    labels = tf.constant(np.random.default_rng(1).integers(
        0, UNITS, size=(BATCH, TIME)))
    sparse = stepper.tbptt.updates(
        cell, x, labels,
        keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        k1=3, k2=4, initial_states=[s0])
    dense = stepper.tbptt.updates(
        cell, x, tf.one_hot(labels, UNITS, dtype=tf.float64),
        keras.losses.CategoricalCrossentropy(from_logits=True),
        k1=3, k2=4, initial_states=[s0])
    testing.assert_nests_close(sparse, dense, rtol=1e-10)

  def test_update_index_in_range_matches_updates(self):
    cell, x, y, s0 = _problem()
    updater = stepper.tbptt.Updater(cell, _mse, k1=3, k2=3)
    expected = updater.updates(x, y, [s0])
    last = (TIME + 2) // 3 - 1
    states = [s0]
    for j in range(last + 1):
      loss_j, grads_j, states = updater.update(x, y, states, j)
    testing.assert_nests_close((loss_j, grads_j), expected[last],
                               rtol=1e-10)


if __name__ == "__main__":
  tf.test.main()
