"""Tests for `mask` / `sequence_length` / `zero_output_for_mask` of `model_rnn`.

References: the GRU tables of two public Q&As on migrating from
`tf.nn.dynamic_rnn(sequence_length=...)` to Keras masking (numbers copied
below), Keras `GRU`/`LSTM` layers called with a mask (copied weights), and an
independent numpy loop for `sequence_length`.
"""

from absl.testing import parameterized
import keras
import numpy as np
import tensorflow as tf

import stepper
from stepper import testing

# --- The Q&A setup: GRU(1) with weights of ones and no activations. ---------
_PAD = 0.37
_SEED_X = np.array(
    [[[1, 1], [2, 2], [1, 1], [_PAD, _PAD], [_PAD, _PAD]],
     [[_PAD, _PAD], [1, 1], [2, 2], [1, 1], [_PAD, _PAD]]], np.float32)
_SEED_IDS = np.array([[1, 2, 1, 0, 0], [0, 1, 2, 1, 0]])
_SEED_EMBEDDING = np.ones([3, 2], np.float32) * np.array(
    [[_PAD], [1.], [2.]], np.float32)
_SEED_LENGTHS = [3, 4]
# m1: no mask, the padding runs as data.
_SEED_M1 = [[-6, -50, -156, -272.7276, -475.83362],
            [-1.2876, -9.862801, -69.314, -213.94202, -373.54672]]
# m2: Keras Masking, states and outputs carried forward over padding.
_SEED_M2 = [[-6, -50, -156, -156, -156], [0, -6, -50, -156, -156]]
# old: tf.nn.dynamic_rnn(sequence_length=[3, 4]), zeros from the length on.
_SEED_OLD = [[-6, -50, -156, 0, 0], [0, -6, -50, -156, 0]]

BATCH, TIME, FEATURES, UNITS = 4, 6, 3, 5


def _seed_cell():
  cell = keras.layers.GRUCell(
      1, activation=None, recurrent_activation=None,
      kernel_initializer="ones", recurrent_initializer="zeros",
      use_bias=True, bias_initializer="ones", reset_after=False)
  cell.build((None, 2))
  return cell


def _masks(padding):
  """bool `[BATCH, TIME]` masks; every case has a row with no valid step."""
  lengths = np.array([TIME, 4, 1, 0])
  right = np.arange(TIME)[None] < lengths[:, None]
  if padding == "right":
    return right
  if padding == "left":
    return right[:, ::-1].copy()
  return np.random.RandomState(0).rand(BATCH, TIME) < 0.6  # "holes"


class _KerasCase:
  """A Keras `GRU`/`LSTM` layer and a separate cell with copied weights."""

  def __init__(self, kind, dtype, **layer_kwargs):
    keras.utils.set_random_seed(1)
    layer_cls = {"gru": keras.layers.GRU, "lstm": keras.layers.LSTM}[kind]
    cell_cls = {"gru": keras.layers.GRUCell, "lstm": keras.layers.LSTMCell}
    self.layer = layer_cls(UNITS, return_state=True, dtype=dtype,
                           **layer_kwargs)
    self.layer.build((None, None, FEATURES))
    self.cell = cell_cls[kind](UNITS, dtype=dtype)
    self.cell.build((None, FEATURES))
    self.cell.set_weights(self.layer.cell.get_weights())
    rng = np.random.RandomState(2)
    self.x = tf.constant(rng.randn(BATCH, TIME, FEATURES), dtype)
    self.init = [tf.constant(rng.randn(BATCH, UNITS), dtype)
                 for _ in tf.nest.flatten(self.cell.state_size)]
    self.out_w = tf.constant(rng.randn(BATCH, TIME, UNITS), dtype)

  def loss(self, outputs, states):
    """A loss touching every output and state with distinct weights."""
    w = self.out_w if outputs.shape.rank == 3 else self.out_w[:, 0]
    return tf.reduce_sum(outputs * w) + sum(
        tf.reduce_sum(s * (i + 2.)) for i, s in enumerate(states))

  def keras_run(self, mask):
    with tf.GradientTape() as tape:
      tape.watch([self.x, self.init])
      outputs, *states = self.layer(self.x, mask=tf.constant(mask),
                                    initial_state=self.init)
      loss = self.loss(outputs, states)
    grads = tape.gradient(
        loss, [self.x, self.init, self.layer.trainable_variables])
    return outputs, states, grads

  def stepper_fn(self, time_major=False, **kwargs):
    """`run(x, init, mask)`, all batch-major; `time_major` transposes around
    `model_rnn` (inside the tape, so gradients are batch-major too)."""
    swap = lambda t: tf.transpose(t, [1, 0] + list(range(2, t.shape.rank)))
    around = swap if time_major else lambda t: t

    def run(x, init, mask):
      with tf.GradientTape() as tape:
        tape.watch([x, init])
        outputs, states = stepper.model_rnn(
            self.cell, around(x), init, mask=around(mask),
            time_major=time_major, **kwargs)
        if kwargs.get("return_sequences", True):
          outputs = around(outputs)
        loss = self.loss(outputs, states)
      grads = tape.gradient(loss, [x, init, self.cell.trainable_variables])
      return outputs, states, grads
    return run


