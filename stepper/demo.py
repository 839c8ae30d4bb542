r"""Trains a step model through `model_rnn` and checks it against Keras.

    python -m stepper.demo --steps=300

The task is the adding problem: each input step is `(value, marker)`; the
target is the sum of the two marked values, read from the last output. A GRU
step model (a functional Keras model `[x_t, h] -> [y_t, h']`) is trained with
the engine; then its outputs and gradients are compared with a
`keras.layers.GRU` holding the same weights, and a pass/fail table is printed.
"""

from absl import app
from absl import flags
from absl import logging
import keras
import numpy as np
import tensorflow as tf

import stepper

_STEPS = flags.DEFINE_integer("steps", 300, "Training steps.")
_TIME = flags.DEFINE_integer("time", 20, "Sequence length in steps.")
_BATCH = flags.DEFINE_integer("batch", 32, "Sequences per batch.")
_UNITS = flags.DEFINE_integer("units", 16, "GRU units.")
_SEED = flags.DEFINE_integer("seed", 0, "Random seed.")


def adding_problem(batch: int, time: int, rng: np.random.Generator):
  """A batch of the adding problem.

  Returns:
    `(inputs, targets)`: float32 `[batch, time, 2]` and `[batch, 1]`.
  """
  values = rng.uniform(size=(batch, time))
  markers = np.zeros((batch, time))
  for row in markers:
    row[rng.choice(time, size=2, replace=False)] = 1.0
  inputs = np.stack([values, markers], -1).astype(np.float32)
  targets = (values * markers).sum(1, keepdims=True).astype(np.float32)
  return inputs, targets


def gru_step_model(units: int, features: int) -> keras.Model:
  """A one-step GRU as a functional model `[x_t, h] -> [y_t, h']`."""
  x = keras.Input((features,))
  h = keras.Input((units,))
  y, new_h = keras.layers.GRUCell(units)(x, [h])
  return keras.Model([x, h], [y, new_h[0]])


def train(step: keras.Model, head: keras.layers.Layer, steps: int,
          rng: np.random.Generator) -> list[float]:
  """Trains `step` + `head` on the adding problem; returns the losses."""
  optimizer = keras.optimizers.Adam(1e-2)

  @tf.function
  def train_step(x, y):
    with tf.GradientTape() as tape:
      last, _ = stepper.model_rnn(step, x, return_sequences=False,
                                  training=True)
      loss = tf.reduce_mean((head(last) - y) ** 2)
    variables = step.trainable_variables + head.trainable_variables
    optimizer.apply_gradients(zip(tape.gradient(loss, variables), variables))
    return loss

  losses = []
  for i in range(steps):
    losses.append(float(train_step(*adding_problem(
        _BATCH.value, _TIME.value, rng))))
    if i % 50 == 0 or i == steps - 1:
      logging.info("step %d loss %.4f", i, losses[-1])
  return losses


def compare_with_keras(step: keras.Model, x: np.ndarray) -> list[tuple]:
  """Outputs and gradients of the engine vs `keras.layers.GRU`.

  Returns:
    Rows `(quantity, max |err|, max relative err, passed)`.
  """
  control = keras.layers.GRU(_UNITS.value, return_sequences=True)
  control(x)
  control.set_weights(step.get_weights())
  x = tf.constant(x)
  results = []
  for run, variables in ((lambda: stepper.model_rnn(step, x)[0],
                          step.trainable_variables),
                         (lambda: control(x), control.trainable_variables)):
    with tf.GradientTape() as tape:
      tape.watch(x)
      outputs = run()
      loss = tf.reduce_mean(outputs ** 2)
    results.append([outputs, loss, *tape.gradient(loss, [*variables, x])])
  names = ["outputs", "loss"] + [
      f"grad {v.name}" for v in control.trainable_variables] + ["grad inputs"]
  rows = []
  for name, a, e in zip(names, *results):
    err = np.abs(np.asarray(a, np.float64) - np.asarray(e, np.float64))
    rel = err / np.maximum(np.abs(np.asarray(e, np.float64)), 1e-12)
    rows.append((name, err.max(), rel.max(),
                 bool(np.all(err <= 1e-6 + 1e-5 * np.abs(e)))))
  return rows


def main(argv):
  del argv
  keras.utils.set_random_seed(_SEED.value)
  rng = np.random.default_rng(_SEED.value)
  step = gru_step_model(_UNITS.value, 2)
  head = keras.layers.Dense(1)
  losses = train(step, head, _STEPS.value, rng)
  print(f"\nadding problem, T={_TIME.value}: loss {losses[0]:.4f} -> "
        f"{losses[-1]:.4f} in {_STEPS.value} steps (predicting the mean "
        "gives ~0.167)\n")
  rows = compare_with_keras(step, adding_problem(4, _TIME.value, rng)[0])
  print(f"{'quantity':<28} {'max |err|':>10} {'max rel':>10}  result")
  for name, err, rel, ok in rows:
    print(f"{name:<28} {err:>10.2e} {rel:>10.2e}  {'PASS' if ok else 'FAIL'}")
  if not all(ok for *_, ok in rows):
    raise SystemExit("engine and keras.layers.GRU disagree")
  print("\nengine matches keras.layers.GRU: PASS")


if __name__ == "__main__":
  app.run(main)
