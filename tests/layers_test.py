"""Tests for `stepper.StepRNN` against `keras.layers.RNN` in Keras models."""

import json
import os

from absl.testing import parameterized
import keras
import numpy as np
import tensorflow as tf

import stepper
from stepper import testing

BATCH, TIME, FEATURES, UNITS = 4, 6, 3, 5
_CELLS = {"gru": keras.layers.GRUCell, "lstm": keras.layers.LSTMCell}


def _padded_inputs(dtype="float32"):
  """Zero-padded rows: right, left, none and fully padded."""
  x = np.random.RandomState(7).randn(BATCH, TIME, FEATURES).astype(dtype)
  x[0, 4:] = 0.
  x[1, :3] = 0.
  x[3] = 0.
  return x


def _twin_models(kind, dtype="float32", **rnn_kwargs):
  """`Masking -> StepRNN(cell)` and `Masking -> RNN(cell)`, same weights."""
  keras.utils.set_random_seed(8)
  cells = [_CELLS[kind](UNITS, dtype=dtype) for _ in range(2)]
  models = []
  for layer in (stepper.StepRNN(cells[0], **rnn_kwargs),
                keras.layers.RNN(cells[1], dtype=dtype, **rnn_kwargs)):
    models.append(keras.Sequential([
        keras.Input((TIME, FEATURES), dtype=dtype),
        keras.layers.Masking(0., dtype=dtype), layer]))
  cells[1].set_weights(cells[0].get_weights())
  return models


def _outputs_and_gradients(model, x):
  x = tf.convert_to_tensor(x)
  with tf.GradientTape() as tape:
    tape.watch(x)
    y = model(x)
    weights = tf.constant(np.random.RandomState(9).randn(*y.shape), y.dtype)
    loss = tf.reduce_sum(y * weights)
  return y, tape.gradient(loss, [x, model.trainable_variables])


class OnesStartGRUCell(keras.layers.GRUCell):
  """A GRU cell whose states start at ones (e.g. a learned start)."""

  def get_initial_state(self, batch_size=None):
    return [tf.ones([batch_size, self.units], self.compute_dtype)]


