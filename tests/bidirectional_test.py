"""Tests for `stepper.bidirectional` against `keras.layers.Bidirectional`."""

from absl.testing import parameterized
import keras
import numpy as np
import tensorflow as tf

import stepper
from stepper import testing

bidirectional = stepper.bidirectional

BATCH, TIME, FEATURES, UNITS = 4, 6, 3, 5
_LENGTHS = np.array([TIME, 4, 1, 0])
_RIGHT = np.arange(TIME)[None] < _LENGTHS[:, None]
_MASKS = {
    "none": None,
    "right": _RIGHT,
    "left": _RIGHT[:, ::-1].copy(),
    "holes": np.random.RandomState(0).rand(BATCH, TIME) < 0.6,
}
_MERGE_MODES = ["concat", "sum", "mul", "ave", None]


class _Case:
  """A Keras `Bidirectional` layer and two cells with copied weights."""

  def __init__(self, kind, dtype, return_sequences=True, merge_mode="concat"):
    keras.utils.set_random_seed(5)
    layer_cls = {"gru": keras.layers.GRU, "lstm": keras.layers.LSTM}[kind]
    cell_cls = {"gru": keras.layers.GRUCell, "lstm": keras.layers.LSTMCell}
    self.layer = keras.layers.Bidirectional(
        layer_cls(UNITS, return_sequences=return_sequences,
                  return_state=True, dtype=dtype),
        merge_mode=merge_mode, dtype=dtype)
    self.layer.build((None, TIME, FEATURES))
    self.cells = []
    for keras_layer in (self.layer.forward_layer, self.layer.backward_layer):
      cell = cell_cls[kind](UNITS, dtype=dtype)
      cell.build((None, FEATURES))
      cell.set_weights(keras_layer.cell.get_weights())
      self.cells.append(cell)
    rng = np.random.RandomState(6)
    self.x = tf.constant(rng.randn(BATCH, TIME, FEATURES), dtype)
    n_states = len(tf.nest.flatten(self.cells[0].state_size))
    self.init = [[tf.constant(rng.randn(BATCH, UNITS), dtype)
                  for _ in range(n_states)] for _ in range(2)]
    self.n_states = n_states
    self.weights = tf.constant(rng.randn(BATCH, TIME, 2 * UNITS), dtype)

  def loss(self, outputs, states):
    """Distinct weights for every output entry and state."""
    flat = tf.nest.flatten(outputs)
    total = sum(tf.reduce_sum(y * self.weights[..., :y.shape[-1]]
                              if y.shape.rank == 3 else
                              y * self.weights[:, 0, :y.shape[-1]])
                * (i + 1.) for i, y in enumerate(flat))
    return total + sum(tf.reduce_sum(s * (i + 2.))
                       for i, s in enumerate(tf.nest.flatten(states)))

  def keras_run(self, mask):
    with tf.GradientTape() as tape:
      tape.watch([self.x, self.init])
      result = self.layer(
          self.x, mask=None if mask is None else tf.constant(mask),
          initial_state=self.init[0] + self.init[1])
      # merge_mode=None returns [y_forward, y_backward, *states].
      n_outputs = 2 if self.layer.merge_mode is None else 1
      outputs = (list(result[:2]) if n_outputs == 2 else result[0])
      states = result[n_outputs:]
      states = (states[:self.n_states], states[self.n_states:])
      loss = self.loss(outputs, states)
    grads = tape.gradient(loss, [self.x, self.init,
                                 self.layer.forward_layer.trainable_variables,
                                 self.layer.backward_layer.trainable_variables])
    return outputs, states, grads

  def stepper_fn(self, **kwargs):
    def run(x, init, mask_or_none):
      with tf.GradientTape() as tape:
        tape.watch([x, init])
        mask = {} if "sequence_length" in kwargs else {"mask": mask_or_none}
        outputs, states = bidirectional(self.cells[0], self.cells[1], x,
                                        (init[0], init[1]), **kwargs, **mask)
        loss = self.loss(outputs, states)
      grads = tape.gradient(loss, [x, init, self.cells[0].trainable_variables,
                                   self.cells[1].trainable_variables])
      return outputs, tuple(list(s) for s in states), grads
    return run


