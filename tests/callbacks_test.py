"""Tests of `stepper.callbacks`: which hooks the trainer's dispatcher calls
and what `BatchLosses` records (the full `fit` is in train_test.py)."""

import tensorflow as tf

import stepper
from stepper import callbacks


class _Recorder:
  """Defines two hooks only; records their calls."""

  def __init__(self):
    self.calls = []
    self.model = None

  def set_model(self, model):
    self.model = model

  def on_epoch_begin(self, epoch):
    self.calls.append(("on_epoch_begin", epoch))

  def on_train_batch_end(self, batch, logs):
    self.calls.append(("on_train_batch_end", batch, logs["loss"]))


class DispatcherTest(tf.test.TestCase):

  def test_calls_only_the_hooks_a_callback_defines(self):
    recorder, model = _Recorder(), object()
    dispatch = callbacks.Dispatcher([recorder], model)
    dispatch.call("on_train_begin")  # Not defined: skipped.
    dispatch.call("on_epoch_begin", 0)
    dispatch.call("on_train_batch_end", 0, {"loss": 1.5})
    self.assertIs(recorder.model, model)
    self.assertEqual(recorder.calls, [("on_epoch_begin", 0),
                                      ("on_train_batch_end", 0, 1.5)])

  def test_no_callbacks(self):
    callbacks.Dispatcher(None, object()).call("on_train_begin")


class BatchLossesTest(tf.test.TestCase):

  def test_collects_each_batch_loss_in_order(self):
    curve = stepper.BatchLosses()
    dispatch = callbacks.Dispatcher([curve], object())
    for batch, loss in enumerate([3.0, 2.0, 1.0]):
      dispatch.call("on_train_batch_end", batch, {"loss": loss})
    self.assertEqual(curve.losses, [3.0, 2.0, 1.0])


if __name__ == "__main__":
  tf.test.main()
