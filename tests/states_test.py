"""Tests of `stepper.TrainableState`: gradients against explicit, watched
initial states; every documented batch size form (`int | tf.Tensor`, numpy
ints, a sequence) gives the same states; errors.

Reference: the learned values tiled by hand (`tf.tile`).
"""

from absl.testing import parameterized
import keras
import numpy as np
import tensorflow as tf

import stepper
from stepper import testing

BATCH, TIME, FEATURES, UNITS = 3, 5, 4, 6


class TrainableStateBatchSizeTest(tf.test.TestCase, parameterized.TestCase):

  def setUp(self):
    super().setUp()
    keras.utils.set_random_seed(0)
    self.init = stepper.TrainableState(keras.layers.LSTMCell(2),
                                       initializer="random_normal")
    self.expected = [tf.tile(v[None], [3, 1]) for v in self.init.variables]

  @parameterized.named_parameters(
      ("int", lambda init: init.initial_state(3)),
      ("numpy_int64", lambda init: init.initial_state(np.int64(3))),
      ("tensor", lambda init: init.initial_state(tf.constant(3))),
      ("int64_tensor", lambda init: init.initial_state(
          tf.constant(3, tf.int64))),
      ("call_int", lambda init: init(3)),
      ("call_tensor", lambda init: init(tf.constant(3))),
      ("call_sequence", lambda init: init(tf.zeros([3, 5, 4]))),
      ("traced_tensor", lambda init: tf.function(init.initial_state)(
          tf.constant(3))),
  )
  def test_batch_size_forms_match_tiled_values(self, get):
    self.assertAllClose(get(self.init), self.expected, rtol=0, atol=0)

  def test_zero_rows(self):
    self.assertEqual(self.init.initial_state(0)[0].shape, (0, 2))

  def test_negative_tensor_raises_before_use_in_tf_function(self):
    run = tf.function(self.init.initial_state)
    with self.assertRaisesRegex(tf.errors.InvalidArgumentError,
                                r"`batch_size` must be >= 0.*-2"):
      run(tf.constant(-2))


class TrainableStateTest(tf.test.TestCase):

  def test_learned_initial_state_gets_gradients(self):
    keras.utils.set_random_seed(5)
    cell = keras.layers.LSTMCell(UNITS)
    init = stepper.TrainableState(cell, initializer="random_normal")
    x = tf.random.normal([BATCH, TIME, FEATURES])
    with tf.GradientTape() as tape:
      states = init(x)
      outputs, _ = stepper.model_rnn(cell, x, states)
      loss = tf.reduce_sum(outputs ** 2)
    grads = tape.gradient(loss, init.trainable_variables)
    self.assertLen(grads, 2)
    # Reference: the same values passed as explicit, watched initial states.
    h0 = [tf.tile(v[None], [BATCH, 1]) for v in init.trainable_variables]
    with tf.GradientTape() as tape:
      tape.watch(h0)
      outputs, _ = stepper.model_rnn(cell, x, h0)
      loss = tf.reduce_sum(outputs ** 2)
    per_row = tape.gradient(loss, h0)
    testing.assert_nests_close(
        grads, [tf.reduce_sum(g, 0) for g in per_row], rtol=1e-5, atol=1e-6)

  def test_raises_on_callable_step(self):
    with self.assertRaisesRegex(ValueError, "declares its states"):
      stepper.TrainableState(lambda x, s: (x, s))

  def test_raises_on_unknown_state_dimensions(self):
    step = stepper.Step(lambda x, s: (x, s), name="open",
                        state_specs=[tf.TensorSpec([None, None])])
    with self.assertRaisesRegex(ValueError,
                                r"State 0 of open has shape \(None, None\)"):
      stepper.TrainableState(step)
