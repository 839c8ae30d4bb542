r"""A character-level language model streamed over real text with TBPTT.

    python -m benchmarks.char_lm                     # a few minutes, 2 cores
    python -m benchmarks.char_lm --chars=20000 --units=32   # a quick look

The text is the Python standard library's own source (`*.py` under
`sysconfig.get_paths()["stdlib"]`, files in sorted order), read at run time:
nothing is downloaded. The first `--chars` characters are the training text,
the next `--val_chars` (from later files) the validation text. Characters
outside printable ASCII map to one "other" symbol.

The model is embedding -> LSTM step -> softmax over the characters, the
same size every way. It is trained for one pass over the training text cut
into `--batch` contiguous streams (`stepper.data.streams`):

* by `stepper.Trainer(stream=True)` with TBPTT(k1, k2) for every pair of
  `--settings` (`k1:k2`), batches of `k1` steps: one update per batch whose
  gradient reaches `k2` steps back, into earlier batches when `k2 > k1`;
* by Keras (the baseline): `keras.layers.LSTM(stateful=True)` fitted on the
  same batches of `--keras_k` steps with `shuffle=False`: one update per
  batch, the gradient cut at the batch's first step, i.e. TBPTT(k, k).

Same data, model size, optimizer (Adam, global gradient clipping) and number
of updates for TBPTT(k1, .) and the baseline when `k1 = --keras_k`. Reported:
validation bits per character (the validation streams run through with the
state carried, from zeros) and the median wall time per update (after the
first, traced, update). Writes JSON and a PNG of the learning curves.
"""

import glob
import json
import os
import statistics
import string
import sysconfig
import time as time_lib

from absl import app
from absl import flags
from absl import logging
import keras
import numpy as np
import tensorflow as tf

import stepper

_CHARS = flags.DEFINE_integer("chars", 300_000, "Training characters.",
                              lower_bound=1)
_VAL_CHARS = flags.DEFINE_integer("val_chars", 30_000,
                                  "Validation characters.", lower_bound=1)
_BATCH = flags.DEFINE_integer("batch", 32, "Parallel streams per batch.",
                              lower_bound=1)
_UNITS = flags.DEFINE_integer("units", 128, "LSTM units.", lower_bound=1)
_EMBED = flags.DEFINE_integer("embed", 32, "Embedding size.", lower_bound=1)
_SETTINGS = flags.DEFINE_list(
    "settings", ["16:16", "16:32", "16:64"],
    "TBPTT settings k1:k2 for Trainer(stream=True).")
_KERAS_K = flags.DEFINE_integer(
    "keras_k", 16, "Steps per batch of the Keras stateful baseline (0: no "
    "baseline).", lower_bound=0)
_LEARNING_RATE = flags.DEFINE_float("learning_rate", 3e-3, "Adam's rate.")
_CLIP = flags.DEFINE_float("clip", 1.0, "Global gradient norm clip.")
_SEED = flags.DEFINE_integer("seed", 0, "Random seed (weights).")
_OUT = flags.DEFINE_string("out", "benchmarks/results/char_lm.json",
                           "JSON results path (the PNG goes next to it).")

# Printable ASCII (tabs and newlines included); id 0 is "any other".
_ALPHABET = string.printable
_VOCAB = len(_ALPHABET) + 1


def stdlib_text(n: int) -> str:
  """The first `n` characters of the standard library's sources."""
  root = sysconfig.get_paths()["stdlib"]
  parts, size = [], 0
  for path in sorted(glob.glob(os.path.join(root, "*.py"))):
    with open(path, encoding="utf-8", errors="replace") as f:
      parts.append(f.read())
    size += len(parts[-1])
    if size >= n:
      break
  text = "".join(parts)
  if len(text) < n:
    raise ValueError(f"The standard library at {root} has only {len(text)} "
                     f"characters of *.py sources; asked for {n}.")
  return text[:n]


def encode(text: str) -> np.ndarray:
  """Character ids, int32 `[len(text)]`."""
  ids = {c: i + 1 for i, c in enumerate(_ALPHABET)}
  return np.array([ids.get(c, 0) for c in text], np.int32)


def step_model(units: int, embed: int) -> keras.Model:
  """`[x_t [1] int, h, c] -> [logits_t, h', c']`: embedding then LSTM."""
  x = keras.Input((1,), dtype="int32")
  h, c = keras.Input((units,)), keras.Input((units,))
  e = keras.layers.Reshape((embed,))(keras.layers.Embedding(_VOCAB, embed)(x))
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
  return nats / np.log(2.0)


def train_stepper(k1: int, k2: int, train: np.ndarray,
                  val: np.ndarray) -> dict:
  """TBPTT(k1, k2) by `Trainer(stream=True)`; one update per batch."""
  keras.utils.set_random_seed(_SEED.value)
  trainer = stepper.Trainer(
      step_model(_UNITS.value, _EMBED.value), keras.layers.Dense(_VOCAB),
      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
      optimizer=keras.optimizers.Adam(_LEARNING_RATE.value),
      gradient_clip_norm=_CLIP.value, tbptt=(k1, k2), stream=True)
  clock = _Clock()
  trainer.fit(_streams(train, k1), callbacks=[clock], verbose=0)
  val_loss = trainer.evaluate(_streams(val, k1))["loss"]
  return dict(run=f"stepper TBPTT({k1},{k2})", k1=k1, k2=k2,
              updates=trainer.global_step, val_bpc=_bits(val_loss),
              train_bpc_last=_bits(float(np.mean(clock.losses[-20:]))),
              seconds_per_update=clock.seconds_per_batch(),
              curve=[_bits(x) for x in clock.losses])


