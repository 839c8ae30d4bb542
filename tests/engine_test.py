"""Tests for `stepper.model_rnn` against Keras built-ins, numpy and finite differences."""

import itertools

from absl.testing import parameterized
import keras
import numpy as np
import tensorflow as tf

from _cells import NestedCell, NestedInput, NestedState
import _cells
import stepper
from stepper import testing

BATCH, TIME, FEATURES, UNITS = 3, 5, 4, 6
# Central differences in float64 with step 1e-6: truncation error ~1e-12 and
# round-off ~1e-16 / 1e-6 = 1e-10, hence these bounds (not 1e-10 relative).
_DELTA = 1e-6
_FD_TOL = dict(rtol=1e-7, atol=1e-9)

_CELLS = {
    "simple_rnn": lambda units, **kw: keras.layers.SimpleRNNCell(units, **kw),
    "gru": lambda units, **kw: keras.layers.GRUCell(units, **kw),
    "gru_v1": lambda units, **kw: keras.layers.GRUCell(
        units, reset_after=False, **kw),
    "lstm": lambda units, **kw: keras.layers.LSTMCell(units, **kw),
}
_LAYERS = {
    "simple_rnn": keras.layers.SimpleRNN,
    "gru": keras.layers.GRU,
    "gru_v1": lambda units, **kw: keras.layers.GRU(
        units, reset_after=False, **kw),
    "lstm": keras.layers.LSTM,
}


def _make_step(kind, cell, features, dtype):
  """The same cell as each of the three step kinds."""
  if kind == "cell":
    return cell
  if kind == "model":
    return _cells.step_model(cell, features, dtype)
  return lambda x_t, states: cell(x_t, states)


class _Case:
  """A Keras layer and an independent cell with copied weights."""

  def __init__(self, name, dtype, units=UNITS, features=FEATURES, seed=0,
               **layer_kwargs):
    keras.utils.set_random_seed(seed)
    self.layer = _LAYERS[name](units, return_sequences=True,
                               return_state=True, dtype=dtype, **layer_kwargs)
    self.cell = _CELLS[name](units, dtype=dtype)
    rng = np.random.default_rng(seed)
    self.x = tf.constant(rng.normal(size=(BATCH, TIME, features)), dtype)
    self.h0 = [tf.constant(rng.normal(size=(BATCH, units)), dtype)
               for _ in tf.nest.flatten(self.cell.state_size)]
    self.layer(self.x)
    self.cell.build((None, features))
    self.cell.set_weights(self.layer.get_weights())
    self.features = features

  def keras_run(self, go_backwards=False):
    """Outputs, final states, and gradients of the mean-square loss."""
    with tf.GradientTape() as tape:
      tape.watch([self.x, self.h0])
      out = self.layer(self.x, initial_state=list(self.h0))
      outputs, states = out[0], out[1:]
      if go_backwards:  # Keras returns a reversed run's outputs reversed.
        outputs = tf.reverse(outputs, [1])
      loss = _loss(outputs, states)
    grads = tape.gradient(loss, [self.layer.trainable_variables, self.x,
                                 self.h0])
    return outputs, states, loss, grads

  def stepper_run(self, kind, **kwargs):
    step = _make_step(kind, self.cell, self.features, self.x.dtype)
    time_major = kwargs.get("time_major", False)
    x = tf.transpose(self.x, [1, 0, 2]) if time_major else self.x
    with tf.GradientTape() as tape:
      tape.watch([x, self.h0])
      outputs, states = stepper.model_rnn(step, x, list(self.h0), **kwargs)
      if time_major:
        outputs = tf.transpose(outputs, [1, 0, 2])
      loss = _loss(outputs, states)
    grads = tape.gradient(loss, [self.cell.trainable_variables, x, self.h0])
    if time_major:
      grads[1] = tf.transpose(grads[1], [1, 0, 2])
    return outputs, states, loss, grads


def _loss(outputs, states):
  """Depends on every output and final state, with unequal weights."""
  w = tf.cast(tf.range(1, outputs.shape[1] + 1), outputs.dtype)[None, :, None]
  return (tf.reduce_mean(w * outputs ** 2) +
          sum(tf.reduce_sum(tf.sin(s)) for s in states))


