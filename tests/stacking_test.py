"""Tests for `stepper.stack` against stacked Keras RNN layers and two loops."""

from absl.testing import parameterized
import keras
import numpy as np
import tensorflow as tf

import _cells
import stepper
from stepper import chunking
from stepper import testing

BATCH, TIME, FEATURES = 3, 5, 4

_LAYERS = {"simple_rnn": keras.layers.SimpleRNN, "gru": keras.layers.GRU,
           "lstm": keras.layers.LSTM}
_CELLS = {"simple_rnn": keras.layers.SimpleRNNCell,
          "gru": keras.layers.GRUCell, "lstm": keras.layers.LSTMCell}


def _callable(cell):
  return lambda x_t, states: cell(x_t, states)


class _Control:
  """Stacked Keras RNN layers (the reference) and cells with copied weights.

  The Keras model maps `[x, *flat initial states]` to `[per-layer output
  sequences, per-layer final states]`, each layer's states as Keras returns
  them (`[h, c]` for an LSTM, `[h]` otherwise), i.e. like a cell's states.
  With `masking`, the initial states are zeros and not model inputs: Keras
  3.15 drops the mask of an RNN layer called with `initial_state` tensors
  in a functional model (the masked steps then run).
  """

  def __init__(self, kinds, units, dtype, *, features=FEATURES,
               residual=None, masking=False, seed=0):
    keras.utils.set_random_seed(seed)
    residual = residual or (False,) * len(kinds)
    self.dtype = dtype
    x = keras.Input((None, features), dtype=dtype)
    self.init_inputs = [
        [keras.Input((u,), dtype=dtype) for _ in range(_n_states(kind))]
        for kind, u in zip(kinds, units)]
    h = keras.layers.Masking(0.0, dtype=dtype)(x) if masking else x
    outputs, finals, self.layers = [], [], []
    for kind, u, inits, res in zip(kinds, units, self.init_inputs, residual):
      layer = _LAYERS[kind](u, return_sequences=True, return_state=True,
                            dtype=dtype)
      y, *states = layer(h, initial_state=None if masking else inits)
      h = keras.layers.Add(dtype=dtype)([h, y]) if res else y
      outputs.append(h)
      finals.append(states)
      self.layers.append(layer)
    self._init_inputs = not masking
    self.model = keras.Model(
        [x, *sum(self.init_inputs, [])] if self._init_inputs else x,
        [outputs, finals])
    self.cells = []
    in_dim = features
    for kind, u, layer in zip(kinds, units, self.layers):
      cell = _CELLS[kind](u, dtype=dtype)
      cell.build((None, in_dim))
      cell.set_weights(layer.cell.get_weights())  # Copied, not shared.
      self.cells.append(cell)
      in_dim = u
    rng = np.random.default_rng(seed)
    self.x = tf.constant(rng.normal(size=(BATCH, TIME, features)), dtype)
    scale = 1.0 if self._init_inputs else 0.0
    self.init = [[tf.constant(scale * rng.normal(size=(BATCH, u)), dtype)
                  for _ in range(_n_states(kind))]
                 for kind, u in zip(kinds, units)]
    self.targets = [tf.constant(rng.normal(size=(BATCH, TIME, u)), dtype)
                    for u in units]

  def loss(self, outputs, finals, targets=None):
    """Deep supervision on every layer's output plus every final state."""
    targets = self.targets if targets is None else targets
    return (tf.add_n([tf.reduce_mean(tf.square(y - t))
                      for y, t in zip(outputs, targets)]) +
            tf.add_n([tf.reduce_mean(s) for s in tf.nest.flatten(finals)]))

  def run(self, x=None, targets=None):
    """Control outputs, final states, loss and gradients (layer weights,
    inputs, initial states)."""
    x = self.x if x is None else x
    with tf.GradientTape() as tape:
      tape.watch([x, self.init])
      outputs, finals = self.model(
          [x, *sum(self.init, [])] if self._init_inputs else x)
      loss = self.loss(outputs, finals, targets)
    weights = [layer.trainable_variables for layer in self.layers]
    return outputs, finals, loss, tape.gradient(loss, [weights, x, self.init])

  def run_stack(self, step, x=None, runner=stepper.model_rnn, **kwargs):
    """The same for `step` (a stack of `self.cells`) through `runner`."""
    x = self.x if x is None else x
    with tf.GradientTape() as tape:
      tape.watch([x, self.init])
      outputs, finals = runner(step, x, self.init, **kwargs)
      loss = self.loss(outputs, finals)
    weights = [cell.trainable_variables for cell in self.cells]
    return outputs, finals, loss, tape.gradient(loss, [weights, x, self.init])


