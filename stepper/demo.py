r"""Trains a GRU step model three ways on a delay task and compares.

    python -m stepper.demo                         # ~1 minute on 2 CPU cores
    python -m stepper.demo --updates=50 --time=12  # a quick look

The task needs memory longer than a truncation window: each input step is a
random sign `x_t = +-1` and the target is the input `lag` steps back,
`y_t = x_{t - lag}` (zero for the first `lag` steps), generated in-process.
A GRU step model (a functional Keras model `[x_t, h] -> [y_t, h']`) with a
`Dense` head is trained with `stepper.Trainer` three ways, each with the same
budget of optimizer updates:

* full BPTT: one update per batch, gradients through the whole sequence;
* TBPTT(k1 = k2 = k_short), `k_short < lag`: an update every `k_short`
  steps, backpropagating `k_short` steps (plain truncation): no gradient
  ever connects `x_{t - lag}` to the loss at `t`;
* TBPTT(k1 < k2), `k2 - k1 >= lag`: an update every `k1` steps,
  backpropagating `k2` steps, far enough for every loss step.

Each run shows a Progbar and writes TensorBoard scalars. The demo then prints
a table (updates, reach of the gradient, test loss, accuracy, time) with the
lesson in one line under it, read off the table, checks the engine's
gradients against `keras.layers.GRU` with the same weights
(`stepper.verify.compare`), plots the three learning curves against updates
to a PNG, and names the output directory.

The table is one seed (`--seed`). `python -m benchmarks.demo_seeds` (in the
repository, not the package) runs the same three runs for several seeds
through `benchmarks.experiment` and reports mean +- sd and paired intervals.
"""

import json
import os
import tempfile
import time as time_lib

from absl import app
from absl import flags
from absl import logging
import keras
import numpy as np
import tensorflow as tf

import stepper

_UPDATES = flags.DEFINE_integer(
    "updates", 480, "Optimizer updates per run (the same budget for every "
    "run: full BPTT makes one per batch, TBPTT one every k1 steps).")
_TIME = flags.DEFINE_integer("time", 24, "Sequence length in steps.")
_LAG = flags.DEFINE_integer("lag", 6, "The target is the input this many "
                            "steps back.")
_BATCH = flags.DEFINE_integer("batch", 32, "Sequences per batch.")
_UNITS = flags.DEFINE_integer("units", 16, "GRU units.")
_K_SHORT = flags.DEFINE_integer(
    "k_short", 3, "k1 = k2 of the plain truncated run (shorter than lag).")
_K1 = flags.DEFINE_integer("k1", 3, "Steps between updates (TBPTT k1 < k2).")
_K2 = flags.DEFINE_integer(
    "k2", 10, "Steps backpropagated per update (k1 < k2 run; k2 - k1 >= lag "
    "reaches the lag from every loss step).")
_LEARNING_RATE = flags.DEFINE_float("learning_rate", 1e-2, "Adam's rate.")
_TEST_SIZE = flags.DEFINE_integer("test_size", 256, "Held-out sequences.")
_SEED = flags.DEFINE_integer("seed", 0, "Random seed.")
_OUTPUT_DIR = flags.DEFINE_string(
    "output_dir", None, "Where logs and the plot go (default: a new "
    "temporary directory).")

# A run "learned" the delay if it gets this share of the signs right
# (chance: 0.5).
_LEARNED = 0.9