class StepRNNTest(tf.test.TestCase, parameterized.TestCase):

  @parameterized.product(
      kind=["gru", "lstm"], return_sequences=[True, False],
      go_backwards=[False, True], zero_output_for_mask=[False, True])
  def test_step_rnn_matches_keras_rnn_with_masking(
      self, kind, return_sequences, go_backwards, zero_output_for_mask):
    # Rows 0 and 3 end masked, rows 1 and 3 start masked: without sequences
    # and with zero_output_for_mask both return zeros there.
    models = _twin_models(
        kind, return_sequences=return_sequences, go_backwards=go_backwards,
        zero_output_for_mask=zero_output_for_mask)
    x = _padded_inputs()
    actual, expected = [_outputs_and_gradients(m, x) for m in models]
    # float32 gradients sum over steps: an atol for entries near zero.
    testing.assert_nests_close(actual, expected, rtol=1e-5, atol=1e-6)

  @parameterized.named_parameters(*testing.MODES)
  def test_float64_step_rnn_in_modes_matches_keras_rnn(self, mode):
    models = _twin_models("lstm", "float64", return_sequences=True)
    x = _padded_inputs("float64")
    actual, expected = [
        testing.in_mode(lambda v, m=m: _outputs_and_gradients(m, v), mode)(x)
        for m in models]
    testing.assert_nests_close(actual, expected, rtol=1e-10)

  def test_stacked_step_rnns_match_keras_rnns(self):
    """The first layer's `compute_mask` feeds the second layer's mask."""
    keras.utils.set_random_seed(10)
    cells = [[keras.layers.GRUCell(UNITS) for _ in range(2)]
             for _ in range(2)]

    def build(layer_cls):
      return keras.Sequential([
          keras.Input((TIME, FEATURES)), keras.layers.Masking(0.),
          layer_cls(cells_[0], return_sequences=True),
          layer_cls(cells_[1], return_sequences=False)])

    cells_ = cells[0]
    ours = build(stepper.StepRNN)
    cells_ = cells[1]
    reference = build(keras.layers.RNN)
    for a, b in zip(cells[0], cells[1]):
      b.set_weights(a.get_weights())
    x = _padded_inputs()
    testing.assert_nests_close(_outputs_and_gradients(ours, x),
                               _outputs_and_gradients(reference, x),
                               rtol=1e-5, atol=1e-6)

  @parameterized.named_parameters(("mask_zero", True), ("masking", False))
  def test_embedding_mask_matches_seed_table(self, mask_zero):
    """The m2 table of the dynamic_rnn-vs-Keras Q&A: the mask comes from
    `Embedding(mask_zero=True)` or `Masking(0.37)` through the model."""
    table = np.ones([3, 2], np.float32) * np.array([[.37], [1.], [2.]],
                                                   np.float32)
    layers = [keras.Input((5,), dtype="int32"), keras.layers.Embedding(
        3, 2, mask_zero=mask_zero,
        embeddings_initializer=keras.initializers.Constant(table))]
    if not mask_zero:
      layers.append(keras.layers.Masking(0.37))
    cell = keras.layers.GRUCell(
        1, activation=None, recurrent_activation=None,
        kernel_initializer="ones", recurrent_initializer="zeros",
        bias_initializer="ones", reset_after=False)
    model = keras.Sequential(layers + [stepper.StepRNN(cell)])
    outputs = model(np.array([[1, 2, 1, 0, 0], [0, 1, 2, 1, 0]]))
    self.assertAllEqual(outputs[..., 0],
                        [[-6, -50, -156, -156, -156], [0, -6, -50, -156, -156]])

  @parameterized.named_parameters(("forward", False), ("backward", True))
  def test_return_state_and_initial_state_match_keras_rnn(self, go_backwards):
    keras.utils.set_random_seed(11)
    cells = [keras.layers.LSTMCell(UNITS) for _ in range(2)]
    x_in = keras.Input((TIME, FEATURES))
    h_in, c_in = keras.Input((UNITS,)), keras.Input((UNITS,))
    models = []
    for layer in (stepper.StepRNN(cells[0], return_state=True,
                                  go_backwards=go_backwards),
                  keras.layers.RNN(cells[1], return_sequences=True,
                                   return_state=True,
                                   go_backwards=go_backwards)):
      masked = keras.layers.Masking(0.)(x_in)
      models.append(keras.Model([x_in, h_in, c_in],
                                layer(masked, initial_state=[h_in, c_in])))
    cells[1].set_weights(cells[0].get_weights())
    rng = np.random.RandomState(12)
    inputs = [_padded_inputs(), rng.randn(BATCH, UNITS).astype("float32"),
              rng.randn(BATCH, UNITS).astype("float32")]
    actual, expected = [m(inputs) for m in models]
    testing.assert_nests_close(actual, expected, rtol=1e-5, atol=1e-6)

  @parameterized.named_parameters(
      ("sequences", dict(), "mask"),
      # Keras passes the input mask on unreversed after go_backwards.
      ("backwards", dict(go_backwards=True), "mask"),
      ("backwards_reversed", dict(go_backwards=True,
                                  reverse_output_mask=True), "reversed"),
      ("last", dict(return_sequences=False), None),
      ("states", dict(return_state=True), ["mask", None, None]))
  def test_compute_mask_matches_expected(self, kwargs, expected):
    layer = stepper.StepRNN(keras.layers.LSTMCell(UNITS), **kwargs)
    mask = tf.constant(_padded_inputs()[..., 0] != 0)
    names = {"mask": mask, "reversed": tf.reverse(mask, [1]), None: None}
    expected = (names[expected] if not isinstance(expected, list) else
                [names[e] for e in expected])
    inputs = tf.zeros([BATCH, TIME, FEATURES])
    actual = layer.compute_mask(inputs, mask)
    tf.nest.assert_same_structure(actual, expected)
    for a, e in zip(tf.nest.flatten(actual), tf.nest.flatten(expected)):
      self.assertAllEqual(a, e)
    if "reverse_output_mask" not in kwargs:  # Keras' RNN: the same masks.
      kwargs.setdefault("return_sequences", True)
      reference = keras.layers.RNN(keras.layers.LSTMCell(UNITS), **kwargs)
      for a, e in zip(tf.nest.flatten(actual),
                      tf.nest.flatten(reference.compute_mask(inputs, mask))):
        self.assertAllEqual(a, e)

  @parameterized.named_parameters(("cell", "cell"), ("model", "model"))
  def test_saved_model_round_trip_matches_original(self, step_kind):
    keras.utils.set_random_seed(13)
    if step_kind == "cell":
      step = keras.layers.GRUCell(UNITS)
    else:
      x_t, h = keras.Input((FEATURES,)), keras.Input((UNITS,))
      h_new = keras.layers.Dense(UNITS, activation="tanh")(
          keras.layers.Concatenate()([x_t, h]))
      step = keras.Model([x_t, h], [h_new, h_new])
    model = keras.Sequential([
        keras.Input((TIME, FEATURES)), keras.layers.Masking(0.),
        stepper.StepRNN(step, go_backwards=True, zero_output_for_mask=True,
                        unroll=2, reverse_output_mask=True),
        keras.layers.Dense(2)])
    path = os.path.join(self.get_temp_dir(), "model.keras")
    model.save(path)
    loaded = keras.saving.load_model(path)
    x = _padded_inputs()
    self.assertIsInstance(loaded.layers[1], stepper.StepRNN)
    # Through JSON: Keras records build shapes as tuples, and reads lists.
    as_json = lambda layer: json.loads(json.dumps(layer.get_config()))
    self.assertEqual(as_json(loaded.layers[1]), as_json(model.layers[1]))
    testing.assert_nests_close(loaded(x), model(x), rtol=0)

  def test_get_config_raises_on_callable_step(self):
    layer = stepper.StepRNN(lambda x_t, states: (x_t, states))
    with self.assertRaisesRegex(
        TypeError, r"cannot be serialized: its step is a function, but only "
        r"a Keras layer \(an RNN cell or a functional step model\)"):
      layer.get_config()

  def test_callable_step_matches_cell(self):
    """A plain callable works given `initial_state` (weights outside it)."""
    keras.utils.set_random_seed(14)
    cell = keras.layers.GRUCell(UNITS)
    cell.build((None, FEATURES))
    x = _padded_inputs()
    mask = tf.constant(x[..., 0] != 0)
    init = [tf.zeros([BATCH, UNITS])]
    by_callable = stepper.StepRNN(lambda x_t, s: cell(x_t, s))(
        x, mask=mask, initial_state=init)
    by_cell = keras.layers.RNN(cell, return_sequences=True)(
        x, mask=mask, initial_state=init)
    testing.assert_nests_close(by_callable, by_cell, rtol=1e-5, atol=1e-6)