def _tol(dtype):
  # float32: the two loops sum in different orders; 1e-5 relative with a
  # small absolute floor for entries that are ~0.
  return dict(rtol=1e-10, atol=1e-12) if dtype == "float64" else dict(
      rtol=1e-5, atol=1e-6)


class MatchesKerasTest(tf.test.TestCase, parameterized.TestCase):

  @parameterized.named_parameters(
      (f"{layer}_{kind}_{dtype}", layer, kind, dtype)
      for layer, kind, dtype in itertools.product(
          _CELLS, ("model", "cell", "callable"), ("float32", "float64")))
  def test_outputs_states_and_gradients_match_keras_layer(
      self, layer, kind, dtype):
    case = _Case(layer, dtype)
    expected = case.keras_run()
    actual = case.stepper_run(kind)
    testing.assert_nests_close(actual, expected, **_tol(dtype))

  @parameterized.named_parameters(
      (f"{layer}_{kind}_{opt}", layer, kind, opt)
      for layer, kind, opt in itertools.product(
          ("gru", "lstm"), ("model", "cell", "callable"),
          ("reverse", "unroll3", "time_major", "reverse_unroll3")))
  def test_options_match_keras_layer(self, layer, kind, opt):
    dtype = "float64"
    reverse = "reverse" in opt
    case = _Case(layer, dtype, go_backwards=reverse)
    kwargs = dict(reverse=reverse, unroll=3 if "unroll3" in opt else 1,
                  time_major=opt == "time_major")
    testing.assert_nests_close(case.stepper_run(kind, **kwargs),
                               case.keras_run(go_backwards=reverse),
                               **_tol(dtype))

  def test_simple_rnn_float32_matches_keras_under_xla(self):
    case = _Case("simple_rnn", "float32")
    expected = case.keras_run()
    run = tf.function(lambda: case.stepper_run("model"), jit_compile=True)
    # XLA fuses and reorders the float32 sums: a normwise bound (see
    # `assert_nests_close`), not an elementwise one with an absolute floor
    # that held on one CPU and failed on another.
    testing.assert_nests_close(run(), expected, rtol=1e-5, normwise=True)


class SeedCasesTest(tf.test.TestCase):
  """Seed 003: a control model vs a step model through the engine."""

  def setUp(self):
    super().setUp()
    keras.utils.set_random_seed(1)
    x0 = np.random.default_rng(1).normal(size=(2, 3, 4))
    self.x = tf.constant(np.concatenate([x0, x0], axis=1), tf.float32)
    self.control = keras.layers.SimpleRNN(4, return_sequences=True)
    self.control(self.x)

  def _control(self):
    """Case 0: the whole sequence through one Keras layer."""
    with tf.GradientTape() as tape:
      outs = self.control(self.x)
      loss = keras.losses.MeanSquaredError()(self.x, outs)
    return outs, loss, tape.gradient(loss, self.control.trainable_variables)

  def test_case3_step_model_through_engine_matches_control(self):
    cell = keras.layers.SimpleRNNCell(4)
    model = _cells.step_model(cell, 4, "float32")
    cell.set_weights(self.control.get_weights())
    with tf.GradientTape() as tape:
      outs, _ = stepper.model_rnn(model, self.x, training=True)
      loss = keras.losses.MeanSquaredError()(self.x, outs)
    actual = outs, loss, tape.gradient(loss, cell.trainable_variables)
    testing.assert_nests_close(actual, self._control(), rtol=1e-5, atol=1e-7)

  def test_case1_keras_stateful_two_halves_loses_the_gradient(self):
    """The motivating bug: same outputs and loss, different gradients."""
    stateful = keras.layers.SimpleRNN(4, return_sequences=True, stateful=True)
    stateful(self.x[:, :3])
    stateful.set_weights(self.control.get_weights())
    stateful.reset_states()
    with tf.GradientTape() as tape:
      outs = tf.concat([stateful(self.x[:, :3]), stateful(self.x[:, 3:])], 1)
      loss = keras.losses.MeanSquaredError()(self.x, outs)
    grads = tape.gradient(loss, stateful.trainable_variables)
    control_outs, control_loss, control_grads = self._control()
    testing.assert_nests_close((outs, loss), (control_outs, control_loss),
                               rtol=1e-5, atol=1e-7)
    recurrent = 1  # kernel, recurrent_kernel, bias
    with self.assertRaisesRegex(AssertionError, "not close"):
      testing.assert_nests_close(grads[recurrent], control_grads[recurrent],
                                 rtol=1e-3)


