"""One LSTM trained on long streams: by stepper's TBPTT or Keras' stateful LSTM.

Shared by `benchmarks.char_lm` (real text) and `benchmarks.delay` (a task
where truncation provably matters): the model (embedding -> LSTM step ->
softmax), the two ways to train it on the same batches, the settings of one
experiment (`benchmarks.experiment`), its report, and the delay task's
stream. No flags: tests import it.
"""

import dataclasses
import os
import statistics
import time as time_lib
from typing import Callable

import keras
import numpy as np
import tensorflow as tf

from benchmarks import experiment
import stepper

Pair = tuple[np.ndarray, np.ndarray]


@dataclasses.dataclass(frozen=True)
class Hyper:
  """What every run of one experiment shares."""
  batch: int = 32
  units: int = 128
  embed: int = 32
  learning_rate: float = 3e-3
  clip: float = 1.0


def step_model(units: int, embed: int, vocab: int) -> keras.Model:
  """`[x_t [1] int, h, c] -> [logits_t, h', c']`: embedding then LSTM."""
  x = keras.Input((1,), dtype="int32")
  h, c = keras.Input((units,)), keras.Input((units,))
  e = keras.layers.Reshape((embed,))(keras.layers.Embedding(vocab, embed)(x))
  y, (new_h, new_c) = keras.layers.LSTMCell(units)(e, [h, c])
  return keras.Model([x, h, c], [y, new_h, new_c])


class _Clock(keras.callbacks.Callback):
  """Training loss and wall time at the end of every batch."""

  def __init__(self):
    super().__init__()
    self.losses, self.times = [], [time_lib.perf_counter()]

  def on_train_batch_end(self, batch, logs=None):
    self.losses.append(float(logs["loss"]))
    self.times.append(time_lib.perf_counter())

  def seconds_per_batch(self) -> float:
    """Median batch time, the first (traced) batch left out."""
    deltas = np.diff(self.times)[1:]
    return float(statistics.median(deltas)) if len(deltas) else float("nan")


def _bits(nats: float) -> float:
  return float(nats) / np.log(2.0)


