"""Tests for hoisting (`stepper._hoist`, `model_rnn(hoist=...)`,
`stepper.steps.split`): the input half computed for all steps before the loop
gives the per-step results.

References: the Keras cell called step by step (step-level tests), and the
engine with `hoist=False` or the same step wrapped in a plain callable, which
never splits (engine-level tests). float64 cases hold to 1e-10 relative,
float32 to 1e-5: the hoisted sums group their terms differently.
"""

from absl.testing import parameterized
import keras
import numpy as np
import tensorflow as tf

import stepper
from stepper import _hoist
from stepper import testing

BATCH, TIME, FEATURES, UNITS = 3, 6, 4, 5
_F64 = dict(rtol=1e-10, atol=1e-12)

_CELLS = {
    "simple_rnn": lambda **kw: keras.layers.SimpleRNNCell(UNITS, **kw),
    "gru": lambda **kw: keras.layers.GRUCell(UNITS, **kw),
    "gru_v1": lambda **kw: keras.layers.GRUCell(UNITS, reset_after=False,
                                                **kw),
    "lstm": lambda **kw: keras.layers.LSTMCell(UNITS, **kw),
    "lstm_impl1": lambda **kw: keras.layers.LSTMCell(UNITS, implementation=1,
                                                     **kw),
    "gru_impl1": lambda **kw: keras.layers.GRUCell(UNITS, implementation=1,
                                                   **kw),
}


def _cell(name, dtype="float64", features=FEATURES, **kwargs):
  keras.utils.set_random_seed(1)
  cell = _CELLS[name](dtype=dtype, **kwargs)
  cell.build((None, features))
  # Nonzero biases, so a bias added on the wrong side shows.
  for v in cell.trainable_variables:
    v.assign(np.random.default_rng(2).normal(size=v.shape) * 0.5)
  return cell


def _data(dtype="float64", seed=0):
  rng = np.random.default_rng(seed)
  x = tf.constant(rng.normal(size=(BATCH, TIME, FEATURES)), dtype)
  return x, rng


def _per_step_keras(cell, xs, states, training):
  """The cell's own call at every step of time-major `xs`."""
  ys = []
  for t in range(xs.shape[0]):
    y, states = cell(xs[t], states, training=training)
    ys.append(y)
  return tf.stack(ys), states


def _per_step_split(split, xs, states, training):
  p = split.project(xs, training, 0)
  ys = []
  for t in range(xs.shape[0]):
    y, states = split.core(p[t], states, training)
    ys.append(y)
  return tf.stack(ys), states


def _in_mode(fn, mode):
  """`testing.in_mode` without autograph: the engine needs none, and
  converting stepper's modules costs seconds per process."""
  if mode == testing.EAGER:
    return fn
  return tf.function(fn, autograph=False,
                     jit_compile=mode == testing.XLA)


class CellSplitTest(parameterized.TestCase):

  @parameterized.named_parameters(
      (f"{name}_{kind}", name, kind)
      for name in _CELLS for kind in ("plain", "no_bias"))
  def test_cell_split_matches_keras_cell_step_by_step(self, name, kind):
    cell = _cell(name, use_bias=kind == "plain")
    training = False
    x, rng = _data()
    xs = tf.transpose(x, [1, 0, 2])
    h0 = [tf.constant(rng.normal(size=(BATCH, UNITS)))
          for _ in tf.nest.flatten(cell.state_size)]
    split = _hoist.cell_split(cell, training)
    actual = _per_step_split(split, xs, h0, training)
    expected = _per_step_keras(cell, xs, h0, training)
    testing.assert_nests_close(actual, expected, **_F64)

  def test_split_applies_only_to_built_keras_cells(self):
    class MyLSTM(keras.layers.LSTMCell):
      pass

    self.assertIsNone(_hoist.cell_split(MyLSTM(3), False))
    self.assertIsNone(_hoist.cell_split(keras.layers.LSTMCell(3), False))
    # Recurrent dropout masks are drawn per run by the step's `start`: not
    # hoisted (input dropout is: tests/dropout_test.py).
    self.assertIsNone(_hoist.cell_split(
        _cell("gru", dropout=0.5, recurrent_dropout=0.5), True))
    self.assertIsNotNone(_hoist.cell_split(_cell("gru"), True))


