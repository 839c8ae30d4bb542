"""Tests of `model_rnn(..., remat=...)`: checkpointed recomputation.

Claims: the gradients equal the plain engine's (float64 to 1e-10) and a
Keras RNN layer's with the same cell; the backward pass really re-runs every
step once; dropout inside the step is replayed; bad `remat` values raise.
"""

import re

from absl.testing import parameterized
import keras
import numpy as np
import tensorflow as tf

import stepper
from stepper import _fastpath
from stepper import testing

BATCH, TIME, FEATURES, UNITS = 3, 11, 4, 5
SEGMENTS = (("k1", 1), ("k2", 2), ("k7_not_dividing", 7), ("k_time", TIME),
            ("k_over_time", TIME + 5), ("sqrt", "sqrt"))


def _inputs(dtype=tf.float64, time=TIME):
  return tf.random.stateless_normal([BATCH, time, FEATURES], [7, 1],
                                    dtype=dtype)


def _gru(dtype="float64", features=FEATURES):
  cell = keras.layers.GRUCell(UNITS, dtype=dtype)
  cell.build([None, features])
  return cell


def _loss(outputs, final_states):
  # A ramp of weights, so a wrong time order or row changes the loss.
  def weighted(y):
    ramp = tf.cast(tf.range(tf.size(y)), y.dtype) / tf.cast(tf.size(y), y.dtype)
    return tf.reduce_sum(tf.sin(y) * tf.reshape(ramp, tf.shape(y)))
  terms = [weighted(y) for y in tf.nest.flatten(outputs)]
  terms += [tf.reduce_sum(tf.square(s)) for s in tf.nest.flatten(final_states)]
  return tf.add_n(terms)


def _grads(step, x, variables, mode, **kwargs):
  def run():
    with tf.GradientTape() as tape:
      tape.watch(x)
      outputs = stepper.model_rnn(step, x, **kwargs)
      loss = _loss(outputs[0], outputs[1:])
    return outputs, tape.gradient(loss, [x] + list(variables))
  return testing.in_mode(run, mode)()