def train_keras(k: int, train: np.ndarray, val: np.ndarray) -> dict:
  """The Keras way: a stateful LSTM fitted on the same stream batches."""
  keras.utils.set_random_seed(_SEED.value)
  model = keras.Sequential([
      keras.Input(batch_shape=(_BATCH.value, None), dtype="int32"),
      keras.layers.Embedding(_VOCAB, _EMBED.value),
      keras.layers.LSTM(_UNITS.value, stateful=True, return_sequences=True),
      keras.layers.Dense(_VOCAB)])
  model.compile(
      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
      optimizer=keras.optimizers.Adam(_LEARNING_RATE.value,
                                      global_clipnorm=_CLIP.value))
  clock = _Clock()
  model.fit(_streams(train, k, squeeze=True), epochs=1, shuffle=False,
            callbacks=[clock], verbose=0)
  _reset(model)
  val_loss = model.evaluate(_streams(val, k, squeeze=True), verbose=0)
  losses = _per_batch(clock.losses)
  return dict(run=f"Keras LSTM(stateful) k={k}", k1=k, k2=k,
              updates=int(model.optimizer.iterations.numpy()),
              val_bpc=_bits(val_loss),
              train_bpc_last=_bits(float(np.mean(losses[-20:]))),
              seconds_per_update=clock.seconds_per_batch(),
              curve=[_bits(x) for x in losses])


def _reset(model: keras.Model) -> None:
  for layer in model.layers:
    if getattr(layer, "stateful", False):
      layer.reset_states()


def _per_batch(running_means: list[float]) -> list[float]:
  """Keras logs the running mean of the epoch; recover each batch's loss."""
  means = np.asarray(running_means)
  counts = np.arange(1, len(means) + 1)
  totals = means * counts
  return list(np.diff(totals, prepend=0.0))


def _streams(ids: np.ndarray, window: int,
             squeeze: bool = False) -> tf.data.Dataset:
  """Next-character streams: inputs `[batch, window, 1]` (`[batch, window]`
  with `squeeze`), targets `[batch, window]`."""
  x = ids[:-1] if squeeze else ids[:-1, None]
  return stepper.data.streams(x, ids[1:], batch_size=_BATCH.value,
                              window=window)


def _settings() -> list[tuple[int, int]]:
  pairs = []
  for setting in _SETTINGS.value:
    k1, k2 = (int(k) for k in setting.split(":"))
    pairs.append((k1, k2))
  return pairs


def plot(rows: list[dict], path: str) -> None:
  """Training bits per character against updates (10-update means)."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")  # No display: write the file only.
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  figure, axes = plt.subplots(figsize=(7, 4))
  for r in rows:
    mean = np.convolve(r["curve"], np.ones(10) / 10, mode="valid")
    axes.plot(np.arange(len(mean)) + 10, mean,
              label=f"{r['run']}: val {r['val_bpc']:.3f} bpc")
  axes.set_xlabel("optimizer updates")
  axes.set_ylabel("training bits per character (10-update mean)")
  axes.set_title(f"char LM on {_CHARS.value} chars of the Python stdlib, "
                 f"LSTM {_UNITS.value}")
  axes.legend()
  figure.tight_layout()
  figure.savefig(path, dpi=100)
  plt.close(figure)


def table(rows: list[dict]) -> str:
  """A Markdown table of the runs."""
  lines = ["| run | k1 | k2 | updates | validation bpc | ms / update |",
           "|---|---:|---:|---:|---:|---:|"]
  for r in rows:
    lines.append(f"| {r['run']} | {r['k1']} | {r['k2']} | {r['updates']} | "
                 f"{r['val_bpc']:.3f} | {1e3 * r['seconds_per_update']:.1f} |")
  return "\n".join(lines)


def main(argv):
  del argv
  text = stdlib_text(_CHARS.value + _VAL_CHARS.value)
  ids = encode(text)
  train, val = ids[:_CHARS.value], ids[_CHARS.value:]
  rows = []
  if _KERAS_K.value:
    rows.append(train_keras(_KERAS_K.value, train, val))
    logging.info("%s: %.3f bpc", rows[-1]["run"], rows[-1]["val_bpc"])
  for k1, k2 in _settings():
    rows.append(train_stepper(k1, k2, train, val))
    logging.info("%s: %.3f bpc", rows[-1]["run"], rows[-1]["val_bpc"])
  print(table(rows))
  os.makedirs(os.path.dirname(_OUT.value) or ".", exist_ok=True)
  config = dict(chars=_CHARS.value, val_chars=_VAL_CHARS.value,
                batch=_BATCH.value, units=_UNITS.value, embed=_EMBED.value,
                learning_rate=_LEARNING_RATE.value, clip=_CLIP.value,
                vocab=_VOCAB, source="stdlib *.py, sorted",
                cpus=os.cpu_count(), tensorflow=tf.__version__)
  for r in rows:  # Compact: a curve has one value per update.
    r["curve"] = [round(x, 4) for x in r["curve"]]
  with open(_OUT.value, "w") as f:
    json.dump(dict(config=config, runs=rows), f, separators=(",", ":"))
  png = os.path.splitext(_OUT.value)[0] + ".png"
  plot(rows, png)
  print(f"plot: {png}")


if __name__ == "__main__":
  app.run(main)
