r"""Trainer against Keras' `fit`: time per optimizer update, paired.

    python -m benchmarks.trainer --rounds=8            # ~3 minutes, 2 cores
    python -m benchmarks.trainer --rounds=3 --batches=8 --configs=lstm_full
                                                       # a quick look

Each config builds the same model twice, the stepper way and the Keras way,
with the same weights, optimizer and batches:

* `lstm_full`: an LSTM(128) step and a `Dense(1)` head over `[32, 100, 32]`
  batches, per-step targets, full BPTT: `Trainer(step, head)` against
  `model.fit` of `Sequential([LSTM(128, return_sequences=True), Dense(1)])`.
* `char_lm_k16`, `char_lm_k4`: a character model (Embedding 32, LSTM 128,
  a 101-way head) over 32 streams, TBPTT(k, k) with batches of `k` steps:
  `Trainer(stream=True, tbptt=(k, k))` against a stateful LSTM's `fit` on
  the same batches (`shuffle=False`), one update per batch each.

Every round fits each model for one epoch of `--batches` batches (the
order alternates between rounds) and records the wall time of every batch
(`on_train_batch_end`, which both loops call after each update). A round's
time per update is the median over its batches after the first; its ratio
is the Trainer's over Keras' in the same round. The first round (tracing)
is a warm-up and left out. Reported: the median over rounds of the per-round
medians and of the paired ratios, their min and max, and the ratio of each
loop's fastest round (the least disturbed by other load on a shared
machine).

The machine this runs on may be shared: only the paired ratios within one
process are comparable. Results go to `--out` (JSON) and, with
`--markdown`, a table on stdout.

Before/after: the script times whatever `stepper` it imports, so an older
version is timed by running this file next to that version's package:

    mkdir /tmp/before && git archive <commit> stepper | tar -x -C /tmp/before
    mkdir /tmp/before/benchmarks && cp benchmarks/trainer.py \
        benchmarks/__init__.py /tmp/before/benchmarks/
    (cd /tmp/before && python -m benchmarks.trainer --out=before.json)
"""

import json
import statistics
import time as time_lib

from absl import app
from absl import flags
import keras
import numpy as np
import tensorflow as tf

import stepper

_CONFIGS = flags.DEFINE_list(
    "configs", ["lstm_full", "char_lm_k16", "char_lm_k4"],
    "Which configs to time.")
_ROUNDS = flags.DEFINE_integer("rounds", 6, "Rounds, the first a warm-up.",
                               lower_bound=2)
_BATCHES = flags.DEFINE_integer("batches", 30, "Batches per round.",
                                lower_bound=3)
_JIT = flags.DEFINE_bool("jit_compile", False,
                         "Both loops with jit_compile=True (XLA).")
_HOIST = flags.DEFINE_bool(
    "hoist", False, "Trainer(hoist=True): the step's input half (the char "
    "model's embedding and x @ kernel) before the loop, as Keras runs its "
    "Embedding layer on the whole sequence.")
_OUT = flags.DEFINE_string("out", "benchmarks/results/trainer.json",
                           "JSON results path.")
_MARKDOWN = flags.DEFINE_bool("markdown", True, "Print a markdown table.")

_UNITS, _VOCAB, _EMBED, _STREAMS = 128, 101, 32, 32


class _Clock(keras.callbacks.Callback):
  """The wall time at the end of every batch."""

  def __init__(self):
    super().__init__()
    self.times = []

  def on_train_begin(self, logs=None):
    self.times = [time_lib.perf_counter()]

  def on_train_batch_end(self, batch, logs=None):
    self.times.append(time_lib.perf_counter())

  def per_update_s(self) -> float:
    """The median batch time, the epoch's first batch left out."""
    return float(statistics.median(np.diff(self.times)[1:]))


def _hoist() -> dict:
  """`hoist=True` only when asked: an older Trainer (a "before" run) has no
  `hoist` argument."""
  return dict(hoist=True) if _HOIST.value else {}


def _lstm_full(batches: int):
  """LSTM 128, B32 T100 F32, Dense(1) head, full BPTT, per-step targets."""
  rng = np.random.default_rng(0)
  x = rng.normal(size=(32 * batches, 100, 32)).astype(np.float32)
  y = np.cumsum(x[..., :1], axis=1).astype(np.float32) / 10
  dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(32).cache()
  keras.utils.set_random_seed(0)
  model = keras.Sequential([keras.Input((100, 32)),
                            keras.layers.LSTM(_UNITS, return_sequences=True),
                            keras.layers.Dense(1)])
  model.compile(loss="mse", optimizer=keras.optimizers.Adam(1e-3),
                jit_compile=_JIT.value)
  cell = keras.layers.LSTMCell(_UNITS)
  head = keras.layers.Dense(1)
  cell.build((None, 32))
  head.build((None, _UNITS))
  cell.set_weights(model.layers[0].get_weights())
  head.set_weights(model.layers[1].get_weights())
  trainer = stepper.Trainer(cell, head, loss="mse",
                            optimizer=keras.optimizers.Adam(1e-3),
                            jit_compile=_JIT.value, **_hoist())
  return (lambda clock: trainer.fit(dataset, callbacks=[clock], verbose=0),
          lambda clock: model.fit(dataset, callbacks=[clock], verbose=0,
                                  shuffle=False))