class RematGradientTest(parameterized.TestCase, tf.test.TestCase):

  @parameterized.named_parameters(*SEGMENTS)
  def test_gradients_match_plain_engine_and_keras_rnn(self, remat):
    cell = _gru()
    x = _inputs()
    for mode in (testing.EAGER, testing.FUNCTION):
      outputs, grads = _grads(cell, x, cell.trainable_variables, mode,
                              remat=remat)
      plain_outputs, plain_grads = _grads(cell, x, cell.trainable_variables,
                                          mode)
      testing.assert_nests_close(outputs, plain_outputs, rtol=1e-10)
      testing.assert_nests_close(grads, plain_grads, rtol=1e-10)
    layer = keras.layers.RNN(cell, return_sequences=True, return_state=True,
                             dtype="float64")
    with tf.GradientTape() as tape:  # Independent reference: Keras' loop.
      tape.watch(x)
      keras_outputs = layer(x)
      loss = _loss(keras_outputs[0], keras_outputs[1:])
    keras_grads = tape.gradient(loss, [x] + cell.trainable_variables)
    testing.assert_nests_close(grads, keras_grads, rtol=1e-10)

  @parameterized.named_parameters(
      ("k3_xla", 3, tf.float64, 1e-10, False),
      # float32: XLA fuses the two programs differently, so the sums are
      # reordered: a normwise bound (see `assert_nests_close`).
      ("sqrt_xla_float32", "sqrt", tf.float32, 1e-5, True))
  def test_xla_gradients_match_plain_engine(self, remat, dtype, rtol,
                                            normwise):
    cell = _gru(dtype.name)
    x = _inputs(dtype)
    _, grads = _grads(cell, x, cell.trainable_variables, testing.XLA,
                      remat=remat)
    _, plain_grads = _grads(cell, x, cell.trainable_variables,
                            testing.FUNCTION)
    testing.assert_nests_close(grads, plain_grads, rtol=rtol,
                               normwise=normwise)

  @parameterized.named_parameters(
      ("mask_carry_forward", dict(mask=True)),
      ("mask_zero_output", dict(mask=True, zero_output_for_mask=True)),
      ("sequence_length", dict(sequence_length=True)),
      ("sequence_length_reverse", dict(sequence_length=True, reverse=True)),
      ("resets", dict(resets=True)),
      ("reverse", dict(reverse=True)),
      ("last_output_all_states", dict(return_sequences=False,
                                      return_all_states=True)),
      ("unroll", dict(unroll=2)),
      ("time_major", dict(time_major=True)))
  def test_controls_match_plain_engine(self, options):
    cell = _gru()
    x = _inputs()
    kwargs = dict(options)
    mask = tf.constant(np.random.RandomState(0).rand(BATCH, TIME) > 0.3)
    if kwargs.pop("mask", False):
      kwargs["mask"] = mask
    if kwargs.pop("resets", False):
      kwargs["resets"] = tf.logical_not(mask)
    if kwargs.pop("sequence_length", False):
      kwargs["sequence_length"] = tf.constant([5, 0, 9])
    if kwargs.get("time_major"):
      x = tf.transpose(x, [1, 0, 2])
    init = [tf.random.stateless_normal([BATCH, UNITS], [3, 3],
                                       dtype=tf.float64)]
    variables = cell.trainable_variables + init
    _, plain_grads = _grads(cell, x, variables, testing.FUNCTION,
                            initial_states=init, **kwargs)
    for remat in (3, "sqrt"):
      _, grads = _grads(cell, x, variables, testing.FUNCTION, remat=remat,
                        initial_states=init, **kwargs)
      testing.assert_nests_close(grads, plain_grads, rtol=1e-10,
                                 name=f"grads[remat={remat}]")

  def test_dynamic_time_matches_plain_engine(self):
    cell = _gru()
    x = _inputs()
    signature = [tf.TensorSpec([BATCH, None, FEATURES], tf.float64)]
    for remat in (4, "sqrt"):
      @tf.function(input_signature=signature)
      def run(x, remat=remat):
        return _grads(cell, x, cell.trainable_variables, testing.EAGER,
                      remat=remat)[1]
      testing.assert_nests_close(
          run(x), _grads(cell, x, cell.trainable_variables,
                         testing.FUNCTION)[1], rtol=1e-10)

  def test_stacked_steps_match_plain_engine(self):
    deep = stepper.stack([_gru(), _gru(features=UNITS)],
                         residual=(False, True))
    x = _inputs()
    _, grads = _grads(deep, x, deep.trainable_variables, testing.FUNCTION,
                      remat=4)
    _, plain_grads = _grads(deep, x, deep.trainable_variables,
                            testing.FUNCTION)
    testing.assert_nests_close(grads, plain_grads, rtol=1e-10)

  def test_inside_an_outer_while_loop_matches_plain_engine(self):
    # Like run_chunks: the engine runs inside a tf.while_loop body.
    cell = _gru()
    x = _inputs()

    def chunked(remat):
      def body(i, h, loss):
        chunk = x[:, 4 * i:4 * i + 4]
        y, new_h = stepper.model_rnn(cell, chunk, [h], remat=remat)
        return i + 1, new_h[0], loss + tf.reduce_sum(tf.sin(y))
      with tf.GradientTape() as tape:
        _, h, loss = tf.while_loop(
            lambda i, *_: i < 2, body,
            (0, tf.zeros([BATCH, UNITS], tf.float64),
             tf.constant(0.0, tf.float64)))
        loss += tf.reduce_sum(h ** 2)
      return tape.gradient(loss, cell.trainable_variables)

    testing.assert_nests_close(tf.function(chunked)(3),
                               tf.function(chunked)(None), rtol=1e-10)


  @parameterized.named_parameters(("through", "through"),
                                  ("truncate", "truncate"))
  def test_run_chunks_matches_plain_engine(self, gradient):
    cell = _gru()
    x = _inputs()

    def run(remat):
      with tf.GradientTape() as tape:
        tape.watch(x)
        outputs = stepper.run_chunks(cell, x, 4, gradient=gradient,
                                     remat=remat)
        loss = _loss(*outputs)
      return outputs, tape.gradient(loss, [x] + cell.trainable_variables)

    for remat in (2, "sqrt"):
      testing.assert_nests_close(tf.function(run)(remat),
                                 tf.function(run)(None), rtol=1e-10)

  def test_run_chunks_rejects_bad_remat(self):
    with self.assertRaisesRegex(ValueError, "`remat` must be None.*got 0"):
      stepper.run_chunks(_gru(), _inputs(), 4, remat=0)


  def test_nested_int_and_float_inputs_match_plain_engine(self):
    # Token ids (no gradient) next to float features, both sliced per segment.
    embedding = keras.layers.Embedding(10, 3, dtype="float64")
    cell = _gru(features=3 + FEATURES)

    def step(x_t, states):
      ids, features = x_t
      return cell(tf.concat([embedding(ids[:, 0]), features], -1), states)

    ids = tf.constant(np.random.RandomState(1).randint(0, 10, [BATCH, TIME, 1]))
    x = _inputs()
    init = [tf.zeros([BATCH, UNITS], tf.float64)]
    step((ids[:, 0], x[:, 0]), init)  # Builds the embedding.
    weights = embedding.trainable_variables + cell.trainable_variables

    def run(remat):
      with tf.GradientTape() as tape:
        tape.watch(x)
        outputs = stepper.model_rnn(step, (ids, x), init, remat=remat)
        loss = _loss(*outputs)
      grads = tape.gradient(loss, [x] + weights)
      return outputs, [tf.convert_to_tensor(g) for g in grads]

    for mode in (testing.EAGER, testing.FUNCTION):
      testing.assert_nests_close(testing.in_mode(lambda: run(4), mode)(),
                                 run(None), rtol=1e-10)