def _n_states(kind):
  return 2 if kind == "lstm" else 1


class SeedCaseTest(tf.test.TestCase, parameterized.TestCase):
  """Seed 003, cases 4 and 5: gradients flow through time and depth."""

  def setUp(self):
    super().setUp()
    # Seed data: x0 ~ randn(2, 3, 4), doubled along time; target y = x.
    x0 = np.random.RandomState(1).randn(2, 3, 4)
    self.x = tf.constant(np.concatenate([x0, x0], axis=1), tf.float32)

  def _keras_case4(self):
    keras.utils.set_random_seed(3)
    ipt = keras.Input((6, 4))
    h = keras.layers.SimpleRNN(4, return_sequences=True)(ipt)
    out = keras.layers.SimpleRNN(4, return_sequences=True)(h)
    return keras.Model(ipt, out)

  @parameterized.named_parameters(*testing.MODES)
  def test_case4_two_layer_stack_matches_keras_stacked_simple_rnn(self, mode):
    model = self._keras_case4()
    cells = []
    for layer in model.layers[1:]:
      cell = keras.layers.SimpleRNNCell(4)
      cell.build((None, 4))
      cell.set_weights(layer.cell.get_weights())
      cells.append(cell)
    deep = stepper.stack(cells)
    mse = keras.losses.MeanSquaredError()

    def run(x):
      with tf.GradientTape() as tape:
        outs, _ = stepper.model_rnn(deep, x, training=True)
        loss = mse(x, outs)
      return outs, loss, tape.gradient(
          loss, [c.trainable_variables for c in cells])

    with tf.GradientTape() as tape:
      control_outs = model(self.x, training=True)
      control_loss = mse(self.x, control_outs)
    control_grads = tape.gradient(
        control_loss, [l.trainable_variables for l in model.layers[1:]])
    # float32: XLA and oneDNN reorder sums, so gradient entries near zero
    # (~1e-3 here, the largest ~1) lose relative digits: an absolute floor.
    testing.assert_nests_close(testing.in_mode(run, mode)(self.x),
                               (control_outs, control_loss, control_grads),
                               atol=1e-6)

  def test_case5_single_loop_stack_matches_two_loops(self):
    x = tf.cast(self.x, tf.float64)
    bottom = keras.layers.SimpleRNNCell(4, dtype="float64")
    top = _cells.step_model(keras.layers.SimpleRNNCell(4, dtype="float64"), 4,
                      "float64")
    deep = stepper.stack([bottom, top])
    stepper.model_rnn(bottom, x)  # Builds the bottom cell.
    variables = [bottom.trainable_variables, top.trainable_variables]

    def single_loop():
      with tf.GradientTape() as tape:
        tape.watch(x)
        outs, finals = stepper.model_rnn(deep, x)
        loss = tf.reduce_mean(tf.square(outs - x))
      return outs, finals, loss, tape.gradient(loss, [variables, x])

    def two_loops():
      with tf.GradientTape() as tape:
        tape.watch(x)
        hidden, bottom_final = stepper.model_rnn(bottom, x)
        outs, top_final = stepper.model_rnn(top, hidden)
        loss = tf.reduce_mean(tf.square(outs - x))
      return (outs, (bottom_final, top_final), loss,
              tape.gradient(loss, [variables, x]))

    # The same ops in a different loop structure: equal to float64 rounding.
    testing.assert_nests_close(single_loop(), two_loops())


