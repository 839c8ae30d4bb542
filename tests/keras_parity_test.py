"""Keras' own RNN tests, run on `stepper.StepRNN` and `stepper.Bidirectional`.

The golden numbers come from the tests shipped in the keras wheel
(`keras/src/layers/rnn/{rnn,gru,lstm,simple_rnn,stacked_rnn_cells,
bidirectional}_test.py`): each case builds the layer Keras' test builds,
with `StepRNN(cell, return_sequences=False)` in place of
`keras.layers.RNN(cell)` / `GRU` / `LSTM` / `SimpleRNN`, and checks the same
numbers at Keras' tolerance (1e-5). Keras' generic layer harness
(`run_layer_test`: serialization, symbolic call, masking support, weight
counts, a `fit`, mixed precision) runs on both layers too.
"""

from absl.testing import parameterized
import keras
import numpy as np
import tensorflow as tf

import stepper

from keras.src import testing as keras_testing


class OneStateCell(keras.layers.Layer):
  """`h' = x W + h U`, all-ones weights (Keras' `OneStateRNNCell`)."""

  def __init__(self, units, listed=False, **kwargs):
    super().__init__(**kwargs)
    self.units = units
    self.listed = listed  # Declare the state size as a list, `[units]`.
    self.state_size = [units] if listed else units

  def build(self, input_shape):
    self.w = self.add_weight((input_shape[-1], self.units), "ones", name="w")
    self.u = self.add_weight((self.units, self.units), "ones", name="u")

  def call(self, x, states):
    h = x @ self.w + states[0] @ self.u
    return h, [h]

  def get_config(self):
    return dict(super().get_config(), units=self.units, listed=self.listed)


class TwoStatesCell(keras.layers.Layer):
  """Two states, both `x W + h1 U_i`; output their sum (Keras'
  `TwoStatesRNNCell`, which reads its first state twice)."""

  def __init__(self, units, **kwargs):
    super().__init__(**kwargs)
    self.units = self.output_size = units
    self.state_size = [units, units]

  def build(self, input_shape):
    self.w = self.add_weight((input_shape[-1], self.units), "ones", name="w")
    self.u = [self.add_weight((self.units, self.units), "ones", name=f"u{i}")
              for i in range(2)]

  def call(self, x, states):
    new = [x @ self.w + states[0] @ u for u in self.u]
    return new[0] + new[1], new

  def get_config(self):
    return dict(super().get_config(), units=self.units)


def _constant_cell(kind, units, kernel=0.01, recurrent=0.02, bias=0.03):
  """The cells of Keras' GRU/LSTM/SimpleRNN tests: constant initializers."""
  init = keras.initializers.Constant
  return kind(units, kernel_initializer=init(kernel),
              recurrent_initializer=init(recurrent),
              bias_initializer=init(bias))


def _arange(*shape):
  return np.arange(np.prod(shape)).reshape(shape).astype("float32")


def _rows(*values, width):
  """`[[v0] * width, [v1] * width, ...]`: Keras' cells give equal units."""
  return np.array([[v] * width for v in values], "float32")


def _shapes(nest):
  """Tensors or shape tuples, nested in lists/tuples -> lists of tuples."""
  if hasattr(nest, "shape"):
    return tuple(nest.shape)
  if all(isinstance(d, (int, type(None))) for d in nest):
    return tuple(nest)
  return [_shapes(n) for n in nest]


_GRU, _LSTM, _SIMPLE = (keras.layers.GRUCell, keras.layers.LSTMCell,
                        keras.layers.SimpleRNNCell)
_MASK = np.array([[True, True, False, True], [True, False, False, True]])