class RematMemoryTest(tf.test.TestCase):
  """The graph keeps no whole-sequence copy of the inputs."""

  def test_inputs_are_read_in_place(self):
    cell = _gru()

    def consumers(remat):
      @tf.function
      def run(x):
        with tf.GradientTape() as tape:
          y, _ = stepper.model_rnn(cell, x, remat=remat)
          loss = tf.reduce_sum(y)
        return tape.gradient(loss, cell.trainable_variables)
      graph = run.get_concrete_function(_inputs()).graph
      return {op.type for op in graph.inputs[0].consumers()}

    # The plain engine transposes [batch, time, ...] to time-major (so the
    # check can fail); remat slices each segment from the caller's tensor.
    self.assertIn("Transpose", consumers(None))
    self.assertNotIn("Transpose", consumers(3))

  def test_xla_makes_no_buffer_larger_than_a_sequence(self):
    # Slicing a segment with a size of -1 made XLA pad the whole input by its
    # own size in every dimension first: 2 ** 3 times the input, per slice.
    cell = _gru("float32")
    x = _inputs(tf.float32)

    @tf.function(jit_compile=True)
    def run(x):
      with tf.GradientTape() as tape:
        tape.watch(x)
        y, _ = stepper.model_rnn(cell, x, remat=3)
        loss = tf.reduce_sum(y)
      return tape.gradient(loss, [x] + cell.trainable_variables)

    hlo = run.experimental_get_compiler_ir(x)(stage="optimized_hlo")
    # The widest sequence is the GRU's hoisted input half, [time, batch,
    # 3 * units].
    sequence = BATCH * TIME * max(FEATURES, 3 * UNITS)
    largest = max(
        (int(np.prod([int(d) for d in dims.split(",")]))
         for dims in re.findall(r"= f32\[([\d,]+)\]", hlo)), default=0)
    # The padded copy was 8x; the largest legitimate buffers are the
    # sequences themselves (segment arrays round 11 steps up to 12).
    self.assertLessEqual(largest, 1.5 * sequence)

  def test_xla_recomputation_reads_the_weights_once(self):
    cell = _gru("float32")
    x = _inputs(tf.float32)

    def hlo():
      @tf.function(jit_compile=True)
      def run(x):
        with tf.GradientTape() as tape:
          y, _ = stepper.model_rnn(cell, x, remat=3)
          loss = tf.reduce_sum(y)
        return tape.gradient(loss, cell.trainable_variables)
      return run.experimental_get_compiler_ir(x)(stage="optimized_hlo")

    # The recurrent kernel [5, 15], stacked once per step of a segment.
    stacked = f"f32[3,{UNITS},{3 * UNITS}]"
    self.assertNotIn(stacked, hlo())
    with _fastpath.disabled():  # So the check can fail.
      self.assertIn(stacked, hlo())