def _gradients(step, x, h0, hoist, **kwargs):
  with tf.GradientTape() as tape:
    tape.watch([x, h0])
    outputs, final = stepper.model_rnn(step, x, h0, hoist=hoist, **kwargs)
    loss = tf.reduce_sum(tf.sin(outputs)) + sum(
        tf.reduce_sum(s * s) for s in tf.nest.flatten(final))
  variables = stepper.as_step(step).trainable_variables
  return outputs, final, tape.gradient(loss, [x, h0, variables])


def _loop_matmuls(fn, x) -> int:
  """MatMul ops in the forward loop body of `fn`'s graph."""
  graph_def = tf.function(fn, autograph=False).get_concrete_function(
      x).graph.as_graph_def()
  return sum(node.op in ("MatMul", "BatchMatMulV2")
             for f in graph_def.library.function
             if "while_body" in f.signature.name and "gradient" not in
             f.signature.name for node in f.node_def)


class EngineTest(parameterized.TestCase):

  @parameterized.named_parameters(
      ("plain", {}),
      ("mask", dict(mask="mask")),
      ("sequence_length_reverse", dict(sequence_length=[6, 2, 0],
                                       reverse=True)),
      ("resets_unroll", dict(resets="resets", unroll=4)),
      ("remat", dict(remat=2)),
      ("remat_reverse_mask", dict(remat=3, reverse=True, mask="mask")),
      ("time_major", dict(time_major=True)),
  )
  def test_hoisted_lstm_matches_per_step(self, kwargs):
    cell = _cell("lstm")
    x, rng = _data()
    kwargs = dict(kwargs)
    for name in ("mask", "resets"):
      if kwargs.get(name) == name:
        kwargs[name] = tf.constant(rng.random((BATCH, TIME)) > 0.4)
    if kwargs.get("time_major"):
      x = tf.transpose(x, [1, 0, 2])
      for name in ("mask", "resets"):
        if name in kwargs:
          kwargs[name] = tf.transpose(kwargs[name])
    h0 = tf.constant(rng.normal(size=(BATCH, UNITS)))
    h0 = [h0, -h0]
    actual = _gradients(cell, x, h0, True, **kwargs)
    expected = _gradients(cell, x, h0, False, **kwargs)
    testing.assert_nests_close(actual, expected, **_F64)

  @parameterized.named_parameters(
      ("simple_rnn_eager", "simple_rnn", testing.EAGER),
      ("gru_v1_function", "gru_v1", testing.FUNCTION),
      ("gru_xla", "gru", testing.XLA))
  def test_hoisted_float32_cells_match_per_step(self, name, mode):
    x, rng = _data("float32")
    cell = _cell(name, dtype="float32")
    h0 = [tf.constant(rng.normal(size=(BATCH, UNITS)), tf.float32)]
    run = _in_mode(
        lambda x, h0, hoist: _gradients(cell, x, h0, hoist, unroll=2), mode)
    # One [time * batch] matmul vs per-step ones: the float32 sums are
    # grouped otherwise, so a normwise bound (see `assert_nests_close`).
    testing.assert_nests_close(run(x, h0, True), run(x, h0, False),
                               rtol=1e-5, normwise=True)

  def test_hoisted_loop_runs_only_the_recurrent_matmul(self):
    cell = _cell("lstm", dtype="float32")
    x, _ = _data("float32")
    hoisted = _loop_matmuls(
        lambda x: stepper.model_rnn(cell, x, hoist=True)[0], x)
    per_step = _loop_matmuls(
        lambda x: stepper.model_rnn(cell, x, hoist=False)[0], x)
    self.assertEqual((hoisted, per_step), (1, 2))

  def test_hoist_raises_on_a_non_bool(self):
    with self.assertRaisesRegex(TypeError, "`hoist` must be a bool; got 1"):
      stepper.model_rnn(_cell("gru"), _data()[0], hoist=1)

  def test_stack_hoists_its_bottom_layer(self):
    x, rng = _data()
    cells = [_cell("gru"), _cell("lstm", features=UNITS)]
    deep = stepper.stack(cells)
    self.assertIsNotNone(deep.split(False))
    self.assertIsNone(stepper.stack(cells, residual=True).split(False))
    h0 = (list(_cell("gru").get_initial_state(BATCH)),
          [tf.constant(rng.normal(size=(BATCH, UNITS))) for _ in range(2)])
    mask = tf.constant(rng.random((BATCH, TIME)) > 0.3)
    testing.assert_nests_close(_gradients(deep, x, h0, True, mask=mask),
                               _gradients(deep, x, h0, False, mask=mask),
                               **_F64)
    self.assertEqual(_loop_matmuls(
        lambda x: stepper.model_rnn(deep, x, hoist=True)[0], x),
                     _loop_matmuls(lambda x: stepper.model_rnn(
                         deep, x, hoist=False)[0], x) - 1)

  def test_run_chunks_and_step_rnn_match_a_callable_that_never_splits(self):
    cell = _cell("gru")
    x, _ = _data()
    per_step = lambda x_t, states: cell(x_t, states)
    testing.assert_nests_close(
        stepper.run_chunks(cell, x, 4, cell.get_initial_state(BATCH)),
        stepper.run_chunks(per_step, x, 4, cell.get_initial_state(BATCH)),
        **_F64)
    layer = stepper.StepRNN(cell, return_state=True)
    testing.assert_nests_close(
        layer(x), [stepper.model_rnn(cell, x, hoist=False)[0],
                   *stepper.model_rnn(cell, x, hoist=False)[1]], **_F64)


  def test_step_rnn_and_run_chunks_take_hoist(self):
    cell = _cell("gru")
    x, _ = _data()
    states = cell.get_initial_state(BATCH)
    testing.assert_nests_close(
        stepper.run_chunks(cell, x, 4, states, hoist=True),
        stepper.run_chunks(cell, x, 4, states), **_F64)
    layer = stepper.StepRNN(cell, hoist=True)
    self.assertTrue(layer.get_config()["hoist"])
    self.assertTrue(stepper.StepRNN.from_config(layer.get_config()).hoist)
    self.assertEqual(_loop_matmuls(layer, x), 1)
    # Off by default: x_t @ kernel per step.
    self.assertEqual(_loop_matmuls(stepper.StepRNN(cell), x), 2)
    self.assertEqual(_loop_matmuls(
        lambda x: stepper.model_rnn(cell, x)[0], x), 2)
    with self.assertRaisesRegex(TypeError, "`hoist` must be a bool; got 'no'"):
      stepper.StepRNN(cell, hoist="no")
    with self.assertRaisesRegex(TypeError, "`hoist` must be a bool; got 0"):
      stepper.run_chunks(cell, x, 4, hoist=0)

  @parameterized.named_parameters(("hoisted", True), ("per_step", False))
  def test_float32_cell_inside_a_mixed_precision_layer(self, hoist):
    # The layer's autocast scope casts float32 weights to float16 as they
    # are read; the cell's own __call__ resets it to float32. The hoisted
    # halves run outside that __call__ and must read float32 weights too
    # (they crashed on a float32 x float16 MatMul, or would compute in
    # float16 silently).
    cell = _cell("lstm", dtype="float32")
    x, _ = _data("float32")

    class Outer(keras.layers.Layer):

      def call(self, x):
        return stepper.model_rnn(cell, x, hoist=hoist)[0]

    outer = Outer(dtype="mixed_float16")
    with tf.GradientTape() as tape:
      inside = outer(x)
      loss = tf.reduce_sum(inside ** 2)
    grads = tape.gradient(loss, cell.trainable_variables)
    self.assertEqual(inside.dtype, tf.float32)
    # The layer's __call__ casts its input to float16, as Keras does.
    x16 = tf.cast(tf.cast(x, tf.float16), tf.float32)
    testing.assert_nests_close([inside, grads],
                               list(_gradients_and_outputs(cell, x16)),
                               rtol=1e-5, atol=1e-6)