class KerasGoldenNumbersTest(tf.test.TestCase, parameterized.TestCase):

  @parameterized.named_parameters(
      # rnn_test.py: all-ones cells on ones((1, 2, 3)).
      ("one_state_last", lambda: OneStateCell(2), {}, _rows(9, width=2)),
      ("one_state_sequences", lambda: OneStateCell(2),
       dict(return_sequences=True), np.array([[[3, 3], [9, 9]]], "float32")),
      ("two_states_last", lambda: TwoStatesCell(2), {}, _rows(18, width=2)),
      ("two_states_sequences", lambda: TwoStatesCell(2),
       dict(return_sequences=True), np.array([[[6, 6], [18, 18]]],
                                             "float32")))
  def test_forward_pass(self, make_cell, kwargs, expected):
    kwargs.setdefault("return_sequences", False)
    layer = stepper.StepRNN(make_cell(), return_state=True, **kwargs)
    output, *states = layer(np.ones((1, 2, 3), "float32"))
    self.assertAllClose(output, expected)
    for state in states:  # Each state is 9 after two steps.
      self.assertAllClose(state, _rows(9, width=2))

  @parameterized.named_parameters(
      ("gru", _GRU, 3, {}, [0.5217289, 0.6371659, 0.39384964]),
      ("gru_backwards", _GRU, 3, dict(go_backwards=True),
       [0.24406259, 0.611516, 0.3928808]),
      ("gru_unrolled", _GRU, 3, dict(unroll=True),
       [0.5217289, 0.6371659, 0.39384964]),
      ("lstm", _LSTM, 3, {}, [0.6288687, 0.86899155, 0.9460773]))
  def test_correctness(self, kind, units, kwargs, expected):
    layer = stepper.StepRNN(_constant_cell(kind, units),
                            return_sequences=False, **kwargs)
    self.assertAllClose(layer(_arange(3, 6, 4)), _rows(*expected, width=3),
                        atol=1e-5, rtol=1e-5)

  def test_simple_rnn_correctness(self):
    layer = stepper.StepRNN(_constant_cell(_SIMPLE, 4), return_sequences=False)
    self.assertAllClose(layer(_arange(2, 3, 4)),
                        _rows(0.405432, 0.73605347, width=4),
                        atol=1e-5, rtol=1e-5)

  @parameterized.named_parameters(
      ("one_state", lambda: OneStateCell(2), np.ones((1, 2, 3), "float32"),
       _rows(45, width=2)),
      ("two_states", lambda: TwoStatesCell(2), np.ones((1, 2, 3), "float32"),
       _rows(90, width=2)),
      ("gru", lambda: _constant_cell(_GRU, 4), _arange(2, 3, 4),
       _rows(0.29542392, 0.5885018, width=4)),
      ("lstm", lambda: _constant_cell(_LSTM, 4), _arange(2, 3, 4),
       _rows(0.3124785, 0.6863672, width=4)),
      ("simple_rnn", lambda: _constant_cell(_SIMPLE, 4), _arange(2, 3, 4),
       _rows(0.40559256, 0.7361247, width=4)),
      ("stacked_one_state", lambda: [OneStateCell(3), OneStateCell(2)],
       _arange(2, 3, 4), _rows(34092, 173196, width=2)),
      ("stacked_two_states", lambda: [TwoStatesCell(3), TwoStatesCell(2)],
       _arange(2, 3, 4), _rows(136368, 692784, width=2)))
  def test_statefulness(self, make_cell, x, expected):
    # The second call continues from the first's final states; after
    # reset_state() the same two calls give the same numbers again.
    layer = stepper.StepRNN(make_cell(), return_sequences=False,
                            stateful=True)
    for _ in range(2):
      layer(x)
      self.assertAllClose(layer(x), expected, atol=1e-5, rtol=1e-5)
      layer.reset_state()

  def test_go_backwards_and_stateful_return_state(self):
    x = _arange(2, 3, 4)
    layer = stepper.StepRNN(OneStateCell(2), return_sequences=False,
                            go_backwards=True)
    self.assertAllClose(layer(x), _rows(202, 538, width=2))
    layer = stepper.StepRNN(OneStateCell(2), return_sequences=False,
                            stateful=True, return_state=True)
    layer(x)
    output, state = layer(x)
    self.assertAllClose(output, _rows(954, 3978, width=2))
    self.assertAllClose(state, _rows(954, 3978, width=2))

  @parameterized.named_parameters(
      ("one_state", OneStateCell, np.ones((2, 2), "float32"), 22),
      ("two_states", TwoStatesCell, [np.ones((2, 2), "float32")] * 2, 44))
  def test_passing_initial_state(self, kind, state, expected):
    layer = stepper.StepRNN(kind(2), return_sequences=False)
    self.assertAllClose(layer(np.ones((2, 3, 2), "float32"),
                              initial_state=state), _rows(expected, expected,
                                                          width=2))

  @parameterized.named_parameters(
      ("gru", _GRU, 2, {}, [[0.23774096, 0.33508456],
                            [0.83659905, 1.0227708]]),
      ("gru_backwards", _GRU, 2, dict(go_backwards=True),
       [[0.13486053, 0.23261218], [0.78257304, 0.9691353]]),
      ("simple_rnn", _SIMPLE, 4, {}, _rows(0.33621645, 0.6262637, width=4)),
      ("simple_rnn_backwards", _SIMPLE, 4, dict(go_backwards=True),
       _rows(0.07344437, 0.43043602, width=4)))
  def test_pass_initial_state_and_return_state(self, kind, units, kwargs,
                                               expected):
    # A bare tensor, as Keras accepts it for a one-state cell; the returned
    # state is the last output.
    layer = stepper.StepRNN(_constant_cell(kind, units), return_sequences=False,
                            return_state=True, **kwargs)
    output, state = layer(_arange(2, 4, 3),
                          initial_state=_arange(2, units))
    self.assertAllClose(output, expected, atol=1e-5, rtol=1e-5)
    self.assertAllClose(state, expected, atol=1e-5, rtol=1e-5)

  def test_masking_custom_cell(self):
    x = _arange(2, 4, 3)
    mask = np.array([[True, True, True, False], [True, True, False, False]])
    for unroll in (False, True):
      layer = stepper.StepRNN(OneStateCell(2), return_sequences=False,
                              unroll=unroll)
      self.assertAllClose(layer(x, mask=mask), _rows(57, 126, width=2))
    layer = stepper.StepRNN(OneStateCell(2))
    expected = np.stack([_rows(3, 18, 57, 57, width=2),
                         _rows(39, 126, 126, 126, width=2)])
    self.assertAllClose(layer(x, mask=mask), expected)

  @parameterized.named_parameters(
      ("last", dict(return_sequences=False), None),
      ("carried", {}, [[0.03606692, 0.09497581, 0.09497581, 0.19393763],
                       [0.16051409, 0.16051409, 0.16051409, 0.30818558]]),
      ("zeros", dict(zero_output_for_mask=True),
       [[0.03606692, 0.09497581, 0, 0.19393763],
        [0.16051409, 0, 0, 0.30818558]]))
  def test_gru_masking(self, kwargs, per_step):
    layer = stepper.StepRNN(_constant_cell(_GRU, 2), **kwargs)
    expected = (_rows(0.19393763, 0.30818558, width=2) if per_step is None
                else np.repeat(np.array(per_step, "float32")[..., None], 2, -1))
    self.assertAllClose(layer(_arange(2, 4, 3), mask=_MASK), expected,
                        atol=1e-5, rtol=1e-5)
    backward = stepper.StepRNN(_constant_cell(_GRU, 2), return_sequences=False,
                               go_backwards=True)
    self.assertAllClose(backward(_arange(2, 4, 3), mask=_MASK),
                        _rows(0.11669192, 0.28380975, width=2),
                        atol=1e-5, rtol=1e-5)

  def test_stacked_cells(self):
    x = _arange(2, 3, 4)
    layer = stepper.StepRNN([OneStateCell(3), OneStateCell(2)], return_state=True)
    # Keras: a one-state cell without get_initial_state, stacked, returns
    # its state bare.
    output, state_1, state_2 = layer(x)
    self.assertAllClose(output, np.stack([
        _rows(18, 156, 786, width=2), _rows(162, 1020, 4386, width=2)]))
    self.assertAllClose(state_1, _rows(158, 782, width=3))
    self.assertAllClose(state_2, _rows(786, 4386, width=2))
    ones = dict(kernel_initializer="ones", recurrent_initializer="ones")
    lstms = stepper.StepRNN([_LSTM(1, **ones), _LSTM(1, **ones)],
                            return_sequences=False)
    self.assertAllClose(
        lstms(np.ones((2, 3, 4), "float32"),
              mask=np.array([[True, True, True], [True, True, False]])),
        [[0.7793], [0.5998]], atol=1e-4)

  def test_stacked_states_nest_like_keras(self):
    """`return_state` with `StackedRNNCells` and `stepper.stack`, against
    `keras.layers.RNN(StackedRNNCells)`: the call's states nest as each
    cell's `get_initial_state` (bare for a one-state cell without one, `[h]`
    for a GRU cell), the symbolic ones and `compute_output_shape` as the
    `state_size`s (an int: bare); the same numbers."""
    x = _arange(2, 3, 4) / 10
    cases = (lambda: [OneStateCell(3)],
             lambda: [OneStateCell(3), OneStateCell(2, listed=True),
                      TwoStatesCell(2)],
             lambda: [_GRU(3), OneStateCell(2), _LSTM(2)])
    for make_cells in cases:
      reference = keras.layers.RNN(make_cells(), return_state=True)
      expected = reference(x)
      for wrap in (keras.layers.StackedRNNCells, stepper.stack):
        layer = stepper.StepRNN(wrap(make_cells()), return_sequences=False,
                                return_state=True)
        layer.build(x.shape)
        layer.set_weights(reference.get_weights())
        actual = layer(x)
        tf.nest.assert_same_structure(actual, expected)
        self.assertAllClose(actual, expected, atol=1e-5, rtol=1e-5)
        self.assertEqual(layer.compute_output_shape(x.shape),
                         reference.compute_output_shape(x.shape))
        symbolic = [layer(keras.Input(x.shape[1:], batch_size=2)),
                    reference(keras.Input(x.shape[1:], batch_size=2))]
        tf.nest.assert_same_structure(*symbolic)
        self.assertEqual(*[_shapes(s) for s in symbolic])

  @parameterized.named_parameters(
      ("one_state", lambda: OneStateCell(8), 1),
      ("two_states", lambda: TwoStatesCell(8), 2),
      ("stacked_lstm", lambda: [_LSTM(8), _LSTM(8)], None))
  def test_compute_output_shape(self, make_cell, n_states):
    for batch, time in ((3, 4), (None, None)):
      for return_sequences in (False, True):
        layer = stepper.StepRNN(make_cell(), return_sequences=return_sequences,
                                return_state=True)
        shapes = layer.compute_output_shape((batch, time, 5))
        self.assertEqual(shapes[0], (batch, time, 8) if return_sequences
                         else (batch, 8))
        if n_states is None:  # Keras: one list of states per stacked cell.
          self.assertEqual(shapes[1:], ([(batch, 8)] * 2,) * 2)
        else:
          self.assertEqual(shapes[1:], ((batch, 8),) * n_states)
        if batch is not None:  # The call returns what was promised.
          outputs = layer(np.zeros((batch, time, 5), "float32"))
          self.assertEqual(_shapes(outputs), _shapes(shapes))

  def test_stateful_batch_size_mismatch_raises(self):
    inputs = keras.Input((5, 3), batch_size=4)
    model = keras.Model(inputs, stepper.StepRNN(
        TwoStatesCell(2), stateful=True)(inputs))
    model(np.zeros((4, 5, 3), "float32"))
    with self.assertRaisesRegex(ValueError, "batch size 4 .* batch size 1"):
      model(np.zeros((1, 5, 3), "float32"))