def _dropout_step(seed):
  x = keras.Input([FEATURES], dtype="float32")
  h = keras.Input([UNITS], dtype="float32")
  dropped = keras.layers.Dropout(0.4, seed=seed)(x)
  new_h = keras.layers.Dense(UNITS, activation="tanh")(
      keras.layers.Concatenate()([dropped, h]))
  return keras.Model([x, h], [new_h, new_h])


class RematReplayTest(parameterized.TestCase, tf.test.TestCase):

  @parameterized.named_parameters(*testing.MODES)
  def test_dropout_gradients_match_plain_engine(self, mode):
    model = _dropout_step(seed=5)
    seed_state = [v for v in model.variables if "seed" in v.path][0]
    x = _inputs(tf.float32)
    start = seed_state.numpy()
    results = {}
    for remat in (None, 3):
      seed_state.assign(start)
      _, grads = _grads(model, x, model.trainable_variables, mode,
                        remat=remat, training=True)
      results[remat] = (grads, seed_state.numpy())
    plain_grads, plain_end = results[None]
    grads, end = results[3]
    # float32; under XLA the two programs fuse differently (see above).
    testing.assert_nests_close(grads, plain_grads, rtol=1e-5, atol=1e-6)
    # The recomputation leaves the generator where the forward pass left it.
    self.assertAllEqual(end, plain_end)
    self.assertNotAllEqual(end, start)

  def test_dropout_without_replay_would_differ(self):
    # The test above can fail: a second plain run draws other masks.
    model = _dropout_step(seed=5)
    x = _inputs(tf.float32)
    _, first = _grads(model, x, model.trainable_variables, testing.EAGER,
                      training=True)
    _, second = _grads(model, x, model.trainable_variables, testing.EAGER,
                       training=True)
    with self.assertRaises(AssertionError):
      testing.assert_nests_close(first, second, rtol=1e-5)

  @parameterized.named_parameters(("k1", 1), ("k3", 3), ("k_time", TIME),
                                  ("k_over_time", 20))
  def test_backward_pass_recomputes_every_step_once(self, remat):
    cell = _gru()
    calls = []

    def step(x_t, states):
      calls.append(1)
      return cell(x_t, states)

    x = _inputs()
    init = [tf.zeros([BATCH, UNITS], tf.float64)]
    for k, expected in ((remat, TIME), (None, 0)):
      with tf.GradientTape() as tape:
        y, _ = stepper.model_rnn(step, x, init, remat=k)
        loss = tf.reduce_sum(y)
      del calls[:]
      tape.gradient(loss, cell.trainable_variables)
      self.assertLen(calls, expected, msg=f"remat={k}")

  def test_stateful_random_op_raises(self):
    def noisy(x_t, states):
      return x_t, [states[0] + tf.random.uniform(tf.shape(states[0]))]

    with self.assertRaisesRegex(ValueError, "cannot replay the stateful "
                                "random op .*RandomUniform"):
      stepper.model_rnn(noisy, tf.zeros([2, 3, 4]), [tf.zeros([2, 4])],
                        remat=2)


class RematArgumentTest(parameterized.TestCase, tf.test.TestCase):

  @parameterized.named_parameters(
      ("zero", 0, ValueError, "positive int.*got 0"),
      ("negative", -2, ValueError, "positive int.*got -2"),
      ("other_string", "log", ValueError, "got the string 'log'"),
      ("float", 2.5, TypeError, "got 2.5 of type float"),
      ("bool", True, TypeError, "got True of type bool"))
  def test_remat_raises_on_bad_value(self, remat, error, message):
    cell = _gru("float32")
    x = tf.zeros([2, 3, FEATURES])
    with self.assertRaisesRegex(error, r"`remat` must be None.*" + message):
      stepper.model_rnn(cell, x, remat=remat)
    with self.assertRaisesRegex(error, r"`remat` must be None.*" + message):
      tf.function(lambda x: stepper.model_rnn(cell, x, remat=remat))(x)

  def test_numpy_int_is_accepted(self):
    cell = _gru("float32")
    y, _ = stepper.model_rnn(cell, tf.ones([2, 5, FEATURES]),
                             remat=np.int64(2))
    self.assertEqual(y.shape, (2, 5, UNITS))


if __name__ == "__main__":
  tf.test.main()
