"""Tests of `stepper.verify`: reports pass for correct steps, FAIL (naming the
right row) for broken ones, and the horizon matches closed forms.

References: Keras built-in layers with copied weights, float64 finite
differences, closed-form gradients of a scalar linear RNN, and a per-step
Python loop under one tape (brute force).
"""

import json
import os
import subprocess
import sys

from absl.testing import parameterized
import keras
import numpy as np
import pytest
import tensorflow as tf

from _cells import NestedCell, NestedInput
import stepper
from stepper import verify
from stepper.verify import report as verify_report

_CELLS = {
    "simple_rnn": (keras.layers.SimpleRNNCell, keras.layers.SimpleRNN),
    "gru": (keras.layers.GRUCell, keras.layers.GRU),
    "lstm": (keras.layers.LSTMCell, keras.layers.LSTM),
}
_CELL_CASES = [(f"{cell}_{dtype}", cell, dtype)
               for cell in _CELLS for dtype in ("float32", "float64")]


def _inputs(shape, dtype="float64", seed=0):
  return tf.constant(np.random.default_rng(seed).standard_normal(shape),
                     dtype=dtype)


def _failing(report):
  return [row.name for row in report.failures]


class CutRecurrenceCell(keras.layers.SimpleRNNCell):
  """A broken SimpleRNN cell: `tf.stop_gradient` on its recurrent path.

  Its outputs are right; its gradients through time are cut.
  """

  def call(self, inputs, states, training=False):
    return super().call(inputs, [tf.stop_gradient(s) for s in states],
                        training=training)


class TwoChunkStatefulRNN(keras.Model):
  """Seed case 1: a stateful `SimpleRNN` run on two halves inside one tape.

  Same outputs as one full run, but the state crossing the halves is a
  variable read: no gradient crosses it.
  """

  def __init__(self, units, **kwargs):
    super().__init__(**kwargs)
    self.rnn = keras.layers.SimpleRNN(units, return_sequences=True,
                                      stateful=True)

  def call(self, x):
    if self.rnn.built:
      self.rnn.reset_states()
    half = x.shape[1] // 2
    return tf.concat([self.rnn(x[:, :half]), self.rnn(x[:, half:])], axis=1)


def _wrong_gradient_tanh(x):
  """tanh whose hand-written gradient is wrong: 1 - y instead of 1 - y**2."""

  @tf.custom_gradient
  def fn(x):
    y = tf.tanh(x)
    return y, lambda dy: dy * (1 - y)

  return fn(x)


def _linear_rnn(a):
  """Scalar linear RNN h' = a * h + x, y = h', as a callable step."""

  def step(x_t, states):
    h = a * states[0] + x_t
    return h, [h]

  return step


class LinearCell(keras.layers.Layer):
  """h' = a * h + x with a trainable scalar `a`: a cell with a weight."""

  state_size = 1

  def __init__(self, a, **kwargs):
    super().__init__(**kwargs)
    self.a = self.add_weight(shape=(), initializer=keras.initializers.Constant(
        a), name="a")

  def call(self, x_t, states):
    h = self.a * states[0] + x_t
    return h, [h]