def _metrics(losses: list[float], val_bits: float, updates: int,
             seconds: float) -> dict:
  tail = max(1, len(losses) // 10)
  return dict(val_bits=val_bits,
              online_bits_last10=_bits(np.mean(losses[-tail:])),
              updates=updates, seconds_per_update=seconds,
              curve=[_bits(x) for x in losses])


def fit_stepper(k1: int, k2: int, train: Pair, seed: int, hyper: Hyper,
                vocab: int) -> tuple[stepper.Trainer, list[float], float]:
  """Trains TBPTT(k1, k2) by `Trainer(stream=True)`, one update per `k1`
  steps.

  Args:
    k1, k2: Steps per update, steps each update backpropagates.
    train: `(inputs, targets)`, int32 ids `[N]` each (one long sequence, cut
      into `hyper.batch` streams).
    seed: Sets the weights.
    hyper: Sizes and optimizer.
    vocab: Symbols (ids `< vocab`).

  Returns:
    `(trainer, losses, seconds)`: the trained Trainer, the training loss of
    every update (nats), the median seconds per update.
  """
  keras.utils.set_random_seed(seed)
  trainer = stepper.Trainer(
      step_model(hyper.units, hyper.embed, vocab), keras.layers.Dense(vocab),
      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
      optimizer=keras.optimizers.Adam(hyper.learning_rate),
      gradient_clip_norm=hyper.clip, tbptt=(k1, k2), stream=True)
  clock = _Clock()
  trainer.fit(streams(*train, k1, hyper.batch), callbacks=[clock],
              verbose=0)
  return trainer, clock.losses, clock.seconds_per_batch()


def bits_on(trainer: stepper.Trainer, data: Pair, k1: int,
            batch: int) -> float:
  """The frozen model's bits per symbol on `data`, cut into `batch` streams
  from the initial state (the training stream is left alone)."""
  return _bits(trainer.evaluate(streams(*data, k1, batch))["loss"])


def train_stepper(k1: int, k2: int, train: Pair, val: Pair, seed: int,
                  hyper: Hyper, vocab: int) -> dict:
  """`fit_stepper`, then validation: metrics (bits per symbol) and the
  curve (training bits per update)."""
  trainer, losses, seconds = fit_stepper(k1, k2, train, seed, hyper, vocab)
  val_bits = bits_on(trainer, val, k1, hyper.batch)
  return _metrics(losses, val_bits, trainer.global_step, seconds)


def train_keras(k: int, train: Pair, val: Pair, seed: int, hyper: Hyper,
                vocab: int) -> dict:
  """The Keras way: a stateful LSTM fitted on the same stream batches; as
  `train_stepper` with `k1 = k2 = k`."""
  keras.utils.set_random_seed(seed)
  model = keras.Sequential([
      keras.Input(batch_shape=(hyper.batch, None), dtype="int32"),
      keras.layers.Embedding(vocab, hyper.embed),
      keras.layers.LSTM(hyper.units, stateful=True, return_sequences=True),
      keras.layers.Dense(vocab)])
  model.compile(
      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
      optimizer=keras.optimizers.Adam(hyper.learning_rate,
                                      global_clipnorm=hyper.clip))
  clock = _Clock()
  model.fit(streams(*train, k, hyper.batch, squeeze=True), epochs=1,
            shuffle=False, callbacks=[clock], verbose=0)
  for layer in model.layers:  # Validation streams start from zeros.
    if getattr(layer, "stateful", False):
      layer.reset_states()
  val_loss = model.evaluate(streams(*val, k, hyper.batch, squeeze=True),
                            verbose=0)
  return _metrics(_per_batch(clock.losses), _bits(val_loss),
                  int(model.optimizer.iterations.numpy()),
                  clock.seconds_per_batch())


def _per_batch(running_means: list[float]) -> list[float]:
  """Keras logs the running mean of the epoch; recover each batch's loss."""
  means = np.asarray(running_means)
  totals = means * np.arange(1, len(means) + 1)
  return list(np.diff(totals, prepend=0.0))


def streams(inputs: np.ndarray, targets: np.ndarray, window: int, batch: int,
            squeeze: bool = False) -> tf.data.Dataset:
  """`batch` streams: inputs `[batch, window, 1]` (`[batch, window]` with
  `squeeze`), targets `[batch, window]`."""
  x = inputs if squeeze else inputs[:, None]
  return stepper.data.streams(x, targets, batch_size=batch, window=window)


def settings(k1: int, factors: list[int], keras_baseline: bool,
             data: Callable[[int], tuple[Pair, Pair]], hyper: Hyper,
             vocab: int) -> dict:
  """`name -> fn(seed)` for TBPTT(k1, f*k1) per factor, and Keras at k1.

  Args:
    k1: Steps per update.
    factors: k2 = factor * k1 for each.
    keras_baseline: Add "Keras stateful k=k1".
    data: `seed -> (train, val)`, each `(inputs, targets)`: the same for
      every setting.
    hyper: Sizes and optimizer.
    vocab: Symbols.
  """
  out = {}
  for f in factors:
    out[f"TBPTT({k1},{f * k1})"] = (
        lambda seed, k2=f * k1: train_stepper(k1, k2, *data(seed), seed,
                                              hyper, vocab))
  if keras_baseline:
    out[f"Keras stateful k={k1}"] = (
        lambda seed: train_keras(k1, *data(seed), seed, hyper, vocab))
  return out


def report(results: experiment.Results, k1s: list[int], path: str,
           title: str, unit: str) -> str:
  """Tables (validation and online loss, paired against TBPTT(k1, k1), else
  the first setting of that k1) and one PNG per k1 next to `path`; returns
  the Markdown."""
  parts = []
  for k1 in k1s:
    group = experiment.Results(results.config, [
        r for r in results.runs if r["setting"].startswith(
            (f"TBPTT({k1},", f"Keras stateful k={k1}"))])
    if not group.runs:
      continue
    base = f"TBPTT({k1},{k1})"
    if base not in group.settings():
      base = group.settings()[0]
    for metric in ("val_bits", "online_bits_last10", "seconds_per_update"):
      parts.append(f"k1 = {k1}, {metric}:\n\n"
                   + group.table(metric, base, digits=4 if "sec" in metric
                                 else 3) + "\n")
    group.plot(os.path.splitext(path)[0] + f"_k{k1}.png",
               smooth=max(1, group.runs[0]["metrics"]["updates"] // 40),
               ylabel=f"training {unit} (moving mean)",
               xlabel="optimizer updates", title=f"{title}, k1 = {k1}")
  return "\n".join(parts)


def delay_stream(n: int, lag: int, symbols: int,
                 rng: np.random.Generator) -> Pair:
  """`(inputs, targets)`, int32 `[n]` each: symbols `1..symbols` drawn
  uniformly, and `targets[t] = inputs[t - lag]`."""
  s = rng.integers(1, symbols + 1, size=n + lag).astype(np.int32)
  return s[lag:], s[:-lag]
