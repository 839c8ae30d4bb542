"""Tests for `Trainer(stream=True)`: truncated BPTT streamed across batches.

References, each independent of the stream code:
* the same Trainer (default mode) on one batch holding the whole streams
  (every update must match: the weights after training, float64);
* hand-written tapes over a Python loop of cell calls (full BPTT streams,
  resets, TBPTT(k, k) with resets in the default mode);
* an uninterrupted run against one resumed from a checkpoint (bit for bit);
* the mean loss of one `model_rnn` run over the whole streams (`evaluate`).
"""

import json
import os
import shutil
import subprocess
import sys
import textwrap

from absl.testing import parameterized
import keras
import numpy as np
import tensorflow as tf

import stepper
from stepper import testing

ROWS, FEATURES, UNITS = 2, 2, 3
_RATE = 0.25  # Exact in float32, the Keras optimizer's rate dtype.


def _sequence(n, seed=0, reset_every=None):
  """One long float64 sequence: inputs [n, FEATURES], targets [n, 1]."""
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(n, FEATURES))
  y = np.cumsum(x[:, :1], axis=0) * 0.1 + np.roll(x[:, 1:], 3, axis=0)
  resets = None if reset_every is None else (
      rng.random(n) < 1 / reset_every)
  return x, y, resets


def _streams_of(sequence, rows=ROWS):
  """The whole streams `[rows, L, ...]` (numpy), as `streams` cuts them."""
  length = len(sequence) // rows
  return sequence[:rows * length].reshape((rows, length) +
                                          sequence.shape[1:])


def _model(seed=0):
  """A float64 GRU cell and Dense head, built (same weights per seed)."""
  keras.utils.set_random_seed(seed)
  cell = keras.layers.GRUCell(UNITS, dtype="float64")
  cell.build((None, FEATURES))
  head = keras.layers.Dense(1, dtype="float64")
  head.build((None, UNITS))
  return cell, head


def _trainer(tbptt, stream, seed=0, **kwargs):
  cell, head = _model(seed)
  return stepper.Trainer(cell, head, loss="mse", tbptt=tbptt, stream=stream,
                         optimizer=keras.optimizers.SGD(_RATE), **kwargs)


def _weights(trainer):
  return [v.numpy() for v in trainer.trainable_variables]


def _one_batch(x, y, resets=None):
  """A dataset of one element holding the whole streams."""
  parts = (_streams_of(x), _streams_of(y))
  if resets is not None:
    parts += (_streams_of(resets),)
  return tf.data.Dataset.from_tensors(parts)


def _hand_loop(cell, head, x, y, h, resets=None):
  """Loss and final state of a Python loop of cell calls over `x`
  `[rows, time, ...]` from `h`; a reset sets the row's state to zeros."""
  losses = []
  for t in range(x.shape[1]):
    if resets is not None:
      h = tf.where(resets[:, t, None], tf.zeros_like(h), h)
    out, new_h = cell(x[:, t], [h])
    h = new_h[0]
    losses.append(tf.reduce_mean((head(out) - y[:, t]) ** 2, axis=-1))
  return tf.reduce_mean(tf.stack(losses)), h


def _sgd(variables, loss_fn):
  with tf.GradientTape() as tape:
    loss, out = loss_fn()
  for v, g in zip(variables, tape.gradient(loss, variables)):
    v.assign_sub(_RATE * g)
  return out