class StepRNNDropInTest(tf.test.TestCase):
  """What keras.layers.RNN code relies on beyond the golden numbers of
  tests/keras_parity_test.py: stacks as Keras layers, stateful semantics,
  dropout under model.fit, Bidirectional's checks."""

  def _stack(self, dropout=0.0):
    return stepper.stack([
        keras.layers.GRUCell(UNITS, dropout=dropout),
        keras.layers.LSTMCell(2, recurrent_dropout=dropout)])

  def test_stack_return_state_matches_keras_stacked_rnn_cells(self):
    keras.utils.set_random_seed(15)
    ours = stepper.StepRNN(self._stack(), return_state=True)
    keras_cells = [keras.layers.GRUCell(UNITS), keras.layers.LSTMCell(2)]
    reference = keras.layers.RNN(keras.layers.StackedRNNCells(keras_cells),
                                 return_sequences=True, return_state=True)
    x = _padded_inputs()
    ours(x)
    reference(x)
    reference.set_weights(ours.get_weights())
    h = [np.full((BATCH, n), 0.5, "float32") for n in (UNITS, 2, 2)]
    # Keras nests the states per cell as each cell's get_initial_state,
    # [out, [h1], [h2, c2]]; so does the layer, for a stepper.stack and for
    # StackedRNNCells, as initial_state and as returned states (and as
    # Keras, it declares the GRU state bare in compute_output_shape, after
    # the cell's int state_size).
    actual = ours(x, initial_state=[[h[0]], [h[1], h[2]]])
    self.assertEqual([len(s) for s in actual[1:]], [1, 2])
    testing.assert_nests_close(
        actual, reference(x, initial_state=[[h[0]], [h[1], h[2]]]),
        rtol=1e-5, atol=1e-6)
    self.assertEqual(ours.compute_output_shape((BATCH, TIME, FEATURES)),
                     reference.compute_output_shape((BATCH, TIME, FEATURES)))

  def test_sequential_with_stack_and_dropout_fits_saves_and_loads(self):
    keras.utils.set_random_seed(16)
    model = keras.Sequential([
        keras.Input((TIME, FEATURES)),
        stepper.StepRNN(self._stack(dropout=0.3), return_sequences=False),
        keras.layers.Dense(1)])
    # Both cells' weights reach Keras: 3 (GRU) + 3 (LSTM) + 2 (Dense).
    self.assertLen(model.trainable_weights, 8)
    before = [w.numpy() for w in model.trainable_weights]
    model.compile(keras.optimizers.Adam(0.01), "mse")
    x = _padded_inputs()
    model.fit(x, np.ones((BATCH, 1)), epochs=2, verbose=0)
    for old, new in zip(before, model.trainable_weights):
      self.assertNotAllClose(old, new)  # model.fit trains every layer.
    path = os.path.join(self.get_temp_dir(), "stack.keras")
    model.save(path)
    loaded = keras.saving.load_model(path)
    testing.assert_nests_close(loaded(x), model(x), rtol=0)
    self.assertEqual(loaded.layers[0].step.config,
                     model.layers[0].step.config)

  def test_stateful_cuts_the_gradient_between_calls(self):
    cell = keras.layers.GRUCell(UNITS)
    layer = stepper.StepRNN(cell, stateful=True)
    x = tf.constant(_padded_inputs())
    first = layer(x[:, :3])
    with tf.GradientTape() as tape:
      tape.watch(x)
      second = layer(x[:, 3:])
      loss = tf.reduce_sum(second)
    # The second call continues the first (one long run), but its gradient
    # stops at the states carried in variables.
    whole, _ = stepper.model_rnn(cell, x)
    testing.assert_nests_close(tf.concat([first, second], 1), whole,
                               rtol=1e-5, atol=1e-6)
    grads = tape.gradient(loss, [x, layer.states[0]])
    self.assertAllEqual(grads[0][:, :3], tf.zeros_like(grads[0][:, :3]))
    self.assertNotAllClose(grads[0][:, 3:], tf.zeros_like(grads[0][:, 3:]))
    self.assertIsNone(grads[1])
    self.assertLen(layer.non_trainable_weights, 0)  # States are not weights.

  def test_stateful_raises_without_a_fixed_batch_size(self):
    with self.assertRaisesRegex(
        ValueError, r"stateful=True needs a fixed batch size .* "
        r"\(None, 6, 3\)"):
      keras.Sequential([keras.Input((TIME, FEATURES)),
                        stepper.StepRNN(keras.layers.GRUCell(UNITS),
                                        stateful=True)])

  def test_reset_states_like_keras_rnn(self):
    """Zeros, also where the cell starts elsewhere; nothing when not
    stateful (Keras); the cell's start with `to_initial_state=True`."""
    x = _padded_inputs()[:, :3]
    twins = [OnesStartGRUCell(UNITS) for _ in range(2)]
    ours = stepper.StepRNN(twins[0], return_sequences=False, stateful=True)
    reference = keras.layers.RNN(twins[1], stateful=True)
    ours(x)
    reference(x)
    twins[1].set_weights(twins[0].get_weights())
    ours.reset_states()
    reference.reset_states()
    for _ in range(2):  # From the reset, then from the carried states.
      testing.assert_nests_close(ours(x), reference(x), rtol=1e-5, atol=1e-6)
    testing.assert_nests_close(list(ours.states), reference.states, rtol=1e-6)
    ours.reset_states(to_initial_state=True)
    self.assertAllEqual(ours.states[0], np.ones((BATCH, UNITS)))
    for layer in (stepper.StepRNN(twins[0]), keras.layers.RNN(twins[1])):
      layer(x)
      layer.reset_states()  # Not stateful: Keras does nothing.

  def test_cell_and_get_initial_state_like_keras_rnn(self):
    cell = OnesStartGRUCell(UNITS)
    for step in (cell, [cell, keras.layers.LSTMCell(2)]):
      ours, reference = stepper.StepRNN(step), keras.layers.RNN(step)
      self.assertIs(type(ours.cell), type(reference.cell))
      self.assertEqual(getattr(ours.cell, "cells", None),
                       getattr(reference.cell, "cells", None))
      testing.assert_nests_close(ours.get_initial_state(3),
                                 reference.get_initial_state(3), rtol=0)
    # A step model: zeros like its state inputs; a stack: each layer's.
    x_t, h, c = (keras.Input((UNITS,)), keras.Input((UNITS,)),
                 keras.Input((2,), dtype="float64"))
    model = keras.Model([x_t, h, c], [h, h, c])
    zeros = [np.zeros((3, UNITS)), np.zeros((3, 2))]
    for step, expected in ((model, zeros),
                           (stepper.stack([cell, model]),
                            [[np.ones((3, UNITS))], zeros])):
      layer = stepper.StepRNN(step)
      self.assertIs(layer.cell, step)
      testing.assert_nests_close(layer.get_initial_state(3), expected, rtol=0)
    self.assertEqual(layer.get_initial_state(3)[1][1].dtype, tf.float64)
    with self.assertRaisesRegex(ValueError, "plain callable does not declare"):
      stepper.StepRNN(lambda x, s: (x, s)).get_initial_state(3)

  def test_bidirectional_raises_on_bad_layers(self):
    forward = stepper.StepRNN(keras.layers.GRUCell(UNITS))
    with self.assertRaisesRegex(ValueError, r'"return_sequences", got '
                                r'"True" for forward layer and "False"'):
      stepper.Bidirectional(forward, backward_layer=stepper.StepRNN(
          keras.layers.GRUCell(UNITS), return_sequences=False,
          go_backwards=True))
    with self.assertRaisesRegex(TypeError, r"`layer` must be a "
                                r"stepper.StepRNN; got RNN"):
      stepper.Bidirectional(keras.layers.RNN(keras.layers.GRUCell(UNITS)))
    with self.assertRaisesRegex(ValueError, "merge mode"):
      stepper.Bidirectional(forward, merge_mode="max")

if __name__ == "__main__":
  tf.test.main()