class StackMatchesKerasTest(tf.test.TestCase, parameterized.TestCase):

  @parameterized.named_parameters(("float32", "float32"),
                                  ("float64", "float64"))
  def test_mixed_kind_lstm_gru_stack_matches_keras_stacked_layers(self,
                                                                   dtype):
    control = _Control(("lstm", "gru", "lstm"), (5, 6, 3), dtype)
    cells = control.cells
    # One layer of each step kind: a cell, a step model, a callable (whose
    # states are undeclared, so the initial states are passed by position).
    deep = stepper.stack([cells[0], _cells.step_model(cells[1], 5, dtype),
                          _callable(cells[2])], return_all_outputs=True)
    self.assertIsNone(deep.state_specs)
    # float32: an absolute floor for gradient entries near zero (~1e-6 where
    # the largest are ~1), whose relative digits are lost to rounding.
    testing.assert_nests_close(control.run_stack(deep), control.run(),
                               atol=1e-6 if dtype == "float32" else 0.0)

  def test_residual_stack_matches_keras_layers_with_add(self):
    control = _Control(("gru", "lstm", "simple_rnn"), (4, 4, 4), "float64",
                       residual=(True, True, True))
    deep = stepper.stack(control.cells, residual=True,
                         return_all_outputs=True)
    testing.assert_nests_close(control.run_stack(deep), control.run())

  def test_per_layer_residual_matches_keras_layers_with_add(self):
    control = _Control(("lstm", "gru"), (6, 6), "float64",
                       residual=(False, True))
    deep = stepper.stack(control.cells, residual=(False, True),
                         return_all_outputs=True)
    testing.assert_nests_close(control.run_stack(deep), control.run())

  @parameterized.named_parameters(("function", testing.FUNCTION),
                                  ("xla", testing.XLA))
  def test_reversed_stack_matches_keras_on_reversed_time(self, mode):
    control = _Control(("gru", "lstm"), (5, 4), "float64")
    deep = stepper.stack(control.cells, return_all_outputs=True)
    flip = lambda nest: tf.nest.map_structure(
        lambda s: tf.reverse(s, [1]), nest)
    outs, finals, loss, (w, dx, dinit) = control.run(
        flip(control.x), flip(control.targets))
    expected = flip(outs), finals, loss, (w, flip(dx), dinit)
    actual = testing.in_mode(
        lambda: control.run_stack(deep, reverse=True), mode)()
    testing.assert_nests_close(actual, expected)

  @parameterized.named_parameters(("eager", testing.EAGER),
                                  ("xla", testing.XLA))
  def test_masked_stack_matches_keras_masking(self, mode):
    control = _Control(("lstm", "gru"), (5, 3), "float64", masking=True)
    # Row 1 padded at the end, row 2 has a gap inside; Masking(0.0) skips
    # all-zero steps in every layer and carries outputs and states forward.
    valid = np.ones((BATCH, TIME), bool)
    valid[1, 3:] = False
    valid[2, 1:3] = False
    x = control.x * valid[:, :, None]
    deep = stepper.stack(control.cells, return_all_outputs=True)
    outs, finals, loss, (w, dx, _) = testing.in_mode(
        lambda: control.run_stack(deep, x, mask=tf.constant(valid)), mode)()
    expected_outs, expected_finals, expected_loss, (expected_w, expected_dx,
                                                    _) = control.run(x)
    testing.assert_nests_close(
        (outs, finals, loss, w, dx),
        (expected_outs, expected_finals, expected_loss, expected_w,
         expected_dx))


class StackChunksTest(tf.test.TestCase, parameterized.TestCase):

  @parameterized.named_parameters(("plain", False), ("masked", True))
  def test_stack_through_chunks_matches_full_run(self, masked):
    control = _Control(("lstm", "gru"), (4, 3), "float64")
    deep = stepper.stack(control.cells, return_all_outputs=True)
    valid = np.ones((BATCH, TIME), bool)
    valid[1, 2:] = False
    mask = tf.constant(valid) if masked else None
    chunked = control.run_stack(
        deep, runner=lambda step, x, init, **kwargs: chunking.run_chunks(
            step, x, 2, init, gradient="through", **kwargs), mask=mask)
    full = control.run_stack(deep, mask=mask)
    testing.assert_nests_close(chunked, full)


