"""`python -m stepper.verify --cell=gru`: a `compare` report on a built-in cell.

Exit code 1 when a row fails.
"""

import functools
from typing import Sequence

from absl import app
from absl import flags
import keras
import tensorflow as tf

from stepper import verify


# ------------------------------------------------------------------ CLI ----


_CELLS = {"lstm": (keras.layers.LSTMCell, keras.layers.LSTM),
          "gru": (keras.layers.GRUCell, keras.layers.GRU),
          "simple_rnn": (keras.layers.SimpleRNNCell, keras.layers.SimpleRNN)}


def _define_flags() -> dict:
  """The CLI's flags; defined only when run as a script, so importing
  `stepper.verify` defines no global flags."""
  return {
      "cell": flags.DEFINE_enum("cell", "gru", sorted(_CELLS),
                                "Built-in cell to verify."),
      "units": flags.DEFINE_integer("units", 8, "Units of the cell."),
      "time": flags.DEFINE_integer("time", 12, "Sequence length in steps."),
      "batch": flags.DEFINE_integer("batch", 4, "Batch size."),
      "features": flags.DEFINE_integer("features", 3,
                                       "Input features per step."),
      "dtype": flags.DEFINE_enum("dtype", "float64", ["float32", "float64"],
                                 "Dtype of models and inputs."),
      "seed": flags.DEFINE_integer("seed", 0, "Seed of weights and inputs."),
  }


def _main(holders: dict, argv: Sequence[str]) -> int:
  del argv  # Unused.
  value = {name: holder.value for name, holder in holders.items()}
  keras.utils.set_random_seed(value["seed"])
  cell_cls, layer_cls = _CELLS[value["cell"]]
  cell = cell_cls(value["units"], dtype=value["dtype"])
  control = layer_cls(value["units"], return_sequences=True,
                      dtype=value["dtype"])
  x = tf.random.normal([value["batch"], value["time"], value["features"]],
                       dtype=value["dtype"])
  result = verify.compare(cell, control, x)
  print(result)
  return 0 if result.ok else 1


if __name__ == "__main__":
  _holders = _define_flags()
  app.run(functools.partial(_main, _holders))