class CompareTest(tf.test.TestCase, parameterized.TestCase):

  @parameterized.named_parameters(_CELL_CASES)
  def test_compare_matches_keras_builtins(self, cell, dtype):
    cell_cls, layer_cls = _CELLS[cell]
    report = verify.compare(
        cell_cls(4, dtype=dtype),
        layer_cls(4, return_sequences=True, dtype=dtype),
        _inputs([3, 6, 5], dtype))
    report.assert_ok()
    self.assertLen([r for r in report.rows if r.kind == "gradient"], 4)
    self.assertEqual(report.row("grad inputs").rtol,
                     1e-10 if dtype == "float64" else 1e-5)

  @parameterized.named_parameters(("float32", "float32"),
                                  ("float64", "float64"))
  def test_compare_of_stack_matches_keras_sequential(self, dtype):
    deep = stepper.stack([keras.layers.SimpleRNNCell(4, dtype=dtype),
                          keras.layers.GRUCell(3, dtype=dtype)])
    control = keras.Sequential([
        keras.layers.SimpleRNN(4, return_sequences=True, dtype=dtype),
        keras.layers.GRU(3, return_sequences=True, dtype=dtype)])
    report = verify.compare(deep, control, _inputs([2, 5, 3], dtype))
    report.assert_ok()
    self.assertLen([r for r in report.rows if r.kind == "gradient"], 7)

  @parameterized.named_parameters(("concat", "concat"), ("sum", "sum"),
                                  ("masked_ave", "ave"))
  def test_compare_of_pair_matches_keras_bidirectional(self, merge_mode):
    mask = (tf.constant([[True] * 5, [True, True, True, False, False]])
            if merge_mode == "ave" else None)
    pair = (keras.layers.GRUCell(3, dtype="float64"),
            keras.layers.LSTMCell(3, dtype="float64"))
    control = keras.layers.Bidirectional(
        keras.layers.GRU(3, return_sequences=True, dtype="float64"),
        backward_layer=keras.layers.LSTM(3, return_sequences=True,
                                         go_backwards=True, dtype="float64"),
        merge_mode=merge_mode, dtype="float64")
    report = verify.compare(pair, control, _inputs([2, 5, 4]), mask=mask)
    report.assert_ok()
    self.assertLen([r for r in report.rows if r.kind == "gradient"], 7)
    self.assertIn("bidirectional", report.title)

  def test_compare_of_pair_fails_when_directions_are_swapped(self):
    pair = (keras.layers.GRUCell(3, dtype="float64"),
            keras.layers.GRUCell(3, dtype="float64"))
    control = keras.layers.Bidirectional(
        keras.layers.GRU(3, return_sequences=True, dtype="float64"),
        dtype="float64")
    x = _inputs([2, 5, 4])
    verify.compare(pair, control, x).assert_ok()
    verify.compare(pair, control, x, copy_weights=False).assert_ok()
    # The control now holds the pair's weights; paired the wrong way round,
    # the directions disagree.
    swapped = verify.compare((pair[1], pair[0]), control, x,
                             copy_weights=False)
    self.assertFalse(swapped.ok)
    self.assertIn("outputs", _failing(swapped))

  def test_compare_of_last_output_matches_keras_lstm(self):
    report = verify.compare(keras.layers.LSTMCell(3, dtype="float64"),
                            keras.layers.LSTM(3, dtype="float64"),
                            _inputs([2, 5, 4]))
    report.assert_ok()
    self.assertEqual(report.row("outputs").kind, "output")

  def test_compare_with_states_and_mask_matches_keras_gru(self):
    mask = tf.constant([[True] * 5, [True, True, True, False, False]])
    report = verify.compare(
        keras.layers.GRUCell(3, dtype="float64"),
        keras.layers.GRU(3, return_sequences=True, dtype="float64"),
        _inputs([2, 5, 4]), initial_states=[_inputs([2, 3], seed=1)],
        mask=mask)
    report.assert_ok()
    self.assertGreater(np.abs(report.row("grad initial_states[0]").cosine),
                       0.99)

  def test_compare_with_weight_map_matches_reordered_control(self):
    report = verify.compare(
        keras.layers.SimpleRNNCell(3, dtype="float64"),
        keras.layers.SimpleRNN(3, return_sequences=True, dtype="float64"),
        _inputs([2, 4, 3]),
        weight_map={2: "simple_rnn_cell/bias", 0: 0, 1: 1})
    report.assert_ok()

  def test_compare_fails_on_stop_gradient_in_recurrent_path(self):
    report = verify.compare(
        CutRecurrenceCell(4),
        keras.layers.SimpleRNN(4, return_sequences=True),
        _inputs([2, 6, 3], "float32"))
    self.assertFalse(report.ok)
    failing = _failing(report)
    # Forward values are right; gradients through time are not.
    self.assertNotIn("outputs", failing)
    self.assertNotIn("loss", failing)
    self.assertTrue(any(n.endswith("recurrent_kernel") for n in failing),
                    failing)
    self.assertIn("grad inputs", failing)
    with self.assertRaisesRegex(AssertionError,
                                r"rows fail(.|\n)*recurrent_kernel"):
      report.assert_ok()

  def test_compare_fails_naming_the_weight_that_was_not_copied(self):
    cell = keras.layers.SimpleRNNCell(4, dtype="float64")
    control = keras.layers.SimpleRNN(4, return_sequences=True,
                                     dtype="float64")
    x = _inputs([2, 5, 3])
    verify.compare(cell, control, x)  # Builds both and copies all weights.
    control.cell.recurrent_kernel.assign(
        control.cell.recurrent_kernel * 1.5)  # This one is now not a copy.
    report = verify.compare(cell, control, x, copy_weights=False)
    failing = _failing(report)
    self.assertIn(f"weight {cell.recurrent_kernel.path}", failing)
    self.assertNotIn(f"weight {cell.kernel.path}", failing)
    self.assertNotIn(f"weight {cell.bias.path}", failing)
    self.assertIn("outputs", failing)

  def test_compare_fails_on_keras_stateful_two_chunk_run(self):
    x = _inputs([2, 6, 4], "float32")
    cell = keras.layers.SimpleRNNCell(4)
    report = verify.compare(cell, TwoChunkStatefulRNN(4), x)
    failing = _failing(report)
    # Seed case 1: identical outputs and loss, but the gradients are cut.
    self.assertNotIn("outputs", failing)
    self.assertNotIn("loss", failing)
    name = f"grad {cell.recurrent_kernel.path}"
    self.assertIn(name, failing)
    self.assertLess(report.row(name).cosine, 0.999)

  def test_compare_raises_on_unmappable_weights(self):
    with self.assertRaisesRegex(
        ValueError, r"step variable 0 'gru_cell(_\d+)?/kernel' has shape "
        r"\(3, 12\) but control variable '.*kernel' has shape \(3, 4\)"):
      verify.compare(keras.layers.GRUCell(4),
                     keras.layers.SimpleRNN(4, return_sequences=True),
                     _inputs([2, 4, 3], "float32"))

  def test_compare_raises_on_variable_count_mismatch(self):
    control = keras.Sequential([
        keras.layers.Dense(3),
        keras.layers.SimpleRNN(3, return_sequences=True)])
    with self.assertRaisesRegex(
        ValueError, r"step has 3 trainable variables and the control 5; "
        r"control variable 3 .* has no counterpart"):
      verify.compare(keras.layers.SimpleRNNCell(3), control,
                     _inputs([2, 4, 3], "float32"))

  def test_compare_raises_on_bad_weight_map(self):
    with self.assertRaisesRegex(ValueError,
                                r"leaves step variable '.*bias' unmapped"):
      verify.compare(keras.layers.SimpleRNNCell(3),
                     keras.layers.SimpleRNN(3, return_sequences=True),
                     _inputs([2, 4, 3], "float32"), weight_map={0: 0, 1: 1})

  def test_compare_raises_on_mismatched_output_shapes(self):
    with self.assertRaisesRegex(
        ValueError, r"outputs have shape \(2, 4, 3\).*control's have shape "
        r"\(2, 4, 5\)"):
      verify.compare(keras.layers.SimpleRNNCell(3),
                     keras.layers.SimpleRNN(5, return_sequences=True),
                     _inputs([2, 4, 3], "float32"))

  def test_compare_raises_on_integer_inputs(self):
    with self.assertRaisesRegex(TypeError,
                                r"inputs has dtype int32; .*floating"):
      verify.compare(keras.layers.SimpleRNNCell(3),
                     keras.layers.SimpleRNN(3, return_sequences=True),
                     tf.ones([2, 4, 3], tf.int32))

  def test_compare_raises_on_model_of_another_dtype(self):
    with self.assertRaisesRegex(ValueError,
                                r"step variable '.*kernel' has dtype float32, "
                                r"but the comparison runs in float64"):
      verify.compare(keras.layers.SimpleRNNCell(3),
                     keras.layers.SimpleRNN(3, return_sequences=True,
                                            dtype="float64"),
                     _inputs([2, 4, 3]), dtype="float64")


