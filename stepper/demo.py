r"""Trains a GRU step model three ways on the adding problem and compares.

    python -m stepper.demo                       # ~1 minute on 2 CPU cores
    python -m stepper.demo --steps=20 --time=12  # a quick look

The task is the adding problem, generated in-process: each input step is
`(value, marker)` with exactly two markers per sequence; the target at every
step is the sum of the marked values seen so far, so the first marked value
must be remembered until the end. A GRU step model (a functional Keras model
`[x_t, h] -> [y_t, h']`) with a `Dense` head is trained with
`stepper.Trainer` three ways:

* full BPTT: one update per batch, gradients through the whole sequence;
* TBPTT(k1 = k2 = k_short): an update every `k_short` steps, backpropagating
  `k_short` steps (plain truncation);
* TBPTT(k1 < k2): an update every `k1` steps, backpropagating `k2` steps.

Each run shows a Progbar and writes TensorBoard scalars. The demo then prints
a table (test loss, accuracy, time, peak memory), checks the engine's
gradients against `keras.layers.GRU` with the same weights
(`stepper.verify.compare`), plots the three learning curves to a PNG, and
names the output directory.
"""

import json
import os
import resource
import sys
import tempfile
import time as time_lib

from absl import app
from absl import flags
from absl import logging
import keras
import numpy as np
import tensorflow as tf

import stepper

_STEPS = flags.DEFINE_integer("steps", 300, "Training batches per run.")
_TIME = flags.DEFINE_integer("time", 40, "Sequence length in steps.")
_BATCH = flags.DEFINE_integer("batch", 32, "Sequences per batch.")
_UNITS = flags.DEFINE_integer("units", 16, "GRU units.")
_K_SHORT = flags.DEFINE_integer("k_short", 5,
                                "k1 = k2 of the plain truncated run.")
_K1 = flags.DEFINE_integer("k1", 5, "Steps between updates (TBPTT k1 < k2).")
_K2 = flags.DEFINE_integer("k2", 20,
                           "Steps backpropagated per update (k1 < k2 run).")
_LEARNING_RATE = flags.DEFINE_float("learning_rate", 1e-2, "Adam's rate.")
_TEST_SIZE = flags.DEFINE_integer("test_size", 256, "Held-out sequences.")
_SEED = flags.DEFINE_integer("seed", 0, "Random seed.")
_OUTPUT_DIR = flags.DEFINE_string(
    "output_dir", None, "Where logs and the plot go (default: a new "
    "temporary directory).")

# The adding problem's usual success criterion.
_TOLERANCE = 0.04