class SeedTablesTest(tf.test.TestCase, parameterized.TestCase):
  """The `m1`/`m2`/`old` tables of the dynamic_rnn-vs-Keras Q&As."""

  def test_keras_gru_reproduces_seed_tables(self):
    """Checks the reference itself: Keras 3 GRU with `reset_after=False`."""
    layer = keras.layers.GRU(
        1, return_sequences=True, activation=None, recurrent_activation=None,
        kernel_initializer="ones", recurrent_initializer="zeros",
        bias_initializer="ones", reset_after=False)
    mask = keras.layers.Masking(_PAD).compute_mask(_SEED_X)
    self.assertAllClose(layer(_SEED_X)[..., 0], _SEED_M1, rtol=1e-6)
    self.assertAllClose(layer(_SEED_X, mask=mask)[..., 0], _SEED_M2,
                        rtol=1e-6)

  @parameterized.named_parameters(*testing.MODES)
  def test_masks_match_seed_tables(self, mode):
    """m1: no mask; m2: the Masking layer's mask (carry forward); old: the
    masked-to-zero inputs `Masking(x)` with `sequence_length=[3, 4]`, exactly
    the Q&A's `dynamic_rnn(cell, mask(emb(x)), sequence_length=...)`.

    Row 2 of `old` has length 4 with its pad step first: that step is not
    skipped but runs on a zero input, and with these weights a zero input and
    a zero state give a zero output, hence its leading 0.
    """
    cell = _seed_cell()
    masking = keras.layers.Masking(_PAD)
    mask = masking.compute_mask(_SEED_X)
    zeroed = masking(_SEED_X)

    def run(x, mask, zeroed):
      return (stepper.model_rnn(cell, x)[0],
              stepper.model_rnn(cell, x, mask=mask)[0],
              stepper.model_rnn(cell, zeroed,
                                sequence_length=_SEED_LENGTHS)[0])

    m1, m2, old = testing.in_mode(run, mode)(_SEED_X, mask, zeroed)
    self.assertAllClose(m1[..., 0], _SEED_M1, rtol=1e-6)
    self.assertAllEqual(m2[..., 0], _SEED_M2)
    self.assertAllEqual(old[..., 0], _SEED_OLD)

  @parameterized.named_parameters(("masking", False), ("mask_zero", True))
  def test_embedding_variant_matches_seed_tables(self, mask_zero):
    """The Q&A's embedding variant: token 0 embeds to the pad value 0.37.

    The mask comes from `Masking(0.37)` on the embeddings, or equally from
    `Embedding(mask_zero=True)`, since token 0 is the padding.
    """
    embedding = keras.layers.Embedding(
        3, 2, mask_zero=mask_zero,
        embeddings_initializer=keras.initializers.Constant(_SEED_EMBEDDING))
    masking = keras.layers.Masking(_PAD)
    embedded = embedding(_SEED_IDS)
    self.assertAllClose(embedded, _SEED_X)
    mask = (embedding.compute_mask(_SEED_IDS) if mask_zero else
            masking.compute_mask(embedded))
    cell = _seed_cell()
    m1, _ = stepper.model_rnn(cell, embedded)
    m2, _ = stepper.model_rnn(cell, embedded, mask=mask)
    old, _ = stepper.model_rnn(cell, masking(embedded),
                               sequence_length=_SEED_LENGTHS)
    self.assertAllClose(m1[..., 0], _SEED_M1, rtol=1e-6)
    self.assertAllEqual(m2[..., 0], _SEED_M2)
    self.assertAllEqual(old[..., 0], _SEED_OLD)

  def test_sequence_length_matches_mask_with_zero_outputs(self):
    """`sequence_length` is the mask `t < length` with zero outputs."""
    cell = _seed_cell()
    zeroed = keras.layers.Masking(_PAD)(_SEED_X)
    mask = tf.sequence_mask(_SEED_LENGTHS, 5)
    by_mask = stepper.model_rnn(cell, zeroed, mask=mask,
                                zero_output_for_mask=True)
    by_length = stepper.model_rnn(cell, zeroed, sequence_length=_SEED_LENGTHS)
    testing.assert_nests_close(by_length, by_mask, rtol=0)