class KerasBidirectionalGoldenNumbersTest(tf.test.TestCase,
                                          parameterized.TestCase):

  @parameterized.named_parameters(
      ("concat", "concat", [[0.39687276, 0.39687276, 0.10004295, 0.10004295],
                            [0.7237238, 0.7237238, 0.53391594, 0.53391594]]),
      ("ave", "ave", _rows(0.24845785, 0.6288199, width=2)))
  def test_correctness(self, merge_mode, expected):
    layer = stepper.Bidirectional(stepper.StepRNN(
        _constant_cell(_SIMPLE, 2), return_sequences=False),
                                  merge_mode=merge_mode)
    self.assertAllClose(layer(_arange(2, 3, 4)), expected, atol=1e-5,
                        rtol=1e-5)

  def test_merge_none_and_backward_layer(self):
    x = _arange(2, 3, 4)
    forward = stepper.StepRNN(_constant_cell(_SIMPLE, 2),
                              return_sequences=False)
    first, second = stepper.Bidirectional(forward, merge_mode=None)(x)
    self.assertAllClose(first, _rows(0.39687276, 0.7237238, width=2))
    self.assertAllClose(second, _rows(0.10004295, 0.53391594, width=2))
    backward = stepper.StepRNN(
        _constant_cell(_SIMPLE, 2, kernel=0.03, bias=0.01),
        return_sequences=False, go_backwards=True)
    layer = stepper.Bidirectional(forward, backward_layer=backward,
                                  merge_mode="mul")
    self.assertAllClose(layer(x), _rows(0.08374989, 0.6740834, width=2),
                        atol=1e-5, rtol=1e-5)
    summed = stepper.Bidirectional(stepper.StepRNN(_constant_cell(_GRU, 2)),
                                   merge_mode="sum")(x)
    self.assertAllClose(summed[:, :, 0], [[0.20937867, 0.34462988, 0.40290534],
                                          [0.59829646, 0.6734641, 0.6479671]],
                        atol=1e-5, rtol=1e-5)

  def test_statefulness(self):
    layer = stepper.Bidirectional(stepper.StepRNN(
        _constant_cell(_LSTM, 2), return_sequences=False, stateful=True))
    expected = [[0.26234663, 0.26234663, 0.16959146, 0.16959146],
                [0.6137073, 0.6137073, 0.5381646, 0.5381646]]
    for _ in range(2):
      layer(_arange(2, 4, 3))
      self.assertAllClose(layer(_arange(2, 4, 3)), expected, atol=1e-5,
                          rtol=1e-5)
      layer.reset_state()

  def test_pass_initial_state_halves(self):
    layer = stepper.Bidirectional(stepper.StepRNN(
        _constant_cell(_LSTM, 2), return_sequences=False))
    states = [_arange(2, 2) * k for k in (1, 2, 3, 4)]
    self.assertAllClose(
        layer(_arange(2, 4, 3), initial_state=states),
        [[0.20794602, 0.4577124, 0.14046375, 0.48191673],
         [0.6682636, 0.6711909, 0.60943645, 0.60950446]], atol=1e-5, rtol=1e-5)

  def test_masking(self):
    layer = stepper.Bidirectional(stepper.StepRNN(
        _constant_cell(_GRU, 2), return_sequences=False))
    self.assertAllClose(
        layer(_arange(2, 4, 3), mask=_MASK),
        [[0.19393763, 0.19393763, 0.11669192, 0.11669192],
         [0.30818558, 0.30818558, 0.28380975, 0.28380975]], atol=1e-5,
        rtol=1e-5)

  def test_return_state(self):
    layer = stepper.Bidirectional(stepper.StepRNN(
        _constant_cell(_LSTM, 2), return_sequences=False, return_state=True))
    output, h1, c1, h2, c2 = layer(_arange(2, 4, 3))
    tolerance = dict(atol=1e-5, rtol=1e-5)
    self.assertAllClose(output, [[0.1990008, 0.1990008, 0.12659755,
                                  0.12659755], [0.52335435, 0.52335435,
                                                0.44717982, 0.44717982]],
                        **tolerance)
    self.assertAllClose(h1, _rows(0.1990008, 0.52335435, width=2), **tolerance)
    self.assertAllClose(c1, _rows(0.35567185, 1.0492687, width=2), **tolerance)
    self.assertAllClose(h2, _rows(0.12659755, 0.44717982, width=2), **tolerance)
    self.assertAllClose(c2, _rows(0.2501858, 0.941473, width=2), **tolerance)

  @parameterized.named_parameters(
      ("ave", "ave"), ("concat", "concat"), ("mul", "mul"), ("sum", "sum"),
      ("none", None))
  def test_output_shape(self, merge_mode):
    x = np.array([[[101, 202], [303, 404]]], "float32")
    for return_state in (True, False):
      layer = stepper.Bidirectional(stepper.StepRNN(
          _LSTM(2), return_sequences=False, return_state=return_state),
                                    merge_mode=merge_mode)
      outputs, shapes = layer(x), layer.compute_output_shape(x.shape)
      if not return_state and merge_mode is not None:
        outputs, shapes = [outputs], [shapes]
      self.assertEqual([tuple(o.shape) for o in outputs],
                       [tuple(s) for s in shapes])


class KerasLayerHarnessTest(keras_testing.TestCase):
  """Keras' `run_layer_test` (the `test_basics` of its RNN tests)."""

  def test_step_rnn_with_dropout_cell(self):
    self.run_layer_test(
        stepper.StepRNN,
        init_kwargs=dict(step=_GRU(3, dropout=0.5, recurrent_dropout=0.5),
                         return_sequences=False),
        input_shape=(3, 2, 4), call_kwargs=dict(training=True),
        expected_output_shape=(3, 3), expected_num_trainable_weights=3,
        expected_num_non_trainable_weights=0,
        expected_num_non_trainable_variables=1, supports_masking=True)

  def test_bidirectional(self):
    self.run_layer_test(
        stepper.Bidirectional,
        init_kwargs=dict(
            layer=stepper.StepRNN(_SIMPLE(4), return_sequences=False),
            backward_layer=stepper.StepRNN(_SIMPLE(4), return_sequences=False,
                                           go_backwards=True),
            merge_mode="sum"),
        input_shape=(3, 2, 4), expected_output_shape=(3, 4),
        expected_num_trainable_weights=6,
        expected_num_non_trainable_weights=0, supports_masking=True)


if __name__ == "__main__":
  tf.test.main()