class NestedCellTest(tf.test.TestCase):

  def setUp(self):
    super().setUp()
    keras.utils.set_random_seed(2)
    rng = np.random.default_rng(2)
    self.cell = NestedCell(3, 2, 2, dtype="float64")
    self.inputs = NestedInput(
        feature1=tf.constant(rng.normal(size=(2, 4, 5))),
        feature2=tf.constant(rng.normal(size=(2, 4, 3, 2))))
    self.cell.build(NestedInput((None, 5), (None, 3, 2)))

  def _numpy(self):
    k1, k23 = (v.numpy() for v in (self.cell.kernel_1, self.cell.kernel_2_3))
    s1, s2 = np.zeros((2, 3)), np.zeros((2, 2, 2))
    out1, out23 = [], []
    for t in range(4):
      o1 = np.tanh(self.inputs.feature1[:, t].numpy() @ k1 + 0.5 * s1)
      o23 = np.einsum("bij,ijkl->bkl", self.inputs.feature2[:, t].numpy(), k23)
      s1, s2 = o1, s2 + o23
      out1.append(o1)
      out23.append(o23)
    return (np.stack(out1, 1), np.stack(out23, 1)), NestedState(s1, s2)

  def test_nested_cell_matches_numpy_loop(self):
    outputs, states = stepper.model_rnn(self.cell, self.inputs)
    self.assertIsInstance(states, NestedState)
    testing.assert_nests_close((outputs, states), self._numpy())

  def test_nested_cell_gradients_match_finite_differences(self):
    def loss(f1, f2):
      outputs, states = stepper.model_rnn(self.cell, NestedInput(f1, f2))
      return (tf.reduce_sum(outputs[0] ** 2) + tf.reduce_sum(outputs[1]) +
              tf.reduce_sum(tf.sin(states.state2)))

    theoretical, numerical = tf.test.compute_gradient(
        loss, list(self.inputs), delta=_DELTA)
    for t, n in zip(theoretical, numerical):
      self.assertAllClose(t, n, **_FD_TOL)


class FiniteDifferenceTest(tf.test.TestCase):

  def setUp(self):
    super().setUp()
    keras.utils.set_random_seed(3)
    self.cell = keras.layers.LSTMCell(3, dtype="float64")
    self.cell.build((None, 2))
    rng = np.random.default_rng(3)
    self.x = tf.constant(rng.normal(size=(2, 4, 2)))
    self.h0 = [tf.constant(rng.normal(size=(2, 3))) for _ in range(2)]

  def _loss(self, x, h, c):
    outputs, states = stepper.model_rnn(self.cell, x, [h, c])
    return tf.reduce_sum(outputs ** 2) + tf.reduce_sum(states[1])

  def test_input_and_state_gradients_match_finite_differences(self):
    theoretical, numerical = tf.test.compute_gradient(
        self._loss, [self.x, *self.h0], delta=_DELTA)
    for t, n in zip(theoretical, numerical):
      self.assertAllClose(t, n, **_FD_TOL)

  def test_weight_gradient_matches_finite_differences(self):
    kernel = self.cell.recurrent_kernel
    with tf.GradientTape() as tape:
      loss = self._loss(self.x, *self.h0)
    analytic = tape.gradient(loss, kernel)

    def loss_at(values):  # Finite differences perturb the variable's value.
      kernel.assign(values)
      return self._loss(self.x, *self.h0)

    _, numerical = tf.test.compute_gradient(
        loss_at, [tf.identity(kernel)], delta=_DELTA)
    self.assertAllClose(tf.reshape(analytic, [1, -1]), numerical[0], **_FD_TOL)


