"""Mixed precision: stepper against `keras.layers.RNN` under the same policy.

`mixed_bfloat16` on CPU (`mixed_float16` where the CPU has the kernels: the
RNN cells and Dense do). Under a mixed policy a Keras cell computes in
bfloat16/float16 with float32 weights; `keras.layers.RNN` carries the states
in the cell's compute dtype and returns its outputs in its own.
"""

from absl.testing import parameterized
import keras
import numpy as np
import tensorflow as tf

import stepper
from stepper import testing

BATCH, TIME, FEATURES, UNITS = 3, 5, 4, 6


def _x():
  return tf.constant(np.random.default_rng(0).standard_normal(
      (BATCH, TIME, FEATURES)), tf.float32)


def _outputs_and_grads(run, variables, x):
  with tf.GradientTape() as tape:
    outputs = run(x)
    loss = tf.reduce_sum(tf.cast(outputs, tf.float32) ** 2)
  return outputs, tape.gradient(loss, variables)


class MixedPrecisionTest(tf.test.TestCase, parameterized.TestCase):

  def setUp(self):
    super().setUp()
    keras.mixed_precision.set_global_policy("mixed_bfloat16")

  def tearDown(self):
    keras.mixed_precision.set_global_policy("float32")
    super().tearDown()

  def assert_matches_keras(self, step, cell, grad_tol=0.0, **kwargs):
    """`model_rnn(step)` equals `keras.layers.RNN(cell)`: the same bfloat16
    ops in the same order, so bitwise outputs (and gradients, unless
    `grad_tol` says why not)."""
    x = _x()
    layer = keras.layers.RNN(cell, return_sequences=True)
    layer(x)
    variables = cell.trainable_variables
    expected, expected_grads = _outputs_and_grads(layer, variables, x)
    outputs, grads = _outputs_and_grads(
        lambda x: stepper.model_rnn(step, x, **kwargs)[0], variables, x)
    self.assertEqual(outputs.dtype, tf.bfloat16)
    self.assertAllEqual(outputs, expected)
    # remat sums a segment's float32 gradients in another order.
    testing.assert_nests_close(grads, expected_grads,
                               rtol=grad_tol or (1e-6 if kwargs else 0),
                               atol=grad_tol or 1e-6)

  @parameterized.named_parameters(("plain", {}), ("remat", dict(remat=2)))
  def test_cell_matches_keras_rnn(self, kwargs):
    cell = keras.layers.LSTMCell(UNITS)
    self.assert_matches_keras(cell, cell, **kwargs)

  def test_step_model_matches_keras_rnn(self):
    # The state Input is float32, the new state bfloat16: the state keeps
    # its float32 dtype (a lossless cast of the bfloat16 value) and the cell
    # casts it back, so the numbers are Keras'.
    cell = keras.layers.GRUCell(UNITS)
    x_t, h = keras.Input((FEATURES,)), keras.Input((UNITS,))
    y, new_h = cell(x_t, [h])
    model = keras.Model([x_t, h], [y, new_h[0]])
    self.assertEqual((h.dtype, new_h[0].dtype), ("float32", "bfloat16"))
    # The backward pass carries the state's gradient in float32 too, where
    # Keras rounds it to bfloat16 at every step: measured 0.012 apart on
    # gradients up to ~3, one bfloat16 rounding there (ulp 2**-7 on [2, 4)).
    self.assert_matches_keras(model, cell, grad_tol=2e-2)
    _, (final,) = stepper.model_rnn(model, _x())
    self.assertEqual(final.dtype, tf.float32)

  def test_stack_matches_keras_stacked_rnn_cells(self):
    cells = [keras.layers.GRUCell(UNITS), keras.layers.LSTMCell(2)]
    self.assert_matches_keras(stepper.stack(cells),
                              keras.layers.StackedRNNCells(cells))

  def test_step_rnn_returns_the_compute_dtype_like_keras(self):
    keras.mixed_precision.set_global_policy("float32")
    cell = keras.layers.GRUCell(UNITS)  # float32 cell, float16 layer.
    layer = stepper.StepRNN(cell, return_state=True, dtype="mixed_float16")
    reference = keras.layers.RNN(cell, return_sequences=True,
                                 return_state=True, dtype="mixed_float16")
    actual, expected = layer(_x()), reference(_x())
    self.assertEqual([t.dtype for t in actual], [tf.float16] * 2)
    testing.assert_nests_close(list(actual), list(expected), rtol=0)

  def test_stateful_step_rnn_keeps_float32_states_like_keras(self):
    keras.mixed_precision.set_global_policy("mixed_float16")
    cells = [keras.layers.LSTMCell(UNITS) for _ in range(2)]
    layers = [stepper.StepRNN(cells[0], stateful=True),
              keras.layers.RNN(cells[1], return_sequences=True, stateful=True)]
    x = _x()
    layers[0](x)
    layers[1](x)
    cells[1].set_weights(cells[0].get_weights())
    for layer in layers:
      layer.reset_states()
    for _ in range(2):  # The second call starts from the carried states.
      actual, expected = layers[0](x), layers[1](x)
      self.assertEqual(actual.dtype, tf.float16)
      self.assertAllEqual(actual, expected)
    self.assertEqual([v.dtype for v in layers[0].states], ["float32"] * 2)
    self.assertAllEqual(list(layers[0].states), layers[1].states)

  @parameterized.named_parameters(
      ("bfloat16", "mixed_bfloat16", keras.optimizers.SGD, 1e-2),
      ("float16_loss_scale", "mixed_float16",
       lambda lr: keras.optimizers.LossScaleOptimizer(
           keras.optimizers.SGD(lr)), 1e-3))
  def test_trainer_update_matches_keras_rnn_hand_loop(self, policy,
                                                      make_optimizer, rtol):
    keras.mixed_precision.set_global_policy(policy)
    keras.utils.set_random_seed(1)
    x, y = _x(), tf.ones([BATCH, TIME, UNITS])
    cell, twin = keras.layers.GRUCell(UNITS), keras.layers.GRUCell(UNITS)
    layer = keras.layers.RNN(twin, return_sequences=True)
    layer(x)
    cell.build((None, FEATURES))
    cell.set_weights(twin.get_weights())
    optimizer, twin_optimizer = make_optimizer(0.5), make_optimizer(0.5)
    trainer = stepper.Trainer(cell, loss="mse", optimizer=optimizer)
    trainer.fit(tf.data.Dataset.from_tensors((x, y)), epochs=2, verbose=0)

    for _ in range(2):  # Keras' own loop: loss in float32, scaled.
      with tf.GradientTape() as tape:
        loss = keras.losses.MeanSquaredError()(y, layer(x))
        scaled = twin_optimizer.scale_loss(loss)
      variables = twin.trainable_variables
      twin_optimizer.apply(tape.gradient(scaled, variables), variables)
    self.assertEqual(int(optimizer.iterations), 2)
    # Same forward ops; the Trainer backpropagates the summed loss and
    # divides by the count in float32, Keras the mean: the half-precision
    # gradients round differently (measured 0.3% apart in bfloat16, whose
    # eps is 3.9e-3; float16's is 9.8e-4).
    testing.assert_nests_close(cell.trainable_variables,
                               twin.trainable_variables, rtol=rtol,
                               atol=rtol / 10)

  def test_tbptt_backpropagates_the_scaled_loss(self):
    # A loss so small that its float16 gradients underflow unless the
    # LossScaleOptimizer's scale (2**15) multiplies it before backprop, as
    # in Keras' fit. Reference: Keras' RNN over the same TBPTT(2, 2)
    # windows (TIME = 5: the last one has 1 step), the scaled loss taped.
    # Backpropagating the unscaled loss (the bug this pins) moved the
    # weights elsewhere than the reference.
    keras.mixed_precision.set_global_policy("mixed_float16")
    keras.utils.set_random_seed(2)
    x, y = _x(), tf.ones([BATCH, TIME, UNITS])
    tiny = lambda y_true, y_pred: 1e-7 * tf.reduce_mean(
        tf.square(y_true - y_pred), -1)
    cell, twin = keras.layers.GRUCell(UNITS), keras.layers.GRUCell(UNITS)
    layer = keras.layers.RNN(twin, return_sequences=True, return_state=True)
    layer(x)
    cell.build((None, FEATURES))
    cell.set_weights(twin.get_weights())
    make = lambda: keras.optimizers.LossScaleOptimizer(
        keras.optimizers.SGD(1e5))
    optimizer, twin_optimizer = make(), make()
    trainer = stepper.Trainer(cell, loss=tiny, optimizer=optimizer,
                              tbptt=(2, 2))
    before = [v.numpy() for v in cell.trainable_variables]
    trainer.fit(tf.data.Dataset.from_tensors((x, y)), verbose=0)

    state = None
    for begin, end in ((0, 2), (2, 4), (4, 5)):
      with tf.GradientTape() as tape:
        outputs, *state = layer(x[:, begin:end], initial_state=state)
        loss = tf.reduce_mean(tiny(y[:, begin:end],
                                   tf.cast(outputs, tf.float32)))
        scaled = twin_optimizer.scale_loss(loss)
      variables = twin.trainable_variables
      twin_optimizer.apply(tape.gradient(scaled, variables), variables)
      state = [tf.stop_gradient(s) for s in state]
    self.assertEqual(int(optimizer.iterations), 3)
    for b, a, t in zip(before, cell.trainable_variables,
                       twin.trainable_variables):
      self.assertGreater(np.abs(a - b).max(), 1e-5)  # Not underflowed.
      # float16 gradients rounded apart (sum vs mean, see above): 1e-3 of
      # the update.
      testing.assert_nests_close(a - b, t - b, rtol=1e-2, atol=1e-4)


if __name__ == "__main__":
  tf.test.main()