def adding_problem(n: int, time: int,
                   rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
  """`n` sequences of the adding problem with per-step targets.

  Returns:
    `(inputs, targets)`: float32 `[n, time, 2]` (value, marker) and
    `[n, time, 1]`, the sum of the marked values up to each step.
  """
  values = rng.uniform(size=(n, time))
  markers = np.zeros((n, time))
  for row in markers:
    row[rng.choice(time, size=2, replace=False)] = 1.0
  inputs = np.stack([values, markers], -1).astype(np.float32)
  targets = np.cumsum(values * markers, axis=1)[..., None].astype(np.float32)
  return inputs, targets


def gru_step_model(units: int, features: int) -> keras.Model:
  """A one-step GRU as a functional model `[x_t, h] -> [y_t, h']`."""
  x = keras.Input((features,))
  h = keras.Input((units,))
  y, new_h = keras.layers.GRUCell(units)(x, [h])
  return keras.Model([x, h], [y, new_h[0]])


def _reset_peak_memory() -> None:
  if tf.config.list_logical_devices("GPU"):
    tf.config.experimental.reset_memory_stats("GPU:0")


def _peak_memory_mib() -> tuple[float, str]:
  """Peak memory and what it measures: the GPU's peak since the last reset
  where TensorFlow tracks it, else the process's peak RSS so far."""
  if tf.config.list_logical_devices("GPU"):
    info = tf.config.experimental.get_memory_info("GPU:0")
    return info["peak"] / 2**20, "peak GPU:0 memory allocated by TensorFlow"
  # Linux reports ru_maxrss in KiB, macOS in bytes.
  scale = 1 if sys.platform == "darwin" else 2**10
  return (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**20,
          "peak RSS of the whole process so far (CPU: TensorFlow does not "
          "track CPU allocations), so it can only grow from run to run")


def _runs() -> list[tuple[str, tuple[int, int] | None]]:
  return [("full BPTT", None),
          (f"TBPTT(k1=k2={_K_SHORT.value})", (_K_SHORT.value, _K_SHORT.value)),
          (f"TBPTT(k1={_K1.value},k2={_K2.value})", (_K1.value, _K2.value))]


def train_one(index: int, name: str, tbptt: tuple[int, int] | None,
              data: dict, output_dir: str) -> dict:
  """Trains a fresh model one way; returns its row of the table."""
  keras.utils.set_random_seed(_SEED.value)
  step = gru_step_model(_UNITS.value, 2)
  trainer = stepper.Trainer(
      step, keras.layers.Dense(1), loss="mse", tbptt=tbptt,
      optimizer=keras.optimizers.Adam(_LEARNING_RATE.value),
      gradient_clip_norm=1.0,
      logdir=os.path.join(output_dir, "tensorboard", f"{index}_{_slug(name)}"))
  curve = stepper.BatchLosses()
  print(f"\n{name}")
  _reset_peak_memory()
  start = time_lib.perf_counter()
  trainer.fit(data["train"], epochs=1, callbacks=[curve])
  seconds = time_lib.perf_counter() - start
  memory, _ = _peak_memory_mib()
  x_test, y_test = data["test"]
  last = trainer.predict(x_test)[:, -1].numpy()
  accuracy = float(np.mean(np.abs(last - y_test[:, -1]) < _TOLERANCE))
  loss = trainer.evaluate(data["test_dataset"])["loss"]
  logging.info("%s: test loss %.4f, accuracy %.3f, %.1f s", name, loss,
               accuracy, seconds)
  return dict(run=name, loss=loss, accuracy=accuracy, seconds=seconds,
              peak_mib=memory, curve=curve.losses, step=step)


def _slug(name: str) -> str:
  return "".join(c if c.isalnum() else "_" for c in name).strip("_").lower()


def print_table(rows: list[dict]) -> None:
  """The final table: one line per run, `|`-separated."""
  print(f"\nadding problem, T={_TIME.value}, {_STEPS.value} batches of "
        f"{_BATCH.value}; test set of {_TEST_SIZE.value} sequences")
  print(f"{'run':<22} | {'test loss':>9} | {'accuracy':>8} | "
        f"{'time s':>7} | {'peak MiB':>8}")
  for r in rows:
    print(f"{r['run']:<22} | {r['loss']:>9.5f} | {r['accuracy']:>8.3f} | "
          f"{r['seconds']:>7.2f} | {r['peak_mib']:>8.1f}")
  print(f"accuracy: |last prediction - target| < {_TOLERANCE}; "
        f"peak MiB: {_peak_memory_mib()[1]}; predicting the mean gives a test "
        "loss of ~0.2.")


def plot(rows: list[dict], path: str) -> bool:
  """The three learning curves (training loss per batch) as a PNG.

  Returns:
    False if matplotlib (not a dependency of stepper) is missing.
  """
  try:
    import matplotlib  # pylint: disable=g-import-not-at-top
  except ImportError:
    return False
  matplotlib.use("Agg")
  from matplotlib import pyplot  # pylint: disable=g-import-not-at-top
  figure, axes = pyplot.subplots(figsize=(7, 4))
  for r in rows:
    axes.plot(np.arange(1, len(r["curve"]) + 1), r["curve"], label=r["run"])
  axes.set_yscale("log")
  axes.set_xlabel("batch")
  axes.set_ylabel("training loss (mean over steps)")
  axes.set_title(f"adding problem, T={_TIME.value}")
  axes.legend()
  figure.tight_layout()
  figure.savefig(path, dpi=100)
  pyplot.close(figure)
  return True


def verify_engine(step: keras.Model,
                  x: np.ndarray) -> stepper.verify.GradientReport:
  """The trained step's outputs and gradients vs `keras.layers.GRU`."""
  control = keras.layers.GRU(_UNITS.value, return_sequences=True)
  return stepper.verify.compare(step, control, x)


def main(argv):
  del argv
  output_dir = _OUTPUT_DIR.value or tempfile.mkdtemp(prefix="stepper_demo_")
  os.makedirs(output_dir, exist_ok=True)
  rng = np.random.default_rng(_SEED.value)
  x, y = adding_problem(_STEPS.value * _BATCH.value, _TIME.value, rng)
  x_test, y_test = adding_problem(_TEST_SIZE.value, _TIME.value, rng)
  data = dict(
      train=tf.data.Dataset.from_tensor_slices((x, y)).batch(_BATCH.value),
      test=(x_test, y_test),
      test_dataset=tf.data.Dataset.from_tensor_slices(
          (x_test, y_test)).batch(_BATCH.value))
  rows = [train_one(i, name, tbptt, data, output_dir)
          for i, (name, tbptt) in enumerate(_runs())]
  print_table(rows)

  report = verify_engine(rows[0]["step"], x_test[:4])
  print(f"\n{report}")
  if not plot(rows, os.path.join(output_dir, "learning_curves.png")):
    print("\nmatplotlib is not installed: no learning_curves.png "
          "(pip install matplotlib).")
  with open(os.path.join(output_dir, "results.json"), "w") as f:
    json.dump({"runs": [{k: v for k, v in r.items() if k != "step"}
                        for r in rows], "verify": report.to_dict()}, f,
              indent=1)
  print(f"\noutputs in {output_dir}: learning_curves.png, results.json, "
        f"tensorboard/ (tensorboard --logdir {output_dir}/tensorboard)")
  if not report.ok:
    raise SystemExit("the engine's gradients disagree with keras.layers.GRU")


if __name__ == "__main__":
  app.run(main)