def delay_task(n: int, time: int, lag: int,
               rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
  """`n` sequences of random signs and their copies `lag` steps later.

  Returns:
    `(inputs, targets)`: float32 `[n, time, 1]`, `x_t = +-1`, and
    `[n, time, 1]`, `y_t = x_{t - lag}` (zero for `t < lag`).
  """
  inputs = rng.choice([-1.0, 1.0], size=(n, time, 1)).astype(np.float32)
  targets = np.zeros_like(inputs)
  targets[:, lag:] = inputs[:, :time - lag]
  return inputs, targets


def gru_step_model(units: int, features: int) -> keras.Model:
  """A one-step GRU as a functional model `[x_t, h] -> [y_t, h']`."""
  x = keras.Input((features,))
  h = keras.Input((units,))
  y, new_h = keras.layers.GRUCell(units)(x, [h])
  return keras.Model([x, h], [y, new_h[0]])


def runs() -> list[tuple[str, tuple[int, int] | None]]:
  """`(name, tbptt)` of the three runs, `tbptt` None for full BPTT."""
  return [("full BPTT", None),
          (f"TBPTT(k1=k2={_K_SHORT.value})", (_K_SHORT.value, _K_SHORT.value)),
          (f"TBPTT(k1={_K1.value},k2={_K2.value})", (_K1.value, _K2.value))]


def updates_per_batch(tbptt: tuple[int, int] | None) -> int:
  """Optimizer updates one batch of sequences makes."""
  return 1 if tbptt is None else -(-_TIME.value // tbptt[0])


def reach(tbptt: tuple[int, int] | None) -> int:
  """The farthest back (in steps) any loss step's gradient reaches."""
  return _TIME.value - 1 if tbptt is None else min(tbptt[1], _TIME.value) - 1


def make_data(seed: int) -> dict:
  """The training batches and test set drawn from `seed`."""
  rng = np.random.default_rng(seed)
  x, y = delay_task(_UPDATES.value * _BATCH.value, _TIME.value, _LAG.value,
                    rng)
  x_test, y_test = delay_task(_TEST_SIZE.value, _TIME.value, _LAG.value, rng)
  return dict(
      train=tf.data.Dataset.from_tensor_slices((x, y)).batch(_BATCH.value),
      test=(x_test, y_test),
      test_dataset=tf.data.Dataset.from_tensor_slices(
          (x_test, y_test)).batch(_BATCH.value))


def train_one(index: int, name: str, tbptt: tuple[int, int] | None,
              data: dict, output_dir: str, seed: int) -> dict:
  """Trains a fresh model (weights from `seed`) one way with the update
  budget on `data` (`make_data`); returns its row of the table."""
  keras.utils.set_random_seed(seed)
  step = gru_step_model(_UNITS.value, 1)
  trainer = stepper.Trainer(
      step, keras.layers.Dense(1), loss="mse", tbptt=tbptt,
      optimizer=keras.optimizers.Adam(_LEARNING_RATE.value),
      gradient_clip_norm=1.0,
      logdir=os.path.join(output_dir, "tensorboard", f"{index}_{_slug(name)}"))
  per_batch = updates_per_batch(tbptt)
  batches = -(-_UPDATES.value // per_batch)
  curve = stepper.BatchLosses()
  print(f"\n{name}: {batches} batches x {per_batch} updates")
  start = time_lib.perf_counter()
  trainer.fit(data["train"], epochs=1, steps=batches, callbacks=[curve])
  seconds = time_lib.perf_counter() - start
  x_test, y_test = data["test"]
  predictions = trainer.predict(x_test).numpy()[:, _LAG.value:]
  accuracy = float(np.mean(np.sign(predictions) == y_test[:, _LAG.value:]))
  loss = trainer.evaluate(data["test_dataset"])["loss"]
  logging.info("%s: test loss %.4f, accuracy %.3f, %.1f s", name, loss,
               accuracy, seconds)
  return dict(run=name, updates=trainer.global_step, loss=loss,
              accuracy=accuracy, seconds=seconds,
              reach=reach(tbptt), curve=curve.losses,
              curve_updates=[per_batch * (i + 1)
                             for i in range(len(curve.losses))], step=step)


def _slug(name: str) -> str:
  return "".join(c if c.isalnum() else "_" for c in name).strip("_").lower()


def print_table(rows: list[dict]) -> None:
  """The final table, one line per run, `|`-separated, and the lesson."""
  print(f"\ndelay task (y_t = x_(t-{_LAG.value})), T={_TIME.value}, batches "
        f"of {_BATCH.value}, {_UNITS.value} GRU units; test set of "
        f"{_TEST_SIZE.value} sequences; ONE seed (--seed={_SEED.value}): for "
        "several seeds with intervals run `python -m benchmarks.demo_seeds` "
        "(benchmarks/results/demo_seeds.md)")
  print(f"{'run':<22} | {'updates':>7} | {'reach':>5} | {'test loss':>9} | "
        f"{'accuracy':>8} | {'time s':>7}")
  for r in rows:
    print(f"{r['run']:<22} | {r['updates']:>7d} | {r['reach']:>5d} | "
          f"{r['loss']:>9.5f} | {r['accuracy']:>8.3f} | {r['seconds']:>7.2f}")
  print(lesson(rows))
  print(f"reach: the farthest back (steps) any loss step's gradient reaches; "
        f"accuracy: share of signs right at steps >= lag (chance 0.5); "
        f"predicting zeros gives a test loss of "
        f"{(_TIME.value - _LAG.value) / _TIME.value:.3f}.")


def lesson(rows: list[dict]) -> str:
  """One line read off the table: which runs learned the delay, how far
  back their gradients reach, and whether this seed splits them by reach."""
  def names(learned):
    group = [f"{r['run']} (reach {r['reach']})" for r in rows
             if (r["accuracy"] >= _LEARNED) == learned]
    return ", ".join(group) or "none"
  split = all((r["accuracy"] >= _LEARNED) == (r["reach"] >= _LAG.value)
              for r in rows)
  reading = (f"on this seed, exactly the runs whose gradient reaches "
             f"{_LAG.value} steps back learned it" if split else
             f"on this seed, reaching {_LAG.value} steps back does not "
             "separate the runs that learned it from the others")
  return (f"lesson: the target needs the input {_LAG.value} steps back; with "
          f"the same {_UPDATES.value} updates, learned it (accuracy >= "
          f"{_LEARNED}): {names(True)}; did not: {names(False)}; {reading}.")


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
    axes.plot(r["curve_updates"], r["curve"], label=r["run"])
  axes.set_yscale("log")
  axes.set_xlabel("optimizer updates")
  axes.set_ylabel("training loss (mean over steps)")
  axes.set_title(f"delay task, lag {_LAG.value}, T={_TIME.value}")
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
  data = make_data(_SEED.value)
  rows = [train_one(i, name, tbptt, data, output_dir, _SEED.value)
          for i, (name, tbptt) in enumerate(runs())]
  print_table(rows)

  report = verify_engine(rows[0]["step"], data["test"][0][:4])
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
