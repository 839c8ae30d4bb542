"""Tests for `stepper.Trainer` against hand-written tapes and stepper.tbptt."""

import glob
import json
import os
import subprocess
import sys
import tempfile
import textwrap

from absl.testing import parameterized
import keras
import numpy as np
import tensorflow as tf

import stepper
from stepper import _train_args
from stepper import testing

BATCH, TIME, FEATURES, UNITS = 4, 7, 3, 5


class _Recorder(keras.optimizers.Optimizer):
  """Records the gradient of update `i` in row `i` of `records`; never moves
  the weights, so every update is taken at the same weights."""

  def __init__(self, capacity: int):
    super().__init__(learning_rate=0.0, name="recorder")
    self._capacity = capacity

  def build(self, variables):
    super().build(variables)
    self.records = [self.add_variable((self._capacity,) + tuple(v.shape),
                                      dtype=v.dtype, name="record")
                    for v in variables]

  def update_step(self, gradient, variable, learning_rate):
    record = self.records[self._get_variable_index(variable)]
    row = tf.reshape(tf.cast(self.iterations, tf.int32), [1, 1])
    self.assign(record, tf.tensor_scatter_nd_update(record, row, [gradient]))

  def recorded(self, i: int) -> list[np.ndarray]:
    return [r.numpy()[i] for r in self.records]


def _gru_step(units=UNITS, features=FEATURES, readout=None):
  """A GRU step model `[x_t, h] -> [y_t, h']`, optionally with a readout."""
  x = keras.Input((features,))
  h = keras.Input((units,))
  y, new_h = keras.layers.GRUCell(units)(x, [h])
  if readout is not None:
    y = keras.layers.Dense(readout)(y)
  return keras.Model([x, h], [y, new_h[0]])


def _data(seed=0, batch=BATCH, time=TIME, per_step=True, n=None):
  rng = np.random.default_rng(seed)
  n = n or batch
  x = rng.normal(size=(n, time, FEATURES)).astype(np.float32)
  running = np.cumsum(x[..., :1], axis=1) / np.sqrt(np.arange(1, time + 1))[
      :, None]
  y = running if per_step else running[:, -1]
  return x, y.astype(np.float32)


def _dataset(x, y, batch=BATCH):
  return tf.data.Dataset.from_tensor_slices((x, y)).batch(batch)


def _mse(y_true, y_pred):
  return tf.reduce_mean(tf.square(y_true - y_pred), axis=-1)


