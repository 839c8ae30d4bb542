"""Tests of `stepper.verify.find_nonfinite`: a NaN/Inf planted at a known
step, row and leaf is reported exactly there, forward and backward; and the
padding claim: gradients reaching masked (padded) inputs are zero only for
finite padding, as in Keras.

References: the planted position (known by construction) and Keras `GRU`
behind a mask.
"""

import json

import keras
import numpy as np
import tensorflow as tf

import stepper
from stepper import verify


def _countdown(x_t, states):
  """`s <- s - 1`, output `x_t / s`: infinite where `s` reaches zero."""
  s = states[0] - 1.
  return x_t / s, [s]


def _sqrt_of_square(x_t, states):
  """`s <- s - 1`, output `x_t * sqrt(s**2)`: finite forward, but the
  gradient of sqrt at 0 times 2s = 0 is NaN where `s` reaches zero."""
  s = states[0] - 1.
  return x_t * tf.sqrt(tf.square(s)), [s]


def _start(values):
  return [tf.constant([[v] for v in values], tf.float32)]


class FindNonfiniteTest(tf.test.TestCase):

  def test_reports_inf_planted_in_a_nested_input_leaf(self):
    x = {"a": np.zeros([4, 6, 2], np.float32),
         "b": np.ones([4, 6, 3], np.float32)}
    x["b"][2, 3, 1] = np.inf
    step = lambda x_t, states: (x_t["a"] + x_t["b"][:, :2], states)
    report = verify.find_nonfinite(step, x,
                                   initial_states=[tf.zeros([4, 1])])
    first = report.first("forward")
    self.assertEqual((first.kind, first.leaf, first.step, first.rows),
                     ("input", "inputs['b']", 3, (2,)))
    self.assertEqual(first.value, "inf")
    self.assertFalse(report.ok)
    # The output is non-finite from that step on; only the first is named.
    output = [f for f in report.findings if f.kind == "output"][0]
    self.assertEqual((output.step, output.rows), (3, (2,)))

  def test_nan_input_reaches_gru_state_at_the_same_step_and_row(self):
    x = np.random.default_rng(0).standard_normal([3, 7, 2]).astype("float32")
    x[1, 5, 0] = np.nan
    report = verify.find_nonfinite(keras.layers.GRUCell(4), x)
    by_kind = {f.kind: f for f in report.findings}
    for kind in ("input", "output", "state"):
      self.assertEqual((by_kind[kind].step, by_kind[kind].rows), (5, (1,)),
                       kind)
    self.assertEqual(by_kind["state"].leaf, "states[0]")
    # Backward: the NaN loss reaches every step's state of that row.
    backward = report.first("backward")
    self.assertEqual((backward.kind, backward.step, backward.rows),
                     ("state gradient", 6, (1,)))

  def test_names_the_step_dividing_by_a_state_that_reaches_zero(self):
    # Row 2 starts at 3: its state is 0 after step 2, so y_2 = x / 0.
    report = verify.find_nonfinite(_countdown, tf.ones([4, 6, 1]),
                                   initial_states=_start([9, 9, 3, 9]))
    first = report.first("forward")
    self.assertEqual((first.kind, first.leaf, first.step, first.rows),
                     ("output", "outputs", 2, (2,)))
    self.assertEqual(first.value, "inf")
    self.assertEqual([f.kind for f in report.findings if f.pass_name ==
                      "forward"], ["output"])  # States stay finite.

  def test_backward_only_nonfinite_is_named_at_its_step(self):
    # Finite forward pass; the gradient into the state entering step 3 of
    # row 1 (whose state reaches zero there) is NaN.
    # (The sum, not the default mean square: dL/dy = 2y = 0 there, and
    # TensorFlow's sqrt gradient maps a zero incoming gradient to zero.)
    report = verify.find_nonfinite(_sqrt_of_square, tf.ones([3, 6, 1]),
                                   initial_states=_start([9, 4, 9]),
                                   loss=tf.reduce_sum)
    self.assertIsNone(report.first("forward"))
    backward = report.first("backward")
    self.assertEqual((backward.kind, backward.leaf, backward.step,
                      backward.rows, backward.value),
                     ("state gradient", "states[0]", 3, (1,), "nan"))

  def test_nonfinite_initial_state_leaf(self):
    cell = keras.layers.LSTMCell(3)
    h, c = tf.zeros([2, 3]), np.zeros([2, 3], np.float32)
    c[1, 2] = -np.inf
    report = verify.find_nonfinite(cell, tf.ones([2, 4, 2]),
                                   initial_states=[h, tf.constant(c)])
    first = report.first("forward")
    self.assertEqual((first.kind, first.leaf, first.rows, first.value),
                     ("initial state", "initial_states[1]", (1,), "-inf"))

  def test_finite_run_is_ok_and_serialises(self):
    report = verify.find_nonfinite(keras.layers.SimpleRNNCell(3),
                                   tf.ones([2, 4, 2]))
    self.assertTrue(report.ok)
    self.assertIsNone(report.first("backward"))
    self.assertIn("every value finite over 4 steps", str(report))
    self.assertEqual(json.loads(json.dumps(report.to_dict()))["ok"], True)

  def test_report_table_and_dict_name_step_row_and_leaf(self):
    report = verify.find_nonfinite(_countdown, tf.ones([4, 6, 1]),
                                   initial_states=_start([9, 9, 3, 9]))
    table = str(report)
    self.assertRegex(table, r"forward\s+output\s+outputs\s+2\s+2\s+inf")
    as_dict = json.loads(json.dumps(report.to_dict()))
    self.assertEqual(as_dict["first"]["forward"]["step"], 2)
    self.assertEqual(as_dict["first"]["forward"]["rows"], [2])
    self.assertEqual(as_dict["time"], 6)

  def test_raises_inside_tf_function(self):
    step = lambda x_t, states: (x_t, states)
    run = tf.function(lambda x: verify.find_nonfinite(
        step, x, initial_states=[tf.zeros([1, 1])]))
    with self.assertRaisesRegex(RuntimeError, "eagerly"):
      run(tf.ones([1, 2, 1]))

  def test_raises_on_bad_inputs(self):
    with self.assertRaisesRegex(ValueError, r"`inputs` is None"):
      verify.find_nonfinite(keras.layers.GRUCell(2), None)
    with self.assertRaisesRegex(ValueError, r"inputs has shape \(2, 3\)"):
      verify.find_nonfinite(keras.layers.GRUCell(2), tf.ones([2, 3]))
    with self.assertRaisesRegex(ValueError, r"`pass_name`.*'sideways'"):
      verify.find_nonfinite(keras.layers.GRUCell(2),
                            tf.ones([1, 2, 1])).first("sideways")


