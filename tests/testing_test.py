"""Tests of `stepper.testing`: the assertions users import, and that they fail.

References: Keras built-in layers (via `stepper.verify.compare`) and float64
finite differences (via `stepper.verify.numerical`).
"""

from absl.testing import parameterized
import keras
import numpy as np
import tensorflow as tf

from stepper import testing


class CutCell(keras.layers.SimpleRNNCell):
  """A broken cell: no gradient through its recurrent path."""

  def call(self, inputs, states, training=False):
    return super().call(inputs, [tf.stop_gradient(s) for s in states],
                        training=training)


class UserCellTest(testing.GradientTestCase):
  """What a user writes for a new cell: the README example, run for real."""

  @parameterized.named_parameters(("float32", "float32"),
                                  ("float64", "float64"))
  def test_gradients_match_keras_gru(self, dtype):
    x = self.random_inputs([3, 5, 4], dtype)
    self.assertGradientsClose(
        keras.layers.GRUCell(3, dtype=dtype),
        keras.layers.GRU(3, return_sequences=True, dtype=dtype), x)

  def test_gradients_match_finite_differences(self):
    report = self.assertGradientsMatchNumerical(
        keras.layers.LSTMCell(2, dtype="float64"),
        self.random_inputs([2, 4, 3], "float64"), max_coordinates=6)
    self.assertTrue(report.ok)


class AssertionsTest(tf.test.TestCase, parameterized.TestCase):

  def test_assert_gradients_close_raises_listing_failing_rows(self):
    x = testing.GradientTestCase().random_inputs([2, 5, 3])
    with self.assertRaisesRegex(
        AssertionError,
        r"rows fail(.|\n)*grad .*recurrent_kernel: max \|err\|"
        r"(.|\n)*grad inputs: max \|err\|"):
      testing.assert_gradients_close(
          CutCell(3), keras.layers.SimpleRNN(3, return_sequences=True), x)

  def test_assert_gradients_close_without_control_uses_finite_differences(
      self):
    x = testing.GradientTestCase().random_inputs([2, 3, 2], "float64")
    report = testing.assert_gradients_close(
        keras.layers.SimpleRNNCell(2, dtype="float64"), None, x)
    self.assertIn("finite differences", report.title)

  def test_random_inputs_are_reproducible(self):
    case = testing.GradientTestCase()
    a = case.random_inputs([2, 3, 4], "float64", seed=3)
    self.assertEqual(a.dtype, tf.float64)
    self.assertAllEqual(a, case.random_inputs([2, 3, 4], "float64", seed=3))
    self.assertNotAllEqual(a, case.random_inputs([2, 3, 4], "float64"))

  @parameterized.named_parameters(("float64", tf.float64, 1e-10),
                                  ("float32", tf.float32, 1e-5),
                                  ("float16", tf.float16, 1e-5))
  def test_default_tolerance_by_dtype(self, dtype, expected):
    self.assertEqual(testing.default_tolerance(dtype), expected)

  def test_assert_nests_close_still_reports_bad_leaf(self):
    with self.assertRaisesRegex(AssertionError, r"grads\[1\]: max \|err\|"):
      testing.assert_nests_close([np.ones(2), np.ones(2)],
                                 [np.ones(2), 2 * np.ones(2)], name="grads")

  def test_normwise_bounds_each_leaf_by_its_largest_entry(self):
    # A small entry off by 1e-6 passes against a leaf whose largest entry
    # is 1 (1e-6 <= 1e-5 * 1), and fails elementwise (bound 2e-11).
    actual, expected = [np.array([1.0, 1e-6])], [np.array([1.0, 2e-6])]
    testing.assert_nests_close(actual, expected, rtol=1e-5, normwise=True)
    with self.assertRaisesRegex(AssertionError, r"\[0\]: max \|err\|"):
      testing.assert_nests_close(actual, expected, rtol=1e-5)
    # Each leaf its own scale: a large leaf does not widen a small one's.
    with self.assertRaisesRegex(AssertionError, r"\[1\]: .* max \|expected"):
      testing.assert_nests_close(
          [np.array([1e3]), np.array([1.0, 1e-6])],
          [np.array([1e3]), np.array([1.001, 2e-6])], rtol=1e-5,
          normwise=True)
    with self.assertRaisesRegex(TypeError, r"`normwise` must be a bool; "
                                r"got 'yes'"):
      testing.assert_nests_close(actual, expected, normwise="yes")


if __name__ == "__main__":
  tf.test.main()
