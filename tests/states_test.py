"""Tests of `stepper.TrainableState`'s batch sizes: every documented form
(`int | tf.Tensor`, numpy ints, a sequence) gives the same states.

Reference: the learned values tiled by hand (`tf.tile`).
"""

from absl.testing import parameterized
import keras
import numpy as np
import tensorflow as tf

import stepper


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