class ReportTest(tf.test.TestCase):

  def test_report_table_dict_and_assertion_list_every_row(self):
    report = verify.compare(
        CutRecurrenceCell(3), keras.layers.SimpleRNN(3, return_sequences=True),
        _inputs([2, 5, 3], "float32"))
    table = str(report)
    self.assertIn("FAIL", table.splitlines()[0])
    for row in report.rows:
      self.assertIn(row.name, table)
    widths = {len(line.split("  ok")[0].split("  FAIL")[0])
              for line in table.splitlines()[2:]}
    self.assertLen(widths, 1)  # Aligned columns.
    data = json.loads(json.dumps(report.to_dict()))
    self.assertFalse(data["ok"])
    self.assertLen(data["rows"], len(report.rows))
    with self.assertRaises(AssertionError) as raised:
      report.assert_ok()
    for row in report.failures:
      self.assertIn(f"  {row.name}: max |err|", str(raised.exception))

  def test_row_errors_match_numpy(self):
    row = verify_report.compare_values("x", "gradient", np.array([1.0, 2.5]),
                                 np.array([1.0, 2.0]), rtol=0.1, atol=0.0)
    self.assertAllClose([row.max_abs_error, row.max_rel_error],
                        [0.5, 0.25])
    self.assertAllClose(row.cosine, 6.0 / np.sqrt(7.25 * 5.0))
    self.assertFalse(row.ok)  # 0.5 > 0.1 * 2.0