class StackStructureTest(tf.test.TestCase, parameterized.TestCase):

  def test_final_states_are_per_layer_by_position(self):
    control = _Control(("lstm", "simple_rnn"), (3, 2), "float64")
    deep = stepper.stack(control.cells)
    _, finals = stepper.model_rnn(deep, control.x, control.init)
    _, bottom = stepper.model_rnn(control.cells[0], control.x,
                                  control.init[0])
    self.assertLen(finals, 2)
    testing.assert_nests_close(finals[0], bottom)
    self.assertEqual(finals[1][0].shape, (BATCH, 2))

  def test_nested_stack_matches_flat_stack(self):
    control = _Control(("gru", "lstm", "gru"), (3, 4, 2), "float64")
    cells = control.cells
    flat = stepper.stack(cells)
    nested = stepper.stack([stepper.stack(cells[:2]), cells[2]])
    init = ((control.init[0], control.init[1]), control.init[2])
    outs, finals = stepper.model_rnn(nested, control.x, init)
    expected = stepper.model_rnn(flat, control.x, control.init)
    testing.assert_nests_close((outs, tf.nest.flatten(finals)),
                               (expected[0], tf.nest.flatten(expected[1])))

  def test_variables_list_every_layer_once(self):
    cell = keras.layers.SimpleRNNCell(4)  # Shared across depth.
    other = keras.layers.GRUCell(4)
    deep = stepper.stack([cell, other, cell])
    stepper.model_rnn(deep, tf.zeros([2, 3, 4]))
    self.assertLen(deep.trainable_variables, 6)
    ids = lambda variables: [id(v) for v in variables]
    self.assertCountEqual(ids(deep.trainable_variables),
                          ids(cell.trainable_variables +
                              other.trainable_variables))
    self.assertCountEqual(ids(deep.variables),
                          ids(cell.variables + other.variables))


def _ones_then_identity(width):
  """A stack probe: layer 0 outputs ones `[batch, width]`, layer 1 passes its
  input through, so the stack's output is layer 1's dropout mask."""
  ones = lambda x, s: (tf.ones([tf.shape(x)[0], width], x.dtype), s)
  identity = lambda x, s: (x, s)
  return [ones, identity]


class DropoutTest(tf.test.TestCase, parameterized.TestCase):

  def _probe(self, width=6, seed=7, time=TIME, dtype=tf.float32):
    deep = stepper.stack(_ones_then_identity(width), dropout=0.5, seed=seed)
    x = tf.zeros([BATCH, time, 2], dtype)
    init = ((tf.zeros([BATCH, 1], dtype),), (tf.zeros([BATCH, 1], dtype),))
    return deep, x, init

  @parameterized.named_parameters(*testing.MODES)
  def test_dropout_mask_is_the_same_at_every_step(self, mode):
    deep, x, init = self._probe()
    run = testing.in_mode(
        lambda: stepper.model_rnn(deep, x, init, training=True)[0], mode)
    masks = run().numpy()
    for t in range(TIME):
      self.assertAllEqual(masks[:, t], masks[:, 0])
    # Inverted dropout: kept units are scaled by 1 / (1 - rate).
    self.assertAllInSet(masks, [0.0, 2.0])
    self.assertIn(0.0, masks)
    self.assertIn(2.0, masks)
    # One mask per sequence: rows differ; a new engine call draws anew.
    self.assertNotAllEqual(masks[0, 0], masks[1, 0])
    self.assertNotAllEqual(run().numpy(), masks)

  def test_dropout_with_the_same_seed_draws_the_same_masks(self):
    first = self._probe(seed=11)
    second = self._probe(seed=11)
    masks = [stepper.model_rnn(*p, training=True)[0] for p in (first, second)]
    self.assertAllEqual(masks[0], masks[1])

  @parameterized.named_parameters(("false", False), ("none", None))
  def test_dropout_without_training_matches_plain_stack(self, training):
    control = _Control(("gru", "lstm"), (4, 3), "float32")
    dropped = stepper.stack(control.cells, dropout=0.5, seed=1)
    plain = stepper.stack(control.cells)
    expected = stepper.model_rnn(plain, control.x, control.init)
    for _ in range(2):  # Deterministic: no mask drawn.
      testing.assert_nests_close(
          stepper.model_rnn(dropped, control.x, control.init,
                            training=training), expected, rtol=0.0)

  def test_dropout_follows_a_training_tensor(self):
    deep, x, init = self._probe()
    run = tf.function(
        lambda training: stepper.model_rnn(deep, x, init,
                                           training=training)[0])
    self.assertAllEqual(run(tf.constant(False)), tf.ones([BATCH, TIME, 6]))
    self.assertIn(0.0, run(tf.constant(True)).numpy())

  def test_dropout_stack_matches_keras_layers_with_the_same_mask(self):
    control = _Control(("lstm", "gru"), (6, 3), "float64")
    deep = stepper.stack(control.cells, dropout=0.5, seed=5,
                         return_all_outputs=True)
    # The probe with the same seed and widths draws the same mask.
    probe, x, init = self._probe(width=6, seed=5, time=1, dtype=tf.float64)
    mask = stepper.model_rnn(probe, x, init, training=True)[0][:, 0]
    self.assertIn(0.0, mask.numpy())
    # Reference: Keras layer 1 reads layer 0's output times the fixed mask.
    with tf.GradientTape() as tape:
      tape.watch(control.x)
      flat_init = sum(control.init, [])
      h0, *s0 = control.layers[0](control.x, initial_state=flat_init[:2])
      h1, *s1 = control.layers[1](h0 * mask[:, None, :],
                                  initial_state=flat_init[2:])
      loss = control.loss([h0, h1], [s0, s1])
    weights = [layer.trainable_variables for layer in control.layers]
    expected = ([h0, h1], [s0, s1], loss,
                tape.gradient(loss, [weights, control.x]))
    outs, finals, loss, (w, dx, _) = control.run_stack(deep, training=True)
    testing.assert_nests_close((outs, finals, loss, (w, dx)), expected)