class BidirectionalTest(tf.test.TestCase, parameterized.TestCase):

  @parameterized.product(merge_mode=_MERGE_MODES,
                         mask=["none", "right", "left", "holes"])
  def test_bidirectional_matches_keras_bidirectional(self, merge_mode, mask):
    case = _Case("gru", "float64", merge_mode=merge_mode)
    expected = case.keras_run(_MASKS[mask])
    actual = case.stepper_fn(merge_mode=merge_mode)(
        case.x, case.init, _MASKS[mask])
    testing.assert_nests_close(actual, expected, rtol=1e-10)

  @parameterized.product(merge_mode=["concat", "ave"],
                         mask=["none", "holes"])
  def test_last_outputs_match_keras_bidirectional(self, merge_mode, mask):
    """Without sequences, the backward output is the one at the first step."""
    case = _Case("lstm", "float64", return_sequences=False,
                 merge_mode=merge_mode)
    expected = case.keras_run(_MASKS[mask])
    actual = case.stepper_fn(merge_mode=merge_mode, return_sequences=False)(
        case.x, case.init, _MASKS[mask])
    testing.assert_nests_close(actual, expected, rtol=1e-10)

  def test_sequence_length_last_outputs_match_keras_bidirectional(self):
    case = _Case("lstm", "float64", return_sequences=False)
    expected = case.keras_run(_RIGHT)
    actual = case.stepper_fn(sequence_length=_LENGTHS,
                             return_sequences=False)(case.x, case.init, None)
    testing.assert_nests_close(actual, expected, rtol=1e-10)

  @parameterized.named_parameters(*testing.MODES)
  def test_float32_lstm_in_modes_matches_keras_bidirectional(self, mode):
    case = _Case("lstm", "float32", merge_mode="sum")
    expected = case.keras_run(_MASKS["holes"])
    actual = testing.in_mode(case.stepper_fn(merge_mode="sum"), mode)(
        case.x, case.init, tf.constant(_MASKS["holes"]))
    # float32 gradients accumulated over steps: rtol 1e-5 plus an atol for
    # entries that cancel to near zero.
    testing.assert_nests_close(actual, expected, rtol=1e-5, atol=1e-6)

  @parameterized.named_parameters(*testing.MODES)
  def test_sequence_length_matches_keras_bidirectional_with_mask(self, mode):
    """Right padding: Keras' backward layer skips the pads, then runs each
    row's valid part reversed, which is what `sequence_length` does."""
    case = _Case("gru", "float64")
    expected = case.keras_run(_RIGHT)
    actual = testing.in_mode(case.stepper_fn(sequence_length=_LENGTHS),
                             mode)(case.x, case.init, None)
    testing.assert_nests_close(actual, expected, rtol=1e-10)

  def test_unknown_batch_and_time_matches_eager(self):
    case = _Case("gru", "float64")
    mask = tf.constant(_MASKS["holes"])
    expected = case.stepper_fn()(case.x, case.init, mask)
    spec = lambda t: tf.TensorSpec([None] * t.shape.rank, t.dtype)
    run = tf.function(case.stepper_fn(), input_signature=[
        spec(case.x), [[spec(s) for s in d] for d in case.init], spec(mask)])
    testing.assert_nests_close(run(case.x, case.init, mask), expected,
                               rtol=1e-12)

  def test_time_major_matches_batch_major(self):
    case = _Case("gru", "float64")
    mask = _MASKS["left"]
    expected, _ = bidirectional(case.cells[0], case.cells[1], case.x,
                                mask=mask)
    actual, _ = bidirectional(case.cells[0], case.cells[1],
                              tf.transpose(case.x, [1, 0, 2]),
                              mask=mask.T, time_major=True)
    testing.assert_nests_close(tf.transpose(actual, [1, 0, 2]), expected,
                               rtol=1e-12)

  @parameterized.named_parameters(
      ("merge_mode", dict(merge_mode="max"), ValueError,
       r"`merge_mode` must be one of \['concat', 'sum', 'mul', 'ave', None\];"
       r" got 'max'"),
      ("initial_states_single", dict(initial_states=[tf.zeros([2, 3])]),
       ValueError, r"`initial_states` must be None or a pair \(forward_states,"
       r" backward_states\); got a list of length 1"),
      ("both_masks", dict(mask=tf.ones([2, 4], bool), sequence_length=[1, 2]),
       ValueError, r"Pass either `mask` or `sequence_length`, not both"))
  def test_bidirectional_raises_on_bad_argument(self, kwargs, error, message):
    cells = [keras.layers.GRUCell(3), keras.layers.GRUCell(3)]
    for mode in ("eager", "function"):
      run = testing.in_mode(
          lambda: bidirectional(*cells, tf.zeros([2, 4, 2]), **kwargs), mode)
      with self.assertRaisesRegex(error, message):
        run()


if __name__ == "__main__":
  tf.test.main()