class TrainerTest(tf.test.TestCase, parameterized.TestCase):

  @parameterized.named_parameters(
      ("full_bptt", None, False), ("full_bptt_sequence_targets", None, True),
      ("tbptt_k1_eq_k2", (3, 3), False), ("tbptt_k1_lt_k2", (2, 5), False))
  def test_fit_decreases_loss_on_running_sum(self, tbptt, sequence_level):
    keras.utils.set_random_seed(0)
    x, y = _data(n=32, per_step=not sequence_level)
    trainer = stepper.Trainer(
        _gru_step(), keras.layers.Dense(1), loss="mse", tbptt=tbptt,
        optimizer=keras.optimizers.Adam(3e-2))
    history = trainer.fit(_dataset(x, y, 8), epochs=8, verbose=0)
    self.assertLen(history["loss"], 8)
    self.assertLess(history["loss"][-1], 0.5 * history["loss"][0])

  @parameterized.named_parameters(
      ("per_step", False, False, None), ("sequence_level", True, False, None),
      ("clipped", False, False, 1e-3), ("xla", False, True, None))
  def test_full_bptt_gradients_match_hand_written_tape(
      self, sequence_level, jit_compile, clip):
    keras.utils.set_random_seed(1)
    x, y = _data(per_step=not sequence_level)
    step, head = _gru_step(), keras.layers.Dense(1)
    recorder = _Recorder(capacity=1)
    trainer = stepper.Trainer(step, head, loss=_mse, optimizer=recorder,
                              gradient_clip_norm=clip, jit_compile=jit_compile)
    history = trainer.fit(_dataset(x, y), verbose=0)

    variables = step.trainable_variables + head.trainable_variables
    with tf.GradientTape() as tape:
      outputs, _ = stepper.model_rnn(step, tf.constant(x))
      predictions = head(outputs[:, -1] if sequence_level else outputs)
      loss = tf.reduce_mean(tf.square(predictions - y))
    grads = tape.gradient(loss, variables)
    if clip is not None:
      grads, norm = tf.clip_by_global_norm(grads, clip)
      self.assertGreater(float(norm), 10 * clip)  # Clipping is active.
    testing.assert_nests_close(recorder.recorded(0), grads, rtol=1e-5,
                               atol=1e-7)
    self.assertAllClose(history["loss"], [float(loss)], rtol=1e-6)

  def test_sparse_labels_match_hand_written_tape(self):
    keras.utils.set_random_seed(7)
    x, _ = _data()
    labels = np.random.default_rng(7).integers(0, 3, size=(BATCH, TIME))
    step, head = _gru_step(), keras.layers.Dense(3)
    recorder = _Recorder(capacity=1)
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    trainer = stepper.Trainer(step, head, loss=loss, optimizer=recorder)
    trainer.fit(_dataset(x, labels), verbose=0)

    variables = step.trainable_variables + head.trainable_variables
    with tf.GradientTape() as tape:
      logits = head(stepper.model_rnn(step, tf.constant(x))[0])
      reference = tf.reduce_mean(
          tf.nn.sparse_softmax_cross_entropy_with_logits(labels, logits))
    testing.assert_nests_close(recorder.recorded(0),
                               tape.gradient(reference, variables),
                               rtol=1e-5, atol=1e-7)

  @parameterized.named_parameters(
      ("k1_eq_k2", 2, 2), ("k1_lt_k2", 2, 3), ("k2_eq_time", 3, TIME))
  def test_tbptt_updates_match_tbptt_reference(self, k1, k2):
    keras.utils.set_random_seed(2)
    x, y = _data()
    step = _gru_step(readout=1)
    n_updates = -(-TIME // k1)
    recorder = _Recorder(capacity=n_updates)
    loss = keras.losses.MeanSquaredError()
    trainer = stepper.Trainer(step, loss=loss, optimizer=recorder,
                              tbptt=(k1, k2))
    history = trainer.fit(_dataset(x, y), verbose=0)

    reference = stepper.tbptt.updates(step, tf.constant(x), tf.constant(y),
                                      loss, k1=k1, k2=k2)
    self.assertLen(reference, n_updates)
    self.assertEqual(trainer.global_step, n_updates)  # One apply per update.
    for j, (_, grads_j) in enumerate(reference):
      testing.assert_nests_close(recorder.recorded(j), grads_j, rtol=1e-5,
                                 atol=1e-7, name=f"update {j}")
    self.assertAllClose(history["loss"],
                        [np.mean([float(l) for l, _ in reference])],
                        rtol=1e-6)

  @parameterized.named_parameters(("full_bptt", None), ("tbptt", (2, 3)))
  def test_resume_matches_uninterrupted_run(self, tbptt):
    x, y = _data(n=24)

    def dataset():  # Every run gets its own pipeline, seeded alike.
      return tf.data.Dataset.from_tensor_slices((x, y)).shuffle(
          24, seed=3).batch(4).repeat()

    def trainer(checkpoint_dir=None):
      keras.utils.set_random_seed(3)
      return stepper.Trainer(
          _gru_step(), keras.layers.Dense(1), loss="mse", tbptt=tbptt,
          optimizer=keras.optimizers.Adam(1e-2), gradient_clip_norm=1.0,
          checkpoint_dir=checkpoint_dir)

    uninterrupted, batches = trainer(), stepper.BatchLosses()
    uninterrupted.fit(dataset(), steps=8, callbacks=[batches], verbose=0)
    directory = tempfile.mkdtemp(dir=self.get_temp_dir())
    trainer(directory).fit(dataset(), steps=4, verbose=0)
    resumed, resumed_batches = trainer(directory), stepper.BatchLosses()
    resumed.fit(dataset(), steps=4, callbacks=[resumed_batches], verbose=0)

    self.assertEqual(resumed.global_step, uninterrupted.global_step)
    for a, b in zip(resumed.trainable_variables,
                    uninterrupted.trainable_variables):
      self.assertAllEqual(a, b)
    self.assertEqual(resumed_batches.losses, batches.losses[4:])

  def test_resume_restores_a_trained_model_not_a_fresh_one(self):
    x, y = _data(n=8)
    directory = tempfile.mkdtemp(dir=self.get_temp_dir())
    keras.utils.set_random_seed(4)
    first = stepper.Trainer(_gru_step(readout=1), loss="mse",
                            optimizer=keras.optimizers.Adam(1e-2),
                            checkpoint_dir=directory)
    first.fit(_dataset(x, y), verbose=0)
    keras.utils.set_random_seed(5)  # Different initial weights.
    second = stepper.Trainer(_gru_step(readout=1), loss="mse",
                             optimizer=keras.optimizers.Adam(1e-2),
                             checkpoint_dir=directory)
    second.evaluate(_dataset(x, y))  # Builds the variables.
    second.fit(_dataset(x, y), epochs=1, verbose=0)
    self.assertEqual(second.global_step, 4)

  @parameterized.named_parameters(("full_bptt", None), ("tbptt", (2, 3)))
  def test_fit_traces_once_for_batches_of_one_shape(self, tbptt):
    x, y = _data(n=20)
    trainer = stepper.Trainer(_gru_step(readout=1), loss="mse", tbptt=tbptt,
                              optimizer=keras.optimizers.SGD(1e-2))
    trainer.fit(_dataset(x, y), epochs=2, verbose=0)
    trainer.evaluate(_dataset(x, y))
    trainer.evaluate(_dataset(x, y))
    self.assertEqual(trainer.trace_counts, {"train": 1, "evaluate": 1})
    updates_per_batch = 1 if tbptt is None else -(-TIME // tbptt[0])
    self.assertEqual(trainer.global_step, 2 * 5 * updates_per_batch)

  def test_evaluate_matches_numpy_mean_over_uneven_batches(self):
    x, y = _data(n=10)  # Batches of 4, 4, 2.
    step, head = _gru_step(), keras.layers.Dense(1)
    trainer = stepper.Trainer(step, head, loss=_mse,
                              optimizer=keras.optimizers.SGD())
    result = trainer.evaluate(_dataset(x, y))
    predictions = head(stepper.model_rnn(step, tf.constant(x))[0]).numpy()
    self.assertAllClose(result["loss"], np.mean((predictions - y) ** 2),
                        rtol=1e-6)
    self.assertAllClose(trainer.predict(x), predictions, rtol=1e-6)

  def test_fit_trains_a_stack_and_validates(self):
    keras.utils.set_random_seed(6)
    x, y = _data(n=16)
    deep = stepper.stack([keras.layers.GRUCell(UNITS),
                          keras.layers.GRUCell(UNITS)])
    trainer = stepper.Trainer(deep, keras.layers.Dense(1), loss="mse",
                              optimizer=keras.optimizers.Adam(1e-2))
    history = trainer.fit(_dataset(x, y), epochs=2,
                          validation_data=_dataset(x, y), verbose=0)
    self.assertLen(history["val_loss"], 2)
    self.assertLen(trainer.trainable_variables, 2 * 3 + 2)

  @parameterized.named_parameters(("full_bptt", None, 2),
                                  ("tbptt", (3, 3), 2 * 3))
  def test_logdir_has_loss_grad_norm_and_learning_rate_scalars(
      self, tbptt, n_updates):
    x, y = _data(n=8)
    logdir = tempfile.mkdtemp(dir=self.get_temp_dir())
    trainer = stepper.Trainer(_gru_step(readout=1), loss="mse", tbptt=tbptt,
                              optimizer=keras.optimizers.SGD(0.5),
                              logdir=logdir)
    trainer.fit(_dataset(x, y), epochs=1, validation_data=_dataset(x, y),
                verbose=0)
    tags = {}
    for path in glob.glob(os.path.join(logdir, "events.out.tfevents.*")):
      for event in tf.compat.v1.train.summary_iterator(path):
        for value in event.summary.value:
          tags.setdefault(value.tag, []).append(
              (event.step, float(tf.make_ndarray(value.tensor))))
    self.assertEqual(set(tags),
                     {"loss", "grad_norm", "learning_rate", "val_loss"})
    # One point per optimizer update, at its update number.
    self.assertEqual([s for s, _ in tags["loss"]],
                     list(range(1, n_updates + 1)))
    self.assertEqual([s for s, _ in tags["val_loss"]], [n_updates])
    self.assertAllClose([v for _, v in tags["learning_rate"]],
                        [0.5] * n_updates)

  def test_callbacks_see_every_batch_and_can_stop(self):
    x, y = _data(n=16)

    class Stop(stepper.BatchLosses):

      def on_train_batch_end(self, batch, logs=None):
        super().on_train_batch_end(batch, logs)
        if batch == 2:
          self.model.stop_training = True

    stop = Stop()
    trainer = stepper.Trainer(_gru_step(readout=1), loss="mse",
                              optimizer=keras.optimizers.SGD())
    trainer.fit(_dataset(x, y), epochs=3, callbacks=[stop], verbose=0)
    self.assertLen(stop.losses, 3)
    self.assertEqual(trainer.global_step, 3)

  def test_fit_raises_on_inputs_without_time(self):
    dataset = tf.data.Dataset.from_tensor_slices(
        (np.zeros((8, FEATURES), np.float32), np.zeros((8, 1), np.float32)))
    trainer = stepper.Trainer(_gru_step(readout=1), loss="mse",
                              optimizer=keras.optimizers.SGD())
    with self.assertRaisesRegex(
        ValueError, r"dataset inputs has shape \(None, 3\) \(rank 2\); "
        r"expected rank >= 3 \(\[batch, time, \.\.\.\]\)"):
      trainer.fit(dataset.batch(4), verbose=0)

  def test_fit_raises_on_elements_that_are_not_pairs(self):
    x, _ = _data()
    trainer = stepper.Trainer(_gru_step(readout=1), loss="mse",
                              optimizer=keras.optimizers.SGD())
    with self.assertRaisesRegex(ValueError, r"pairs \(inputs, targets\)"):
      trainer.fit(tf.data.Dataset.from_tensor_slices(x).batch(4), verbose=0)
    with self.assertRaisesRegex(TypeError, r"must be a tf.data.Dataset"):
      trainer.fit((x, x), verbose=0)

  @parameterized.named_parameters(("full_bptt", None), ("tbptt", (2, 3)))
  def test_fit_raises_on_targets_unlike_the_predictions(self, tbptt):
    x, _ = _data()
    trainer = stepper.Trainer(_gru_step(readout=1), loss="mse", tbptt=tbptt,
                              optimizer=keras.optimizers.SGD())
    bad = np.zeros((BATCH, TIME, 2), np.float32)
    with self.assertRaisesRegex(
        ValueError, r"targets have shape \(None, 7, 2\), which matches no "
        r"prediction: expected per-step targets \(None, 7, 1\)"):
      trainer.fit(_dataset(x, bad), verbose=0)

  def test_tbptt_raises_on_sequence_level_targets(self):
    x, y = _data(per_step=False)
    trainer = stepper.Trainer(_gru_step(readout=1), loss="mse",
                              tbptt=(2, 3), optimizer=keras.optimizers.SGD())
    with self.assertRaisesRegex(ValueError,
                                r"truncated BPTT needs a target at every"):
      trainer.fit(_dataset(x, y), verbose=0)

  @parameterized.named_parameters(
      ("k1_gt_k2", (3, 2), r"needs 1 <= k1 <= k2"),
      ("zero", (0, 2), r"needs 1 <= k1 <= k2"),
      ("not_a_pair", 3, r"must be None or a pair of ints"))
  def test_trainer_raises_on_bad_tbptt(self, tbptt, message):
    with self.assertRaisesRegex(ValueError, r"`tbptt`.*" + message):
      stepper.Trainer(_gru_step(readout=1), loss="mse", tbptt=tbptt,
                      optimizer=keras.optimizers.SGD())

  def test_row_wise_head_after_the_loop_equals_head_in_the_loop(self):
    # A Dense head runs after the loop, on [batch * time, units]; behind a
    # Lambda (not row-wise) the same Dense runs inside the loop at every
    # step, the path every head took before. float64: the same products,
    # summed in another order. TBPTT(2, 5): the loss steps' rows only (full
    # BPTT's after-the-loop head is pinned against hand-written tapes).
    x, y = (a.astype(np.float64) for a in _data())
    trained = []
    for in_loop in (False, True):
      keras.utils.set_random_seed(6)
      cell = keras.layers.GRUCell(UNITS, dtype="float64")
      dense = keras.layers.Dense(2, dtype="float64")
      head = keras.Sequential([dense, keras.layers.Lambda(
          lambda t: t, dtype="float64")]) if in_loop else dense
      trainer = stepper.Trainer(cell, head, loss=_mse, tbptt=(2, 5),
                                optimizer=keras.optimizers.SGD(0.5))
      history = trainer.fit(_dataset(x, np.repeat(y, 2, -1)), epochs=2,
                            verbose=0)
      trained.append((history["loss"], trainer.predict(x[:2]),
                      trainer.trainable_variables))
    (loss, predicted, weights), (loss_in, predicted_in, weights_in) = trained
    self.assertEqual(predicted.shape, (2, TIME, 2))
    self.assertAllClose(loss, loss_in, rtol=1e-12)
    testing.assert_nests_close(predicted, predicted_in, rtol=1e-12)
    testing.assert_nests_close(weights, weights_in, rtol=1e-12)

  def test_row_wise_recognises_heads_that_do_not_mix_rows(self):
    row_wise = _train_args.row_wise
    layers = keras.layers
    for head in (layers.Dense(3), layers.Activation("relu"),
                 layers.Dropout(0.5), layers.Softmax(),
                 layers.LayerNormalization(),
                 layers.EinsumDense("ab,bc->ac", output_shape=3),
                 keras.Sequential([layers.Dense(3), layers.ReLU()])):
      self.assertTrue(row_wise(head), head)

    class MyDense(layers.Dense):  # May override call to mix rows.
      pass

    for head in (layers.BatchNormalization(), layers.Dropout(0.5, (1, 3)),
                 layers.Softmax(axis=0), layers.LayerNormalization(axis=0),
                 layers.EinsumDense("ab,ac->bc", output_shape=(3, 3)),
                 layers.Lambda(lambda t: t), MyDense(3),
                 keras.Sequential([layers.Dense(3),
                                   layers.BatchNormalization()])):
      self.assertFalse(row_wise(head), head)

  def test_trainer_raises_on_bad_arguments(self):
    step = _gru_step(readout=1)
    with self.assertRaisesRegex(TypeError, r"`optimizer` must be a keras"):
      stepper.Trainer(step, loss="mse", optimizer="adam")
    with self.assertRaisesRegex(TypeError, r"`loss` must be a Keras loss"):
      stepper.Trainer(step, loss=3, optimizer=keras.optimizers.SGD())
    with self.assertRaisesRegex(ValueError, r"`gradient_clip_norm` must be"):
      stepper.Trainer(step, loss="mse", optimizer=keras.optimizers.SGD(),
                      gradient_clip_norm=-1.0)


# The logical CPU devices must exist before TensorFlow initialises its
# devices, so the strategy run happens in a fresh interpreter.
_MIRRORED_SCRIPT = textwrap.dedent("""
    import json, sys
    import keras, numpy as np, tensorflow as tf
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(
        cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    import stepper
    tbptt = json.loads(sys.argv[1])
    rng = np.random.default_rng(0)
    x = rng.normal(size=(16, 6, 3)).astype(np.float32)
    y = np.cumsum(x[..., :1], axis=1).astype(np.float32)
    if tbptt is None:
      y = y[:, -1]
    dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(8)

    def run(strategy):
      with strategy.scope():
        keras.utils.set_random_seed(0)
        inp, h = keras.Input((3,)), keras.Input((5,))
        out, new_h = keras.layers.GRUCell(5)(inp, [h])
        step = keras.Model([inp, h], [out, new_h[0]])
        trainer = stepper.Trainer(
            step, keras.layers.Dense(1), loss="mse", strategy=strategy,
            optimizer=keras.optimizers.Adam(1e-2), gradient_clip_norm=1.0,
            tbptt=None if tbptt is None else tuple(tbptt))
      history = trainer.fit(dataset, epochs=2, verbose=0)
      return (history["loss"], trainer.evaluate(dataset)["loss"],
              [v.numpy() for v in trainer.trainable_variables])

    mirrored = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    single = run(tf.distribute.get_strategy())
    multi = run(mirrored)
    print(json.dumps(dict(
        replicas=mirrored.num_replicas_in_sync,
        loss=[single[0], multi[0]], eval=[single[1], multi[1]],
        weight_error=max(float(np.max(np.abs(a - b) / (np.abs(a) + 1e-6)))
                         for a, b in zip(single[2], multi[2])))))
""")


class TrainerIterationsTest(tf.test.TestCase, parameterized.TestCase):
  """`optimizer.iterations` counts the updates applied, nothing more: the
  call that finds an epoch's data exhausted must not count (it skewed Adam's
  bias correction and every learning-rate schedule)."""

  def _adam(self):
    return keras.optimizers.Adam(keras.optimizers.schedules.ExponentialDecay(
        0.05, decay_steps=1, decay_rate=0.7))

  def test_adam_with_schedule_matches_hand_loop(self):
    keras.utils.set_random_seed(3)
    x, y = _data(n=3 * BATCH)
    step, twin = keras.layers.GRUCell(1), keras.layers.GRUCell(1)
    for cell in (step, twin):
      cell.build((None, FEATURES))
    twin.set_weights(step.get_weights())
    optimizer, twin_optimizer = self._adam(), self._adam()
    trainer = stepper.Trainer(step, loss=_mse, optimizer=optimizer)
    trainer.fit(_dataset(x, y), epochs=2, verbose=0)

    @tf.function
    def update(xb, yb):
      with tf.GradientTape() as tape:
        outputs, _ = stepper.model_rnn(twin, xb)
        loss = tf.reduce_mean(tf.square(outputs - yb))
      twin_optimizer.apply(tape.gradient(loss, twin.trainable_variables),
                           twin.trainable_variables)

    for _ in range(2):
      for xb, yb in _dataset(x, y):
        update(xb, yb)
    self.assertEqual(int(twin_optimizer.iterations), 6)
    self.assertEqual(int(optimizer.iterations), 6)
    self.assertEqual(trainer.global_step, 6)
    testing.assert_nests_close(step.trainable_variables,
                               twin.trainable_variables, rtol=1e-5, atol=1e-6)

  @parameterized.named_parameters(
      ("tbptt", dict(tbptt=(3, 3)), 2 * 3 * 3),
      ("xla", dict(jit_compile=True), 2 * 3))
  def test_iterations_equal_updates(self, kwargs, updates):
    x, y = _data(n=3 * BATCH)  # TIME = 7: three windows of 3 steps.
    optimizer = self._adam()
    trainer = stepper.Trainer(keras.layers.GRUCell(1), loss=_mse,
                              optimizer=optimizer, **kwargs)
    trainer.fit(_dataset(x, y), epochs=2, verbose=0)
    self.assertEqual(int(optimizer.iterations), updates)
    self.assertEqual(trainer.global_step, updates)


class TrainerDistributedTest(tf.test.TestCase, parameterized.TestCase):

  @parameterized.named_parameters(("full_bptt", None), ("tbptt", [2, 4]))
  def test_mirrored_strategy_matches_single_device(self, tbptt):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    result = subprocess.run(
        [sys.executable, "-c", _MIRRORED_SCRIPT, json.dumps(tbptt)],
        capture_output=True, text=True, env=env, timeout=300, check=False)
    self.assertEqual(result.returncode, 0, result.stderr[-3000:])
    report = json.loads(result.stdout.strip().splitlines()[-1])
    self.assertEqual(report["replicas"], 2)
    self.assertAllClose(*report["loss"], rtol=1e-5)
    self.assertAllClose(*report["eval"], rtol=1e-5)
    self.assertLess(report["weight_error"], 1e-5)


if __name__ == "__main__":
  tf.test.main()
