"""Tests of `stepper.steps`: the three step kinds adapt to one `Step` that
calls the cell as Keras does; `wrap_call` wraps every per-step call."""

import keras
import numpy as np
import tensorflow as tf

import _cells
import stepper
from stepper import steps as steps_lib
from stepper import testing

BATCH, FEATURES, UNITS = 3, 4, 5


class AsStepTest(tf.test.TestCase):

  def setUp(self):
    super().setUp()
    keras.utils.set_random_seed(0)
    self.cell = keras.layers.SimpleRNNCell(UNITS)
    self.x_t = tf.random.normal([BATCH, FEATURES])
    self.h = [tf.random.normal([BATCH, UNITS])]

  def test_model_cell_and_callable_match_the_cell_call(self):
    expected_y, expected_h = self.cell(self.x_t, self.h)  # Also builds.
    kinds = {
        "cell": self.cell,
        "model": _cells.step_model(self.cell, FEATURES, "float32"),
        "callable": lambda x_t, states: self.cell(x_t, states),
    }
    for kind, step in kinds.items():
      with self.subTest(kind):
        y, h = steps_lib.as_step(step)(self.x_t, self.h)
        testing.assert_nests_close(y, expected_y, rtol=1e-6)
        testing.assert_nests_close(tf.nest.flatten(h),
                                   tf.nest.flatten(expected_h), rtol=1e-6)

  def test_adapters_are_cached_per_object(self):
    self.assertIs(stepper.as_step(self.cell), stepper.as_step(self.cell))
    adapted = stepper.as_step(self.cell)
    self.assertIs(stepper.as_step(adapted), adapted)

  def test_output_spec_matches_a_real_call(self):
    step = stepper.as_step(self.cell)
    y_spec, h_spec = step.output_spec(
        tf.TensorSpec([None, FEATURES]), [tf.TensorSpec([None, UNITS])])
    y, h = step(self.x_t, self.h)
    self.assertTrue(y_spec.is_compatible_with(y))
    self.assertTrue(h_spec[0].is_compatible_with(h[0]))

  def test_callable_without_states_raises_on_initial_state(self):
    step = stepper.as_step(lambda x, s: (x, s))
    with self.assertRaisesRegex(ValueError, "Pass `initial_states`"):
      step.initial_state(BATCH)

  def test_raises_on_non_step(self):
    with self.assertRaisesRegex(TypeError, "got int"):
      stepper.as_step(42)


class WrapCallTest(tf.test.TestCase):

  def test_wraps_the_per_run_function_from_start(self):
    # Reference: the wrapped run equals the inner step on transformed inputs,
    # and `start` was asked once per run for the per-step function.
    cell = keras.layers.GRUCell(UNITS)
    starts = []

    def start(batch, training):
      starts.append(training)
      return inner
    inner = steps_lib.Step(
        lambda x, s, training: cell(x, s, training=training),
        name="gru", state_specs=stepper.as_step(cell).state_specs,
        initial_state_fn=stepper.as_step(cell).initial_state, start_fn=start)
    wrapped = steps_lib.wrap_call(
        inner, lambda call: lambda x, s, training: call(x * 3.0, s, training),
        name="tripled", initial_state_fn=inner.initial_state, module=cell)
    x = tf.random.normal([BATCH, 6, FEATURES])
    y, _ = stepper.model_rnn(wrapped, x, training=False)
    self.assertEqual(starts, [False])
    # hoist=False: the wrapped step runs the cell per step too.
    expected, _ = stepper.model_rnn(cell, x * 3.0, hoist=False)
    testing.assert_nests_close(y, expected, rtol=1e-6)
    self.assertEqual(wrapped.name, "tripled")
    self.assertIs(wrapped.state_specs, inner.state_specs)
    self.assertEqual(
        [v.name for v in wrapped.trainable_variables],
        [v.name for v in cell.trainable_variables])

  def test_wrapped_step_without_module_has_no_variables(self):
    inner = stepper.as_step(keras.layers.GRUCell(UNITS))
    wrapped = steps_lib.wrap_call(inner, lambda call: call, name="plain")
    self.assertEqual(wrapped.trainable_variables, [])
    self.assertIsNone(wrapped.input_spec)
    np.testing.assert_equal(wrapped.state_specs is inner.state_specs, True)


if __name__ == "__main__":
  tf.test.main()