def _gradients_and_outputs(cell, x):
  """`model_rnn(cell)` outside any layer (float32 throughout, per step)."""
  with tf.GradientTape() as tape:
    outputs = stepper.model_rnn(cell, x, hoist=False)[0]
    loss = tf.reduce_sum(outputs ** 2)
  return outputs, tape.gradient(loss, cell.trainable_variables)


def _step_model(dropout=0.0):
  """x_t -> LayerNorm -> Dense -> tanh * 2 (hoistable) meets the state; a
  Dense of the raw x_t feeds the output too."""
  x = keras.Input((FEATURES,), dtype="float64")
  h = keras.Input((UNITS,), dtype="float64")
  a = keras.layers.Dense(UNITS, dtype="float64")(
      keras.layers.LayerNormalization(dtype="float64")(x))
  a = keras.ops.tanh(a) * 2.0
  new_h = keras.layers.Add(dtype="float64")(
      [a, keras.layers.Dense(UNITS, dtype="float64")(h)])
  new_h = keras.layers.Activation("tanh", dtype="float64")(new_h)
  if dropout:
    new_h = keras.layers.Dropout(dropout, seed=4, dtype="float64")(new_h)
  y = keras.layers.Dense(2, dtype="float64")(
      keras.layers.Concatenate(dtype="float64")([new_h, x]))
  return keras.Model([x, h], [y, new_h])