class StackErrorsTest(tf.test.TestCase, parameterized.TestCase):

  @parameterized.named_parameters(
      ("empty", dict(steps=[]), ValueError, r"`steps` is empty"),
      ("not_a_list", dict(steps=keras.layers.GRUCell(2)), TypeError,
       r"`steps` must be a list or tuple of steps.*got GRUCell"),
      ("rate_negative", dict(dropout=-0.1), ValueError,
       r"`dropout` must lie in \[0, 1\); got -0.1"),
      ("rate_one", dict(dropout=1.0), ValueError,
       r"`dropout` must lie in \[0, 1\); got 1.0"),
      ("rate_string", dict(dropout="0.5"), TypeError,
       r"`dropout` must be a float in \[0, 1\); got '0.5'"),
      ("residual_length", dict(residual=(True,)), ValueError,
       r"`residual` has 1 entries but the stack has 2 layers"),
      ("residual_type", dict(residual="yes"), TypeError,
       r"`residual` must be a bool or a list of 2 bools"),
  )
  def test_stack_raises_on_bad_argument(self, kwargs, error, message):
    kwargs.setdefault("steps", [keras.layers.GRUCell(2),
                                keras.layers.GRUCell(2)])
    with self.assertRaisesRegex(error, message):
      stepper.stack(**kwargs)

  @parameterized.named_parameters(("eager", testing.EAGER),
                                  ("function", testing.FUNCTION))
  def test_residual_raises_on_shape_mismatch(self, mode):
    deep = stepper.stack([keras.layers.GRUCell(4), keras.layers.GRUCell(5)],
                         residual=(False, True))
    run = testing.in_mode(lambda: stepper.model_rnn(deep, tf.zeros([2, 3, 3])),
                          mode)
    with self.assertRaisesRegex(
        ValueError, r"residual: stack layer 1 \(cell 'gru_cell.*\) has input "
        r"shape \(2, 4\) float32 but output shape \(2, 5\) float32"):
      run()

  @parameterized.named_parameters(("eager", testing.EAGER),
                                  ("function", testing.FUNCTION))
  def test_undeclared_states_raise_on_wrong_count(self, mode):
    deep = stepper.stack([keras.layers.GRUCell(3),
                          lambda x, s: (x, s)])
    x = tf.zeros([2, 3, 3])
    one_entry = testing.in_mode(
        lambda: stepper.model_rnn(deep, x, (tf.zeros([2, 3]),)), mode)
    with self.assertRaisesRegex(
        ValueError, r"stack of 2 layers must be a tuple with one entry per "
        r"layer, by position; got 1 entries"):
      one_entry()
    with self.assertRaisesRegex(
        ValueError, r"Cannot infer the initial states of stack layer 1: "):
      testing.in_mode(lambda: stepper.model_rnn(deep, x), mode)()

  def test_declared_states_raise_on_wrong_count(self):
    deep = stepper.stack([keras.layers.GRUCell(3), keras.layers.GRUCell(3)])
    with self.assertRaisesRegex(ValueError,
                                r"`initial_states` has 1 state\(s\)"):
      stepper.model_rnn(deep, tf.zeros([2, 3, 3]), ([tf.zeros([2, 3])],))


if __name__ == "__main__":
  tf.test.main()