class KerasMaskingTest(tf.test.TestCase, parameterized.TestCase):
  """Outputs, final states and gradients equal Keras layers given the mask."""

  @parameterized.product(kind=["gru", "lstm"],
                         padding=["right", "left", "holes"],
                         dtype=["float32", "float64"])
  def test_mask_matches_keras_layer(self, kind, padding, dtype):
    case = _KerasCase(kind, dtype, return_sequences=True)
    mask = _masks(padding)
    expected = case.keras_run(mask)
    actual = case.stepper_fn()(case.x, case.init, tf.constant(mask))
    # float32: gradients sum over many steps; 1e-5 relative with an atol for
    # entries that cancel to near zero.
    tol = dict(rtol=1e-10) if dtype == "float64" else dict(rtol=1e-5,
                                                           atol=1e-6)
    testing.assert_nests_close(actual, expected, **tol)

  @parameterized.named_parameters(*testing.MODES)
  def test_mask_in_modes_matches_keras_layer(self, mode):
    case = _KerasCase("gru", "float64", return_sequences=True)
    mask = _masks("holes")
    expected = case.keras_run(mask)
    actual = testing.in_mode(case.stepper_fn(), mode)(
        case.x, case.init, tf.constant(mask))
    testing.assert_nests_close(actual, expected, rtol=1e-10)

  @parameterized.named_parameters(("right", "right"), ("left", "left"))
  def test_gradients_at_padded_inputs_are_exactly_zero(self, padding):
    case = _KerasCase("lstm", "float32")
    mask = _masks(padding)
    _, _, (grad_x, _, _) = case.stepper_fn()(case.x, case.init,
                                              tf.constant(mask))
    self.assertAllEqual(tf.boolean_mask(grad_x, ~mask),
                        tf.zeros([np.sum(~mask), FEATURES]))
    self.assertTrue(np.all(np.any(grad_x.numpy()[mask] != 0, axis=-1)))

  def test_final_states_are_states_at_last_valid_step(self):
    """Checked against the unmasked run truncated at each row's last step."""
    case = _KerasCase("gru", "float64")
    mask = _masks("right")
    _, final = stepper.model_rnn(case.cell, case.x, case.init, mask=mask)
    for row, length in enumerate(mask.sum(axis=1)):
      _, expected = stepper.model_rnn(
          case.cell, case.x[row:row + 1, :length],
          [s[row:row + 1] for s in case.init])
      testing.assert_nests_close([s[row:row + 1] for s in final], expected,
                                 rtol=1e-12)

  @parameterized.named_parameters(("right", "right"), ("left", "left"),
                                  ("holes", "holes"))
  def test_reverse_mask_matches_keras_go_backwards(self, padding):
    """Keras returns a backward run's outputs in reversed time order."""
    case = _KerasCase("lstm", "float64", return_sequences=True,
                      go_backwards=True)
    mask = _masks(padding)
    outputs, states, grads = case.keras_run(mask)
    expected = (tf.reverse(outputs, [1]), states, grads)
    case.out_w = tf.reverse(case.out_w, [1])  # The same loss, time-flipped.
    actual = case.stepper_fn(reverse=True)(case.x, case.init,
                                           tf.constant(mask))
    testing.assert_nests_close(actual, expected, rtol=1e-10)

  @parameterized.named_parameters(("forward", False), ("reverse", True))
  def test_zero_output_for_mask_matches_keras(self, reverse):
    case = _KerasCase("gru", "float64", return_sequences=True,
                      zero_output_for_mask=True, go_backwards=reverse)
    mask = _masks("holes")
    outputs, states, grads = case.keras_run(mask)
    if reverse:
      outputs = tf.reverse(outputs, [1])
      case.out_w = tf.reverse(case.out_w, [1])
    actual = case.stepper_fn(reverse=reverse, zero_output_for_mask=True)(
        case.x, case.init, tf.constant(mask))
    testing.assert_nests_close(actual, (outputs, states, grads), rtol=1e-10)

  @parameterized.named_parameters(
      ("plain", dict()), ("unroll_3", dict(unroll=3)),
      ("time_major", dict(time_major=True)),
      ("reverse_unroll_4", dict(reverse=True, unroll=4)))
  def test_last_output_matches_keras(self, kwargs):
    """`return_sequences=False` returns each row's last valid output."""
    case = _KerasCase("lstm", "float64", return_sequences=False,
                      go_backwards=kwargs.get("reverse", False))
    mask = _masks("left" if kwargs.get("reverse") else "holes")
    expected = case.keras_run(mask)
    actual = case.stepper_fn(return_sequences=False, **kwargs)(
        case.x, case.init, tf.constant(mask))
    testing.assert_nests_close(actual, expected, rtol=1e-10)

  @parameterized.named_parameters(
      ("unroll_3", dict(unroll=3)), ("time_major", dict(time_major=True)))
  def test_sequences_with_unroll_or_time_major_match_keras(self, kwargs):
    case = _KerasCase("gru", "float64", return_sequences=True)
    mask = _masks("holes")
    expected = case.keras_run(mask)
    actual = case.stepper_fn(**kwargs)(case.x, case.init, tf.constant(mask))
    testing.assert_nests_close(actual, expected, rtol=1e-10)

  def test_mask_under_unknown_batch_and_time_matches_eager(self):
    case = _KerasCase("gru", "float64")
    mask = tf.constant(_masks("holes"))
    expected = case.stepper_fn()(case.x, case.init, mask)
    spec = lambda t: tf.TensorSpec([None] * t.shape.rank, t.dtype)
    fn = tf.function(case.stepper_fn(), input_signature=[
        spec(case.x), [spec(s) for s in case.init], spec(mask)])
    testing.assert_nests_close(fn(case.x, case.init, mask), expected,
                               rtol=1e-12)