class ModelSplitTest(parameterized.TestCase):

  def test_model_split_hoists_the_layers_of_x_alone(self):
    keras.utils.set_random_seed(0)
    model = _step_model()
    split = _hoist.model_split(model)
    x, _ = _data()
    projected = split.project(tf.transpose(x, [1, 0, 2]), False, 0)
    # tanh(Dense(LayerNorm(x))) * 2 for the state, and raw x for the output.
    self.assertEqual(sorted(p.shape[-1] for p in projected),
                     sorted([UNITS, FEATURES]))

  @parameterized.named_parameters(*testing.MODES[::2])  # eager, xla
  def test_hoisted_model_matches_per_step(self, mode):
    keras.utils.set_random_seed(0)
    model = _step_model()
    x, rng = _data()
    h0 = [tf.constant(rng.normal(size=(BATCH, UNITS)))]
    run = _in_mode(
        lambda x, h0, hoist: _gradients(model, x, h0, hoist, reverse=True,
                                        sequence_length=[6, 1, 4]), mode)
    testing.assert_nests_close(run(x, h0, True), run(x, h0, False), **_F64)

  def test_model_without_hoistable_layers_does_not_split(self):
    x = keras.Input((FEATURES,))
    h = keras.Input((UNITS,))
    new_h = keras.layers.Dense(UNITS)(keras.layers.Concatenate()([x, h]))
    self.assertIsNone(_hoist.model_split(keras.Model([x, h], [new_h, new_h])))
    drop = keras.layers.Dense(UNITS)(keras.layers.Dropout(0.5)(x))
    lam = keras.layers.Lambda(lambda v: v * 2)(x)
    out = keras.layers.Add()([drop, keras.layers.Dense(UNITS)(lam), h])
    self.assertIsNone(_hoist.model_split(keras.Model([x, h], [out, out])))

  def test_dropout_in_the_core_keeps_its_training_behaviour(self):
    keras.utils.set_random_seed(0)
    model = _step_model(dropout=0.5)
    x, rng = _data()
    h0 = [tf.constant(rng.normal(size=(BATCH, UNITS)))]
    testing.assert_nests_close(_gradients(model, x, h0, True),
                               _gradients(model, x, h0, False), **_F64)


class SplitStepTest(parameterized.TestCase):

  @parameterized.named_parameters(*testing.MODES[:2])  # eager, function
  def test_split_step_matches_its_per_step_form(self, mode):
    keras.utils.set_random_seed(0)
    dense = keras.layers.Dense(UNITS, dtype="float64")
    cell = _cell("gru", features=UNITS)
    step = stepper.steps.split(dense, cell)
    x, rng = _data()
    h0 = [tf.constant(rng.normal(size=(BATCH, UNITS)))]
    run = _in_mode(
        lambda x, h0, hoist: _gradients(step, x, h0, hoist, unroll=3), mode)
    actual = run(x, h0, True)
    testing.assert_nests_close(actual, run(x, h0, False), **_F64)
    # The reference by hand: the GRU over Dense(x_t), step by step.
    expected = _per_step_keras(cell, tf.transpose(dense(x), [1, 0, 2]), h0,
                               False)
    testing.assert_nests_close(actual[0], tf.transpose(expected[0], [1, 0, 2]),
                               **_F64)
    self.assertLen(step.trainable_variables, 5)  # Dense 2 + GRU 3.


if __name__ == "__main__":
  tf.test.main()