class ShapesAndModesTest(tf.test.TestCase, parameterized.TestCase):

  def setUp(self):
    super().setUp()
    keras.utils.set_random_seed(4)
    self.cell = keras.layers.GRUCell(UNITS)
    self.x = tf.random.normal([BATCH, TIME, FEATURES])

  def test_time_zero_returns_empty_outputs_and_initial_states(self):
    h0 = [tf.random.normal([BATCH, UNITS])]
    outputs, states = stepper.model_rnn(self.cell, self.x[:, :0], h0)
    self.assertEqual(outputs.shape, (BATCH, 0, UNITS))
    self.assertAllEqual(states[0], h0[0])
    last, _ = stepper.model_rnn(self.cell, self.x[:, :0], h0,
                                return_sequences=False)
    self.assertAllEqual(last, tf.zeros([BATCH, UNITS]))

  def test_time_zero_under_xla(self):
    run = tf.function(lambda x: stepper.model_rnn(self.cell, x),
                      jit_compile=True)
    outputs, states = run(self.x[:, :0])
    self.assertEqual(outputs.shape, (BATCH, 0, UNITS))
    self.assertAllEqual(states[0], tf.zeros([BATCH, UNITS]))

  def test_run_time_sequence_length_under_xla_matches_eager(self):
    """XLA sizes no buffer by `max(sequence_length)`, a run-time value."""
    cell = keras.layers.GRUCell(UNITS, dtype="float64")
    x = tf.cast(self.x, tf.float64)

    def run(x, lengths):
      with tf.GradientTape() as tape:
        tape.watch(x)
        outputs, states = stepper.model_rnn(cell, x, sequence_length=lengths)
        loss = tf.reduce_sum(outputs ** 2) + tf.reduce_sum(states[0])
      return outputs, states, tape.gradient(
          loss, [x, cell.trainable_variables])

    lengths = tf.constant([2, TIME, 0])
    testing.assert_nests_close(
        tf.function(run, jit_compile=True)(x, lengths), run(x, lengths),
        rtol=1e-10, atol=1e-12)

  def test_time_zero_with_unknown_time_inside_function(self):
    run = tf.function(lambda x: stepper.model_rnn(self.cell, x)[0],
                      input_signature=[tf.TensorSpec([None, None, FEATURES])])
    self.assertEqual(run(self.x[:, :0]).shape, (BATCH, 0, UNITS))
    self.assertEqual(run(self.x[:, :1]).shape, (BATCH, 1, UNITS))

  @parameterized.parameters(1, 2, 3, 5, 7)
  def test_unroll_matches_no_unroll_for_any_time(self, unroll):
    expected = stepper.model_rnn(self.cell, self.x)
    testing.assert_nests_close(
        stepper.model_rnn(self.cell, self.x, unroll=unroll), expected)

  def test_return_sequences_false_is_last_output(self):
    outputs, _ = stepper.model_rnn(self.cell, self.x)
    last, _ = stepper.model_rnn(self.cell, self.x, return_sequences=False)
    self.assertAllClose(last, outputs[:, -1])
    first, _ = stepper.model_rnn(self.cell, self.x, return_sequences=False,
                                 reverse=True)
    self.assertAllClose(first, stepper.model_rnn(
        self.cell, self.x, reverse=True)[0][:, 0])

  @parameterized.parameters(False, True)
  def test_return_all_states_is_the_state_trajectory(self, reverse):
    cell = keras.layers.LSTMCell(UNITS)
    outputs, final, trajectory = stepper.model_rnn(
        cell, self.x, return_all_states=True, reverse=reverse)
    self.assertLen(trajectory, 2)
    self.assertAllClose(trajectory[0], outputs)  # LSTM: h is the output.
    self.assertAllClose(trajectory[1][:, 0 if reverse else -1], final[1])

  @parameterized.named_parameters(*testing.MODES)
  def test_gradients_exist_for_weights_inputs_and_states(self, mode):
    h0 = [tf.random.normal([BATCH, UNITS])]

    def run(x, h0):
      with tf.GradientTape() as tape:
        tape.watch([x, h0])
        outputs, _ = stepper.model_rnn(self.cell, x, h0)
        loss = tf.reduce_sum(outputs)
      return tape.gradient(loss, [self.cell.trainable_variables, x, h0])

    grads = testing.in_mode(run, mode)(self.x, h0)
    for g in tf.nest.flatten(grads):
      self.assertIsNotNone(g)
      self.assertGreater(float(tf.reduce_sum(tf.abs(g))), 0.0)
    testing.assert_nests_close(grads, run(self.x, h0), rtol=1e-5, atol=1e-6)

  def test_traces_once_for_any_batch_and_time(self):
    traces = []

    @tf.function(input_signature=[tf.TensorSpec([None, None, FEATURES])])
    def run(x):
      traces.append(1)
      return stepper.model_rnn(self.cell, x)[0]

    for batch, time in [(1, 1), (3, 7), (2, 0), (5, 11)]:
      self.assertEqual(run(tf.zeros([batch, time, FEATURES])).shape,
                       (batch, time, UNITS))
    self.assertLen(traces, 1)

  def test_training_flag_reaches_the_step(self):
    x = keras.Input((FEATURES,))
    h = keras.Input((UNITS,))
    y, new_h = keras.layers.SimpleRNNCell(UNITS)(
        keras.layers.Dropout(0.5)(x), [h])
    model = keras.Model([x, h], [y, new_h[0]])
    eval_a, _ = stepper.model_rnn(model, self.x, training=False)
    eval_b, _ = stepper.model_rnn(model, self.x, training=False)
    train, _ = stepper.model_rnn(model, self.x, training=True)
    self.assertAllEqual(eval_a, eval_b)
    self.assertNotAllClose(train, eval_a)

  def test_symbolic_training_never_reaches_the_step(self):
    # Steps branch on `training` in Python (Keras cells: `if training and
    # self.dropout`); a bool tensor unknown while tracing must pick one of
    # two runs, each with a Python bool, and the gradient must flow.
    seen = set()

    def step(x_t, states, training):
      seen.add(type(training))
      scale = 2.0 if training else 1.0  # Raises for a symbolic tensor.
      h = tf.tanh(scale * tf.reduce_sum(x_t, -1, keepdims=True) + states[0])
      return h, [h]

    cell = keras.layers.GRUCell(UNITS, dropout=0.5)
    h0 = [tf.zeros([BATCH, UNITS])]

    def outputs_and_grad(training):
      with tf.GradientTape() as tape:
        tape.watch(self.x)
        y, _ = stepper.model_rnn(step, self.x, h0, training=training)
      return y, tape.gradient(tf.reduce_sum(y), self.x)

    @tf.function(input_signature=[tf.TensorSpec([], tf.bool)])
    def run(training):
      dropped, _ = stepper.model_rnn(cell, self.x, training=training)
      return outputs_and_grad(training), dropped

    for flag in (True, False):
      (y, grad), dropped = run(tf.constant(flag))
      testing.assert_nests_close([y, grad], list(outputs_and_grad(flag)),
                                 rtol=1e-6)
      if not flag:  # Inference: no dropout, the cell's own numbers.
        self.assertAllClose(dropped, stepper.model_rnn(cell, self.x)[0],
                            rtol=1e-6)
    # None: the abstract trace of the output's spec.
    self.assertEqual(seen, {bool, type(None)})

  def test_nested_inputs_and_callable_step(self):
    def step(x_t, states):
      h = tf.tanh(x_t["a"] + 2.0 * x_t["b"] + states[0])
      return {"h": h, "twice": 2.0 * h}, [h]

    inputs = {"a": tf.random.normal([2, 4, 3]), "b": tf.random.normal([2, 4, 3])}
    outputs, states = stepper.model_rnn(step, inputs, [tf.zeros([2, 3])])
    h = np.zeros((2, 3))
    for t in range(4):
      h = np.tanh(inputs["a"][:, t] + 2 * inputs["b"][:, t] + h)
      self.assertAllClose(outputs["h"][:, t], h)
    self.assertAllClose(outputs["twice"], 2 * outputs["h"])
    self.assertAllClose(states[0], h)

  def test_parallel_iterations_and_swap_memory_are_accepted(self):
    expected = stepper.model_rnn(self.cell, self.x)
    testing.assert_nests_close(stepper.model_rnn(
        self.cell, self.x, parallel_iterations=1, swap_memory=True), expected)