def _numpy_simple_rnn(cell, x, lengths, reverse):
  """`tanh(x W + h U + b)` over each row's first `lengths[b]` steps.

  Returns outputs (zero from each length on) and the states at each row's
  last valid step; a reversed row runs from its last valid step to step 0.
  """
  kernel, recurrent, bias = [w.numpy() for w in cell.weights]
  outputs = np.zeros(x.shape[:2] + (kernel.shape[1],))
  finals = np.zeros((x.shape[0], kernel.shape[1]))
  for row, length in enumerate(lengths):
    h = np.zeros(kernel.shape[1])
    order = range(length - 1, -1, -1) if reverse else range(length)
    for t in order:
      h = np.tanh(x[row, t] @ kernel + h @ recurrent + bias)
      outputs[row, t] = h
    finals[row] = h
  return outputs, finals


class SequenceLengthTest(tf.test.TestCase, parameterized.TestCase):
  """`sequence_length`: the `tf.nn.dynamic_rnn` semantics."""

  def setUp(self):
    super().setUp()
    keras.utils.set_random_seed(3)
    self.cell = keras.layers.SimpleRNNCell(UNITS, dtype="float64")
    self.cell.build((None, FEATURES))
    self.x = np.random.RandomState(4).randn(BATCH, TIME, FEATURES)
    self.lengths = np.array([2, TIME, 0, 5])

  @parameterized.product(mode=[m for m, _ in testing.MODES],
                         reverse=[False, True], unroll=[1, 4])
  def test_sequence_length_matches_numpy_loop(self, mode, reverse, unroll):
    run = testing.in_mode(
        lambda x, lengths: stepper.model_rnn(
            self.cell, x, sequence_length=lengths, reverse=reverse,
            unroll=unroll), mode)
    outputs, (final,) = run(tf.constant(self.x), tf.constant(self.lengths))
    expected = _numpy_simple_rnn(self.cell, self.x, self.lengths, reverse)
    testing.assert_nests_close((outputs, final), expected, rtol=1e-12)

  def test_sequence_length_all_states_match_numpy_loop(self):
    """`all_states` follow the outputs: zero from each length on."""
    _, _, (all_states,) = stepper.model_rnn(
        self.cell, self.x, sequence_length=self.lengths,
        return_all_states=True, reverse=True)
    expected, _ = _numpy_simple_rnn(self.cell, self.x, self.lengths, True)
    testing.assert_nests_close(all_states, expected, rtol=1e-12)

  def test_sequence_length_time_major_matches_numpy_loop(self):
    outputs, (final,) = stepper.model_rnn(
        self.cell, np.transpose(self.x, [1, 0, 2]), time_major=True,
        sequence_length=self.lengths)
    expected, expected_final = _numpy_simple_rnn(self.cell, self.x,
                                                 self.lengths, False)
    testing.assert_nests_close(
        (tf.transpose(outputs, [1, 0, 2]), final), (expected, expected_final),
        rtol=1e-12)

  @parameterized.named_parameters(("forward", False), ("reverse", True))
  def test_sequence_length_gradients_match_keras_zero_output_mask(
      self, reverse):
    """Right padding: a reversed run equals Keras `go_backwards` with the
    mask and zero outputs (the pads come first and are skipped)."""
    case = _KerasCase("gru", "float64", return_sequences=True,
                      zero_output_for_mask=True, go_backwards=reverse)
    lengths = np.array([TIME, 3, 0, 1])
    outputs, states, grads = case.keras_run(
        np.arange(TIME)[None] < lengths[:, None])
    if reverse:
      outputs = tf.reverse(outputs, [1])
      case.out_w = tf.reverse(case.out_w, [1])

    def run(x, init):
      with tf.GradientTape() as tape:
        tape.watch([x, init])
        outs, finals = stepper.model_rnn(case.cell, x, init, reverse=reverse,
                                         sequence_length=lengths)
        loss = case.loss(outs, finals)
      return outs, finals, tape.gradient(
          loss, [x, init, case.cell.trainable_variables])

    testing.assert_nests_close(run(case.x, case.init),
                               (outputs, states, grads), rtol=1e-10)

  @parameterized.named_parameters(("eager", "eager"),
                                  ("function", "function"))
  def test_loop_stops_after_longest_sequence(self, mode):
    """The step runs `max(sequence_length)` times; the rest is zero-filled."""
    calls = tf.Variable(0)

    def step(x_t, states):
      calls.assign_add(1)
      return x_t * 2., [states[0] + x_t]

    run = testing.in_mode(
        lambda x, lengths: stepper.model_rnn(
            step, x, [tf.zeros([3, 1])], sequence_length=lengths), mode)
    x = tf.ones([3, 7, 1])
    outputs, (final,) = run(x, tf.constant([2, 1, 0]))
    self.assertEqual(int(calls.numpy()), 2)
    self.assertAllEqual(outputs[..., 0],
                        [[2, 2, 0, 0, 0, 0, 0], [2] + [0] * 6, [0] * 7])
    self.assertAllEqual(final[:, 0], [2, 1, 0])
    calls.assign(0)
    outputs, _ = run(x, tf.constant([0, 0, 0]))
    self.assertEqual(int(calls.numpy()), 0)
    self.assertAllEqual(outputs, tf.zeros([3, 7, 1]))

  @parameterized.named_parameters(("function", "function"), ("xla", "xla"))
  def test_unknown_batch_and_time_matches_numpy_loop(self, mode):
    run = tf.function(
        lambda x, lengths: stepper.model_rnn(
            self.cell, x, sequence_length=lengths, reverse=True),
        input_signature=[tf.TensorSpec([None, None, FEATURES], tf.float64),
                         tf.TensorSpec([None], tf.int32)],
        jit_compile=mode == "xla")
    outputs, (final,) = run(self.x, self.lengths)
    expected = _numpy_simple_rnn(self.cell, self.x, self.lengths, True)
    testing.assert_nests_close((outputs, final), expected, rtol=1e-12)