def _char_lm(k: int):
  def build(batches: int):
    ids = np.random.default_rng(0).integers(
        0, _VOCAB, size=_STREAMS * batches * k + 1).astype(np.int32)
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    streams = lambda x: stepper.data.streams(
        x, ids[1:], batch_size=_STREAMS, window=k).cache()
    keras.utils.set_random_seed(0)
    model = keras.Sequential([
        keras.Input(batch_shape=(_STREAMS, None), dtype="int32"),
        keras.layers.Embedding(_VOCAB, _EMBED),
        keras.layers.LSTM(_UNITS, stateful=True, return_sequences=True),
        keras.layers.Dense(_VOCAB)])
    model.compile(loss=loss, optimizer=keras.optimizers.Adam(1e-3),
                  jit_compile=_JIT.value)
    x_t = keras.Input((1,), dtype="int32")
    h, c = keras.Input((_UNITS,)), keras.Input((_UNITS,))
    embedding = keras.layers.Embedding(_VOCAB, _EMBED)
    lstm = keras.layers.LSTMCell(_UNITS)
    e = keras.layers.Reshape((_EMBED,))(embedding(x_t))
    y_t, (new_h, new_c) = lstm(e, [h, c])
    step = keras.Model([x_t, h, c], [y_t, new_h, new_c])
    head = keras.layers.Dense(_VOCAB)
    head.build((None, _UNITS))
    embedding.set_weights(model.layers[0].get_weights())
    lstm.set_weights(model.layers[1].get_weights())
    head.set_weights(model.layers[2].get_weights())
    trainer = stepper.Trainer(step, head, loss=loss, tbptt=(k, k),
                              stream=True, jit_compile=_JIT.value,
                              optimizer=keras.optimizers.Adam(1e-3),
                              **_hoist())
    trainer_data, keras_data = streams(ids[:-1, None]), streams(ids[:-1])

    def run_trainer(clock):
      trainer.reset_states()
      trainer.fit(trainer_data, callbacks=[clock], verbose=0)

    def run_keras(clock):
      model.layers[1].reset_states()
      model.fit(keras_data, callbacks=[clock], verbose=0, shuffle=False)

    return run_trainer, run_keras
  return build


_BUILDERS = {"lstm_full": _lstm_full, "char_lm_k16": _char_lm(16),
             "char_lm_k4": _char_lm(4)}


def time_config(name: str, rounds: int, batches: int) -> dict:
  """Per-update times of the Trainer and Keras over paired rounds."""
  run_trainer, run_keras = _BUILDERS[name](batches)
  times = {"trainer": [], "keras": []}
  for r in range(rounds):
    order = [("trainer", run_trainer), ("keras", run_keras)]
    for who, run in order if r % 2 else order[::-1]:
      clock = _Clock()
      run(clock)
      times[who].append(clock.per_update_s())
  trainer_s, keras_s = times["trainer"][1:], times["keras"][1:]
  ratios = [a / b for a, b in zip(trainer_s, keras_s)]
  return dict(config=name, rounds=rounds - 1, batches=batches,
              jit_compile=_JIT.value, hoist=_HOIST.value,
              trainer_s=trainer_s, keras_s=keras_s,
              trainer_median_s=statistics.median(trainer_s),
              keras_median_s=statistics.median(keras_s),
              ratio_median=statistics.median(ratios),
              ratio_min=min(ratios), ratio_max=max(ratios),
              # The fastest round of each: the least disturbed by other load.
              ratio_of_fastest=min(trainer_s) / min(keras_s))


def markdown(results: list[dict]) -> str:
  lines = ["| config | Trainer | Keras | ratio (paired: median, min-max) "
           "| fastest rounds' ratio |", "|---|---|---|---|---|"]
  for r in results:
    lines.append(
        f"| {r['config']} | {1e3 * r['trainer_median_s']:.1f} ms | "
        f"{1e3 * r['keras_median_s']:.1f} ms | {r['ratio_median']:.2f}x "
        f"({r['ratio_min']:.2f}-{r['ratio_max']:.2f}) | "
        f"{r['ratio_of_fastest']:.2f}x |")
  return "\n".join(lines)


def main(argv):
  del argv
  results = []
  for name in _CONFIGS.value:
    if name not in _BUILDERS:
      raise app.UsageError(f"--configs: unknown config {name!r}; choose "
                           f"from {sorted(_BUILDERS)}.")
    results.append(time_config(name, _ROUNDS.value, _BATCHES.value))
    print(json.dumps({k: v for k, v in results[-1].items()
                      if not k.endswith("_s")}), flush=True)
  with open(_OUT.value, "w") as f:
    json.dump(dict(results=results, tensorflow=tf.__version__,
                   keras=keras.__version__), f, indent=1)
  if _MARKDOWN.value:
    print(markdown(results))


if __name__ == "__main__":
  app.run(main)