class NumericalTest(tf.test.TestCase, parameterized.TestCase):

  @parameterized.named_parameters(("simple_rnn", "simple_rnn"),
                                  ("gru", "gru"), ("lstm", "lstm"))
  def test_numerical_matches_analytic_gradients_of_builtin_cells(self, cell):
    report = verify.numerical(_CELLS[cell][0](3, dtype="float64"),
                              _inputs([2, 4, 3]), max_coordinates=10)
    report.assert_ok()
    self.assertLess(max(r.max_rel_error for r in report.rows), 1e-7)

  def test_numerical_matches_analytic_gradients_of_nested_cell(self):
    inputs = NestedInput(feature1=_inputs([2, 3, 4]),
                         feature2=_inputs([2, 3, 2, 3], seed=1))
    report = verify.numerical(NestedCell(3, 2, 2, dtype="float64"), inputs,
                              max_coordinates=8)
    report.assert_ok()
    self.assertEqual([r.name for r in report.rows][2:],
                     ["grad inputs[0]", "grad inputs[1]"])
    self.assertTrue(report.rows[1].name.endswith("kernel_2_3"))

  def test_numerical_detects_wrong_custom_gradient(self):
    cell = keras.layers.SimpleRNNCell(3, activation=_wrong_gradient_tanh,
                                      dtype="float64")
    report = verify.numerical(cell, _inputs([2, 4, 3]), max_coordinates=8)
    failing = _failing(report)
    self.assertIn(f"grad {cell.kernel.path}", failing)
    self.assertIn("grad inputs", failing)

  def test_numerical_checks_initial_states_of_callable(self):
    report = verify.numerical(_linear_rnn(0.9), _inputs([2, 5, 1]),
                              initial_states=[_inputs([2, 1], seed=2)])
    report.assert_ok()
    self.assertEqual([r.name for r in report.rows],
                     ["grad inputs", "grad initial_states[0]"])

  def test_numerical_raises_on_float32_step(self):
    with self.assertRaisesRegex(ValueError, r"dtype float32, but the "
                                r"comparison runs in float64"):
      verify.numerical(keras.layers.GRUCell(3), _inputs([2, 4, 3]))

  def test_numerical_raises_on_integer_inputs(self):
    with self.assertRaisesRegex(TypeError, r"inputs has dtype int32"):
      verify.numerical(keras.layers.GRUCell(3, dtype="float64"),
                       tf.ones([2, 4, 3], tf.int32))


