"""Tests of the private loop module `stepper._loop`: its tensor helpers
against numpy, and `Loop`'s step body driven from any start step against
`model_rnn` (itself tested against Keras in engine_test.py)."""

import keras
import numpy as np
import tensorflow as tf

import stepper
from stepper import _loop
from stepper import masking
from stepper import testing

BATCH, TIME, FEATURES, UNITS = 3, 7, 4, 5


class HelpersTest(tf.test.TestCase):

  def test_swap_batch_time_and_merge_leading_dims_match_numpy(self):
    x = np.arange(2 * 3 * 4 * 5, dtype=np.float32).reshape([2, 3, 4, 5])
    self.assertAllEqual(_loop.swap_batch_time(tf.constant(x)),
                        np.swapaxes(x, 0, 1))
    merged = _loop.merge_leading_dims(tf.constant(x))
    self.assertAllEqual(merged, x.reshape([6, 4, 5]))
    self.assertEqual(merged.shape.as_list(), [6, 4, 5])

  def test_merge_leading_dims_keeps_the_static_tail(self):
    merged = tf.function(_loop.merge_leading_dims).get_concrete_function(
        tf.TensorSpec([None, 3, 4])).structured_outputs
    self.assertEqual(merged.shape.as_list(), [None, 4])

  def test_reverse_rows_and_select_match_numpy(self):
    x = np.arange(4 * 2, dtype=np.float32).reshape([4, 2])[..., None]
    lengths = np.array([3, 1], np.int32)
    expected = x.copy()
    for b, n in enumerate(lengths):
      expected[:n, b] = x[:n, b][::-1]
    self.assertAllEqual(_loop.reverse_rows(tf.constant(x), lengths), expected)
    keep = tf.constant([True, False])
    new, old = tf.ones([2, 3]), tf.zeros([2, 3])
    self.assertAllEqual(_loop.select(keep, new, old),
                        [[1.0] * 3, [0.0] * 3])


class LoopTest(tf.test.TestCase):

  def _loop(self, cell, x_time_major):
    step = stepper.as_step(cell)
    states = step.initial_state(BATCH)
    controls = masking.prepare(
        mask=None, sequence_length=None, resets=None,
        zero_output_for_mask=False, batch=BATCH, time=TIME, time_major=True)
    y_spec, _ = step.output_spec(
        _loop.step_spec(x_time_major, time_major=True),
        tf.nest.map_structure(lambda s: tf.TensorSpec(s.shape, s.dtype),
                              states))
    return step, states, _loop.Loop(
        step, 0, y_spec, states, controls, reset_to=states, training=None,
        reverse=False, return_sequences=True, return_all_states=False,
        parallel_iterations=None, swap_memory=False)

  def test_run_segment_matches_model_rnn_on_the_segment(self):
    keras.utils.set_random_seed(0)
    cell = keras.layers.GRUCell(UNITS)
    x = tf.random.normal([TIME, BATCH, FEATURES])
    step, states, loop = self._loop(cell, x)
    # hoist=False: the same per-step arithmetic as the Loop under test.
    expected_y, expected_states = stepper.model_rnn(
        cell, x[2:6], states, time_major=True, hoist=False)
    rows, flat_states, _ = loop.run_segment(
        step.start(BATCH), 4, [x[2:6]], {}, tf.nest.flatten(states), [], [],
        unroll=3)
    testing.assert_nests_close(rows[0], expected_y, rtol=1e-6)
    testing.assert_nests_close(flat_states, tf.nest.flatten(expected_states),
                               rtol=1e-6)

  def test_steps_from_a_later_start_with_unroll_matches_model_rnn(self):
    # Steps 2..6 of the whole sequence (read from step 2 of the arrays), four
    # per unrolled iteration and a remainder of one: the states after them
    # are those of model_rnn on the slice from the same starting states.
    keras.utils.set_random_seed(1)
    cell = keras.layers.GRUCell(UNITS)
    x = tf.random.normal([TIME, BATCH, FEATURES])
    step, states, loop = self._loop(cell, x)
    feed = _loop._Feed(  # pylint: disable=protected-access
        call=step.start(BATCH), time=TIME,
        # The list holds the steps from the first one run on.
        input_lists=[_loop.step_list(x[2:])],
        input_specs=[tf.TensorSpec(x.shape[1:], x.dtype)], control_tas={},
        flat_reset=tf.nest.flatten(states), reverse=False)
    out_ta = tf.TensorArray(tf.float32, size=TIME,
                            element_shape=[BATCH, UNITS])
    carry = ([out_ta], [], tf.nest.flatten(states), [])
    out_tas, _, flat_states, _ = loop.steps(feed, carry, 2, 7, 4,
                                            max_steps=TIME)
    expected_y, expected_states = stepper.model_rnn(
        cell, x[2:7], states, time_major=True, hoist=False)
    testing.assert_nests_close(out_tas[0].gather(tf.range(2, 7)), expected_y,
                               rtol=1e-6)
    testing.assert_nests_close(flat_states, tf.nest.flatten(expected_states),
                               rtol=1e-6)

  def test_input_gradient_costs_constant_work_per_step(self):
    # Backpropagating into a per-step `TensorArray.read` builds a whole
    # `time`-slot list per step (`TensorListReserve` in the backward body):
    # O(time^2) for a hoisted projection or a stack's upper layer. The
    # loop pops its inputs instead, whose gradient is one push.
    cell = keras.layers.GRUCell(UNITS)
    x = tf.random.normal([BATCH, TIME, FEATURES])
    cell.build((None, FEATURES))

    def gradients(x):
      with tf.GradientTape() as tape:
        tape.watch(x)
        loss = tf.reduce_sum(
            stepper.model_rnn(cell, x, hoist=False, unroll=2)[0] ** 2)
      return tape.gradient(loss, [x, *cell.trainable_variables])

    graph_def = tf.function(gradients).get_concrete_function(
        x).graph.as_graph_def()
    backward = [f for f in graph_def.library.function
                if "body" in f.signature.name
                and "_grad_" in f.signature.name]
    self.assertLen(backward, 2)  # The unrolled loop and the remainder.
    ops = {node.op for f in backward for node in f.node_def}
    self.assertIn("TensorListPushBack", ops)
    self.assertNotIn("TensorListReserve", ops)
    # And the gradient is right: the per-step Keras cell, eagerly.
    with tf.GradientTape() as tape:
      tape.watch(x)
      states, ys = cell.get_initial_state(BATCH), []
      for t in range(TIME):
        y, states = cell(x[:, t], states)
        ys.append(y)
      loss = tf.reduce_sum(tf.stack(ys) ** 2)
    expected = tape.gradient(loss, [x, *cell.trainable_variables])
    testing.assert_nests_close(tf.function(gradients)(x), expected,
                               rtol=1e-5, atol=1e-6)


if __name__ == "__main__":
  tf.test.main()