class BadInputTest(tf.test.TestCase, parameterized.TestCase):
  """Clear errors, at trace time where the values are known."""

  def setUp(self):
    super().setUp()
    self.cell = keras.layers.GRUCell(2)
    self.x = tf.zeros([2, 3, 4])

  @parameterized.product(
      mode=["eager", "function"],
      case=[
          ("mask_rank", dict(mask=[True, False, True]), ValueError,
           r"`mask` must have rank 2 \[batch, time\]; got shape \(3,\)"),
          ("mask_shape", dict(mask=tf.ones([2, 4], bool)), ValueError,
           r"`mask` has shape \(2, 4\) but the inputs need \[batch, time\] "
           r"= \(2, 3\)"),
          ("mask_dtype", dict(mask=tf.ones([2, 3])), TypeError,
           r"`mask` must be a bool tensor \[batch, time\]; got dtype float32"),
          ("length_negative", dict(sequence_length=[-1, 2]), ValueError,
           r"`sequence_length` must lie in \[0, 3\].*got \[-1, 2\]"),
          ("length_too_long", dict(sequence_length=[1, 4]), ValueError,
           r"`sequence_length` must lie in \[0, 3\].*got \[1, 4\]"),
          ("length_float", dict(sequence_length=[1., 2.]), TypeError,
           r"`sequence_length` must be an integer tensor \[batch\]; got dtype"
           r" float32"),
          ("length_batch", dict(sequence_length=[1, 2, 3]), ValueError,
           r"`sequence_length` has 3 entries but the inputs have batch size "
           r"2"),
          ("length_rank", dict(sequence_length=[[1, 2]]), ValueError,
           r"`sequence_length` must have shape \[batch\]; got \(1, 2\)"),
          ("both", dict(mask=tf.ones([2, 3], bool), sequence_length=[1, 2]),
           ValueError, r"Pass either `mask` or `sequence_length`, not both"),
      ])
  def test_model_rnn_raises_on_bad_masking_argument(self, mode, case):
    _, kwargs, error, message = case
    run = testing.in_mode(lambda: stepper.model_rnn(self.cell, self.x,
                                                    **kwargs), mode)
    with self.assertRaisesRegex(error, message):
      run()

  @parameterized.named_parameters(
      ("length_batch", [None], tf.int32, [1, 2, 3],
       "`sequence_length` must have one entry per row of the inputs"),
      ("length_too_long", [None], tf.int32, [1, 9],
       "`sequence_length` must not exceed the number of time steps"),
      ("length_negative", [None], tf.int32, [-1, 0],
       "`sequence_length` must be non-negative"),
      ("mask_batch", [None, None], tf.bool, np.ones([3, 3], bool),
       r"`mask` must be \[batch, time\] like the inputs"),
      ("mask_time", [None, None], tf.bool, np.ones([2, 2], bool),
       r"`mask` must be \[batch, time\] like the inputs"))
  def test_model_rnn_raises_at_run_time_on_bad_unknown_shapes(
      self, shape, dtype, value, message):
    """With unknown shapes or values only a run-time check can tell; it runs
    before any use of the argument (reversed rows use the lengths first)."""
    name = "mask" if dtype == tf.bool else "sequence_length"
    for reverse in (False, True):
      run = tf.function(
          lambda x, v, reverse=reverse: stepper.model_rnn(
              self.cell, x, reverse=reverse, **{name: v}),
          input_signature=[tf.TensorSpec([None, None, 4]),
                           tf.TensorSpec(shape, dtype)])
      with self.assertRaisesRegex(tf.errors.InvalidArgumentError, message):
        run(self.x, value)


if __name__ == "__main__":
  tf.test.main()
