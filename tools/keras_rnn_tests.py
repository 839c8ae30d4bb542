"""Keras' own RNN tests, run on `stepper.StepRNN` and `stepper.Bidirectional`.

    python tools/keras_rnn_tests.py [pytest arguments, e.g. -x -k stacked]

Runs the test files shipped in the installed keras wheel
(`keras/src/layers/rnn/{rnn,gru,lstm,simple_rnn,stacked_rnn_cells,
bidirectional,dropout_rnn_cell}_test.py`) with `keras.layers.RNN`, `GRU`,
`LSTM` and `SimpleRNN` replaced by `StepRNN` layers that take Keras'
arguments (`return_sequences=False` by default, the cell built from a GRU's
or LSTM's arguments) and `keras.layers.Bidirectional` by
`stepper.Bidirectional`. The tests of Keras' fused cuDNN bidirectional path
(`_can_attempt_fused_*`, `use_cudnn`) are deselected: they test Keras' own
dispatch to cuDNN, which needs Keras' `GRU`/`LSTM` classes.

Not part of CI (about 5 minutes on 2 busy cores); `tests/keras_parity_test.py`
holds the same golden numbers for CI. Nothing is written to the keras wheel
(no bytecode, no cache).
"""

import inspect
import pathlib
import sys

import keras
from keras.src import layers as keras_layers
import pytest

import stepper

_FILES = ("rnn", "gru", "lstm", "simple_rnn", "stacked_rnn_cells",
          "bidirectional", "dropout_rnn_cell")
_CUDNN_ONLY = ("fused_gru_eligibility", "fused_lstm_eligibility",
               "keeps_use_cudnn")


@keras.saving.register_keras_serializable(package="keras_rnn_tests")
class RNN(stepper.StepRNN):
  """`keras.layers.RNN(cell, ...)`."""

  def __init__(self, cell=None, step=None, return_sequences=False, **kwargs):
    super().__init__(step or cell, return_sequences=return_sequences,
                     **kwargs)


def _layer_of(cell_class: type, name: str) -> type:
  """`keras.layers.GRU` (`LSTM`, `SimpleRNN`): a `StepRNN` of the cell."""
  cell_arguments = set(inspect.signature(cell_class.__init__).parameters)

  @keras.saving.register_keras_serializable(package="keras_rnn_tests",
                                            name=name)
  class Layer(stepper.StepRNN):

    def __init__(self, units=None, step=None, return_sequences=False,
                 use_cudnn="auto", **kwargs):
      # The cell's arguments (and the legacy `implementation`, also in a
      # config) go to the cell, as in Keras' GRU/LSTM.
      cell_kwargs = {k: kwargs.pop(k) for k in list(kwargs)
                     if (k in cell_arguments or k == "implementation") and
                     k not in ("dtype", "trainable", "name", "units")}
      if step is None:
        step = cell_class(units, dtype=kwargs.get("dtype"),
                          trainable=kwargs.get("trainable", True),
                          **cell_kwargs)
      super().__init__(step, return_sequences=return_sequences, **kwargs)
      self.use_cudnn = use_cudnn  # Recorded, as Keras; no cuDNN path here.

    @property
    def units(self) -> int:
      return self.cell.units

  Layer.__name__ = Layer.__qualname__ = name
  return Layer


def main(argv: list[str]) -> int:
  sys.dont_write_bytecode = True  # Nothing written into the keras wheel.
  keras_layers.RNN = RNN
  keras_layers.GRU = _layer_of(keras.layers.GRUCell, "GRU")
  keras_layers.LSTM = _layer_of(keras.layers.LSTMCell, "LSTM")
  keras_layers.SimpleRNN = _layer_of(keras.layers.SimpleRNNCell, "SimpleRNN")
  keras_layers.Bidirectional = stepper.Bidirectional
  folder = pathlib.Path(keras_layers.__file__).parent / "rnn"
  deselect = " and ".join(f"not {name}" for name in _CUDNN_ONLY)
  return pytest.main([*(str(folder / f"{name}_test.py") for name in _FILES),
                      "-p", "no:cacheprovider", "-o", "addopts=", "-q",
                      "-rs", "-k", deselect, *argv])


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