def _masked_grads(run, x, mask, variables):
  with tf.GradientTape() as tape:
    tape.watch(x)
    loss = tf.reduce_sum(run(x, mask))
  return tape.gradient(loss, [x] + variables)


class PaddingGradientTest(tf.test.TestCase):
  """Gradients reaching padded inputs: zero for finite padding only."""

  def setUp(self):
    super().setUp()
    keras.utils.set_random_seed(0)
    self.cell = keras.layers.GRUCell(3)
    self.keras_gru = keras.layers.GRU(3, return_sequences=True)
    self.mask = tf.constant([[True] * 4 + [False] * 2] * 2)
    x = np.random.default_rng(1).standard_normal([2, 6, 2]).astype("float32")
    self.finite = tf.constant(x)
    x[:, 4:] = np.nan
    self.nan = tf.constant(x)
    stepper.model_rnn(self.cell, self.finite)
    self.keras_gru(self.finite)
    for dst, src in zip(self.keras_gru.weights, self.cell.weights):
      dst.assign(src)

  def _stepper(self, x, mask):
    return stepper.model_rnn(self.cell, x, mask=mask)[0]

  def _keras(self, x, mask):
    return self.keras_gru(x, mask=mask)

  def test_finite_padding_gets_zero_input_and_finite_weight_gradients(self):
    for run, variables in ((self._stepper, self.cell.trainable_variables),
                           (self._keras, self.keras_gru.trainable_variables)):
      dx, *dw = _masked_grads(run, self.finite, self.mask, variables)
      self.assertAllEqual(dx[:, 4:], tf.zeros_like(dx[:, 4:]))
      for g in dw:
        self.assertTrue(np.all(np.isfinite(g)))

  def test_nan_padding_gives_nan_weight_gradients_in_stepper_and_keras(self):
    # The masked step still runs on the NaN; `where` drops its value but
    # its gradient 0 * NaN = NaN reaches the weights (Keras does the same).
    for run, variables in ((self._stepper, self.cell.trainable_variables),
                           (self._keras, self.keras_gru.trainable_variables)):
      outputs = run(self.nan, self.mask)
      self.assertTrue(np.all(np.isfinite(outputs)))  # Forward is fine.
      _, *dw = _masked_grads(run, self.nan, self.mask, variables)
      self.assertTrue(any(np.any(np.isnan(g)) for g in dw))