class StreamTbpttTest(tf.test.TestCase, parameterized.TestCase):

  @parameterized.named_parameters(
      ("k2_equals_k1", 2, 2, 4, 12, None),
      ("overlap_reaching_two_batches_back", 2, 11, 4, 16, None),
      ("last_shorter_batch_partial_update_and_resets", 2, 5, 4, 11, 4))
  def test_stream_matches_one_batch_holding_the_streams(
      self, k1, k2, window, length, reset_every):
    x, y, resets = _sequence(ROWS * length, reset_every=reset_every)
    streamed = _trainer((k1, k2), stream=True)
    streamed.fit(stepper.data.streams(
        x, y, resets=resets, batch_size=ROWS, window=window,
        drop_remainder=False), verbose=0)
    whole = _trainer((k1, k2), stream=False)
    whole.fit(_one_batch(x, y, resets), verbose=0)
    self.assertEqual(streamed.global_step, -(-length // k1))
    self.assertEqual(streamed.global_step, whole.global_step)
    testing.assert_nests_close(_weights(streamed), _weights(whole),
                               rtol=1e-10)
    self.assertNotAllClose(_weights(streamed)[0], _model()[0].kernel)

  def test_default_mode_tbptt_with_resets_matches_hand_tapes(self):
    k = 3
    x, y, resets = _sequence(ROWS * 6, reset_every=3)
    trainer = _trainer((k, k), stream=False)
    trainer.fit(_one_batch(x, y, resets), verbose=0)
    cell, head = _model()
    variables = cell.trainable_variables + head.trainable_variables
    xs, ys, rs = (_streams_of(a) for a in (x, y, resets))
    h = tf.zeros([ROWS, UNITS], tf.float64)
    for start in range(0, xs.shape[1], k):
      window = slice(start, start + k)
      h = tf.stop_gradient(_sgd(variables, lambda: _hand_loop(
          cell, head, xs[:, window], ys[:, window], h, rs[:, window])))
    testing.assert_nests_close(_weights(trainer), variables, rtol=1e-10)


class StreamFullBpttTest(tf.test.TestCase, parameterized.TestCase):

  @parameterized.named_parameters(("plain", None), ("resets", 3))
  def test_stream_matches_hand_tapes_cut_at_each_batch(self, reset_every):
    x, y, resets = _sequence(ROWS * 12, reset_every=reset_every)
    trainer = _trainer(None, stream=True)
    trainer.fit(stepper.data.streams(x, y, resets=resets, batch_size=ROWS,
                                     window=4), verbose=0)
    cell, head = _model()
    variables = cell.trainable_variables + head.trainable_variables
    xs, ys = _streams_of(x), _streams_of(y)
    rs = None if resets is None else _streams_of(resets)
    h = tf.zeros([ROWS, UNITS], tf.float64)
    for start in range(0, 12, 4):
      window = slice(start, start + 4)
      h = tf.stop_gradient(_sgd(variables, lambda: _hand_loop(
          cell, head, xs[:, window], ys[:, window], h,
          None if rs is None else rs[:, window])))
    self.assertEqual(trainer.global_step, 3)
    testing.assert_nests_close(_weights(trainer), variables, rtol=1e-10)

  def test_default_mode_resets_match_hand_tape(self):
    x, y, resets = _sequence(ROWS * 8, reset_every=3)
    trainer = _trainer(None, stream=False)
    trainer.fit(_one_batch(x, y, resets), verbose=0)
    cell, head = _model()
    variables = cell.trainable_variables + head.trainable_variables
    _sgd(variables, lambda: _hand_loop(
        cell, head, _streams_of(x), _streams_of(y),
        tf.zeros([ROWS, UNITS], tf.float64), _streams_of(resets)))
    testing.assert_nests_close(_weights(trainer), variables, rtol=1e-10)


class StreamSemanticsTest(tf.test.TestCase, parameterized.TestCase):

  @parameterized.named_parameters(("tbptt", (2, 7)), ("full_bptt", None))
  def test_resumed_run_matches_uninterrupted_bit_for_bit(self, tbptt):
    x, y, resets = _sequence(ROWS * 16, reset_every=5)
    dataset = stepper.data.streams(x, y, resets=resets, batch_size=ROWS,
                                   window=4)
    uninterrupted = _trainer(tbptt, stream=True)
    uninterrupted.fit(dataset, steps=4, verbose=0)

    directory = os.path.join(self.get_temp_dir(), f"resume_{tbptt}")
    shutil.rmtree(directory, ignore_errors=True)
    first = _trainer(tbptt, stream=True, checkpoint_dir=directory)
    first.fit(dataset, steps=2, verbose=0)
    resumed = _trainer(tbptt, stream=True, checkpoint_dir=directory, seed=1)
    resumed.fit(dataset, steps=2, verbose=0)
    self.assertEqual(resumed.global_step, uninterrupted.global_step)
    for a, b in zip(_weights(resumed), _weights(uninterrupted)):
      self.assertAllEqual(a, b)

  def test_separate_fits_continue_and_evaluate_leaves_the_stream(self):
    x, y, _ = _sequence(ROWS * 12)
    dataset = stepper.data.streams(x, y, batch_size=ROWS, window=4)
    whole, parts = (_trainer((2, 7), stream=True) for _ in range(2))
    whole.fit(dataset, verbose=0)
    parts.fit(dataset.take(1), verbose=0)
    parts.evaluate(dataset)
    parts.fit(dataset.skip(1), verbose=0)
    # The carried training state and history survive `evaluate` and the
    # second `fit` continues them: the updates of one pass.
    testing.assert_nests_close(_weights(parts), _weights(whole), rtol=1e-12)

    # `evaluate`: one run over the whole streams from the initial state.
    parts_weights = _weights(parts)
    loss = parts.evaluate(dataset)["loss"]
    predictions = parts.predict(tf.constant(_streams_of(x)))
    expected = np.mean((predictions.numpy() - _streams_of(y)) ** 2)
    self.assertAllClose(loss, expected, rtol=1e-10)
    self.assertAllEqual(_weights(parts)[0], parts_weights[0])

  def test_new_epoch_and_reset_states_restart_the_stream(self):
    x, y, _ = _sequence(ROWS * 8)
    dataset = stepper.data.streams(x, y, batch_size=ROWS, window=4)
    epochs, resets = (_trainer((2, 5), stream=True) for _ in range(2))
    epochs.fit(dataset, epochs=2, verbose=0)
    resets.fit(dataset, verbose=0)
    resets.reset_states()
    resets.fit(dataset, verbose=0)
    testing.assert_nests_close(_weights(epochs), _weights(resets),
                               rtol=1e-12)


class StreamErrorsTest(tf.test.TestCase):

  def test_stream_raises_on_batch_not_a_multiple_of_k1(self):
    x, y, _ = _sequence(ROWS * 12)
    trainer = _trainer((2, 4), stream=True)
    with self.assertRaisesRegex(ValueError, r"has 3 steps.*every batch's "
                                r"length must be a multiple of k1 = 2"):
      trainer.fit(stepper.data.streams(x, y, batch_size=ROWS, window=3),
                  verbose=0)

  def test_stream_raises_on_a_batch_after_the_shorter_last(self):
    x, y, _ = _sequence(ROWS * 5)
    dataset = stepper.data.streams(x, y, batch_size=ROWS, window=4,
                                   drop_remainder=False)
    trainer = _trainer((2, 2), stream=True)
    with self.assertRaisesRegex(ValueError, r"a batch after one of 1 steps; "
                                r".*must be a multiple of k1 = 2, except a "
                                r"stream's last"):
      trainer.fit(dataset.concatenate(dataset), verbose=0)

  def test_stream_raises_on_changing_batch_size(self):
    x, y, _ = _sequence(12)
    dataset = tf.data.Dataset.from_tensor_slices(
        (x.reshape(6, 2, 2), y.reshape(6, 2, 1))).batch(4)
    trainer = _trainer(None, stream=True)
    with self.assertRaisesRegex(ValueError, r"batch size changed from 4 to "
                                r"2 rows"):
      trainer.fit(dataset, verbose=0)

  def test_stream_raises_on_sequence_level_targets_and_bad_flag(self):
    x = np.zeros((4, 5, FEATURES))
    dataset = tf.data.Dataset.from_tensor_slices((x, np.zeros((4, 1)))).batch(
        2)
    with self.assertRaisesRegex(ValueError, r"target at every step; so does "
                                r"stream mode"):
      _trainer(None, stream=True).fit(dataset, verbose=0)
    with self.assertRaisesRegex(TypeError, r"`stream` must be a bool"):
      _trainer(None, stream=1)

  def test_resets_must_be_bool_rows_by_steps(self):
    x = np.zeros((4, 5, FEATURES))
    dataset = tf.data.Dataset.from_tensor_slices(
        (x, np.zeros((4, 5, 1)), np.zeros((4, 5), np.int32))).batch(2)
    with self.assertRaisesRegex(TypeError, r"`dataset` resets must be bool "
                                r"\[batch, time\].*; got int32"):
      _trainer(None, stream=False).fit(dataset, verbose=0)


# The logical CPU devices must exist before TensorFlow initialises its
# devices, so the strategy runs happen in a fresh interpreter.
_MIRRORED_SCRIPT = textwrap.dedent("""
    import json
    import keras, numpy as np, tensorflow as tf
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(
        cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    import stepper
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 2))
    y = np.cumsum(x[:, :1], axis=0) * 0.1
    resets = rng.random(64) < 0.2
    dataset = stepper.data.streams(x, y, resets=resets, batch_size=4,
                                   window=4)

    def run(strategy, tbptt):
      with strategy.scope():
        keras.utils.set_random_seed(0)
        cell = keras.layers.GRUCell(3, dtype="float64")
        head = keras.layers.Dense(1, dtype="float64")
        trainer = stepper.Trainer(
            cell, head, loss="mse", strategy=strategy, stream=True,
            optimizer=keras.optimizers.SGD(0.2), tbptt=tbptt)
      trainer.fit(dataset, verbose=0)
      return (trainer.evaluate(dataset)["loss"],
              [v.numpy() for v in trainer.trainable_variables])

    mirrored = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    single = run(tf.distribute.get_strategy(), (2, 7))
    multi = run(mirrored, (2, 7))
    print(json.dumps(dict(
        replicas=mirrored.num_replicas_in_sync, eval=[single[0], multi[0]],
        weight_error=max(float(np.max(np.abs(a - b) / (np.abs(a) + 1e-6)))
                         for a, b in zip(single[1], multi[1])))))
""")


class StreamDistributedTest(tf.test.TestCase):

  def test_mirrored_replicas_carry_their_rows_like_one_device(self):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    result = subprocess.run([sys.executable, "-c", _MIRRORED_SCRIPT],
                            capture_output=True, text=True, env=env,
                            timeout=300, check=False)
    self.assertEqual(result.returncode, 0, result.stderr[-3000:])
    report = json.loads(result.stdout.strip().splitlines()[-1])
    self.assertEqual(report["replicas"], 2)
    self.assertAllClose(*report["eval"], rtol=1e-10)
    self.assertLess(report["weight_error"], 1e-10)


if __name__ == "__main__":
  tf.test.main()