class BadInputTest(tf.test.TestCase, parameterized.TestCase):
  """Each bad input raises a clear error, eagerly and inside tf.function."""

  def setUp(self):
    super().setUp()
    cell = keras.layers.SimpleRNNCell(4)
    self.model = _cells.step_model(cell, 3, "float32")
    self.x = tf.zeros([2, 5, 3])

  def _check(self, mode, error, regex, fn):
    with self.assertRaisesRegex(error, regex):
      testing.in_mode(fn, mode)()

  @parameterized.named_parameters(*testing.MODES[:2])
  def test_raises_on_rank_2_inputs(self, mode):
    self._check(mode, ValueError, r"inputs has shape \(2, 5\).*rank >= 3",
                lambda: stepper.model_rnn(self.model, tf.zeros([2, 5])))

  @parameterized.named_parameters(*testing.MODES[:2])
  def test_raises_on_batch_mismatch_across_inputs(self, mode):
    step = lambda x, s: (x["a"], s)
    self._check(mode, ValueError, r"batch size of inputs\['b'\] is 3.*2",
                lambda: stepper.model_rnn(
                    step, {"a": tf.zeros([2, 5, 3]), "b": tf.zeros([3, 5, 3])},
                    [tf.zeros([2, 3])]))

  @parameterized.named_parameters(*testing.MODES[:2])
  def test_raises_on_batch_mismatch_with_initial_states(self, mode):
    self._check(mode, ValueError, r"batch size of initial_states\[0\] is 4",
                lambda: stepper.model_rnn(self.model, self.x,
                                          [tf.zeros([4, 4])]))

  @parameterized.named_parameters(*testing.MODES[:2])
  def test_raises_on_wrong_number_of_states(self, mode):
    self._check(mode, ValueError, r"2 state\(s\).*expects 1",
                lambda: stepper.model_rnn(self.model, self.x,
                                          [tf.zeros([2, 4])] * 2))

  @parameterized.named_parameters(*testing.MODES[:2])
  def test_raises_on_state_shape_mismatch(self, mode):
    self._check(
        mode, ValueError,
        r"initial_states\[0\] has shape \(2, 8\) but the step's state input "
        r"0 expects \(None, 4\)",
        lambda: stepper.model_rnn(self.model, self.x, [tf.zeros([2, 8])]))

  @parameterized.named_parameters(*testing.MODES[:2])
  def test_raises_on_state_dtype_mismatch(self, mode):
    self._check(mode, TypeError, r"initial_states\[0\] has dtype float64",
                lambda: stepper.model_rnn(
                    self.model, self.x, [tf.zeros([2, 4], tf.float64)]))

  @parameterized.named_parameters(*testing.MODES[:2])
  def test_raises_on_integer_inputs(self, mode):
    self._check(mode, TypeError, r"inputs has dtype int32.*floating",
                lambda: stepper.model_rnn(self.model,
                                          tf.zeros([2, 5, 3], tf.int32)))

  @parameterized.named_parameters(*testing.MODES[:2])
  def test_raises_on_wrong_feature_size(self, mode):
    self._check(mode, ValueError, r"per-step shape \(2, 7\).*\(None, 3\)",
                lambda: stepper.model_rnn(self.model, tf.zeros([2, 5, 7])))

  @parameterized.named_parameters(*testing.MODES[:2])
  def test_raises_on_state_that_changes_shape(self, mode):
    step = lambda x, s: (x, [tf.concat([s[0], x], -1)])
    self._check(mode, ValueError,
                r"changes state\[0\] from shape \(2, 3\).*\(2, 6\)",
                lambda: stepper.model_rnn(step, self.x, [tf.zeros([2, 3])]))

  def test_raises_on_model_whose_outputs_are_not_y_and_states(self):
    x, h = keras.Input((3,)), keras.Input((4,))
    y, new_h = keras.layers.SimpleRNNCell(4)(x, [h])
    bad = keras.Model([x, h], [y])
    with self.assertRaisesRegex(ValueError, r"1 state input\(s\) but 1 output"):
      stepper.model_rnn(bad, self.x)
    wrong = keras.Model([x, h], [y, keras.layers.Dense(5)(new_h[0])])
    with self.assertRaisesRegex(ValueError, r"output 1 \(new state 0\) has "
                                r"shape \(None, 5\)"):
      stepper.model_rnn(wrong, self.x)

  def test_raises_on_callable_without_initial_states(self):
    with self.assertRaisesRegex(ValueError, "Pass `initial_states`"):
      stepper.model_rnn(lambda x, s: (x, s), self.x)

  @parameterized.parameters(0, -1, 1.5, True)
  def test_raises_on_bad_unroll(self, unroll):
    with self.assertRaisesRegex(ValueError, "`unroll` must be a positive"):
      stepper.model_rnn(self.model, self.x, unroll=unroll)

  def test_raises_on_non_step(self):
    with self.assertRaisesRegex(TypeError, "`step` must be"):
      stepper.model_rnn(42, self.x)


if __name__ == "__main__":
  tf.test.main()