class HorizonTest(tf.test.TestCase):

  def _linear_closed_form(self, a, x, h0, t):
    """|dL_t/dh_t| for L_t = mean(h_t**2) of h' = a h + x."""
    h = h0
    for s in range(t + 1):
      h = a * h + x[:, s]
    return np.linalg.norm(2 * h / h.size)

  def test_horizon_matches_closed_form_of_scalar_linear_rnn(self):
    a, x, h0 = 0.9, _inputs([2, 8, 1]), _inputs([2, 1], seed=1)
    horizon = verify.gradient_horizon(_linear_rnn(a), x, loss_at=6,
                                      initial_states=[h0])
    g = self._linear_closed_form(a, x.numpy(), h0.numpy(), 6)
    k = np.arange(7)
    # dL/dx_{t-k} = a^k dL/dh_t; the state entering step t-k is h_{t-k-1}.
    self.assertAllClose(horizon.input_norms, a ** k * g, rtol=1e-12)
    self.assertAllClose(horizon.state_norms, a ** (k + 1) * g, rtol=1e-12)
    self.assertAllEqual(horizon.lags, k)

  def test_horizon_matches_brute_force_per_step_tape(self):
    cell = keras.layers.GRUCell(3, dtype="float64")
    x = _inputs([2, 6, 4])
    horizon = verify.gradient_horizon(cell, x)
    states = [tf.zeros([2, 3], tf.float64)]
    entering = []
    with tf.GradientTape() as tape:
      tape.watch(x)
      for t in range(6):  # A Python loop: every entering state is a tensor.
        tape.watch(states)
        entering.append(states[0])
        y, states = cell(x[:, t], states)
      loss = tf.reduce_mean(tf.square(y))
    dx, ds = tape.gradient(loss, [x, entering])
    expected_x = np.linalg.norm(dx.numpy(), axis=(0, 2))[::-1]
    expected_s = np.array([np.linalg.norm(g) for g in ds])[::-1]
    self.assertAllClose(horizon.input_norms, expected_x, rtol=1e-10)
    self.assertAllClose(horizon.state_norms, expected_s, rtol=1e-10)

  def test_horizon_truncation_is_zero_beyond_the_window(self):
    a, x, h0 = 0.9, _inputs([2, 8, 1]), _inputs([2, 1], seed=1)
    horizon = verify.gradient_horizon(_linear_rnn(a), x, window=3,
                                      initial_states=[h0])
    self.assertEqual(horizon.boundaries, [3, 6])
    # Loss at step 7: its chunk is steps 6, 7 (lags 0, 1).
    self.assertAllClose(horizon.truncated_input_norms[:2],
                        horizon.input_norms[:2], rtol=1e-12)
    self.assertAllEqual(horizon.truncated_input_norms[2:], np.zeros(6))
    # The gradient reaching boundary 6 (lag 1) is what truncation drops.
    self.assertAllClose(horizon.truncated_state_norms[:2],
                        horizon.state_norms[:2], rtol=1e-12)
    self.assertAllEqual(horizon.truncated_state_norms[2:], np.zeros(6))
    self.assertTrue(np.isnan(horizon.lost_share[3]))  # No weights.

  def test_horizon_lost_share_matches_two_runs_with_a_cut(self):
    cell = LinearCell(0.8, dtype="float64")
    x, b = _inputs([2, 7, 1]), 4
    horizon = verify.gradient_horizon(cell, x, window=b)
    self.assertEqual(horizon.boundaries, [4])

    def weight_grad(cut):
      with tf.GradientTape() as tape:
        y1, s1 = stepper.model_rnn(cell, x[:, :b])
        s1 = tf.nest.map_structure(tf.stop_gradient, s1) if cut else s1
        y2, _ = stepper.model_rnn(cell, x[:, b:], s1)
        loss = tf.reduce_mean(tf.square(y2[:, -1]))
      return tape.gradient(loss, cell.a).numpy()

    full, cut = weight_grad(False), weight_grad(True)
    self.assertAllClose(horizon.lost_share[4], abs(full - cut) / abs(full),
                        rtol=1e-10)
    self.assertGreater(horizon.lost_share[4], 0.01)

  def test_horizon_reports_per_layer_flow_of_a_stack(self):
    deep = stepper.stack([keras.layers.SimpleRNNCell(3, dtype="float64"),
                          keras.layers.LSTMCell(2, dtype="float64")])
    horizon = verify.gradient_horizon(deep, _inputs([2, 5, 3]))
    self.assertEqual(horizon.state_norms_by_entry.shape, (2, 5))
    self.assertAllClose(
        np.sqrt(np.sum(horizon.state_norms_by_entry ** 2, axis=0)),
        horizon.state_norms, rtol=1e-12)
    # Vertical flow: the bottom layer's state gets gradient at lag 0 through
    # the top layer at the same step.
    self.assertGreater(horizon.state_norms_by_entry[0, 0], 0)
    json.dumps(horizon.to_dict())

  def test_horizon_raises_on_bad_arguments(self):
    x = _inputs([2, 4, 1])
    with self.assertRaisesRegex(ValueError, r"`loss_at` must be an int step "
                                r"in \[-4, 4\) .* got 4"):
      verify.gradient_horizon(_linear_rnn(0.5), x, loss_at=4,
                              initial_states=[tf.zeros([2, 1], tf.float64)])
    with self.assertRaisesRegex(ValueError, r"`window` must be a positive "
                                r"integer, got 0"):
      verify.gradient_horizon(_linear_rnn(0.5), x, window=0,
                              initial_states=[tf.zeros([2, 1], tf.float64)])


class CommandLineTest(tf.test.TestCase):

  def _run(self, *args):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    return subprocess.run([sys.executable, "-m", "stepper.verify", *args],
                          capture_output=True, text=True, env=env,
                          timeout=120, check=False)

  @pytest.mark.slow
  def test_command_line_prints_passing_report(self):
    result = self._run("--cell=lstm", "--units=3", "--time=4",
                       "--dtype=float64")
    self.assertEqual(result.returncode, 0, result.stderr)
    self.assertIn("PASS", result.stdout)
    self.assertIn("grad lstm_cell/recurrent_kernel", result.stdout)

  @pytest.mark.slow
  def test_command_line_exits_nonzero_on_bad_flag(self):
    result = self._run("--cell=transformer")
    self.assertNotEqual(result.returncode, 0)
    self.assertIn("transformer", result.stderr)


if __name__ == "__main__":
  tf.test.main()
